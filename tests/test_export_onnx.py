"""ONNX export with Q/DQ and the ONNX Runtime backend, on tiny models."""

from __future__ import annotations

import fnmatch

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'vitq[onnx]')")
from onnx import TensorProto, numpy_helper  # noqa: E402

from quant.calibrate import calibrate  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from quant.export_onnx import ExportError, export_onnx, int8_tensors, nonstandard_ops  # noqa: E402
from quant.model import TensorQuantizer, QuantModel  # noqa: E402
from quant.presets import preset  # noqa: E402
from quant.quantizer import QuantSpec  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                               reason="onnxruntime is not installed (pip install 'vitq[onnx]')")

EVERYTHING_FLOAT = QuantConfig(name="float", float_kinds=[], float_sites=["*"])
# tiny ViT (2 blocks): conv 2 + 13 linear x 2 + 2 matmul_qk x 2 + 2 matmul_av x 2 + 4 residual = 40 int8 slots;
# q/k/v of a block read the same LayerNorm output with the same parameters: one Q/DQ, 2 x 2 fewer.
EXPECTED = {"all": dict(slots=40, distinct=36, weights=14), "mixed_1": dict(slots=36, distinct=32, weights=14)}


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _calibrated(family: str = "vit") -> QuantModel:
    qm = QuantModel(tiny_model(family))
    calibrate(qm, [_images(16, 0)], progress=False)
    return qm


@pytest.fixture(scope="module")
def qmodel() -> QuantModel:
    return _calibrated("vit")


def _ort(path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"pixel_values": x.numpy()})[0])


