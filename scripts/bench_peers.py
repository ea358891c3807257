"""Peer benchmark: NNCF's plain PTQ in OpenVINO against vitq's presets and a plan in ONNX Runtime.

Both tools start from the same FP32 model and the same calibration images, and are measured
on the same val images against the same FP32 reference:

- calibration: vitq's own seeded sample (``--calib 256``, ``--seed 0``) of the probe's
  ``train/`` images, preprocessed by vitq's session (the images ``vitq eval`` calibrates on);
- NNCF: vitq's FP32 ONNX export (``model_fp32.onnx``) converted by ``openvino.convert_model``,
  quantized by ``nncf.quantize(model, nncf.Dataset(calibration images, one per item),
  model_type=nncf.ModelType.TRANSFORMER)`` with every other argument at its default (row
  ``nncf_ptq``); ``--nncf-no-sq`` adds the same call without SmoothQuant
  (``AdvancedSmoothQuantParameters(matmul=-1)``, row ``nncf_ptq_no_sq``); run by OpenVINO's CPU
  plugin with ``INFERENCE_PRECISION_HINT=f32`` (on CPUs with bf16/AMX OpenVINO otherwise runs
  the float parts in bf16; ``--ov-precision`` changes it);
- vitq: the presets ``all``, ``mixed_1``, ``mixed_2``, ``nncf`` and ``--plan`` YAML files
  exported as Q/DQ ONNX and run by ONNX Runtime (the ``vitq eval --backend onnxruntime`` path,
  vitq/backends.py);
- accuracy: FP32 torch logits are the reference; every config's logits go through vitq's one
  metrics accumulator (analysis.metrics.OutputStats): top-1 drop vs FP32 with its paired
  bootstrap SE, top-1 agreement, mean KL(FP32 || config);
- speed: ms per batch at batch 1 and 8 and images/s at batch 8, every variant (FP32 in
  ORT, FP32 in OpenVINO, each int8 model) in this one process, interleaved round-robin
  (``--rounds``), medians; ``--threads`` intra-op threads for torch, ORT and OpenVINO alike;
- wall time of each tool's quantization: vitq's calibration (once, shared by its configs)
  plus the config's ONNX export; NNCF's ``convert_model`` plus ``nncf.quantize``. The
  planner's search that produced a plan YAML is not included (it is `vitq plan`'s run).

Writes ``peers.csv``, ``peers.json`` (rows + run metadata) and ``peers.md`` to
``--out`` (default ``out/peers/<probe>``). Without the ``peers`` extra (nncf, openvino)
it prints one line saying so and exits 0.

    pip install -e '.[peers]'
    OMP_NUM_THREADS=1 python scripts/bench_peers.py --probe fmnist --threads 1
    OMP_NUM_THREADS=1 python scripts/bench_peers.py --probe in1k --threads 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

# probe -> (model folder, data folder, default plan YAML); "tiny": the embedded default (None, None)
PROBES = {
    "fmnist": (SHARED / "models" / "dinov2-s14-fmnist-probe", SHARED / "data" / "fashion-mnist-mini",
               ROOT / "docs" / "configs" / "fmnist_plan.yaml"),
    "in1k": (SHARED / "models" / "dinov2-s14-in1k-probe", SHARED / "data" / "imagenet-mini",
             ROOT / "docs" / "configs" / "in1k_plan.yaml"),
    "tiny": (None, None, None),
}
PRESETS = ("all", "mixed_1", "mixed_2", "nncf")
EXTRA = ("nncf", "openvino")


def missing_extra() -> str | None:
    """The reason the benchmark cannot run here (a package of the ``peers`` extra is
    missing), or None."""
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError as e:
            return f"{name} is not importable ({e}); install the extra: pip install -e '.[peers]'"
    return None


@dataclass
class Variant:
    """One model in one runtime: ``run`` maps a float32 pixel batch (torch) to logits (torch)."""

    name: str
    tool: str  # vitq, nncf, reference
    runtime: str  # torch, onnxruntime, openvino
    run: Callable
    quantize_s: float | None = None  # wall time of the tool's quantization of this variant
    accuracy: bool = True  # measured on the val images (the FP32 runtime rows are timed only)
    detail: dict = field(default_factory=dict)


# -- the variants ----------------------------------------------------------------------
def vitq_variants(session, plans: list[Path], threads: int) -> tuple[list[Variant], Path]:
    """FP32 in ORT and vitq's presets and plans as Q/DQ ONNX in ORT; returns them and the
    FP32 ONNX path (what NNCF starts from)."""
    from quant.config import QuantConfig
    from quant.presets import preset
    from vitq.backends import OnnxRuntimeInt8, OrtRunner, example_pixels

    backend = OnnxRuntimeInt8(session.qmodel, session.out / "onnx", example_pixels(session), threads=threads)
    fp32 = backend.export("fp32", None)
    variants = [Variant("fp32", "reference", "onnxruntime", OrtRunner(fp32.path, threads, fp32), accuracy=False)]
    configs = {name: preset(name, session.sites) for name in PRESETS}
    for path in plans:
        config = QuantConfig.load(path)
        config.validate(session.sites)
        configs[f"plan:{path.stem}"] = config
    calib_s = session.calibration_s or 0.0
    for name, config in configs.items():
        t0 = time.perf_counter()
        result = backend.export(name, config)
        export_s = time.perf_counter() - t0
        n_float = len(session.sites) - len(config.int8_sites(session.sites))
        variants.append(Variant(name, "vitq", "onnxruntime", OrtRunner(result.path, threads, result),
                                quantize_s=calib_s + export_s,
                                detail={"float_sites": n_float, "export_s": round(export_s, 1),
                                        "calibration_s": calib_s}))
    return variants, fp32.path


class OpenVinoRunner:
    """A compiled OpenVINO model on the CPU plugin, pixels (torch) -> logits (torch)."""

    def __init__(self, model, threads: int, precision: str) -> None:
        import openvino as ov
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision,
                  "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.output = self.compiled.output(0)

    def __call__(self, pixels):
        import numpy as np
        import torch
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.array(self.compiled(x)[self.output]))


def fake_quantize_count(model) -> int:
    """FakeQuantize operations in an OpenVINO model: what NNCF inserted."""
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def nncf_variants(fp32_onnx: Path, calib_images: list, threads: int, precision: str, no_sq: bool,
                  out: Path) -> list[Variant]:
    """FP32 in OpenVINO and NNCF's PTQ of the same FP32 ONNX model (and, with ``no_sq``,
    the same call without SmoothQuant)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    t0 = time.perf_counter()
    fp32 = ov.convert_model(str(fp32_onnx))
    convert_s = time.perf_counter() - t0
    variants = [Variant("fp32", "reference", "openvino", OpenVinoRunner(fp32, threads, precision), accuracy=False)]
    dataset = nncf.Dataset([x.numpy() for x in calib_images])
    runs = {"nncf_ptq": {}}
    if no_sq:
        runs["nncf_ptq_no_sq"] = {"advanced_parameters": AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))}
    for name, extra in runs.items():
        t0 = time.perf_counter()
        quantized = nncf.quantize(ov.convert_model(str(fp32_onnx)), dataset,
                                  model_type=nncf.ModelType.TRANSFORMER, **extra)
        quantize_s = time.perf_counter() - t0
        ov.save_model(quantized, str(out / f"{name}.xml"))
        variants.append(Variant(name, "nncf", "openvino", OpenVinoRunner(quantized, threads, precision),
                                quantize_s=convert_s + quantize_s,
                                detail={"fake_quantize_ops": fake_quantize_count(quantized),
                                        "convert_s": round(convert_s, 1), "nncf_quantize_s": round(quantize_s, 1)}))
    return variants


