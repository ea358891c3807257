"""Writing tables where scripts can read them: CSV + JSON, atomically."""

from __future__ import annotations

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


def _clean(value: Any) -> Any:
    """Strict JSON: NaN/NA -> null, +-inf -> "inf"/"-inf", numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is pd.NA or value is pd.NaT:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
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
    rows = _clean(df.to_dict(orient="records"))
    text = json.dumps({"meta": _clean(meta), "rows": rows}, indent=2, default=str, allow_nan=False)
    atomic_write_text(json_path, text + "\n")
    return csv_path, json_path
