"""Family adapters: each family's sites and forward, the registry, and a new family
added from outside the package with nothing but a decorated class."""

import pkgutil
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

import quant
import quant.families
from quant.calibrate import calibrate
from quant.families import (
    REGISTRY,
    SUPPORTED,
    FamilyAdapter,
    UnsupportedModelError,
    family_of,
    register_family,
    unregister_family,
)
from quant.families.hf_vit import HFViT
from quant.model import QuantModel
from quant.presets import preset
from tests.conftest import TINY, tiny_model

BUILTIN = ["DeiTForImageClassification", "DeiTForImageClassificationWithTeacher",
           "Dinov2ForImageClassification", "SwinForImageClassification", "ViTForImageClassification",
           "VisionTransformer"]
FAMILIES = ["deit", "dinov2", "swin", "torchvision_vit", "vit"]


def _deit_plain():
    torch.manual_seed(0)
    return DeiTForImageClassification(DeiTConfig(**TINY)).eval()


MODELS = {
    "vit": lambda: tiny_model("vit"),
    "deit_teacher": lambda: tiny_model("deit"),
    "deit": _deit_plain,
    # layer scale 0.5, not the default 1.0 (an identity): a forward without it must differ
    "dinov2": lambda: tiny_model("dinov2", layerscale_value=0.5),
}


# -- each family -----------------------------------------------------------------
@pytest.mark.parametrize("key,family,count,first,last_three", [
    ("vit", "vit", 31, "vit.embeddings.patch_embeddings.projection",
     [("blocks.1.residual_mlp", "residual"), ("norm", "layernorm"), ("head", "linear")]),
    ("deit_teacher", "deit", 32, "deit.embeddings.patch_embeddings.projection",
     [("norm", "layernorm"), ("head", "linear"), ("head_dist", "linear")]),
    ("deit", "deit", 31, "deit.embeddings.patch_embeddings.projection",
     [("blocks.1.residual_mlp", "residual"), ("norm", "layernorm"), ("head", "linear")]),
    ("dinov2", "dinov2", 31, "dinov2.embeddings.patch_embeddings.projection",
     [("blocks.1.residual_mlp", "residual"), ("norm", "layernorm"), ("head", "linear")]),
])
def test_sites_per_family(key, family, count, first, last_three):
    model = MODELS[key]()
    adapter = family_of(model)
    assert adapter.name == family
    sites = adapter.sites(model)
    assert len(sites) == count  # 1 conv + 2 blocks x 14 + final norm + head(s)
    assert (sites[0].name, sites[0].path, sites[0].kind, sites[0].role) == ("patch_embed", first, "conv", "patch_embed")
    assert [(s.name, s.kind) for s in sites[-3:]] == last_three
    assert [s.block for s in sites].count(None) == count - 28


@pytest.mark.parametrize("key", list(MODELS))
def test_instrumented_float_forward_matches_transformers(key, pixels):
    model = MODELS[key]()
    with torch.no_grad():
        reference = model(pixels).logits
    qm = QuantModel(model)
    assert torch.allclose(qm(pixels), reference, atol=1e-5)


@pytest.mark.parametrize("key", list(MODELS))
def test_every_slot_is_reached_once_per_forward(key, pixels):
    qm = QuantModel(MODELS[key]())
    calls = {tq.name: 0 for tq in qm.tensor_quantizers()}

    def count(tq, x, out):
        calls[tq.name] += 1
    for tq in qm.tensor_quantizers():
        tq.taps.append(count)
    qm(pixels)
    assert set(calls.values()) == {1}, {n: c for n, c in calls.items() if c != 1}


@pytest.mark.parametrize("key,tokens", [("vit", 17), ("deit_teacher", 18), ("deit", 18), ("dinov2", 17)])
def test_shape_facts_match_what_the_model_computes(key, tokens, pixels):
    model = MODELS[key]()
    qm = QuantModel(model)
    q_width = []
    qm.quantizers[next(s.name for s in qm.sites if s.kind == "matmul_qk")]["q"].taps.append(
        lambda tq, x, out: q_width.append(x.shape[-1]))
    hidden = qm.embed(pixels)
    qm.run_blocks(hidden)
    assert qm.head_dim == q_width[0] == TINY["hidden_size"] // TINY["num_attention_heads"]
    assert qm.family.num_tokens(model) == hidden.shape[1] == tokens
    assert qm.num_blocks == qm.family.num_blocks(model) == TINY["num_hidden_layers"]


