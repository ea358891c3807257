"""`vitq export --to ort-quantizer` (vitq/targets/ort_quantizer.py): quantize_static's arguments
name the nodes of the FP32 export that the plan keeps float / int8, and ONNX Runtime's own
quantizer, given them, quantizes exactly the plan's int8 sites."""

from __future__ import annotations

import json

import pytest

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'vitq[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'vitq[onnx]')")

from tests.test_onnx_sites import expected_nodes  # noqa: E402
from tests.test_targets import FLOAT_SITES, plan_context  # noqa: E402
from vitq.targets import EXCLUDE, NONE, QUANTIZE, get_target  # noqa: E402

BACKEND_FLOAT = ("layernorm", "gelu", "softmax")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ctx = plan_context(tmp_path_factory.mktemp("ort"))
    return ctx, get_target("ort-quantizer").export(ctx)


def test_the_arguments_name_the_float_and_int8_sites_nodes(exported):
    ctx, export = exported
    by_site = expected_nodes(onnx.load(str(ctx.fp32_onnx())), ctx.qmodel)
    float_sites = FLOAT_SITES + [s.name for s in ctx.sites if s.kind in BACKEND_FLOAT]
    int8_sites = [s.name for s in ctx.sites if s.name not in float_sites]
    args = export.arguments
    assert sorted(args["nodes_to_exclude"]) == sorted(by_site[s] for s in float_sites)
    assert sorted(args["nodes_to_quantize"]) == sorted(by_site[s] for s in int8_sites)
    assert len(args["nodes_to_quantize"]) == 31 - 5 - 3 - 2 - 2 == 19
    assert args["op_types_to_quantize"] == ["Add", "Conv", "Gemm", "MatMul"]
    assert (args["per_channel"], args["activation_type"], args["weight_type"], args["calibrate_method"]) == (
        True, "QUInt8", "QInt8", "MinMax")
    # the residual adds the plan quantizes are carried, with ORT's difference said
    adds = [r for r in export.rows if r.kind == "residual" and r.action == QUANTIZE]
    assert [r.site for r in adds] == ["blocks.0.residual_attn", "blocks.0.residual_mlp", "blocks.1.residual_mlp"]
    assert all("inputs as well as its output" in r.reason for r in adds)
    assert not export.unmatched()  # every site carried


def test_the_model_handed_to_ort_keeps_every_site_node_and_has_initializer_weights(exported):
    ctx, export = exported
    model = onnx.load(export.arguments["model_input"])
    names = {n.name: n for n in model.graph.node}
    inits = {i.name for i in model.graph.initializer}
    assert set(export.arguments["nodes_to_quantize"] + export.arguments["nodes_to_exclude"]) <= set(names)
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    q_matmul = names[expected_nodes(onnx.load(str(ctx.fp32_onnx())), ctx.qmodel)["blocks.0.mlp.fc1"]]
    assert q_matmul.input[1] in inits  # fc1's weight, transposed, is an initializer B: per-channel int8 in ORT


def test_an_int8_output_site_has_no_counterpart_and_says_why(tmp_path):
    from quant.config import QuantConfig
    ctx = plan_context(tmp_path, QuantConfig(name="gelu8", float_kinds=["layernorm", "softmax"]))
    export = get_target("ort-quantizer").export(ctx)
    gelu = [r for r in export.rows if r.kind == "gelu"]
    assert [(r.action, r.name) for r in gelu] == [(NONE, None)] * 2
    assert all(r.reason.startswith("no counterpart") for r in gelu)
    assert [r.site for r in export.unmatched()] == ["blocks.0.mlp.gelu", "blocks.1.mlp.gelu"]


def test_written_json_and_python(exported, tmp_path):
    _, export = exported
    js, py = export.write(tmp_path)
    data = json.loads(js.read_text())
    assert data["arguments"] == export.arguments and len(data["sites"]) == 31
    assert {s["action"] for s in data["sites"]} == {QUANTIZE, EXCLUDE}
    compile(py.read_text(), str(py), "exec")  # valid Python
    assert "quantize_static(model_input, model_output" in py.read_text()


def test_ort_quantize_static_quantizes_exactly_the_plans_int8_sites(exported, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'vitq[onnx]')")
    ctx, export = exported
    applied = get_target("ort-quantizer").apply(export, ctx, tmp_path)
    told = sorted(r.site for r in export.rows if r.action == QUANTIZE)
    assert sorted(applied.int8_sites) == told
    assert "blocks.0.attn.q" not in applied.int8_sites  # q float although k and v read the same LayerNorm output
    assert applied.runtime == "onnxruntime" and applied.model.exists()


def test_cli_export_to_ort_quantizer(tmp_path, capsys):
    from vitq.cli import main
    assert main(["export", "--to", "ort-quantizer", "--preset", "mixed_1", "--calib", "32", "--out", str(tmp_path),
                 "--batch-size", "16"]) == 0
    data = json.loads((tmp_path / "targets" / "ort_quantizer.json").read_text())
    rows = {s["site"]: s for s in data["sites"]}
    assert all(rows[f"blocks.{b}.residual_{r}"]["action"] == EXCLUDE for b in range(4) for r in ("attn", "mlp"))
    assert "34 site operators quantized" in capsys.readouterr().out
