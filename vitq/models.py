"""Loading a classifier and its image processor: embedded default, folder or hub id."""

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


@dataclass
class LoadedModel:
    model: nn.Module
    processor: object
    source: str  # what the user passed (or the default's path)

    @property
    def name(self) -> str:
        """Folder name under out/: the checkpoint's folder or hub name."""
        if Path(self.source).resolve() == DEFAULT_MODEL.resolve():
            return "tiny-vit-fashion"
        return Path(self.source.rstrip("/")).name or "model"


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_model(source: str | os.PathLike | None = None) -> LoadedModel:
    """Load ``source`` (None: the embedded default) as a supported ViT-family classifier.

    The architecture is checked from the config before any weight is read; a hub id
    that is neither cached nor reachable fails in seconds instead of after retries.
    """
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
