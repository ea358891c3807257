"""`vitq export --to litert` (vitq/targets/litert.py): an AI Edge Quantizer recipe naming, by
their scopes in the .tflite that litert_torch converts from this model, the ops of the plan's
int8 sites (quantized) and of its float sites (no_quantize); ai-edge-quantizer, given the
recipe, quantizes exactly the ops it was told to. The graph walk is tested on a hand-built
graph everywhere; the rest skips where the LiteRT stack is absent (the `litert` extra, its own
venv)."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

from tests.test_targets import PLAN, plan_context
from vitq.targets import EXCLUDE, QUANTIZE, TargetError, get_target
from vitq.targets.litert import Graph, one

missing = [m for m in ("litert_torch", "ai_edge_quantizer", "ai_edge_litert") if importlib.util.find_spec(m) is None]
needs_litert = pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed (pip install "
                                                        f"'vitq[litert]')")


def test_the_walk_passes_layout_ops_and_a_constant_scale_but_stops_at_compute():
    # 0: FC(x=t0, w=t9) -> t1; 1: RESHAPE(t1, shape=t8) -> t2; 2: MUL(t2, const t7) -> t3 (LayerScale);
    # 3: ADD(t3, t0) -> t4 (the residual); 4: MUL(t4, t4) -> t5 (two activations: compute)
    g = Graph(["FULLY_CONNECTED", "RESHAPE", "MUL", "ADD", "MUL"], [[0, 9], [1, 8], [2, 7], [3, 0], [4, 4]],
              [[1], [2], [3], [4], [5]], ["fc;", "r;", "scale;", "add;", "sq;"],
              {9: np.ones((2, 2)), 8: np.array([2]), 7: np.array(0.5)})
    assert g.forward(0) == {3} and g.forward(3) == {4}
    assert g.back(2) == {0} and g.back(3) == {2}  # a MUL is compute going back
    assert g.activations(0) == [0] and g.regex(3) == "^add;$"
    with pytest.raises(TargetError, match="2 ops of the converted .tflite are x; expected one"):
        one({1, 2}, "x")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install 'vitq[litert]')")
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the converter scopes written out here are transformers 5.x's")
    ctx = plan_context(tmp_path_factory.mktemp("litert"))
    return ctx, get_target("litert").export(ctx)


@needs_litert
def test_the_recipe_excludes_exactly_the_float_sites_ops(exported):
    _, export = exported
    recipe = export.arguments["recipe"]
    excluded = [(e["operation"], e["algorithm_key"]) for e in recipe if e["algorithm_key"] == "no_quantize"]
    # in site order: norm1, q, softmax, norm2, gelu of block 0; norm1, softmax, matmul_av, residual_attn,
    # norm2, gelu of block 1; the final norm (LayerNorm's output: the ADD of its shift)
    assert [op for op, _ in excluded] == ["ADD", "FULLY_CONNECTED", "SOFTMAX", "ADD", "GELU", "ADD", "SOFTMAX",
                                          "BATCH_MATMUL", "ADD", "ADD", "GELU", "ADD"]
    rows = {r.site: r for r in export.rows}
    assert "Linear_q_proj" in rows["blocks.0.attn.q"].name and "ViTLayer_0" in rows["blocks.0.attn.q"].name
    assert "ViTLayer_1" in rows["blocks.1.attn.matmul_av"].name and "ViTLayer_1" in rows["blocks.1.residual_attn"].name
    assert [r.site for r in export.rows if r.action == EXCLUDE and r.kind not in ("layernorm", "gelu", "softmax")] == \
        ["blocks.0.attn.q", "blocks.1.attn.matmul_av", "blocks.1.residual_attn"]
    assert len(recipe) == len(export.rows) and not export.unmatched()  # every site has its op; nothing else named
    assert all(e["op_config"]["activation_tensor_config"]["symmetric"] is False for e in recipe if "op_config" in e)


@needs_litert
def test_each_regex_selects_one_op_of_the_float_tflite(exported):
    from vitq.targets.litert import Graph as G
    ctx, export = exported
    graph = G.read(export.files["fp32_tflite"])
    for e in export.arguments["recipe"]:
        assert sum(bool(re.search(e["regex"], s)) for s in graph.scopes) == 1, e["regex"]
    assert [r.reason.split(" (")[0] for r in export.rows if r.site in ("blocks.0.residual_attn", "head")] == \
        ["LiteRT's int8 ADD also reads int8 inputs", "LiteRT's int8 FULLY_CONNECTED also writes an int8 output"]


@needs_litert
def test_the_quantizer_with_the_recipe_quantizes_what_it_was_told(exported, tmp_path):
    import torch

    from vitq.targets.litert import LiteRtRunner
    ctx, export = exported
    applied = get_target("litert").apply(export, ctx, tmp_path)
    assert sorted(applied.int8_sites) == sorted(r.site for r in export.rows if r.action == QUANTIZE)
    ctx.qmodel.apply(None)
    x = ctx.calibration[1]
    ref, out = ctx.qmodel(x), LiteRtRunner(applied.model, 1)(x)
    assert out.shape == ref.shape and not torch.equal(out, ref)  # quantized, not the float model
    assert (out - ref).abs().max() < 0.3 * ref.abs().max()


@needs_litert
def test_symmetric_activations_are_refused_in_one_line(tmp_path):
    from quant.config import QuantConfig
    symmetric = QuantConfig.from_dict({**PLAN.to_dict(), "activation": {"bits": 8, "symmetric": True}})
    ctx = plan_context(tmp_path, symmetric)
    with pytest.raises(TargetError, match="asymmetric activations") as e:
        get_target("litert").export(ctx)
    assert "\n" not in str(e.value)


@needs_litert
def test_a_layernorm_scale_folded_into_the_weights_is_resolved_and_said(tmp_path):
    import torch

    from quant.calibrate import calibrate
    from quant.model import QuantModel
    from tests.conftest import tiny_model
    from vitq.targets import ExportContext
    model = tiny_model("vit")
    with torch.no_grad():  # LayerNorm scales other than one: the converter folds them into q/k/v and fc1
        for i, m in enumerate(x for x in model.modules() if isinstance(x, torch.nn.LayerNorm)):
            m.weight.copy_(torch.linspace(0.5, 1.5, m.weight.numel()) * (1 + i))
    qm = QuantModel(model)
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibrate(qm, calib, progress=False)
    export = get_target("litert").export(ExportContext(qm, PLAN, tmp_path, calib[0][:1], calib))
    folded = [r.site for r in export.rows if "folds LayerNorm" in r.reason]
    # blocks.0.attn.q is float in the plan: its row says nothing, its op is still found (no_quantize)
    assert folded == ["blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.mlp.fc1",
                      "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.mlp.fc1"]
    assert "blocks.0.norm1" in export.rows[[r.site for r in export.rows].index("blocks.0.attn.k")].reason
    assert [r.action for r in export.rows if r.site == "blocks.0.attn.q"] == [EXCLUDE]
