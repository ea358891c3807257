"""Formats per site (quant/formats/): their fake-quant against hand-computed values, the
``formats:`` config key, and BitOps / weight bytes by hand on the tiny ViT."""

import json

import pytest
import torch

from analysis.cost import bitops, relative_bitops, site_macs, weight_bytes
from quant.config import ConfigError, QuantConfig
from quant.formats import FORMATS, Format, register_format, unregister_format
from quant.model import QuantModel
from quant.modes import FLOAT, QUANT, SiteError
from quant.observers import weight_qparams
from quant.presets import preset
from quant.quantizer import QuantSpec, fake_quantize, qparams_from_range, quantize_to_int
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def qm():
    return QuantModel(tiny_model("vit"))  # 2 blocks, width 32, MLP 64, 17 tokens, 2 heads of 16, 5 classes


def _site(qm, name):
    return qm.site_by_name[name]


# -- fake-quant by hand ----------------------------------------------------------------
def test_int16_activation_by_hand():
    spec = FORMATS["a16w8"].activation(QuantConfig().activation)
    assert (spec.bits, spec.symmetric, spec.qmin, spec.qmax) == (16, False, 0, 65535)
    # range [-1, 3]: scale 4/65535, zero point round(1 / (4/65535)) = round(16383.75) = 16384
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), spec)
    assert qp.scale.item() == pytest.approx(4 / 65535)
    assert qp.zero_point.item() == 16384
    x = torch.tensor([1.0, -1.0, 3.0, 5.0])
    # 1.0 / scale = 16383.75 -> 16384 steps; -1 -> code 0; 3 -> 65535; 5 clamps to 65535
    assert quantize_to_int(x, qp).tolist() == [32768, 0, 65535, 65535]
    expected = torch.tensor([16384.0, -16384.0, 49151.0, 49151.0]) * qp.scale
    assert torch.equal(fake_quantize(x, qp), expected)


def test_int4_groupwise_weight_by_hand():
    # 2 output channels x 64 inputs, group 32: 4 groups with their own symmetric int4 scale
    w = torch.zeros(2, 64)
    w[0, 0], w[0, 1], w[0, 2] = 7.0, 2.5, 3.5  # group (0, 0): amax 7 -> scale 1
    w[0, 32], w[0, 33] = -14.0, 5.0  # group (0, 1): amax 14 -> scale 2
    w[1, 0], w[1, 1], w[1, 2] = 3.5, 0.75, 1.25  # group (1, 0): amax 3.5 -> scale 0.5
    w[1, 40] = 0.0  # group (1, 1): all zero -> the smallest scale, zeros stay zero
    spec = FORMATS["w4a8"].weight(QuantSpec(bits=8, symmetric=True, per_channel=True, group_size=32))
    assert (spec.bits, spec.qmin, spec.qmax, spec.group_size) == (4, -8, 7, 32)
    qp = weight_qparams(w, spec)
    assert qp.scale.reshape(2, 2)[:, 0].tolist() == [1.0, 0.5] and qp.scale.reshape(2, 2)[0, 1].item() == 2.0
    fq = fake_quantize(w, qp)
    # half to even: 2.5 -> 2, 3.5 -> 4; 5/2 = 2.5 -> 2 -> 4.0; 0.75/0.5 = 1.5 -> 2 -> 1.0; 1.25/0.5 = 2.5 -> 2 -> 1.0
    assert fq[0, :3].tolist() == [7.0, 2.0, 4.0]
    assert fq[0, 32:34].tolist() == [-14.0, 4.0]
    assert fq[1, :3].tolist() == [3.5, 1.0, 1.0]
    assert torch.count_nonzero(fq[1, 32:]) == 0
    assert quantize_to_int(w, qp)[0, :3].tolist() == [7, 2, 4]
    # per output channel instead (no groups): row 0's scale is 14/7 = 2 for all 64 inputs
    per_channel = fake_quantize(w, weight_qparams(w, FORMATS["w4a8"].weight(QuantSpec(symmetric=True,
                                                                                      per_channel=True))))
    assert per_channel[0, :3].tolist() == [8.0, 2.0, 4.0]  # 7/2 = 3.5 -> 4 -> 8; 2.5/2 = 1.25 -> 1 -> 2