# -- measuring -----------------------------------------------------------------------
def measure_accuracy(session, variants: list[Variant], limit: int | None, progress: bool) -> dict:
    """name -> OutputStats of that variant against FP32 torch on the val images (with labels)."""
    import torch
    from tqdm import tqdm

    from analysis.metrics import OutputStats

    images = session.images("val", limit)
    state = session.qmodel.prepare(None)
    stats = {"fp32": OutputStats(), **{v.name: OutputStats() for v in variants if v.accuracy}}
    with torch.inference_mode():
        for pixels, labels, _ in tqdm(session.batches(images), total=session.num_batches(images), desc="accuracy",
                                      unit="batch", disable=not progress):
            session.qmodel.restore(state)
            reference = session.qmodel(pixels).float()
            stats["fp32"].update(reference, reference, labels)
            for v in variants:
                if v.accuracy:
                    stats[v.name].update(v.run(pixels), reference, labels)
    return stats


def measure_speed(variants: list[Variant], pixels, rounds: int, warmup: int, runs: int) -> dict:
    """name@runtime -> {b1_ms, b8_ms, b8_img_s, spreads}: every variant timed in this
    process, interleaved round-robin, median over rounds of the per-round median."""
    from vitq.timing import run_times

    x1 = pixels[:1].contiguous()
    x8 = (pixels[:8] if len(pixels) >= 8 else pixels[:1].expand(8, *pixels.shape[1:])).contiguous()
    times = {key(v): {"b1": [], "b8": []} for v in variants}
    for _ in range(rounds):
        for v in variants:
            for label, x in (("b1", x1), ("b8", x8)):
                times[key(v)][label].append(statistics.median(run_times(v.run, x, warmup, runs)))
    out = {}
    for k, t in times.items():
        b1, b8 = statistics.median(t["b1"]), statistics.median(t["b8"])
        out[k] = {"b1_ms": 1000 * b1, "b8_ms": 1000 * b8, "b8_img_s": 8 / b8,
                  "b1_spread": (max(t["b1"]) - min(t["b1"])) / b1, "b8_spread": (max(t["b8"]) - min(t["b8"])) / b8}
    return out


