"""What is left of the quantization gap to NNCF: one factor at a time on vitq's ``nncf`` preset.

Base: the ``nncf`` preset (residual adds and ``matmul_av`` float; activations asymmetric
uint8 per tensor, minmax; weights symmetric int8 per channel), calibrated on vitq's seeded
sample (``--calib 256``, ``--seed 0``) of the probe's train images. Each level changes one
thing of the base (``LEVELS``): the activation observer, per-sample range aggregation
(``mean_minmax``: NNCF's default activation range, the mean over calibration images of each
image's min and max), SmoothQuant alpha on every LayerNorm feeding Linears, symmetric
activations (everywhere, or only at the ``matmul_qk`` inputs, NNCF's transformer rule), bias
correction (NNCF runs its fast bias correction by default).

Each config runs as its Q/DQ ONNX export in ONNX Runtime (``--threads``, default 1): in
int8 it is faster per image than the fake-quant simulation (the run prints both on one
batch). Reference: FP32 torch logits of the same images. Per level: KL to FP32, top-1
agreement, and the paired-bootstrap 95 % interval (analysis.metrics.paired_bootstrap, 2000
resamples, seed 0) of the KL gain (base KL - level KL, positive = better) and of the
agreement gain over the base, on an image set: ``--set choose`` (the probe's val images,
fashion-mnist-mini: 1000) or ``--set confirm`` (``--confirm-images`` seeded images of
``--confirm-data``, fashion-mnist-large's val, disjoint from mini's). Per-config results
are cached in ``--out/<set>/`` (a rerun computes only what is missing); every run rewrites
``factors.md``/``factors.csv``/``factors.json`` from all cached sets.

    OMP_NUM_THREADS=1 python scripts/factor_gap.py --set choose
    OMP_NUM_THREADS=1 python scripts/factor_gap.py --set confirm --levels base,sq_0.95,sq_0.5,obs_mean_minmax
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def levels(base):
    """level name -> (factor, level label, QuantConfig): the base and one change at a time."""
    def act(**changes):
        return replace(base, activation=replace(base.activation, **changes))

    def with_(**changes):
        return replace(base, **changes)
    out = {"base": ("base", "nncf preset: minmax, asymmetric, no smoothing, no bias correction", base)}
    for obs in ("mean_minmax", "percentile", "mse", "entropy"):
        out[f"obs_{obs}"] = ("activation observer" if obs != "mean_minmax" else "per-sample aggregation",
                             f"observer {obs}", act(observer=obs))
    for alpha in (0.15, 0.5, 0.95):
        out[f"sq_{alpha}"] = ("SmoothQuant alpha", f"smooth norm1, norm2 alpha {alpha}",
                              with_(smooth={"*.norm1": alpha, "*.norm2": alpha}))
    out["sym_all"] = ("activation signedness", "symmetric int8 activations everywhere", act(symmetric=True))
    out["sym_matmul"] = ("activation signedness", "symmetric int8 at the matmul_qk inputs only",
                         with_(overrides={"*.matmul_qk": {"activation": {"symmetric": True}}}))
    out["bias_corr"] = ("bias correction", "bias correction on every Linear", with_(bias_correction=["*"]))
    return out


def reference_logits(session, images, cache: Path):
    import torch
    if cache.is_file():
        return torch.load(cache)
    state = session.qmodel.prepare(None)
    refs, labels = [], []
    with torch.inference_mode():
        for pixels, lab, _ in session.batches(images):
            session.qmodel.restore(state)
            refs.append(session.qmodel(pixels).float())
            labels.append(lab)
    out = {"logits": torch.cat(refs), "labels": torch.cat(labels)}
    torch.save(out, cache)
    return out


def run_level(session, runner, images, ref) -> dict:
    import torch

    from analysis.metrics import OutputStats
    stats, start = OutputStats(), 0
    with torch.inference_mode():
        for pixels, _, _ in session.batches(images):
            n = len(pixels)
            stats.update(runner(pixels), ref["logits"][start:start + n], ref["labels"][start:start + n])
            start += n
    return stats.to_dict()


def table(out: Path, level_info: dict) -> tuple[list[dict], str]:
    """Rows of every cached set and level, with paired intervals against that set's base."""
    from analysis.metrics import OutputStats, paired_bootstrap
    rows = []
    for set_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        cached = {p.stem: OutputStats.from_dict(json.loads(p.read_text())) for p in set_dir.glob("*.json")}
        if "base" not in cached:
            continue
        base = cached["base"]
        for name in [n for n in level_info if n in cached]:
            s = cached[name]
            summary = s.summary()
            kl = paired_bootstrap(base.array("kl"), s.array("kl"))
            agree = paired_bootstrap(100 * s.array("agree"), 100 * base.array("agree"))
            rows.append({"set": set_dir.name, "level": name, "factor": level_info[name][0],
                         "change": level_info[name][1], "images": summary["images"], "kl": summary["kl"],
                         "agreement": summary["agreement"], "top1": summary["top1"],
                         "kl_gain": kl["mean"], "kl_gain_lo": kl["lo"], "kl_gain_hi": kl["hi"],
                         "agree_gain": agree["mean"], "agree_gain_lo": agree["lo"], "agree_gain_hi": agree["hi"]})
    lines = ["| set | factor | level | images | KL | agreement % | top-1 % | KL gain vs base [95 % CI] "
             "| agreement gain pp [95 % CI] |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "" if r["level"] == "base" else (f"{r['kl_gain']:+.4f} [{r['kl_gain_lo']:+.4f}, {r['kl_gain_hi']:+.4f}]")
        again = "" if r["level"] == "base" else (f"{r['agree_gain']:+.1f} [{r['agree_gain_lo']:+.1f}, "
                                                 f"{r['agree_gain_hi']:+.1f}]")
        lines.append(f"| {r['set']} | {r['factor']} | {r['change']} | {r['images']} | {r['kl']:.4f} "
                     f"| {r['agreement']:.1f} | {r['top1']:.2f} | {gain} | {again} |")
    return rows, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "dinov2-s14-fmnist-probe"))
    ap.add_argument("--data", default=str(SHARED / "data" / "fashion-mnist-mini"),
                    help="calibration (train/) and choose (val/) images")
    ap.add_argument("--confirm-data", default=str(SHARED / "data" / "fashion-mnist-large"),
                    help="its val/ gives the confirm images")
    ap.add_argument("--set", choices=("choose", "confirm"), default="choose")
    ap.add_argument("--limit", type=int, default=1000, help="choose images (the first N of a seeded sample)")
    ap.add_argument("--confirm-images", type=int, default=1000)
    ap.add_argument("--levels", help="comma-separated level names (default: all); `--levels list` lists them")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "factors" / "fmnist")
    args = ap.parse_args(argv)

    import torch

    from quant.presets import preset
    from quant.store import atomic_write_text
    from vitq.backends import OnnxRuntimeInt8, example_pixels
    from vitq.data import ImageSet
    from vitq.session import Options, Session

    torch.set_num_threads(args.threads)
    session = Session(Options(model=args.model, data=args.data, out=str(args.out), calib=args.calib,
                              seed=args.seed, batch_size=8))
    info = levels(preset("nncf", session.sites))
    if args.levels == "list":
        print("\n".join(f"{k}: {v[1]}" for k, v in info.items()))
        return 0
    wanted = [x.strip() for x in args.levels.split(",")] if args.levels else list(info)
    unknown = [x for x in wanted if x not in info]
    if unknown:
        ap.error(f"unknown level(s) {unknown}; `--levels list` lists them")
    session.calibrate()
    if args.set == "choose":
        images = session.images("val", args.limit)
    else:
        images = ImageSet.from_folder(args.confirm_data, "val", session.loaded.model.config).sample(
            args.confirm_images, args.seed)
    set_dir = args.out / args.set
    set_dir.mkdir(parents=True, exist_ok=True)
    ref = reference_logits(session, images, set_dir / "fp32_reference.pt")
    backend = OnnxRuntimeInt8(session.qmodel, args.out / "onnx", example_pixels(session), threads=args.threads)
    first = next(iter(session.batches(images)))[0]
    for name in wanted:
        path = set_dir / f"{name}.json"
        if path.is_file():
            continue
        config = replace(info[name][2], name=name)
        t0 = time.perf_counter()
        runner = backend.build(name, config)
        export_s = time.perf_counter() - t0
        if name == "base":  # which is faster per image: ORT int8 or the fake-quant simulation
            state = session.qmodel.prepare(config)
            with torch.inference_mode():
                runner(first)
                t0 = time.perf_counter()
                runner(first)
                ort_s = time.perf_counter() - t0
                session.qmodel.restore(state)
                t0 = time.perf_counter()
                session.qmodel(first)
                fq_s = time.perf_counter() - t0
            session.qmodel.apply(None)
            print(f"one batch of {len(first)}: ONNX Runtime int8 {1000 * ort_s:.0f} ms, fake-quant "
                  f"{1000 * fq_s:.0f} ms", flush=True)
        t0 = time.perf_counter()
        stats = run_level(session, runner, images, ref)
        atomic_write_text(path, json.dumps(stats) + "\n")
        print(f"{args.set} {name}: export {export_s:.0f} s, {len(images)} images {time.perf_counter() - t0:.0f} s",
              flush=True)
    rows, md = table(args.out, info)
    import pandas as pd
    pd.DataFrame(rows).to_csv(args.out / "factors.csv", index=False)
    atomic_write_text(args.out / "factors.json", json.dumps({"meta": {**session.describe(), "threads": args.threads,
                                                                      "backend": "onnxruntime"},
                                                             "rows": rows}, indent=2) + "\n")
    atomic_write_text(args.out / "factors.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
