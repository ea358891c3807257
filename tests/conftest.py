"""Shared fixtures: tiny models built from configs, the optional ../shared material."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "dinov2-s14-in1k-probe"
SHARED_DATA = SHARED / "data" / "imagenet-mini"

needs_shared = pytest.mark.skipif(
    not (SHARED_MODEL.is_dir() and SHARED_DATA.is_dir()),
    reason="../shared (real DINOv2 probe + ImageNet images) is absent in this clone",
)

@pytest.fixture(autouse=True, scope="session")
def _decode_cache(tmp_path_factory):
    """Decoded crops of the test images go to a temporary folder (subprocesses inherit it),
    never into the user's ~/.cache."""
    import os

    os.environ["VITQ_DECODE_CACHE"] = str(tmp_path_factory.mktemp("decoded"))
    yield


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=5, attn_implementation="eager")


def tiny_model(family: str = "vit", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if family == "vit":
        return ViTForImageClassification(ViTConfig(**kw)).eval()
    if family == "deit":
        return DeiTForImageClassificationWithTeacher(DeiTConfig(**kw)).eval()
    if family == "dinov2":
        return Dinov2ForImageClassification(Dinov2Config(**kw)).eval()
    raise ValueError(family)


# tiny Swin: 8x8 patch grid, two stages (2 blocks each) joined by a patch merging; window 2
# gives shifted windows with the shift mask in the odd blocks
TINY_SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2,
                 num_labels=5)
# tiny torchvision ViT of TINY's depth and width (its sites carry the same canonical names)
TINY_TV = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)


def tiny_swin(seed: int = 0, **overrides):
    """A random tiny Swin with a random (not zero) relative position bias, so a forward
    that dropped it would differ."""
    torch.manual_seed(seed)
    model = SwinForImageClassification(SwinConfig(**{**TINY_SWIN, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1)
    return model


def tiny_torchvision_vit(seed: int = 0, **overrides):
    tv = pytest.importorskip("torchvision", reason="torchvision is not installed (CI's CPU torch has none)")
    torch.manual_seed(seed)
    model = tv.models.vision_transformer.VisionTransformer(**{**TINY_TV, **overrides}).eval()
    with torch.no_grad():  # torchvision zero-initialises the head: every image would get the same logits
        model.heads.head.weight.normal_(0, 0.5)
    return model


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
