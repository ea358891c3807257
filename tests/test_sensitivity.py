"""Sensitivity analyzer: ranking, cached-prefix exactness, resume."""

import pandas as pd
import pytest
import torch

from analysis.sensitivity import analyze_sensitivity, make_candidates, most_sensitive_fc
from analysis.runner import Runner
from quant.calibrate import calibrate
from quant.config import QuantConfig
from quant.model import QuantModel
from quant.presets import preset
from tests.conftest import tiny_model


def _setup(plant: bool = False, seed: int = 0):
    model = tiny_model("vit", num_hidden_layers=3, seed=seed)
    if plant:  # channel 5 of block 1's fc1 x50 (fc2's matching column /50): an outlier in fc2's input only
        with torch.no_grad():
            mlp = model.vit.layers[1].mlp
            mlp.fc1.weight[5] *= 50
            mlp.fc1.bias[5] = 50 * mlp.fc1.bias[5].abs() + 50
            mlp.fc2.weight[:, 5] /= 50
    qm = QuantModel(model)
    g = torch.Generator().manual_seed(seed)
    pixels = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)]
    calibrate(qm, pixels, progress=False)
    labels = torch.randint(0, 5, (24,), generator=g)
    return qm, pixels, labels


def _run(qm, pixels, labels, tmp_path, **kw):
    """(table, meta with the run info under "run"), as the tests below read them."""
    df, meta, run = analyze_sensitivity(Runner(qm, pixels, labels), kw.pop("config", preset("mixed_1", qm.sites)),
                                        tmp_path, progress=False, **kw)
    return df, {**meta, "run": run}


def test_planted_outlier_site_ranks_first(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    per_tensor = QuantConfig(name="pt", float_sites=["*.residual_*"],
                             activation=preset("mixed_1", qm.sites).activation)
    df, _ = _run(qm, pixels, labels, tmp_path, config=per_tensor, rank_by="kl")
    assert df.loc[0, "candidate"] == "blocks.1.mlp.fc2"
    assert most_sensitive_fc(df, 1) == ["blocks.1.mlp.fc2"]


def test_cached_prefix_equals_naive_full_reevaluation(tmp_path):
    qm, pixels, labels = _setup()
    fast, meta = _run(qm, pixels, labels, tmp_path / "a")
    naive, _ = _run(qm, pixels, labels, tmp_path / "b", naive=True)
    cols = ["top1", "top5", "agreement", "kl", "logit_sqnr_db"]
    fast, naive = fast.sort_values("candidate").reset_index(), naive.sort_values("candidate").reset_index()
    assert fast["candidate"].tolist() == naive["candidate"].tolist()
    pd.testing.assert_frame_equal(fast[cols], naive[cols], rtol=1e-4, atol=1e-6)
    assert (fast["start_block"] >= 0).any() and (naive["start_block"] == -1).all()
    assert meta["run"]["speedup_vs_naive"] is not None and meta["run"]["full_pass_s"] > 0


def test_near_identity_quantizer_gives_near_zero_kl_and_high_sqnr(tmp_path):
    qm, pixels, labels = _setup()
    cfg = QuantConfig(float_kinds=[], float_sites=["*"])  # nothing int8 -> no candidates
    with pytest.raises(ValueError, match="no candidate"):
        _run(qm, pixels, labels, tmp_path, config=cfg)
    spec16 = dict(bits=16)
    fine = QuantConfig(name="16bit", activation=QuantConfig().activation.__class__(bits=16),
                       overrides={"*": {"weight": spec16}})
    df16, _ = _run(qm, pixels, labels, tmp_path / "16", config=fine)
    df8, _ = _run(qm, pixels, labels, tmp_path / "8", config=preset("all", qm.sites))
    # 16-bit sites are 256x finer than 8-bit ones: ~48 dB more SQNR, KL near zero, agreement 100 %
    assert (df16["agreement"] == 100).all() and df16["kl"].max() < 1e-6
    both = df16.merge(df8, on="candidate", suffixes=("16", "8"))
    assert len(both) == len(df8) and (both["logit_sqnr_db16"] > both["logit_sqnr_db8"] + 20).all()
    df, meta = _run(qm, pixels, labels, tmp_path, config=preset("all", qm.sites), mode="all-but", group="kind")
    assert set(df["candidate"]) == {"kind conv", "kind linear", "kind matmul_qk", "kind matmul_av", "kind residual"}
    # all-but: the top-ranked kind, kept float, moves the model towards FP32 (KL below the all-int8 baseline)
    assert df.loc[0, "kl"] < meta["baseline"]["kl"] and df["kl"].is_monotonic_increasing


def test_groups():
    qm, _, _ = _setup()
    by_block = make_candidates(qm.sites, preset("all", qm.sites), "block")
    assert [c.name for c in by_block] == ["block -", "block 0", "block 1", "block 2"]
    by_block = {c.name: c for c in by_block}
    by_block = [by_block["block -"], by_block["block 1"]]
    assert [s.role for s in by_block[1].sites] == ["q", "k", "v", "matmul_qk", "matmul_av", "o", "residual_attn",
                                                  "fc1", "fc2", "residual_mlp"]  # LN/GELU/softmax float
    assert [s.name for s in by_block[0].sites] == ["patch_embed", "head"]
    assert by_block[0].start(3) == -1 and by_block[1].start(3) == 1


def test_resume_after_interruption_gives_identical_table(tmp_path, monkeypatch):
    qm, pixels, labels = _setup()
    full, _ = _run(qm, pixels, labels, tmp_path / "full")

    from analysis.measurement_log import MeasurementLog
    real_add, calls = MeasurementLog.add, {"n": 0}

    def dying_add(self, row):
        if calls["n"] == 4:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_add(self, row)

    monkeypatch.setattr(MeasurementLog, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        _run(qm, pixels, labels, tmp_path / "resumed")
    monkeypatch.setattr(MeasurementLog, "add", real_add)
    resumed, meta = _run(qm, pixels, labels, tmp_path / "resumed")
    assert meta["run"]["measured_now"] == meta["candidates"] - 4
    pd.testing.assert_frame_equal(resumed.drop(columns=[]), full)