def test_deit_teacher_head_averages_its_two_heads(pixels):
    model = tiny_model("deit")
    qm = QuantModel(model)
    with torch.inference_mode():
        seq = model.deit.layernorm(qm.run_blocks(qm.embed(pixels)))
        cls_only = model.cls_classifier(seq[:, 0])
        dist_only = model.distillation_classifier(seq[:, 1])
        logits = qm(pixels)
    assert torch.allclose(logits, (cls_only + dist_only) / 2)
    assert not torch.allclose(logits, cls_only)


# -- registry --------------------------------------------------------------------
class RenamedViT(ViTForImageClassification):
    """A ViT under a class name no family claims."""


def _renamed():
    torch.manual_seed(0)
    return RenamedViT(ViTConfig(**TINY)).eval()


def test_registry_rejects_an_unknown_class_with_the_supported_list():
    with pytest.raises(UnsupportedModelError) as e:
        family_of(_renamed())
    assert str(e.value) == f"unsupported model class RenamedViT; vitq supports: {', '.join(BUILTIN)}"


def test_dinov2_swiglu_is_refused():
    with pytest.raises(UnsupportedModelError, match="SwiGLU"):
        family_of(tiny_model("dinov2", use_swiglu_ffn=True))


def test_every_module_of_the_package_is_imported_and_builtins_registered():
    modules = [m.name for m in pkgutil.iter_modules(quant.families.__path__)]
    assert {"base", "prenorm", "hf_common", "hf_vit", "deit", "dinov2", "swin", "torchvision_vit"} <= set(modules)
    assert all(f"quant.families.{m}" in sys.modules for m in modules)
    assert sorted(REGISTRY) == FAMILIES
    assert SUPPORTED == BUILTIN
    assert all(issubclass(a, FamilyAdapter) for a in REGISTRY.values())


def test_register_refuses_a_taken_name_or_class():
    with pytest.raises(ValueError, match="family 'vit' is already registered"):
        register_family("vit")(type("Again", (HFViT,), {}))
    with pytest.raises(ValueError, match="ViTForImageClassification is already handled by family 'vit'"):
        register_family("vit2")(type("Again", (HFViT,), {}))
    assert sorted(REGISTRY) == FAMILIES


def test_quant_imports_nothing_above_it():
    root = Path(quant.__file__).parent
    files = list(root.rglob("*.py"))
    upward = re.compile(r"^\s*(from|import)\s+(analysis|reports|vitq)\b", re.M)
    assert len(files) > 10
    assert [str(f.relative_to(root)) for f in files if upward.search(f.read_text())] == []


# -- a new family is one file: this test module plays that file ---------------------
@pytest.fixture
def renamed_family():
    """What a new ``quant/families/<name>.py`` would contain, registered for one test."""
    @register_family("renamed_vit")
    class RenamedViTAdapter(HFViT):
        model_classes = ("RenamedViT",)

    yield RenamedViTAdapter
    unregister_family("renamed_vit")


def test_a_family_registered_from_outside_runs_in_quantmodel(renamed_family, pixels):
    model = _renamed()
    with torch.no_grad():
        reference = model(pixels).logits
    qm = QuantModel(model)
    assert isinstance(qm.family, renamed_family) and qm.family.name == "renamed_vit"
    assert "RenamedViT" in SUPPORTED
    assert [s.name for s in qm.sites] == [s.name for s in QuantModel(tiny_model("vit")).sites]
    assert torch.allclose(qm(pixels), reference, atol=1e-5)
    calibrate(qm, [pixels], progress=False)
    qm.apply(preset("all", qm.sites))
    quantized = qm(pixels)
    assert not torch.equal(quantized, reference)
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0) > 0.9


def test_unregistering_restores_the_registry(renamed_family):
    unregister_family("renamed_vit")
    assert "RenamedViT" not in SUPPORTED
    with pytest.raises(UnsupportedModelError):
        family_of(_renamed())
    register_family("renamed_vit")(renamed_family)  # so the fixture's teardown finds it
