"""The planner over formats (issue 21 items 2-4): the taylor estimate per (site, format), the
BitOps / weight-size costs and caps, the format moves, a planted outlier that gets the more
precise format while insensitive Linears get the cheaper one, the CLI and the report's
site x format section."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForImageClassification

from analysis import artifacts
from analysis.cost import site_macs
from analysis.format_moves import FormatMoves, parse_formats, with_format
from analysis.planner import Budget, Planner, Point
from analysis.runner import Runner
from analysis.sensitivity import analyze_sensitivity, own_format_rows, with_measured_formats
from analysis.taylor import taylor_estimates, taylor_format_estimates, taylor_table
from quant.calibrate import calibrate
from quant.config import ConfigError, QuantConfig
from quant.model import QuantModel
from quant.presets import preset
from reports import render_report
from reports.sections.formats import plan_format
from tests.conftest import tiny_model
from tests.test_cli import data_dir, model_dir  # noqa: F401  (module fixtures)
from tests.test_report import column, section
from tests.test_report_sections import candidate_row, plant
from tests.test_sensitivity import _setup
from vitq.cli import main
from vitq.pipeline import resolve_cost

FC2 = "blocks.1.mlp.fc2"


def _planted():
    """A 3-block tiny ViT whose block-1 GELU output has an outlier channel (5: x50 with a large
    bias), read by fc2 through a column equal to each row's largest weight: exact in int8
    weights, and clipping that channel would hurt. Only fc2's int8 *input* suffers (its
    per-tensor range is the outlier's): 16-bit activations fix it, int4 weights do not."""
    model = tiny_model("vit", num_hidden_layers=3, seed=0)
    with torch.no_grad():
        mlp = model.vit.layers[1].mlp
        mlp.fc1.weight[5] *= 50
        mlp.fc1.bias[5] = 50 * mlp.fc1.bias[5].abs() + 50
        mlp.fc2.weight[:, 5] = mlp.fc2.weight.abs().amax(1)
    qm = QuantModel(model)
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)]
    calibrate(qm, pixels, progress=False)
    return qm, pixels, torch.randint(0, 5, (24,), generator=g)


def _planner(tmp_path, qm, pixels, labels, budget=None, **kw):
    return Planner(Runner(qm, pixels[:2], labels[:16]), Runner(qm, pixels[2:], labels[16:]), tmp_path,
                   site_macs(qm, pixels[0]), budget or Budget(), {"test": 1}, progress=False, **kw)


# -- sensitivity per (site, format) ----------------------------------------------------------------
def test_format_estimates_follow_each_formats_noise_at_a_planted_outlier():
    qm, pixels, labels = _planted()
    runner = Runner(qm, pixels[:2])
    start = preset("all", qm.sites)
    est, _ = taylor_format_estimates(runner, start, ["int8", "a16w8", "w4a8", "w8"], probes=4)
    own, _ = taylor_estimates(runner, start, probes=4)  # the config's own formats, a separate pass
    assert all(est[(c, "int8")] == pytest.approx(v, rel=1e-6, abs=1e-15) for c, v in own.items())
    # fc2's noise is its input's: 16-bit activations remove it (256x finer steps), int4 weights leave it
    assert est[(FC2, "a16w8")] < 1e-3 * est[(FC2, "int8")]
    assert est[(FC2, "w4a8")] == pytest.approx(est[(FC2, "int8")], rel=0.2)
    # int4 weights hurt a Linear without an outlier; a weight-only format keeps a residual add float: 0
    assert est[("head", "w4a8")] > 10 * est[("head", "int8")]
    assert est[("blocks.0.residual_attn", "w8")] == 0.0
    # the estimate is the measured `only` KL of fc2 in each format, within the estimate's error
    for fmt in ("int8", "a16w8"):
        cfg = QuantConfig(float_sites=[s.name for s in qm.sites if s.name != FC2], formats={FC2: fmt})
        measured = runner.measure(runner.state(cfg)).summary()["kl"]
        assert est[(FC2, fmt)] == pytest.approx(measured, rel=0.3, abs=1e-10)


