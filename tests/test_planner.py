"""Planner: noise-aware moves, a monotone frontier, confirm images, resumable measurements."""

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.budget import decide
from analysis.cost import config_cost, site_macs
from analysis.metrics import OutputStats, paired_bootstrap
from analysis.planner import Budget, Planner, Point, cost_of, pareto, without_float
from analysis.runner import Runner
from analysis.sensitivity import analyze_sensitivity
from quant.config import QuantConfig
from quant.presets import preset
from tests.test_sensitivity import _setup


def _planner(tmp_path, qm, pixels, labels, budget=None, confirm=True):
    plan_runner = Runner(qm, pixels[:2], labels[:16])
    confirm_runner = Runner(qm, pixels[2:], labels[16:]) if confirm else None
    return Planner(plan_runner, confirm_runner, tmp_path, site_macs(qm, pixels[0]), budget or Budget(),
                   {"test": 1}, progress=False)


def _only(qm, pixels, labels, tmp_path, start):
    df, _, _ = analyze_sensitivity(Runner(qm, pixels[:2], labels[:16]), start, tmp_path, progress=False)
    return df


def test_paired_bootstrap_matches_a_hand_computed_standard_error():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, 400)
    b = a - 0.5 + rng.normal(0, 0.1, 400)  # b is better by 0.5 with per-image noise 0.1
    r = paired_bootstrap(a, b, n_boot=4000, seed=1)
    d = a - b
    assert r["mean"] == pytest.approx(d.mean())
    assert r["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), rel=0.1)  # se of a mean: sd / sqrt(n)
    assert r["lo"] > 0.48 and r["hi"] < 0.52
    same = paired_bootstrap(a, a + rng.normal(0, 0.1, 400), seed=1)
    assert same["lo"] < 0 < same["hi"]  # pure noise: the interval straddles zero


def test_a_change_inside_the_noise_is_not_kept(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    planner = _planner(tmp_path, qm, pixels, labels, Budget(max_drop=None, max_kl=0.0))
    start = preset("all", qm.sites)
    planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=6)
    tried = planner.tried_table()
    moves = tried[tried["kind"].isin(["remedy", "float"])]  # trims are kept by the budget, tested below
    assert len(moves) > 0
    # kept exactly when the 95 % interval of the KL gain lies above zero
    assert (moves["kept"] == (moves["gain_lo"] > 0)).all()
    # the gain of one config over another is their KL difference, measured apart by a fresh runner
    mixed_1 = preset("mixed_1", qm.sites)
    fresh = Runner(qm, pixels[:2], labels[:16])
    expected = fresh.measure(start).summary()["kl"] - fresh.measure(mixed_1).summary()["kl"]
    assert expected > 0  # keeping the residual adds float helps on this model
    better = planner.compare(planner.measure(mixed_1), planner.measure(start))
    assert better["gain"] == pytest.approx(expected, rel=1e-9)
    assert better["gain_lo"] < better["gain"] < better["gain_hi"]
    assert planner.compare(planner.measure(start), planner.measure(mixed_1))["gain"] == pytest.approx(-expected)


def test_frontier_is_monotone_in_cost_and_the_plan_meets_a_reachable_budget(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    planner = _planner(tmp_path, qm, pixels, labels, Budget(max_drop=None, max_kl=1e-4))
    start = preset("all", qm.sites)
    plan = planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=40)
    front = pd.DataFrame([p.row for p in planner.frontier])
    assert front["cost"].is_monotonic_increasing and front["kl"].is_monotonic_decreasing
    steps = planner.steps_table()
    assert steps["change"].tolist()[:6] == ["FP32", "preset all", "preset mixed_1", "preset mixed_2", "preset nncf",
                                            "start from all"]
    assert planner.met and steps.loc[steps["plan"], "kl"].iloc[0] <= 1e-4
    # the chosen point is the cheapest frontier point meeting the budget
    meeting = front[front["kl"] <= 1e-4]
    assert planner.chosen.row["cost"] == meeting["cost"].min()
    # measured again from scratch, the plan has the KL its step reported
    again = Runner(qm, pixels[:2], labels[:16]).measure(plan).summary()["kl"]
    assert again == pytest.approx(planner.chosen.row["kl"], rel=1e-9)


def test_confirm_images_are_measured_apart_and_the_verdict_names_the_best_preset(tmp_path):
    qm, pixels, labels = _setup()
    planner = _planner(tmp_path, qm, pixels, labels, Budget(max_drop=100.0, beat_references=False))
    start = preset("all", qm.sites)
    planner.plan(start, _only(qm, pixels, labels, tmp_path, start))
    confirm = planner.confirm()
    assert confirm["config"].tolist() == ["fp32", "all", "mixed_1", "mixed_2", "nncf", "plan"]
    assert (confirm["images"] == 8).all()  # the third batch only: disjoint from the 16 plan images
    best = planner.tried_table().query("kind == 'reference' and change != 'FP32'").sort_values("kl")["change"].iloc[0]
    assert best == f"preset {planner.best_reference}"  # the lowest-KL preset on the plan images
    verdict = planner.verdict()
    assert f"against the best reference preset {planner.best_reference}" in verdict
    assert "met with 95 % confidence on 16 plan images" in verdict
    # the plan is `all` (the budget holds at the start): on the confirm images it is not better than the presets
    assert planner.chosen.row["change"] == "start from all" and "NOT better than" in verdict
    # by paired intervals: the plan is `all` image for image, so against `all` it is within the noise
    # (gain exactly 0); against each other preset as a paired bootstrap computed here says
    assert planner.confirm_paired["all"] == "within the noise"
    plan_stats = planner.measure(planner.plan_config, confirm=True)
    for name in ("mixed_1", "mixed_2", "nncf"):
        ref = planner.measure(preset(name, qm.sites), confirm=True)
        kl = paired_bootstrap(ref.array("kl"), plan_stats.array("kl"))
        agree = paired_bootstrap(plan_stats.array("agree"), ref.array("agree"))
        expected = ("worse" if kl["hi"] < 0 or agree["hi"] < 0 else "better" if kl["lo"] > 0 else "within the noise")
        assert planner.confirm_paired[name] == expected
    assert "within the noise of all" in verdict


def test_pareto_keeps_only_non_dominated_points():
    def pt(cost, kl):
        return Point(QuantConfig(), OutputStats(), {"cost": cost, "kl": kl})
    front = pareto([pt(3, 0.1), pt(1, 0.5), pt(2, 0.6), pt(2, 0.2), pt(4, 0.1)])
    assert [(p.row["cost"], p.row["kl"]) for p in front] == [(1, 0.5), (2, 0.2), (3, 0.1)]


def test_costs_and_site_counts(tmp_path):
    qm, pixels, _ = _setup()
    macs = site_macs(qm, pixels[0])
    # tiny ViT: 16 patches + CLS = 17 tokens, hidden 32, MLP 64, 2 heads of 16
    assert macs["blocks.0.mlp.fc1"] == 17 * 32 * 64
    assert macs["blocks.0.attn.matmul_qk"] == 2 * 17 * 17 * 16
    assert macs["blocks.0.attn.matmul_av"] == 2 * 17 * 17 * 16
    assert macs["patch_embed"] == 16 * 32 * 3 * 8 * 8
    assert macs["head"] == 32 * 5
    mixed_1 = config_cost(preset("mixed_1", qm.sites), qm.sites, macs)
    # 3 blocks x (2 LN + GELU + softmax) + final LN = 13 backend-float sites, + 6 residual adds
    assert (mixed_1["float_sites"], mixed_1["skipped_sites"]) == (19, 6)
    assert mixed_1["int8_macs_share"] == 100.0  # residual adds do no matmul work...
    assert cost_of(preset("mixed_1", qm.sites), qm.sites, macs) == pytest.approx(6 * 0.5)  # ...but are not free
    fc2 = QuantConfig(float_sites=["blocks.0.mlp.fc2"])
    share = 100 * (1 - macs["blocks.0.mlp.fc2"] / sum(macs.values()))
    assert config_cost(fc2, qm.sites, macs)["int8_macs_share"] == pytest.approx(share)


def test_measurements_resume_from_the_log(tmp_path):
    qm, pixels, labels = _setup()
    cfg = preset("all", qm.sites)
    first = _planner(tmp_path, qm, pixels, labels).measure(cfg)
    second = _planner(tmp_path, qm, pixels, labels)
    assert second.measured_now == 0  # FP32 came from the log too
    assert second.measure(cfg).values == first.values and second.measured_now == 0


def test_unit_range_remedy_gives_softmax_probs_scale_1_over_255(tmp_path):
    qm, pixels, labels = _setup()
    cfg = QuantConfig(overrides={"*.matmul_av": {"probs": {"observer": "unit"}}})
    qm.apply(cfg)
    probs = qm.quantizers["blocks.0.attn.matmul_av"]["probs"].qparams
    v = qm.quantizers["blocks.0.attn.matmul_av"]["v"].qparams
    assert float(probs.scale) == pytest.approx(1 / 255) and int(probs.zero_point) == 0
    assert float(v.scale) != pytest.approx(1 / 255)  # the other slot keeps its calibrated range
    qm.apply(None)
    with torch.no_grad():
        assert torch.isfinite(qm(pixels[0])).all()


def _stats(top1, agree=None, kl=None) -> OutputStats:
    n = len(top1)
    return OutputStats({"top1": list(top1), "top5": [1.0] * n, "agree": list(agree if agree is not None else [1.0] * n),
                        "kl": list(kl if kl is not None else [0.0] * n), "mse": [0.0] * n, "signal": [1.0] * n,
                        "noise": [0.0] * n})


def test_budgets_are_met_not_met_or_undecided_from_the_per_image_values():
    # 200 images: FP32 right and the config wrong on 8, the other way round on 3: drop 2.5 pp,
    # discordance 5.5 %, paired SE sqrt(0.055 - 0.025^2) / sqrt(200) = 1.649 pp
    fp32 = _stats([1.0] * 8 + [0.0] * 3 + [1.0] * 189)
    config = _stats([0.0] * 8 + [1.0] * 3 + [1.0] * 189, agree=[0.0] * 10 + [1.0] * 190,
                    kl=[0.01, 0.03, 0.02, 0.04] * 50)
    se = np.sqrt(0.055 - 0.025 ** 2) / np.sqrt(200)
    assert config.standard_errors(fp32)["top1_drop_se"] == pytest.approx(100 * se * np.sqrt(200 / 199))  # ddof 1
    # the old rule (met unless the drop exceeds the budget by 1.96 SE: 2.5 - 3.23 <= 0.3) called this met;
    # the one-sided 95 % bounds say 2.5 -+ 1.645 x 1.649 = [-0.21, 5.21] pp: it cannot tell
    (drop,) = Budget(max_drop=0.3).decisions(config, fp32)
    assert drop.outcome == "undecided" and drop.estimate == pytest.approx(2.5)
    assert drop.upper == pytest.approx(100 * (0.025 + 1.6449 * se), abs=1e-3)
    assert drop.images_needed == int(np.ceil(((1.6449 + 0.8416) * np.sqrt(0.055 - 0.025 ** 2) / (0.025 - 0.003)) ** 2))
    assert Budget(max_drop=6.0).decisions(config, fp32)[0].outcome == "met"  # 5.21 <= 6
    # agreement 95 % of 200: lower bound 95 - 1.645 x 1.54 = 92.47 %; KL 0.025 +- 0.00184
    agree, kl = Budget(min_agreement=92.0, max_kl=0.03).decisions(config, fp32)
    assert (agree.outcome, kl.outcome) == ("met", "met")
    assert agree.lower == pytest.approx(95.0 - 100 * 1.6449 * np.sqrt(0.95 * 0.05 / 200), abs=1e-3)
    assert Budget(max_kl=0.02).decisions(config, fp32)[0].outcome == "not met"  # 0.025 - 0.00184 > 0.02
    assert [d.kind for d in Budget(max_drop=0.3, max_kl=0.03).decisions(config, fp32)] == ["top1_drop", "kl"]
    assert Budget().decisions(config, fp32) == []  # no explicit budget: nothing to decide


def test_an_undecided_budget_is_never_met_and_the_plan_is_the_cheapest_point_not_shown_to_violate_it(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    # 16 plan images cannot show a 0.3 pp drop budget met: one image is 6.25 pp, and with no
    # discordant image the rule of three bounds the drop at 1.645 x sqrt(3/16 (1 - 3/16) / 16) = 16 pp
    planner = _planner(tmp_path, qm, pixels, labels, Budget(max_drop=0.3, beat_references=False))
    start = preset("all", qm.sites)
    planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=3)
    tried = planner.tried_table()
    assert "met" not in set(tried["budget_outcome"])
    assert planner.outcome == "undecided" and not planner.met
    # the search went on, on KL, past the start (a met budget would have stopped the path there)
    assert len(tried.query("path == 'start' and kind in ('remedy', 'float')")) > 0
    points = [p for path in planner.paths.values() for p in path] + list(planner.references.values())
    open_ = [p for p in points if planner.budget_outcome(p) == "undecided"]
    assert planner.chosen.row["cost"] == min(p.row["cost"] for p in open_)
    assert planner.budget_outcome(planner.chosen) == "undecided"
    (d,) = planner.decisions
    assert d.outcome == "undecided" and d.images == 16 and d.images_needed > 16
    verdict = planner.verdict()
    assert "UNDECIDED on 16 plan images by the plan, the cheapest point not shown to violate it" in verdict
    assert d.describe() in verdict and "images would decide it" in verdict and "met with" not in verdict


def test_with_the_presets_to_beat_an_undecided_budget_keeps_the_plan_that_beats_them(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    planner = _planner(tmp_path, qm, pixels, labels, Budget(max_drop=0.3))
    start = preset("all", qm.sites)
    planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=12)
    assert planner.outcome == "undecided" and not planner.met
    beating = [p for path in planner.paths.values() for p in path if planner.feasible(p, undecided=True)]
    assert beating, "no point beats every preset on these images"
    assert planner.feasible(planner.chosen, undecided=True)
    assert planner.chosen.row["cost"] == min(p.row["cost"] for p in beating)
    assert "not shown to violate it that beats every reference preset at no higher cost" in planner.verdict()
    # the decide stage's answer settles it: the plan first, then cheaper points that qualify alike
    points = planner.decide_points()
    assert points[0] is planner.chosen and all(p.row["cost"] < points[0].row["cost"] for p in points[1:])
    searched = planner.chosen
    # 5000 further images without a changed answer: 0 + 1.645 x sqrt(3/5000 (1 - 3/5000) / 5000) = 0.06 pp <= 0.3
    met = decide("top1_drop", np.zeros(5000), 0.3)
    planner.settle(points, 0, [met], 5000)
    assert planner.outcome == "met" and planner.met and planner.chosen is searched
    verdict = planner.verdict()
    assert "met with 95 % confidence on 5000 further images (sequential test) by the plan" in verdict
    assert "the search's outcome: undecided" in verdict and met.describe() in verdict
    not_met = decide("top1_drop", np.r_[np.ones(100), np.zeros(900)], 0.3)  # 10 pp
    planner.settle(points, None, [not_met], 1000)
    assert planner.outcome == "not met" and not planner.met and planner.chosen is searched


def test_returning_a_site_to_int8_expands_only_the_pattern_that_names_it():
    qm, _, _ = _setup()
    cfg = QuantConfig(float_sites=["*.residual_*", "head"])
    out = without_float(cfg, ["blocks.1.residual_mlp"], qm.sites)
    assert out.float_sites == ["blocks.0.residual_attn", "blocks.0.residual_mlp", "blocks.1.residual_attn",
                               "blocks.2.residual_attn", "blocks.2.residual_mlp", "head"]
    assert cfg.float_sites == ["*.residual_*", "head"]  # the original is untouched


def test_trimming_returns_float_sites_to_int8_while_the_budget_holds(tmp_path):
    qm, pixels, labels = _setup()
    # a budget every point meets: trimming must return every float site it tries to int8
    planner = _planner(tmp_path, qm, pixels, labels, Budget(max_kl=10.0, beat_references=False))
    start = preset("mixed_1", qm.sites).with_float(["head"])
    plan = planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=4)
    tried = planner.tried_table()
    trims = tried[tried["kind"] == "trim"]
    assert len(trims) == 4 and trims["kept"].all()
    returned = [c.removeprefix("int8 ") for c in trims["change"]]
    seed, last = planner.trim_seed.config, planner.paths["trim"][-1].config
    assert {s.name for s in qm.sites if last.is_float(s)} == {s.name for s in qm.sites if seed.is_float(s)} - set(returned)
    # every point meets this budget: the plan is the cheapest measured point, `all`
    assert planner.chosen.row["change"] == "preset all" and plan.float_sites == []


