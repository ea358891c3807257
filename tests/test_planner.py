"""Planner: reference rows first, only improving steps kept, resumable measurements."""

import torch

from analysis.planner import Budget, Planner, site_macs
from analysis.sensitivity import analyze_sensitivity
from quant.presets import preset
from tests.test_sensitivity import _setup


def _tables(qm, pixels, labels, tmp_path, start):
    only, _ = analyze_sensitivity(qm, start, iter(pixels), labels, tmp_path, progress=False, batch_size=8)
    all_but, _ = analyze_sensitivity(qm, start, iter(pixels), labels, tmp_path, mode="all-but", progress=False,
                                     batch_size=8)
    return only, all_but


def test_plan_steps_improve_and_meet_a_reachable_budget(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    start = preset("all", qm.sites)
    only, all_but = _tables(qm, pixels, labels, tmp_path, start)
    planner = Planner(qm, pixels, labels, tmp_path, Budget(max_drop=None, min_agreement=100.0), progress=False)
    plan = planner.plan(start, only, all_but, max_fallbacks=40)
    steps = planner.table()
    assert steps["change"].tolist()[:5] == ["FP32", "preset all", "preset mixed_1", "preset mixed_2", "start from all"]
    assert steps.loc[0, "agreement"] == 100 and steps.loc[0, "int8_macs_share"] == 0
    improving = steps.iloc[4:]
    assert (improving["agreement"].diff().dropna() >= 0).all()  # kept steps never make it worse
    assert planner.met and steps["agreement"].iloc[-1] == 100
    # the final row is the plan itself, measured again from scratch
    qm.apply(plan)
    again = torch.cat([qm(p) for p in pixels]).argmax(-1)
    qm.apply(None)
    fp32 = torch.cat([qm(p) for p in pixels]).argmax(-1)
    assert bool((again == fp32).all())


def test_generous_budget_stops_at_the_start_config(tmp_path):
    qm, pixels, labels = _setup()
    start = preset("mixed_1", qm.sites)
    only, all_but = _tables(qm, pixels, labels, tmp_path, start)
    planner = Planner(qm, pixels, labels, tmp_path, Budget(max_drop=100.0), progress=False)
    plan = planner.plan(start, only, all_but)
    assert len(planner.steps) == 5 and plan.float_sites == start.float_sites


def test_macs_shares(tmp_path):
    qm, pixels, _ = _setup()
    macs = site_macs(qm, pixels[0])
    # tiny ViT: 16 patches + CLS = 17 tokens, hidden 32, MLP 64
    assert macs["vit.layers.0.mlp.fc1"] == 17 * 32 * 64
    assert macs["vit.layers.0.attention.matmul_qk"] == 2 * 17 * 17 * 16  # heads x T x T x head_dim
    assert macs["vit.embeddings.patch_embeddings.projection"] == 16 * 32 * 3 * 8 * 8
    assert macs["classifier"] == 32 * 5


def test_measurements_resume_from_the_log(tmp_path):
    qm, pixels, labels = _setup()
    cfg = preset("all", qm.sites)
    first = Planner(qm, pixels, labels, tmp_path, progress=False).measure(cfg)
    second = Planner(qm, pixels, labels, tmp_path, progress=False)
    assert len(second.log.done) == 1 and second.measure(cfg) == first


def test_agreement_budget_ranks_by_agreement_before_a_lucky_top1():
    budget = Budget(max_drop=0.5, min_agreement=80.0)
    lucky = {"top1_drop": 0.4, "agreement": 65.0, "kl": 0.2}
    steady = {"top1_drop": 1.2, "agreement": 76.0, "kl": 0.1}
    assert budget.score(steady) > budget.score(lucky) and not budget.met(steady)
    drop_only = Budget(max_drop=0.5)
    assert drop_only.score(lucky) > drop_only.score(steady) and drop_only.met(lucky)
