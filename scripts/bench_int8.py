"""CPU benchmark: FP32 torch eager vs FP32 ONNX Runtime vs INT8 ONNX Runtime (Q/DQ).

Models: ViT-B/16 at 224 built from a ViTConfig with random weights (offline), and
the shared DINOv2 probe (../shared/models/dinov2-s14-in1k-probe) when present.
INT8 variants: ONNX Runtime runs of the presets ``all``, ``mixed_1``, ``mixed_2`` and of any
``--plan MODEL=plan.yaml`` config, and torch-int8 (torch.export + torchao PT2E +
torch.compile, conv/linear sites int8: the ``all`` preset with matmuls and residual adds
float), calibrated on a few images (random images through the model's processor, or real
ones with --data). ``--rounds R`` runs every variant R times, each time in a fresh process,
variants interleaved (round-robin), and reports medians over rounds with their spread.

For each variant: latency at batch 1 (ms) and throughput at batch 8 (images/s),
medians of --runs timed runs after --warmup runs, with --threads intra-op threads
(torch.set_num_threads / ORT intra_op_num_threads); the peak RSS of a fresh child
process that loads and runs only that variant (VmHWM, else resource.getrusage); the model
file size; top-1 agreement with FP32 torch on the evaluation images. Prints a
markdown table and writes bench.json in --out.

    python scripts/bench_int8.py                 # ViT-B/16 + DINOv2 probe (minutes, GBs of RAM)
    python scripts/bench_int8.py --quick         # tiny ViT + tiny DINOv2: proves the pipeline
    python scripts/bench_int8.py --data ../shared/data/imagenet-mini --models dinov2-probe
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_PROBE = ROOT.parent / "shared" / "models" / "dinov2-s14-in1k-probe"
PRESETS = ("all", "mixed_1", "mixed_2")
VIT_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               image_size=224, patch_size=16, num_labels=1000)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=10)


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MB.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is kept across fork+exec on Linux, so a child
    started by this (large) parent would report the parent's peak; the address
    space's own high-water mark (VmHWM, reset by exec) is used where available.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; macOS: bytes


# -- building the models (parent) -----------------------------------------------------
def build_random(kind: str, cfg: dict, folder: Path) -> Path:
    """A randomly initialised classifier saved as an HF folder (so children load it)."""
    import torch
    from transformers import (BitImageProcessor, Dinov2Config, Dinov2ForImageClassification, ViTConfig,
                              ViTForImageClassification, ViTImageProcessor)

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    size = cfg["image_size"]
    if kind == "vit":
        model = ViTForImageClassification(ViTConfig(**cfg))
        processor = ViTImageProcessor(size={"height": size, "width": size})
        model.config.architectures = ["ViTForImageClassification"]
    else:
        model = Dinov2ForImageClassification(Dinov2Config(**cfg))
        processor = BitImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        model.config.architectures = ["Dinov2ForImageClassification"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def images(loaded, n: int, seed: int, data: str | None, split: str):
    """``n`` preprocessed images: real ones from ``data/<split>`` or random RGB images."""
    import numpy as np
    import torch
    from PIL import Image

    if data:
        from vitq.data import ImageSet, batches
        imgs = ImageSet.from_folder(data, split, loaded.model.config).sample(n, seed)
        return torch.cat([p for p, _, _ in batches(imgs, loaded.processor, 16)])
    rng = np.random.default_rng(seed)
    pil = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]
    return loaded.processor(images=pil, return_tensors="pt")["pixel_values"]


def prepare_model(name: str, source: Path, out: Path, args) -> list[dict]:
    """Calibrate, export FP32 + INT8 ONNX models; returns the variants to time."""
    import numpy as np
    import torch

    from quant.calibrate import calibrate
    from quant.export_onnx import export_onnx, float_state
    from quant.model import QuantModel
    from quant.presets import preset
    from vitq.models import load_model

    torch.set_num_threads(args.threads)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    loaded = load_model(str(source))
    qm = QuantModel(loaded.model)
    calib = images(loaded, args.calib, 0, args.data, "train")
    evals = images(loaded, args.eval_images, 1, args.data, "val")
    np.save(folder / "eval_pixels.npy", evals.numpy())
    t = time.time()
    calibrate(qm, calib.split(8), progress=False)
    print(f"[{name}] calibrated on {len(calib)} images in {time.time() - t:.1f} s", flush=True)
    example = evals[:1]
    variants = [dict(model=name, variant="fp32 torch eager", kind="torch", path=str(source),
                     file_mb=_folder_weights_mb(source))]
    t = time.time()
    with float_state(qm):
        r = export_onnx(qm, folder / "model_fp32.onnx", example)
    variants.append(dict(model=name, variant="fp32 ort", kind="ort", path=str(r.path), file_mb=r.file_bytes / 2**20))
    sim = {}
    for p in PRESETS:
        qm.apply(preset(p, qm.sites))
        r = export_onnx(qm, folder / f"model_int8_{p}.onnx", example)
        sim[p] = qm(evals).argmax(-1)
        variants.append(dict(model=name, variant=f"int8 ort {p}", kind="ort", path=str(r.path),
                             file_mb=r.file_bytes / 2**20, qdq=f"{r.quantize_nodes}Q/{r.dequantize_nodes}DQ",
                             preset=p))
    for plan_path in args.plan_for.get(name, []):
        from quant.config import QuantConfig
        cfg = QuantConfig.load(plan_path)
        p = Path(plan_path).stem
        qm.apply(cfg)
        r = export_onnx(qm, folder / f"model_int8_{p}.onnx", example)
        sim[p] = qm(evals).argmax(-1)
        variants.append(dict(model=name, variant=f"int8 ort {p}", kind="ort", path=str(r.path),
                             file_mb=r.file_bytes / 2**20, qdq=f"{r.quantize_nodes}Q/{r.dequantize_nodes}DQ",
                             preset=p))
    if args.torch_int8:
        from vitq.torch_int8 import quantize_pt2e, save_pt2e, torch_int8_config
        cfg = torch_int8_config(preset("all", qm.sites))
        qm.apply(cfg)
        sim["torch_int8"] = qm(evals).argmax(-1)
        module = quantize_pt2e(qm, cfg, list(calib.split(8)), example)
        path = save_pt2e(module, example, folder / "model_int8_torch.pt2")
        variants.append(dict(model=name, variant="int8 torch pt2e+inductor", kind="torch-int8", path=str(path),
                             file_mb=path.stat().st_size / 2**20, qdq="conv/linear", preset="torch_int8"))
    qm.apply(None)
    print(f"[{name}] exported {len(variants) - 1} models in {time.time() - t:.1f} s", flush=True)
    for v in variants:
        v["eval_pixels"] = str(folder / "eval_pixels.npy")
        v["logits"] = str(folder / f"logits_{v['variant'].replace(' ', '_')}.npy")
        if "preset" in v:
            np.save(folder / f"sim_{v['preset']}.npy", sim[v["preset"]].numpy())
            v["sim_top1"] = str(folder / f"sim_{v['preset']}.npy")
    del qm, loaded
    return variants


def _folder_weights_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20


# -- timing one variant (child process) -------------------------------------------------
def time_variant(spec: dict, threads: int, warmup: int, runs: int) -> dict:
    """Load one variant in this (fresh) process and time it. ORT variants do not
    import torch, so their peak RSS is ONNX Runtime's plus the model's."""
    import numpy as np

    from vitq.timing import run_times

    evals = np.load(spec["eval_pixels"])
    rss_before = peak_rss_mb()
    if spec["kind"] == "torch":
        import torch

        from vitq.models import load_model
        torch.set_num_threads(threads)
        model = load_model(spec["path"]).model.eval()

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).logits.float().numpy()
    elif spec["kind"] == "torch-int8":
        import torch
        torch.set_num_threads(threads)
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True
        import torchao.quantization.pt2e  # noqa: F401  (registers the ops the program uses)
        # registers inductor's int8 fusions (dequant -> linear -> quant into oneDNN qlinear);
        # without it inductor compiles the Q/DQ graph in float: no faster than FP32
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
        compiled = torch.compile(torch.export.load(spec["path"]).module())

        def run(x):
            with torch.no_grad():
                return compiled(torch.from_numpy(x)).float().numpy()
    else:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(spec["path"], opts, providers=["CPUExecutionProvider"])

        def run(x):
            return sess.run(None, {"pixel_values": x})[0]
    result = {"rss_after_load_mb": peak_rss_mb(), "rss_at_start_mb": rss_before}
    for batch, key in ((1, "latency_b1_ms"), (8, "throughput_b8")):
        x = np.ascontiguousarray(evals[:batch] if len(evals) >= batch else np.repeat(evals[:1], batch, axis=0))
        times = run_times(run, x, warmup, runs)
        med = statistics.median(times)
        result[key] = 1000 * med if batch == 1 else batch / med
        result[key + "_spread"] = (max(times) - min(times)) / med  # (max - min) / median
    logits = np.concatenate([run(np.ascontiguousarray(evals[i:i + 8])) for i in range(0, len(evals), 8)])
    np.save(spec["logits"], logits.astype(np.float32))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# -- main -------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny ViT and DINOv2 configs: checks the script, not speed")
    ap.add_argument("--models", default="vit-b16,dinov2-probe",
                    help="comma-separated among vit-b16, dinov2-probe (ignored with --quick)")
    ap.add_argument("--probe", default=str(SHARED_PROBE), help="DINOv2 probe folder")
    ap.add_argument("--data", help="image folder (train/ val/) for real calibration/eval images")
    ap.add_argument("--calib", type=int, default=32, help="calibration images")
    ap.add_argument("--eval-images", type=int, default=16, help="images used for agreement with FP32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median; >= 5)")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_int8"))
    ap.add_argument("--plan", action="append", default=[],
                    help="MODEL=plan.yaml: an extra ORT int8 variant of that model (repeatable)")
    ap.add_argument("--torch-int8", action="store_true", help="add the torch-int8 (PT2E + inductor) variant")
    ap.add_argument("--rounds", type=int, default=1, help="fresh-process runs per variant, interleaved")
    ap.add_argument("--variants", help="time only the variants whose name contains one of these comma-separated "
                                       "strings (e.g. 'fp32 torch eager,int8 torch'); default: all")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # child: time one variant, print JSON
        spec = json.loads(args.worker)
        print(json.dumps(time_variant(spec, args.threads, args.warmup, args.runs)))
        return 0
    if args.runs < 5:
        ap.error("--runs must be >= 5")
    args.plan_for = {}
    for item in args.plan:
        model, _, path = item.partition("=")
        args.plan_for.setdefault(model, []).append(path)

    import numpy as np
    import onnxruntime
    import torch

    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        models = [("tiny-vit", build_random("vit", TINY, out / "tiny-vit-random")),
                  ("tiny-dinov2", build_random("dinov2", TINY, out / "tiny-dinov2-random"))]
    else:
        models = []
        for m in [m.strip() for m in args.models.split(",") if m.strip()]:
            if m == "vit-b16":
                models.append(("vit-b16-224-random", build_random("vit", VIT_B16, out / "vit-b16-224-random")))
            elif m == "dinov2-probe":
                if Path(args.probe).is_dir():
                    models.append(("dinov2-s14-probe", Path(args.probe)))
                else:
                    print(f"skipping dinov2-probe: {args.probe} not found", file=sys.stderr)
            else:
                ap.error(f"unknown model {m!r}")

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} before starting; timings need an otherwise idle machine",
              file=sys.stderr)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for name, source in models:
        variants = prepare_model(name, source, out, args)
        if args.variants:
            wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
            variants = [v for v in variants if any(w in v["variant"] for w in wanted)]
        results: dict[int, list[dict]] = {i: [] for i in range(len(variants))}
        for rnd in range(args.rounds):  # round-robin: every variant once per round, fresh process each
            for i, spec in enumerate(variants):
                cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--threads", str(args.threads),
                       "--warmup", str(args.warmup), "--runs", str(args.runs)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"[{name}] {spec['variant']} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results[i].append(res)
                print(f"[{name}] round {rnd + 1} {spec['variant']}: {res['latency_b1_ms']:.2f} ms b1, "
                      f"{res['throughput_b8']:.1f} img/s b8, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
        reference = None
        for i, spec in enumerate(variants):
            if not results[i]:
                continue
            res = _over_rounds(results[i])
            top1 = np.load(spec["logits"]).argmax(-1)
            reference = top1 if reference is None else reference  # fp32 torch eager comes first
            row = {**{k: spec.get(k) for k in ("model", "variant", "file_mb", "qdq")}, **res,
                   "agree_fp32": 100.0 * float((top1 == reference).mean())}
            if "sim_top1" in spec:
                row["agree_sim"] = 100.0 * float((top1 == np.load(spec["sim_top1"])).mean())
            rows.append(row)

    meta = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
            "warmup": args.warmup, "runs": args.runs, "calib_images": args.calib, "data": args.data or "random",
            "eval_images": args.eval_images, "cpu": _cpu_name(), "cpus": os.cpu_count(),
            "load_avg_at_start": round(load, 2), "load_avg_at_end": round(os.getloadavg()[0], 2),
            "rounds": args.rounds, "quick": args.quick}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print()
    print(markdown(rows, meta))
    print(f"\nwrote {out / 'bench.json'}")
    return 0


def _over_rounds(runs: list[dict]) -> dict:
    """Medians over rounds; ``*_spread``: (max - min) / median over the rounds' medians
    (one round: the spread within its timed runs)."""
    if len(runs) == 1:
        return runs[0]
    out = {}
    for key in runs[0]:
        if key.endswith("_spread"):
            continue
        values = [r[key] for r in runs]
        out[key] = statistics.median(values)
        if key in ("latency_b1_ms", "throughput_b8"):
            out[key + "_spread"] = (max(values) - min(values)) / out[key]
    out["rounds"] = len(runs)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| model | variant | file MB | Q/DQ | latency b1 (ms) [spread] | throughput b8 (img/s) [spread] "
            "| speed-up b8 vs FP32 eager | peak RSS (MB) | top-1 agree FP32 (%) | agree fake-quant (%) |")
    lines = [f"{meta['threads']} threads, median of {meta['runs']} runs after {meta['warmup']} warm-up "
             f"({meta.get('rounds', 1)} interleaved fresh-process round(s)), load average {meta['load_avg_at_start']} "
             f"at start, "
             f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, {meta['cpu']}, "
             f"{meta['eval_images']} {meta['data']} eval images", "", head, "|" + "---|" * 10]
    base = {}
    for r in rows:
        base.setdefault(r["model"], r["throughput_b8"])
        sim = f"{r['agree_sim']:.1f}" if "agree_sim" in r else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['file_mb']:.2f} | {r.get('qdq') or '-'} "
                     f"| {r['latency_b1_ms']:.2f} [{100 * r.get('latency_b1_ms_spread', 0):.0f} %] "
                     f"| {r['throughput_b8']:.1f} [{100 * r.get('throughput_b8_spread', 0):.0f} %] "
                     f"| {r['throughput_b8'] / base[r['model']]:.2f}x | {r['peak_rss_mb']:.0f} "
                     f"| {r['agree_fp32']:.1f} | {sim} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
