"""The decide stage: the plan (and its cheaper frontier neighbours) measured on further
images, streamed in batches through the one runner (:func:`analysis.runner.stream`),
until every explicit budget is decided.

Each candidate's budgets are sequential tests (:class:`analysis.budget.SequentialBudget`:
O'Brien-Fleming alpha spending over equally spaced looks), so stopping at the first
decision keeps each claim's error at 5 %. The candidates are tested as a fixed sequence
(the plan first, then ever cheaper neighbours; see :mod:`analysis.budget`): a candidate
counts as met only when every candidate before it was met too, and the stream stops as
soon as the sequence is settled: every candidate met, or the first one not met decided
(shown not met) or out of images. Every batch is appended to a measurement log, so an
interrupted stage resumes where it stopped and decides the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from quant.config import QuantConfig

from .budget import Decision, SequentialBudget, overall
from .measurement_log import MeasurementLog
from .metrics import OutputStats
from .planner import per_image_values
from .runner import SwitchableModel, stream

LOOKS = 10  # looks of each sequential test (fewer when there are fewer images)
FP32 = "fp32"


@dataclass
class Candidate:
    """One configuration the stage decides: ``name`` (``plan``, ``neighbour_1``, ...), the
    planner attempt it comes from, and its config."""

    name: str
    attempt: int
    config: QuantConfig


@dataclass
class DecideResult:
    """What the stage decided: per candidate (in test order) its budgets' latest
    decisions; ``rows``: one per look taken (candidate, kind, images, estimate, bounds,
    outcome); ``images``: the images streamed (``resumed`` of them from the log);
    ``chosen``: the position of the cheapest candidate called met in the fixed sequence,
    None when the first (the plan) is not."""

    candidates: list[Candidate]
    decisions: dict[str, list[Decision]]
    rows: list[dict]
    images: int
    max_images: int
    looks: int
    resumed: int = 0
    chosen: int | None = None
    outcomes: dict[str, str] = field(default_factory=dict)

    def outcome(self, name: str) -> str:
        return overall(self.decisions[name])


class SequentialDecide:
    """The sequential tests of every candidate's budgets over the same streamed images."""

    def __init__(self, candidates: list[Candidate], limits: dict[str, float], max_images: int,
                 looks: int = LOOKS) -> None:
        if not limits:
            raise ValueError("the decide stage needs an explicit budget (--max-drop, --min-agreement or --max-kl)")
        if not candidates:
            raise ValueError("the decide stage needs a candidate")
        self.candidates, self.max_images = candidates, max_images
        self.looks = min(looks, max_images)
        self.tests = {c.name: {kind: SequentialBudget(kind, value, max_images, self.looks)
                               for kind, value in limits.items()} for c in candidates}
        self.rows: list[dict] = []
        self.images = 0

    def feed(self, stats: dict[str, OutputStats]) -> None:
        """One batch: ``stats`` per candidate name and ``fp32`` (the same images)."""
        fp32 = stats[FP32]
        for c in self.candidates:
            for kind, test in self.tests[c.name].items():
                self._feed(c, kind, test, per_image_values(kind, stats[c.name], fp32))
        self.images += len(fp32)

    def _feed(self, c: Candidate, kind: str, test: SequentialBudget, values) -> None:
        """``values`` split at the look boundaries, so that every look gives a row."""
        start = 0
        while start < len(values) and not (test.decision is not None and test.decision.decided):
            end = len(values) if test.look >= len(test.at) else min(len(values), start + test.at[test.look] - test.sample.n)
            before = test.look
            decision = test.update(values[start:end])
            start = end
            if test.look > before:
                self.rows.append({"candidate": c.name, "attempt": c.attempt, "look": test.look,
                                  **{k: v for k, v in decision.to_dict().items() if k != "text"}})

    def decisions(self, name: str) -> list[Decision]:
        return [t.decision for t in self.tests[name].values() if t.decision is not None]

    def _outcome(self, name: str) -> str:
        tests = self.tests[name].values()
        if any(t.decision is None for t in tests):
            return "undecided"
        return overall([t.decision for t in tests])

    def finished(self) -> bool:
        """The fixed sequence is settled: every candidate met, or the first one not met
        is decided (shown not met)."""
        for c in self.candidates:
            outcome = self._outcome(c.name)
            if outcome != "met":
                return outcome == "not met"
        return True

    def chosen(self) -> int | None:
        """The last candidate of the met prefix of the sequence (None: the plan is not met)."""
        met = 0
        for c in self.candidates:
            if self._outcome(c.name) != "met":
                break
            met += 1
        return met - 1 if met else None

    def result(self, resumed: int) -> DecideResult:
        return DecideResult(self.candidates, {c.name: self.decisions(c.name) for c in self.candidates}, self.rows,
                            self.images, self.max_images, self.looks, resumed, self.chosen(),
                            {c.name: self._outcome(c.name) for c in self.candidates})


def decide_candidates(make_model: Callable[[], SwitchableModel], candidates: list[Candidate], limits: dict[str, float],
                      batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[int]]], max_images: int, *,
                      looks: int = LOOKS, log: MeasurementLog | None = None, total: int | None = None,
                      progress: bool = True) -> DecideResult:
    """Stream ``batches`` (the further images not yet in ``log``, in a fixed order) through
    FP32 and every candidate until the sequence is settled (see the module docstring).
    Batches already in ``log`` are fed first, in image order, so a resumed stage takes the
    same looks. ``max_images``: the images the looks are spread over (all of them).
    ``make_model()`` gives what runs them (the QuantModel or a real int8 backend), called
    only when the log does not settle the sequence (an export is not redone for nothing)."""
    test = SequentialDecide(candidates, limits, max_images, looks)
    logged = sorted(log.done.values(), key=lambda r: r["first"]) if log is not None else []
    for record in logged:
        if test.finished():
            break
        test.feed({k: OutputStats.from_dict(v) for k, v in record["configs"].items()})
    resumed = test.images
    if log is not None:
        log.resuming(resumed, max_images, "further images already measured by the decide stage")
    if not test.finished():
        model = make_model()
        states = {FP32: model.prepare(None), **{c.name: model.prepare(c.config) for c in candidates}}
        bar = tqdm(batches, total=total, desc="plan: deciding the budget", unit="batch", disable=not progress)
        try:
            for idx, stats in stream(model, states, bar):
                record = {"candidate": f"images {idx[0]}-{idx[-1]}", "first": idx[0], "indices": idx,
                          "configs": {name: s.to_dict() for name, s in stats.items()}}
                if log is not None:
                    log.add(record)
                test.feed(stats)
                if test.finished():
                    break
        finally:
            bar.close()
            model.apply(None)
    return test.result(resumed)
