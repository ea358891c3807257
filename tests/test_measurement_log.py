"""The one measure-and-resume path (analysis.measurement_log), on logs written in the
format the eval, sensitivity and planner logs have on disk (settings line, then one row
per finished item), and evaluate_configs through a model that is not a QuantModel."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.evaluate import evaluate_configs, evaluated_images
from analysis.measurement_log import MeasurementLog
from quant.config import QuantConfig
from quant.sites import Site
from quant.store import settings_key

SETTINGS = {"model": "tiny", "images": 4, "log_version": 3}


def write_log(path, settings, rows):
    """A log as the runs write it: the settings line, then one JSON row per item."""
    path.write_text("".join(json.dumps(x) + "\n" for x in [{"settings": settings}, *rows]))
    return path


def stats(top1, agree, kl, noise, signal=(4.0, 4.0)):
    return {"top1": list(top1), "top5": [1.0] * len(top1), "agree": list(agree), "kl": list(kl),
            "mse": [n / 4 for n in noise], "signal": list(signal), "noise": list(noise)}


def test_the_settings_key_that_names_todays_logs_is_unchanged():
    # the file names of the logs being written now (eval.<key>.jsonl, ...) must still match
    assert settings_key(SETTINGS) == "4414ab48d2"


class ScaledLogits:
    """A model that is not a QuantModel: logits = pixels * the state's factor (FP32: 1,
    a config: -1, which flips the top-1 class of every image)."""

    sites = [Site("head", "linear", None, "head")]

    def __init__(self) -> None:
        self.factor, self.calls = 1.0, 0

    def prepare(self, config):
        return 1.0 if config is None else -1.0

    def restore(self, state):
        self.factor = state

    def apply(self, config):
        self.factor = self.prepare(config)

    def __call__(self, pixels):
        self.calls += 1
        return pixels * self.factor


ALL = QuantConfig(name="all")


def test_an_eval_log_in_todays_format_gives_the_table_without_running_the_model(tmp_path):
    path = write_log(tmp_path / f"eval.{settings_key(SETTINGS)}.jsonl", SETTINGS, [
        {"candidate": "images 2-3", "first": 2, "indices": [2, 3],
         "configs": {"fp32": stats([0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]),
                     "all": stats([0.0, 1.0], [1.0, 1.0], [0.0, 0.02], [0.0, 0.08])}},
        {"candidate": "images 0-1", "first": 0, "indices": [0, 1],
         "configs": {"fp32": stats([1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]),
                     "all": stats([1.0, 0.0], [1.0, 0.0], [0.01, 0.03], [0.04, 0.04])}},
    ])
    log = MeasurementLog(path, SETTINGS)
    assert evaluated_images(log) == {0, 1, 2, 3}
    model = ScaledLogits()
    df = evaluate_configs(model, {"all": ALL}, [], macs={"head": 10.0}, progress=False, log=log)
    assert model.calls == 0 and log.measured_now == 0
    fp32, q = df.iloc[0], df.iloc[1]
    assert df["config"].tolist() == ["fp32", "all"] and list(df["images"]) == [4, 4]
    assert (fp32["top1"], q["top1"], q["top1_drop"], fp32["top1_drop"]) == (75.0, 50.0, 25.0, 0.0)
    assert q["agreement"] == 75.0 and q["kl"] == pytest.approx(0.015)
    assert q["logit_sqnr_db"] == pytest.approx(20.0)  # 10 log10(16 / 0.16)
    assert fp32["logit_sqnr_db"] == math.inf
    assert (fp32["int8_macs_share"], q["int8_macs_share"]) == (0.0, 100.0)
    assert list(df.columns[:6]) == ["config", "images", "top1", "top5", "top1_drop", "top5_drop"]


def test_evaluate_configs_measures_a_non_quantmodel_and_a_rerun_reads_it_back(tmp_path):
    pixels = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 4.0]])  # FP32 classes 0, 1, 1
    labels = torch.tensor([0, 1, 0])
    path = tmp_path / "eval.jsonl"
    model = ScaledLogits()
    first = evaluate_configs(model, {"all": ALL}, [(pixels, labels, [0, 1, 2])], progress=False,
                             log=MeasurementLog(path, SETTINGS))
    assert model.calls == 2  # one batch, two states
    assert first["top1"].round(6).tolist() == [66.666667, 33.333333]  # negated logits pick the other class
    assert first["agreement"].tolist() == [100.0, 0.0]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"settings": SETTINGS}
    assert (rows[1]["candidate"], rows[1]["indices"]) == ("images 0-2", [0, 1, 2])
    again = evaluate_configs(model, {"all": ALL}, [], progress=False, log=MeasurementLog(path, SETTINGS))
    assert model.calls == 2
    assert again.equals(first)


def test_a_plan_log_in_todays_format_is_read_back_and_only_new_configs_are_measured(tmp_path):
    logged = stats([1.0, 0.0], [1.0, 0.0], [0.01, 0.03], [0.04, 0.04])
    path = write_log(tmp_path / "plan_measurements.x.jsonl", SETTINGS,
                     [{"candidate": "fp32", "stats": stats([1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0])},
                      {"candidate": "3f2a", "stats": logged}])
    log = MeasurementLog(path, SETTINGS)
    assert log.get("3f2a", lambda: pytest.fail("a logged config was measured again"))["stats"] == logged
    new = stats([0.0, 0.0], [0.0, 0.0], [0.5, 0.5], [1.0, 1.0])
    assert log.get("77bc", lambda: {"stats": new}) == {"candidate": "77bc", "stats": new}
    assert log.measured_now == 1
    assert json.loads(path.read_text().splitlines()[-1]) == {"candidate": "77bc", "stats": new}
    assert set(MeasurementLog(path, SETTINGS).done) == {"fp32", "3f2a", "77bc"}


def test_sensitivity_shard_logs_are_read_and_adopted_only_with_the_same_settings(tmp_path, capsys):
    def row(name, kl):
        return {"candidate": name, "path": name, "kind": "linear", "block": 0, "role": "q", "sites": 1,
                "mode": "only", "start_block": 0, "images": 4, "top1": 75.0, "top5": 100.0, "agreement": 75.0,
                "kl": kl, "logit_mse": 0.1, "logit_sqnr_db": 20.0}

    main = write_log(tmp_path / "sensitivity_only_op.k.jsonl", SETTINGS, [row("a", 0.1)])
    shard = write_log(tmp_path / "sensitivity_only_op.k.shard-1-of-2.jsonl", SETTINGS, [row("b", 0.2)])
    other = write_log(tmp_path / "sensitivity_only_op.k.shard-0-of-2.jsonl", {**SETTINGS, "images": 8},
                      [row("c", 0.3)])
    # a shard reads the main log and the other shards, writes only its own
    own = MeasurementLog(tmp_path / "sensitivity_only_op.k.shard-0-of-3.jsonl", SETTINGS,
                         read_also=[main, shard, other])
    assert sorted(own.done) == ["a", "b"] and own.adopted == 0
    assert len(own.path.read_text().splitlines()) == 1
    # the unsharded run copies the shards' rows into the main log
    merged = MeasurementLog(main, SETTINGS, read_also=[shard, other], adopt=True)
    assert merged.adopted == 1 and merged.done["b"] == row("b", 0.2)
    assert [json.loads(x)["candidate"] for x in main.read_text().splitlines()[1:]] == ["a", "b"]
    merged.resuming(2, 5, "candidates already done")
    assert capsys.readouterr().out == f"resuming: 2 of 5 candidates already done ({main})\n"


@pytest.mark.parametrize("torn, kept", [
    ('{"candidate": "b", "kl": 0.', ["a", "c"]),  # killed mid-row: the partial row is skipped
    ('{"candidate": "b", "kl": 0.2}', ["a", "b", "c"]),  # killed before the newline: the row is whole
])
def test_a_torn_last_line_does_not_swallow_the_next_row(tmp_path, torn, kept):
    # a run killed while appending leaves a last line without its newline; the rerun's first
    # append must start on a line of its own, else both rows are one undecodable line
    path = write_log(tmp_path / "eval.k.jsonl", SETTINGS, [{"candidate": "a", "kl": 0.1}])
    with path.open("a") as f:
        f.write(torn)
    log = MeasurementLog(path, SETTINGS)
    log.add({"candidate": "c", "kl": 0.3})
    assert sorted(MeasurementLog(path, SETTINGS).done) == kept
    # the same for rows adopted from a shard log (the merge run appends them in one write)
    main = write_log(tmp_path / "sensitivity.k.jsonl", SETTINGS, [{"candidate": "a", "kl": 0.1}])
    with main.open("a") as f:
        f.write(torn)
    shard = write_log(tmp_path / "sensitivity.k.shard-0-of-2.jsonl", SETTINGS, [{"candidate": "c", "kl": 0.3}])
    assert MeasurementLog(main, SETTINGS, read_also=[shard], adopt=True).adopted == 1
    assert sorted(MeasurementLog(main, SETTINGS).done) == kept
