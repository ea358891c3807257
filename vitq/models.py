"""Loading a classifier and its image processor: embedded default, HF folder or hub id,
or torchvision's ViT (``torchvision:vit_b_16`` with a weights file). Each family loads
its own models (``FamilyAdapter.load`` in ``quant/families/``); this module picks the
family from the source and names the result. A model already in memory (the Python API,
``vitq.api``) is named by :func:`in_memory_model` and known by a hash of its weights."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quant.families import ModelLoadError, loader_for

__all__ = ["DEFAULT_DATA", "DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "in_memory_model", "load_model"]

DEFAULT_MODEL = Path(__file__).parent / "default" / "model"
DEFAULT_DATA = Path(__file__).parent / "default" / "data"


@dataclass
class LoadedModel:
    model: nn.Module
    processor: object
    source: str  # what the user passed (or the default's path)
    weights: str | None = None  # the weights file (torchvision), resolved
    fingerprint: str | None = None  # an in-memory model: the hash of its parameters and buffers

    @property
    def name(self) -> str:
        """Folder name under out/: the checkpoint's folder or hub name; a ``SCHEME:ARCH``
        model with a weights file: the architecture and the weights file's name; an
        in-memory model: the name it was given."""
        if self.fingerprint:
            return self.source.split(":", 1)[1]
        if self.weights:
            return f"{self.source.split(':', 1)[-1]}-{Path(self.weights).stem}"
        if Path(self.source).resolve() == DEFAULT_MODEL.resolve():
            return "tiny-vit-fashion"
        return Path(self.source.rstrip("/")).name or "model"

    @property
    def key(self) -> str:
        """What identifies the model in caches and run metadata."""
        if self.fingerprint:
            return f"{self.source}@sha1:{self.fingerprint}"
        if self.weights:
            return f"{self.source}@{self.weights}"
        local = Path(self.source).exists()
        return str(Path(self.source).resolve()) if local else self.source


def load_model(source: str | os.PathLike | None = None, weights: str | os.PathLike | None = None) -> LoadedModel:
    """Load ``source`` (None: the embedded default) as a supported ViT-family classifier,
    through the family that loads it (``quant.families.loader_for``); ``weights`` is the
    weights file of a ``SCHEME:ARCH`` source (``torchvision:vit_b_16``)."""
    source = str(source) if source is not None else str(DEFAULT_MODEL)
    model, processor = loader_for(source).load(source, None if weights is None else str(weights))
    resolved = str(Path(weights).expanduser().resolve()) if weights is not None else None
    return LoadedModel(model, processor, source, resolved)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-1 of the model's class, parameter and buffer names, shapes, dtypes and values:
    two in-memory models share calibration caches and result logs only when it is equal."""
    digest = hashlib.sha1(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def in_memory_model(model: nn.Module, processor: object, name: str) -> LoadedModel:
    """A classifier already in memory (a researcher's fine-tuned model), with its image processor
    (called as a HF one); ``name`` names its output folder. Known in caches by its weights' hash."""
    return LoadedModel(model.eval(), processor, f"memory:{name}", fingerprint=weights_fingerprint(model))
