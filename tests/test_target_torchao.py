"""`vitq export --to torchao` (vitq/targets/torchao.py): module FQNs from torch.export's graph for
X86InductorQuantizer, the sites its Linear/Conv recipe cannot carry listed with the reason, and
PT2E, given the names, quantizes exactly the plan's int8 Linear/Conv sites."""

from __future__ import annotations

import pytest

pytest.importorskip("torchao", reason="torchao is not installed (pip install 'vitq[int8]')")

from tests.test_targets import plan_context  # noqa: E402
from vitq.targets import EXCLUDE, NONE, QUANTIZE, get_target  # noqa: E402

# the tiny HF ViT's module paths (transformers 5.x), written out
LINEARS = [f"vit.layers.{b}.{m}" for b in (0, 1) for m in ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                                                          "attention.o_proj", "mlp.fc1", "mlp.fc2")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the module paths written out here are transformers 5.x's")
    ctx = plan_context(tmp_path_factory.mktemp("torchao"))
    return ctx, get_target("torchao").export(ctx)


def test_module_names_for_the_float_and_int8_linears(exported):
    _, export = exported
    assert export.arguments["float_modules"] == ["vit.layers.0.attention.q_proj"]
    assert export.names(QUANTIZE) == (["vit.embeddings.patch_embeddings.projection"] + LINEARS[1:] + ["classifier"])
    assert export.arguments["module_types"] == ["torch.nn.Linear", "torch.nn.Conv2d"]


def test_matmuls_and_residual_adds_have_no_counterpart(exported):
    _, export = exported
    lost = {r.site: r for r in export.unmatched()}
    assert sorted(lost) == sorted(["blocks.0.attn.matmul_qk", "blocks.0.attn.matmul_av", "blocks.1.attn.matmul_qk",
                                   "blocks.0.residual_attn", "blocks.0.residual_mlp", "blocks.1.residual_mlp"])
    assert all(r.action == NONE and r.reason.startswith("no counterpart") for r in lost.values())
    assert "no module of its own" in lost["blocks.0.attn.matmul_qk"].reason
    assert {r.action for r in export.rows if r.kind in ("layernorm", "gelu", "softmax")} == {NONE}
    assert [r.site for r in export.rows if r.action == EXCLUDE] == ["blocks.0.attn.q"]


def test_pt2e_with_the_names_quantizes_the_told_linears(exported, tmp_path):
    import torch
    ctx, export = exported
    applied = get_target("torchao").apply(export, ctx, tmp_path)
    assert sorted(applied.int8_sites) == sorted(r.site for r in export.rows if r.action == QUANTIZE)
    ctx.qmodel.apply(None)
    with torch.no_grad():
        x = ctx.calibration[1]
        ref, out = ctx.qmodel(x), applied.model(x)
    assert out.shape == ref.shape and not torch.equal(out, ref)  # quantized, not the float model
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()