def key(v: Variant) -> str:
    return f"{v.name}@{v.runtime}"


def table_rows(variants: list[Variant], stats: dict, speed: dict) -> list[dict]:
    """One row per variant: accuracy against FP32 (paired SE of the top-1 drop from
    analysis.metrics.paired_bootstrap), speed, speed-up over FP32 in the same runtime."""
    from analysis.metrics import paired_bootstrap

    ref = stats["fp32"]
    fp32_speed = {v.runtime: speed[key(v)] for v in variants if v.name == "fp32"}
    rows = [{"config": "fp32", "tool": "reference", "runtime": "torch", **_accuracy(ref, ref, paired_bootstrap)}]
    for v in variants:
        row = {"config": v.name, "tool": v.tool, "runtime": v.runtime}
        if v.accuracy:
            row.update(_accuracy(stats[v.name], ref, paired_bootstrap))
        s = speed[key(v)]
        row.update({"b1_ms": s["b1_ms"], "b8_ms": s["b8_ms"], "b8_img_s": s["b8_img_s"],
                    "b1_spread": s["b1_spread"], "b8_spread": s["b8_spread"],
                    "b8_speedup_vs_fp32_same_runtime": s["b8_img_s"] / fp32_speed[v.runtime]["b8_img_s"],
                    "quantize_s": None if v.quantize_s is None else round(v.quantize_s, 1), **v.detail})
        rows.append(row)
    return rows


def _accuracy(stats, ref, paired_bootstrap) -> dict:
    s = stats.summary()
    drop = paired_bootstrap(100 * ref.array("top1"), 100 * stats.array("top1"))
    return {"images": s["images"], "top1": s["top1"], "top1_drop": drop["mean"], "top1_drop_se": drop["se"],
            "agreement": s["agreement"], "kl": s["kl"]}