def test_groupwise_last_group_may_be_shorter_and_conv_weights_group_along_inputs():
    w = torch.zeros(1, 40)
    w[0, 39] = 7.0  # the second group holds inputs 32..39 only
    qp = weight_qparams(w, QuantSpec(bits=4, symmetric=True, per_channel=True, group_size=32))
    assert qp.scale.tolist() == [pytest.approx(torch.finfo(torch.float32).eps), 1.0]
    conv = torch.zeros(2, 3, 2, 2)
    conv[1, 2, 1, 0] = -3.5  # one scale per (output, group, kernel position): 2 x 1 x 2 x 2
    qp = weight_qparams(conv, QuantSpec(bits=4, symmetric=True, per_channel=True, group_size=32))
    assert qp.scale.numel() == 8 and qp.scale.reshape(2, 1, 2, 2)[1, 0, 1, 0].item() == 0.5
    assert fake_quantize(conv, qp)[1, 2, 1, 0].item() == -3.5
    with pytest.raises(ValueError, match="group_size needs a weight of 2 or more axes"):
        weight_qparams(torch.ones(4), QuantSpec(bits=4, group_size=2))


def test_e4m3_rounding_saturation_and_subnormals_by_hand():
    spec = FORMATS["fp8"].activation(QuantConfig().activation)
    assert (spec.encoding, spec.symmetric) == ("e4m3", True)
    qp = qparams_from_range(torch.tensor(-448.0), torch.tensor(10.0), spec)
    assert qp.scale.item() == 1.0  # amax / 448
    x = torch.tensor([448.0, 500.0, -1000.0,  # saturate at +-448 (E4M3 has no infinity)
                      1.0625, 1.1875,  # [1, 2): steps of 1/8; both halfway -> the even mantissa: 1.0, 1.25
                      232.0, 0.3,  # [128, 256): steps of 16, 232 halfway -> 224; [0.25, 0.5): steps of 1/32 -> 0.3125
                      2.0**-9, 2.0**-10, 3 * 2.0**-10])  # subnormals: 2^-9 is the smallest; half of it -> 0;
    #                                                      1.5 of it -> 2 (even) = 2^-8
    expected = [448.0, 448.0, -448.0, 1.0, 1.25, 224.0, 0.3125, 2.0**-9, 0.0, 2.0**-8]
    assert fake_quantize(x, qp).tolist() == expected
    # a scale of 2 (amax 896): 1000 -> 500 saturates at 448 -> 896; 3.0 -> 1.5 exact -> 3.0
    qp2 = qparams_from_range(torch.tensor(-896.0), torch.tensor(0.0), spec)
    assert fake_quantize(torch.tensor([1000.0, 3.0, 2.0**-8]), qp2).tolist() == [896.0, 3.0, 2.0**-8]


def test_fp8_weights_per_channel_scale():
    spec = FORMATS["fp8"].weight(QuantConfig().weight)
    w = torch.tensor([[448.0, 1.0625], [0.5, -0.3]])  # row scales 1 and 0.5/448
    fq = fake_quantize(w, weight_qparams(w, spec))
    assert fq[0].tolist() == [448.0, 1.0]
    # -0.3 / (0.5/448) = -268.8; in [256, 448) E4M3 steps by 32 -> -256 -> -256 * 0.5/448
    assert fq[1].tolist() == pytest.approx([0.5, -256 * 0.5 / 448], rel=1e-6)
    per_tensor = fake_quantize(w, weight_qparams(w, FORMATS["fp8"].weight(QuantSpec(per_channel=False))))
    assert per_tensor[1].tolist() == [0.5, pytest.approx(-0.3125)]  # scale 1: [0.25, 0.5) steps by 1/32


# -- the formats: key ----------------------------------------------------------------------
def test_every_format_gives_its_bits_on_a_linear_site(qm):
    fc1 = _site(qm, "blocks.0.mlp.fc1")
    bits = {}
    for name in FORMATS:
        specs = QuantConfig(formats={"blocks.0.mlp.fc1": name}).slot_specs(fc1)
        bits[name] = tuple(None if s is None else (s.bits, s.encoding) for s in (specs["input"], specs["weight"]))
    assert bits == {"int8": ((8, "int"), (8, "int")), "a16w8": ((16, "int"), (8, "int")),
                    "w4a8": ((8, "int"), (4, "int")), "w8": (None, (8, "int")), "w4": (None, (4, "int")),
                    "fp8": ((8, "e4m3"), (8, "e4m3")), "float": (None, None)}


