"""How reproducible is a quantized model's top-1 under float rounding-order changes,
and does ONNX Runtime's int8 run depart from the fake-quant simulation by more?

ONNX Runtime's int8 run and the fake-quant simulation compute the same Q/DQ graph
with different float kernels (other summation orders; ORT divides by the scale
where torch multiplies by its inverse), so they round a few elements of every
quantized tensor to the other side of a quantization step. Whether that matters
depends on the model: each one-step flip perturbs every later quantizer, and a model
whose logits are nearly tied turns these flips into different top-1 classes. This
script measures, on the same images, top-1 agreement (%) between:

- the simulation and itself with the input scaled by (1 + 1e-6 * noise);
- the simulation and itself with every quantized activation scaled by
  (1 + 1e-6 * noise) just before it is rounded (``sim_vs_sim_rounding``): the size of
  change a second float implementation makes at every op, not only at the input;
- ONNX Runtime with and without its graph optimizations (fused int8 kernels vs the
  Q/DQ graph run as written): two correct runs of one ONNX file;
- each ONNX Runtime run and the simulation, with the 95 % paired-bootstrap interval of
  (ORT-vs-simulation agreement) - (simulation-vs-rounding-perturbed-simulation
  agreement), per image (``ort_minus_self``): the criterion holds when the interval
  reaches 0 (ORT is no worse than the simulation's own reproducibility beyond noise).

``--per-block`` bisects instead: every block exported alone and fed the simulation's
own input to that block, so errors cannot accumulate; it prints, per block, how far
ORT (fused and unfused) is from the simulation as a fraction of the block's
quantization error (simulation vs FP32 on the same input).

    python scripts/ort_reproducibility.py --model ../shared/models/dinov2-s14-fmnist-probe \\
        --data ../shared/data/fashion-mnist-mini --images 256 --config docs/configs/fmnist_plan.yaml
    python scripts/ort_reproducibility.py --images 1000      # the embedded default
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.metrics import paired_bootstrap, top1_agreement
from quant import export_onnx as qexport
from quant.config import QuantConfig
from quant.model import TensorQuantizer
from quant.modes import QUANT
from quant.presets import preset
from quant.quantizer import fake_quantize
from quant.store import atomic_write_text
from vitq.backends import OnnxRuntimeInt8, OrtRunner
from vitq.session import Options, Session

PERTURBATION = 1e-6


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(100.0 * top1_agreement(a, b).double().mean().item(), 2)


class _NoisyQuantizer(TensorQuantizer):
    """An activation quantizer that rounds x * (1 + eps * noise) instead of x."""

    eps = PERTURBATION
    generator: torch.Generator | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == QUANT and not self.is_weight:
            noise = torch.randn(x.shape, generator=_NoisyQuantizer.generator, dtype=x.dtype)
            return fake_quantize(x * (1 + _NoisyQuantizer.eps * noise), self.qparams)
        return super().__call__(x)


@contextlib.contextmanager
def rounding_noise(qmodel, seed: int):
    classes = [(tq, type(tq)) for tq in qmodel.tensor_quantizers()]
    _NoisyQuantizer.generator = torch.Generator().manual_seed(seed)
    for tq, _ in classes:
        tq.__class__ = _NoisyQuantizer
    try:
        yield
    finally:
        for tq, cls in classes:
            tq.__class__ = cls


def configs(args, sites) -> list[QuantConfig]:
    out = [preset(name, sites) for name in args.presets.split(",") if name]
    for path in args.config or []:
        cfg = QuantConfig.load(path)
        cfg.name = Path(path).stem if cfg.name in ("plan", "") else cfg.name
        out.append(cfg)
    return out


def per_block(session, config: QuantConfig, pixels: torch.Tensor, out_dir: Path, threads: int) -> list[dict]:
    """Every block alone, on the simulation's own input: ORT vs the simulation as a
    fraction of the quantization error (RMS of sim - FP32)."""
    import onnx
    qmodel = session.qmodel

    class Block(torch.nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.model, self.k = qmodel.model, k

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return qmodel.run_blocks(hidden, self.k, self.k + 1)

    qmodel.apply(config)
    with torch.no_grad():
        hidden, inputs = qmodel.embed(pixels), []
        for k in range(qmodel.num_blocks):
            inputs.append(hidden)
            hidden = qmodel.run_blocks(hidden, k, k + 1)
    rows = []
    for k, x in enumerate(inputs):
        with torch.no_grad():
            qmodel.apply(None)
            fp = qmodel.run_blocks(x, k, k + 1)
            qmodel.apply(config)
            sim = qmodel.run_blocks(x, k, k + 1)
        path = out_dir / f"block_{config.name}_{k}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        with qexport.export_mode(qmodel):
            model = qexport.export_graph(Block(k), x[:2], input_name="pixel_values", output_name="hidden")
        onnx.save(model, str(path))
        qerr = (sim - fp).pow(2).mean().sqrt().item()
        row = {"block": k, "quant_error_rms": qerr}
        for opt in (True, False):
            got = OrtRunner(path, threads, optimize=opt)(x)
            row["fused" if opt else "unfused"] = (got - sim).pow(2).mean().sqrt().item() / qerr
        rows.append(row)
        print(f"  block {k}: ORT fused vs sim {row['fused']:.4f}, unfused vs sim {row['unfused']:.4f} "
              f"of the quantization error", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out", help="default: out/<model-name>")
    ap.add_argument("--images", type=int, default=128, help="val images")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--presets", default="all,mixed_1")
    ap.add_argument("--config", action="append", help="a config YAML (e.g. a plan.yaml); repeatable")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-block", action="store_true", help="bisect: each block alone (first 4 images)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    session = Session(Options(model=args.model, data=args.data, out=args.out, calib=args.calib, progress=False))
    session.calibrate()
    pixels = [p for p, _, _ in session.batches(session.images("val", args.images))]
    qmodel = session.qmodel
    seed = session.opts.seed

    if args.per_block:
        result = {"model": str(session.opts.model), "per_block": {}}
        for config in configs(args, session.sites):
            print(config.name, flush=True)
            result["per_block"][config.name] = per_block(session, config, torch.cat(pixels)[:4],
                                                          session.out / "onnx", args.threads)
        path = session.out / "ort_per_block.json"
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
        return

    def simulate(config, eps: float = 0.0, at_quantizers: bool = False) -> torch.Tensor:
        qmodel.apply(config)
        g = torch.Generator().manual_seed(seed)
        ctx = rounding_noise(qmodel, seed + 1) if at_quantizers else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return torch.cat([qmodel(p * (1 + eps * torch.randn(p.shape, generator=g))).float() for p in pixels])

    def per_image(a, b) -> np.ndarray:
        return top1_agreement(a, b).double().numpy()

    fp32 = simulate(None)
    result = {"model": str(session.opts.model), "images": len(fp32), "perturbation": PERTURBATION,
              "fp32_vs_fp32_perturbed": agreement(fp32, simulate(None, PERTURBATION)), "configs": {}}
    exporter = OnnxRuntimeInt8(qmodel, session.out / "onnx", pixels[0][:1], threads=args.threads)
    for config in configs(args, session.sites):
        name = config.name
        sim = simulate(config)
        sim_rounding = simulate(config, at_quantizers=True)
        export = exporter.export(name, config)
        fused, unfused = (OrtRunner(export.path, args.threads, export, optimize=o) for o in (True, False))
        ort_fused = torch.cat([fused(p) for p in pixels])
        ort_unfused = torch.cat([unfused(p) for p in pixels])
        self_agree = per_image(sim_rounding, sim)
        gap = paired_bootstrap(per_image(ort_fused, sim), self_agree)
        row = {"sim_vs_fp32": agreement(sim, fp32),
               "sim_vs_sim_perturbed": agreement(sim, simulate(config, PERTURBATION)),
               "sim_vs_sim_rounding": agreement(sim_rounding, sim),
               "ort_fused_vs_ort_unfused": agreement(ort_fused, ort_unfused),
               "ort_fused_vs_sim": agreement(ort_fused, sim),
               "ort_unfused_vs_sim": agreement(ort_unfused, sim),
               "ort_minus_self": {k: round(100 * v, 2) for k, v in gap.items()},
               "criterion_b": bool(gap["hi"] >= 0),
               "top1_sim": round(100 * float((sim.argmax(1) == fp32.argmax(1)).double().mean()), 2),
               "ort_fused_vs_sim_top1_diff_of_fp32_agreement_pp": round(
                   agreement(ort_fused, fp32) - agreement(sim, fp32), 2)}
        result["configs"][name] = row
        print(name, row, flush=True)
    path = session.out / "ort_reproducibility.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
