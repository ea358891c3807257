"""Hugging Face ViT (``ViTForImageClassification``): the plain pre-norm ViT.

Everything is the HF default of :class:`HFPreNormAdapter`: dropout after each
branch (identity in eval), classifier on the CLS token.
"""

from __future__ import annotations

from .base import register_family
from .hf_common import HFPreNormAdapter


@register_family("vit")
class HFViT(HFPreNormAdapter):
    model_classes = ("ViTForImageClassification",)
    backbone_attr = "vit"
    tiny_classes = ("ViTConfig", "ViTForImageClassification")
