"""`vitq export --to modelopt` (vitq/targets/modelopt.py): ModelOpt's quant_cfg on INT8_DEFAULT_CFG
naming the quantizers mtq.quantize inserts in this model, the sites it cannot carry listed with the
reason read from its placement, and mtq.quantize, given the config, quantizes exactly the sites it
was told to. Skips where nvidia-modelopt is absent (the `modelopt` extra, its own venv)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from quant.config import QuantConfig
from tests.test_targets import FLOAT_SITES, plan_context
from vitq.targets import EXCLUDE, NONE, QUANTIZE, TargetError, get_target
from vitq.targets.modelopt import disabling_entry

needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason="nvidia-modelopt is not installed (pip install 'vitq[modelopt]')")

# the tests' plan with ModelOpt's symmetric activations
PLAN = QuantConfig.from_dict({"name": "plan", "float_sites": list(FLOAT_SITES),
                              "activation": {"bits": 8, "symmetric": True, "observer": "minmax"}})
# the tiny HF ViT's module paths (transformers 5.x), written out
BLOCK = ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"]


def test_the_base_entry_that_switches_a_quantizer_off_is_found():
    base = [{"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
            {"quantizer_name": "*lm_head*", "enable": False},
            {"quantizer_name": "*", "parent_class": "nn.BatchNorm2d", "enable": False}]
    assert disabling_entry(base, "lm_head.weight_quantizer") == "*lm_head*"
    assert disabling_entry(base, "fc1.weight_quantizer") is None  # switched on again
    assert disabling_entry(base, "fc1.output_quantizer") == "*"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed (pip install 'vitq[modelopt]')")
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the module paths written out here are transformers 5.x's")
    ctx = plan_context(tmp_path_factory.mktemp("modelopt"), PLAN)
    return ctx, get_target("modelopt").export(ctx)


def entries(export, enable: bool) -> list[str]:
    """The quantizer names the plan's entries (after INT8_DEFAULT_CFG's) switch on / off."""
    plan = export.arguments["config"]["quant_cfg"][-export.arguments["plan_entries"]:]
    return [e["quantizer_name"] for e in plan if ("cfg" in e) == enable]


@needs_modelopt
def test_the_config_switches_off_the_float_q_projection_and_the_layernorm_inputs(exported):
    _, export = exported
    assert entries(export, False) == ["vit.layers.0.attention.q_proj.input_quantizer",
                                      "vit.layers.0.attention.q_proj.weight_quantizer",
                                      "vit.layernorm.input_quantizer",
                                      "vit.layers.0.layernorm_after.input_quantizer",
                                      "vit.layers.0.layernorm_before.input_quantizer",
                                      "vit.layers.1.layernorm_after.input_quantizer",
                                      "vit.layers.1.layernorm_before.input_quantizer"]
    # both int8 matmul_qk sites: the attention's q/k bmm quantizers, which the base leaves off
    assert entries(export, True) == [f"vit.layers.{b}.attention.{q}_bmm_quantizer" for b in (0, 1) for q in "qk"]
    assert export.names(EXCLUDE) == ["vit.layers.0.attention.q_proj"]
    assert export.names(QUANTIZE) == (["vit.embeddings.patch_embeddings.projection"]
                                      + [f"vit.layers.0.{m}" for m in BLOCK[1:3]] + ["vit.layers.0.attention"]
                                      + [f"vit.layers.0.{m}" for m in BLOCK[3:]]
                                      + [f"vit.layers.1.{m}" for m in BLOCK[:3]] + ["vit.layers.1.attention"]
                                      + [f"vit.layers.1.{m}" for m in BLOCK[3:]] + ["classifier"])


@needs_modelopt
def test_sites_modelopt_cannot_carry_are_listed_with_the_reason(exported):
    _, export = exported
    lost = {r.site: r for r in export.unmatched()}
    assert sorted(lost) == sorted(["blocks.0.attn.matmul_av", "blocks.0.residual_attn", "blocks.0.residual_mlp",
                                   "blocks.1.residual_mlp"])
    assert all(r.action == NONE and r.reason.startswith("no counterpart") for r in lost.values())
    assert "p_bmm_quantizer" in lost["blocks.0.attn.matmul_av"].reason
    assert "no amax" in lost["blocks.0.attn.matmul_av"].reason
    assert "QuantLinear" in lost["blocks.0.residual_attn"].reason


@needs_modelopt
def test_mtq_quantize_with_the_config_quantizes_what_it_was_told(exported, tmp_path):
    ctx, export = exported
    applied = get_target("modelopt").apply(export, ctx, tmp_path)
    assert sorted(applied.int8_sites) == sorted(r.site for r in export.rows if r.action == QUANTIZE)
    assert applied.detail["quantizers_on"] == applied.detail["quantizers_calibrated_on"] == 2 * 13 + 2 * 2
    ctx.qmodel.apply(None)
    x = ctx.calibration[1]
    ref = ctx.qmodel(x)
    with torch.no_grad():
        out = applied.model(x)
    assert out.shape == ref.shape and not torch.equal(out, ref)  # quantized, not the float model
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()


@needs_modelopt
def test_asymmetric_activations_are_refused_in_one_line(tmp_path):
    from tests.test_targets import PLAN as ASYMMETRIC
    ctx = plan_context(tmp_path, ASYMMETRIC)
    with pytest.raises(TargetError, match="symmetric activations") as e:
        get_target("modelopt").export(ctx)
    assert "\n" not in str(e.value)
