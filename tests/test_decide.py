"""The decide stage: candidates streamed through the one runner on further images until every
explicit budget is decided; early stop, per-look rows, the fixed sequence, resume from the log."""

import math

import numpy as np
import pytest
import torch

from analysis.budget import SequentialBudget, obrien_fleming_bounds
from analysis.decide import Candidate, decide_candidates
from analysis.measurement_log import MeasurementLog
from quant.config import QuantConfig

CLASSES = 4


class Scripted:
    """A SwitchableModel whose logits are scripted per config: each image (its pixel is
    its id) gets its label's class, except where ``wrong[name](id)`` says the config errs."""

    sites: list = []

    def __init__(self, wrong: dict) -> None:
        self.wrong, self.current, self.calls = wrong, None, 0

    def prepare(self, config):
        return "fp32" if config is None else config.name

    def restore(self, state) -> None:
        self.current = state

    def apply(self, config) -> None:
        self.current = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        ids = pixels[:, 0].long()
        cls = ids % CLASSES
        if self.current in self.wrong:
            cls = torch.where(torch.tensor([self.wrong[self.current](int(i)) for i in ids]), (cls + 1) % CLASSES, cls)
        return torch.nn.functional.one_hot(cls, CLASSES).float() * 10


def batches(n: int, size: int = 50):
    for start in range(0, n, size):
        ids = torch.arange(start, min(start + size, n))
        yield ids[:, None].float(), ids % CLASSES, ids.tolist()


def candidates(*names):
    return [Candidate(n, i, QuantConfig(name=n)) for i, n in enumerate(names)]


def first_met_look(max_images: int, looks: int, budget_pp: float) -> int:
    """Hand computation for a config that never errs (drop 0, no discordant image): at look
    k (n_k images) the rule-of-three floor gives sd = sqrt(3/n_k (1 - 3/n_k)), and the budget
    is met once z_k sd / sqrt(n_k) <= budget."""
    z = obrien_fleming_bounds(looks)
    for k in range(1, looks + 1):
        n = round(k * max_images / looks)
        rate = min(3 / n, 0.5)
        if 100 * z[k - 1] * math.sqrt(rate * (1 - rate) / n) <= budget_pp:
            return n
    raise AssertionError("never met")


def test_the_stage_stops_at_the_first_look_that_decides_and_writes_a_row_per_look(tmp_path):
    model = Scripted({})  # the plan never differs from FP32
    n_stop = first_met_look(2000, 10, 1.0)
    # O'Brien-Fleming, 10 looks: z_2 = 4.23, z_3 = 3.40; 4.23 x sqrt(3/400 (1 - 3/400) / 400) = 1.82 pp > 1 pp,
    # 3.40 x sqrt(3/600 (1 - 3/600) / 600) = 0.98 pp <= 1 pp
    assert n_stop == 600
    result = decide_candidates(lambda: model, candidates("plan"), {"top1_drop": 1.0}, batches(2000), 2000, looks=10,
                               progress=False)
    assert result.images == n_stop and result.images < 2000  # stopped early: 12 of 40 batches run
    assert model.calls == 2 * n_stop // 50  # FP32 and the plan on each batch streamed, no more
    assert [r["images"] for r in result.rows] == [200, 400, 600]
    assert [r["outcome"] for r in result.rows] == ["undecided"] * 2 + ["met"]
    assert [r["z"] for r in result.rows] == pytest.approx(obrien_fleming_bounds(10)[:3])
    last = result.rows[-1]
    assert last["estimate"] == 0.0 and last["bound"] == last["upper"] <= 1.0
    assert result.rows[0]["images_needed"] is not None and last["images_needed"] is None
    assert result.chosen == 0 and result.outcome("plan") == "met"


def test_the_fixed_sequence_stops_at_the_first_candidate_not_met(tmp_path):
    # the plan never errs; neighbour_1 errs on every 10th image (drop 10 pp > 1 pp: not met);
    # neighbour_2 never errs, but comes after neighbour_1 and so is never called met
    model = Scripted({"neighbour_1": lambda i: i % 10 == 0})
    result = decide_candidates(lambda: model, candidates("plan", "neighbour_1", "neighbour_2"), {"top1_drop": 1.0},
                               batches(2000), 2000, looks=10, progress=False)
    assert result.outcomes["plan"] == "met" and result.outcomes["neighbour_1"] == "not met"
    assert result.chosen == 0  # the plan: the last of the met prefix
    # stopped once the plan was met (600 images) and neighbour_1 shown not met (earlier)
    assert result.images == 600
    cheap = decide_candidates(lambda: Scripted({}), candidates("plan", "neighbour_1"), {"top1_drop": 1.0},
                              batches(2000), 2000, looks=10, progress=False)
    assert cheap.chosen == 1  # both met: the cheaper neighbour is the plan now


