"""Loading a classifier and its image processor: embedded default, HF folder or hub id,
or torchvision's ViT (``torchvision:vit_b_16`` with a weights file)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from quant.families import SUPPORTED

DEFAULT_MODEL = Path(__file__).parent / "default" / "model"
DEFAULT_DATA = Path(__file__).parent / "default" / "data"


class ModelLoadError(ValueError):
    """The model cannot be loaded, with a message that says what to do."""


TORCHVISION = "torchvision:"
# torchvision's ViT builders vitq loads (``--model torchvision:NAME --weights FILE``)
TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


@dataclass
class LoadedModel:
    model: nn.Module
    processor: object
    source: str  # what the user passed (or the default's path)
    weights: str | None = None  # the weights file (torchvision), resolved

    @property
    def name(self) -> str:
        """Folder name under out/: the checkpoint's folder or hub name; torchvision:
        the architecture and the weights file's name."""
        if self.source.startswith(TORCHVISION):
            arch = self.source[len(TORCHVISION):]
            return f"{arch}-{Path(self.weights).stem}" if self.weights else arch
        if Path(self.source).resolve() == DEFAULT_MODEL.resolve():
            return "tiny-vit-fashion"
        return Path(self.source.rstrip("/")).name or "model"

    @property
    def key(self) -> str:
        """What identifies the model in caches and run metadata."""
        if self.weights:
            return f"{self.source}@{self.weights}"
        local = Path(self.source).exists()
        return str(Path(self.source).resolve()) if local else self.source


class TorchvisionProcessor:
    """A torchvision transform called the way vitq calls a HF image processor:
    ``processor(images=img, return_tensors="pt")["pixel_values"]``."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, images, return_tensors: str = "pt"):
        import torch
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.transform(img) for img in images])}

    def __repr__(self) -> str:
        return f"TorchvisionProcessor({self.transform!r})"


class LabelConfig:
    """The little of a HF config vitq reads from a classifier (``id2label``)."""

    def __init__(self, labels: list[str]) -> None:
        self.id2label = {i: str(label) for i, label in enumerate(labels)}
        self.label2id = {label: i for i, label in self.id2label.items()}
        self.num_labels = len(labels)


def load_torchvision(source: str, weights: str | os.PathLike | None) -> LoadedModel:
    """``torchvision:ARCH`` with ``weights``: a state dict as torchvision downloads it
    (``vit_b_16-c867db91.pth``), or a dict ``{"config": VisionTransformer kwargs,
    "state_dict": ..., "labels": [...], "image_size": ...}`` for other sizes (tests,
    random-weight benchmarks). Preprocessing is torchvision's: the ImageNet weights'
    transforms (resize 256, crop 224 for the B/L models), or for a ``config`` checkpoint
    a resize and crop to its image size with the same normalisation."""
    arch = source[len(TORCHVISION):]
    if arch not in TORCHVISION_VITS:
        raise ModelLoadError(f"--model {source}: unknown torchvision model {arch!r}; vitq loads "
                             f"{', '.join(TORCHVISION + a for a in TORCHVISION_VITS)}")
    try:
        import torch
        import torchvision  # noqa: F401  (vitq does not need it otherwise)
        from torchvision.models import get_model, get_model_weights
        from torchvision.models.vision_transformer import VisionTransformer
        from torchvision.transforms._presets import ImageClassification
    except ImportError as e:
        raise ModelLoadError(f"--model {source}: torchvision is not installed ({e}); install the torchvision "
                             f"that matches your torch (`make install` does where one exists)") from None
    enum = get_model_weights(arch).DEFAULT
    if weights is None:
        raise ModelLoadError(f"--model {source}: pass the weights file with --weights PATH (vitq does not "
                             f"download; torchvision's file for {arch} is {enum.url})")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"--weights {weights}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ModelLoadError(f"--weights {weights}: cannot read: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"--weights {weights}: not a state dict")
    config = data.get("config") if isinstance(data.get("state_dict"), dict) else None
    state = data["state_dict"] if config is not None else data
    try:
        if config is not None:
            model = VisionTransformer(**config)
        else:
            head = state.get("heads.head.weight")
            classes = int(head.shape[0]) if head is not None else 1000
            model = get_model(arch, weights=None, num_classes=classes)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as e:
        raise ModelLoadError(f"--weights {weights}: does not fit {arch}: {str(e).splitlines()[0]}") from None
    labels = data.get("labels") if config is not None else None
    if labels is None:
        labels = enum.meta["categories"] if model.num_classes == len(enum.meta["categories"]) else [
            str(i) for i in range(model.num_classes)]
    model.config = LabelConfig(list(labels))  # id2label for the data loader (not a submodule)
    if config is not None:
        size = int(data.get("image_size", model.image_size))
        transform = ImageClassification(crop_size=size, resize_size=size)
    else:
        transform = enum.transforms()
    return LoadedModel(model.eval(), TorchvisionProcessor(transform), source, str(path.resolve()))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_model(source: str | os.PathLike | None = None, weights: str | os.PathLike | None = None) -> LoadedModel:
    """Load ``source`` (None: the embedded default) as a supported ViT-family classifier.

    The architecture is checked from the config before any weight is read; a hub id
    that is neither cached nor reachable fails in seconds instead of after retries.
    ``torchvision:ARCH`` loads torchvision's ViT from ``weights`` (:func:`load_torchvision`).
    """
    if source is not None and str(source).startswith(TORCHVISION):
        return load_torchvision(str(source), weights)
    if weights is not None:
        raise ModelLoadError("--weights is for torchvision models (--model torchvision:vit_b_16); a Hugging Face "
                             "model folder carries its weights")
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # vitq shows its own progress; keep stderr for errors

    source = str(source) if source is not None else str(DEFAULT_MODEL)
    path = Path(source).expanduser()
    local = path.exists()
    kwargs: dict = {}
    if local:
        if not path.is_dir():
            raise ModelLoadError(f"--model {source}: not a folder (expected a Hugging Face model folder)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"--model {source}: no config.json in that folder; is it a Hugging Face model?")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ModelLoadError(f"--model {source}: the folder has no weights (*.safetensors or *.bin)")
    else:
        if source.count("/") > 1 or source.startswith((".", "/", "~")):
            raise ModelLoadError(f"--model {source}: no such folder")
        try:
            AutoConfig.from_pretrained(source, local_files_only=True)
            kwargs["local_files_only"] = True  # cached: stay offline
        except (OSError, ValueError):
            if not _hub_reachable():
                raise ModelLoadError(
                    f"--model {source}: not a local folder, not in the Hugging Face cache, and the hub "
                    f"cannot be reached. On a connected machine run `hf download {source} --local-dir DIR` "
                    f"and pass --model DIR."
                ) from None
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model {source}: cannot read its config: {str(e).splitlines()[0]}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not set(archs) & set(SUPPORTED):
        raise ModelLoadError(
            f"--model {source}: architecture {', '.join(archs) or config.model_type!r} is not supported; "
            f"vitq supports {', '.join(SUPPORTED)}"
        )
    try:
        model = AutoModelForImageClassification.from_pretrained(source, **kwargs)
        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model {source}: cannot load: {str(e).splitlines()[0]}") from None
    return LoadedModel(model.eval(), processor, source)