def test_a_trim_that_breaks_the_budget_is_not_kept(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    planner = _planner(tmp_path, qm, pixels, labels, Budget(max_kl=1e-4, beat_references=False))
    start = preset("all", qm.sites)
    planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=40)
    trims = planner.tried_table().query("kind == 'trim'")
    assert len(trims) > 0
    # kept exactly when the trimmed point is shown to meet KL <= 1e-4: its one-sided 95 % upper
    # bound, mean + 1.645 sd / sqrt(n) (sd with divisor n; kl_se has n - 1), is within the budget
    n = planner.chosen.row["images"]
    upper = trims["kl"] + 1.6449 * trims["kl_se"] * np.sqrt((n - 1) / n)
    assert (trims["budget_outcome"] == np.where(upper <= 1e-4, "met", trims["budget_outcome"])).all()
    assert (trims["kept"] == (upper <= 1e-4)).all()
    assert planner.met and planner.chosen.row["kl"] + 1.6449 * planner.chosen.row["kl_se"] * np.sqrt((n - 1) / n) <= 1e-4


def test_the_default_budget_is_to_beat_every_preset_at_no_higher_cost(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    planner = _planner(tmp_path, qm, pixels, labels, Budget())
    start = preset("all", qm.sites)
    planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=40)
    assert planner.outcome == "met"
    chosen, refs = planner.chosen, planner.references.values()
    for ref in refs:
        assert planner.compare(chosen.stats, ref.stats)["gain_lo"] > 0
        assert chosen.row["agreement"] >= ref.row["agreement"]
    assert chosen.row["int8_macs_share"] >= min(r.row["int8_macs_share"] for r in refs)
    assert chosen.row["skipped_sites"] <= max(r.row["skipped_sites"] for r in refs)
    assert "beat every reference preset at no higher cost) met with 95 % confidence" in planner.verdict()