def test_the_stage_runs_out_of_images_undecided_with_the_images_needed():
    # the plan errs on every 50th image: drop 2 pp against a 2.5 pp budget, too close for 500 images
    model = Scripted({"plan": lambda i: i % 50 == 0})
    result = decide_candidates(lambda: model, candidates("plan"), {"top1_drop": 2.5}, batches(500), 500, looks=5,
                               progress=False)
    (d,) = result.decisions["plan"]
    assert result.images == 500 and d.outcome == "undecided" and result.chosen is None
    assert len(result.rows) == 5 and d.z == pytest.approx(obrien_fleming_bounds(5)[-1])
    # 80 % power at the estimate, the last look's z: ((z_5 + 0.842) sd / (2.5 - 2 pp))^2, sd^2 = 0.02 - 0.02^2
    expected = ((obrien_fleming_bounds(5)[-1] + 0.8416) * math.sqrt(0.02 - 0.0004) / 0.005) ** 2
    assert d.images_needed == pytest.approx(expected, rel=1e-3)
    assert "images would decide it" in d.describe()


def test_a_resumed_stage_takes_the_same_looks_from_its_log(tmp_path):
    settings = {"test": 1}
    log = MeasurementLog(tmp_path / "decide.jsonl", settings)
    whole = decide_candidates(lambda: Scripted({}), candidates("plan"), {"top1_drop": 1.0}, batches(2000), 2000,
                              log=log, progress=False)
    again = MeasurementLog(tmp_path / "decide.jsonl", settings)
    made = []  # the model (an ONNX export, say) is not even built: the log settles the sequence
    resumed = decide_candidates(lambda: made.append(Scripted({})) or made[-1], candidates("plan"), {"top1_drop": 1.0},
                                batches(2000), 2000, log=again, progress=False)
    assert made == [] and again.measured_now == 0 and resumed.resumed == 600
    assert resumed.rows == whole.rows and resumed.chosen == 0


def test_sequential_rows_match_one_sequential_budget_fed_whole():
    """Splitting batches at the looks changes nothing: the last row is the decision a
    SequentialBudget reaches on the same values in one batch."""
    model = Scripted({"plan": lambda i: i % 25 == 0})  # drop 4 pp
    result = decide_candidates(lambda: model, candidates("plan"), {"top1_drop": 1.0}, batches(1000, 64), 1000, looks=8,
                               progress=False)
    values = np.array([1.0 if i % 25 == 0 else 0.0 for i in range(1000)])
    alone = SequentialBudget("top1_drop", 1.0, 1000, looks=8).update(values)
    last = result.rows[-1]
    assert (last["outcome"], last["images"]) == (alone.outcome, alone.images) == ("not met", last["images"])
    assert last["estimate"] == pytest.approx(alone.estimate)


def test_vitq_plan_with_a_0_3_pp_drop_budget_on_the_embedded_default_is_never_met(tmp_path, capsys):
    """On 64 plan images (one image = 1.6 pp) and 400 further images, a 0.3 pp budget cannot be
    shown met: even with no image changing its answer the rule of three bounds the drop at
    1.79 x sqrt(3/400 (1 - 3/400) / 400) = 0.78 pp at the last look. The run says so, with
    the images that would decide it (or shows it not met), and never says met."""
    import json

    from vitq.cli import main

    out = tmp_path / "p"
    assert main(["plan", "--max-drop", "0.3", "--cost", "macs", "--eval-images", "64", "--confirm-images", "64",
                 "--measure-top", "4", "--taylor-images", "16", "--max-steps", "2", "--decide-images", "400",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "plan_steps.json").read_text())["meta"]
    assert meta["met"] is False and meta["outcome"] in ("undecided", "not met")
    assert "met with 95 % confidence" not in printed
    (final,) = meta["decide"]["decisions"]
    assert final["outcome"] in ("undecided", "not met") and final["outcome"] in meta["verdict"]
    if final["outcome"] == "undecided":
        assert "UNDECIDED on" in printed and "images would decide it" in printed
    assert final["text"] in printed and meta["verdict"] in printed
    decide = json.loads((out / "plan_decide.json").read_text())
    looks = [r for r in decide["rows"] if r["candidate"] == "plan"]
    assert [r["images"] for r in looks] == [40 * k for k in range(1, len(looks) + 1)]  # 10 looks planned over 400
    assert looks[-1]["outcome"] == final["outcome"] and decide["meta"]["images"] <= 400
    assert all(r["outcome"] != "met" for r in decide["rows"] if r["candidate"] == "plan")


def test_decide_images_are_neither_plan_nor_confirm_images():
    from types import SimpleNamespace

    from vitq.pipeline import val_split

    session = SimpleNamespace(opts=SimpleNamespace(seed=0))
    plan, confirm, further = val_split(session, 100, 30, 20, None)
    assert (len(plan), len(confirm), len(further)) == (30, 20, 50)
    assert sorted(plan + confirm + further) == list(range(100))  # disjoint, and every other image is further
    assert val_split(session, 100, 30, 20)[:2] == (plan, confirm)  # the plan/confirm draw is unchanged
    some = val_split(session, 100, 30, 20, 10)[2]
    assert len(some) == 10 and some == further[:10]  # the first looks of the same stream
    # streamed in the seeded random order, not in folder order (a folder is listed class by class:
    # looks in folder order would each see other classes, and a sequential test would stop on that)
    assert further != sorted(further)
    blocks = [set(further[i:i + 10]) for i in range(0, 50, 10)]
    assert all(max(b) - min(b) > 10 for b in blocks)  # each look reaches across the folder
    assert val_split(session, 100, 60, 40, None)[2] == []  # nothing left
