import pytest

from quant.families import UnsupportedModelError, family_of
from tests.conftest import tiny_model

BLOCK_ROLES = ["norm1", "q", "k", "v", "matmul_qk", "softmax", "matmul_av", "o", "residual_attn",
               "norm2", "fc1", "gelu", "fc2", "residual_mlp"]


def _names(family):
    model = tiny_model(family)
    sites = family_of(model).sites(model)
    return [s.name for s in sites], sites


def test_vit_site_names_exact():
    names, sites = _names("vit")
    assert names[:16] == [
        "vit.embeddings.patch_embeddings.projection",
        "vit.layers.0.layernorm_before",
        "vit.layers.0.attention.q_proj",
        "vit.layers.0.attention.k_proj",
        "vit.layers.0.attention.v_proj",
        "vit.layers.0.attention.matmul_qk",
        "vit.layers.0.attention.softmax",
        "vit.layers.0.attention.matmul_av",
        "vit.layers.0.attention.o_proj",
        "vit.layers.0.residual_attn",
        "vit.layers.0.layernorm_after",
        "vit.layers.0.mlp.fc1",
        "vit.layers.0.mlp.gelu",
        "vit.layers.0.mlp.fc2",
        "vit.layers.0.residual_mlp",
        "vit.layers.1.layernorm_before",
    ]
    assert names[-2:] == ["vit.layernorm", "classifier"]
    assert len(names) == 1 + 2 * 14 + 2


@pytest.mark.parametrize("family,prefix,heads", [("vit", "vit.layers", ["classifier"]),
                                                 ("deit", "deit.layers", ["cls_classifier", "distillation_classifier"]),
                                                 ("dinov2", "dinov2.encoder.layer", ["classifier"])])
def test_every_block_has_the_same_fourteen_sites(family, prefix, heads):
    names, sites = _names(family)
    for b in (0, 1):
        block = [s for s in sites if s.block == b]
        assert [s.role for s in block] == BLOCK_ROLES
        assert all(s.name.startswith(f"{prefix}.{b}.") for s in block)
    assert [s.name for s in sites if s.role == "head"] == heads
    kinds = [s.kind for s in sites]
    assert kinds.count("linear") == 2 * 6 + len(heads)
    assert kinds.count("residual") == 4 and kinds.count("conv") == 1


def test_dinov2_names():
    names, _ = _names("dinov2")
    assert "dinov2.encoder.layer.1.mlp.fc2" in names
    assert "dinov2.encoder.layer.1.norm2" in names
    assert "dinov2.encoder.layer.0.residual_attn" in names


def test_unsupported_model_named():
    from transformers import BeitConfig, BeitForImageClassification
    model = BeitForImageClassification(BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64, image_size=32, patch_size=8))
    with pytest.raises(UnsupportedModelError, match="BeitForImageClassification.*ViTForImageClassification"):
        family_of(model)