def test_costs_closer_than_the_latency_noise_are_equal_and_the_more_accurate_point_is_kept(tmp_path):
    qm, pixels, labels = _setup()
    planner = _planner(tmp_path, qm, pixels, labels)

    def pt(cost, kl):
        return Point(QuantConfig(), OutputStats(), {"cost": cost, "kl": kl})
    cheap, equal, dear = pt(10.0, 0.02), pt(10.3, 0.01), pt(11.0, 0.005)
    planner.cost_noise = 0.5  # 10.0 and 10.3 ms cannot be told apart: the lower KL wins
    assert planner.cheapest([cheap, equal, dear]) is equal
    planner.cost_noise = 0.1  # a measurable 0.3 ms: the cheaper point wins
    assert planner.cheapest([cheap, equal, dear]) is cheap
    planner.cost_noise = 0.0
    assert planner.cheapest([dear, equal]) is equal


def _latency_planner(tmp_path, qm, pixels, labels, budget=None):
    """Unit costs as a latency table would give them: residual adds and matmul_av free
    (ONNX Runtime never fuses their int8 forms), every other site 1 ms per batch."""
    costs = {s.name: 0.0 if s.kind in ("residual", "matmul_av") else 1.0 for s in qm.sites}
    return Planner(Runner(qm, pixels[:2], labels[:16]), Runner(qm, pixels[2:], labels[16:]), tmp_path,
                   site_macs(qm, pixels[0]), budget or Budget(), {"test": 1}, progress=False, unit_costs=costs,
                   cost_base=20.0, cost_noise=0.2)