def test_formats_by_name_glob_and_kind_later_wins_float_sites_win(qm):
    cfg = QuantConfig(formats={"residual": "a16w8", "blocks.1.*": "fp8", "blocks.0.mlp.fc2": "w4a8"},
                      float_sites=["blocks.1.attn.q"])
    fmt = {s.name: cfg.format_of(s).name for s in qm.sites}
    assert fmt["blocks.0.residual_attn"] == "a16w8" and fmt["blocks.1.residual_mlp"] == "fp8"  # later wins
    assert fmt["blocks.0.mlp.fc2"] == "w4a8" and fmt["blocks.0.mlp.fc1"] == "int8" and fmt["head"] == "int8"
    assert cfg.is_float(_site(qm, "blocks.1.attn.q"))  # the skip-list keeps it float whatever its format
    assert cfg.is_float(_site(qm, "blocks.1.norm1"))  # so do the float kinds
    assert not cfg.is_float(_site(qm, "blocks.1.attn.k"))
    assert QuantConfig(formats={"head": "float"}).is_float(_site(qm, "head"))
    # weight-only at a site without weights quantizes nothing: float, and counted so
    weight_only = QuantConfig(formats={"blocks.0.*": "w8"})
    assert weight_only.is_float(_site(qm, "blocks.0.attn.matmul_qk"))
    assert weight_only.is_float(_site(qm, "blocks.0.residual_mlp"))
    assert not weight_only.is_float(_site(qm, "blocks.0.attn.q"))


def test_unknown_format_and_unmatched_pattern_are_one_line_errors(qm):
    with pytest.raises(ConfigError) as e:
        QuantConfig.from_dict({"formats": {"*.fc1": "int3"}})
    assert str(e.value) == ("formats '*.fc1': unknown format 'int3'; formats are "
                            + ", ".join(FORMATS))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"pattern 'blocks\.9\.\*' matches no site of this model"):
        QuantConfig(formats={"blocks.9.*": "a16w8"}).validate(qm.sites)
    with pytest.raises(ConfigError, match=r"formats 'softmax': every site it names is of a float kind \(softmax\); "
                                          r"remove softmax from float_kinds to give it format a16w8"):
        QuantConfig(formats={"softmax": "a16w8"}).validate(qm.sites)
    QuantConfig(formats={"softmax": "a16w8"}, float_kinds=["layernorm", "gelu"]).validate(qm.sites)
    with pytest.raises(ConfigError, match="group_size applies to weights only"):
        QuantConfig.from_dict({"activation": {"group_size": 32}})
    with pytest.raises(ConfigError, match="group_size must be a positive integer"):
        QuantConfig.from_dict({"weight": {"group_size": 0}})


def test_a_registered_format_is_usable_by_name(qm):
    from dataclasses import replace

    @register_format("a12w8_test")
    class A12W8(Format):
        weight_bits, activation_bits = 8, 12

        def activation(self, spec):
            return replace(spec, bits=12)
    try:
        cfg = QuantConfig.from_dict({"formats": {"head": "a12w8_test"}})
        assert cfg.slot_specs(_site(qm, "head"))["input"].qmax == 4095
        with pytest.raises(ValueError, match="already registered"):
            register_format("a12w8_test")(A12W8)
    finally:
        unregister_format("a12w8_test")


def test_to_dict_of_existing_configs_is_byte_identical_to_before_formats():
    # main's output at 6085bdf, before formats existed: result logs are keyed by its hash
    default = ('{"name": "custom", "activation": {"bits": 8, "symmetric": false, "per_channel": false, '
               '"observer": "minmax", "percentile": 99.99}, "weight": {"bits": 8, "symmetric": true, '
               '"per_channel": true, "observer": "minmax", "percentile": 99.99}, "float_kinds": '
               '["layernorm", "gelu", "softmax"], "float_sites": [], "overrides": {}}')
    mixed_1 = default.replace('"custom"', '"mixed_1"').replace('"float_sites": []', '"float_sites": ["*.residual_*"]')
    assert json.dumps(QuantConfig().to_dict()) == default
    assert json.dumps(preset("mixed_1", []).to_dict()) == mixed_1
    # and a config with formats and a group size round-trips, writing them
    cfg = QuantConfig(formats={"*.fc1": "w4a8"}, overrides={"*.fc1": {"weight": {"group_size": 32}}})
    d = cfg.to_dict()
    assert d["formats"] == {"*.fc1": "w4a8"} and QuantConfig.from_dict(d) == cfg


