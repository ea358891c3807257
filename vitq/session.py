"""Everything a command needs before it analyses anything: model, sites, images,
calibration. Calibration statistics are cached in the output folder and reused when
model, data, image count and seed match, so reruns and later commands skip it."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis import artifacts
from quant.calibrate import calibrate
from quant.model import QuantModel

from .data import BadImages, CropStore, ImageSet, NotCacheable, batches, cacheable
from .models import DEFAULT_DATA, LoadedModel, load_model
from quant.store import atomic_torch_save


@dataclass
class Options:
    model: str | None = None
    data: str | None = None
    out: str | None = None
    calib: int = 256
    limit: int | None = None
    batch_size: int = 32
    seed: int = 0
    workers: int | None = None  # DataLoader workers of the first decode (None: automatic)
    max_bad: float = 0.001
    progress: bool = True
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N
    tf32: bool = False  # allow TF32 matmuls/convolutions on CUDA (FP32 stays FP32 without it)
    decode_cache: str | None = None  # folder of the decoded-crop stores (default: default_decode_cache(); "none": off)
    weights: str | None = None  # torchvision / timm weights file (--weights)


def default_decode_cache() -> str:
    """$VITQ_DECODE_CACHE, else $XDG_CACHE_HOME/vitq/decoded (~/.cache/vitq/decoded): outside the
    output folders, so every output folder and rerun on the same data shares the crops."""
    if os.environ.get("VITQ_DECODE_CACHE"):
        return os.environ["VITQ_DECODE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vitq", "decoded")


class DeviceError(ValueError):
    """The requested --device cannot be used here."""


def resolve_device(name: str | None, tf32: bool = False) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is a user error.
    Also sets the TF32 switches: off unless ``tf32`` (the FP32 reference stays FP32)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: unknown device; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name}: unsupported device; use auto, cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"--device {name}: CUDA is not available ({why}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return device


class Session:
    def __init__(self, opts: Options, loaded: LoadedModel | None = None) -> None:
        """``loaded``: a model already loaded (the Python API's in-memory model); else
        ``opts.model`` / ``opts.weights`` are loaded."""
        torch.manual_seed(opts.seed)
        self.opts = opts
        self.device = resolve_device(opts.device, opts.tf32)
        self.loaded: LoadedModel = loaded if loaded is not None else load_model(opts.model, opts.weights)
        self.qmodel = QuantModel(self.loaded.model.to(self.device))
        self.data_root = Path(opts.data) if opts.data else DEFAULT_DATA
        self.out = Path(opts.out) if opts.out else Path("out") / self.loaded.name
        self.bad: list[str] = []  # unreadable files skipped so far, over all image passes

    @property
    def sites(self):
        return self.qmodel.sites

    def images(self, split: str, n: int | None) -> ImageSet:
        return ImageSet.from_folder(self.data_root, split, self.loaded.model.config).sample(n, self.opts.seed)

    def crop_store(self, split: Path) -> CropStore | None:
        """The decoded-crop store of ``split`` (one per split and processor), None when off."""
        stores = self.__dict__.setdefault("_crop_stores", {})
        if split not in stores:
            folder = self.opts.decode_cache or default_decode_cache()
            usable = folder.lower() != "none" and cacheable(self.loaded.processor)
            stores[split] = CropStore(Path(folder), self.loaded.processor, split) if usable else None
        return stores[split]

    def batches(self, images: ImageSet):
        """(pixels, labels, ids) batches of ``images``: every stage reads them through here,
        from the decoded-crop store (the first read of an image decodes it, once)."""
        bad = BadImages(len(images), self.opts.max_bad, self.bad)
        store = self.crop_store(images.split)
        if store is not None:
            try:
                store.ensure(images, self.opts.workers, self.opts.progress, self.opts.batch_size)
                return store.batches(images, self.opts.batch_size, bad)
            except NotCacheable:
                self._crop_stores[images.split] = None
        return batches(images, self.loaded.processor, self.opts.batch_size, bad, self.opts.workers or 0)

    def num_batches(self, images: ImageSet) -> int:
        return -(-len(images) // self.opts.batch_size)

    calibration_s: float | None = None  # seconds the (possibly cached) calibration took

    def calibrate(self) -> int:
        """Calibrate (or load the cached statistics); returns the number of images."""
        images = self.images("train", self.opts.calib)
        files = "\n".join(str(p.relative_to(images.split)) for p, _ in images.items)
        key = {"model": self.describe()["model"], "split": str(images.split.resolve()), "images": len(images),
               "seed": self.opts.seed, "files": hashlib.sha1(files.encode()).hexdigest(),
               "version": 4,  # 3: canonical site names, 4: per-sample extremes (mean_minmax)
               **self.numerics()}
        cache = self.out / artifacts.CALIBRATION
        if cache.is_file():
            saved = torch.load(cache, weights_only=False)
            if saved.get("key") == key:
                self.qmodel.load_calibration_state(saved["state"])
                self.calibration_images = saved["seen"]
                self.calibration_s = saved.get("seconds")
                return saved["seen"]
        t0 = time.time()
        seen = calibrate(self.qmodel, (p for p, _, _ in self.batches(images)), self.num_batches(images), self.opts.progress)
        self.calibration_s = round(time.time() - t0, 1)
        atomic_torch_save(cache, {"key": key, "seen": seen, "seconds": self.calibration_s,
                                  "state": self.qmodel.calibration_state()})
        self.calibration_images = seen
        return seen

    def describe(self) -> dict:
        import transformers
        return {
            "model": self.loaded.key,
            "family": self.qmodel.family.name, "data": str(self.data_root.resolve()), "seed": self.opts.seed,
            "calibration_images": getattr(self, "calibration_images", None),
            "torch": torch.__version__, "transformers": transformers.__version__,
        }

    def settings(self) -> dict:
        """:meth:`describe` (every table's meta) plus :meth:`numerics`: the settings that name
        the result logs (``quant.store.settings_key``)."""
        return {**self.describe(), **self.numerics()}

    def numerics(self) -> dict:
        """What decides the numbers besides model, data and seed, in every settings key (the
        result logs' and the calibration cache's): the device type and TF32 when not on the
        CPU, so a CUDA run never reuses a CPU run's rows nor the reverse. Not the GPU index:
        the shards of one torchrun (``cuda:LOCAL_RANK``) and the merge run share one log.
        Empty on the CPU, so the logs and caches written before the device was in the key
        stay valid there."""
        if self.device.type == "cpu":
            return {}
        return {"device": self.device.type, "tf32": self.opts.tf32}
