"""The taylor (Fisher) estimate of `only` sensitivity: close to the measured KL on a tiny
model, exact probes, the CLI method and the plan's top-K measuring."""

import pandas as pd
import pytest
import torch

from analysis.runner import Runner
from analysis.sensitivity import analyze_sensitivity
from analysis.taylor import fisher_probes, rank_agreement, taylor_estimates, taylor_scores
from quant.calibrate import calibrate
from quant.model import QuantModel
from quant.presets import preset
from tests.conftest import tiny_model
from tests.test_cli import data_dir, model_dir  # noqa: F401  (module fixtures)
from vitq.cli import main


@pytest.fixture(scope="module")
def calibrated():
    qmodel = QuantModel(tiny_model("vit", num_labels=7))
    g = torch.Generator().manual_seed(3)
    calibrate(qmodel, [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)], progress=False)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)]
    return qmodel, Runner(qmodel, batches)


def test_probes_rebuild_the_softmax_fisher():
    logits = torch.randn(3, 7, dtype=torch.float64)
    u, captured = fisher_probes(logits, 6)  # rank of F is at most classes - 1
    p = torch.softmax(logits, -1)
    fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert torch.allclose(torch.einsum("kbc,kbd->bcd", u, u), fisher, atol=1e-12)
    assert torch.allclose(captured, torch.ones(3, dtype=torch.float64))
    _, part = fisher_probes(logits, 2)
    assert (part < 1).all() and (part > 0).all()


def test_estimate_tracks_the_measured_only_kl(calibrated, tmp_path):
    qmodel, runner = calibrated
    config = preset("all", qmodel.sites)
    before = qmodel.snapshot()
    estimate, info = taylor_estimates(runner, config, probes=6, micro_batch=5)
    assert info["fisher_trace_captured_mean"] == pytest.approx(1.0)
    measured, _, _ = analyze_sensitivity(runner, config, tmp_path, progress=False)
    assert set(estimate) == set(measured["candidate"])
    agreement = rank_agreement(estimate, measured)
    assert agreement["spearman"] > 0.9 and agreement["top10_in_top15"] >= 9
    kl = measured.set_index("candidate")["kl"]
    worst = kl.idxmax()
    assert estimate[worst] == pytest.approx(kl[worst], rel=0.25)  # the same quantity, in nats
    # the loop-of-backwards path equals the batched one; the model is left as it was
    looped, _ = taylor_estimates(runner, config, probes=6, batched=False)
    assert all(looped[k] == pytest.approx(estimate[k], rel=1e-6, abs=1e-15) for k in estimate)
    assert all(qmodel.snapshot()[k][0] == before[k][0] for k in before if k != "__params__")
    assert all(tq.perturb is None for tq in qmodel.tensor_quantizers())
    assert not any(p.grad is not None for p in qmodel.model.parameters())
    assert taylor_scores(runner, config, probes=6).keys() == estimate.keys()


def test_groups_are_estimated_jointly(calibrated):
    qmodel, runner = calibrated
    est, _ = taylor_estimates(runner, preset("all", qmodel.sites), group="block", probes=6)
    assert set(est) == {"block -", "block 0", "block 1"} and all(v > 0 for v in est.values())


def test_cli_taylor_and_plan_measures_top_k(model_dir, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--batch-size", "5",
              "--eval-images", "6", "--no-progress", "--out", str(out)]
    assert main(["sensitivity", "--method", "taylor", *common]) == 0
    table = pd.read_csv(out / "sensitivity_taylor_op.csv")
    assert len(table) == 22 and table["kl_estimate"].is_monotonic_decreasing
    assert main(["sensitivity", "--method", "taylor", "--mode", "all-but", *common]) == 2
    capsys.readouterr()
    assert main(["plan", *common, "--measure-top", "5", "--max-steps", "1", "--confirm-images", "0",
                 "--cost", "macs"]) == 0
    measured = pd.read_csv(out / "sensitivity_only_op.csv")
    assert sorted(measured["candidate"]) == sorted(table["candidate"].head(5))


def test_no_estimate_when_every_candidate_is_measured(model_dir, data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(["plan", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--batch-size", "5",
                 "--eval-images", "6", "--no-progress", "--out", str(out), "--measure-top", "22",
                 "--max-steps", "1", "--confirm-images", "0", "--cost", "macs"]) == 0
    assert not (out / "sensitivity_taylor_op.csv").exists()  # 22 candidates: nothing to order
    assert len(pd.read_csv(out / "sensitivity_only_op.csv")) == 22


@pytest.mark.parametrize("family", ["swin", "torchvision"])
def test_estimate_tracks_measured_kl_where_windows_or_heads_share_dim_0(family, tmp_path):
    """Swin's window attention and torch's multi-head attention quantize (B * windows or
    B * heads, ...) tensors: the per-image scalar must follow each image into them."""
    from tests.conftest import tiny_swin, tiny_torchvision_vit

    model = tiny_swin(num_labels=7) if family == "swin" else tiny_torchvision_vit(num_classes=7)
    qmodel = QuantModel(model)
    size = 32
    g = torch.Generator().manual_seed(5)
    calibrate(qmodel, [torch.randn(4, 3, size, size, generator=g)], progress=False)
    runner = Runner(qmodel, [torch.randn(4, 3, size, size, generator=g) for _ in range(2)])
    config = preset("all", qmodel.sites)
    estimate, _ = taylor_estimates(runner, config, probes=6, micro_batch=4)
    measured, _, _ = analyze_sensitivity(runner, config, tmp_path, progress=False)
    assert set(estimate) == set(measured["candidate"])
    assert rank_agreement(estimate, measured)["spearman"] > 0.8
