"""`--cost latency`: the per-site latency table and the planner's cost read from it."""

import json

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
    # the cost of one site is the group's slowdown in % of the start config, shared by its members
    expected = 100 * (table["float_ms"] - table["start_ms"]) / table["start_ms"] / table["sites"]
    assert table["cost_per_site"].to_numpy() == pytest.approx(expected.to_numpy())
    costs = unit_costs(table)
    residual = table.set_index("group").loc["residual/residual_mlp"]
    assert costs[residual["members"].split(",")[0]] == max(residual["cost_per_site"], 0.0)
    # a config's cost is the sum over the sites it keeps float, backend-float kinds excluded
    mixed_1 = preset("mixed_1", qm.sites)
    floats = [s.name for s in qm.sites if s.kind == "residual"]
    assert latency_cost(mixed_1, qm.sites, costs) == pytest.approx(sum(costs[n] for n in floats))
    assert latency_cost(start, qm.sites, costs) == 0.0


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
    # the `all` reference keeps nothing float beyond the backend kinds: latency cost 0;
    # mixed_1 costs what its residual groups cost
    ref = steps.set_index("change")
    assert ref.loc["preset all", "cost"] == 0.0
    residual = costs[costs["kind"] == "residual"]
    assert ref.loc["preset mixed_1", "cost"] == pytest.approx((residual["cost_per_site"].clip(lower=0)
                                                               * residual["sites"]).sum(), rel=1e-5, abs=1e-6)  # CSV: 6 significant digits
    # a second plan reuses the measured table (same settings): the file is not rewritten
    stamp = (out / "latency_sites.json").stat().st_mtime_ns
    assert main(["plan", *common]) == 0
    assert (out / "latency_sites.json").stat().st_mtime_ns == stamp
