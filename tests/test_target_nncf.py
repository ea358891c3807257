"""`vitq export --to nncf` (vitq/targets/nncf.py): an IgnoredScope of OpenVINO operation names
read from the converted model, the sites NNCF never quantizes listed with the reason, and
nncf.quantize, given the scope, quantizes exactly the sites it was told to. Skips where
nncf/openvino are absent (the `peers` extra; CI installs only the `test` extra)."""

from __future__ import annotations

import importlib.util

import pytest

missing = [m for m in ("nncf", "openvino", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed "
                                                      f"(pip install 'vitq[peers]')")

from tests.test_targets import plan_context  # noqa: E402
from vitq.targets import EXCLUDE, NONE, QUANTIZE, get_target  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ctx = plan_context(tmp_path_factory.mktemp("nncf"))
    return ctx, get_target("nncf").export(ctx)


def ov_names(ctx) -> dict[str, str]:
    """ONNX tensor name -> friendly name of the operation of openvino.convert_model that outputs it."""
    import openvino as ov
    out = {}
    for op in ov.convert_model(str(ctx.fp32_onnx())).get_ordered_ops():
        for o in op.outputs():
            for t in o.get_names():
                out.setdefault(t, op.get_friendly_name())
    return out


def test_the_ignored_scope_names_the_float_q_projection_and_residual_add(exported):
    import onnx

    from tests.test_onnx_sites import expected_nodes
    ctx, export = exported
    graph = onnx.load(str(ctx.fp32_onnx())).graph
    node = {n.name: n for n in graph.node}
    by_site = expected_nodes(onnx.load(str(ctx.fp32_onnx())), ctx.qmodel)
    names = ov_names(ctx)
    q = names[node[by_site["blocks.0.attn.q"]].output[0]]
    add = names[node[by_site["blocks.1.residual_attn"]].output[0]]
    assert export.arguments["ignored_scope"]["names"] == sorted([q, add])
    assert export.arguments["model_type"] == "TRANSFORMER" and export.arguments["preset"] == "MIXED"


def test_sites_nncf_never_quantizes_are_listed_with_the_reason(exported):
    _, export = exported
    rows = {r.site: r for r in export.rows}
    lost = [r.site for r in export.unmatched()]
    # NNCF's TRANSFORMER scheme: no FakeQuantize on residual Adds nor on the probabilities/V of attention
    for site in ("blocks.0.residual_attn", "blocks.0.residual_mlp", "blocks.1.residual_mlp", "blocks.0.attn.matmul_av"):
        assert site in lost and rows[site].action == NONE and "FakeQuantize" in rows[site].reason
    assert "ScaledDotProductAttention" in rows["blocks.0.attn.matmul_av"].reason
    # the float matmul_av of block 1 lives in the same fused operation as its int8 matmul_qk
    assert rows["blocks.1.attn.matmul_av"].action == NONE and "shares" in rows["blocks.1.attn.matmul_av"].reason
    assert rows["blocks.0.attn.k"].action == QUANTIZE and rows["blocks.0.attn.q"].action == EXCLUDE


def test_nncf_quantize_with_the_scope_quantizes_what_it_was_told(exported, tmp_path):
    ctx, export = exported
    applied = get_target("nncf").apply(export, ctx, tmp_path)
    assert sorted(applied.int8_sites) == sorted(r.site for r in export.rows if r.action == QUANTIZE)
    assert "blocks.0.attn.q" not in applied.int8_sites and applied.runtime == "openvino"