def test_with_latency_costs_free_float_sites_cost_nothing_and_the_plan_is_never_slower_and_worse(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    planner = _latency_planner(tmp_path, qm, pixels, labels)
    start = preset("all", qm.sites)
    planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=12)
    refs = planner.references
    # residual adds and matmul_av are free: all, mixed_1 and nncf cost the start config's 20 ms
    assert [refs[n].row["cost"] for n in ("all", "mixed_1", "nncf")] == [20.0, 20.0, 20.0]
    assert refs["mixed_2"].row["cost"] == 22.0  # two float fc2 at 1 ms each
    chosen = planner.chosen
    assert planner.outcome in ("met", "matches best reference")
    for ref in refs.values():
        slower = chosen.row["cost"] > ref.row["cost"] + planner.cost_noise
        worse = planner.compare(chosen.stats, ref.stats)["gain_hi"] < 0
        assert not (slower and worse)
    assert "ms per batch" in planner.verdict()


def test_when_nothing_beats_every_preset_the_plan_is_the_cheapest_point_equal_to_the_best_one(tmp_path):
    qm, pixels, labels = _setup()
    planner = _planner(tmp_path, qm, pixels, labels)
    start = preset("all", qm.sites)
    planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=0, worst_sites=0)
    best = planner.references[planner.best_reference]
    if any(planner.feasible(p) for path in planner.paths.values() for p in path):
        pytest.skip("a remedy beat every preset on these images")
    assert planner.outcome == "matches best reference" and not planner.met
    assert planner.trim_seed is best  # trimming started from the most accurate preset
    trims = planner.tried_table().query("kind == 'trim'")
    kept = [p for p in planner.paths["trim"]]
    assert len(kept) == trims["kept"].sum()
    assert all(planner.matches_best(p) for p in kept)
    chosen = planner.chosen
    assert planner.matches_best(chosen) and chosen.row["cost"] <= best.row["cost"]
    # the cheapest of every measured point that equals the best preset within the noise
    points = [p for path in planner.paths.values() for p in path] + list(planner.references.values())
    assert chosen.row["cost"] == min(p.row["cost"] for p in points if planner.matches_best(p))
    assert f"equals the most accurate preset's ({planner.best_reference}) within the noise" in planner.verdict()