def test_only_rows_in_another_format_are_measured_into_the_same_log_and_table(tmp_path):
    qm, pixels, labels = _planted()
    runner = Runner(qm, pixels[:2], labels[:16])
    start = preset("all", qm.sites)
    plain, _, _ = analyze_sensitivity(runner, start, tmp_path / "plain", progress=False, only=[FC2, "head"])
    df, meta, run = analyze_sensitivity(runner, start, tmp_path, progress=False, only=[FC2, "head"],
                                        formats={"a16w8": [FC2, "head"], "w4a8": ["head"]})
    assert run["measured_now"] == 5 and meta["candidates"] == 5
    assert list(zip(df["format"], df["own_format"])) == [("int8", True)] * 2 + [("a16w8", False)] * 2 + [("w4a8", False)]
    # the config's own rows are the table without formats, ranked alike
    own = own_format_rows(df).drop(columns=["format", "own_format"])
    pd.testing.assert_frame_equal(own, plain, check_like=True)
    # each per-format row is the measurement of a config built by hand: that site alone in that format
    fresh = Runner(qm, pixels[:2], labels[:16])
    for site, fmt in ((FC2, "a16w8"), ("head", "a16w8"), ("head", "w4a8")):
        cfg = QuantConfig(float_sites=[s.name for s in qm.sites if s.name != site], formats={site: fmt})
        row = df[(df["candidate"] == site) & (df["format"] == fmt)].iloc[0]
        assert row["kl"] == pytest.approx(fresh.measure(fresh.state(cfg)).summary()["kl"], rel=1e-5, abs=1e-12)
    # the planted outlier: fc2's int8 input is what hurts, 16-bit activations fix it
    kl = {(r.candidate, r.format): r.kl for r in df.itertuples()}
    assert kl[(FC2, "a16w8")] < 0.01 * kl[(FC2, "int8")]
    # one log, resumed: a rerun measures nothing; the per-format taylor table takes the measured KL
    again, _, rerun = analyze_sensitivity(runner, start, tmp_path, progress=False, only=[FC2, "head"],
                                          formats={"a16w8": [FC2, "head"], "w4a8": ["head"]})
    assert rerun["measured_now"] == 0 and len(list(tmp_path.glob("sensitivity_only_op.*.jsonl"))) == 1
    estimates = pd.DataFrame({"candidate": [FC2, FC2, "blocks.0.mlp.fc1"], "format": ["a16w8", "w4a8", "a16w8"],
                              "kl_estimate": [1.0, 2.0, 3.0]})
    merged = with_measured_formats(estimates, again)
    assert merged["kl"].tolist() == [kl[(FC2, "a16w8")], 2.0, 3.0]
    assert merged["source"].tolist() == ["measured", "taylor", "taylor"]
    with pytest.raises(ValueError, match="mode only"):
        analyze_sensitivity(runner, start, tmp_path, progress=False, mode="all-but", formats={"a16w8": [FC2]})


