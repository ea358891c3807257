"""Build vitq's embedded default model and sample data set.

Why this exists: vitq needs a small, redistributable Hugging Face ViT checkpoint
plus a handful of calibration / validation images so that the toolkit (and its
tests) can run end to end offline, with no downloads.  Public ImageNet ViTs are
hundreds of MB and carry unclear data licences, so instead we train a ~0.2 M
parameter ``ViTForImageClassification`` from scratch on Fashion-MNIST (MIT
licence, Zalando Research), which Debian ships as ``dataset-fashion-mnist``.

The script is deterministic (fixed seed, ``torch.use_deterministic_algorithms``,
one CPU thread) and writes:

* ``OUT/model/``      model (safetensors) + ``ViTImageProcessor`` config + README
* ``OUT/data/train/<class>/<idx>.png``  first 100 TRAIN images per class (calibration)
* ``OUT/data/val/<class>/<idx>.png``    first 100 TEST images per class (validation)

No data augmentation is used: with a CPU budget of a few epochs the model
underfits, and random-crop augmentation measurably slowed convergence.

Training uses exactly the preprocessing the saved image processor performs
(grayscale -> 3 channels, bilinear resize 28 -> 32 on uint8, /255, normalise),
and the script verifies that by re-loading everything from disk through
``AutoModelForImageClassification`` / ``AutoImageProcessor`` at the end.

Regenerate with::

    .venv/bin/python scripts/train_tiny_vit.py
"""

from __future__ import annotations

import argparse
import gzip
import math
import platform
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
import transformers
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    get_cosine_schedule_with_warmup,
)

try:  # optional progress bar
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is optional
    tqdm = None

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = REPO_ROOT / "vitq" / "default"

# Index order == Fashion-MNIST label order.
CLASS_NAMES: tuple[str, ...] = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
IMAGE_SIZE = 32
MEAN = 0.2860
STD = 0.3530
SAMPLES_PER_CLASS = 100
PNG_PARITY_TOLERANCE_PP = 0.5
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int


# --------------------------------------------------------------------------- data


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (uint8 payload) into a numpy array."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: expected {math.prod(dims)} values, got {data.size}")
    return data.reshape(dims)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images[N, 28, 28] uint8, labels[N] int64) for 'train' or 'test'."""
    image_file, label_file = SPLIT_FILES[split]
    images = read_idx(source / image_file)
    labels = read_idx(source / label_file).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def check_source(source: Path) -> None:
    missing = [n for pair in SPLIT_FILES.values() for n in pair if not (source / n).is_file()]
    if missing:
        sys.exit(
            f"Fashion-MNIST not found in {source} (missing {', '.join(missing)}); "
            "run `apt-get install dataset-fashion-mnist` or pass --source DIR"
        )


def to_model_uint8(images: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    """28x28 gray uint8 -> [N, 3, 32, 32] uint8, identical to ViTImageProcessor's
    convert_rgb + bilinear (antialiased) resize, which also operates on uint8."""
    out = []
    for start in range(0, images.shape[0], chunk):
        x = torch.from_numpy(images[start : start + chunk]).unsqueeze(1).expand(-1, 3, -1, -1)
        out.append(
            tvf.resize(
                x.contiguous(),
                [IMAGE_SIZE, IMAGE_SIZE],
                interpolation=tvf.InterpolationMode.BILINEAR,
                antialias=True,
            )
        )
    return torch.cat(out)


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float: rescale by 1/255, then (x - mean) / std (same for all channels)."""
    return (x_uint8.float() * (1.0 / 255.0) - MEAN) / STD


def first_per_class(labels: np.ndarray, per_class: int) -> list[int]:
    """Indices of the first `per_class` samples of every class, sorted by index."""
    picked: list[int] = []
    for cls in range(len(CLASS_NAMES)):
        picked.extend(np.flatnonzero(labels == cls)[:per_class].tolist())
    return sorted(picked)


def write_png_split(root: Path, images: np.ndarray, labels: np.ndarray, indices: Iterable[int]) -> int:
    """Write images as <root>/<class_name>/<idx:05d>.png (8-bit grayscale)."""
    if root.exists():
        shutil.rmtree(root)
    count = 0
    for idx in indices:
        class_dir = root / CLASS_NAMES[int(labels[idx])]
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[idx]).save(class_dir / f"{idx:05d}.png", optimize=True)
        count += 1
    return count


# -------------------------------------------------------------------------- model


def build_model() -> ViTForImageClassification:
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_act="gelu",
        qkv_bias=True,
        num_labels=len(CLASS_NAMES),
        id2label={i: name for i, name in enumerate(CLASS_NAMES)},
        label2id={name: i for i, name in enumerate(CLASS_NAMES)},
    )
    return ViTForImageClassification(config)


