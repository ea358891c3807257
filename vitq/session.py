"""Everything a command needs before it analyses anything: model, sites, images,
calibration. Calibration statistics are cached in the output folder and reused when
model, data, image count and seed match, so reruns and later commands skip it."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.calibrate import calibrate
from quant.model import QuantModel

from .data import BadImages, ImageSet, batches
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
    workers: int = 0
    max_bad: float = 0.001
    progress: bool = True
    weights: str | None = None  # torchvision weights file (--weights)


class Session:
    def __init__(self, opts: Options) -> None:
        torch.manual_seed(opts.seed)
        self.opts = opts
        self.loaded: LoadedModel = load_model(opts.model, opts.weights)
        self.qmodel = QuantModel(self.loaded.model)
        self.data_root = Path(opts.data) if opts.data else DEFAULT_DATA
        self.out = Path(opts.out) if opts.out else Path("out") / self.loaded.name
        self.bad: list[str] = []  # unreadable files skipped so far, over all image passes

    @property
    def sites(self):
        return self.qmodel.sites

    def images(self, split: str, n: int | None) -> ImageSet:
        return ImageSet.from_folder(self.data_root, split, self.loaded.model.config).sample(n, self.opts.seed)

    def batches(self, images: ImageSet):
        bad = BadImages(len(images), self.opts.max_bad, self.bad)
        return batches(images, self.loaded.processor, self.opts.batch_size, bad, self.opts.workers)

    def num_batches(self, images: ImageSet) -> int:
        return -(-len(images) // self.opts.batch_size)

    calibration_s: float | None = None  # seconds the (possibly cached) calibration took

    def calibrate(self) -> int:
        """Calibrate (or load the cached statistics); returns the number of images."""
        images = self.images("train", self.opts.calib)
        files = "\n".join(str(p.relative_to(images.split)) for p, _ in images.items)
        key = {"model": self.describe()["model"], "split": str(images.split.resolve()), "images": len(images),
               "seed": self.opts.seed, "files": hashlib.sha1(files.encode()).hexdigest(), "version": 3}  # 3: canonical site names
        cache = self.out / "calibration.pt"
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
