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