def test_taylor_table_has_a_format_column_only_when_formats_are_asked(tmp_path):
    qm, pixels, _ = _setup()
    runner = Runner(qm, pixels[:1])
    start = preset("all", qm.sites)
    plain, _, _ = taylor_table(runner, start, probes=2, progress=False)
    by_format, meta, _ = taylor_table(runner, start, probes=2, formats=["int8", "a16w8", "float"], progress=False)
    assert "format" not in plain
    assert by_format["format"].tolist() == ["int8"] * len(plain) + ["a16w8"] * len(plain)  # float: 0, left out
    int8 = by_format[by_format["format"] == "int8"].drop(columns=["format"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(int8, plain, rtol=1e-6)  # int8 rows as without formats
    assert meta["candidates"] == len(plain)


# -- costs ------------------------------------------------------------------------------------------
def test_bitops_and_size_costs_by_hand_and_the_caps(tmp_path):
    qm, pixels, labels = _setup()
    macs = site_macs(qm, pixels[0])
    total = sum(macs.values())
    fc1 = 17 * 32 * 64  # 17 tokens x hidden 32 x MLP 64 (test_planner checks these MACs)
    assert macs["blocks.0.mlp.fc1"] == fc1
    planner = _planner(tmp_path, qm, pixels, labels, cost_kind="bitops")
    start = preset("all", qm.sites)
    assert planner.cost(start) == pytest.approx(100.0)
    # int4 weights halve fc1's 8 x 8 bits; float matmul_av counts 32 x 32 instead of 8 x 8
    w4 = QuantConfig(formats={"blocks.0.mlp.fc1": "w4a8"})
    assert planner.cost(w4) == pytest.approx(100.0 * (1 - fc1 / (2 * total)))
    av = macs["blocks.0.attn.matmul_av"]
    assert planner.cost(start.with_float(["blocks.0.attn.matmul_av"])) == pytest.approx(100 * (1 + 15 * av / total))
    assert planner.cost(QuantConfig(formats={"*.residual_*": "a16w8"})) == pytest.approx(100.0)  # no MACs
    size = _planner(tmp_path / "s", qm, pixels, labels, cost_kind="size")
    w = qm.family.weight(qm.model, qm.site_by_name["blocks.0.mlp.fc1"])  # (64, 32): 64 channel scales
    assert size.cost(start) - size.cost(w4) == pytest.approx((w.numel() / 2) / 1e6)
    # caps: BitOps as a fraction of all's, weight MB
    caps = Budget(max_bitops=1.0, max_weight_mb=0.5)
    assert caps.within_caps({"bitops": 100.0, "weight_mb": 0.5})
    assert not caps.within_caps({"bitops": 100.5, "weight_mb": 0.1})
    assert not caps.within_caps({"bitops": 90.0, "weight_mb": 0.6})
    assert "BitOps <= 1 x all's" in caps.describe() and "weights <= 0.5 MB" in caps.describe()


def test_a_cap_no_point_meets_is_said_in_the_verdict(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    start = preset("all", qm.sites)
    only, _, _ = analyze_sensitivity(Runner(qm, pixels[:2], labels[:16]), start, tmp_path, progress=False)
    # below all's BitOps by half: only int4 weights everywhere could get there, and int8/float moves cannot
    planner = _planner(tmp_path, qm, pixels, labels, Budget(max_bitops=0.5), cost_kind="bitops")
    planner.plan(start, only, max_steps=2)
    assert planner.outcome != "met" and all(not planner.budget.within_caps(p.row)
                                            for path in planner.paths.values() for p in path)
    assert "OVER the cost caps" in planner.verdict() and "BitOps <= 0.5 x all's" in planner.verdict()


def test_cost_resolution_and_format_lists():
    assert resolve_cost("auto", ["int8", "a16w8", "float"]) == "bitops"
    assert resolve_cost("size", ["int8", "w4a8"]) == "size"
    assert resolve_cost("macs", ["int8", "float"]) == "macs"  # int8 or float: as before
    with pytest.raises(ConfigError, match="--cost macs prices a site in int8 or float only"):
        resolve_cost("macs", ["int8", "a16w8"])
    assert resolve_cost("latency", ["int8", "a16w8", "float"]) == "latency"  # measured per format
    assert parse_formats(" int8, a16w8 ,float,int8") == ["int8", "a16w8", "float"]
    with pytest.raises(ValueError, match="unknown format\\(s\\) int9; formats are .*int8.*"):
        parse_formats("int8,int9")
    with pytest.raises(ValueError, match="at least 2"):
        parse_formats("int8")


# -- format moves -----------------------------------------------------------------------------------
def test_with_format_writes_skip_list_or_a_per_site_entry_that_wins_over_globs():
    qm, _, _ = _setup()
    sites = qm.sites
    cfg = QuantConfig(float_sites=["*.residual_*"], formats={"linear": "w4a8"})
    new = with_format(cfg, ["blocks.0.residual_attn", "blocks.0.mlp.fc2"], "a16w8", sites)
    by = qm.site_by_name
    assert new.format_of(by["blocks.0.residual_attn"]).name == "a16w8" and not new.is_float(by["blocks.0.residual_attn"])
    assert new.is_float(by["blocks.0.residual_mlp"])  # the glob's other sites stay float
    assert new.format_of(by["blocks.0.mlp.fc2"]).name == "a16w8"  # written after the kind entry: it wins
    assert new.format_of(by["blocks.0.mlp.fc1"]).name == "w4a8"
    assert list(new.formats) == ["linear", "blocks.0.residual_attn", "blocks.0.mlp.fc2"]
    back = with_format(new, ["blocks.0.mlp.fc2"], "w4a8", sites)  # the kind's format: no entry needed
    assert "blocks.0.mlp.fc2" not in back.formats and back.format_of(by["blocks.0.mlp.fc2"]).name == "w4a8"
    floated = with_format(cfg, ["blocks.0.mlp.fc1"], "float", sites)
    assert floated.float_sites == ["*.residual_*", "blocks.0.mlp.fc1"] and floated.formats == cfg.formats


def test_with_int8_and_float_the_format_moves_are_the_planners_float_moves_and_trims(tmp_path):
    qm, pixels, labels = _setup(plant=True)
    planner = _planner(tmp_path, qm, pixels, labels)
    start = preset("all", qm.sites)
    only, _, _ = analyze_sensitivity(Runner(qm, pixels[:2], labels[:16]), start, tmp_path, progress=False)
    estimates = dict(zip(only["candidate"], only["kl"]))
    moves = FormatMoves(["int8", "float"], {}, start, qm.sites)
    old = planner._floats(start, estimates)
    new = moves.precise(start, estimates, planner.cost)
    assert [(m.change, m.floats) for m in old] == [(m.change, m.sites) for m in new]
    assert [m.estimate for m in old] == pytest.approx([m.estimate for m in new])
    seed = Point(preset("mixed_2", qm.sites), None, {})
    old_trim = planner._floats_to_trim(seed, estimates)
    new_trim = moves.cheaper(seed.config, estimates, planner.cost)
    assert [m.change for m in old_trim] == [m.change for m in new_trim] and len(new_trim) > 0
    for o, n in zip(old_trim, new_trim):
        assert o.make(seed.config).to_dict() == n.make(seed.config).to_dict()


def test_a_planted_outlier_gets_the_more_precise_format_and_insensitive_linears_the_cheaper(tmp_path):
    qm, pixels, labels = _planted()
    start = preset("all", qm.sites)
    plan_runner = Runner(qm, pixels[:2], labels[:16])
    only, _, _ = analyze_sensitivity(plan_runner, start, tmp_path, progress=False)
    formats = ["int8", "a16w8", "w4a8"]
    table, _ = taylor_format_estimates(plan_runner, start, formats, probes=4)
    planner = _planner(tmp_path, qm, pixels, labels, cost_kind="bitops",
                       format_moves=FormatMoves(formats, table, start, qm.sites))
    plan = planner.plan(start, only, max_steps=12)
    by = qm.site_by_name
    assert planner.outcome == "met"  # beats every preset at no more BitOps than the costliest
    assert plan.format_of(by[FC2]).name == "a16w8" and not plan.is_float(by[FC2])
    cheaper = [s.name for s in qm.sites if not plan.is_float(s) and plan.format_of(s).name == "w4a8"]
    assert len(cheaper) >= 3 and FC2 not in cheaper
    assert all(table[(n, "w4a8")] < table[(FC2, "w4a8")] for n in cheaper)  # the insensitive ones
    # the plan costs less than `all` in BitOps and its KL, measured apart, is below all's
    assert planner.chosen.row["bitops"] < 100.0
    fresh = Runner(qm, pixels[:2], labels[:16])
    assert fresh.measure(fresh.state(plan)).summary()["kl"] < 0.5 * fresh.measure(fresh.state(start)).summary()["kl"]


# -- the command line and the report ---------------------------------------------------------------------
def test_cli_plan_over_formats_writes_a_format_table_and_a_loadable_plan(model_dir, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--batch-size", "5",
              "--eval-images", "6", "--no-progress", "--out", str(out)]
    assert main(["sensitivity", "--method", "taylor", "--formats", "a16w8,w4a8", *common]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["format", "a16w8", "w4a8"]  # site x format
    assert pd.read_csv(out / "sensitivity_taylor_op.csv").groupby("format").size().to_dict() == {"a16w8": 22, "w4a8": 22}
    assert main(["sensitivity", "--formats", "a16w8", *common]) == 2  # measured: the config's formats
    assert main(["plan", *common, "--formats", "int8,a16w8", "--cost", "macs"]) == 2
    assert "--cost macs prices a site in int8 or float only" in capsys.readouterr().err
    assert main(["plan", *common, "--formats", "int8,int9"]) == 2
    assert "unknown format(s) int9" in capsys.readouterr().err
    assert main(["plan", *common, "--formats", "int8,a16w8,w4a8,float", "--measure-top", "4", "--max-steps", "2",
                 "--confirm-images", "0", "--max-bitops", "1.2"]) == 0
    taylor = pd.read_csv(out / "sensitivity_taylor_op.csv")
    assert taylor.groupby("format").size().to_dict() == {"a16w8": 22, "int8": 22, "w4a8": 22}
    measured = pd.read_csv(out / "sensitivity_only_op.csv")  # the top 4 by the int8 rows
    own = measured[measured["own_format"]]
    assert sorted(own["candidate"]) == sorted(taylor[taylor["format"] == "int8"]["candidate"].head(4))
    # and a quarter of 4 per format beyond int8: the top one by its own estimate (w4a8: among the
    # sites where it is not int8, i.e. those with weights)
    other = measured[~measured["own_format"]]
    assert sorted(other["format"]) == ["a16w8", "w4a8"]
    a16 = taylor[taylor["format"] == "a16w8"].sort_values("kl_estimate", ascending=False)
    assert other[other["format"] == "a16w8"]["candidate"].tolist() == a16["candidate"].head(1).tolist()
    steps = artifacts.read(out, artifacts.PLAN_STEPS)
    assert steps.meta["cost"] == "bitops" and steps.meta["budget"]["max_bitops"] == 1.2
    chosen = steps.rows[steps.rows["plan"]].iloc[0]
    assert chosen["cost"] == chosen["bitops"]
    plan = QuantConfig.load(out / "plan.yaml")
    assert set(plan.formats.values()) <= {"a16w8", "w4a8", "int8"}
    skiplist = yaml.safe_load((out / "plan_skiplist.yaml").read_text())
    assert skiplist.get("formats", {}) == plan.formats


def test_measured_format_rows_equal_an_independent_eval_of_that_one_site_config(model_dir, data_dir, tmp_path,  # noqa: F811
                                                                                capsys):
    out = tmp_path / "out"
    # plan images = all 12 val images (no confirm images), so `vitq eval` sees the same images
    common = ["--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--batch-size", "5",
              "--no-progress", "--out", str(out)]
    assert main(["plan", *common, "--eval-images", "12", "--confirm-images", "0", "--formats", "int8,a16w8,float",
                 "--measure-top", "3", "--measure-top-format", "2", "--max-steps", "1"]) == 0
    table = artifacts.read(out, artifacts.sensitivity("only", "op"))
    rows = table.rows
    a16 = rows[rows["format"] == "a16w8"]
    assert len(a16) == 2 and not a16["own_format"].any() and rows[rows["own_format"]]["format"].eq("int8").all()
    site = str(a16.iloc[0]["candidate"])
    sites = [line.split(",")[0] for line in _sites_csv(model_dir, capsys)]
    cfg = tmp_path / "one.yaml"
    cfg.write_text(yaml.safe_dump({"name": "one", "float_sites": [n for n in sites if n != site],
                                   "formats": {site: "a16w8"}}))
    assert main(["eval", *common, "--config", str(cfg)]) == 0
    evaluated = pd.read_csv(out / "eval.csv").set_index("config")
    assert evaluated.loc["one", "images"] == table.meta["images"] == 12
    assert float(a16.iloc[0]["kl"]) == pytest.approx(evaluated.loc["one", "kl"], rel=1e-4)
    assert evaluated.loc["one", "kl"] > 0


def test_analyze_over_formats_marks_the_cheapest_int8_float_only_point_meeting_the_budget(
        model_dir, data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(["analyze", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--batch-size", "5",
                 "--no-progress", "--out", str(out), "--eval-images", "6", "--formats", "int8,a16w8,float",
                 "--max-kl", "1e-3", "--no-beat-presets", "--decide-images", "0"]) == 0
    tried = pd.read_csv(out / "plan_tried.csv")
    # the formats column says what each row runs: the presets int8 and float, an a16w8 move a16w8
    assert set(tried[tried["path"] == "reference"]["formats"]) == {"float", "int8,float"}
    assert tried[tried["change"].str.startswith("a16w8")]["formats"].str.contains("a16w8").all()
    # independently: among the points a plan is chosen from (presets and kept points), FP32 aside,
    # those running int8 and float only and meeting the budget, the cheapest (BitOps are exact:
    # equal costs are equal), the lowest KL among equally cheap ones
    pool = tried[tried["kept"] & (tried["config"] != "fp32") & ~tried["stopped_early"]
                 & tried["formats"].map(lambda f: set(f.split(",")) <= {"int8", "float"})]
    meeting = pool[pool["budget_outcome"] == "met"]
    assert len(meeting) > 1
    expected = meeting.sort_values(["cost", "kl"], kind="stable").iloc[0]
    marked = tried[tried["int8_float_best"].fillna("") != ""]
    assert len(marked) == 1
    marked = marked.iloc[0]
    assert marked["int8_float_best"] == "met" and marked["formats"] == "int8,float"
    assert (marked["cost"], marked["kl"]) == (expected["cost"], expected["kl"])
    # the same mark in plan_steps (one schema, read back) and in the report's planner section
    steps = artifacts.read(out, artifacts.PLAN_STEPS).rows
    assert steps[steps["int8_float_best"] != ""]["attempt"].tolist() == [marked["attempt"]]
    sec = section((out / "report.html").read_text(), "planner")
    assert f"Best int8/float-only point measured by this search: attempt {marked['attempt']} " in sec
    assert column(sec, "tried-table", "best int8/float-only").count("met") == 1


def test_formats_without_float_give_an_integer_only_plan(model_dir, data_dir, tmp_path):  # noqa: F811
    # an integer-only target (an NPU): no float site beyond the kinds every backend keeps float
    out = tmp_path / "out"
    assert main(["plan", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--batch-size", "5",
                 "--no-progress", "--out", str(out), "--eval-images", "6", "--formats", "int8,a16w8,w4a8"]) == 0
    plan = QuantConfig.load(out / "plan.yaml")
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    sites = QuantModel(model).sites
    floats = [s.name for s in sites if plan.is_float(s) and s.kind not in ("layernorm", "gelu", "softmax")]
    assert floats == []
    assert yaml.safe_load((out / "plan_skiplist.yaml").read_text())["float_sites"] == []
    assert set(plan.formats.values()) <= {"int8", "a16w8", "w4a8"}


def _sites_csv(model_dir, capsys) -> list[str]:  # noqa: F811
    capsys.readouterr()
    assert main(["sites", "--model", str(model_dir), "--format", "csv"]) == 0
    return capsys.readouterr().out.strip().splitlines()[1:]


def test_formats_section_shows_site_by_format_and_the_plans_format(tmp_path: Path):
    rows = [candidate_row(n, r, kl_estimate=v, format=f) for f, items in
            (("int8", [("a", 1, 4e-4), ("b", 2, 3e-4), ("c", 3, 1e-6)]),
             ("a16w8", [("b", 1, 2e-6), ("a", 2, 1e-8), ("c", 3, 1e-9)])) for n, r, v in items]
    plant(tmp_path, artifacts.sensitivity_taylor("op"), rows, method="taylor", probes=8, images=64,
          fisher_trace_captured_mean=0.9)
    (tmp_path / artifacts.PLAN_SKIPLIST).write_text(yaml.safe_dump(
        {"float_kinds": ["layernorm"], "float_sites": ["a"], "formats": {"b*": "w4a8", "b": "a16w8"}}, sort_keys=False))
    html = render_report(tmp_path).read_text()
    sec = section(html, "formats")
    assert column(sec, "formats-by-site", "site") == ["a", "b", "c"]  # int8's order
    assert column(sec, "formats-by-site", "a16w8") == ["1.00e−08", "2.00e−06", "1.00e−09"]
    assert column(sec, "formats-by-site", "plan's format") == ["float", "a16w8", "int8"]  # the last entry wins
    assert column(section(html, "taylor"), "taylor-op", "candidate") == ["a", "b", "c"]  # int8 rows only
    # measured rows in another format: beside the estimate in the site x format view, apart from
    # the own-format ranking in the sensitivity section and in the taylor comparison
    acc = dict(images=64, top1=80.0, top5=95.0, top1_drop=0.0, top5_drop=0.0, agreement=99.0, logit_mse=0.01,
               logit_sqnr_db=30.0)
    plant(tmp_path, artifacts.sensitivity("only", "op"),
          [candidate_row("a", 1, kl=5e-4, format="int8", own_format=True, **acc),
           candidate_row("b", 2, kl=2e-4, format="int8", own_format=True, **acc),
           candidate_row("b", 1, kl=3e-6, format="a16w8", own_format=False, **acc)],
          mode="only", group="op", images=64, candidates=3, rank_by="kl")
    html = render_report(tmp_path).read_text()
    sec = section(html, "formats")
    assert column(sec, "formats-by-site", "a16w8 measured") == ["–", "3.00e−06", "–"]
    assert column(sec, "formats-by-site", "int8 measured") == ["5.00e−04", "2.00e−04", "–"]
    assert column(section(html, "sensitivity"), "sens-only-op", "candidate") == ["a", "b"]
    assert column(section(html, "sensitivity"), "sens-only-op-formats", "format") == ["a16w8"]
    assert column(section(html, "taylor"), "taylor-op", "measured") == ["yes", "yes", "no"]
    assert plan_format({"float_kinds": ["residual"]}, "x", "residual") == "float"


def test_a_format_that_runs_a_site_like_another_is_not_offered_twice(tmp_path):
    qm, pixels, labels = _setup()
    start = preset("all", qm.sites)
    av = "blocks.0.attn.matmul_av"
    # w4a8 at a matmul (no weights) is int8: trimming a16w8 there offers int8 (listed first), with
    # int8's estimate (the planner's measured one), never the same thing under another name
    table = {(av, "int8"): 5e-4, (av, "a16w8"): 1e-9, (av, "w4a8"): 1e-7}
    moves = FormatMoves(["int8", "a16w8", "w4a8"], table, start, qm.sites)
    planner = _planner(tmp_path, qm, pixels, labels, cost_kind="size")  # size: a matmul costs nothing...
    bitops = _planner(tmp_path / "b", qm, pixels, labels, cost_kind="bitops")  # ...BitOps do
    config = with_format(start, [av], "a16w8", qm.sites)
    assert moves.estimate(qm.site_by_name[av], "w4a8", {av: 2e-4}) == 2e-4  # int8's, not the table's
    trims = [m for m in moves.cheaper(config, {av: 2e-4}, bitops.cost) if m.sites == (av,)]
    assert [m.change for m in trims] == [f"int8 {av}"]
    assert [m for m in moves.cheaper(config, {av: 2e-4}, planner.cost) if m.sites == (av,)] == []
