"""The export target registry (vitq/targets/) and `vitq export --to`: what every target shares."""

from __future__ import annotations

import pytest
import torch

from quant.calibrate import calibrate
from quant.config import QuantConfig
from quant.model import QuantModel
from tests.conftest import tiny_model
from vitq.targets import (TARGETS, ExportContext, Target, TargetError, TargetExport, get_target, register_target,
                          unregister_target)
from vitq.targets.base import check_expressible

# the tests' plan on the tiny 2-block ViT: three float sites beside the backend float kinds
FLOAT_SITES = ["blocks.0.attn.q", "blocks.1.attn.matmul_av", "blocks.1.residual_attn"]
PLAN = QuantConfig(name="plan", float_sites=list(FLOAT_SITES))


def plan_context(out, config: QuantConfig = PLAN, family: str = "vit") -> ExportContext:
    """A calibrated tiny model (2 blocks) and ``config`` ready for a target."""
    qm = QuantModel(tiny_model(family))
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibrate(qm, calib, progress=False)
    return ExportContext(qm, config, out, calib[0][:1], calib)


def test_every_module_of_the_package_registers_its_target():
    assert {"ort-quantizer", "nncf", "torchao", "modelopt", "litert"} <= set(TARGETS)
    assert all(type(t).name == name for name, t in TARGETS.items())


def test_a_target_registered_from_here_is_found_and_a_taken_name_refused():
    @register_target("test-only")
    class Only(Target):
        tool = "nothing"

        def build(self, ctx):
            return TargetExport(self.name, self.tool, {}, "", [])
    try:
        assert get_target("test-only").export.__self__ is TARGETS["test-only"]
        with pytest.raises(ValueError, match="already registered"):
            register_target("test-only")(Only)
    finally:
        unregister_target("test-only")
    with pytest.raises(TargetError, match="unknown export target 'test-only'; targets are .*ort-quantizer"):
        get_target("test-only")


def test_a_missing_tool_is_one_line_naming_what_to_install():
    class Missing(Target):
        name = "missing"
        modules = ("surely_not_installed_module_xyz",)
        extra = "pip install 'vitq[xyz]'"
    with pytest.raises(TargetError) as e:
        Missing().require()
    assert "\n" not in str(e.value) and "pip install 'vitq[xyz]'" in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"smooth": {"*.norm2": 0.5}}, "smoothing"),
    ({"bias_correction": ["*"]}, "bias correction"),
    ({"formats": {"*.mlp.fc1": "w4a8"}}, "formats w4a8"),
    ({"weight": {"bits": 4}}, "weights other than 8-bit"),
])
def test_a_config_beyond_a_skip_list_is_refused(change, message):
    sites = QuantModel(tiny_model("vit")).sites
    config = QuantConfig.from_dict({**PLAN.to_dict(), **change})
    with pytest.raises(TargetError, match=message):
        check_expressible(config, sites, "ort-quantizer")
    check_expressible(PLAN, sites, "ort-quantizer")  # the plain skip-list passes


def test_cli_unknown_target_is_one_line(capsys, tmp_path):
    from vitq.cli import main
    assert main(["export", "--to", "tflite-nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitq: error: unknown export target 'tflite-nope'") and "\n" not in err
