"""--backend torch-int8: torch.export + torchao PT2E (X86InductorQuantizer) + torch.compile."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="torchao is not installed (pip install 'vitq[int8]')")

from quant.calibrate import calibrate  # noqa: E402
from quant.model import QuantModel  # noqa: E402
from quant.presets import preset  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from vitq.torch_int8 import INT8_KINDS, TorchInt8, TorchInt8Error, check_config, torch_int8_config  # noqa: E402


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calibrated():
    qm = QuantModel(tiny_model("vit"))
    calib = [_images(16, 0)]
    calibrate(qm, calib, progress=False)
    return qm, calib


def test_configs_with_other_int8_kinds_are_refused_by_name(calibrated):
    qm, _ = calibrated
    with pytest.raises(TorchInt8Error, match="runs only conv, linear sites in int8.*matmul_av, matmul_qk, residual"):
        check_config(preset("all", qm.sites), qm.sites)
    with pytest.raises(TorchInt8Error, match="matmul_av, matmul_qk"):
        check_config(preset("mixed_1", qm.sites), qm.sites)  # residual adds float, matmuls still int8
    cfg = torch_int8_config(preset("mixed_2", qm.sites))
    assert {s.kind for s in check_config(cfg, qm.sites)} <= set(INT8_KINDS)


def test_pt2e_reference_is_bit_exact_with_the_simulation_and_keeps_the_skip_list(calibrated):
    qm, calib = calibrated
    cfg = torch_int8_config(preset("mixed_2", qm.sites))  # fc2 of the last two blocks float
    x = _images(16, 3)
    qm.apply(cfg)
    sim = qm(x)
    backend = TorchInt8(qm, calib, x[:1], compile=False)
    out = backend.build(cfg.name, cfg)(x)
    graph = backend.modules[cfg.name].graph
    weights = sum(str(n.target).startswith("quantized_decomposed.dequantize_per_channel") for n in graph.nodes)
    int8_weighted = [s for s in cfg.int8_sites(qm.sites) if s.has_weight()]
    assert weights == len(int8_weighted) == 12  # conv + 13 linear - 2 float fc2
    assert torch.allclose(out, sim, atol=1e-5, rtol=0)
    assert qm.snapshot().keys() == qm.prepare(cfg).keys()  # state kept usable


def test_cli_refuses_presets_with_int8_matmuls(tmp_path, capsys):
    from vitq.cli import main

    code = main(["eval", "--backend", "torch-int8", "--preset", "all", "--limit", "8", "--calib", "8",
                 "--out", str(tmp_path), "--no-progress"])
    assert code != 0
    assert "runs only conv, linear sites in int8" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_int8_agrees_with_the_simulation(calibrated):
    qm, calib = calibrated
    cfg = torch_int8_config(preset("all", qm.sites))
    x = _images(32, 4)
    qm.apply(cfg)
    sim = qm(x)
    out = TorchInt8(qm, calib, x[:1], compile=True).build(cfg.name, cfg)(x)
    assert (out.argmax(1) == sim.argmax(1)).float().mean() >= 0.97
    assert (out - sim).abs().max() <= 0.05 * sim.abs().max()


def test_formats_other_than_int8_are_refused_as_simulated_only(calibrated):
    from dataclasses import replace

    qm, _ = calibrated
    cfg = replace(torch_int8_config(preset("mixed_2", qm.sites)),
                  formats={"*.mlp.fc1": "w4a8", "blocks.1.attn.q": "a16w8", "head": "int8"})
    with pytest.raises(TorchInt8Error, match=r"format\(s\) w4a8: blocks.0.mlp.fc1, blocks.1.mlp.fc1; a16w8: "
                                             r"blocks.1.attn.q are simulated only on this backend"):
        check_config(cfg, qm.sites)
    assert check_config(replace(cfg, formats={"head": "int8"}), qm.sites)  # int8 is this backend's own
