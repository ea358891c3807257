"""Cost of the fake-quant simulation (issue 11): forward time of preset `all` and
`mixed_1` against the FP32 forward of the same model, same inputs, same process.

    .venv/bin/python scripts/bench_fakequant.py [--batch 8] [--reps 5] [--device auto]

Model: the shared DINOv2-S/14 probe when present, else a random-weight ViT-S/16 at 224
(the figure is about compute, not accuracy). Calibrated on 2 random batches. Prints the
median forward times and ratios, writes out/bench_fakequant.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import quant.model as model_mod  # noqa: E402
import quant.quantizer as quantizer  # noqa: E402
from quant.calibrate import calibrate  # noqa: E402
from quant.model import QuantModel  # noqa: E402
from quant.presets import preset  # noqa: E402
from vitq.session import resolve_device  # noqa: E402

PROBE = ROOT.parent / "shared" / "models" / "dinov2-s14-fmnist-probe"


def build(name: str | None):
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    if name or PROBE.is_dir():
        return AutoModelForImageClassification.from_pretrained(name or str(PROBE)).eval(), name or PROBE.name
    cfg = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    image_size=224, patch_size=16, num_labels=1000, attn_implementation="eager")
    return ViTForImageClassification(cfg).eval(), "random ViT-S/16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF folder (default: the shared fmnist probe, else a random ViT-S/16)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    model, name = build(args.model)
    qmodel = QuantModel(model.to(device))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    calibrate(qmodel, [torch.randn(args.batch, 3, 224, 224, generator=g) for _ in range(2)], progress=False)
    states = {"fp32": qmodel.prepare(None), "all": qmodel.prepare(preset("all", qmodel.sites)),
              "mixed_1": qmodel.prepare(preset("mixed_1", qmodel.sites))}
    states["all_before"] = states["all"]  # torch's fake-quant kernel on every slot (before issue 11)
    times: dict[str, list[float]] = {k: [] for k in states}
    cpu: dict[str, list[float]] = {k: [] for k in states}  # process CPU time: less hurt by a shared machine
    for _ in range(args.reps + 1):  # the first round warms up
        for k, state in states.items():
            quantizer.FAST_PER_TENSOR = model_mod.REUSE_SHARED_INPUTS = k != "all_before"
            qmodel.restore(state)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            qmodel(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    quantizer.FAST_PER_TENSOR = model_mod.REUSE_SHARED_INPUTS = True
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    med_cpu = {k: statistics.median(v[1:]) for k, v in cpu.items()}
    result = {"model": name, "device": str(device), "batch": args.batch, "threads": torch.get_num_threads(),
              **{f"{k}_s": round(v, 4) for k, v in med.items()},
              "all_over_fp32": round(med["all"] / med["fp32"], 3), "mixed_1_over_fp32": round(med["mixed_1"] / med["fp32"], 3),
              "all_before_over_fp32": round(med["all_before"] / med["fp32"], 3),
              **{f"{k}_cpu_s": round(v, 4) for k, v in med_cpu.items()},
              **{f"{k}_over_fp32_cpu": round(med_cpu[k] / med_cpu["fp32"], 3) for k in med_cpu if k != "fp32"}}
    (ROOT / "out").mkdir(exist_ok=True)
    (ROOT / "out" / "bench_fakequant.json").write_text(json.dumps(result, indent=2))
    print("| what | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
