"""Per-family knowledge of Hugging Face ViT-style classifiers (ViT, DeiT, DINOv2).

transformers does not expose residual additions or the attention matmuls as
modules, so each family says where its blocks, norms and heads are and how a block
post-processes each branch. The quantized model (``quant.model``) uses this to run
the same maths as transformers' eager path with quantization points in between.
Written against transformers 5.x module names (``q_proj``, ``mlp.fc2``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Branch = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Head = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Family:
    name: str
    model_classes: tuple[str, ...]
    backbone: str  # attribute of the classifier holding the backbone
    layers: str  # dotted path of the block ModuleList inside the backbone
    norm1: str
    norm2: str
    post_attn: Branch  # what a block does to the attention output before the residual add
    post_mlp: Branch
    head: Head  # final-norm output -> logits

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, self.backbone).get_submodule(self.layers)


def _dropout(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return layer.dropout(h)


def _cls_head(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    return model.classifier(seq[:, 0, :])


def _deit_teacher_head(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    # DeiT with distillation averages its CLS and distillation-token heads at inference.
    return (model.cls_classifier(seq[:, 0, :]) + model.distillation_classifier(seq[:, 1, :])) / 2


def _dinov2_head(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    return model.classifier(torch.cat([seq[:, 0], seq[:, 1:].mean(dim=1)], dim=1))


FAMILIES = (
    Family("vit", ("ViTForImageClassification",), "vit", "layers", "layernorm_before", "layernorm_after",
           _dropout, _dropout, _cls_head),
    Family("deit", ("DeiTForImageClassification",), "deit", "layers", "layernorm_before", "layernorm_after",
           _dropout, _dropout, _cls_head),
    Family("deit", ("DeiTForImageClassificationWithTeacher",), "deit", "layers", "layernorm_before",
           "layernorm_after", _dropout, _dropout, _deit_teacher_head),
    Family("dinov2", ("Dinov2ForImageClassification",), "dinov2", "encoder.layer", "norm1", "norm2",
           lambda layer, h: layer.drop_path(layer.layer_scale1(h)),
           lambda layer, h: layer.drop_path(layer.layer_scale2(h)),
           _dinov2_head),
)

SUPPORTED = sorted({c for f in FAMILIES for c in f.model_classes})


class UnsupportedModelError(ValueError):
    """The model is not one of the ViT-family classifiers vitq knows how to quantize."""


def family_of(model: nn.Module) -> Family:
    cls = type(model).__name__
    for family in FAMILIES:
        if cls in family.model_classes:
            if getattr(model.config, "use_swiglu_ffn", False):
                raise UnsupportedModelError("DINOv2 with a SwiGLU MLP is not supported (only GELU MLPs)")
            return family
    raise UnsupportedModelError(
        f"unsupported model class {cls}; vitq supports: {', '.join(SUPPORTED)}"
    )
