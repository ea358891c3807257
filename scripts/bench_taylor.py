"""Benchmark of the taylor sensitivity estimate (issue 11): its ranking against a measured
`only` table (Spearman rho of the KL ranks, how many of the measured top 10 are in its
top 15), with wall times, on one shared probe.

    .venv/bin/python scripts/bench_taylor.py --probe fmnist --images 64 --probes 4 \\
        --measured out/fmnist/sensitivity_only_op.csv

Without --measured, the `only` table is measured here on the same images (slow: one
pass per candidate). Prints a markdown table, writes out/<probe>/bench_taylor.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from analysis.sensitivity import analyze_sensitivity  # noqa: E402
from analysis.taylor import rank_agreement, taylor_estimates  # noqa: E402
from quant.presets import preset  # noqa: E402
from vitq.pipeline import eval_set, runner  # noqa: E402
from vitq.session import Options, Session  # noqa: E402

SHARED = ROOT.parent / "shared"
PROBES = {"fmnist": ("dinov2-s14-fmnist-probe", "fashion-mnist-mini"), "in1k": ("dinov2-s14-in1k-probe", "imagenet-mini")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", choices=PROBES, default="fmnist")
    ap.add_argument("--images", type=int, default=64, help="val images the estimate uses (seeded plan images)")
    ap.add_argument("--probes", type=int, default=4, help="Fisher eigen-probes per image")
    ap.add_argument("--measured", help="measured `only` table (CSV); default: measure it here on --images")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    model, data = (SHARED / "models" / PROBES[args.probe][0]), (SHARED / "data" / PROBES[args.probe][1])
    if not model.is_dir():
        sys.exit(f"bench needs {model} (a shared probe)")
    session = Session(Options(model=str(model), data=str(data), out=str(ROOT / "out" / args.probe),
                              calib=args.calib, device=args.device, progress=False))
    session.calibrate()
    config = preset("all", session.sites)
    t0 = time.time()
    run = runner(session, eval_set(session, args.images))
    reference_s = time.time() - t0
    estimate, info = taylor_estimates(run, config, probes=args.probes)
    if args.measured:
        measured, measured_s, measured_images = pd.read_csv(args.measured), None, None
        meta = json.loads(Path(args.measured).with_suffix(".json").read_text()).get("meta", {})
        measured_images = meta.get("images")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            t1 = time.time()
            measured, _, _ = analyze_sensitivity(run, config, Path(tmp), progress=False)
            measured_s, measured_images = round(time.time() - t1, 1), args.images
    by_path = {s.path: s.name for s in session.sites}  # tables written before the canonical names
    measured = measured.assign(candidate=measured["candidate"].map(lambda c: by_path.get(c, c)))
    agreement = rank_agreement(estimate, measured)
    result = {"probe": args.probe, "device": str(session.device), "taylor_images": info["images"],
              "probes": info["probes"], "fisher_trace_captured_mean": info["fisher_trace_captured_mean"],
              "taylor_s": info["wall_s"], "fp32_reference_s": round(reference_s, 1),
              "measured_images": measured_images, "measured_s": measured_s, **agreement,
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)}
    (session.out / "bench_taylor.json").write_text(json.dumps(result, indent=2))
    print("| what | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
