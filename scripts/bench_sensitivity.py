"""Benchmark of the sensitivity analyzer (issue 3): full per-site `only` analysis on
the shared DINOv2 probe, and the speed-up of cached block prefixes over naive full
re-evaluation, measured in the same run on a subset of candidates.

    .venv/bin/python scripts/bench_sensitivity.py [--images 256] [--subset 6]

Prints a markdown table and writes out/<model>/bench_sensitivity.json.
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

from analysis.sensitivity import analyze_sensitivity, make_candidates  # noqa: E402
from quant.presets import preset  # noqa: E402
from vitq.pipeline import eval_set, run_sensitivity, runner  # noqa: E402
from vitq.session import Options, Session  # noqa: E402

SHARED = ROOT.parent / "shared"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB -> GB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "dinov2-s14-in1k-probe"))
    ap.add_argument("--data", default=str(SHARED / "data" / "imagenet-mini"))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--subset", type=int, default=6, help="candidates timed both ways")
    args = ap.parse_args()
    if not Path(args.model).is_dir():
        sys.exit(f"bench needs {args.model} (the shared DINOv2 probe)")

    session = Session(Options(model=args.model, data=args.data, progress=True))
    session.calibrate()
    config = preset("all", session.sites)
    data = eval_set(session, args.images)

    t0 = time.time()
    df, meta, run, paths = run_sensitivity(session, config, mode="only", images=args.images)
    full_s = time.time() - t0

    cands = make_candidates(session.sites, config, "op")
    step = max(1, len(cands) // args.subset)
    subset = [c.name for c in cands[::step]][: args.subset]
    timings = {}
    for naive in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            _, _, r = analyze_sensitivity(runner(session, data), config, Path(tmp), only=subset, naive=naive,
                                          progress=False)
            timings["naive" if naive else "cached"] = r["candidates_s"]  # the candidate loop alone

    result = {
        "model": args.model, "images": args.images, "candidates": len(cands), "full_only_analysis_s": round(full_s, 1),
        "measured_now": run["measured_now"], "speedup_vs_naive_estimate": run["speedup_vs_naive"],
        "subset": subset, "subset_cached_s": round(timings["cached"], 1), "subset_naive_s": round(timings["naive"], 1),
        "subset_speedup": round(timings["naive"] / timings["cached"], 2), "peak_rss_gb": round(peak_rss_gb(), 2),
        "table": [str(p) for p in paths],
    }
    (session.out / "bench_sensitivity.json").write_text(json.dumps(result, indent=2))
    print("| what | value |\n|---|---|")
    for k, v in result.items():
        if k not in ("subset", "table"):
            print(f"| {k} | {v} |")
    print(f"\nsubset: {', '.join(subset)}")


if __name__ == "__main__":
    main()
