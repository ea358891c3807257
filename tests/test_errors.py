"""The error analyzer: planted outliers are found, metrics match analysis.metrics."""

import json
import math

import numpy as np
import pytest
import torch

from analysis.errors import ACTIVATION_COLUMNS, WEIGHT_COLUMNS, analyze_errors, channel_outliers
from analysis.artifacts import RUN_CONTEXT
from analysis.metrics import cosine, mse, relative_l2, sqnr_db
from quant.calibrate import calibrate
from quant.config import QuantConfig
from quant.model import QuantModel
from quant.modes import FLOAT
from quant.presets import preset
from tests.conftest import tiny_model

OUTLIER = 7
FC2 = "blocks.1.mlp.fc2"
EQUAL_ROWS = "blocks.0.attn.q"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared, loaded
    machine the thread hand-offs make every op ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(n)]


def _calibrated(model) -> tuple[QuantModel, list[torch.Tensor]]:
    qm, batches = QuantModel(model), _batches()
    calibrate(qm, batches, progress=False)
    return qm, batches


def _row(df, tensor: str):
    rows = df[df.tensor == tensor]
    assert len(rows) == 1, tensor
    return rows.iloc[0]


@pytest.fixture(scope="module")
def planted():
    """A 3-block ViT with a planted outlier channel and a linear whose rows share one scale."""
    model = tiny_model("vit", num_hidden_layers=3)
    with torch.no_grad():
        fc2 = model.get_submodule("vit.layers.1.mlp.fc2")  # FC2's module
        fc2.weight[OUTLIER] *= 50
        fc2.bias[OUTLIER] = 20.0  # HF initialises biases to 0: scaling it would plant nothing
        q = model.get_submodule("vit.layers.0.attention.q_proj").weight  # EQUAL_ROWS's module
        q.copy_(q / q.abs().amax(1, keepdim=True) * 0.05)
    qm, batches = _calibrated(model)
    report = analyze_errors(qm, preset("all", qm.sites), batches, progress=False)
    return qm, report


def test_planted_outlier_channel_is_found(planted):
    _, report = planted
    acts = report.activations
    assert list(acts.columns) == list(ACTIVATION_COLUMNS)
    row = _row(acts, "blocks.1.residual_mlp:output")
    assert row.outlier_channels == str(OUTLIER) and row.n_outlier_channels == 1
    assert row.bits_lost > 2
    block_1_residuals = acts[(acts.block == 1) & (acts.kind == "residual")]
    assert block_1_residuals.bits_lost.idxmax() == row.name
    # (max/p99.9 cannot see it: one channel of 32 is 3% of the values, above p99.9)
    # upstream of the plant nothing is an outlier; the LayerNorm after it is another matter
    assert (acts[acts.block == 0].n_outlier_channels.dropna() == 0).all()
    assert report.channel_max[row.tensor].argmax() == OUTLIER
    # the model is handed back all float with no tap left behind
    assert all(tq.mode == FLOAT and not tq.taps for tq in planted[0].tensor_quantizers())


def test_outlier_statistics_match_exact_values():
    qm, batches = _calibrated(tiny_model("vit"))
    captured = []
    tq = qm.quantizers["blocks.0.residual_attn"]["output"]
    tq.taps.append(lambda _, x, out: captured.append(out.reshape(-1).double()))
    for b in batches:
        qm(b)
    tq.taps.clear()
    row = _row(analyze_errors(qm, preset("all", qm.sites), batches, progress=False).activations, tq.name)
    x = torch.cat(captured)
    assert row.max_abs == pytest.approx(float(x.abs().max()))
    for col, q in (("p99", 0.99), ("p99_9", 0.999)):  # log-binned histogram: ~0.5% resolution
        assert row[col] == pytest.approx(float(torch.quantile(x.abs(), q)), rel=0.02)
    centred = x - x.mean()
    assert row["kurtosis"] == pytest.approx(float(centred.pow(4).mean() / centred.pow(2).mean() ** 2), rel=1e-9)


def test_isolated_error_equals_metrics_by_hand():
    qm, batches = _calibrated(tiny_model("vit"))
    only_fc2 = QuantConfig(float_kinds=[], float_sites=[s.name for s in qm.sites if s.name != FC2])
    tq = qm.quantizers[FC2]["input"]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    tq.taps.append(lambda _, x, out: seen.append((x.clone(), out.clone())))
    qm.apply(only_fc2)
    for b in batches:
        qm(b)
    tq.taps.clear()
    qm.apply(None)
    ref, approx = (torch.cat(t) for t in zip(*seen))

    acts = analyze_errors(qm, only_fc2, batches, progress=False).activations
    row = _row(acts, tq.name)
    assert bool(row.int8) and acts.int8.sum() == 1
    # everything upstream is float, so isolated and accumulated error are the same thing
    for prefix in ("isolated", "acc"):
        assert abs(row[f"{prefix}_sqnr_db"] - sqnr_db(ref, approx)) < 1e-6
        assert row[f"{prefix}_cosine"] == pytest.approx(cosine(ref, approx), abs=1e-12)
        assert row[f"{prefix}_mse"] == pytest.approx(mse(ref, approx), rel=1e-9)
        assert row[f"{prefix}_rel_l2"] == pytest.approx(relative_l2(ref, approx), rel=1e-9)
    before, after = acts.loc[:row.name - 1], acts.loc[row.name + 1:]
    assert (before.acc_sqnr_db == math.inf).all() and (before.acc_cosine == 1).all()
    assert np.isfinite(after.acc_sqnr_db).all()
    # float sites still get an isolated error: what quantizing them would cost
    assert np.isfinite(acts.isolated_sqnr_db).all()


