"""Image folders in ImageNet layout, labels mapped by class name, robust loading.

Layout: ``<root>/train/<class>/*`` (calibration) and ``<root>/val|valid|validation/
<class>/*`` (evaluation). A class folder is mapped to the model's label index by its
name (an ImageNet synset such as ``n01440764`` or the model's own label), never by
folder order: a val folder may hold only some of the classes.
"""

from __future__ import annotations

import hashlib
import json
import os
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


# -- decode once: preprocessed crops on disk ---------------------------------------------
class _Crops(Dataset):
    """Decode + resize/crop, no rescale/normalize: the uint8 crop the cache stores."""

    def __init__(self, items: list[tuple[Path, int]], processor) -> None:
        self.items, self.processor = items, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path = self.items[i][0]
        try:
            img = load_rgb(path)
        except Exception as e:  # any decoder failure: recorded, reported when the image is read
            return None, f"{type(e).__name__}: {e}"
        return crop_uint8(self.processor, img), None


def crop_uint8(processor, img: Image.Image) -> torch.Tensor | None:
    """The processor's resized and cropped image as uint8 (C, H, W), or None when its
    resize does not produce whole 0..255 values (then nothing is cached)."""
    raw = processor(images=img, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"][0]
    if raw.dtype == torch.uint8:
        return raw
    raw = torch.as_tensor(raw)
    rounded = raw.round()
    if raw.min() < 0 or raw.max() > 255 or not torch.equal(rounded, raw):
        return None
    return rounded.to(torch.uint8)


def normalize_crops(processor, crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops (N, C, H, W) -> the processor's pixel values, with the processor's own
    rescale/normalize code (bit-identical to decoding through the processor)."""
    if hasattr(processor, "rescale_and_normalize"):  # torchvision-backed processors: fused, batched
        return processor.rescale_and_normalize(crops, processor.do_rescale, processor.rescale_factor,
                                               processor.do_normalize, processor.image_mean, processor.image_std)
    return processor(images=list(crops), return_tensors="pt", do_resize=False, do_center_crop=False)["pixel_values"]


def _processor_key(processor) -> str:
    desc = json.dumps({"class": type(processor).__name__, "config": processor.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha1(desc.encode()).hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class CropStore:
    """The preprocessed crops of one split folder under one processor, decoded once.

    uint8 crops (the processor's resize + centre crop) live in ``.npy`` chunk files read
    as memmaps; ``index.cache`` (JSON) maps each file (relative path, with size and mtime, so
    an edited file is decoded again) to its chunk and row, and records unreadable
    files with their error. Any image set drawn from the split (calibration sample,
    plan, confirm, error and val images, a resumed remainder) reads the crops it finds
    and decodes only the missing ones, with DataLoader workers and a progress bar:
    every stage and every rerun reuse them. Keyed by the processor's configuration and
    the split folder; the file list and seed only select which crops are read.
    """

    VERSION = 1

    def __init__(self, folder: Path, processor, split: Path) -> None:
        self.processor, self.split = processor, Path(split)
        key = hashlib.sha1(f"{_processor_key(processor)}|{self.split.resolve()}|{self.VERSION}".encode()).hexdigest()
        self.dir = Path(folder) / f"{self.split.name}-{key[:12]}"
        self._maps: dict[str, np.ndarray] = {}
        self.decoded = 0  # images decoded by this process (tests and run info)
        self.index = self._load_index()

    def _load_index(self) -> dict:
        path = self.dir / "index.cache"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass  # a torn index: start again (chunks are re-decoded, never misread)
        return {"images": {}, "bad": {}, "chunks": 0}

    def _save_index(self) -> None:
        from quant.store import atomic_write_text

        atomic_write_text(self.dir / "index.cache", json.dumps(self.index))

    def _rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.split))

    def _known(self, path: Path) -> bool:
        rel = self._rel(path)
        entry = self.index["images"].get(rel) or self.index["bad"].get(rel)
        return entry is not None and entry[-2:] == _stamp(path)

    def missing(self, images: ImageSet) -> list[int]:
        return [i for i, (p, _) in enumerate(images.items) if not self._known(p)]

    def ensure(self, images: ImageSet, workers: int | None = None, progress: bool = True,
               batch_size: int = 32) -> int:
        """Decode the images of ``images`` not in the store yet; returns how many were decoded."""
        import fcntl

        from tqdm import tqdm

        if not self.missing(images):
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second process decoding the same split waits, then reads
            self.index = self._load_index()
            todo = [images.items[i] for i in self.missing(images)]
            if not todo:
                return 0
            if workers is None:
                workers = min(8, max((os.cpu_count() or 1) - 1, 0)) if len(todo) >= 512 else 0
            chunk = f"chunk_{self.index['chunks']}.npy"
            self.index["chunks"] += 1
            out, row = None, 0
            loader = DataLoader(_Crops(todo, self.processor), batch_size=batch_size, num_workers=workers,
                                collate_fn=list)
            pos = 0
            try:
                for batch in tqdm(loader, total=-(-len(todo) // batch_size), desc=f"decode {self.split.name}",
                                  unit="batch", disable=not progress):
                    for crop, error in batch:
                        path = todo[pos][0]
                        pos += 1
                        self.decoded += 1
                        if crop is None and error is None:
                            raise NotCacheable()
                        if crop is None:
                            self.index["bad"][self._rel(path)] = [error, *_stamp(path)]
                            continue
                        if out is None:
                            out = np.lib.format.open_memmap(self.dir / chunk, mode="w+", dtype=np.uint8,
                                                            shape=(len(todo), *crop.shape))
                        out[row] = crop.numpy()
                        self.index["images"][self._rel(path)] = [chunk, row, *_stamp(path)]
                        row += 1
            finally:
                if out is not None:
                    out.flush()
                    del out
                self._save_index()
            return pos

    def _map(self, chunk: str) -> np.ndarray:
        if chunk not in self._maps:
            self._maps[chunk] = np.load(self.dir / chunk, mmap_mode="r")
        return self._maps[chunk]

    def batches(self, images: ImageSet, batch_size: int, bad: BadImages):
        """(pixels, labels, ids) batches in file order from the store (after :meth:`ensure`)."""
        for start in range(0, len(images), batch_size):
            crops, labels, ids = [], [], []
            for i in range(start, min(start + batch_size, len(images))):
                path, label = images.items[i]
                rel = self._rel(path)
                if rel in self.index["bad"]:
                    bad.add(str(path), self.index["bad"][rel][0])
                    continue
                chunk, row = self.index["images"][rel][:2]
                crops.append(torch.from_numpy(np.array(self._map(chunk)[row])))
                labels.append(label)
                ids.append(images.ids[i])
            if ids:
                yield (normalize_crops(self.processor, torch.stack(crops)), torch.tensor(labels, dtype=torch.long),
                       ids)


class NotCacheable(Exception):
    """The processor's crops are not whole uint8 values: decode through the processor."""


def cacheable(processor, img: Image.Image | None = None) -> bool:
    """Do uint8 crops reproduce this processor's pixel values exactly (checked on one image)?"""
    if img is None:  # a noisy image: resampling must give whole values, not only flat colour
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (260, 300, 3), dtype=np.uint8))
    try:
        crop = crop_uint8(processor, img)
        if crop is None:
            return False
        direct = processor(images=img, return_tensors="pt")["pixel_values"]
        return torch.equal(normalize_crops(processor, crop[None]), direct)
    except Exception:  # an exotic processor: no cache, the direct path stays correct
        return False
