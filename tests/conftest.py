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


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
