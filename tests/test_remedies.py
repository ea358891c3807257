"""Remedies as QuantConfig options: SmoothQuant-style smoothing and bias correction."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from quant.bias_correction import expected_shifts, measure_bias_shift
from quant.calibrate import calibrate
from quant.families import family_of
from quant.config import ConfigError, QuantConfig
from quant.model import PARAMS_KEY, QuantModel
from quant.observers import smoothed_range
from quant.presets import preset
from quant.quantizer import QuantSpec, qparams_from_range
from tests.conftest import tiny_model

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                               or importlib.util.find_spec("onnx") is None,
                               reason="onnx/onnxruntime are not installed (pip install 'vitq[onnx]')")

NORM = "blocks.1.norm2"
FC1 = "blocks.1.mlp.fc1"
# their module paths in the tiny HF ViT (parameters are named by module path)
NORM_PATH = "vit.layers.1.layernorm_after"
FC1_PATH = "vit.layers.1.mlp.fc1"
ALL_FLOAT = dict(float_kinds=[], float_sites=["*"])


def _batches(n: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 32, 32, generator=g) for _ in range(n)]


def _outlier_model(family: str = "vit") -> torch.nn.Module:
    """Channel 5 of block 1's layernorm_after x50 (weight and bias): an outlier
    channel in fc1's input (the FP32 reference is this planted model)."""
    model = tiny_model(family, num_hidden_layers=3)
    with torch.no_grad():
        # the same canonical site in every family; its module path differs
        norm = model.get_submodule(next(s.path for s in family_of(model).sites(model) if s.name == NORM))
        norm.weight[5] *= 50
        norm.bias[5] *= 50
    return model


def _offset_model() -> torch.nn.Module:
    """Block 1's layernorm_after bias +4: fc1's input has a large mean, so the rounding
    errors of fc1's weight rows shift its outputs."""
    model = tiny_model("vit", num_hidden_layers=3)
    with torch.no_grad():
        model.get_submodule(NORM_PATH).bias += 4.0
    return model


def _calibrated(model) -> QuantModel:
    qm = QuantModel(model)
    calibrate(qm, _batches(4, 8, 0), progress=False)
    return qm


