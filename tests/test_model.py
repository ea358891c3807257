"""The instrumented model: exact float path, local effect of one quantized site."""

import pytest
import torch

from quant.calibrate import calibrate
from quant.config import QuantConfig
from quant.families import family_of
from quant.model import QuantModel
from quant.modes import SiteError
from quant.presets import preset
from tests.conftest import tiny_model


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
def test_everything_float_is_bit_exact_with_transformers_eager(family, pixels):
    model = tiny_model(family)
    with torch.no_grad():
        reference = model(pixels).logits
    qm = QuantModel(model)
    calibrate(qm, [pixels], progress=False)
    skip_all = QuantConfig(float_kinds=[], float_sites=["*"])
    qm.apply(skip_all)
    assert torch.equal(qm(pixels), reference)


def _block_outputs(qm, pixels):
    outs, h = [], qm.embed(pixels)
    with torch.inference_mode():
        for b in range(qm.num_blocks):
            h = qm.run_blocks(h, b, b + 1)
            outs.append(h.clone())
    return outs


def test_quantizing_one_site_changes_only_what_is_downstream(pixels):
    qm = QuantModel(tiny_model("vit", num_hidden_layers=3))
    calibrate(qm, [pixels], progress=False)
    float_out = _block_outputs(qm, pixels)
    only_fc2_of_block_1 = QuantConfig(float_kinds=[], float_sites=["*"])
    qm.apply(None)
    qm.quantize_site("blocks.1.mlp.fc2", only_fc2_of_block_1.slot_specs(qm.site_by_name["blocks.1.mlp.fc2"]))
    quant_out = _block_outputs(qm, pixels)
    assert torch.equal(quant_out[0], float_out[0])
    assert not torch.equal(quant_out[1], float_out[1])
    assert not torch.equal(quant_out[2], float_out[2])


def test_quantized_presets_differ_from_float_but_stay_close(pixels):
    qm = QuantModel(tiny_model("dinov2"))
    calibrate(qm, [pixels], progress=False)
    ref = qm(pixels)
    for name in ("all", "mixed_1", "mixed_2"):
        qm.apply(preset(name, qm.sites))
        out = qm(pixels)
        assert not torch.equal(out, ref)
        assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9


def test_snapshot_restore_switches_configs(pixels):
    qm = QuantModel(tiny_model("vit"))
    calibrate(qm, [pixels], progress=False)
    s_float, s_all = qm.prepare(None), qm.prepare(preset("all", qm.sites))
    out_all = qm(pixels)
    qm.restore(s_float)
    out_float = qm(pixels)
    qm.restore(s_all)
    assert torch.equal(qm(pixels), out_all) and not torch.equal(out_all, out_float)


def test_nan_during_calibration_names_the_site(pixels):
    model = tiny_model("vit")
    with torch.no_grad():
        fc1 = next(s.path for s in family_of(model).sites(model) if s.name == "blocks.1.mlp.fc1")
        model.get_submodule(fc1).bias[3] = float("nan")
    qm = QuantModel(model)
    with pytest.raises(SiteError, match=r"^site blocks\.1\.mlp\.gelu:output: \d+ non-finite value\(s\) \(NaN/Inf\) during calibration$"):
        calibrate(qm, [pixels], progress=False)


def test_quantize_before_calibration_is_an_error(pixels):
    qm = QuantModel(tiny_model("vit"))
    with pytest.raises(SiteError, match="no calibration data"):
        qm.apply(preset("all", qm.sites))
