"""DeiT (``DeiTForImageClassification`` and ``...WithTeacher``).

Same blocks as ViT; the sequence has a distillation token after CLS, and the
distilled classifier has two heads whose logits it averages at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_family
from .hf_common import TINY, HFPreNormAdapter


@register_family("deit")
class DeiT(HFPreNormAdapter):
    model_classes = ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")
    backbone_attr = "deit"
    special_tokens = 2  # CLS + distillation
    # the distilled classifier's heads, named as timm names them
    head_names = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
    tiny_classes = ("DeiTConfig", "DeiTForImageClassificationWithTeacher")  # both heads: the harder case

    @classmethod
    def tiny(cls, seed: int = 0, teacher: bool = True, **overrides) -> nn.Module:
        """The distilled classifier (two heads), or with ``teacher=False`` the plain one."""
        import transformers

        model_class = (transformers.DeiTForImageClassificationWithTeacher if teacher
                       else transformers.DeiTForImageClassification)
        torch.manual_seed(seed)
        return model_class(transformers.DeiTConfig(**{**TINY, **overrides})).eval()

    def classify(self, model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
        if hasattr(model, "distillation_classifier"):  # ...WithTeacher
            return (model.cls_classifier(seq[:, 0, :]) + model.distillation_classifier(seq[:, 1, :])) / 2
        return model.classifier(seq[:, 0, :])