def markdown(rows: list[dict], meta: dict) -> str:
    def f(r, k, fmt):
        return fmt.format(r[k]) if r.get(k) is not None else "-"
    lines = [f"{meta['probe']} probe: {meta['val_images']} val images, {meta['calibration_images']} calibration "
             f"images (seed {meta['seed']}), {meta['threads']} thread(s), {meta['rounds']} interleaved rounds; "
             f"nncf {meta['nncf']}, openvino {meta['openvino']} ({meta['ov_precision']}), "
             f"onnxruntime {meta['onnxruntime']}, torch {meta['torch']}; load average {meta['load_avg_start']} "
             f"at start, {meta['load_avg_end']} at end", "",
             "| config | tool (runtime) | top-1 % | drop pp (paired SE) | agreement % | KL | ms b1 | ms b8 | img/s b8 "
             "| x FP32 same runtime (b8) | quantization wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = f"{r['top1_drop']:.2f} ({r['top1_drop_se']:.2f})" if r.get("top1_drop") is not None else "-"
        lines.append(f"| {r['config']} | {r['tool']} ({r['runtime']}) | {f(r, 'top1', '{:.2f}')} | {drop} "
                     f"| {f(r, 'agreement', '{:.1f}')} | {f(r, 'kl', '{:.4f}')} | {f(r, 'b1_ms', '{:.1f}')} "
                     f"| {f(r, 'b8_ms', '{:.1f}')} | {f(r, 'b8_img_s', '{:.1f}')} "
                     f"| {f(r, 'b8_speedup_vs_fp32_same_runtime', '{:.2f}')} | {f(r, 'quantize_s', '{:.1f}')} |")
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------
def run_peers(probe: str, *, out: Path, calib: int = 256, seed: int = 0, limit: int | None = None,
              plans: list[Path] | None = None, threads: int = 1, rounds: int = 5, warmup: int = 2, runs: int = 3,
              ov_precision: str = "f32", no_sq: bool = True, batch_size: int = 8,
              progress: bool = True, model: str | None = None, data: str | None = None) -> tuple[list[dict], dict]:
    """The benchmark on ``probe`` (or ``model``/``data`` folders): rows and metadata; writes
    peers.csv/json/md to ``out``."""
    import nncf
    import onnxruntime
    import openvino
    import pandas as pd
    import torch

    from quant.store import atomic_write_text
    from vitq.backends import calibration_pixels
    from vitq.session import Options, Session

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    t_start = time.time()
    session = Session(Options(model=model, data=data, out=str(out), calib=calib, seed=seed, batch_size=batch_size,
                              progress=progress))
    session.calibrate()  # cached in out/calibration.pt; calibration_s is the time it took when computed
    calib_images = [x[None] for batch in calibration_pixels(session) for x in batch]
    variants, fp32_onnx = vitq_variants(session, plans or [], threads)
    variants += nncf_variants(fp32_onnx, calib_images, threads, ov_precision, no_sq, out)
    stats = measure_accuracy(session, variants, limit, progress)
    speed_pixels = next(iter(session.batches(session.images("val", limit))))[0]
    speed = measure_speed(variants, speed_pixels, rounds, warmup, runs)
    rows = table_rows(variants, stats, speed)
    meta = {"probe": probe, **session.describe(), "val_images": len(stats["fp32"]), "calibration_images":
            len(calib_images), "threads": threads, "rounds": rounds, "warmup": warmup, "runs": runs,
            "ov_precision": ov_precision, "nncf": nncf.__version__, "openvino": openvino.__version__,
            "onnxruntime": onnxruntime.__version__, "plans": [str(p) for p in plans or []],
            "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
            "wall_s": round(time.time() - t_start, 1),
            "method": "accuracy vs FP32 torch through analysis.metrics.OutputStats; speed in one process, "
                      "variants interleaved round-robin, median over rounds of the per-round median of `runs` calls"}
    pd.DataFrame(rows).to_csv(out / "peers.csv", index=False)
    atomic_write_text(out / "peers.json", json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    atomic_write_text(out / "peers.md", markdown(rows, meta) + "\n")
    return rows, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", choices=sorted(PROBES), default="fmnist",
                    help="fmnist, in1k (the shared DINOv2 probes) or tiny (the embedded default)")
    ap.add_argument("--plan", action="append", type=Path,
                    help="plan YAML run as a vitq row (repeatable; default: the probe's docs/configs/*_plan.yaml)")
    ap.add_argument("--calib", type=int, default=256, help="calibration images (vitq's seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=1000, help="val images (at most)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of torch, ONNX Runtime and OpenVINO")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--ov-precision", default="f32", choices=("f32", "bf16"),
                    help="OpenVINO CPU INFERENCE_PRECISION_HINT of the float parts")
    ap.add_argument("--no-nncf-no-sq", dest="no_sq", action="store_false",
                    help="leave out the NNCF row without SmoothQuant")
    ap.add_argument("--out", type=Path, help="default out/peers/<probe>")
    args = ap.parse_args(argv)

    reason = missing_extra()
    if reason:
        print(f"bench_peers: skipped: {reason}")
        return 0
    model, data, default_plan = PROBES[args.probe]
    if model is not None and not (model.is_dir() and data.is_dir()):
        print(f"bench_peers: skipped: {model} or {data} is absent (the shared probes live in ../shared)")
        return 0
    plans = args.plan if args.plan is not None else [default_plan] if default_plan else []
    rows, meta = run_peers(args.probe, out=args.out or ROOT / "out" / "peers" / args.probe, calib=args.calib,
                           seed=args.seed, limit=args.limit, plans=plans, threads=args.threads, rounds=args.rounds,
                           ov_precision=args.ov_precision, no_sq=args.no_sq,
                           model=str(model) if model else None, data=str(data) if data else None)
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
