"""Shared fixtures: tiny models built from configs, the optional ../shared material."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quant.families import REGISTRY
from quant.families.hf_common import TINY  # noqa: F401  (the tests' tiny HF config)
from quant.families.torchvision_vit import TINY as TINY_TV  # noqa: F401

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


def tiny_model(family: str = "vit", seed: int = 0, **overrides):
    """The registered family's tiny random model (``FamilyAdapter.tiny``); the test skips,
    with the reason, when the library the family needs is not installed."""
    try:
        return REGISTRY[family].tiny(seed, **overrides)
    except ModuleNotFoundError as e:
        pytest.skip(f"family {family}: {e.name} is not installed")


def tiny_swin(seed: int = 0, **overrides):
    return tiny_model("swin", seed, **overrides)


def tiny_torchvision_vit(seed: int = 0, **overrides):
    return tiny_model("torchvision_vit", seed, **overrides)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