def test_weight_only_format_leaves_the_activation_float_in_the_model(qm, pixels):
    from quant.calibrate import calibrate
    calibrate(qm, [pixels])
    qm.apply(QuantConfig(formats={"blocks.0.mlp.fc1": "w4", "blocks.0.mlp.fc2": "a16w8"}))
    fc1, fc2 = qm.quantizers["blocks.0.mlp.fc1"], qm.quantizers["blocks.0.mlp.fc2"]
    assert (fc1["input"].mode, fc1["weight"].mode, fc1["weight"].qparams.qmax) == (FLOAT, QUANT, 7)
    assert (fc2["input"].qparams.qmax, fc2["weight"].qparams.qmax) == (65535, 127)
    with pytest.raises(SiteError, match="site blocks.0.attn.matmul_qk:q: the mse observer models an integer grid"):
        qm.apply(QuantConfig(formats={"matmul_qk": "fp8"}, overrides={"*": {"activation": {"observer": "mse"}}}))
    qm.apply(None)


def test_error_analysis_measures_weights_in_their_format(qm):
    from analysis.errors import weight_errors

    int8 = weight_errors(qm, QuantConfig()).set_index("site")
    w4 = weight_errors(qm, QuantConfig(formats={"head": "w4", "blocks.0.mlp.fc1": "fp8"})).set_index("site")
    # 4 bits fewer: ~6 dB a bit lower SQNR at the w4 site, the same elsewhere
    assert int8.loc["head", "per_channel_sqnr_db"] - w4.loc["head", "per_channel_sqnr_db"] > 18
    assert w4.loc["blocks.0.mlp.fc2", "per_channel_sqnr_db"] == int8.loc["blocks.0.mlp.fc2", "per_channel_sqnr_db"]
    assert w4.loc["blocks.0.mlp.fc1", "per_channel_sqnr_db"] != int8.loc["blocks.0.mlp.fc1", "per_channel_sqnr_db"]


# -- cost ------------------------------------------------------------------------------------
def test_bitops_of_a_mixed_format_config_by_hand(qm, pixels):
    macs = site_macs(qm, pixels)
    linear, qk, embed, head = 17 * 32 * 32, 2 * 17 * 17 * 16, 16 * 32 * 3 * 8 * 8, 32 * 5
    fc = 17 * 32 * 64
    total = embed + head + 2 * (4 * linear + 2 * qk + 2 * fc)
    assert sum(macs.values()) == total
    assert bitops(preset("all", qm.sites), qm.sites, macs) == total * 64
    cfg = QuantConfig(formats={"blocks.0.mlp.fc1": "w4a8", "blocks.0.attn.matmul_av": "a16w8", "head": "w8"},
                      float_sites=["blocks.1.mlp.fc2"])
    expected = ((total - fc - qk - head - fc) * 8 * 8
                + fc * 8 * 4  # w4a8
                + qk * 16 * 16  # a16w8 matmul: both operands are int16 activations
                + head * 32 * 8  # w8: float activation x int8 weight
                + fc * 32 * 32)  # float
    assert bitops(cfg, qm.sites, macs) == expected
    assert relative_bitops(cfg, qm.sites, macs) == pytest.approx(expected / (total * 64))
    assert relative_bitops(None, qm.sites, macs) == 16.0


def test_weight_bytes_by_hand(qm):
    # weights: patch_embed 32x3x8x8, per block q/k/v/o 32x32 and fc1/fc2 32x64, head 5x32
    embed, linear, fc, head = 32 * 3 * 8 * 8, 32 * 32, 32 * 64, 5 * 32
    n = embed + head + 2 * (4 * linear + 2 * fc)
    assert weight_bytes(None, qm) == 4 * n
    channels = 32 + 5 + 2 * (4 * 32 + 64 + 32)  # one float32 scale per output channel
    assert weight_bytes(QuantConfig(), qm) == n + 4 * channels
    cfg = QuantConfig(formats={"blocks.0.mlp.fc2": "w4"}, overrides={"blocks.0.mlp.fc2": {"weight": {"group_size": 32}}})
    # fc2 (32 out x 64 in): 4 bits an element, 32 x 2 group scales instead of 32 channel scales
    assert weight_bytes(cfg, qm) == n - fc / 2 + 4 * (channels - 32 + 64)
