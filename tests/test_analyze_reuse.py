"""`vitq analyze`'s accuracy table reuses the planner's measurements of its plan and confirm
images (every config measured there already) and equals a `vitq eval` that measures all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from vitq.cli import main as vitq

ROOT = Path(__file__).resolve().parents[1]

FAST = ["--no-progress", "--calib", "16", "--error-images", "4", "--max-steps", "1", "--worst-sites", "0",
        "--measure-top", "4", "--cost", "macs"]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    out = tmp_path_factory.mktemp("reuse") / "analyze"
    assert vitq(["analyze", "--out", str(out), "--eval-images", "32", "--confirm-images", "24", *FAST]) == 0
    return out


def test_the_accuracy_table_reuses_the_plan_and_confirm_images_and_equals_a_full_eval(analyzed, tmp_path):
    out = analyzed
    run = json.loads((out / "accuracy.run.json").read_text())
    assert run["reused_images"] == 32 + 24
    accuracy = pd.read_csv(out / "accuracy.csv").set_index("config")
    # every config measured on every val image by eval, nothing reused
    again = tmp_path / "eval"
    assert vitq(["eval", "--out", str(again), "--no-progress", "--calib", "16", "--preset", "all,mixed_1,mixed_2,nncf",
                 "--config", str(out / "config_plan.yaml")]) == 0
    assert json.loads((again / "eval.run.json").read_text())["reused_images"] == 0
    full = pd.read_csv(again / "eval.csv").set_index("config")
    assert sorted(full.index) == sorted(accuracy.index)
    for name in accuracy.index:
        assert accuracy.loc[name, "images"] == full.loc[name, "images"]
        assert accuracy.loc[name, "top1"] == pytest.approx(full.loc[name, "top1"], abs=0.11)  # at most one image
        assert accuracy.loc[name, "kl"] == pytest.approx(full.loc[name, "kl"], rel=1e-4, abs=1e-9)


def _paired_gain(*args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "paired_gain.py"), *args],
                          capture_output=True, text=True, check=True)
    return done.stdout


def _its_kl(stdout: str, label: str) -> float:
    row = next(line for line in stdout.splitlines() if line.startswith(f"| {label} |"))
    return float(row.split("|")[2])


def test_paired_gain_on_the_confirm_images_reads_the_planners_confirm_table(analyzed):
    """scripts/paired_gain.py --images confirm picks the planner's confirm images out of the
    accuracy table: its per-config KL there is the confirm table's (written by the planner)."""
    confirm = pd.read_csv(analyzed / "plan_confirm.csv").set_index("config")
    stdout = _paired_gain(str(analyzed), "--against", "nncf,all", "--images", "confirm",
                          "--other", f"{analyzed}:mixed_1")
    assert stdout.startswith("24 images (confirm)")
    for label, config in (("nncf", "nncf"), ("all", "all"), (f"{analyzed}:mixed_1", "mixed_1")):
        assert _its_kl(stdout, label) == pytest.approx(confirm.loc[config, "kl"], rel=1e-3)
    assert "32 images (plan)" in _paired_gain(str(analyzed), "--against", "all", "--images", "plan")


def test_every_frontier_point_is_written_as_a_config_the_plan_and_presets_among_them(analyzed):
    """plan_frontier/attempt-NNN.yaml: one config per on_frontier row of plan_steps.csv (FP32
    aside); the plan's file holds plan.yaml's config, a preset's its config_<preset>.yaml."""
    from quant.config import QuantConfig

    tried = pd.read_csv(analyzed / "plan_steps.csv")
    frontier = tried[tried["on_frontier"] & (tried["config"] != "fp32")]
    files = sorted((analyzed / "plan_frontier").glob("attempt-*.yaml"))
    assert [f.name for f in files] == sorted(f"attempt-{a:03d}.yaml" for a in frontier["attempt"])

    def body(config: QuantConfig) -> dict:
        return {k: v for k, v in config.to_dict().items() if k != "name"}

    for row in frontier.itertuples():
        saved = QuantConfig.load(analyzed / "plan_frontier" / f"attempt-{row.attempt:03d}.yaml")
        assert saved.name == f"frontier_{row.attempt}"
        if row.plan:
            assert body(saved) == body(QuantConfig.load(analyzed / "plan.yaml"))
        if row.path == "reference":
            assert body(saved) == body(QuantConfig.load(analyzed / f"config_{row.config}.yaml"))


def test_paired_gain_takes_the_image_sets_of_another_analyze_folder(analyzed, tmp_path):
    """A `vitq eval` of a frontier config on every val image, paired on the analyze run's
    confirm images (--images-from): the config's KL there is the confirm table's plan KL."""
    attempt = int(pd.read_csv(analyzed / "plan_steps.csv").query("plan")["attempt"].iloc[0])
    plan_file = analyzed / "plan_frontier" / f"attempt-{attempt:03d}.yaml"
    again = tmp_path / "eval"
    assert vitq(["eval", "--out", str(again), "--no-progress", "--calib", "16", "--preset", "nncf",
                 "--config", str(plan_file)]) == 0
    config = f"frontier_{attempt}"
    stdout = _paired_gain(str(again), "--config", config, "--against", "nncf", "--images", "confirm",
                          "--images-from", str(analyzed), "--other", f"{analyzed}:plan")
    confirm = pd.read_csv(analyzed / "plan_confirm.csv").set_index("config")
    assert stdout.startswith("24 images (confirm)")
    assert _its_kl(stdout, "nncf") == pytest.approx(confirm.loc["nncf", "kl"], rel=1e-3)
    assert _its_kl(stdout, f"{analyzed}:plan") == pytest.approx(confirm.loc["plan", "kl"], rel=1e-3)
    assert f"{config}: KL {confirm.loc['plan', 'kl']:.4g}" in stdout
