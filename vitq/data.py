"""Image folders in ImageNet layout, labels mapped by class name, robust loading.

Layout: ``<root>/train/<class>/*`` (calibration) and ``<root>/val|valid|validation/
<class>/*`` (evaluation). A class folder is mapped to the model's label index by its
name (an ImageNet synset such as ``n01440764`` or the model's own label), never by
folder order: a val folder may hold only some of the classes.
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset

VAL_NAMES = ("val", "valid", "validation")
SYNSETS = (Path(__file__).parent / "imagenet_synsets.txt").read_text().split()
_SYNSET = re.compile(r"^n\d{8}$")


class DataError(ValueError):
    """The data folder is missing, empty or laid out wrongly."""


def split_dir(root: str | Path, split: str) -> Path:
    """``<root>/train`` or the first of ``<root>/val|valid|validation``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder")
    names = ("train",) if split == "train" else VAL_NAMES
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"--data {root}: no {' or '.join(n + '/' for n in names)} folder inside "
                    f"(expected <data>/train/<class>/*.JPEG and <data>/val/<class>/*.JPEG)")


def label_index(config, folders: list[str]) -> dict[str, int]:
    """Map class-folder names to the model's label indices.

    A folder matches a label if it equals it, or equals its part before ':' (labels
    like ``n01440764: tench``); a 1000-class model whose labels carry no synset
    (google/vit-*) falls back to the standard ImageNet-1k synset order.
    """
    keys: dict[str, int] = {}
    for idx, label in sorted(config.id2label.items(), key=lambda kv: int(kv[0])):
        label = str(label)
        for key in filter(None, (label, label.split(":", 1)[0].strip())):
            keys.setdefault(key, int(idx))
            keys.setdefault(key.lower(), int(idx))
    if len(config.id2label) == len(SYNSETS) and not any(_SYNSET.match(k) for k in keys):
        keys.update({s: i for i, s in enumerate(SYNSETS)})
    mapping = {f: keys.get(f, keys.get(f.lower())) for f in folders}
    unknown = sorted(f for f, i in mapping.items() if i is None)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DataError(f"{len(unknown)} class folder(s) match no label of the model: {shown} "
                        f"(folders must be named by synset, e.g. n01440764, or by the model's label)")
    return mapping


def list_images(split: Path) -> list[tuple[Path, str]]:
    """(file, class folder) for every non-hidden file, sorted for determinism."""
    classes = sorted(d for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{split}: no class folders (expected {split}/<class>/<image>)")
    items = [(f, c.name) for c in classes for f in sorted(c.iterdir())
             if f.is_file() and not f.name.startswith(".")]
    if not items:
        raise DataError(f"{split}: the class folders hold no images")
    return items


@dataclass
class ImageSet:
    """A list of labelled image files; ``sample`` draws a seeded subset."""

    items: list[tuple[Path, int]]
    split: Path
    ids: list[int] | None = None  # stable image ids (positions in the full set), kept by subset()

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = list(range(len(self.items)))

    @classmethod
    def from_folder(cls, root: str | Path, split: str, config) -> "ImageSet":
        folder = split_dir(root, split)
        files = list_images(folder)
        mapping = label_index(config, sorted({c for _, c in files}))
        return cls([(f, mapping[c]) for f, c in files], folder)

    def sample(self, n: int | None, seed: int) -> "ImageSet":
        if n is None or n >= len(self.items):
            return self
        return ImageSet(sorted(random.Random(seed).sample(self.items, n)), self.split)

    def subset(self, positions: list[int]) -> "ImageSet":
        """The images at ``positions``, keeping their ids (a resumed run skips the rest)."""
        return ImageSet([self.items[i] for i in positions], self.split, [self.ids[i] for i in positions])

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class BadImages:
    """Files that could not be decoded, skipped with a warning and counted."""

    total: int
    max_fraction: float
    paths: list[str] = field(default_factory=list)  # may be shared by several passes (run summary)
    count: int = 0  # this pass only

    def add(self, path: str, reason: str) -> None:
        if path not in self.paths:
            self.paths.append(path)
        self.count += 1
        if self.count > self.max_fraction * self.total:
            raise DataError(f"{self.count} of {self.total} images are unreadable (more than "
                            f"--max-bad {self.max_fraction:.2%}); first: {path}")
        warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=2)


def load_rgb(path: Path) -> Image.Image:
    """Decode fully and convert to 8-bit RGB (grayscale, CMYK, RGBA, 16-bit included)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            peak = 65535.0 if arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(np.round(arr / peak * 255), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")


class _Images(Dataset):
    def __init__(self, images: ImageSet, processor) -> None:
        self.images, self.processor = images, processor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path, label = self.images.items[i]
        try:
            img = load_rgb(path)
        except Exception as e:  # any decoder failure: the caller counts it
            return None, label, self.images.ids[i], f"{path}: {type(e).__name__}: {e}"
        pixels = self.processor(images=img, return_tensors="pt")["pixel_values"][0]
        return pixels, label, self.images.ids[i], None


def _collate(batch):
    good = [b for b in batch if b[0] is not None]
    bad = [b[3] for b in batch if b[0] is None]
    pixels = torch.stack([b[0] for b in good]) if good else torch.empty(0)
    return pixels, torch.tensor([b[1] for b in good], dtype=torch.long), [b[2] for b in good], bad


def batches(images: ImageSet, processor, batch_size: int, bad: BadImages | None = None,
            workers: int = 0):
    """Yield (pixels, labels, indices) batches in file order, skipping bad files."""
    loader = DataLoader(_Images(images, processor), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate)
    bad = bad or BadImages(len(images), 0.001)
    for pixels, labels, idx, errors in loader:
        for err in errors:
            path, reason = err.split(": ", 1)
            bad.add(path, reason)
        if len(idx):
            yield pixels, labels, idx