def test_an_undecided_budget_with_no_point_beating_the_presets_keeps_the_best_presets_accuracy(tmp_path):
    """Undecided everywhere (16 images cannot decide 0.3 pp) and nothing beats every preset: the
    plan is the cheapest point equal to the most accurate preset within the noise, not the
    cheapest point overall (which would be slower-or-equal and clearly worse)."""
    qm, pixels, labels = _setup()
    planner = _planner(tmp_path, qm, pixels, labels, Budget(max_drop=0.3))
    start = preset("all", qm.sites)
    planner.plan(start, _only(qm, pixels, labels, tmp_path, start), max_steps=0, worst_sites=0)
    points = [p for path in planner.paths.values() for p in path] + list(planner.references.values())
    if any(planner.feasible(p, undecided=True) for p in points):
        pytest.skip("a remedy beat every preset on these images")
    assert planner.outcome == "undecided" and not planner.met
    best = planner.references[planner.best_reference]
    chosen = planner.chosen
    assert planner.matches_best(chosen) and chosen.row["cost"] <= best.row["cost"]
    assert planner.compare(chosen.stats, planner.references["all"].stats)["gain_lo"] > 0  # better than `all`
    assert chosen.row["cost"] == min(p.row["cost"] for p in points
                                     if planner.matches_best(p) and planner.budget_outcome(p) == "undecided")
    assert f"equals the most accurate preset's ({planner.best_reference}) within the noise" in planner.verdict()


