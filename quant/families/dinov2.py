"""DINOv2 (``Dinov2ForImageClassification``) with the GELU MLP.

Blocks scale each branch (layer_scale) and apply drop_path before the residual
add; the classifier reads CLS concatenated with the mean of the patch tokens.
The SwiGLU MLP variant has no ``fc1``/GELU/``fc2`` sites and is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import UnsupportedModelError, register_family
from .hf_common import HFPreNormAdapter


@register_family("dinov2")
class Dinov2(HFPreNormAdapter):
    model_classes = ("Dinov2ForImageClassification",)
    backbone_attr = "dinov2"
    layers_paths = ("encoder.layer",)
    norm1, norm2 = "norm1", "norm2"
    tiny_classes = ("Dinov2Config", "Dinov2ForImageClassification")
    tiny_defaults = {"layerscale_value": 0.5}  # not 1.0 (an identity): a forward without it must differ

    def check(self, model: nn.Module) -> None:
        if getattr(model.config, "use_swiglu_ffn", False):
            raise UnsupportedModelError("DINOv2 with a SwiGLU MLP is not supported (only GELU MLPs)")

    def post_attn(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer.drop_path(layer.layer_scale1(h))

    def post_mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer.drop_path(layer.layer_scale2(h))

    def classify(self, model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
        return model.classifier(torch.cat([seq[:, 0], seq[:, 1:].mean(dim=1)], dim=1))
