"""`--cost latency`: the per-site latency table and the planner's cost read from it."""

import json

import numpy as np

import pandas as pd
import pytest

from analysis.planner import latency_cost
from quant.calibrate import calibrate
from quant.model import QuantModel
from quant.presets import preset
from tests.conftest import tiny_model
from tests.test_cli import data_dir, model_dir  # noqa: F401 (module fixtures)
from vitq.cli import main

pytest.importorskip("onnxruntime", reason="the latency table is measured with ONNX Runtime")


def test_latency_table_covers_every_int8_site_once_and_costs_add_up(pixels):
    from vitq.latency import measure_site_latency, unit_costs

    qm = QuantModel(tiny_model("vit", num_hidden_layers=2))
    calibrate(qm, [pixels], progress=False)
    start = preset("all", qm.sites)
    table = measure_site_latency(qm, start, pixels, runs=2, progress=False)
    members = [m for ms in table["members"] for m in ms.split(",")]
    assert sorted(members) == sorted(s.name for s in start.int8_sites(qm.sites))  # each int8 site once
    assert (table["sites"] == [len(m.split(",")) for m in table["members"]]).all()
    # a group's slowdown is the median paired per-round difference, shared by its members
    expected = 100 * table["delta_ms"] / table["start_ms"] / table["sites"]
    assert table["cost_per_site"].to_numpy() == pytest.approx(expected.to_numpy())
    assert ((table["delta_lo_ms"] <= table["delta_ms"]) & (table["delta_ms"] <= table["delta_hi_ms"])).all()
    # free exactly when the interval reaches 0; a free group costs nothing, the others their slowdown
    assert (table["free"] == (table["delta_lo_ms"] <= 0)).all()
    assert (table["cost_ms"] == np.where(table["free"], 0.0, table["delta_ms"] / table["sites"])).all()
    costs = unit_costs(table)
    residual = table.set_index("group").loc["residual/residual_mlp"]
    assert costs[residual["members"].split(",")[0]] == residual["cost_ms"]
    # a config's cost is the start time plus the sites it keeps float, backend-float kinds excluded
    mixed_1 = preset("mixed_1", qm.sites)
    floats = [s.name for s in qm.sites if s.kind == "residual"]
    assert latency_cost(mixed_1, qm.sites, costs, 7.0) == pytest.approx(7.0 + sum(costs[n] for n in floats))
    assert latency_cost(start, qm.sites, costs, 7.0) == 7.0


def test_median_interval_takes_the_order_statistics_of_a_95_percent_sign_test():
    from vitq.latency import median_interval, noise_ms

    # n = 9: P(B <= 1) = 10/512 = 0.0195 <= 0.025 < P(B <= 2): the 2nd and 8th smallest
    assert median_interval([5, 1, 3, 2, 4, 9, 8, 7, 6]) == (5, 2, 8)
    # n = 20: P(B <= 5) = 0.0207 <= 0.025 < P(B <= 6) = 0.0577: the 6th and 15th
    assert median_interval(list(range(20))) == (9.5, 5, 14)
    assert median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few rounds: the extremes
    table = pd.DataFrame({"delta_lo_ms": [-1.0, 0.5, 2.0], "delta_hi_ms": [1.0, 1.5, 8.0]})
    assert noise_ms(table) == 1.0  # half-widths 1, 0.5, 3: the median


