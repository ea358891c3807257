import pytest

from quant.families import UnsupportedModelError, family_of
from quant.sites import BLOCK_ROLES
from tests.conftest import tiny_model


def _names(family):
    model = tiny_model(family)
    sites = family_of(model).sites(model)
    return [s.name for s in sites], sites


def test_vit_site_names_exact():
    names, sites = _names("vit")
    assert names[:16] == [
        "patch_embed",
        "blocks.0.norm1",
        "blocks.0.attn.q",
        "blocks.0.attn.k",
        "blocks.0.attn.v",
        "blocks.0.attn.matmul_qk",
        "blocks.0.attn.softmax",
        "blocks.0.attn.matmul_av",
        "blocks.0.attn.o",
        "blocks.0.residual_attn",
        "blocks.0.norm2",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.gelu",
        "blocks.0.mlp.fc2",
        "blocks.0.residual_mlp",
        "blocks.1.norm1",
    ]
    assert names[-2:] == ["norm", "head"]
    assert len(names) == 1 + 2 * 14 + 2


def test_vit_module_paths_on_transformers_5():
    """``Site.path``: where each site lives in the installed transformers (5.x here)."""
    _, sites = _names("vit")
    paths = {s.name: s.path for s in sites}
    assert paths["patch_embed"] == "vit.embeddings.patch_embeddings.projection"
    assert paths["blocks.1.attn.q"] in ("vit.layers.1.attention.q_proj",  # 5.x
                                        "vit.encoder.layer.1.attention.attention.query")  # 4.x
    assert paths["blocks.1.mlp.fc2"] in ("vit.layers.1.mlp.fc2", "vit.encoder.layer.1.output.dense")
    assert paths["blocks.1.attn.matmul_qk"] in ("vit.layers.1.attention.matmul_qk",
                                                "vit.encoder.layer.1.attention.attention.matmul_qk")
    assert paths["blocks.1.residual_mlp"] in ("vit.layers.1.residual_mlp", "vit.encoder.layer.1.residual_mlp")
    assert paths["norm"] == "vit.layernorm" and paths["head"] == "classifier"


@pytest.mark.parametrize("family,heads", [("vit", ["head"]), ("deit", ["head", "head_dist"]), ("dinov2", ["head"])])
def test_every_block_has_the_same_fourteen_sites(family, heads):
    names, sites = _names(family)
    for b in (0, 1):
        block = [s for s in sites if s.block == b]
        assert [s.role for s in block] == list(BLOCK_ROLES)
        assert all(s.name.startswith(f"blocks.{b}.") for s in block)
    assert [s.name for s in sites if s.role == "head"] == heads
    kinds = [s.kind for s in sites]
    assert kinds.count("linear") == 2 * 6 + len(heads)
    assert kinds.count("residual") == 4 and kinds.count("conv") == 1


def test_same_architecture_same_names_across_hf_families():
    """ViT, DeiT and DINOv2 blocks carry the same canonical names; only paths differ."""
    vit, _ = _names("vit")
    dinov2, dsites = _names("dinov2")
    assert vit == dinov2
    paths = {s.name: s.path for s in dsites}
    assert paths["blocks.1.norm2"] == "dinov2.encoder.layer.1.norm2"
    assert paths["blocks.1.mlp.fc2"] == "dinov2.encoder.layer.1.mlp.fc2"


def test_unsupported_model_named():
    from transformers import BeitConfig, BeitForImageClassification
    model = BeitForImageClassification(BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64, image_size=32, patch_size=8))
    with pytest.raises(UnsupportedModelError, match="BeitForImageClassification.*ViTForImageClassification"):
        family_of(model)
