"""Site -> node of the FP32 ONNX graph (quant/onnx_sites.py), against a derivation that
reads only the FP32 graph: weights and LayerNorm parameters by their initializer names,
the attention matmuls, softmax and residual adds by their place in the graph."""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'vitq[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'vitq[onnx]')")

from quant.calibrate import calibrate  # noqa: E402
from quant.export_onnx import ExportError, export_onnx, float_state  # noqa: E402
from quant.model import QuantModel  # noqa: E402
from quant.onnx_sites import site_nodes  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

KIND_OPS = {"conv": "Conv", "linear": "MatMul", "matmul_qk": "MatMul", "matmul_av": "MatMul", "softmax": "Softmax",
            "residual": "Add", "layernorm": "LayerNormalization", "gelu": "Mul"}


def calibrated(num_layers: int = 2, family: str = "vit") -> QuantModel:
    qm = QuantModel(tiny_model(family, num_hidden_layers=num_layers))
    calibrate(qm, [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))], progress=False)
    return qm


def fp32_graph(qm: QuantModel, path) -> onnx.ModelProto:
    with float_state(qm):
        export_onnx(qm, path, torch.randn(2, 3, 32, 32))
    return onnx.load(str(path))


def expected_nodes(model: onnx.ModelProto, qm: QuantModel) -> dict[str, str]:
    """Site -> node name, read off the FP32 graph of a tiny HF ViT by hand-written rules."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    consumers: dict[str, list] = {}
    producer = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
        for t in n.output:
            producer[t] = n
    out = {}
    for s in qm.sites:
        if s.kind in ("linear", "conv", "layernorm"):
            node = consumers[f"model.{s.path}.weight"][0]  # the exporter names initializers model.<path>
            if node.op_type == "Transpose":  # a Linear: x @ Transpose(W)
                node = consumers[node.output[0]][0]
            out[s.name] = node.name
    for s in qm.sites:
        if s.role == "gelu":  # the node whose output fc2 reads
            fc2 = next(n for n in g.node if n.name == out[s.name.replace("mlp.gelu", "mlp.fc2")])
            out[s.name] = producer[fc2.input[0]].name

    def reads_weight(n) -> bool:
        return any(t in inits or (t in producer and producer[t].op_type == "Transpose"
                                  and producer[t].input[0] in inits) for t in n.input)
    activation_matmuls = [n for n in g.node if n.op_type == "MatMul" and not reads_weight(n)]
    softmaxes = [n for n in g.node if n.op_type == "Softmax"]
    residual_adds = [n for n in g.node if n.op_type == "Add" and not any(
        t in inits or producer.get(t) is not None and producer[t].op_type == "Constant" for t in n.input)]
    blocks = sorted({s.block for s in qm.sites if s.block is not None})
    for b in blocks:
        out[f"blocks.{b}.attn.matmul_qk"], out[f"blocks.{b}.attn.matmul_av"] = (
            n.name for n in activation_matmuls[2 * b:2 * b + 2])
        out[f"blocks.{b}.attn.softmax"] = softmaxes[b].name
        out[f"blocks.{b}.residual_attn"], out[f"blocks.{b}.residual_mlp"] = (
            n.name for n in residual_adds[2 * b:2 * b + 2])
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    qm = calibrated(2)
    return qm, fp32_graph(qm, tmp_path_factory.mktemp("sites") / "model_fp32.onnx")


def test_every_site_resolves_to_the_node_read_off_the_fp32_graph(tiny):
    qm, model = tiny
    nodes = site_nodes(qm, torch.randn(1, 3, 32, 32), model)
    expected = expected_nodes(model, qm)
    assert len(nodes) == len(qm.sites) == 31 == len(expected)
    assert {k: v.node for k, v in nodes.items()} == expected
    names = {n.name: n for n in model.graph.node}
    for s in qm.sites:  # every name is a node of the graph passed in, of the kind's op type
        assert names[nodes[s.name].node].op_type == ("Gemm" if s.name == "head" else KIND_OPS[s.kind])
    assert len({v.node for v in nodes.values()}) == 31  # no two sites share a node


def test_the_dinov2_layer_scale_does_not_move_a_site(tmp_path):
    qm = calibrated(1, "dinov2")
    model = fp32_graph(qm, tmp_path / "model_fp32.onnx")
    nodes = site_nodes(qm, torch.randn(1, 3, 32, 32), model)
    names = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    for site in ("blocks.0.residual_attn", "blocks.0.residual_mlp"):
        add = names[nodes[site].node]
        assert add.op_type == "Add"
        # one input is the layer-scaled branch: a Mul by the layer-scale parameter
        assert any(producer.get(t) is not None and producer[t].op_type == "Mul" for t in add.input)


def test_the_graph_of_another_model_is_refused(tiny, tmp_path):
    qm, _ = tiny
    other = fp32_graph(calibrated(1), tmp_path / "one_block.onnx")
    with pytest.raises(ExportError, match="not the graph vitq exports"):
        site_nodes(qm, torch.randn(1, 3, 32, 32), other)