def build_processor() -> ViTImageProcessor:
    return ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # PIL.Image.BILINEAR
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[MEAN] * 3,
        image_std=[STD] * 3,
        do_convert_rgb=True,
    )


def batches(n: int, batch_size: int, order: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    idx = order if order is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield idx[start : start + batch_size]


def progress(it: Iterable, total: int, desc: str) -> Iterable:
    if tqdm is None:
        return it
    return tqdm(it, total=total, desc=desc, leave=False, mininterval=5.0, file=sys.stdout)


def train(model: ViTForImageClassification, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> None:
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.999),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.epochs * steps_per_epoch)
    model.train()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(x.shape[0], generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = progress(batches(x.shape[0], cfg.batch_size, order), steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        for idx in bar:
            logits = model(pixel_values=normalize(x[idx])).logits
            loss = nnf.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * idx.numel()
            correct += int((logits.argmax(-1) == y[idx]).sum())
            seen += idx.numel()
        print(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / seen:.4f} "
            f"train-acc {100 * correct / seen:.2f}% ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, pixel_values: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    preds = [model(pixel_values=pixel_values[idx]).logits.argmax(-1) for idx in batches(pixel_values.shape[0], batch_size)]
    return torch.cat(preds)


@torch.no_grad()
def predict_png_folder(model: torch.nn.Module, processor, root: Path, batch_size: int = 200) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Evaluate <root>/<class>/<idx>.png via PIL + AutoImageProcessor.

    Returns (original split indices, labels via config.label2id, predictions)."""
    files = sorted(root.glob("*/*.png"), key=lambda p: int(p.stem))
    label2id = model.config.label2id
    labels = torch.tensor([label2id[f.parent.name] for f in files])
    preds = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = []
        for f in chunk:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        preds.append(model(pixel_values=pixel_values).logits.argmax(-1))
    return [int(f.stem) for f in files], labels, torch.cat(preds)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((preds == labels).float().mean())


# ------------------------------------------------------------------------ readmes


def write_model_readme(path: Path, cfg: TrainConfig, results: dict[str, float | str], n_params: int) -> None:
    size_kib = (path.parent / "model.safetensors").stat().st_size / 1024
    path.write_text(
        f"""# vitq embedded default model: tiny ViT on Fashion-MNIST

A very small `ViTForImageClassification` trained from scratch, shipped with vitq so
that quantization can be exercised end to end offline. It is a test fixture, not a
model meant for real use.

## Architecture

- `ViTForImageClassification` (Hugging Face transformers), {n_params:,} parameters,
  `model.safetensors` ≈ {size_kib:.0f} KiB (float32)
- image 32x32x3, patch 4 (64 patches + CLS token), hidden 64, 4 layers,
  4 heads, MLP 256, GELU, qkv bias, 10 labels
- labels (Fashion-MNIST order): {", ".join(f"{i}={n}" for i, n in enumerate(CLASS_NAMES))}

## Preprocessing (`preprocessor_config.json`, `ViTImageProcessor`)

Grayscale -> RGB (channel replication), bilinear resize 28x28 -> 32x32,
rescale 1/255, normalise with mean {MEAN} / std {STD} on every channel.
Training used exactly this pipeline (on uint8 tensors, verified against
`AutoImageProcessor` on the PNG sample below).

## Data and licence

Fashion-MNIST (Zalando Research, https://github.com/zalandoresearch/fashion-mnist),
MIT licence, read from the Debian package `dataset-fashion-mnist`
(`/usr/share/datasets/fashion-mnist`). Trained on the full {results["n_train"]:,}-image training split.

## Training

- regenerate: `.venv/bin/python scripts/train_tiny_vit.py` (from the repo root)
- seed {cfg.seed}, deterministic algorithms, 1 CPU thread
- {cfg.epochs} epochs, batch size {cfg.batch_size}, AdamW (lr {cfg.lr}, weight decay
  {cfg.weight_decay}), cosine schedule with {cfg.warmup_steps} warm-up steps,
  grad-norm clip 1.0
- no data augmentation (the model underfits in this short budget; random-crop
  augmentation cost ~10 pp early in training)
- training wall time: {results["train_seconds"]:.0f} s ({results["train_seconds"] / 60:.1f} min) on {results["cpu"]}
- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}

## Accuracy (top-1)

| evaluation set | images | top-1 |
|---|---|---|
| Fashion-MNIST test split (full) | 10,000 | {results["test_acc"]:.2f}% |
| `../data/val` PNG sample via `AutoImageProcessor` | 1,000 | {results["png_acc"]:.2f}% |
| same 1,000 images, tensor path | 1,000 | {results["png_tensor_acc"]:.2f}% |
""",
        encoding="utf-8",
    )


def write_data_readme(path: Path, n_train: int, n_val: int) -> None:
    path.write_text(
        f"""# vitq embedded sample data (Fashion-MNIST PNGs)

ImageNet-style folder layout, `<split>/<class_name>/<idx>.png`, 28x28 8-bit grayscale PNGs.
`<idx>` is the image's index in the original Fashion-MNIST split, zero padded to 5 digits.

- `train/`: the first {SAMPLES_PER_CLASS} images of each class from the Fashion-MNIST
  **training** split ({n_train} images) - use for calibration.
- `val/`: the first {SAMPLES_PER_CLASS} images of each class from the Fashion-MNIST
  **test** split ({n_val} images) - use for validation.

Classes (label order): {", ".join(CLASS_NAMES)}.

Source: Fashion-MNIST by Zalando Research (https://github.com/zalandoresearch/fashion-mnist),
MIT licence, Copyright (c) 2017 Zalando SE, taken from the Debian package
`dataset-fashion-mnist`. Generated by `scripts/train_tiny_vit.py`.
""",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="directory with Fashion-MNIST *.gz files")
    return parser.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    check_source(args.source)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    transformers.set_seed(args.seed)
    cfg = TrainConfig(
        seed=args.seed,
        epochs=args.epochs,
        batch_size=64,
        lr=2e-3,
        weight_decay=0.05,
        warmup_steps=300,
    )
    out: Path = args.out.resolve()
    model_dir, data_dir = out / "model", out / "data"

    train_images, train_labels = load_split(args.source, "train")
    test_images, test_labels = load_split(args.source, "test")
    print(f"Fashion-MNIST: {len(train_labels)} train / {len(test_labels)} test images from {args.source}")

    # Sample data first: it does not depend on training.
    data_dir.mkdir(parents=True, exist_ok=True)
    n_train = write_png_split(data_dir / "train", train_images, train_labels, first_per_class(train_labels, SAMPLES_PER_CLASS))
    val_indices = first_per_class(test_labels, SAMPLES_PER_CLASS)
    n_val = write_png_split(data_dir / "val", test_images, test_labels, val_indices)
    write_data_readme(data_dir / "README.md", n_train, n_val)
    print(f"wrote {n_train} calibration + {n_val} validation PNGs under {data_dir}")

    x_train, y_train = to_model_uint8(train_images), torch.from_numpy(train_labels)
    x_test, y_test = to_model_uint8(test_images), torch.from_numpy(test_labels)

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; training {cfg}")
    t0 = time.perf_counter()
    train(model, x_train, y_train, cfg)
    train_seconds = time.perf_counter() - t0
    print(f"training took {train_seconds:.0f}s ({train_seconds / 60:.1f} min)")

    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    build_processor().save_pretrained(model_dir)

    # Evaluate strictly from what is on disk.
    loaded = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    test_preds = predict(loaded, normalize(x_test))
    test_acc = accuracy(test_preds, y_test)
    png_indices, png_labels, png_preds = predict_png_folder(loaded, processor, data_dir / "val")
    if png_indices != val_indices:
        raise AssertionError("val PNG files do not match the expected test-split indices")
    if not torch.equal(png_labels, y_test[png_indices]):
        raise AssertionError("folder names mapped through label2id disagree with the test labels")
    png_acc = accuracy(png_preds, png_labels)
    png_tensor_acc = accuracy(test_preds[png_indices], y_test[png_indices])
    agree = int((png_preds == test_preds[png_indices]).sum())
    print(f"top-1 full test set (10,000, tensor path): {test_acc:.2f}%")
    print(f"top-1 val PNG sample ({len(png_indices)}, AutoImageProcessor): {png_acc:.2f}%")
    print(f"top-1 same {len(png_indices)} images, tensor path: {png_tensor_acc:.2f}%  (prediction agreement {agree}/{len(png_indices)})")
    if abs(png_acc - png_tensor_acc) > PNG_PARITY_TOLERANCE_PP:
        raise AssertionError(
            f"preprocessing mismatch: PNG path {png_acc:.2f}% vs tensor path {png_tensor_acc:.2f}%"
        )

    results: dict[str, float | str] = {
        "train_seconds": train_seconds,
        "test_acc": test_acc,
        "png_acc": png_acc,
        "png_tensor_acc": png_tensor_acc,
        "cpu": cpu_name(),
        "n_train": len(train_labels),
    }
    write_model_readme(model_dir / "README.md", cfg, results, n_params)
    print(f"done: {out}")


if __name__ == "__main__":
    main()
