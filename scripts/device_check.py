"""GPU check (issue 11): ViT-B/16 at 224, random weights, fake-quant on CUDA against CPU.

Measures eval throughput (images/s) of FP32, `all` and `mixed_1` at batch 64 on CUDA and
on CPU, and on 64 random images the CUDA-vs-CPU top-1 agreement and max |logit| difference
of each (TF32 off: FP32 is FP32 on both). One calibration (on CPU, 2 x 16 random images)
serves both devices, so the two differ only by where they run. Writes JSON to argv[1].

``device_check.py --compare CUDA_OUT CPU_OUT JSON``: two `vitq analyze` folders compared
(scripts/device_check.sh runs both).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

from quant.calibrate import calibrate  # noqa: E402
from quant.model import QuantModel  # noqa: E402
from quant.presets import preset  # noqa: E402
from vitq.session import resolve_device  # noqa: E402

BATCH = 64


def throughput(qmodel: QuantModel, state, x: torch.Tensor, reps: int) -> float:
    qmodel.restore(state)
    qmodel(x[:8])  # warm-up
    sync = torch.cuda.synchronize if qmodel.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        qmodel(x)
    sync()
    return reps * len(x) / (time.perf_counter() - t0)


def compare(cuda_dir: Path, cpu_dir: Path, out: Path) -> None:
    """Two `vitq analyze` output folders of the same model and images, run on CUDA and on
    CPU: whether they chose the same float sites, each config's accuracy-table row on
    both (top-1, agreement, KL), and their wall times and stage times."""
    import pandas as pd
    import yaml

    result: dict = {}
    plans = {k: yaml.safe_load((d / "plan_skiplist.yaml").read_text()) for k, d in (("cuda", cuda_dir), ("cpu", cpu_dir))}
    result["same_skiplist"] = plans["cuda"] == plans["cpu"]
    result["skiplists"] = plans
    acc = {k: pd.read_csv(d / "accuracy.csv").set_index("config") for k, d in (("cuda", cuda_dir), ("cpu", cpu_dir))}
    result["accuracy"] = {c: {f"{k}_{dev}": float(acc[dev].loc[c, k]) for k in ("top1", "agreement", "kl") for dev in acc}
                          for c in acc["cpu"].index}
    result["wall_s"] = {dev: float((d / "wall_s").read_text()) for dev, d in (("cuda", cuda_dir), ("cpu", cpu_dir))}
    result["stage_s"] = {dev: {p.name.split(".")[0]: json.loads(p.read_text()).get("wall_s") for p in sorted(d.glob("*.run.json"))}
                         for dev, d in (("cuda", cuda_dir), ("cpu", cpu_dir))}
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--compare":
        return compare(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "out" / "device_check.json")
    dry = os.environ.get("VITQ_DEVICE_CHECK_DRY") == "1"  # CPU-only rehearsal of this script: tiny ViT, cpu twice
    cuda = resolve_device("cpu" if dry else "cuda")  # fails with one line where there is no GPU
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if dry else {}
    model = ViTForImageClassification(ViTConfig(attn_implementation="eager", **small)).eval()  # ViT-B/16, 224
    qmodel = QuantModel(model)
    g = torch.Generator().manual_seed(0)
    calibrate(qmodel, [torch.randn(16, 3, 224, 224, generator=g) for _ in range(2)], progress=False)
    x = torch.randn(BATCH, 3, 224, 224, generator=g)
    configs = {"fp32": None, "all": preset("all", qmodel.sites), "mixed_1": preset("mixed_1", qmodel.sites)}
    result = {"torch": torch.__version__, "gpu": "none (dry run)" if dry else torch.cuda.get_device_name(0), "cpu_threads": torch.get_num_threads(),
              "model": "ViT-B/16 224 random weights", "batch": BATCH, "tf32": False}
    logits = {}
    for device, reps in ((torch.device("cpu"), 1), (cuda, 10)):
        qmodel.to(device)
        states = {k: qmodel.prepare(c) for k, c in configs.items()}
        tag = "cuda" if device is cuda else "cpu"
        for k, state in states.items():
            result[f"{tag}_{k}_img_s"] = round(throughput(qmodel, state, x, reps), 1)
            qmodel.restore(state)
            logits[(tag, k)] = qmodel(x).double().cpu()
        print(json.dumps({k: v for k, v in result.items() if k.startswith(tag)}), flush=True)
    for k in configs:
        a, b = logits[("cpu", k)], logits[("cuda", k)]
        result[f"{k}_top1_agreement_pct"] = round(100 * float((a.argmax(-1) == b.argmax(-1)).double().mean()), 2)
        result[f"{k}_max_logit_diff"] = float((a - b).abs().max())
        result[f"{k}_cuda_speedup"] = round(result[f"cuda_{k}_img_s"] / result[f"cpu_{k}_img_s"], 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
