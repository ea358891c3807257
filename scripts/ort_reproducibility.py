"""How reproducible is a quantized model's top-1 under float rounding-order changes?

ONNX Runtime's int8 run and the fake-quant simulation compute the same Q/DQ graph
with different float kernels, so they round a few tensor elements to the other
side of a quantization step. Whether that matters depends on the model: each such
one-step flip perturbs every later quantizer, and a model whose logits are nearly
tied turns these flips into different top-1 classes. This script measures, on the
same images, top-1 agreement between:

- the simulation and itself with the input scaled by (1 + 1e-6 * noise): the
  simulation's own sensitivity to float rounding (FP32 is checked the same way);
- ONNX Runtime with and without its graph optimizations (fused int8 kernels vs the
  Q/DQ graph run as written): two correct runs of one ONNX file;
- each ONNX Runtime run and the simulation.

If ORT-vs-simulation agreement is as high as these self-agreements, the two
backends differ no more than either differs from itself.

    python scripts/ort_reproducibility.py --model ../shared/models/dinov2-s14-in1k-probe \\
        --data ../shared/data/imagenet-mini --images 128
    python scripts/ort_reproducibility.py --images 256      # the embedded default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.metrics import top1_agreement
from quant.presets import preset
from vitq.backends import OnnxRuntimeInt8, OrtRunner
from quant.store import atomic_write_text
from vitq.session import Options, Session

PERTURBATION = 1e-6


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(100.0 * top1_agreement(a, b).double().mean().item(), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out", help="default: out/<model-name>")
    ap.add_argument("--images", type=int, default=128, help="val images")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--presets", default="all,mixed_1")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    session = Session(Options(model=args.model, data=args.data, out=args.out, calib=args.calib, progress=False))
    session.calibrate()
    pixels = [p for p, _, _ in session.batches(session.images("val", args.images))]
    qmodel = session.qmodel

    def simulate(config, eps: float = 0.0) -> torch.Tensor:
        qmodel.apply(config)
        g = torch.Generator().manual_seed(session.opts.seed)
        with torch.no_grad():
            return torch.cat([qmodel(p * (1 + eps * torch.randn(p.shape, generator=g))).float() for p in pixels])

    fp32 = simulate(None)
    result = {"model": str(session.opts.model), "images": len(fp32), "perturbation": PERTURBATION,
              "fp32_vs_fp32_perturbed": agreement(fp32, simulate(None, PERTURBATION)), "configs": {}}
    exporter = OnnxRuntimeInt8(qmodel, session.out / "onnx", pixels[0][:1], threads=args.threads)
    for name in args.presets.split(","):
        config = preset(name, session.sites)
        sim = simulate(config)
        export = exporter.export(name, config)
        fused, unfused = (OrtRunner(export.path, args.threads, export, optimize=o) for o in (True, False))
        ort_fused = torch.cat([fused(p) for p in pixels])
        ort_unfused = torch.cat([unfused(p) for p in pixels])
        row = {"sim_vs_fp32": agreement(sim, fp32),
               "sim_vs_sim_perturbed": agreement(sim, simulate(config, PERTURBATION)),
               "ort_fused_vs_ort_unfused": agreement(ort_fused, ort_unfused),
               "ort_fused_vs_sim": agreement(ort_fused, sim),
               "ort_unfused_vs_sim": agreement(ort_unfused, sim)}
        result["configs"][name] = row
        print(name, row, flush=True)
    path = session.out / "ort_reproducibility.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
