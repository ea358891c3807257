"""`vitq analyze`'s accuracy table reuses the planner's measurements of its plan and confirm
images (every config measured there already) and equals a `vitq eval` that measures all."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vitq.cli import main as vitq

FAST = ["--no-progress", "--calib", "16", "--error-images", "4", "--max-steps", "1", "--worst-sites", "0",
        "--measure-top", "4", "--cost", "macs"]


def test_the_accuracy_table_reuses_the_plan_and_confirm_images_and_equals_a_full_eval(tmp_path):
    out = tmp_path / "analyze"
    assert vitq(["analyze", "--out", str(out), "--eval-images", "32", "--confirm-images", "24", *FAST]) == 0
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
