"""The artefact schema: every file an analysis writes into an output folder, and
every metadata key it carries.

Writers (the commands) and the reader (the HTML report) both go through this
module, so a key the report reads is a key a writer wrote: :func:`write` refuses
metadata that does not match the declared keys, and :func:`read` returns only
what the files hold. Wall times live in ``<stem>.run.json`` (see
:func:`quant.store.write_table`), so result files stay byte-identical across
resumed and uninterrupted runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from quant.store import write_table

# Describes the model, data and calibration behind every table (Session.describe()).
RUN_CONTEXT = ("model", "family", "data", "seed", "calibration_images", "torch", "transformers")


@dataclass(frozen=True)
class TableSpec:
    """One table artefact: ``stem``.csv/.json/.run.json and the keys of its meta and run info."""

    stem: str
    meta: tuple[str, ...]
    run: tuple[str, ...]
    command: str  # the command that writes it (named by the report when it is missing)

    def path(self, out: Path, suffix: str = ".json") -> Path:
        return Path(out) / f"{self.stem}{suffix}"


EVAL = TableSpec(
    "eval", (*RUN_CONTEXT, "val_images", "skipped_images", "configs", "backend", "simulation_agreement",
             "onnx_models"),
    ("calibration_s", "evaluation_s", "resumed_images", "log"), "vitq eval")
ACCURACY = TableSpec("accuracy", EVAL.meta, EVAL.run, "vitq analyze")  # analyze's final table (eval's stays apart)
SENSITIVITY_META = (*RUN_CONTEXT, "mode", "group", "images", "candidates", "fp32", "baseline", "rank_by")
SENSITIVITY_RUN = ("calibration_s", "wall_s", "measured_now", "merged_from_shards", "candidates_s", "full_pass_s",
                   "naive_estimate_s", "speedup_vs_naive", "log")
TAYLOR_META = (*RUN_CONTEXT, "method", "group", "images", "candidates", "probes", "fisher_trace_captured_mean",
               "fisher_trace_captured_min")
TAYLOR_RUN = ("calibration_s", "wall_s")
ERRORS_META = (*RUN_CONTEXT, "config", "images", "batches", "outlier_k")
ERRORS_RUN = ("calibration_s", "wall_s")
ERRORS_ACTIVATIONS = TableSpec("errors_activations", ERRORS_META, ERRORS_RUN, "vitq errors")
ERRORS_WEIGHTS = TableSpec("errors_weights", ERRORS_META, ERRORS_RUN, "vitq errors")
ERRORS_CHANNELS = "errors_channels.npz"
LATENCY = TableSpec("latency_sites", (*RUN_CONTEXT, "config", "batch", "runs", "threads", "backend", "version",
                                      "noise_ms"),
                    ("calibration_s", "wall_s"), "vitq plan --cost latency")
PLAN_META = (*RUN_CONTEXT, "budget", "met", "outcome", "cost", "cost_unit", "cost_noise", "met_at_step", "plan_images",
             "confirm_images", "plan", "float_sites",
             "start", "best_reference", "verdict", "noise")
PLAN_RUN = ("calibration_s", "wall_s", "measured_now", "log")
PLAN_STEPS = TableSpec("plan_steps", PLAN_META, PLAN_RUN, "vitq plan")
PLAN_TRIED = TableSpec("plan_tried", PLAN_META, PLAN_RUN, "vitq plan")
PLAN_CONFIRM = TableSpec("plan_confirm", PLAN_META, PLAN_RUN, "vitq plan")
# vitq analyze --bench: CPU speed of FP32 and the presets/plan (vitq.bench)
SPEED = TableSpec("speed", (*RUN_CONTEXT, "threads", "warmup", "runs", "rounds", "image_size", "cpu",
                            "load_avg", "onnxruntime", "method"),
                  ("wall_s",), "vitq analyze --bench")
PLAN_YAML = "plan.yaml"
PLAN_SKIPLIST = "plan_skiplist.yaml"
CALIBRATION = "calibration.pt"
EXPORT = "export.json"
REPORT = "report.html"
MODES = ("only", "all_but")  # file-name spelling of the sensitivity modes
GROUPS = ("op", "block", "kind")


def sensitivity(mode: str, group: str) -> TableSpec:
    """``sensitivity_<mode>_<group>`` (mode ``only`` or ``all-but``/``all_but``)."""
    mode = mode.replace("-", "_")
    if mode not in MODES or group not in GROUPS:
        raise ValueError(f"no sensitivity artefact for mode {mode!r}, group {group!r}")
    return TableSpec(f"sensitivity_{mode}_{group}", SENSITIVITY_META, SENSITIVITY_RUN,
                     f"vitq sensitivity --mode {mode.replace('_', '-')} --group {group}")


def sensitivity_taylor(group: str) -> TableSpec:
    """``sensitivity_taylor_<group>``: the gradient (Fisher) estimate of the ``only`` KL."""
    if group not in GROUPS:
        raise ValueError(f"no taylor sensitivity artefact for group {group!r}")
    return TableSpec(f"sensitivity_taylor_{group}", TAYLOR_META, TAYLOR_RUN,
                     f"vitq sensitivity --method taylor --group {group}")


def config_file(name: str) -> str:
    """The QuantConfig YAML written for an evaluated configuration."""
    return f"config_{name}.yaml"


def _check(keys: dict[str, Any], declared: tuple[str, ...], what: str) -> None:
    missing = [k for k in declared if k not in keys]
    extra = [k for k in keys if k not in declared]
    if missing or extra:
        raise ValueError(f"{what}: keys do not match the schema (missing {missing}, undeclared {extra})")


def write(out: str | Path, spec: TableSpec, df: pd.DataFrame, meta: dict[str, Any],
          run: dict[str, Any]) -> tuple[Path, Path]:
    """Write one table artefact; its meta and run keys must be exactly the declared ones."""
    _check(meta, spec.meta, f"{spec.stem} meta")
    _check(run, spec.run, f"{spec.stem} run")
    return write_table(df, Path(out) / spec.stem, meta, run)


@dataclass
class Table:
    """A table artefact as read back: rows, meta (declared keys) and run info."""

    spec: TableSpec
    path: Path
    rows: pd.DataFrame
    meta: dict[str, Any]
    run: dict[str, Any]


class SchemaError(ValueError):
    """An artefact file exists but does not follow the schema."""


def read(out: str | Path, spec: TableSpec) -> Table | None:
    """The artefact ``spec`` in ``out`` (None when absent); SchemaError when unreadable."""
    path = spec.path(Path(out))
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        rows, meta = data["rows"], data.get("meta") or {}
        if not isinstance(rows, list) or not isinstance(meta, dict):
            raise ValueError("'rows' must be a list and 'meta' a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SchemaError(f"could not read {path.name}: {e}") from None
    run_path = spec.path(Path(out), ".run.json")
    run: dict[str, Any] = {}
    if run_path.is_file():
        try:
            run = json.loads(run_path.read_text())
        except ValueError as e:
            raise SchemaError(f"could not read {run_path.name}: {e}") from None
    return Table(spec, path, pd.DataFrame(rows), {k: meta.get(k) for k in spec.meta},
                 {k: run.get(k) for k in spec.run})