def test_all_float_config_has_no_accumulated_error():
    qm, batches = _calibrated(tiny_model("vit"))
    all_float = QuantConfig(float_kinds=[], float_sites=["*"])
    acts = analyze_errors(qm, all_float, batches[:2], progress=False).activations
    assert not acts.int8.any()
    assert (acts.acc_sqnr_db == math.inf).all() and (acts.acc_cosine == 1.0).all()
    assert (acts.acc_mse == 0).all()


@pytest.mark.parametrize("family", ["deit", "dinov2"])
def test_accumulated_error_grows_with_depth(family):
    qm, batches = _calibrated(tiny_model(family, num_hidden_layers=3))
    acts = analyze_errors(qm, preset("all", qm.sites), batches[:2], progress=False).activations
    residual = acts[acts.role == "residual_mlp"].acc_sqnr_db.tolist()
    assert len(residual) == 3
    assert residual[-1] < residual[0]
    assert np.isfinite(acts.acc_sqnr_db).all()  # the patch embedding is int8: nothing is exact


def test_per_channel_weights_help_only_uneven_rows(planted):
    _, report = planted
    w = report.weights.set_index("site")
    assert list(report.weights.columns) == list(WEIGHT_COLUMNS)
    assert len(w) == 1 + 3 * 6 + 1  # patch embedding, six linears per block, head
    assert w.loc[FC2, "per_channel_gain_db"] > 10
    assert abs(w.loc[EQUAL_ROWS, "per_channel_gain_db"]) < 0.5
    gain = w.drop(index=[FC2, EQUAL_ROWS]).per_channel_gain_db
    assert ((gain > 0) & (gain < 10)).all()
    row = w.loc[FC2]
    assert row.per_channel_gain_db == pytest.approx(row.per_channel_sqnr_db - row.per_tensor_sqnr_db)


def test_save_writes_tables_and_channel_maxima(planted, tmp_path):
    _, report = planted
    with pytest.raises(ValueError, match="missing"):  # the schema wants the run context (model, data, ...)
        report.save(tmp_path / "out", {"calibration_s": 1.0, "wall_s": 2.0})
    report.meta.update({k: None for k in RUN_CONTEXT})
    paths = report.save(tmp_path / "out", {"calibration_s": 1.0, "wall_s": 2.0})
    assert json.loads((tmp_path / "out" / "errors_weights.run.json").read_text())["wall_s"] == 2.0
    names = sorted(p.name for p in paths)
    assert names == sorted(["errors_activations.csv", "errors_activations.json", "errors_weights.csv",
                            "errors_weights.json", "errors_channels.npz"])
    assert all(p.is_file() for p in paths)
    acts = report.activations
    with_channels = acts[acts.n_outlier_channels.notna()].tensor.tolist()
    no_channels = (acts.kind == "conv") | (acts.kind == "softmax") | (acts.slot == "probs")
    assert sorted(with_channels) == sorted(acts[~no_channels].tensor)
    with np.load(tmp_path / "out" / "errors_channels.npz") as npz:
        assert sorted(npz.files) == sorted(with_channels) == sorted(report.channel_max)
        assert np.array_equal(npz["blocks.1.residual_mlp:output"],
                              report.channel_max["blocks.1.residual_mlp:output"])


def test_each_tensor_is_listed_once_through_same_tensor_as(planted):
    _, report = planted
    acts = report.activations.set_index("tensor")
    # fc2's input is the GELU output; q/k/v and fc1 read the LayerNorm outputs
    assert acts.loc["blocks.1.mlp.fc2:input", "same_tensor_as"] == "blocks.1.mlp.gelu:output"
    assert acts.loc["blocks.0.attn.k:input", "same_tensor_as"] == "blocks.0.norm1:output"
    assert acts.loc["blocks.0.mlp.fc1:input", "same_tensor_as"] == "blocks.0.norm2:output"
    assert acts.loc["blocks.1.residual_mlp:output", "same_tensor_as"] == ""
    once = acts[acts["same_tensor_as"] == ""]
    # the residual outputs feed the next LayerNorm, not a quantizer: every residual is its own tensor
    assert (once["kind"] == "residual").sum() == (acts["kind"] == "residual").sum()


def test_sparse_activation_is_not_flagged_but_a_real_outlier_is():
    # 1000 tokens x 64 channels: 50 channels fire rarely (max ~0.1), 13 fire often (max ~3):
    # the median channel max is small, so k x median would flag all 13 ordinary channels
    rng = np.random.default_rng(0)
    tcm = np.abs(rng.normal(0, 0.03, (1000, 64)))
    tcm[:, 50:63] = np.abs(rng.normal(0, 1.0, (1000, 13)))
    sparse = channel_outliers(tcm, 6.0)
    assert sparse["n_outlier_channels"] == 0
    tcm[0, 63] = 400.0  # one massive activation on token 0, channel 63
    planted = channel_outliers(tcm, 6.0)
    assert planted["outlier_channels"] == "63" and planted["outlier_tokens"] == "0"
    assert planted["bits_lost"] == pytest.approx(np.log2(400.0 / tcm[:, :63].max()))
    tcm[:, 63] = 400.0  # on every token
    assert channel_outliers(tcm, 6.0)["outlier_tokens"] == "all"
