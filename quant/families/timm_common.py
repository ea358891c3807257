"""What the timm families share: loading ``--model timm:ARCH --weights FILE``, and timm's
fused q/k/v projection split into three Linear modules.

Loading builds the model with ``timm.create_model(ARCH, pretrained=False, ...)`` (vitq
does not download) and loads the weights file into it: a state dict as timm saves it
(``model.safetensors`` of the ``timm/ARCH`` hub repository, or a ``.pth``/``.bin``, also
wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``), or a dict ``{"config":
create_model kwargs, "state_dict": ..., "labels": [...]}`` for other sizes (the tests'
tiny models). Preprocessing is timm's own eval transform for the model
(``timm.data.resolve_data_config`` + ``create_transform``; at the model's own input size
when the config changed it); labels are the ImageNet-1k synsets for a 1000-class head.
timm (and the torchvision it needs) is imported only here, only then.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .base import ModelLoadError, UnsupportedModelError, family_of
from .prenorm import attention
from .torchvision_vit import FLOAT_SLOTS, LabelConfig, TorchvisionProcessor

SCHEME = "timm"


def import_timm(source: str):
    try:
        import timm
        import timm.data  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"--model {source}: timm is not installed ({e}); pip install timm (it needs the "
                             f"torchvision that matches your torch)") from None
    return timm


def _read_state(weights: str) -> dict:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"--weights {weights}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ModelLoadError(f"--weights {weights}: cannot read: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"--weights {weights}: not a state dict")
    return data


def _head_classes(state: dict) -> int | None:
    head = state.get("head.weight", state.get("head.fc.weight"))
    return int(head.shape[0]) if isinstance(head, torch.Tensor) else None


def load_timm(source: str, weights: str | os.PathLike | None) -> tuple[nn.Module, object]:
    """(model in eval mode, processor) of ``timm:ARCH`` with ``weights`` (see the module docstring)."""
    arch = source[len(SCHEME) + 1:]
    timm = import_timm(source)
    if not timm.is_model(arch):
        raise ModelLoadError(f"--model {source}: timm has no model {arch!r} (timm.list_models('*vit*') lists them)")
    if weights is None:
        raise ModelLoadError(f"--model {source}: pass the weights file with --weights PATH (vitq does not download; "
                             f"`hf download timm/{arch} model.safetensors` on a connected machine fetches it)")
    data = _read_state(str(weights))
    config = data.get("config") if isinstance(data.get("state_dict"), dict) else None
    state = data
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(data.get(key), dict):
            state = data[key]
            break
    kwargs = dict(config or {})
    classes = _head_classes(state)
    if classes is not None:
        kwargs.setdefault("num_classes", classes)
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise ModelLoadError(f"--weights {weights}: does not fit {arch}: {str(e).splitlines()[0]}") from None
    model.eval()
    try:
        family_of(model)  # a timm model vitq cannot quantize fails here, in one line
    except UnsupportedModelError as e:
        raise ModelLoadError(f"--model {source}: {e}") from None
    labels = data.get("labels") if config is not None else None
    if labels is None:
        n = model.num_classes
        labels = timm.data.ImageNetInfo().label_names() if n == 1000 else [str(i) for i in range(n)]
    model.config = LabelConfig(list(labels))  # id2label for the data loader (not a submodule)
    return model, processor(model)


def processor(model: nn.Module) -> TorchvisionProcessor:
    """timm's eval transform for ``model``, at the model's own input size."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None and tuple(cfg["input_size"][1:]) != tuple(size):
        cfg.update(input_size=(3, *size), crop_pct=1.0)
    return TorchvisionProcessor(timm.data.create_transform(**cfg))


class TimmLoading:
    """Mixin of the timm families: ``--model timm:ARCH --weights FILE``."""

    scheme = SCHEME

    @classmethod
    def load(cls, source: str, weights: str | None) -> tuple[nn.Module, object]:
        return load_timm(source, weights)


def split_qkv(qkv: nn.Linear, dim: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """timm's fused ``qkv`` Linear (rows: q, then k, then v) as three Linear modules."""
    out = []
    for i in range(3):
        linear = nn.Linear(qkv.in_features, dim, bias=qkv.bias is not None, device=qkv.weight.device,
                           dtype=qkv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(qkv.weight[i * dim:(i + 1) * dim])
            if qkv.bias is not None:
                linear.bias.copy_(qkv.bias[i * dim:(i + 1) * dim])
        out.append(linear)
    return out[0], out[1], out[2]


class SplitAttention(nn.Module):
    """timm's ViT ``Attention`` with its fused ``qkv`` split into ``q``, ``k``, ``v`` (the same
    parameters), ``proj`` kept: the same attention computed explicitly (equal to timm's up to
    float rounding; a test checks it), so q, k and v are sites with their own weight."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.q, self.k, self.v = split_qkv(attn.qkv, attn.num_heads * attn.head_dim)
        self.proj = attn.proj

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("vitq's split attention takes no mask")
        return attention(FLOAT_SLOTS, self.q, self.k, self.v, self.proj, x, self.num_heads)
