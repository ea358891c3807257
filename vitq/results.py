"""Writing tables where scripts can read them: CSV + JSON, atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write-then-rename, so a killed run never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_table(df: pd.DataFrame, stem: str | Path, meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """``stem``.csv and ``stem``.json (rows plus metadata).

    ``meta["run"]`` (wall times, what this invocation measured, where its logs are)
    goes to ``stem``.run.json instead, so the same inputs and seed give byte-identical
    result files whether a run was resumed or not.
    """
    stem = Path(stem)
    meta = dict(meta or {})
    run = meta.pop("run", None)
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    if run is not None:
        atomic_write_text(stem.with_suffix(".run.json"), json.dumps(run, indent=2, default=str) + "\n")
    atomic_write_text(csv_path, df.to_csv(index=False, float_format="%.6g"))
    rows = [{k: _clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
    atomic_write_text(json_path, json.dumps({"meta": meta or {}, "rows": rows}, indent=2, default=str) + "\n")
    return csv_path, json_path
