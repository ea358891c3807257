"""Loading a Hugging Face classifier (model folder or hub id), for every HF family.

Every family whose ``scheme`` is None (HF ViT, DeiT, DINOv2, Swin) loads through
:class:`HFLoading`: the architecture named in ``config.json`` is checked against the
registry before any weight is read, and a hub id that is neither cached nor reachable
fails in seconds instead of after retries. transformers' Auto classes then build the
model and its image processor; the model's class picks its family (``family_of``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from .base import SUPPORTED, ModelLoadError


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_hf(source: str) -> tuple[nn.Module, object]:
    """(model in eval mode, image processor) of a HF model folder or hub id."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # vitq shows its own progress; keep stderr for errors
    path = Path(source).expanduser()
    kwargs: dict = {}
    if path.exists():
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
            if not hub_reachable():
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
    return model.eval(), processor


class HFLoading:
    """Mixin of the HF families: ``load`` reads a HF model folder or hub id."""

    @classmethod
    def load(cls, source: str, weights: str | None) -> tuple[nn.Module, object]:
        if weights is not None:
            raise ModelLoadError("--weights is for torchvision and timm models (--model torchvision:vit_b_16, "
                                 "timm:vit_base_patch16_224); a Hugging Face model folder carries its weights")
        return load_hf(source)
