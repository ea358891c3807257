"""The report's section registry and the sections for artefacts the analyze fixture of
test_report.py does not write (a real backend, the latency table, the speed table),
rendered from planted artefacts written through the schema; and the schema's columns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import artifacts
from reports import figures, registry, render_report
from reports.registry import register_section
from analysis.budget import decide
from reports.sections.taylor import joined
from tests.test_report import column, notes, section, table

ROOT = Path(__file__).resolve().parents[1]


def plant(out: Path, spec: artifacts.TableSpec, rows: list[dict], **meta) -> None:
    """Write ``rows`` as the artefact ``spec`` (meta keys not given are None)."""
    artifacts.write(out, spec, pd.DataFrame(rows), {k: meta.get(k) for k in spec.meta},
                    {k: None for k in spec.run})


def speed_rows() -> list[dict]:
    base = dict(file_mb=1.0, latency_b1_ms=4.0, latency_b1_spread=0.1, throughput_b8_spread=0.05)
    return [dict(base, config="fp32", backend="torch eager", throughput_b8=10.0, speedup_b8_vs_fp32_eager=1.0),
            dict(base, config="all", backend="onnxruntime", throughput_b8=25.0, speedup_b8_vs_fp32_eager=2.5)]


def accuracy_row(config: str, agreement: float, **extra) -> dict:
    return {**dict(config=config, images=200, top1=80.0, top5=95.0, top1_drop=0.0, top5_drop=0.0, agreement=agreement,
                   kl=0.001, logit_mse=0.01, logit_sqnr_db=30.0, int8_sites=10, float_sites=5, skipped_sites=0,
                   int8_macs_share=100.0, top1_drop_se=0.0), **extra}


def candidate_row(name: str, rank: int, **extra) -> dict:
    return dict(rank=rank, candidate=name, path=name, kind="linear", block=0, role=name, sites=1, **extra)


# -- the registry -------------------------------------------------------------------------------
@pytest.fixture
def own_registry(monkeypatch):
    """Sections registered by a test vanish with it."""
    monkeypatch.setattr(registry, "SECTIONS", dict(registry.SECTIONS))


def test_a_section_registered_here_is_rendered_in_its_place(own_registry, tmp_path: Path):
    @register_section("planted", "Fastest config", order=55, needs={artifacts.SPEED: ("config", "throughput_b8")})
    def planted(a, sec):
        rows = a.table(artifacts.SPEED).rows
        sec.add("p", f"fastest: {rows.sort_values('throughput_b8').iloc[-1]['config']}")

    plant(tmp_path, artifacts.SPEED, speed_rows())
    text = render_report(tmp_path).read_text()
    assert "<p>fastest: all</p>" in section(text, "planted")
    found = re.findall(r'<section id="([^"]+)"', text)
    assert found.index("summary") < found.index("planted") < found.index("sensitivity")  # order 55: between 50 and 60
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = notes(section(render_report(empty).read_text(), "planted"))  # the boilerplate note, from the registry
    assert missing == f"Not available: no speed.json in this folder. Run vitq analyze --bench --out {empty} to produce it."


def test_registration_refuses_undeclared_columns_a_second_id_and_no_artefact(own_registry):
    with pytest.raises(ValueError, match=r"speed does not declare: \['speed_of_light'\]"):
        register_section("x", "x", order=1, needs={artifacts.SPEED: ("config", "speed_of_light")})
    with pytest.raises(ValueError, match="already registered"):
        register_section("accuracy", "again", order=1, needs={artifacts.EVAL: ()})(lambda a, sec: None)
    with pytest.raises(ValueError, match="always=True"):
        register_section("y", "y", order=1)


def test_section_modules_stay_small():
    assert not (ROOT / "reports" / "html.py").exists() or len((ROOT / "reports" / "html.py").read_text().splitlines()) < 300
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "reports" / "sections").glob("*.py")}
    assert len(sizes) >= 12 and max(sizes.values()) <= 200, sizes


# -- the schema's columns -------------------------------------------------------------------------
def test_write_refuses_a_table_without_a_declared_column_and_keeps_extra_ones(tmp_path: Path):
    rows = speed_rows()
    with pytest.raises(ValueError, match=r"lacks the declared columns \['throughput_b8'\]"):
        plant(tmp_path, artifacts.SPEED, [{k: v for k, v in r.items() if k != "throughput_b8"} for r in rows])
    plant(tmp_path, artifacts.SPEED, [dict(r, note="extra") for r in rows])
    assert list(artifacts.read(tmp_path, artifacts.SPEED).rows["note"]) == ["extra", "extra"]


def test_a_file_without_a_declared_column_is_a_warning_not_a_section(tmp_path: Path):
    plant(tmp_path, artifacts.SPEED, speed_rows())
    data = json.loads(artifacts.SPEED.path(tmp_path).read_text())
    for r in data["rows"]:
        del r["latency_b1_ms"]
    artifacts.SPEED.path(tmp_path).write_text(json.dumps(data))
    with pytest.raises(artifacts.SchemaError, match=r"speed.json lacks the columns \['latency_b1_ms'\]"):
        artifacts.read(tmp_path, artifacts.SPEED)
    text = render_report(tmp_path).read_text()
    assert "speed.json lacks the columns [&#39;latency_b1_ms&#39;]" in text and 'id="speed"' not in text


def test_every_table_spec_declares_columns_and_a_json_file():
    specs = artifacts.table_specs()
    assert len({s.stem for s in specs}) == len(specs) == 19  # plan_decide: the 19th
    for s in specs:
        assert s.columns and len(set(s.columns)) == len(s.columns) and s.file == f"{s.stem}.json", s.stem
        assert set(artifacts.RUN_CONTEXT) <= set(s.meta), s.stem  # the report's summary reads it from every table


# -- sections for optional artefacts ---------------------------------------------------------------
def test_speed_section(tmp_path: Path):
    plant(tmp_path, artifacts.SPEED, speed_rows(), threads=2, rounds=3, runs=5, warmup=2)
    sec = section(render_report(tmp_path).read_text(), "speed")
    assert column(sec, "speed-table", "b8 vs FP32 eager") == ["1.00x", "2.50x"]
    assert column(sec, "speed-table", "spread")[0] == "10 %"  # latency_b1_spread 0.1


def test_real_backend_section(tmp_path: Path):
    sim = {"all": {"images": 200, "agreement": 99.5, "max_abs_logit_diff": 0.25, "logit_sqnr_db": 31.0},
           "nncf": {"images": 200, "agreement": 98.0, "max_abs_logit_diff": 0.5, "logit_sqnr_db": 27.0}}
    onnx = {"all": {"path": "onnx/all.onnx", "bytes": 3 * 2**20, "quantize_linear": 40, "dequantize_linear": 80,
                    "int8_weights": 24}}
    rows = [accuracy_row("fp32", 100.0, sim_agreement=100.0), accuracy_row("all", 97.0, sim_agreement=99.5),
            accuracy_row("nncf", 96.5, sim_agreement=98.0)]
    plant(tmp_path, artifacts.EVAL, rows, backend="onnxruntime", simulation_agreement=sim, onnx_models=onnx,
          val_images=200)
    plant(tmp_path, artifacts.SPEED, speed_rows())
    sec = section(render_report(tmp_path).read_text(), "backend")
    assert "<b>onnxruntime</b>" in sec and 'href="#speed"' in sec
    assert column(sec, "backend-eval", "config") == ["fp32", "all", "nncf"]
    assert column(sec, "backend-eval", "agreement with simulation (%)") == ["100.00", "99.50", "98.00"]
    assert column(sec, "backend-eval", "agreement with FP32 (%)") == ["100.00", "97.00", "96.50"]
    assert column(sec, "backend-eval", "ONNX file (MB)") == ["–", "3.00", "–"]
    assert column(sec, "backend-eval", "QuantizeLinear nodes") == ["–", "40", "–"]
    torch_only = tmp_path / "torch"
    plant(torch_only, artifacts.EVAL, rows[:2], backend="torch", val_images=200)
    assert 'id="backend"' not in render_report(torch_only).read_text()  # the simulation alone: no such section


def latency_row(group: str, members: list[str], delta: float, lo: float, hi: float, free: bool) -> dict:
    kind, role = group.split("/")
    cost = 0.0 if free else delta / len(members)
    return dict(group=group, kind=kind, role=role, sites=len(members), members=",".join(members), start_ms=10.0,
                float_ms=10.0 + delta, delta_ms=delta, delta_lo_ms=lo, delta_hi_ms=hi, spread_ms=0.3, cost_ms=cost,
                free=free, cost_per_site=10 * cost)


def test_latency_section_and_the_plans_free_float_sites(tmp_path: Path):
    plant(tmp_path, artifacts.LATENCY, [
        latency_row("residual/residual_mlp", ["blocks.0.residual_mlp", "blocks.1.residual_mlp"], 0.1, -0.2, 0.4, True),
        latency_row("matmul_av/matmul_av", ["blocks.0.attn.matmul_av", "blocks.1.attn.matmul_av"], 1.0, 0.6, 1.4, False),
    ], backend="onnxruntime", batch=8, runs=7, threads=2, noise_ms=0.25)
    floats = ["blocks.1.residual_mlp", "blocks.0.attn.matmul_av", "blocks.2.attn.o"]
    (tmp_path / artifacts.PLAN_SKIPLIST).write_text(yaml.safe_dump({"float_kinds": [], "float_sites": floats}))
    plant(tmp_path, artifacts.PLAN_CONFIRM, [accuracy_row("plan", 99.0, top1_drop_se=0.1, cost=1.0, budget_outcome="met")],
          float_sites=floats[:2], cost="latency")
    text = render_report(tmp_path).read_text()
    assert ("Latency (latency_sites.json): 1 of the plan's 2 float site(s) have no measurable cost"
            " (blocks.1.residual_mlp)") in section(text, "planner")
    sec = section(text, "latency")
    assert "batch 8, 7 paired rounds, 2 threads, timing noise 0.25 ms. 1 of 2 groups have no measurable cost" in sec
    assert column(sec, "latency-table", "measurable") == ["no measurable cost", "yes"]
    assert column(sec, "latency-table", "slowdown [95 % interval] (ms)") == ["0.10 [−0.20, 0.40]", "1.00 [0.60, 1.40]"]
    assert column(sec, "latency-table", "cost per site (ms)") == ["0.000", "0.500"]
    head, rows = table(section(text, "skiplist"), "skiplist-latency")
    assert [r[0] for _, r in rows] == floats  # every float site of the plan, in the skip-list's order
    assert column(section(text, "skiplist"), "skiplist-latency", "measurable cost") == [
        "no measurable cost", "yes", "yes"]  # blocks.2.attn.o: in no measured group, so not known to be free
    assert column(section(text, "skiplist"), "skiplist-latency", "latency group") == [
        "residual/residual_mlp", "matmul_av/matmul_av", "–"]
    assert "1 of 3 have no measurable cost" in section(text, "skiplist")
    no_latency = tmp_path / "plain"
    no_latency.mkdir()
    (no_latency / artifacts.PLAN_SKIPLIST).write_text(yaml.safe_dump({"float_kinds": [], "float_sites": floats}))
    plain = render_report(no_latency).read_text()
    assert 'id="latency"' not in plain and 'id="skiplist-latency"' not in plain


# -- the taylor estimate against the measurement -----------------------------------------------------
def test_taylor_join_ranks_the_common_candidates_by_hand():
    estimate = pd.DataFrame([candidate_row(n, i + 1, kl_estimate=v) for i, (n, v) in
                             enumerate([("a", 4e-4), ("b", 3e-4), ("c", 2e-4), ("d", 1e-4)])])
    measured = pd.DataFrame({"candidate": ["a", "b", "c"], "kl": [0.1, 0.3, 0.2]})
    df = joined(estimate, measured).set_index("candidate")
    assert list(df["measured"]) == ["yes", "yes", "yes", "no"]
    assert df.loc[["a", "b", "c"], "estimate_rank"].tolist() == [1, 2, 3]
    assert df.loc[["a", "b", "c"], "measured_rank"].tolist() == [3, 1, 2]
    assert pd.isna(df.loc["d", "measured_rank"]) and pd.isna(df.loc["d", "kl"])


def test_taylor_section_reports_the_rank_correlation(tmp_path: Path):
    plant(tmp_path, artifacts.sensitivity_taylor("op"),
          [candidate_row(n, i + 1, kl_estimate=v) for i, (n, v) in
           enumerate([("a", 4e-4), ("b", 3e-4), ("c", 2e-4), ("d", 1e-4)])],
          method="taylor", probes=8, images=64, fisher_trace_captured_mean=0.9)
    meas = dict(images=64, top1=80.0, top5=95.0, top1_drop=0.0, top5_drop=0.0, agreement=99.0, logit_mse=0.01,
                logit_sqnr_db=30.0)
    plant(tmp_path, artifacts.sensitivity("only", "op"),
          [candidate_row("b", 1, kl=0.3, **meas), candidate_row("c", 2, kl=0.2, **meas),
           candidate_row("a", 3, kl=0.1, **meas)], rank_by="kl", images=64)
    sec = section(render_report(tmp_path).read_text(), "taylor")
    # estimate ranks (1, 2, 3) against measured ranks (3, 1, 2): Spearman rho = -1/2
    assert "Over the 3 candidates measured both ways the Spearman rank correlation is −0.50" in sec
    assert "4 candidates estimated, 3 also measured" in sec and "<img" in sec
    assert column(sec, "taylor-op", "measured") == ["yes", "yes", "yes", "no"]


def test_frontier_x_label_follows_the_cost_unit():
    steps = pd.DataFrame([dict(attempt=0, path="reference", config="all", cost=0.0, kl=1e-3, on_frontier=True,
                               plan=False),
                          dict(attempt=1, path="start", config="x", cost=2.0, kl=5e-4, on_frontier=True, plan=True)])
    default = figures.frontier(steps)
    assert figures.frontier(steps, cost_unit="ms per batch of 8 in ONNX Runtime") != default
    assert figures.frontier(steps, cost_unit=None) == default


# -- accuracy budgets ------------------------------------------------------------------------------
def plan_step(**extra) -> dict:
    return {**accuracy_row("plan", 99.0), **dict(attempt=0, path="start", kind="start", change="start from all", kept=True,
                                                 gain=None, gain_se=None, gain_lo=None, gain_hi=None, cost=1.0,
                                                 budget_outcome="undecided", stopped_early=False, on_frontier=True,
                                                 plan=True), **extra}


def test_budgets_section_shows_each_decision_with_its_bound_and_the_images_needed(tmp_path: Path):
    # 100 images, FP32 right and the plan wrong on 10, the other way round on 2: drop 8 pp,
    # upper bound 8 + 1.645 x 3.37 = 13.54 pp > 5 pp; 80 % power at 8 pp: 781 images, shown as ~790
    on_plan = decide("top1_drop", [1] * 10 + [-1] * 2 + [0] * 88, 5.0).to_dict()
    on_confirm = decide("top1_drop", [1] * 10 + [-1] * 2 + [0] * 88, 2.0).to_dict()  # 8 - 5.54 = 2.46 > 2: not met
    final = dict(on_plan, outcome="met", images=500, estimate=0.5, upper=0.9, bound=0.9, z=2.0, images_needed=None)
    decide_meta = dict(backend="onnxruntime", max_images=1000, looks=4, images=500,
                       candidates=[{"name": "plan", "attempt": 7, "outcome": "met"}], chosen="plan", decisions=[final])
    plant(tmp_path, artifacts.PLAN_STEPS, [plan_step()], budget={"max_drop": 5.0}, met=True, outcome="met",
          plan_images=100, confirm_images=100, decisions=[on_plan], confirm_decisions=[on_confirm], decide=decide_meta)
    looks = [dict(candidate="plan", attempt=7, look=k, kind="top1_drop", budget=5.0, images=250 * k, z=z,
                  estimate=0.5, lower=0.1, upper=up, bound=up, outcome=out, images_needed=need)
             for k, z, up, out, need in ((1, 3.0, 5.5, "undecided", 320), (2, 2.0, 0.9, "met", None))]
    plant(tmp_path, artifacts.PLAN_DECIDE, looks, **{k: v for k, v in decide_meta.items()})
    text = section(render_report(tmp_path).read_text(), "budgets")
    head, rows = table(text, "budget-table")
    assert [cells for _, cells in rows] == [
        ["100 plan images (search)", "top-1 drop ≤ 5.00 pp", "8.00 pp", "upper 13.54 pp", "undecided", "100", "~790"],
        ["100 confirm images", "top-1 drop ≤ 2.00 pp", "8.00 pp", "lower 2.46 pp", "not met", "100", ""],
        ["further images (sequential test, onnxruntime)", "top-1 drop ≤ 5.00 pp", "0.50 pp", "upper 0.90 pp", "met",
         "500", ""]]
    assert column(text, "decide-table", "decision") == ["undecided", "met"]
    assert column(text, "decide-table", "bound") == ["upper 5.50 pp", "upper 0.90 pp"]
    assert column(text, "decide-table", "images needed") == ["~320", ""]
    assert "500 of 1000 further images measured, 4 looks planned" in text and "Chosen: plan." in text


def test_no_budgets_section_without_an_explicit_budget_and_the_accuracy_drop_has_its_se(tmp_path: Path):
    plant(tmp_path, artifacts.PLAN_STEPS, [plan_step(budget_outcome="met", top1_drop=0.8, top1_drop_se=0.4)],
          budget={"beat_references": True},
          met=True, outcome="met", decisions=[])
    plant(tmp_path, artifacts.EVAL, [accuracy_row("fp32", 100.0), accuracy_row("all", 98.0, top1_drop=1.5,
                                                                               top1_drop_se=0.61)], val_images=200)
    text = render_report(tmp_path).read_text()
    assert 'id="budgets"' not in text
    assert column(section(text, "accuracy"), "accuracy-table", "top-1 drop ± se (pp)") == [
        "0.00 ± 0.00", "1.50 ± 0.61", "0.80 ± 0.40"]  # the last: the planner's chosen point, from plan_steps
