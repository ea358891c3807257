"""The one measure-and-resume path.

Everything eval, sensitivity and the planner measure is a work item (a batch of val
images, a sensitivity candidate, a planner configuration) appended, as soon as it is
measured, to a result log (:class:`quant.store.ResultLog`, JSONL) named by the
settings that produced it. Every later run with the same settings (a rerun after a
crash, a later command, another shard) reads the log back and measures only what it
lacks. Rows keep the format the log was written in: ``{"candidate": key, ...}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from quant.store import ResultLog, read_log


class MeasurementLog:
    """Finished work items by key (``done``), read from ``path`` and, when given, from
    the logs of other processes with the same settings (``read_also``: sensitivity
    shards); with ``adopt`` their rows are copied into ``path`` too, so that it alone
    holds them all (``adopted`` says how many)."""

    def __init__(self, path: str | Path, settings: dict, *, read_also: Iterable[str | Path] = (),
                 adopt: bool = False) -> None:
        self.log = ResultLog(Path(path), settings)
        others = [read_log(p, settings) for p in read_also]
        self.adopted = sum(self.log.adopt(rows) for rows in others) if adopt else 0
        self.done: dict[str, dict] = {key: row for rows in others for key, row in rows.items()}
        self.done.update(self.log.done)
        self.measured_now = 0  # items measured (not read back) by this process

    @property
    def path(self) -> Path:
        return self.log.path

    def add(self, row: dict) -> dict:
        """Append a just-measured item (``row["candidate"]`` is its key)."""
        self.log.append(row)
        self.done[row["candidate"]] = row
        self.measured_now += 1
        return row

    def get(self, key: str, measure: Callable[[], dict]) -> dict:
        """The row of ``key``: read back when logged, else ``measure()``d now and appended."""
        if key not in self.done:
            self.add({"candidate": key, **measure()})
        return self.done[key]

    def resuming(self, done: int, total: int, what: str) -> None:
        """Say that ``done`` of ``total`` ``what`` come from the log (nothing when none do)."""
        if done:
            print(f"resuming: {done} of {total} {what} ({self.path})")
