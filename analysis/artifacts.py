"""The artefact schema: every file an analysis writes into an output folder, the
columns of every table and every metadata key it carries.

Writers (the commands) and the reader (the HTML report) both go through this
module, so a column or key the report reads is one a writer wrote: :func:`write`
refuses a table without its declared columns and metadata that does not match the
declared keys, and :func:`read` refuses a file without the declared columns and
returns only the declared keys. Wall times live in ``<stem>.run.json`` (see
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
    """One table artefact: ``stem``.csv/.json/.run.json, the columns every row has (a
    writer may add others), the keys of its meta and run info, and its command."""

    stem: str
    columns: tuple[str, ...]  # required: write() refuses a table without them, read() a file without them
    meta: tuple[str, ...]
    run: tuple[str, ...]
    command: str  # the command that writes it (named by the report when it is missing)
    # columns a writer may add and a reader may read, absent from files written without them
    # (a section reading one must handle its absence)
    optional: tuple[str, ...] = ()

    def path(self, out: Path, suffix: str = ".json") -> Path:
        return Path(out) / f"{self.stem}{suffix}"

    @property
    def file(self) -> str:
        """The file the report reads: ``<stem>.json``."""
        return f"{self.stem}.json"


# The accuracy columns of one measured configuration (eval, accuracy, plan tables).
ACCURACY_COLUMNS = ("images", "top1", "top5", "top1_drop", "top5_drop", "agreement", "kl", "logit_mse",
                    "logit_sqnr_db")
# What a configuration keeps float and runs in int8.
SHARE_COLUMNS = ("int8_sites", "float_sites", "skipped_sites", "int8_macs_share")
# One sensitivity candidate: a site, or a group of sites (block, kind).
CANDIDATE_COLUMNS = ("rank", "candidate", "path", "kind", "block", "role", "sites")

# the top-1 drop's paired standard error (pp), beside the drop in eval and accuracy tables
EVAL = TableSpec(
    "eval", ("config", *ACCURACY_COLUMNS, "top1_drop_se", *SHARE_COLUMNS),
    (*RUN_CONTEXT, "val_images", "skipped_images", "configs", "backend", "simulation_agreement", "onnx_models"),
    ("calibration_s", "evaluation_s", "resumed_images", "reused_images", "log"), "vitq eval")
# resumed_images: images read back from the table's own log (an interrupted run); reused_images:
# of those, images whose every config the planner had measured (analyze: the plan and confirm
# images), written into the log instead of being measured again
# analyze's final table (eval's stays apart)
ACCURACY = TableSpec("accuracy", EVAL.columns, EVAL.meta, EVAL.run, "vitq analyze")
SENSITIVITY_COLUMNS = (*CANDIDATE_COLUMNS, *ACCURACY_COLUMNS)
SENSITIVITY_META = (*RUN_CONTEXT, "mode", "group", "images", "candidates", "fp32", "baseline", "rank_by")
# format / own_format: the format a row's candidate was quantized in, and whether that is the
# config's own (False: a row measured in another format, vitq plan --formats); absent when
# every row is of the config's own formats (analysis.sensitivity.own_format_rows)
SENSITIVITY_OPTIONAL = ("format", "own_format")
SENSITIVITY_RUN = ("calibration_s", "wall_s", "measured_now", "merged_from_shards", "candidates_s", "full_pass_s",
                   "naive_estimate_s", "speedup_vs_naive", "log")
TAYLOR_COLUMNS = (*CANDIDATE_COLUMNS, "kl_estimate")
# format: the format each row estimates (--formats); absent when only the config's own
# formats were estimated (one row per candidate, as before formats existed)
TAYLOR_OPTIONAL = ("format",)
TAYLOR_META = (*RUN_CONTEXT, "method", "group", "images", "candidates", "probes", "fisher_trace_captured_mean",
               "fisher_trace_captured_min")
TAYLOR_RUN = ("calibration_s", "wall_s")
ERROR_METRICS = ("sqnr_db", "cosine", "mse", "rel_l2")
ERRORS_META = (*RUN_CONTEXT, "config", "images", "batches", "outlier_k")
ERRORS_RUN = ("calibration_s", "wall_s")
ERRORS_ACTIVATIONS = TableSpec(
    "errors_activations",
    ("tensor", "site", "slot", "kind", "block", "role", "int8", *(f"isolated_{m}" for m in ERROR_METRICS),
     *(f"acc_{m}" for m in ERROR_METRICS), "max_abs", "p99", "p99_9", "p99_99", "max_over_p99_9", "kurtosis",
     "n_outlier_channels", "outlier_channels", "outlier_tokens", "bits_lost"),
    ERRORS_META, ERRORS_RUN, "vitq errors")
ERRORS_WEIGHTS = TableSpec(
    "errors_weights", ("site", "kind", "block", "role", "w_min", "w_max", "per_tensor_sqnr_db", "per_channel_sqnr_db",
                       "per_channel_gain_db"),
    ERRORS_META, ERRORS_RUN, "vitq errors")
ERRORS_CHANNELS = "errors_channels.npz"
# One row per group of int8 sites (kind/role): the start config's time, the time with the
# group float, the paired per-round difference (float minus start, ms per batch) with its
# 95 % interval, and the cost of one site of the group (cost_ms: ms per batch, 0 when free;
# cost_per_site: % of the start time); free: the interval reaches 0, no measurable slowdown.
# With --formats (meta "formats": the list; None without): one row per (group, format) with a
# ``format`` column ("float" on the float rows), float_ms then being the time of that variant
# (the group float, or in that format).
LATENCY = TableSpec(
    "latency_sites",
    ("group", "kind", "role", "sites", "members", "start_ms", "float_ms", "delta_ms", "delta_lo_ms", "delta_hi_ms",
     "spread_ms", "cost_ms", "free", "cost_per_site"),
    (*RUN_CONTEXT, "config", "batch", "runs", "threads", "backend", "version", "noise_ms", "formats"),
    ("calibration_s", "wall_s"), "vitq plan --cost latency", optional=("format",))
# budget_outcome: the explicit budget on that row's images, met / not met / undecided
# (analysis.budget; "met" without an explicit budget); stopped_early: the move was measured on
# the first `images` plan images only, its test being hopeless there (conditional power below
# the planner's futility; the row's values are on those images)
PLAN_COLUMNS = ("attempt", "path", "kind", "change", "config", "kept", "gain", "gain_se", "gain_lo", "gain_hi",
                *ACCURACY_COLUMNS, "top1_drop_se", *SHARE_COLUMNS, "cost", "budget_outcome", "stopped_early")
# decisions / confirm_decisions: the plan's decision of each explicit budget on the plan and
# the confirm images (analysis.budget.Decision.to_dict: kind, budget, outcome, estimate,
# lower, upper, bound, z, images, images_needed, text); decide: the decide stage's summary
# (plan_decide.json's meta without the run context), None when it did not run
PLAN_META = (*RUN_CONTEXT, "budget", "met", "outcome", "cost", "cost_unit", "cost_noise", "met_at_step", "plan_images",
             "confirm_images", "plan", "float_sites", "start", "best_reference", "verdict", "noise", "decisions",
             "confirm_decisions", "decide")
PLAN_RUN = ("calibration_s", "wall_s", "measured_now", "log")
# The planner over formats (--formats beyond int8 and float) adds: formats, the formats a row's
# config runs its sites in ("int8,float", "a16w8,int8,float", ...); int8_float_best, on the best
# int8/float-only point measured by that search (among the rows the plan is chosen from, the
# reference presets and the kept points, those whose configs run only int8 and float: the one
# the planner's own rule picks) that rule's
# outcome (met, budget only, undecided, matches best reference, not met), "" on every other row
PLAN_FORMAT_COLUMNS = ("formats", "int8_float_best")
PLAN_STEPS = TableSpec("plan_steps", (*PLAN_COLUMNS, "on_frontier", "plan"), PLAN_META, PLAN_RUN, "vitq plan",
                       optional=PLAN_FORMAT_COLUMNS)
PLAN_TRIED = TableSpec("plan_tried", PLAN_COLUMNS, PLAN_META, PLAN_RUN, "vitq plan", optional=PLAN_FORMAT_COLUMNS)
PLAN_CONFIRM = TableSpec("plan_confirm", ("config", *ACCURACY_COLUMNS, "top1_drop_se", *SHARE_COLUMNS, "cost",
                                          "budget_outcome"), PLAN_META, PLAN_RUN, "vitq plan")
# The decide stage (analysis.decide): one row per look of each candidate's sequential test of
# each explicit budget: the images so far, the estimate, its one-sided bounds at that look's
# critical value z, the bound that decides, the outcome and, when undecided, the images needed.
# Meta: the candidates in test order with their outcomes, the chosen one (None: the plan is
# not met) and the final decisions of the plan (or the chosen candidate).
PLAN_DECIDE = TableSpec(
    "plan_decide", ("candidate", "attempt", "look", "kind", "budget", "images", "z", "estimate", "lower", "upper",
                    "bound", "outcome", "images_needed"),
    (*RUN_CONTEXT, "backend", "max_images", "looks", "images", "candidates", "chosen", "decisions"),
    ("calibration_s", "wall_s", "measured_now", "resumed_images", "log"),
    "vitq plan --max-drop PP (or --min-agreement, --max-kl)")
# vitq analyze --bench: CPU speed of FP32 and the presets/plan (vitq.bench)
SPEED = TableSpec("speed", ("config", "backend", "file_mb", "latency_b1_ms", "latency_b1_spread", "throughput_b8",
                            "throughput_b8_spread", "speedup_b8_vs_fp32_eager"),
                  (*RUN_CONTEXT, "threads", "warmup", "runs", "rounds", "image_size", "cpu", "load_avg", "onnxruntime",
                   "method"),
                  ("wall_s",), "vitq analyze --bench")
PLAN_YAML = "plan.yaml"
PLAN_SKIPLIST = "plan_skiplist.yaml"
PLAN_FRONTIER = "plan_frontier"  # folder: one QuantConfig YAML per measured frontier point
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
    return TableSpec(f"sensitivity_{mode}_{group}", SENSITIVITY_COLUMNS, SENSITIVITY_META, SENSITIVITY_RUN,
                     f"vitq sensitivity --mode {mode.replace('_', '-')} --group {group}", optional=SENSITIVITY_OPTIONAL)


def sensitivity_taylor(group: str) -> TableSpec:
    """``sensitivity_taylor_<group>``: the gradient (Fisher) estimate of the ``only`` KL."""
    if group not in GROUPS:
        raise ValueError(f"no taylor sensitivity artefact for group {group!r}")
    return TableSpec(f"sensitivity_taylor_{group}", TAYLOR_COLUMNS, TAYLOR_META, TAYLOR_RUN,
                     f"vitq sensitivity --method taylor --group {group}", optional=TAYLOR_OPTIONAL)


def table_specs() -> list[TableSpec]:
    """Every table artefact an output folder may hold."""
    return [ACCURACY, EVAL, *(sensitivity(m, g) for m in MODES for g in GROUPS),
            *(sensitivity_taylor(g) for g in GROUPS), ERRORS_ACTIVATIONS, ERRORS_WEIGHTS, LATENCY,
            PLAN_STEPS, PLAN_TRIED, PLAN_CONFIRM, PLAN_DECIDE, SPEED]


def config_file(name: str) -> str:
    """The QuantConfig YAML written for an evaluated configuration."""
    return f"config_{name}.yaml"


def frontier_file(attempt: int) -> str:
    """The QuantConfig YAML of the planner's frontier point ``attempt`` (``plan_steps.csv``'s
    attempt number), inside :data:`PLAN_FRONTIER`."""
    return f"{PLAN_FRONTIER}/attempt-{int(attempt):03d}.yaml"


def _check(keys: dict[str, Any], declared: tuple[str, ...], what: str) -> None:
    missing = [k for k in declared if k not in keys]
    extra = [k for k in keys if k not in declared]
    if missing or extra:
        raise ValueError(f"{what}: keys do not match the schema (missing {missing}, undeclared {extra})")


def missing_columns(spec: TableSpec, columns: Any, rows: int) -> list[str]:
    """The declared columns a table of ``rows`` rows lacks (none to lack without rows)."""
    return [c for c in spec.columns if c not in columns] if rows else []


def write(out: str | Path, spec: TableSpec, df: pd.DataFrame, meta: dict[str, Any],
          run: dict[str, Any]) -> tuple[Path, Path]:
    """Write one table artefact: it must have the declared columns (others may follow),
    and its meta and run keys must be exactly the declared ones."""
    missing = missing_columns(spec, df.columns, len(df))
    if missing:
        raise ValueError(f"{spec.stem}: the table lacks the declared columns {missing}")
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
    """The artefact ``spec`` in ``out`` (None when absent); SchemaError when unreadable
    or when its rows lack a declared column (a file from another version)."""
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
    missing = missing_columns(spec, {k for r in rows if isinstance(r, dict) for k in r}, len(rows))
    if missing:
        raise SchemaError(f"{path.name} lacks the columns {missing} (written by another version of vitq?)")
    run_path = spec.path(Path(out), ".run.json")
    run: dict[str, Any] = {}
    if run_path.is_file():
        try:
            run = json.loads(run_path.read_text())
        except ValueError as e:
            raise SchemaError(f"could not read {run_path.name}: {e}") from None
    return Table(spec, path, pd.DataFrame(rows), {k: meta.get(k) for k in spec.meta},
                 {k: run.get(k) for k in spec.run})