def _logits(qm, config, batches) -> torch.Tensor:
    qm.apply(config)
    return torch.cat([qm(x) for x in batches])


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(logit MSE, KL(FP32 || quantized) per image)."""
    kl = torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean")
    return float((out - ref).pow(2).mean()), float(kl)


def _with(config: QuantConfig, **fields) -> QuantConfig:
    return QuantConfig.from_dict({**config.to_dict(), **fields})


@pytest.fixture(scope="module")
def outlier_qm() -> QuantModel:
    return _calibrated(_outlier_model())


# -- config --------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_fields_round_trip(tmp_path, suffix):
    cfg = QuantConfig(name="r", float_sites=["*.residual_*"], smooth={"*.layernorm_after": 0.5, NORM: 0.15},
                      bias_correction=["*.mlp.fc1", FC1])
    cfg.save(tmp_path / f"c{suffix}")
    assert QuantConfig.load(tmp_path / f"c{suffix}") == cfg
    # unused: not written (existing configs keep their keys and hashes)
    assert "smooth" not in QuantConfig().to_dict() and "bias_correction" not in QuantConfig().to_dict()
    (tmp_path / "y.yaml").write_text("smooth:\n  '*.layernorm_after': 0.5\nbias_correction: ['*.mlp.fc2']\n")
    loaded = QuantConfig.load(tmp_path / "y.yaml")
    assert loaded.smooth == {"*.layernorm_after": 0.5} and loaded.bias_correction == ["*.mlp.fc2"]


@pytest.mark.parametrize("data,message", [
    ({"smooth": {NORM: 1.0}}, r"^smooth 'blocks.1.norm2': alpha must be a number in \(0, 1\), got 1.0$"),
    ({"smooth": {NORM: 0}}, r"alpha must be a number in \(0, 1\), got 0$"),
    ({"smooth": {NORM: "half"}}, r"alpha must be a number in \(0, 1\), got 'half'$"),
    ({"smooth": ["x"]}, r"^smooth must be a mapping of site name/glob -> alpha, got list$"),
    ({"bias_correction": "*.fc1"}, r"^bias_correction must be a list of site names/globs, got str$"),
])
def test_config_field_errors_are_one_line(data, message):
    with pytest.raises(ConfigError, match=message) as e:
        QuantConfig.from_dict(data)
    assert "\n" not in str(e.value)


def test_patterns_must_match_smoothable_norms_and_linear_sites(outlier_qm):
    qm = outlier_qm
    assert qm.family.norm_consumers(qm.model, qm.sites)[NORM] == [FC1]
    assert qm.family.norm_consumers(qm.model, qm.sites)["blocks.0.norm1"] == [
        f"blocks.0.attn.{p}" for p in "qkv"]
    with pytest.raises(ConfigError, match=r"^smooth pattern 'blocks.1.mlp.fc1' matches no layernorm site"):
        qm.apply(QuantConfig(smooth={FC1: 0.5}))
    with pytest.raises(ConfigError, match=r"^smooth pattern 'norm' matches no LayerNorm whose output "
                                          r"feeds Linear sites"):
        qm.apply(QuantConfig(smooth={"norm": 0.5}))  # the final norm: pooled into the head
    with pytest.raises(ConfigError, match=r"^bias_correction pattern 'blocks.1.norm2' matches no "
                                          r"linear site"):
        qm.apply(QuantConfig(bias_correction=[NORM]))
    with pytest.raises(ConfigError, match=r"^smooth pattern 'blocks.9.norm2' matches no layernorm "
                                          r"site of this model; close matches"):
        qm.apply(QuantConfig(smooth={"blocks.9.norm2": 0.5}))


# -- smoothing -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
def test_smoothing_keeps_the_float_output(family):
    qm = _calibrated(_outlier_model(family))
    x = _batches(1, 8, 3)
    ref = _logits(qm, None, x)
    smoothed = QuantConfig(**ALL_FLOAT, smooth={"*": 0.5})  # every smoothable norm
    out = _logits(qm, smoothed, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    norm1 = next(s.path for s in qm.sites if s.role == "norm1" and s.block == 0)
    assert not torch.equal(qm.model.get_parameter(f"{norm1}.weight"), qm.original_parameter(f"{norm1}.weight"))


def test_smoothed_activation_range_is_the_exact_range_of_x_over_s(outlier_qm):
    qm = outlier_qm
    calib = _batches(4, 8, 0)  # the calibration images of _calibrated
    qm.apply(QuantConfig(**ALL_FLOAT, smooth={NORM: 0.5}))
    seen = []
    hook = qm.model.get_submodule(NORM_PATH).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        for x in calib:
            qm(x)
    finally:
        hook.remove()
    x_smoothed = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    lo, hi = float(x_smoothed.min()), float(x_smoothed.max())
    for observer in ("minmax", "percentile", "mse", "entropy"):  # histogram observers fall back to minmax
        spec = QuantSpec(observer=observer)
        qm.apply(QuantConfig(float_sites=["*.residual_*"], activation=spec, smooth={NORM: 0.5}))
        tq = qm.quantizers[FC1]["input"]
        assert tq.smooth is not None and qm.quantizers[NORM]["output"].smooth is tq.smooth
        assert smoothed_range(tq.channels, tq.smooth) == pytest.approx((lo, hi), rel=1e-5)
        want = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
        assert torch.allclose(tq.qparams.scale, want.scale, rtol=1e-5)
        assert torch.equal(tq.qparams.zero_point, want.zero_point)
    # the weight is quantized from W' = W * s (column-wise)
    s = qm.quantizers[FC1]["input"].smooth
    assert torch.allclose(qm.model.get_parameter(f"{FC1_PATH}.weight"), qm.original_parameter(f"{FC1_PATH}.weight") * s)


def test_apply_and_restore_bring_back_the_right_parameters(outlier_qm):
    qm = outlier_qm
    x = _batches(1, 8, 4)[0]
    qm.apply(None)  # the module's model may be left smoothed by an earlier test
    originals = {k: v.clone() for k, v in qm.model.state_dict().items()}
    smooth_bc = _with(preset("mixed_1", qm.sites), smooth={"*.layernorm_*": 0.5}, bias_correction=["*.mlp.fc*"])
    s_plain, s_smooth = qm.prepare(preset("mixed_1", qm.sites)), qm.prepare(smooth_bc)
    out_smooth = qm(x)
    assert set(s_smooth[PARAMS_KEY]) >= {f"{NORM_PATH}.weight", f"{NORM_PATH}.bias", f"{FC1_PATH}.weight", f"{FC1_PATH}.bias"}
    qm.restore(s_plain)
    out_plain = qm(x)
    assert all(torch.equal(v, originals[k]) for k, v in qm.model.state_dict().items())
    qm.restore(s_smooth)
    assert torch.equal(qm(x), out_smooth) and not torch.equal(out_smooth, out_plain)
    qm.apply(preset("all", qm.sites))  # another config: originals back
    assert all(torch.equal(v, originals[k]) for k, v in qm.model.state_dict().items())
    qm.apply(smooth_bc)
    assert torch.equal(qm(x), out_smooth)
    qm.apply(None)
    assert all(torch.equal(v, originals[k]) for k, v in qm.model.state_dict().items())


def test_calibration_state_keeps_channel_statistics_and_refuses_old_states(outlier_qm):
    state = outlier_qm.calibration_state()
    assert {"channel_min", "channel_max", "channel_sum", "channel_rows"} <= set(state[f"{NORM}:output"])
    assert "channel_min" not in state["blocks.1.residual_mlp:output"]
    fresh = QuantModel(_outlier_model())
    fresh.load_calibration_state(state)
    cfg = _with(preset("mixed_1", fresh.sites), smooth={NORM: 0.5}, bias_correction=[FC1])
    x = _batches(1, 8, 5)
    assert torch.equal(_logits(fresh, cfg, x), _logits(outlier_qm, cfg, x))
    old = {k: {n: v for n, v in s.items() if not n.startswith("channel_")} for k, s in state.items()}
    with pytest.raises(ValueError, match=r"^calibration state of blocks.0.norm1:output has no "
                                         r"per-channel statistics \(saved by an older vitq\); calibrate again$"):
        QuantModel(_outlier_model()).load_calibration_state(old)


def test_smoothing_lowers_the_error_of_a_planted_outlier_channel(outlier_qm):
    qm = outlier_qm
    test = _batches(3, 16, 7)
    ref = _logits(qm, None, test)
    base = preset("mixed_1", qm.sites)
    mse0, kl0 = _errors(_logits(qm, base, test), ref)
    mse1, kl1 = _errors(_logits(qm, _with(base, smooth={NORM: 0.5}), test), ref)
    # measured: logit MSE 1.1e-4 -> 2.2e-5, KL 2.4e-5 -> 8.0e-6
    assert mse1 < mse0 / 3 and kl1 < kl0 / 2


@needs_ort
def test_smoothed_and_bias_corrected_export_agrees_with_onnxruntime(outlier_qm, tmp_path):
    import onnx
    import onnxruntime as ort

    from quant.export_onnx import export_onnx

    qm = outlier_qm
    example = _batches(1, 2, 5)[0]
    qm.apply(preset("mixed_1", qm.sites))
    plain = export_onnx(qm, tmp_path / "plain.onnx", example)
    cfg = _with(preset("mixed_1", qm.sites), smooth={"*.layernorm_*": 0.5}, bias_correction=["*.mlp.fc*"])
    qm.apply(cfg)
    result = export_onnx(qm, tmp_path / "m.onnx", example)
    # the same Q/DQ placement as without the remedies (46 DQ, 20 int8 weights on 3 blocks)
    assert (result.quantize_nodes, result.dequantize_nodes, result.int8_weights) == (
        plain.quantize_nodes, plain.dequantize_nodes, plain.int8_weights) == (26, 46, 20)
    model = onnx.load(str(result.path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    norm_w = next(v for k, v in inits.items() if k.endswith(f"{NORM_PATH}.weight"))
    assert torch.allclose(torch.from_numpy(norm_w.copy()), qm.model.get_parameter(f"{NORM_PATH}.weight").detach())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(result.path), opts, providers=["CPUExecutionProvider"])
    x = torch.cat(_batches(2, 32, 11))
    sim = qm(x)
    out = torch.from_numpy(sess.run(None, {"pixel_values": x.numpy()})[0])
    assert (sim.argmax(1) == out.argmax(1)).float().mean().item() >= 0.99
    assert (out - sim).abs().max() <= 0.02 * sim.abs().max()


# -- bias correction -------------------------------------------------------------------
def test_bias_correction_removes_the_output_shift_of_an_offset_input():
    qm = _calibrated(_offset_model())
    calib, test = _batches(4, 8, 0), _batches(3, 16, 7)
    base = QuantConfig(name="b", float_sites=["*.residual_*"])
    corrected = _with(base, bias_correction=[FC1])
    x = test[0]
    before = _logits(qm, base, [x])
    shift0 = measure_bias_shift(qm, base, test)
    assert torch.equal(qm(x), before)  # state kept
    shift1 = measure_bias_shift(qm, corrected, test)[FC1]
    # measured on held-out images: mean |E[y_q - y]| of fc1 0.0023 -> 0.000033
    assert shift1.abs().mean() < shift0[FC1].abs().mean() / 10
    assert set(shift0) == {s.name for s in qm.sites if s.kind == "linear"}  # none listed: every int8 Linear
    # the correction is the expected weight shift (W_q - W) E[x]; a measure on the calibration images agrees
    qm.apply(corrected)
    analytic = expected_shifts(qm, corrected)[FC1]
    assert torch.allclose(measure_bias_shift(qm, base, calib)[FC1], analytic, atol=0.1 * analytic.abs().max())
    assert torch.allclose(qm.model.get_parameter(f"{FC1_PATH}.bias"), qm.original_parameter(f"{FC1_PATH}.bias") - analytic)
    # every Linear corrected: the logits move towards FP32 (measured: MSE 1.7e-6 -> 1.2e-6)
    ref = _logits(qm, None, test)
    mse0, _ = _errors(_logits(qm, base, test), ref)
    mse1, _ = _errors(_logits(qm, _with(base, bias_correction=["*"]), test), ref)
    assert mse1 < mse0
    # a site kept float is not corrected
    qm.apply(_with(base, float_sites=["*.residual_*", FC1], bias_correction=[FC1]))
    assert torch.equal(qm.model.get_parameter(f"{FC1_PATH}.bias"), qm.original_parameter(f"{FC1_PATH}.bias"))
