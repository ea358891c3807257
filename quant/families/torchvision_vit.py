"""torchvision's ViT (``torchvision.models.VisionTransformer``: vit_b_16, vit_b_32, vit_l_16, ...).

The blocks are the plain pre-norm ViT blocks that HF ViT has, so the sites and their
canonical names are the same (``blocks.4.attn.q`` ... ``blocks.4.residual_mlp``,
``patch_embed``, ``norm``, ``head``): a skip-list written for HF ViT applies unchanged.
Where they live differs: ``conv_proj``, ``encoder.layers.encoder_layer_4.{ln_1,ln_2}``,
``mlp.0``/``mlp.3`` (fc1/fc2), ``encoder.ln``, ``heads.head``.

torchvision's attention is ``nn.MultiheadAttention``, whose q/k/v projections are one
fused ``in_proj_weight``. :meth:`TorchvisionViT.restructure` replaces it, once, by
:class:`SplitAttention`: the same parameters as three Linear modules (``q_proj``,
``k_proj``, ``v_proj``) and ``out_proj``, computing the same attention explicitly (equal
to ``nn.MultiheadAttention`` up to float rounding; a test checks it), so that q, k and
v are sites with their own weight like everywhere else.

Loading (``--model torchvision:vit_b_16 --weights FILE``, :meth:`TorchvisionViT.load`) and
the tests' tiny model (:meth:`TorchvisionViT.tiny`) import torchvision; nothing else here
does: the class is recognised by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .base import ModelLoadError, UnsupportedModelError, register_family
from .prenorm import PreNormAdapter, attention

# torchvision's ViT builders vitq loads (``--model torchvision:NAME --weights FILE``)
TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
# The tiny random model (``TorchvisionViT.tiny``): HF's tiny ViT's depth and width (its sites
# carry the same canonical names)
TINY = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)


class TorchvisionProcessor:
    """A torchvision transform called the way vitq calls a HF image processor:
    ``processor(images=img, return_tensors="pt")["pixel_values"]``."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, images, return_tensors: str = "pt"):
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


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


FLOAT_SLOTS = {"matmul_qk": {"q": _identity, "k": _identity}, "softmax": {"output": _identity},
               "matmul_av": {"probs": _identity, "v": _identity}}


class SplitAttention(nn.Module):
    """A batch-first self-attention ``nn.MultiheadAttention`` with its fused in-projection
    split into ``q_proj``/``k_proj``/``v_proj`` (copies of the slices of ``in_proj_weight``
    and ``in_proj_bias``); called as the original is called, ``(x, x, x, need_weights=False)``."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None:
            raise UnsupportedModelError("torchvision ViT: only batch-first self-attention with one fused "
                                        "in-projection is supported")
        dim, bias = mha.embed_dim, mha.in_proj_bias
        self.num_heads = mha.num_heads
        self.dropout = mha.dropout
        projections = []
        for i in range(3):
            linear = nn.Linear(dim, dim, bias=bias is not None, device=mha.in_proj_weight.device,
                               dtype=mha.in_proj_weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(mha.in_proj_weight[i * dim:(i + 1) * dim])
                if bias is not None:
                    linear.bias.copy_(bias[i * dim:(i + 1) * dim])
            projections.append(linear)
        self.q_proj, self.k_proj, self.v_proj = projections
        self.out_proj = mha.out_proj

    def forward(self, query, key=None, value=None, need_weights=False, **kwargs):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SplitAttention is self-attention only")
        out = attention(FLOAT_SLOTS, self.q_proj, self.k_proj, self.v_proj, self.out_proj, query, self.num_heads)
        return out, None


def _is_torchvision_vit(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models.vision_transformer")


@register_family("torchvision_vit")
class TorchvisionViT(PreNormAdapter):
    model_classes = ("VisionTransformer",)
    scheme = "torchvision"

    @classmethod
    def load(cls, source: str, weights: str | os.PathLike | None) -> tuple[nn.Module, object]:
        """``torchvision:ARCH`` with ``weights``: a state dict as torchvision downloads it
        (``vit_b_16-c867db91.pth``), or a dict ``{"config": VisionTransformer kwargs,
        "state_dict": ..., "labels": [...], "image_size": ...}`` for other sizes (tests,
        random-weight benchmarks). Preprocessing is torchvision's: the ImageNet weights'
        transforms (resize 256, crop 224 for the B/L models), or for a ``config`` checkpoint
        a resize and crop to its image size with the same normalisation."""
        arch = source[len(cls.scheme) + 1:]
        if arch not in TORCHVISION_VITS:
            raise ModelLoadError(f"--model {source}: unknown torchvision model {arch!r}; vitq loads "
                                 f"{', '.join(f'{cls.scheme}:{a}' for a in TORCHVISION_VITS)}")
        try:
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
        return model.eval(), TorchvisionProcessor(transform)

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> nn.Module:
        """A random tiny ``VisionTransformer`` with a random (not zero) head: torchvision
        zero-initialises it, which would give every image the same logits."""
        from torchvision.models.vision_transformer import VisionTransformer

        torch.manual_seed(seed)
        model = VisionTransformer(**{**TINY, **overrides}).eval()
        with torch.no_grad():
            model.heads.head.weight.normal_(0, 0.5)
        return model

    def check(self, model: nn.Module) -> None:
        if not _is_torchvision_vit(model):
            raise UnsupportedModelError(f"unsupported model class VisionTransformer from {type(model).__module__}; "
                                        f"vitq supports torchvision's VisionTransformer")
        if not isinstance(model.conv_proj, nn.Conv2d):
            raise UnsupportedModelError("torchvision ViT with a convolutional stem is not supported")
        if list(dict(model.heads.named_children())) != ["head"]:
            raise UnsupportedModelError("torchvision ViT with a representation (pre-logits) layer is not supported")

    def restructure(self, model: nn.Module) -> None:
        for block in self.blocks(model):
            if isinstance(block.self_attention, nn.MultiheadAttention):
                block.self_attention = SplitAttention(block.self_attention)

    # -- where things are ----------------------------------------------------
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.encoder.layers)

    def parts(self, layer: nn.Module) -> dict[str, nn.Module]:
        at = layer.self_attention
        return {"norm1": layer.ln_1, "q": at.q_proj, "k": at.k_proj, "v": at.v_proj, "o": at.out_proj,
                "norm2": layer.ln_2, "fc1": layer.mlp[0], "act": layer.mlp[1], "fc2": layer.mlp[3]}

    def post_attn(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer.dropout(h)

    def post_mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer.mlp[4](h)  # the MLP's trailing dropout

    def num_heads(self, model: nn.Module) -> int:
        return self.blocks(model)[0].num_heads

    def patch_embed(self, model: nn.Module) -> nn.Module:
        return model.conv_proj

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.encoder.ln

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        return [("head", model.heads.head)]

    # -- running ---------------------------------------------------------------
    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        x = model._process_input(pixel_values)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return model.encoder.dropout(x + model.encoder.pos_embedding)

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.heads(model.encoder.ln(hidden)[:, 0])

    # -- shape facts -----------------------------------------------------------
    def head_dim(self, model: nn.Module) -> int:
        return model.hidden_dim // self.num_heads(model)

    def num_tokens(self, model: nn.Module) -> int:
        return model.seq_length