def _count(model, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


@pytest.mark.parametrize("name", ["all", "mixed_1"])
def test_qdq_graph_is_standard_and_has_one_pair_per_int8_tensor(qmodel, name, tmp_path):
    qmodel.apply(preset(name, qmodel.sites))
    tensors = int8_tensors(qmodel, _images(1, 5))
    result = export_onnx(qmodel, tmp_path / "m.onnx", _images(2, 5))
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    assert nonstandard_ops(model) == [] and all(n.domain in ("", "ai.onnx") for n in model.graph.node)

    want = EXPECTED[name]
    assert sum(len(t.slots) for t in tensors) == want["slots"]
    assert len(tensors) == want["distinct"]
    assert _count(model, "DequantizeLinear") == result.dequantize_nodes == want["distinct"]
    assert _count(model, "QuantizeLinear") == want["distinct"] - want["weights"]  # activations only
    assert result.int8_weights == sum(t.is_weight for t in tensors) == want["weights"]


def test_weights_are_int8_initializers_bit_exact_with_the_simulation(qmodel, tmp_path):
    cfg = preset("all", qmodel.sites)
    qmodel.apply(cfg)
    model = onnx.load(str(export_onnx(qmodel, tmp_path / "m.onnx", _images(2, 5)).path))
    inits = {i.name: i for i in model.graph.initializer}
    int8_weights = [f"model.{s.path}.weight" for s in cfg.int8_sites(qmodel.sites) if s.has_weight()]
    assert len(int8_weights) == EXPECTED["all"]["weights"]
    assert not set(int8_weights) & set(inits)  # no float copy left
    assert all(inits[f"{w}_quantized"].data_type == TensorProto.INT8 for w in int8_weights)
    weights = 0
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert n.input[0] not in inits  # run-time activations only: weights are folded
            zp = numpy_helper.to_array(inits[n.input[2]])
            assert zp.dtype == np.uint8 and zp.shape == ()  # asymmetric per-tensor activations
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        weights += 1
        init = inits[n.input[0]]
        assert init.data_type == TensorProto.INT8
        path = init.name.replace("model.", "", 1).replace(".weight_quantized", "")  # initializers: module paths
        site = next(s.name for s in qmodel.sites if s.path == path)
        tq = qmodel.quantizers[site]["weight"]
        codes = numpy_helper.to_array(init).astype(np.float32)
        scale = numpy_helper.to_array(inits[n.input[1]])
        axis = next(a.i for a in n.attribute if a.name == "axis")
        shape = [1] * codes.ndim
        shape[axis] = -1
        dequant = torch.from_numpy(codes * scale.reshape(shape))
        cached = tq._weight_cache
        consumer = next(c.op_type for c in model.graph.node if n.output[0] in c.input)
        if consumer == "MatMul":  # x @ W.T: stored [in, out], output channel on axis 1
            assert axis == 1
            dequant = dequant.T
        else:  # Conv, Gemm(transB=1): [out, in, ...], axis 0
            assert consumer in ("Conv", "Gemm") and axis == 0
        assert torch.equal(dequant, cached)
    assert weights == EXPECTED["all"]["weights"]


def test_symmetric_activations_are_int8_and_per_tensor_weights_have_no_axis(qmodel, tmp_path):
    cfg = QuantConfig(name="sym", activation=QuantSpec(symmetric=True),
                      weight=QuantSpec(symmetric=True, per_channel=False))
    qmodel.apply(cfg)
    model = onnx.load(str(export_onnx(qmodel, tmp_path / "m.onnx", _images(2, 5)).path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(inits[n.input[2]].dtype == np.int8 and inits[n.input[1]].shape == () for n in qdq)
    assert not any(a.name == "axis" for n in qdq for a in n.attribute)


def test_export_keeps_the_model_state_and_refuses_non_8_bit(qmodel, tmp_path):
    qmodel.apply(preset("mixed_1", qmodel.sites))
    x = _images(4, 7)
    before = qmodel(x)
    export_onnx(qmodel, tmp_path / "m.onnx", x)
    assert torch.equal(qmodel(x), before)
    assert all(type(tq) is TensorQuantizer for tq in qmodel.tensor_quantizers())
    qmodel.apply(QuantConfig(name="w6", weight=QuantSpec(bits=6, symmetric=True)))
    with pytest.raises(ExportError, match="6-bit quantization cannot be exported; ONNX Q/DQ holds 4-, 8- and "
                                          "16-bit integers and FP8 E4M3"):
        export_onnx(qmodel, tmp_path / "w6.onnx", x)
    assert not (tmp_path / "w6.onnx").exists()


@needs_ort
def test_everything_float_exports_without_qdq_and_matches_fp32(qmodel, tmp_path):
    qmodel.apply(EVERYTHING_FLOAT)
    result = export_onnx(qmodel, tmp_path / "f.onnx", _images(2, 5))
    assert result.quantize_nodes == result.dequantize_nodes == result.int8_weights == 0
    x = _images(8, 9)
    with torch.no_grad():
        reference = qmodel.model(x).logits
    assert torch.allclose(_ort(result.path)(x), reference, atol=1e-4, rtol=0)


@needs_ort
@pytest.mark.parametrize("family,name", [("vit", "all"), ("vit", "mixed_1"), ("dinov2", "all"), ("deit", "all")])
def test_onnxruntime_int8_agrees_with_fake_quant(family, name, tmp_path):
    qm = _calibrated(family)
    qm.apply(preset(name, qm.sites))
    result = export_onnx(qm, tmp_path / "m.onnx", _images(2, 5))  # traced at batch 2, run at 64
    x = _images(64, 11)
    sim, ort_out = qm(x), _ort(result.path)(x)
    agree = (sim.argmax(1) == ort_out.argmax(1)).float().mean().item()
    assert agree >= 0.99
    assert (ort_out - sim).abs().max() <= 0.02 * sim.abs().max()
    assert torch.nn.functional.cosine_similarity(ort_out.flatten(), sim.flatten(), dim=0) > 0.999


# -- backends and the command line -------------------------------------------------
@needs_ort
def test_backends_share_one_interface(qmodel, tmp_path):
    from vitq.backends import BackendEval, OnnxRuntimeInt8, OrtRunner, TorchFakeQuant
    from analysis.evaluate import evaluate_configs

    cfg = preset("all", qmodel.sites)
    x = _images(16, 3)
    torch_run = TorchFakeQuant(qmodel).build("all", cfg)
    ort_backend = OnnxRuntimeInt8(qmodel, tmp_path, x[:1], threads=1)
    ort_run = ort_backend.build("all", cfg)
    assert (tmp_path / "model_all.onnx").is_file() and ort_backend.exports["all"].dequantize_nodes == 36
    assert (torch_run(x).argmax(1) == ort_run(x).argmax(1)).float().mean() >= 0.99
    # the same file run as written (no int8 fusions) is the Q/DQ reference: same logits to rounding
    unfused = OrtRunner(ort_backend.exports["all"].path, threads=1, optimize=False)
    assert unfused.session.get_session_options().graph_optimization_level.name == "ORT_DISABLE_ALL"
    assert (unfused(x) - torch_run(x)).abs().max() <= 0.02 * torch_run(x).abs().max()

    evaluator = BackendEval(qmodel, ort_backend)
    labels = torch.arange(16) % 5
    df = evaluate_configs(evaluator, {"all": cfg}, [(x, labels, list(range(16)))], progress=False)
    assert df["config"].tolist() == ["fp32", "all"]
    # the rows against values computed by hand: ONNX Runtime's logits against the float model's
    qmodel.apply(None)
    with torch.no_grad():
        fp32 = qmodel(x).double()
    ort_logits = ort_run(x).double()
    kl = (fp32.softmax(1) * (fp32.log_softmax(1) - ort_logits.log_softmax(1))).sum(1).mean().item()
    row = df.set_index("config").loc["all"]
    assert row["top1"] == pytest.approx(100 * (ort_logits.argmax(1) == labels).double().mean().item())
    assert row["agreement"] == pytest.approx(100 * (ort_logits.argmax(1) == fp32.argmax(1)).double().mean().item())
    assert row["kl"] == pytest.approx(kl, rel=1e-4)
    sim = evaluator.simulation_agreement()["all"]
    assert sim["images"] == 16 and sim["agreement"] >= 99


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from PIL import Image
    from transformers import ViTImageProcessor

    labels = ["cat", "dog", "fish", "bird", "frog"]
    path = tmp_path_factory.mktemp("tiny-vit")
    model = tiny_model("vit", id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model.config.architectures = ["ViTForImageClassification"]
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    root = tmp_path_factory.mktemp("data")
    for split, n in (("train", 4), ("val", 3)):
        for c, label in enumerate(labels[:4]):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 36), color=(40 * c, 20 * i, 90)).save(root / split / label / f"{i}.png")
    return path, root


@needs_ort
def test_cli_export_writes_fp32_and_int8_models(model_and_data, tmp_path, capsys):
    from vitq.cli import main

    model_dir, data_dir = model_and_data
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: plan\nfloat_sites: ['*.residual_*']\n")  # = mixed_1
    out = tmp_path / "out"
    assert main(["export", "--config", str(plan), "--model", str(model_dir), "--data", str(data_dir),
                 "--calib", "8", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "18 QuantizeLinear + 32 DequantizeLinear (14 int8 weight initializers)" in printed
    assert "vs FP32" in printed
    info = json.loads((out / "export.json").read_text())
    assert info["int8"]["dequantize_linear"] == info["distinct_int8_tensors"] == 32
    assert (out / "model_int8.onnx").stat().st_size < (out / "model_fp32.onnx").stat().st_size
    onnx.checker.check_model(onnx.load(str(out / "model_int8.onnx")))


@needs_ort
def test_cli_eval_with_onnxruntime_backend(model_and_data, tmp_path, capsys):
    from vitq.cli import main

    model_dir, data_dir = model_and_data
    out = tmp_path / "out"
    assert main(["eval", "--backend", "onnxruntime", "--preset", "all,mixed_1", "--model", str(model_dir),
                 "--data", str(data_dir), "--calib", "8", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime vs fake-quant top-1 agreement: all" in printed
    df = pd.read_csv(out / "eval.csv")
    assert df["config"].tolist() == ["fp32", "all", "mixed_1"] and (df["sim_agreement"] >= 99).all()
    meta = json.loads((out / "eval.json").read_text())["meta"]
    assert meta["backend"] == "onnxruntime" and set(meta["simulation_agreement"]) == {"all", "mixed_1"}
    assert (out / "onnx" / "model_all.onnx").is_file()


# -- formats beyond int8 (quant/formats/): opset 21 Q/DQ, one site at a time -----------------
# (format, site, weight group size, ONNX type of the site's zero points / weight codes)
FORMAT_SITES = [
    ("a16w8", "blocks.1.residual_mlp", None, {TensorProto.UINT16}),
    ("a16w8", "blocks.0.attn.matmul_av", None, {TensorProto.UINT16}),
    ("a16w8", "blocks.0.mlp.fc2", None, {TensorProto.UINT16, TensorProto.INT8}),
    ("w4a8", "blocks.0.mlp.fc2", 32, {TensorProto.UINT8, TensorProto.INT4}),  # 64 inputs: 2 groups
    ("w4a8", "patch_embed", None, {TensorProto.UINT8, TensorProto.INT4}),
    ("w8", "head", None, {TensorProto.INT8}),
    ("w4", "blocks.1.mlp.fc2", 32, {TensorProto.INT4}),
    ("fp8", "blocks.0.mlp.fc1", None, {TensorProto.FLOAT8E4M3FN}),
    ("fp8", "blocks.1.attn.matmul_qk", None, {TensorProto.FLOAT8E4M3FN}),
]


@needs_ort
@pytest.mark.parametrize("fmt,name,group,types", FORMAT_SITES, ids=[f"{f}-{n}" for f, n, _, _ in FORMAT_SITES])
def test_each_format_one_site_at_a_time_ort_matches_the_simulation(qmodel, fmt, name, group, types, tmp_path):
    """Criterion (a) of tests/test_ort_agreement.py per format: the site alone in its format,
    ONNX Runtime (optimized and as written) within 2 % of the site's quantization error."""
    from vitq.backends import OrtRunner

    overrides = {name: {"weight": {"group_size": group}}} if group else {}
    config = QuantConfig(formats={name: fmt}, overrides=overrides)
    site = qmodel.site_by_name[name]
    x = _images(16, 7)
    qmodel.apply(None)
    fp32 = qmodel(x)
    qmodel.apply(EVERYTHING_FLOAT)
    qmodel.quantize_site(name, config.slot_specs(site))
    sim = qmodel(x)
    result = export_onnx(qmodel, tmp_path / "one.onnx", x[:2])
    model = onnx.load(str(result.path))
    # opset 21 where a tensor is not an 8-bit integer; w8 is int8 Q/DQ as today (opset 18)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18 if fmt == "w8" else 21}
    assert not nonstandard_ops(model)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert {inits[n.input[2]] for n in dq} == types  # zero points: the codes' type
    blocks = [a.i for n in dq for a in n.attribute if a.name == "block_size"]
    assert blocks == ([group] if group else [])
    quant_error = (sim - fp32).pow(2).mean().sqrt().item()
    assert quant_error > 0
    for optimize in (True, False):
        ort_out = OrtRunner(result.path, threads=1, optimize=optimize)(x)
        assert (ort_out - sim).pow(2).mean().sqrt().item() <= 0.02 * quant_error, (fmt, name, optimize)


@needs_ort
def test_int16_activation_and_int4_weight_codes_in_the_graph_are_the_simulations(qmodel, tmp_path):
    config = QuantConfig(formats={"blocks.0.mlp.fc2": "w4a8", "blocks.0.residual_attn": "a16w8"},
                         overrides={"blocks.0.mlp.fc2": {"weight": {"group_size": 32}}})
    qmodel.apply(config)
    model = onnx.load(str(export_onnx(qmodel, tmp_path / "m.onnx", _images(2, 5)).path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    tq = qmodel.quantizers["blocks.0.mlp.fc2"]["weight"]
    weight_name = f"model.{qmodel.site_by_name['blocks.0.mlp.fc2'].path}.weight_quantized"
    codes = np.asarray(inits[weight_name]).astype(np.int32)
    from quant.quantizer import quantize_to_int
    weight = qmodel.family.weight(qmodel.model, qmodel.site_by_name["blocks.0.mlp.fc2"])
    assert np.array_equal(codes, quantize_to_int(weight.detach(), tq.qparams).numpy().T)  # stored [in, out]
    assert inits[f"{weight_name}_scale"].shape == (2, 32)  # 2 groups of 32 inputs x 32 outputs
    act = qmodel.quantizers["blocks.0.residual_attn"]["output"].qparams
    assert inits["blocks.0.residual_attn.output_uint16_zero_point"] == act.zero_point.item()
    assert inits["blocks.0.residual_attn.output_uint16_scale"] == np.float32(act.scale.item())


@needs_ort
def test_cli_eval_onnxruntime_runs_a_config_with_formats(model_and_data, tmp_path, capsys):
    from vitq.cli import main

    model_dir, data_dir = model_and_data
    cfg = tmp_path / "multi.yaml"
    cfg.write_text("name: multi\nformats:\n  '*.residual_*': a16w8\n  '*.mlp.fc2': w4a8\n  blocks.0.mlp.fc1: fp8\n"
                   "overrides:\n  '*.mlp.fc2': {weight: {group_size: 32}}\n")
    out = tmp_path / "out"
    assert main(["eval", "--backend", "onnxruntime", "--preset", "fp32", "--config", str(cfg), "--model",
                 str(model_dir), "--data", str(data_dir), "--calib", "8", "--out", str(out), "--no-progress"]) == 0
    assert "onnxruntime vs fake-quant top-1 agreement: multi" in capsys.readouterr().out
    df = pd.read_csv(out / "eval.csv").set_index("config")
    assert df.loc["multi", "sim_agreement"] >= 99
    model = onnx.load(str(out / "onnx" / "model_multi.onnx"))
    assert {o.version for o in model.opset_import if o.domain == ""} == {21}
    types = {i.data_type for i in model.graph.initializer}
    assert {TensorProto.UINT16, TensorProto.INT4, TensorProto.FLOAT8E4M3FN, TensorProto.INT8} <= types


# -- variants from one capture (the latency table) ---------------------------------------------
@needs_ort
def test_float_variants_from_one_capture_equal_their_own_exports(qmodel, tmp_path):
    from quant.export_onnx import export_variants
    from analysis.format_moves import with_format
    start = preset("all", qmodel.sites)
    names = lambda pattern: [s.name for s in qmodel.sites if fnmatch.fnmatch(s.name, pattern)]  # noqa: E731
    configs = {"start": start, "residual": start.with_float(["*.residual_*"]),
               "fc2_qk": start.with_float(["*.mlp.fc2", "*.attn.matmul_qk"]),
               # other formats from the same capture: int16 activations, int4 weights, weight-only int4, FP8
               "a16w8_residual": with_format(start, names("*.residual_*"), "a16w8", qmodel.sites),
               "w4a8_fc1": with_format(start, names("*.mlp.fc1"), "w4a8", qmodel.sites),
               "w4_fc2": with_format(start, names("*.mlp.fc2"), "w4", qmodel.sites),
               "fp8_av": with_format(start, names("*.attn.matmul_av"), "fp8", qmodel.sites)}
    before = qmodel.snapshot()
    variants = export_variants(qmodel, {k: tmp_path / f"v_{k}.onnx" for k in configs}, configs, _images(2, 1))
    assert all(torch.equal(a, b) for a, b in zip(_flat(qmodel.snapshot()), _flat(before)))  # state kept
    x = _images(4, 3)
    for name, cfg in configs.items():
        qmodel.apply(cfg)
        own = export_onnx(qmodel, tmp_path / f"own_{name}.onnx", _images(2, 1), opset=21)  # the variants' opset
        qmodel.apply(None)
        v = variants[name]
        # the same ops, node for node by type, and the same Q/DQ counts as the config's own export
        assert v.ops == own.ops and (v.quantize_nodes, v.dequantize_nodes) == (own.quantize_nodes, own.dequantize_nodes)
        # no remedy here whose values depend on the float sites: the same numbers too
        assert torch.allclose(_ort(v.path)(x), _ort(own.path)(x), atol=1e-5)
    # fewer Q/DQ in a variant: the 2 x 2 residual adds' pairs are gone
    assert variants["start"].dequantize_nodes - variants["residual"].dequantize_nodes == 4
    # every graph at the opset the widest format needs, the formats' element types in place
    import onnx
    from onnx import TensorProto
    opsets = {k: {o.version for o in onnx.load(str(v.path)).opset_import if o.domain == ""} for k, v in variants.items()}
    assert set(map(frozenset, opsets.values())) == {frozenset({21})}
    types = lambda k: {i.data_type for i in onnx.load(str(variants[k].path)).graph.initializer}  # noqa: E731
    assert TensorProto.UINT16 in types("a16w8_residual") and TensorProto.UINT16 not in types("start")
    assert TensorProto.INT4 in types("w4a8_fc1") and TensorProto.INT4 in types("w4_fc2")
    assert TensorProto.FLOAT8E4M3FN in types("fp8_av")


def test_a_variant_may_only_quantize_slots_the_first_quantizes(qmodel, tmp_path):
    from quant.export_onnx import export_variants
    mixed_1, all_ = preset("mixed_1", qmodel.sites), preset("all", qmodel.sites)
    with pytest.raises(ExportError, match="variants may only quantize slots the first config quantizes"):
        export_variants(qmodel, {"a": tmp_path / "a.onnx", "b": tmp_path / "b.onnx"},
                              {"a": mixed_1, "b": all_}, _images(2, 1))


def _flat(state):
    out = []
    stack = [state]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out
