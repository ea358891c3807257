"""Family adapters: each family's sites and forward, the registry, and a new family
added from outside the package with nothing but a decorated class."""

import pkgutil
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

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
from quant.sites import BLOCK_ROLES
from tests.conftest import TINY, tiny_model

# every registered family, each with its tiny model: a new family file is tested here as is
FAMILIES = sorted(REGISTRY)
# the helper modules of the package: every other module must register a family
HELPERS = {"base", "prenorm", "hf_common", "hf_loading", "timm_common"}
MODELS = {
    **{name: (lambda name=name: tiny_model(name)) for name in FAMILIES},
    "deit_plain": lambda: tiny_model("deit", teacher=False),
}


def _logits(out):
    return getattr(out, "logits", out)  # transformers' output object, or torchvision's tensor


# -- each family -----------------------------------------------------------------
@pytest.mark.parametrize("key,family,count,first,last_three", [
    ("vit", "vit", 31, "vit.embeddings.patch_embeddings.projection",
     [("blocks.1.residual_mlp", "residual"), ("norm", "layernorm"), ("head", "linear")]),
    ("deit", "deit", 32, "deit.embeddings.patch_embeddings.projection",
     [("norm", "layernorm"), ("head", "linear"), ("head_dist", "linear")]),
    ("deit_plain", "deit", 31, "deit.embeddings.patch_embeddings.projection",
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
def test_tiny_model_is_handled_by_its_family(key):
    model = MODELS[key]()
    assert family_of(model).name == key.split("_plain")[0]
    cls = type(model)
    assert cls.__name__ in SUPPORTED or f"{cls.__module__}.{cls.__qualname__}" in SUPPORTED


@pytest.mark.parametrize("key", list(MODELS))
def test_instrumented_float_forward_matches_the_library(key, pixels):
    model = MODELS[key]()
    with torch.no_grad():
        reference = _logits(model(pixels))  # the library's own forward, before any restructuring
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


@pytest.mark.parametrize("key", list(MODELS))
def test_every_block_has_the_14_block_sites_and_restarts_anywhere(key, pixels):
    qm = QuantModel(MODELS[key]())
    for b in range(qm.num_blocks):
        assert [s.role for s in qm.sites if s.block == b and s.role in BLOCK_ROLES] == list(BLOCK_ROLES)
    with torch.inference_mode():
        hidden = [qm.embed(pixels)]
        for b in range(qm.num_blocks):
            hidden.append(qm.run_blocks(hidden[-1], b, b + 1))
        assert torch.equal(qm.head(hidden[-1]), qm(pixels))
        assert torch.equal(qm.run_blocks(hidden[1], 1), hidden[-1])  # a restart at block 1


@pytest.mark.parametrize("key", list(MODELS))
def test_shape_facts_match_what_the_model_computes(key, pixels):
    model = MODELS[key]()
    qm = QuantModel(model)
    q_width = []
    qm.quantizers[next(s.name for s in qm.sites if s.kind == "matmul_qk")]["q"].taps.append(
        lambda tq, x, out: q_width.append(x.shape[-1]))
    hidden = qm.embed(pixels)
    qm.run_blocks(hidden)
    assert qm.head_dim == q_width[0]
    assert qm.family.num_tokens(model) == hidden.shape[1]
    assert qm.num_blocks == len({s.block for s in qm.sites if s.role in BLOCK_ROLES})


@pytest.mark.parametrize("key,tokens", [("vit", 17), ("deit", 18), ("deit_plain", 18), ("dinov2", 17),
                                        ("swin", 64), ("torchvision_vit", 17)])
def test_tokens_and_head_width_by_hand(key, tokens, pixels):
    """32 px in 8 px patches: 16 patches + CLS (+ distillation token); Swin: 8x8 patches of 4 px."""
    model = MODELS[key]()
    qm = QuantModel(model)
    assert qm.family.num_tokens(model) == tokens
    width = 16 if key == "swin" else TINY["hidden_size"]  # Swin: stage 0's embed_dim
    assert qm.head_dim == width // 2  # 2 heads


@pytest.mark.parametrize("key", list(MODELS))
def test_quantized_all_differs_from_float_and_float_comes_back(key, pixels):
    model = MODELS[key]()
    with torch.no_grad():
        reference = _logits(model(pixels))
    qm = QuantModel(model)
    calibrate(qm, [pixels], progress=False)
    qm.apply(preset("all", qm.sites))
    assert (qm(pixels) - reference).abs().max() > 1e-3
    qm.apply(None)
    assert torch.allclose(qm(pixels), reference, atol=1e-5)


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
    assert str(e.value) == f"unsupported model class RenamedViT; vitq supports: {', '.join(SUPPORTED)}"
    assert SUPPORTED == sorted(SUPPORTED) and {"ViTForImageClassification", "DeiTForImageClassification",
                                                "DeiTForImageClassificationWithTeacher", "VisionTransformer",
                                                "Dinov2ForImageClassification", "SwinForImageClassification"
                                                } <= set(SUPPORTED)


def test_dinov2_swiglu_is_refused():
    with pytest.raises(UnsupportedModelError, match="SwiGLU"):
        family_of(tiny_model("dinov2", use_swiglu_ffn=True))


def test_every_module_of_the_package_is_imported_and_registers_a_family():
    modules = {m.name for m in pkgutil.iter_modules(quant.families.__path__)}
    assert {"hf_vit", "deit", "dinov2", "swin", "torchvision_vit", "timm_vit", "timm_swin"} <= modules
    assert HELPERS <= modules
    assert all(f"quant.families.{m}" in sys.modules for m in modules)
    assert {a.__module__ for a in REGISTRY.values()} == {f"quant.families.{m}" for m in modules - HELPERS}
    assert {"vit", "deit", "dinov2", "swin", "torchvision_vit"} <= set(REGISTRY)
    assert all(issubclass(a, FamilyAdapter) for a in REGISTRY.values())


def test_register_refuses_a_taken_name_or_class():
    before = sorted(REGISTRY)
    with pytest.raises(ValueError, match="family 'vit' is already registered"):
        register_family("vit")(type("Again", (HFViT,), {}))
    with pytest.raises(ValueError, match="ViTForImageClassification is already handled by family 'vit'"):
        register_family("vit2")(type("Again", (HFViT,), {}))
    assert sorted(REGISTRY) == before


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
