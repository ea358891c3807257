import pytest

from quant.config import BACKEND_FLOAT_KINDS, ConfigError, QuantConfig
from quant.families import family_of
from quant.presets import preset
from quant.quantizer import QuantSpec
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def sites():
    model = tiny_model("vit", num_hidden_layers=6)
    return family_of(model).sites(model)


def _float(cfg, sites):
    return [s.name for s in sites if cfg.is_float(s)]


def test_presets_give_exact_skip_lists(sites):
    backend = [s.name for s in sites if s.kind in ("layernorm", "gelu", "softmax")]
    residuals = [f"blocks.{b}.{r}" for b in range(6) for r in ("residual_attn", "residual_mlp")]
    assert sorted(_float(preset("all", sites), sites)) == sorted(backend)
    assert sorted(_float(preset("mixed_1", sites), sites)) == sorted(backend + residuals)
    assert sorted(_float(preset("mixed_2", sites), sites)) == sorted(
        backend + residuals + ["blocks.4.mlp.fc2", "blocks.5.mlp.fc2"])
    assert preset("fp32", sites) is None


def test_nncf_preset_is_residual_adds_and_matmul_av_float_by_hand(sites):
    """NNCF's transformer placement on the 6-block tiny ViT, every name written out."""
    names = [f"blocks.{b}.{r}" for b in range(6)
             for r in ("norm1", "attn.softmax", "attn.matmul_av", "residual_attn", "norm2", "mlp.gelu", "residual_mlp")]
    names.append("norm")  # the final LayerNorm
    assert sorted(_float(preset("nncf", sites), sites)) == sorted(names)
    assert not any(preset("nncf", sites).is_float(s) for s in sites
                   if s.name.endswith(("attn.q", "attn.k", "attn.v", "attn.matmul_qk", "mlp.fc1", "mlp.fc2")))


def test_mixed_2_takes_sites_from_a_ranking_and_falls_back_on_shallow_models(sites):
    cfg = preset("mixed_2", sites, ["blocks.0.mlp.fc1"])
    assert "blocks.0.mlp.fc1" in _float(cfg, sites) and "blocks.4.mlp.fc2" not in _float(cfg, sites)
    shallow = tiny_model("vit")  # 2 blocks: no block 4/5, so the last two fc2
    s2 = family_of(shallow).sites(shallow)
    assert preset("mixed_2", s2).float_sites[-2:] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]


def test_yaml_and_json_round_trip(tmp_path, sites):
    cfg = QuantConfig(name="x", activation=QuantSpec(observer="percentile", percentile=99.9),
                      float_sites=["*.residual_*"], overrides={"*.fc2": {"weight": {"per_channel": False}}})
    for suffix in (".yaml", ".json"):
        cfg.save(tmp_path / f"c{suffix}")
        back = QuantConfig.load(tmp_path / f"c{suffix}")
        assert back == cfg


def test_overrides_later_pattern_wins(sites):
    cfg = QuantConfig(overrides={"*.fc2": {"activation": {"observer": "mse"}},
                                 "blocks.3.*": {"activation": {"observer": "entropy", "bits": 6}}})
    by = {s.name: s for s in sites}
    assert cfg.spec_for(by["blocks.2.mlp.fc2"], "activation").observer == "mse"
    spec = cfg.spec_for(by["blocks.3.mlp.fc2"], "activation")
    assert (spec.observer, spec.bits) == ("entropy", 6)
    assert cfg.spec_for(by["blocks.3.mlp.fc2"], "weight") == cfg.weight


def test_unknown_site_pattern_lists_close_matches(sites):
    cfg = QuantConfig(float_sites=["blocks.4.mlp.fc3"])
    with pytest.raises(ConfigError, match=r"matches no site.*close matches: blocks\.4\.mlp\.fc[12]"):
        cfg.validate(sites)


def test_pattern_matching_nothing_is_an_error(sites):
    with pytest.raises(ConfigError, match=r"'\*\.attn_\*' matches no site"):
        QuantConfig(float_sites=["*.attn_*"]).validate(sites)


@pytest.mark.parametrize("text,message", [
    ("activation: {observer: maxmin}", "unknown observer 'maxmin'"),
    ("weight: {bits: 20}", "bits must be an integer in 2..16"),
    ("float_kinds: [attention]", "unknown site kind"),
    ("skip: [a]", "unknown key"),
    ("activation: [1, 2", "not valid YAML"),
    ("- just a list", "must be a mapping"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        QuantConfig.load(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        QuantConfig.load(tmp_path / "nope.yaml")


def test_module_paths_and_their_globs_name_canonical_sites(sites):
    """A skip-list written with the installed library's module paths (vitq's names before
    canonical names) still applies: each path names the canonical site it belongs to."""
    path = {s.name: s.path for s in sites}  # vit.layers.4.mlp.fc2 (5.x), vit.encoder.layer.4.output.dense (4.x)
    by_path = QuantConfig(float_sites=[path["blocks.4.mlp.fc2"], "*attention.matmul_av",
                                       path["blocks.1.residual_attn"].rsplit(".", 1)[0] + ".residual_*"])
    by_path.validate(sites)
    floats = [s.name for s in sites if by_path.is_float(s) and s.kind not in BACKEND_FLOAT_KINDS]
    assert sorted(floats) == sorted(["blocks.1.residual_attn", "blocks.1.residual_mlp", "blocks.4.mlp.fc2"]
                                    + [f"blocks.{b}.attn.matmul_av" for b in range(6)])
