"""Writing results so that a killed run loses nothing and leaves nothing half-written.

The bottom of the stack: every layer (quant, analysis, reports, the CLI) writes
through these helpers, so there is one write-then-rename, one strict-JSON table
writer and one append-only result log.

- :func:`atomic_write` and friends: write a temporary file, then rename it;
- :func:`write_table`: ``stem.csv`` + ``stem.json`` (rows and metadata) and
  ``stem.run.json`` (wall times: kept apart so reruns give byte-identical results);
- :class:`ResultLog`: append-only JSONL of finished work items, keyed by
  :func:`settings_key` of the settings that produced them (resume after a crash);
  :func:`read_log` reads the log of another process (a shard) with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pandas as pd


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write-then-rename, so a killed run never leaves a half-written file
    (``write`` fills the open temporary file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    tmp.replace(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


def clean_json(value: Any) -> Any:
    """Strict JSON: NaN/NA -> null, +-inf -> "inf"/"-inf", numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if value is pd.NA or value is pd.NaT:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(clean_json(data), indent=2, default=str, allow_nan=False) + "\n")
    return path


def write_table(df: pd.DataFrame, stem: str | Path, meta: dict[str, Any] | None = None,
                run: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """``stem``.csv and ``stem``.json (rows plus metadata).

    ``run`` (wall times, what this invocation measured, where its logs are) goes to
    ``stem``.run.json instead, so the same inputs and seed give byte-identical
    result files whether a run was resumed or not.
    """
    stem = Path(stem)
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    if run is not None:
        write_json(stem.with_suffix(".run.json"), run)
    atomic_write_text(csv_path, df.to_csv(index=False, float_format="%.6g"))
    write_json(json_path, {"meta": dict(meta or {}), "rows": df.to_dict(orient="records")})
    return csv_path, json_path


def settings_key(settings: Any) -> str:
    """A short stable hash of JSON-able settings (names a log, a cache, a config)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read_log(path: str | Path, settings: dict | None = None) -> dict[str, dict]:
    """The finished rows of a result log by ``row["candidate"]``: {} when the file is
    absent, or when ``settings`` is given and the log's first line holds other ones (a
    log another process wrote is only trusted for the settings it declares). A torn
    last line (a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    if settings is not None:
        try:
            header = json.loads(lines[0])["settings"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            header = None
        if header != json.loads(json.dumps(clean_json(settings), default=str)):
            return {}
    rows: dict[str, dict] = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["candidate"]] = row
    return rows


class ResultLog:
    """Append-only JSONL of finished work items (``row["candidate"]`` is the key).

    The first line holds the settings (written whole: write-then-rename). A torn last
    line (a run killed while appending) is ended with a newline when the log is opened,
    so the next row starts a line of its own: a partial row stays an undecodable line
    that readers skip, a row that lacked only its newline is kept, and a rerun with the
    same settings resumes where the last one died.
    """

    def __init__(self, path: Path, settings: dict) -> None:
        self.path = Path(path)
        if self.path.is_file():
            _end_torn_line(self.path)
            self.done: dict[str, dict] = read_log(self.path)
        else:
            self.done = {}
            atomic_write_text(self.path, json.dumps({"settings": clean_json(settings)}, default=str) + "\n")

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[row["candidate"]] = row

    def adopt(self, rows: dict[str, dict]) -> int:
        """Append the rows of ``rows`` (by candidate) this log lacks, e.g. those other
        processes measured, so this log alone holds them all; returns how many."""
        new = [row for name, row in rows.items() if name not in self.done]
        if new:
            with self.path.open("a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in new))
                f.flush()
                os.fsync(f.fileno())
            self.done.update((row["candidate"], row) for row in new)
        return len(new)


def _end_torn_line(path: Path) -> None:
    """Append a newline when the file's last line has none (an append cut short)."""
    with path.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if last != b"\n":
        with path.open("ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