# -- moves stopped early --------------------------------------------------------------------
def test_a_measurement_stopped_early_covers_a_prefix_and_resumes_to_the_full_one():
    qm, pixels, labels = _setup(plant=True)
    runner = Runner(qm, pixels, labels)  # 3 batches of 8 images
    cfg = preset("all", qm.sites)
    full = runner.measure(cfg)
    asked = []
    stopped = runner.measure(cfg, stop=lambda s: asked.append(len(s)) or True, look=8)
    assert asked == [8] and len(stopped) == 8  # asked after the first batch, never after the last
    assert stopped.values == full.head(8).values
    goes_on = runner.measure(cfg, stop=lambda s: asked.append(len(s)) or False, look=8)
    assert asked == [8, 8, 16] and goes_on.values == full.values
    resumed = runner.measure(cfg, done=stopped)  # the first batch is not re-run
    assert resumed.values == full.values
    with pytest.raises(ValueError, match="whole number of batches"):
        runner.measure(cfg, done=full.head(5))


def test_a_hopeless_move_is_stopped_early_and_the_stop_is_logged(tmp_path):
    from analysis.budget import conditional_power
    from analysis.planner import FUTILITY
    qm, pixels, labels = _setup(plant=True)
    runner = Runner(qm, pixels, labels)  # 3 batches of 8 images
    mk = lambda: Planner(runner, None, tmp_path, site_macs(qm, pixels[0]), Budget(), {"test": 2}, progress=False,
                         look=8)
    planner = mk()
    good = planner.measure(preset("mixed_1", qm.sites))
    worse = preset("all", qm.sites)  # residual adds back in int8: clearly worse than mixed_1 on this model
    worse.name = "candidate"
    full = Runner(qm, pixels, labels).measure(worse)  # measured apart, every image
    # the rule, by hand: the conditional power of "KL lower than mixed_1's" after the first 8 images
    assert conditional_power(good.array("kl")[:8] - full.array("kl")[:8], 24) < FUTILITY
    first = planner.measure(worse, stop=planner.hopeless([(good, "above")]))
    assert len(first) == 8 and first.values == full.head(8).values and planner.measured_now == 3  # FP32, mixed_1, it
    # a later run reads the stopped measurement back; a caller that needs every image measures the rest
    later = mk()
    assert later.measure(worse, stop=later.hopeless([(good, "above")])).values == first.values
    assert later.measured_now == 0
    rest = later.measure(worse)
    assert rest.values == full.values and later.measured_now == 1
    assert mk().measure(worse).values == full.values  # now logged in full
    # early stopping off: no rule
    off = Planner(runner, None, tmp_path / "off", site_macs(qm, pixels[0]), Budget(), {"test": 2}, progress=False,
                  look=8, early_stop=False)
    assert off.hopeless([(good, "above")]) is None


def test_the_plan_with_early_stopping_is_the_plan_without_it_and_costs_fewer_images(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    start = preset("all", qm.sites)
    only = _only(qm, pixels, labels, tmp_path / "only", start)
    plans, images = {}, {}
    for early in (True, False):
        runner = Runner(qm, pixels, labels)
        planner = Planner(runner, None, tmp_path / str(early), site_macs(qm, pixels[0]), Budget(), {"test": 3},
                          progress=False, look=8, early_stop=early)
        plans[early] = planner.plan(start, only, max_steps=8).to_dict()
        tried = planner.tried_table()
        images[early] = int(tried["images"].sum())
        if early:
            stopped = tried[tried["stopped_early"]]
            assert len(stopped) > 0 and (stopped["images"] < 24).all() and not stopped["kept"].any()
            assert (tried.loc[~tried["stopped_early"], "images"] == 24).all()
        else:
            assert not tried["stopped_early"].any()
    assert plans[True] == plans[False]
    assert images[True] < images[False]