def test_plan_with_latency_cost_writes_the_table_once_and_says_so(model_dir, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "p"
    common = ["--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--out", str(out), "--no-progress",
              "--eval-images", "6", "--max-steps", "2", "--batch-size", "3", "--cost", "latency"]
    assert main(["plan", *common]) == 0
    table = json.loads((out / "latency_sites.json").read_text())
    assert table["meta"]["backend"] == "onnxruntime" and table["meta"]["batch"] == 8
    assert json.loads((out / "plan_steps.json").read_text())["meta"]["cost"] == "latency"
    steps = pd.read_csv(out / "plan_steps.csv")
    costs = pd.read_csv(out / "latency_sites.csv")
    # the `all` reference keeps nothing float beyond the backend kinds: the start config's time;
    # mixed_1 adds what its residual groups cost (0 where not measurable)
    ref = steps.set_index("change")
    assert ref.loc["preset all", "cost"] == pytest.approx(costs["start_ms"].iloc[0], rel=1e-5)
    residual = costs[costs["kind"] == "residual"]
    assert ref.loc["preset mixed_1", "cost"] == pytest.approx(costs["start_ms"].iloc[0] + (
        residual["cost_ms"] * residual["sites"]).sum(), rel=1e-5, abs=1e-6)  # CSV: 6 significant digits
    assert table["meta"]["noise_ms"] == pytest.approx(((costs["delta_hi_ms"] - costs["delta_lo_ms"]) / 2).median(),
                                                      rel=1e-5)
    # a second plan reuses the measured table (same settings): the file is not rewritten
    stamp = (out / "latency_sites.json").stat().st_mtime_ns
    assert main(["plan", *common]) == 0
    assert (out / "latency_sites.json").stat().st_mtime_ns == stamp
    assert table["meta"]["threads"] is None  # ONNX Runtime's own default
    # --latency-threads is a setting of the table: another value times it again, with that many threads
    assert main(["plan", *common, "--latency-threads", "1"]) == 0
    assert json.loads((out / "latency_sites.json").read_text())["meta"]["threads"] == 1
    assert main(["plan", *common, "--latency-threads", "0"]) == 2
    assert "--latency-threads 0: give a number of threads >= 1" in capsys.readouterr().err


def test_latency_table_times_each_group_in_each_format_that_runs_it_otherwise(pixels):
    from analysis.format_moves import with_format
    from vitq.latency import format_unit_costs, measure_site_latency, unit_costs

    qm = QuantModel(tiny_model("vit", num_hidden_layers=2))
    calibrate(qm, [pixels], progress=False)
    start = preset("all", qm.sites)
    table = measure_site_latency(qm, start, pixels, runs=2, progress=False, formats=["int8", "a16w8", "w4a8", "float"])
    groups = sorted({f"{s.kind}/{s.role}" for s in start.int8_sites(qm.sites)})
    weighted = sorted({f"{s.kind}/{s.role}" for s in start.int8_sites(qm.sites) if s.has_weight()})
    # float: every group; a16w8: every group (int16 activations everywhere); w4a8: only where there
    # are weights (at a matmul or residual add it is int8, the start); int8: the start itself, never
    by_format = {f: sorted(table[table["format"] == f]["group"]) for f in ("float", "a16w8", "w4a8", "int8")}
    assert by_format == {"float": groups, "a16w8": groups, "w4a8": weighted, "int8": []}
    # the float rows are the table without formats (same costs for the planner)
    assert unit_costs(table) == {n: c for n, c in unit_costs(table[table["format"] == "float"]).items()}
    costs = format_unit_costs(table)
    row = table[(table["group"] == "residual/residual_mlp") & (table["format"] == "a16w8")].iloc[0]
    members = row["members"].split(",")
    assert all(costs[(m, "a16w8")] == row["cost_ms"] for m in members)
    assert not any(f == "float" for _, f in costs)
    # a config's latency cost: the start time, its float sites' costs and its sites in another
    # format at that format's cost; w4a8 at a matmul runs as the start (no row: no cost)
    config = with_format(start, members, "a16w8", qm.sites)
    config = with_format(config, ["blocks.0.attn.matmul_av"], "w4a8", qm.sites)
    config = config.with_float(["blocks.1.mlp.fc2"])
    floats = unit_costs(table)
    assert latency_cost(config, qm.sites, floats, 7.0, costs) == pytest.approx(
        7.0 + row["cost_ms"] * len(members) + floats["blocks.1.mlp.fc2"])
    assert latency_cost(config, qm.sites, floats, 7.0) == pytest.approx(7.0 + floats["blocks.1.mlp.fc2"])


def test_plan_over_formats_with_latency_cost_prices_each_site_by_its_formats_row(model_dir, data_dir, tmp_path):  # noqa: F811
    import yaml

    out = tmp_path / "f"
    assert main(["plan", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--out", str(out),
                 "--no-progress", "--eval-images", "6", "--max-steps", "3", "--batch-size", "3", "--cost", "latency",
                 "--formats", "int8,a16w8,float", "--measure-top-format", "1"]) == 0
    table = json.loads((out / "latency_sites.json").read_text())
    assert table["meta"]["formats"] == ["int8", "a16w8", "float"]
    costs = pd.read_csv(out / "latency_sites.csv")
    assert set(costs["format"]) == {"float", "a16w8"}
    steps = pd.read_csv(out / "plan_steps.csv")
    assert json.loads((out / "plan_steps.json").read_text())["meta"]["cost"] == "latency"
    # every kept point's cost, from the plan's own YAML for the plan: the start time plus, per site
    # beyond the backend-float kinds, its float row's cost when float, its a16w8 row's when a16w8
    per_site = {(m, r["format"]): r["cost_ms"] for _, r in costs.iterrows() for m in r["members"].split(",")}
    plan = yaml.safe_load((out / "plan_skiplist.yaml").read_text())
    expected = (costs["start_ms"].iloc[0] + sum(per_site.get((n, "float"), 0.0) for n in plan["float_sites"])
                + sum(per_site.get((n, f), 0.0) for n, f in (plan.get("formats") or {}).items()))
    chosen = steps[steps["plan"]].iloc[0]
    assert chosen["cost"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
