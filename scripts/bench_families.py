"""CPU benchmark of the newer families with random weights (offline): torchvision's ViT-B/16
(``--model torchvision:vit_b_16 --weights FILE``) and HF Swin-T (``SwinForImageClassification``
with swin-tiny's config: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, 224 px).

For each model:
1. fake-quant evaluation throughput (images/s, torch eager, --threads threads, batch
   --batch-size) of FP32 and of the presets ``all`` and ``mixed_1`` after calibrating on
   --calib random images, median of --runs timed passes over --images images;
2. the command line end to end, with wall times: ``vitq eval`` (presets), ``vitq sensitivity
   --group block`` and ``vitq plan`` (--plan-images, --max-steps 2, no confirm images) on a
   generated image folder (class folders named by ImageNet synsets, random-colour images).

Random weights measure speed and prove the pipeline, not accuracy (the accuracy columns of a
random 1000-class model are noise). Writes bench_families.json in --out and prints a table.

    python scripts/bench_families.py                      # both models, ~10-20 min on 2 CPU cores
    python scripts/bench_families.py --models swin_t --skip-cli
    python scripts/bench_families.py --quick              # tiny configs: proves the script
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

SWIN_T = dict(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
              window_size=7, num_labels=1000)
TINY_SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2,
                 num_labels=1000)
TINY_TV = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=1000)


def build(name: str, folder: Path, quick: bool) -> list[str]:
    """Save a random-weight model; return the --model/--weights arguments that load it."""
    import torch

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "vit_b_16":
        from torchvision.models import vit_b_16
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**TINY_TV) if quick else vit_b_16(weights=None)
        with torch.no_grad():  # torchvision zero-initialises the head: all logits would be equal
            model.heads.head.weight.normal_(0, 0.02)
        path = folder / "vit_b_16-random.pth"
        if quick:
            torch.save({"config": TINY_TV, "state_dict": model.state_dict()}, path)
        else:
            torch.save(model.state_dict(), path)  # a plain state dict, as torchvision downloads one
        return ["--model", "torchvision:vit_b_16", "--weights", str(path)]
    if name == "swin_t":
        from transformers import SwinConfig, SwinForImageClassification, ViTImageProcessor

        cfg = TINY_SWIN if quick else SWIN_T
        model = SwinForImageClassification(SwinConfig(**cfg))
        model.config.architectures = ["SwinForImageClassification"]
        model.save_pretrained(folder)
        size = cfg["image_size"]
        ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.485, 0.456, 0.406],
                          image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
        return ["--model", str(folder)]
    raise ValueError(name)


def make_data(root: Path, classes: int, per_class: int) -> Path:
    from PIL import Image

    from vitq.data import SYNSETS

    for split in ("train", "val"):
        for c, synset in enumerate(SYNSETS[:classes]):
            d = root / split / synset
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (256, 256), color=((37 * c + 11 * i) % 256, (91 * c) % 256, (13 * i) % 256)
                          ).save(d / f"{i}.png")
    return root


def throughput(args_model: list[str], args) -> dict:
    """FP32 and fake-quant presets, images/s over --images random images."""
    import torch

    from quant.calibrate import calibrate
    from quant.model import QuantModel
    from quant.presets import preset
    from vitq.models import load_model

    torch.set_num_threads(args.threads)
    weights = args_model[args_model.index("--weights") + 1] if "--weights" in args_model else None
    loaded = load_model(args_model[1], weights)
    qm = QuantModel(loaded.model)
    size = loaded.processor(images=__import__("PIL.Image").Image.new("RGB", (256, 256)),
                            return_tensors="pt")["pixel_values"].shape[-1]
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(args.batch_size, 3, size, size, generator=g) for _ in range(max(1, args.calib // args.batch_size))]
    images = [torch.randn(args.batch_size, 3, size, size, generator=g) for _ in range(max(1, args.images // args.batch_size))]
    t0 = time.perf_counter()
    calibrate(qm, calib, progress=False)
    out = {"family": qm.family.name, "sites": len(qm.sites), "blocks": qm.num_blocks,
           "params_m": round(sum(p.numel() for p in loaded.model.parameters()) / 1e6, 1),
           "calibration_s": round(time.perf_counter() - t0, 1), "images": sum(len(b) for b in images)}
    for name in ("fp32", "all", "mixed_1"):
        qm.apply(preset(name, qm.sites))
        qm(images[0][:1])  # warm-up
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            for batch in images:
                qm(batch)
            times.append(time.perf_counter() - t0)
        out[f"{name}_img_s"] = round(out["images"] / statistics.median(times), 2)
    return out


def cli(args_model: list[str], data: Path, out: Path, args) -> dict:
    """The command line end to end; wall seconds of each command."""
    from vitq.cli import main

    common = [*args_model, "--data", str(data), "--calib", str(args.calib), "--out", str(out), "--no-progress",
              "--batch-size", str(args.batch_size)]
    walls = {}
    commands = [("eval", ["--limit", str(args.images)]),
                ("sensitivity", ["--group", "block", "--eval-images", str(args.plan_images)]),
                ("plan", ["--eval-images", str(args.plan_images), "--confirm-images", "0", "--max-steps", "2",
                          "--max-drop", "100"])]
    for cmd, extra in commands[:2] if args.skip_plan else commands:
        t0 = time.perf_counter()
        rc = main([cmd, *common, *extra])
        walls[f"{cmd}_s"] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            raise SystemExit(f"vitq {cmd} failed ({rc})")
    return walls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_b_16,swin_t")
    p.add_argument("--out", default=str(ROOT / "out" / "bench-families"))
    p.add_argument("--images", type=int, default=32, help="images timed per pass (and vitq eval --limit)")
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--plan-images", type=int, default=16, help="--eval-images of vitq sensitivity and plan")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-cli", action="store_true", help="throughput only")
    p.add_argument("--skip-plan", action="store_true",
                   help="no vitq plan (its per-site sensitivity pass is the longest step on ViT-B/16)")
    p.add_argument("--quick", action="store_true", help="tiny configs of the same families")
    args = p.parse_args()
    out = Path(args.out)
    rows = {}
    data = make_data(out / "data", classes=4, per_class=max(args.calib, args.images) // 4 + 1)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model_args = build(name, out / "models" / name, args.quick)
        row = throughput(model_args, args)
        print(name, json.dumps(row), flush=True)
        if not args.skip_cli:
            row.update(cli(model_args, data, out / name, args))
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    import torch
    meta = {"torch": torch.__version__, "threads": args.threads, "batch_size": args.batch_size, "quick": args.quick,
            "argv": sys.argv[1:]}
    (out / "bench_families.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = ["family", "params_m", "sites", "blocks", "fp32_img_s", "all_img_s", "mixed_1_img_s", "calibration_s",
            "eval_s", "sensitivity_s", "plan_s"]
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    print(f"wrote {out / 'bench_families.json'}")


if __name__ == "__main__":
    main()
