"""One self-contained HTML report from whatever artefacts an output folder holds.

``render_report(out_dir)`` reads every artefact through :mod:`analysis.artifacts`
(the schema the writers use: file names, meta keys, run keys and the command that
writes each one), so the report shows only what the pipeline writes, and writes
``out_dir/report.html``: figures inlined as base64 PNG, inline CSS, a small inline
script for sortable tables and the copy button; no external URL, CDN or font. A
section whose artefact is missing is replaced by a short note naming the command
that produces it. Nothing time-dependent goes in, so the same artefacts give the
same bytes.

    python -m reports.html OUT_DIR [--title TITLE]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from analysis import artifacts
from analysis.artifacts import TableSpec
from analysis.errors import outlier_threshold
from quant.store import atomic_write_text

from . import figures

TEMPLATES = Path(__file__).resolve().parent / "templates"
TOP_SENSITIVITY = 30
WORST_TENSORS = 15
SORTABLE_MIN_ROWS = 7  # shorter tables are read at a glance; longer ones get clickable headers
META_KEYS_CHECKED = ("model", "data", "seed", "calibration_images")  # of artifacts.RUN_CONTEXT
DEFAULT_MODEL_TAIL = ("vitq", "default", "model")  # the embedded default's folder ...
DEFAULT_MODEL_NAME = "tiny-vit-fashion"  # ... and its name (as vitq names its output folder)
OBJECTIVE_NAMES = {"kl": "KL", "logit_mse": "logit MSE"}
ALIAS_STATS = ("max_abs", "p99_9", "kurtosis")  # equal in two consecutive rows: one tensor read twice


# -- values and formatting ---------------------------------------------------------
def num(value: Any) -> float:
    """A table value as float: None/''/unparseable -> nan, 'inf'/'-inf' strings -> inf."""
    if value is None or isinstance(value, bool):
        return float(value) if isinstance(value, bool) else math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value == ""


def fmt_fixed(digits: int, signed: bool = False) -> Callable[[Any], str]:
    def f(value: Any) -> str:
        v = num(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        text = f"{v:+.{digits}f}" if signed and v != 0 else f"{v:.{digits}f}"
        return text.replace("-", "−")
    return f


def fmt_small(value: Any) -> str:
    """KL and friends: 0, 4 decimals, or scientific below 0.01."""
    v = num(value)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞"
    if v == 0:
        return "0"
    return (f"{v:.4f}" if abs(v) >= 0.01 else f"{v:.2e}").replace("-", "−")


def fmt_sig(value: Any) -> str:
    v = num(value)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.3g}".replace("-", "−")


def fmt_int(value: Any) -> str:
    v = num(value)
    return "–" if math.isnan(v) else (f"{int(v)}" if math.isfinite(v) else fmt_sig(v))


def fmt_text(value: Any) -> str:
    return "–" if _missing(value) else str(value)


def fmt_bool(value: Any) -> str:
    if _missing(value):
        return "–"
    return "int8" if value in (True, "True", "true", 1) else "float"


def fmt_list(limit: int = 10) -> Callable[[Any], str]:
    """'2;17;18;...' -> '2, 17, 18 … (+30)'."""
    def f(value: Any) -> str:
        if _missing(value):
            return "–"
        items = [s for s in str(value).split(";") if s != ""]
        if not items:
            return "–"
        head = ", ".join(items[:limit])
        return head + (f" … (+{len(items) - limit})" if len(items) > limit else "")
    return f


PCT, PP, DB1, DB2 = fmt_fixed(2), fmt_fixed(2), fmt_fixed(1), fmt_fixed(2)


# -- tables ------------------------------------------------------------------------
@dataclass
class Column:
    key: str
    label: str
    fmt: Callable[[Any], str] = fmt_text
    numeric: bool = True
    title: str = ""  # header tooltip
    sort_key: Callable[[Any], Any] | None = None
    wrap: bool = False  # long free text: may wrap (other cells stay on one line)
    text: Callable[[dict[str, Any]], str] | None = None  # the cell from the whole row (several fields)


@dataclass
class Cell:
    text: str
    sort: str  # data-v: the raw value the script sorts by ('' = missing, sorts last)
    cls: str = ""


@dataclass
class Table:
    id: str
    caption: str
    columns: list[Column]
    rows: list[list[Cell]]
    row_classes: list[str] = field(default_factory=list)
    sortable: bool = False
    scroll: bool = False
    narrow: bool = False  # as wide as its content, not the page

    @property
    def headers(self) -> list[tuple[str, str, bool]]:
        return [(c.label, c.title, c.numeric) for c in self.columns]


def _sort_value(col: Column, value: Any) -> str:
    if col.sort_key is not None:
        value = col.sort_key(value)
    if col.numeric:
        v = num(value)
        if math.isnan(v):
            return ""
        return "Infinity" if v == math.inf else ("-Infinity" if v == -math.inf else repr(v))
    return "" if _missing(value) else str(value).lower()


def make_table(id: str, caption: str, columns: list[Column], records: Iterable[dict[str, Any]],
               row_class: Callable[[dict[str, Any]], str] | None = None, sortable: bool | None = None,
               scroll: bool | None = None, narrow: bool = False) -> Table:
    records = list(records)
    cols = [c for c in columns if any(c.key in r for r in records)] if records else columns
    rows = [[Cell(c.text(r) if c.text else c.fmt(r.get(c.key)), _sort_value(c, r.get(c.key)),
                  "num" if c.numeric else ("wrap" if c.wrap else ""))
             for c in cols] for r in records]
    n = len(rows)
    return Table(id=id, caption=caption, columns=cols, rows=rows,
                 row_classes=[row_class(r) if row_class else "" for r in records],
                 sortable=n >= SORTABLE_MIN_ROWS if sortable is None else sortable,
                 scroll=n > 20 if scroll is None else scroll, narrow=narrow)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if _missing(v) else v) for k, v in row.items()} for row in df.to_dict(orient="records")]


# -- artefacts ---------------------------------------------------------------------
class Artefacts:
    """The artefacts of one output folder, each read through :mod:`analysis.artifacts`
    (None when absent); an unreadable file becomes a warning and its section a note."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.warnings: list[str] = []
        self.eval = self._table(artifacts.EVAL)
        self.accuracy = self._table(artifacts.ACCURACY)
        self.sensitivity = {(m, g): t for m in artifacts.MODES for g in artifacts.GROUPS
                            if (t := self._table(artifacts.sensitivity(m, g))) is not None}
        self.activations = self._table(artifacts.ERRORS_ACTIVATIONS)
        self.weights = self._table(artifacts.ERRORS_WEIGHTS)
        self.channels = self._npz(artifacts.ERRORS_CHANNELS)
        self.plan_steps = self._table(artifacts.PLAN_STEPS)
        self.plan_tried = self._table(artifacts.PLAN_TRIED)
        self.plan_confirm = self._table(artifacts.PLAN_CONFIRM)
        self.speed = self._table(artifacts.SPEED)
        self.plan_yaml, self.plan_config = self._yaml(artifacts.PLAN_YAML)
        self.skiplist_yaml, self.skiplist = self._yaml(artifacts.PLAN_SKIPLIST)
        self.preset_yaml = self._preset_yamls()

    @property
    def plan(self) -> artifacts.Table | None:
        """The planner's run: its three tables carry the same meta and run info."""
        return next((t for t in (self.plan_steps, self.plan_tried, self.plan_confirm) if t is not None), None)

    def _table(self, spec: TableSpec) -> artifacts.Table | None:
        try:
            return artifacts.read(self.out, spec)
        except artifacts.SchemaError as e:
            self.warnings.append(f"{e}; its section is left out")
            return None

    def _npz(self, name: str) -> dict[str, np.ndarray] | None:
        path = self.out / name
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: np.asarray(z[k], dtype=float) for k in z.files}
        except (OSError, ValueError) as e:
            self.warnings.append(f"could not read {name}: {e}")
            return None

    def _yaml(self, name: str) -> tuple[str | None, dict[str, Any] | None]:
        path = self.out / name
        if not path.is_file():
            return None, None
        text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            self.warnings.append(f"{name} is not valid YAML ({str(e).splitlines()[0]}); shown as is")
            return text, None
        if not isinstance(data, dict):
            self.warnings.append(f"{name} is not a mapping; shown as is")
            return text, None
        return text, data

    def _preset_yamls(self) -> dict[str, str]:
        """The YAML of every configuration eval/analyze measured: config_<name>.yaml,
        else the QuantConfig stored in the table's meta."""
        out: dict[str, str] = {}
        for t in (self.accuracy, self.eval):
            for name, cfg in ((t.meta["configs"] if t is not None else None) or {}).items():
                path = self.out / artifacts.config_file(name)
                if name not in out:
                    out[name] = path.read_text() if path.is_file() else yaml.safe_dump(cfg, sort_keys=False)
        return out

    def tables(self) -> list[artifacts.Table]:
        return [t for t in (self.accuracy, self.eval, *self.sensitivity.values(), self.activations, self.weights,
                            self.plan_steps, self.plan_tried, self.plan_confirm, self.speed) if t is not None]

    def all_meta(self) -> list[tuple[str, dict[str, Any]]]:
        return [(t.path.name, t.meta) for t in self.tables()]

    def chosen_step(self) -> dict[str, Any] | None:
        """The planner's chosen point (the row of plan_steps marked ``plan``)."""
        if self.plan_steps is None or "plan" not in self.plan_steps.rows:
            return None
        rows = [r for r in _records(self.plan_steps.rows) if _true(r.get("plan"))]
        return rows[0] if rows else None


def _true(value: Any) -> bool:
    return value is True or value in ("True", "true", 1)


# -- sections ----------------------------------------------------------------------
@dataclass
class Figure:
    uri: str
    alt: str
    caption: str


@dataclass
class Block:
    """One piece of a section: a heading, a paragraph, a figure, a table or a <pre>."""

    kind: str  # "h3", "h4", "p", "note", "warn", "verdict", "figure", "table", "details", "yaml"
    text: str = ""
    figure: Figure | None = None
    table: Table | None = None
    blocks: list["Block"] = field(default_factory=list)  # details content
    id: str = ""
    open: bool = False


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    missing: str = ""  # the note when the artefact is absent


def _name(spec: TableSpec) -> str:
    return spec.path(Path(".")).name


def _missing_note(files: str, command: str) -> str:
    return f"Not available: no {_esc(files)} in this folder. Run {command} to produce it."


def _figure(png: bytes, alt: str, caption: str) -> Block:
    return Block("figure", figure=Figure(figures.data_uri(png), alt, caption))


def _cmd(out: Path, command: str, *extra: str) -> str:
    """A command line in <code>, HTML-escaped (it goes into notes rendered as markup)."""
    return "<code>" + _esc(" ".join([command, *extra, "--out", str(out)])) + "</code>"


def _esc(text: Any) -> str:
    from markupsafe import escape
    return str(escape(str(text)))


def _yes(value: Any) -> str:
    return "yes" if _true(value) else "no"


def _pm(key: str, se: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    """'value ± se' from two fields of a row."""
    def f(r: dict[str, Any]) -> str:
        if _missing(r.get(key)):
            return "–"
        return fmt(r.get(key)) + ("" if _missing(r.get(se)) else f" ± {fmt(r.get(se))}")
    return f


def _interval(r: dict[str, Any]) -> str:
    lo, hi = r.get("gain_lo"), r.get("gain_hi")
    return "–" if _missing(lo) or _missing(hi) else f"[{fmt_small(lo)}, {fmt_small(hi)}]"


SITES_KEPT_FLOAT = Column("skipped_sites", "sites kept float", fmt_int,
                          title="float sites beyond the kinds a backend keeps float anyway (LayerNorm, GELU,"
                                " softmax): the skip-list")
MAC_SHARE = Column("int8_macs_share", "int8 MACs (%)", fmt_fixed(1),
                   title="share of the multiply-accumulates of Linear/Conv/attention matmuls that run in int8")

ACCURACY_COLUMNS = [
    Column("config", "config", numeric=False),
    Column("images", "images", fmt_int, title="validation images"),
    Column("top1", "top-1 (%)", PCT),
    Column("top5", "top-5 (%)", PCT),
    Column("top1_drop", "top-1 drop (pp)", PP, title="FP32 top-1 minus this config's, percentage points"),
    Column("top5_drop", "top-5 drop (pp)", PP),
    Column("agreement", "agreement (%)", PCT, title="images whose top-1 class equals FP32's"),
    Column("kl", "KL (nats)", fmt_small, title="mean KL(FP32 ‖ config) of the class distributions"),
    Column("logit_sqnr_db", "logit SQNR (dB)", DB2, title="FP32 logits vs this config's"),
    Column("int8_sites", "int8 sites", fmt_int),
    Column("float_sites", "float sites", fmt_int, title="every site kept float, float kinds included"),
    SITES_KEPT_FLOAT,
    MAC_SHARE,
    Column("source", "from", numeric=False, title="the command (and artefact) that measured the row"),
]


def accuracy_section(a: Artefacts) -> Section:
    """accuracy.json (vitq analyze) when present, else eval.json; with both, eval's
    other configs are appended and labelled. Without a measured ``plan`` row, the
    planner's chosen point (on its plan images) is added, labelled as such."""
    sec = Section("accuracy", "Accuracy: FP32 vs quantized configs")
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    main = a.accuracy if a.accuracy is not None else a.eval
    if main is not None:
        records += [{**r, "source": f"{main.spec.command} ({main.path.name})"} for r in _records(main.rows)]
    if a.accuracy is not None and a.eval is not None:
        seen = {r.get("config") for r in records}
        extra = [r for r in _records(a.eval.rows) if r.get("config") not in seen]
        records += [{**r, "source": f"{a.eval.spec.command} ({a.eval.path.name})"} for r in extra]
        notes.append(f"The rows from {_name(artifacts.EVAL)} ({len(extra)} config(s) {_name(artifacts.ACCURACY)}"
                     f" lacks) were measured by a separate {_esc(a.eval.spec.command)} run on"
                     f" {fmt_int(a.eval.meta['val_images'])} images.")
    chosen = a.chosen_step()
    if chosen is not None and not any(r.get("config") == "plan" for r in records):
        records.append({**chosen, "config": "plan",
                        "source": f"{artifacts.PLAN_STEPS.command}, attempt {fmt_int(chosen.get('attempt'))}"
                                  " (plan images)"})
        notes.append("The <i>plan</i> row is the planner's chosen point, measured on its plan images; run"
                     f" {_cmd(a.out, artifacts.ACCURACY.command)} to measure it on every val image.")
    if not records:
        sec.missing = _missing_note(f"{_name(artifacts.ACCURACY)} or {_name(artifacts.EVAL)}",
                                    f"{_cmd(a.out, artifacts.ACCURACY.command)} (or {_cmd(a.out, artifacts.EVAL.command)})")
        sec.blocks.append(Block("table", table=make_table("accuracy-table", "no configuration measured yet",
                                                          ACCURACY_COLUMNS[:1], [])))
        return sec
    caption = ("Top-1/top-5 accuracy (%) on the labelled validation images, drop vs FP32 in percentage points (pp),"
               " and label-free distances to FP32: top-1 agreement (%), KL (nats), logit SQNR (dB; ∞ = identical)."
               " <i>float sites</i> counts every site kept float, <i>sites kept float</i> only those beyond the"
               " kinds a backend keeps float anyway; <i>int8 MACs</i> is the share of the matmul multiply-accumulates"
               " (Linear, Conv, attention) that run in int8. " + " ".join(notes))

    def row_class(r: dict[str, Any]) -> str:
        return "ref-row" if r.get("config") == "fp32" else ("plan-row" if r.get("config") == "plan" else "")
    sec.blocks.append(Block("table", table=make_table("accuracy-table", caption, ACCURACY_COLUMNS, records,
                                                      row_class, sortable=len(records) >= SORTABLE_MIN_ROWS)))
    return sec


SPEED_COLUMNS = [
    Column("config", "config", numeric=False),
    Column("backend", "backend", numeric=False),
    Column("file_mb", "file (MB)", fmt_fixed(1), title="ONNX file size"),
    Column("latency_b1_ms", "latency b1 (ms)", fmt_fixed(1), title="median at batch 1"),
    Column("latency_b1_spread", "spread", lambda v: f"{100 * float(v):.0f} %",
           title="(max - min) / median of the per-round medians"),
    Column("throughput_b8", "throughput b8 (img/s)", fmt_fixed(1), title="median at batch 8"),
    Column("throughput_b8_spread", "spread", lambda v: f"{100 * float(v):.0f} %"),
    Column("speedup_b8_vs_fp32_eager", "b8 vs FP32 eager", lambda v: f"{float(v):.2f}x"),
]


def speed_section(a: Artefacts) -> Section | None:
    """speed.json (vitq analyze --bench); no section at all without it (it is optional)."""
    if a.speed is None:
        return None
    sec = Section("speed", "Speed on this CPU")
    m = a.speed.meta
    caption = (f"FP32 (torch eager, ONNX Runtime) and every config as its Q/DQ ONNX export in ONNX Runtime (int8"
               f" kernels); {_esc(m.get('threads'))} threads, {_esc(m.get('rounds'))} interleaved rounds of"
               f" {_esc(m.get('runs'))} timed runs after {_esc(m.get('warmup'))} warm-up; CPU {_esc(m.get('cpu'))},"
               f" load average {_esc(m.get('load_avg'))} at the start (timings need an idle machine);"
               f" {_esc(m.get('method'))}.")
    sec.blocks.append(Block("table", table=make_table("speed-table", caption, SPEED_COLUMNS,
                                                      _records(a.speed.rows))))
    return sec


def _budget_text(budget: Any) -> str:
    if not isinstance(budget, dict):
        return "–"
    parts = [f"top-1 drop ≤ {fmt_sig(budget.get('max_drop'))} pp" if not _missing(budget.get("max_drop")) else "",
             f"agreement ≥ {fmt_sig(budget.get('min_agreement'))} %" if not _missing(budget.get("min_agreement")) else "",
             f"KL ≤ {fmt_sig(budget.get('max_kl'))} nats" if not _missing(budget.get("max_kl")) else "",
             "beat every reference preset (KL lower with 95 % confidence, agreement no lower) at no higher cost"
             if _true(budget.get("beat_references")) else ""]
    return ", ".join(p for p in parts if p) or "none"


def skiplist_section(a: Artefacts) -> Section:
    sec = Section("skiplist", "Chosen skip-list (sites kept float)")
    if a.skiplist_yaml is None and a.plan_yaml is None:
        sec.missing = _missing_note(artifacts.PLAN_SKIPLIST, f"the planner ({_cmd(a.out, artifacts.PLAN_STEPS.command)})")
        if a.preset_yaml:
            inner = [Block("p", "The configurations <code>vitq eval</code> measured, as loadable QuantConfigs"
                                " (<code>vitq eval --config FILE</code>):")]
            for name, text in a.preset_yaml.items():
                inner += [Block("h4", name), Block("yaml", text, id=f"preset-{_slug(name)}")]
            sec.blocks.append(Block("details", "Skip-lists of the evaluated presets", blocks=inner))
        return sec
    if a.skiplist_yaml is not None:
        sites = (a.skiplist or {}).get("float_sites")
        kinds = (a.skiplist or {}).get("float_kinds") or []
        if not isinstance(sites, list):
            sec.blocks.append(Block("warn", f"{artifacts.PLAN_SKIPLIST} has no <code>float_sites</code> list."))
            sites = []
        n = len(sites)
        text = (f"The plan keeps <b>{n}</b> site(s) float" + (
                f" beyond the kinds kept float as a whole ({_esc(', '.join(map(str, kinds)))})" if kinds else "")
                + (": every other quantizable site runs in int8." if n == 0 else
                   "; the list below names them one by one (globs and blocks expanded)."))
        sec.blocks += [Block("p", text), Block("yaml", a.skiplist_yaml, id="skiplist-yaml")]
        chosen = a.chosen_step()
        if chosen is not None and not _missing(chosen.get("skipped_sites")) and int(num(chosen["skipped_sites"])) != n:
            sec.blocks.append(Block("warn", f"{artifacts.PLAN_SKIPLIST} lists {n} site(s), the planner's chosen"
                                            f" point keeps {fmt_int(chosen['skipped_sites'])} float: the files may"
                                            " come from different runs."))
    else:
        sec.blocks.append(Block("note", _missing_note(artifacts.PLAN_SKIPLIST,
                                                      _cmd(a.out, artifacts.PLAN_STEPS.command))))
    if a.plan_yaml is not None:
        sec.blocks.append(Block("details", f"The complete plan as a QuantConfig ({artifacts.PLAN_YAML})", blocks=[
            Block("p", f"Pass it to <code>vitq eval --config {artifacts.PLAN_YAML}</code> or"
                       f" <code>vitq export --config {artifacts.PLAN_YAML}</code>."),
            Block("yaml", a.plan_yaml, id="plan-yaml")]))
    return sec


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower() or "x"


def _objective_column(objective: str) -> Column:
    return (Column("logit_mse", "logit MSE", fmt_small, title="search objective") if objective == "logit_mse"
            else Column("kl", "KL (nats)", fmt_small, title="search objective: mean KL(FP32 ‖ config)"))


def _gain_columns(objective: str) -> list[Column]:
    unit = "nats" if objective == "kl" else "logit MSE"
    return [Column("gain", f"gain ± se ({unit})", text=_pm("gain", "gain_se", fmt_small),
                   title=f"{objective} of the previous kept point minus this one's (> 0 = closer to FP32),"
                         " ± its paired-bootstrap standard error"),
            Column("gain_lo", "95 % interval of the gain", text=_interval,
                   title="paired bootstrap over images; a move is kept when the interval lies above 0")]


def _plan_columns(objective: str, kind: str) -> list[Column]:
    cols = [Column("attempt", "attempt", fmt_int), Column("path", "path", numeric=False),
            Column("change", "change", numeric=False, wrap=True),
            *([Column("kept", "kept", _yes, numeric=False)] if kind == "tried" else []),
            *_gain_columns(objective), _objective_column(objective)]
    if objective != "kl":
        cols.append(Column("kl", "KL (nats)", fmt_small))
    cols += [Column("agreement", "agreement (%)", PCT), Column("top1_drop", "top-1 drop (pp)", PP),
             Column("float_sites", "float sites", fmt_int), SITES_KEPT_FLOAT, MAC_SHARE]
    if kind == "steps":
        cols += [Column("cost", "cost", fmt_fixed(1), title="the planner's cost: % of matmul MACs kept float, plus"
                                                            " a small charge per float residual add"),
                 Column("on_frontier", "frontier", _yes, numeric=False), Column("plan", "plan", _yes, numeric=False)]
    return cols


CONFIRM_COLUMNS = [
    Column("config", "config", numeric=False),
    Column("images", "images", fmt_int, title="confirm images: disjoint from the plan images"),
    Column("top1", "top-1 (%)", PCT),
    Column("top1_drop", "top-1 drop ± se (pp)", text=_pm("top1_drop", "top1_drop_se", PP),
           title="vs FP32 on the same images, ± paired-bootstrap standard error"),
    Column("agreement", "agreement (%)", PCT),
    Column("kl", "KL (nats)", fmt_small),
    Column("float_sites", "float sites", fmt_int),
    SITES_KEPT_FLOAT,
    MAC_SHARE,
    Column("cost", "cost", fmt_fixed(1)),
]


def planner_section(a: Artefacts) -> Section:
    sec = Section("planner", "Mixed-precision planner")
    t = a.plan
    if t is None:
        sec.missing = _missing_note(_name(artifacts.PLAN_STEPS), f"the planner ({_cmd(a.out, artifacts.PLAN_STEPS.command)})")
        return sec
    m = t.meta
    if not _missing(m["verdict"]):
        sec.blocks.append(Block("verdict", _esc(m["verdict"])))
    noise = m["noise"] if isinstance(m["noise"], dict) else {}
    objective = str(noise.get("objective") or "kl")
    level = num(noise.get("level"))
    sec.blocks.append(Block("p", (
        f"Budget: {_esc(_budget_text(m['budget']))}; {'met' if _true(m['met']) else '<b>not met</b>'}"
        + (f" at attempt {fmt_int(m['met_at_step'])}" if not _missing(m["met_at_step"]) else "")
        + f". Search objective: {_esc(OBJECTIVE_NAMES.get(objective, objective))} on {fmt_int(m['plan_images'])} plan images, starting from"
        f" <code>{_esc(fmt_text(m['start']))}</code> and from the best reference preset"
        f" <code>{_esc(fmt_text(m['best_reference']))}</code>. A move is kept when the"
        f" {fmt_fixed(0)(level * 100) if not math.isnan(level) else '95'} % interval of its gain"
        f" ({_esc(noise.get('test') or 'bootstrap')}, {fmt_int(noise.get('resamples'))} resamples) lies above"
        " zero. The plan is then"
        f" measured again on {fmt_int(m['confirm_images'])} confirm images, beside the presets.")))
    steps = a.plan_steps.rows if a.plan_steps is not None else pd.DataFrame()
    tried = a.plan_tried.rows if a.plan_tried is not None else None
    need = {"attempt", "path", "cost", objective, "on_frontier", "plan", "config"}
    if len(steps) and need <= set(steps):
        budget = m["budget"] if isinstance(m["budget"], dict) else {}
        sec.blocks.append(_figure(
            figures.frontier(steps, tried, objective=objective,
                             max_objective=num(budget.get("max_kl")) if objective == "kl" else None,
                             cost=str(m.get("cost") or "macs")),
            "the planner's frontier: cost against distance to FP32",
            f"Every configuration the planner measured, as cost (x: "
            + ("% of the start config's ONNX Runtime latency the float sites add, from the measured per-site table"
               " (<code>latency_sites.csv</code>)" if m.get("cost") == "latency" else
               "% of matmul MACs kept float, plus a small charge per float residual add")
            + f") against {_esc(OBJECTIVE_NAMES.get(objective, objective))} to FP32 (y, log scale; lower = closer). Grey: every"
            " attempt; lines: the kept points of each search path, in order; circled: the frontier (no other point"
            " is both cheaper and closer); diamonds: the reference presets; star: the plan, the cheapest frontier"
            " point that meets the budget (when the budget asks to beat the presets: the cheapest point whose KL is"
            " below every preset's by more than the noise, agreement no lower, int8 MAC share no lower and skip-list"
            " no longer than theirs). FP32 (cost 100+, distance 0) is off the log scale."))
    elif a.plan_steps is None:
        sec.blocks.append(Block("note", _missing_note(_name(artifacts.PLAN_STEPS), _cmd(a.out, artifacts.PLAN_STEPS.command))))
    if a.plan_steps is not None:
        sec.blocks.append(Block("table", table=make_table(
            "plan-table", "Kept points: the reference rows, then every move of each search path that beat the noise,"
                          " in order. Accuracy and agreement in %, drop in pp, KL in nats.",
            _plan_columns(objective, "steps"), _records(steps),
            row_class=lambda r: "plan-row" if _true(r.get("plan")) else "")))
    if a.plan_tried is not None:
        sec.blocks.append(Block("table", table=make_table(
            "tried-table", f"Every measured attempt, kept or not ({len(a.plan_tried.rows)}). <i>gain</i> is the"
                           " objective gained over the path's previous kept point.",
            _plan_columns(objective, "tried"), _records(a.plan_tried.rows),
            row_class=lambda r: "" if _true(r.get("kept")) else "dropped-row")))
    if a.plan_confirm is not None:
        sec.blocks.append(Block("table", table=make_table(
            "confirm-table", f"The plan beside FP32 and the presets on {fmt_int(m['confirm_images'])} confirm"
                             " images the search never saw.", CONFIRM_COLUMNS, _records(a.plan_confirm.rows),
            row_class=lambda r: "plan-row" if r.get("config") == "plan" else
            ("ref-row" if r.get("config") == "fp32" else ""))))
    else:
        sec.blocks.append(Block("note", _missing_note(_name(artifacts.PLAN_CONFIRM),
                                                      f"{_cmd(a.out, artifacts.PLAN_CONFIRM.command)} with confirm"
                                                      " images (<code>--confirm-images</code> > 0)")))
    return sec


def run_rows(a: Artefacts) -> list[dict[str, Any]]:
    """One row per command run: its artefact(s), images and wall times (from the run info)."""
    rows = []
    for t in (a.accuracy, a.eval):
        if t is not None:
            skipped = t.meta["skipped_images"] or []
            rows.append({"step": "evaluation", "artefact": t.path.name, "command": t.spec.command,
                         "images": t.meta["val_images"], "calib": t.meta["calibration_images"],
                         "calibration_s": t.run["calibration_s"], "wall": t.run["evaluation_s"],
                         "detail": f"{len(t.rows)} configs; {fmt_int(t.run['resumed_images'])} images resumed from"
                                   f" the log; {len(skipped)} unreadable image(s) skipped"})
    for (mode, group), t in a.sensitivity.items():
        m, r = t.meta, t.run
        speed = (f"{fmt_sig(r['speedup_vs_naive'])}× faster than one full pass per candidate"
                 f" (~{fmt_sig(r['naive_estimate_s'])} s)" if not _missing(r["speedup_vs_naive"]) else "")
        rows.append({"step": "sensitivity", "artefact": t.path.name, "command": t.spec.command, "images": m["images"],
                     "calib": m["calibration_images"], "calibration_s": r["calibration_s"], "wall": r["wall_s"],
                     "detail": "; ".join(x for x in (f"{fmt_int(m['candidates'])} candidates, ranked by"
                                                      f" {fmt_text(m['rank_by'])}",
                                                      f"{fmt_int(r['measured_now'])} measured now", speed) if x)})
    errors = [t for t in (a.activations, a.weights) if t is not None]
    if errors:
        t = errors[0]
        rows.append({"step": "errors", "artefact": ", ".join(e.path.name for e in errors), "command": t.spec.command,
                     "images": t.meta["images"], "calib": t.meta["calibration_images"],
                     "calibration_s": t.run["calibration_s"], "wall": t.run["wall_s"],
                     "detail": f"outlier k = {fmt_sig(t.meta['outlier_k'])}"})
    if a.plan is not None:
        t, plan = a.plan, [x for x in (a.plan_steps, a.plan_tried, a.plan_confirm) if x is not None]
        n_tried = len(a.plan_tried.rows) if a.plan_tried is not None else None
        rows.append({"step": "plan", "artefact": ", ".join(x.path.name for x in plan), "command": t.spec.command,
                     "images": t.meta["plan_images"], "calib": t.meta["calibration_images"],
                     "calibration_s": t.run["calibration_s"], "wall": t.run["wall_s"],
                     "detail": f"{fmt_int(n_tried)} configurations tried; {fmt_int(t.run['measured_now'])} measurements"
                               f" run now (the rest from the log), confirm runs included;"
                               f" {fmt_int(t.meta['confirm_images'])} confirm images"})
    return rows


RUN_COLUMNS = [Column("step", "step", numeric=False), Column("artefact", "artefact(s)", numeric=False, wrap=True),
               Column("command", "command", numeric=False), Column("images", "val images", fmt_int),
               Column("calib", "calibration images", fmt_int),
               Column("calibration_s", "calibration (s)", fmt_sig, title="calibration, or loading its cache"),
               Column("wall", "wall time (s)", fmt_sig, title="the step itself, calibration excluded"),
               Column("detail", "details", numeric=False, wrap=True)]


def summary_section(a: Artefacts) -> Section:
    sec = Section("summary", "Run summary")
    metas = a.all_meta()
    if not metas:
        sec.missing = "No artefact with run metadata in this folder; run the vitq commands with <code>--out</code>."
        return sec
    first: dict[str, Any] = {}
    for _, meta in metas:
        for k in artifacts.RUN_CONTEXT:
            if _missing(first.get(k)):
                first[k] = meta[k]
    general = [("model", "model"), ("family", "family"), ("data", "data"), ("seed", "seed"),
               ("calibration images", "calibration_images"), ("torch", "torch"), ("transformers", "transformers")]
    kv = [{"key": label, "value": fmt_text(first[k])} for label, k in general if not _missing(first.get(k))]
    sec.blocks.append(Block("table", table=make_table(
        "summary-table", "The run's settings (from the JSON metadata of the artefacts).",
        [Column("key", "setting", numeric=False), Column("value", "value", numeric=False)], kv, sortable=False,
        narrow=True)))
    runs = run_rows(a)
    walls = [f"{r['step']} {fmt_sig(r['wall'])} s" for r in runs]
    calib = list(dict.fromkeys(fmt_sig(r["calibration_s"]) for r in runs))
    sec.blocks.append(Block("p", "Wall times: calibration " + " / ".join(f"{c} s" for c in calib)
                            + ("; " + ", ".join(walls) if walls else "") + "."))
    sec.blocks.append(Block("table", table=make_table(
        "runs-table", "What each step measured: validation and calibration images, and its wall times in seconds"
                      " (from each artefact's run info; – where it is missing).",
        RUN_COLUMNS, runs, sortable=False)))
    mismatch = meta_mismatches(metas)
    if mismatch:
        sec.blocks.append(Block("warn", "The artefacts do not all come from the same settings: "
                                + "; ".join(mismatch) + ". Compare their numbers with care."))
    return sec


def meta_mismatches(metas: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = []
    for key in META_KEYS_CHECKED:
        seen: dict[str, list[str]] = {}
        for name, meta in metas:
            if not _missing(meta[key]):
                seen.setdefault(str(meta[key]), []).append(name)
        if len(seen) > 1:
            out.append(f"<code>{key}</code> is " + ", ".join(
                f"{_esc(v)} in {', '.join(names)}" for v, names in seen.items()))
    return out


RANK_LABELS = {"kl": Column("kl", "KL (nats)", fmt_small), "top1_drop": Column("top1_drop", "top-1 drop (pp)", PP),
               "agreement": Column("agreement", "agreement (%)", PCT),
               "logit_sqnr_db": Column("logit_sqnr_db", "logit SQNR (dB)", DB1),
               "logit_mse": Column("logit_mse", "logit MSE", fmt_small)}
SENSITIVITY_COLUMNS = [
    Column("rank", "rank", fmt_int),
    Column("candidate", "candidate", numeric=False),
    Column("path", "module path", numeric=False, title="where the site lives in the model's library"),
    Column("kind", "kind", numeric=False),
    Column("block", "block", fmt_int),
    Column("role", "role", numeric=False),
    Column("sites", "sites", fmt_int),
    Column("top1", "top-1 (%)", PCT),
    Column("top1_drop", "top-1 drop (pp)", PP),
    Column("top1_gain", "top-1 gain (pp)", PP, title="vs the all-int8 baseline"),
    Column("top5_drop", "top-5 drop (pp)", PP),
    Column("agreement", "agreement (%)", PCT),
    Column("kl", "KL (nats)", fmt_small),
    Column("logit_sqnr_db", "logit SQNR (dB)", DB1),
]


def sensitivity_columns(rank_by: str) -> list[Column]:
    """The ranking metric right after the candidate's description, the top-1 drop beside it."""
    key = Column(rank_by, RANK_LABELS[rank_by].label + " ▸ rank key", RANK_LABELS[rank_by].fmt,
                 title="the candidates are ranked by this column") if rank_by in RANK_LABELS else None
    head = SENSITIVITY_COLUMNS[:7]
    rest = [c for c in SENSITIVITY_COLUMNS[7:] if c.key not in (rank_by, "top1_drop")]
    drop = next(c for c in SENSITIVITY_COLUMNS if c.key == "top1_drop")
    return [*head, *([key] if key else []), *([drop] if rank_by != "top1_drop" else []), *rest]


def sensitivity_section(a: Artefacts) -> Section:
    sec = Section("sensitivity", "Sensitivity ranking")
    only, all_but = artifacts.sensitivity("only", "op"), artifacts.sensitivity("all-but", "op")
    if not a.sensitivity:
        sec.missing = _missing_note(_name(only), f"{_cmd(a.out, only.command)} (and"
                                    f" {_cmd(a.out, all_but.command)})")
        return sec
    modes_present = {m for m, _ in a.sensitivity}
    if "only" not in modes_present:
        sec.blocks.append(Block("note", _missing_note(_name(only), _cmd(a.out, only.command))))
    if "all_but" not in modes_present:
        sec.blocks.append(Block("note", "All-but sensitivity (everything int8 but the candidate) was not measured:"
                                        f" it costs one full pass per candidate. Run {_cmd(a.out, all_but.command)}"
                                        f" (or <code>{_esc(artifacts.ACCURACY.command)} --all-but</code>) to add it."))
    for (mode, group), t in a.sensitivity.items():
        flag = mode.replace("_", "-")
        m = t.meta
        df = t.rows
        if df.empty or "rank" not in df or "candidate" not in df:
            sec.blocks.append(Block("warn", f"{t.path.name} has no ranked candidates."))
            continue
        rank_by = str(m["rank_by"] or "kl")
        n = len(df)
        sec.blocks.append(Block("h3", f"--mode {flag} --group {group}: {n} candidates, {fmt_int(m['images'])}"
                                      f" images, ranked by {rank_by}"))
        baseline = m["baseline"] or {}
        if mode == "only":
            explain = ("Each candidate is quantized alone on the FP32 model; the most damaging first. A large KL"
                       " (nats) or top-1 drop (pp) marks a site to keep float.")
        else:
            explain = ("Everything int8 except the candidate, which stays float; most helpful first. Bars right"
                       " of zero (pp) and KL bars short of the dashed baseline mark sites whose float copy"
                       f" recovers accuracy. All-int8 baseline: top-1 {PCT(baseline.get('top1'))} %,"
                       f" KL {fmt_small(baseline.get('kl'))} nats.")
        shown = min(n, TOP_SENSITIVITY)
        png = figures.sensitivity_bars(df, flag, top=TOP_SENSITIVITY,
                                       baseline_kl=num(baseline.get("kl")) if mode != "only" else None)
        sec.blocks.append(_figure(png, f"sensitivity ranking, {flag}, {group}",
                                  f"Top {shown} of {n} by rank ({_esc(rank_by)}). " + explain))
        sec.blocks.append(Block("details", f"All {n} candidates ({t.path.name})", blocks=[
            Block("table", table=make_table(f"sens-{mode}-{group}",
                                            f"Ranked by {_esc(rank_by)}. Accuracy in %, drops and gains in pp, KL in"
                                            " nats, SQNR in dB.", sensitivity_columns(rank_by), _records(df)))]))
    return sec


def one_row_per_tensor(df: pd.DataFrame) -> pd.DataFrame:
    """The activation table with each tensor once.

    The error analyzer lists a tensor once per site that reads it: GELU's output is
    fc2's input, a LayerNorm's output is the q/k/v projections' input, softmax's
    output is ``matmul_av``'s probs. With a ``same_tensor_as`` column (non-empty =
    an alias of the named tensor) the aliases are dropped. Without it, consecutive
    rows of one block whose max |x|, p99.9 and kurtosis are all equal are taken for
    one tensor: its first int8 row is kept (the quantizer a backend would use; the
    first row when none is int8) and the other names go to ``also``.
    """
    df = df.reset_index(drop=True)
    if "same_tensor_as" in df:
        # group each tensor with its aliases; keep the group's first int8 row (its own
        # quantization is in the accumulated error), else the first row
        group = [str(t) if _missing(a) else str(a) for t, a in zip(df["tensor"], df["same_tensor_as"])]
        int8 = df["int8"].map(_true) if "int8" in df else pd.Series(False, index=df.index)
        keep: dict[str, int] = {}
        for i, g in enumerate(group):
            if g not in keep or (int8.iloc[i] and not int8.iloc[keep[g]]):
                keep[g] = i
        out = df.iloc[sorted(keep.values())].copy()
        names = {g: [str(df["tensor"].iloc[i]) for i, h in enumerate(group) if h == g] for g in keep}
        out["also"] = [";".join(n for n in names[g] if n != str(t))
                       for g, t in zip((group[i] for i in sorted(keep.values())), out["tensor"])]
        return out.reset_index(drop=True)
    if not set(ALIAS_STATS) <= set(df) or df.empty:
        return df.assign(also="")
    keys = [tuple([str(r.get("block"))] + [repr(num(r.get(k))) for k in ALIAS_STATS]) for r in _records(df)]
    groups: list[list[int]] = []
    for i, key in enumerate(keys):
        if groups and keys[groups[-1][-1]] == key and "nan" not in key[1:]:
            groups[-1].append(i)
        else:
            groups.append([i])
    int8 = df["int8"].map(_true) if "int8" in df else pd.Series(False, index=df.index)
    kept, also = [], []
    for g in groups:
        keep = next((i for i in g if int8[i]), g[0])
        kept.append(keep)
        also.append(";".join(str(df.at[i, "tensor"]) for i in g if i != keep))
    out = df.loc[kept].copy()
    out["also"] = also
    return out.reset_index(drop=True)


def depth_section(a: Artefacts) -> Section:
    sec = Section("depth", "Quantization noise along depth (SQNR)")
    spec = artifacts.ERRORS_ACTIVATIONS
    if a.activations is None:
        sec.missing = _missing_note(_name(spec), _cmd(a.out, spec.command))
        return sec
    df = a.activations.rows
    need = {"tensor", "kind", "block", "role", "int8", "isolated_sqnr_db", "acc_sqnr_db"}
    if df.empty or not need <= set(df):
        sec.blocks.append(Block("warn", f"{_name(spec)} lacks columns {sorted(need - set(df))}."))
        return sec
    sec.blocks.append(_figure(
        figures.sqnr_depth(df), "isolated and accumulated SQNR per block",
        "Signal-to-quantization-noise ratio (dB, higher is better) of every activation tensor, worst tensor of"
        " each site kind per block. Left: the tensor quantized alone (its own local cost). Right: what the"
        " quantized model passes on at that point, upstream noise included. A kind whose accumulated curve"
        " falls well below its isolated one is where noise piles up; a low isolated point is a tensor that is"
        " hard to quantize by itself. Dashed: kinds the config keeps float."))
    tensors = one_row_per_tensor(df)
    int8 = tensors[tensors["int8"].map(_true)].copy()
    int8["_acc"] = pd.to_numeric(int8["acc_sqnr_db"], errors="coerce")
    worst = int8.sort_values("_acc", na_position="last").head(WORST_TENSORS)
    cols = [Column("tensor", "tensor", numeric=False), Column("kind", "kind", numeric=False),
            Column("block", "block", fmt_int), Column("isolated_sqnr_db", "isolated SQNR (dB)", DB1),
            Column("acc_sqnr_db", "accumulated SQNR (dB)", DB1), Column("acc_cosine", "accumulated cosine", fmt_sig_cos),
            Column("max_over_p99_9", "max / p99.9 (×)", fmt_sig), Column("bits_lost", "bits lost (bits)", fmt_fixed(2))]
    sec.blocks.append(Block("table", table=make_table(
        "depth-worst", f"The {len(worst)} int8 tensors with the lowest accumulated SQNR (dB); a tensor read by"
                       " several sites is listed once.", cols,
        _records(worst), sortable=True)))
    all_cols = [Column("tensor", "tensor", numeric=False), Column("kind", "kind", numeric=False),
                Column("block", "block", fmt_int), Column("int8", "precision", fmt_bool, numeric=False),
                Column("isolated_sqnr_db", "isolated SQNR (dB)", DB1), Column("acc_sqnr_db", "accumulated SQNR (dB)", DB1),
                Column("isolated_cosine", "isolated cosine", fmt_sig_cos),
                Column("acc_cosine", "accumulated cosine", fmt_sig_cos),
                Column("acc_rel_l2", "accumulated rel. L2", fmt_sig)]
    sec.blocks.append(Block("details", f"All {len(df)} activation quantizers in execution order", blocks=[
        Block("table", table=make_table("activations-table", "One row per site input/output (a tensor read by"
                                        " two sites appears twice). SQNR in dB; cosine and"
                                        " relative L2 are unitless.", all_cols, _records(df)))]))
    return sec


def fmt_sig_cos(value: Any) -> str:
    v = num(value)
    return "–" if math.isnan(v) else f"{v:.6f}"


OUTLIER_COLUMNS = [
    Column("tensor", "tensor", numeric=False),
    Column("kind", "kind", numeric=False),
    Column("block", "block", fmt_int),
    Column("int8", "precision", fmt_bool, numeric=False),
    Column("max_abs", "max |x|", fmt_sig, title="activation units"),
    Column("max_over_p99_9", "max / p99.9 (×)", fmt_sig, title="max |x| over the 99.9th percentile of |x|"),
    Column("kurtosis", "kurtosis", fmt_sig, title="Pearson; a normal distribution gives 3"),
    Column("n_outlier_channels", "outlier channels (count)", fmt_int),
    Column("outlier_channels", "outlier channels (indices)", fmt_list(8), numeric=False, wrap=True),
    Column("n_outlier_tokens", "outlier tokens (count)", fmt_text, numeric=False,
           title="token positions where an outlier channel exceeds the threshold"),
    Column("bits_lost", "bits lost (bits)", fmt_fixed(2),
           title="log2(max|x| / max of the other channels): int8 range only the outliers use"),
    Column("acc_sqnr_db", "accumulated SQNR (dB)", DB1),
    Column("also", "same tensor as", fmt_list(4), numeric=False, wrap=True,
           title="other sites reading this very tensor (listed once, here)"),
]


def outlier_section(a: Artefacts) -> Section:
    sec = Section("outliers", "Activation outliers")
    spec = artifacts.ERRORS_ACTIVATIONS
    if a.activations is None:
        sec.missing = _missing_note(_name(spec), _cmd(a.out, spec.command))
        return sec
    k = num(a.activations.meta["outlier_k"])
    if "bits_lost" not in a.activations.rows or "tensor" not in a.activations.rows:
        sec.blocks.append(Block("warn", f"{_name(spec)} has no tensor or bits_lost column."))
        return sec
    df = one_row_per_tensor(a.activations.rows)
    df["_bits"] = pd.to_numeric(df["bits_lost"], errors="coerce")
    df["_ratio"] = pd.to_numeric(df.get("max_over_p99_9"), errors="coerce")
    df["n_outlier_tokens"] = [None if _missing(v) else ("all" if str(v) == "all" else
                                                         str(len([t for t in str(v).split(";") if t])))
                              for v in df.get("outlier_tokens", [None] * len(df))]
    ranked = df.sort_values(["_bits", "_ratio"], ascending=False, na_position="last")
    with_out = ranked[ranked["_bits"] > 0]
    k_text = f"k = {fmt_sig(k)}" if not math.isnan(k) else "k"
    if with_out.empty:
        sec.blocks.append(Block("p", f"No tensor has outlier channels at {k_text} (a channel is an outlier when"
                                     " its max |x| exceeds k × the 90th-percentile channel max). The table lists the"
                                     " tensors with the heaviest tails (max / p99.9) instead."))
        top = df.sort_values("_ratio", ascending=False, na_position="last").head(WORST_TENSORS)
    else:
        top = with_out.head(WORST_TENSORS)
    sec.blocks.append(Block("table", table=make_table(
        "outlier-table",
        f"The {len(top)} tensors with the most int8 range lost to outlier channels ({k_text}: a channel is an"
        f" outlier when its max |x| exceeds k × the 90th-percentile channel max). <i>bits lost</i> = log2(max |x| / max"
        " of the other channels): that many of the 8 bits only serve the outliers under a per-tensor scale."
        f" {len(with_out)} of {len(df)} tensors carry outlier channels. Each tensor is listed once: one read by"
        " several sites (GELU's output is fc2's input) under its int8 reader, the others in <i>same tensor as</i>.",
        OUTLIER_COLUMNS, _records(top), sortable=True)))
    if a.channels is None:
        sec.blocks.append(Block("note", _missing_note(artifacts.ERRORS_CHANNELS, _cmd(a.out, spec.command))))
        return sec
    order = [t for t in df["tensor"] if t in a.channels]
    residual = [(t, a.channels[t]) for t, kind in zip(df["tensor"], df["kind"])
                if kind == "residual" and t in a.channels and a.channels[t].size]
    if residual:
        sec.blocks.append(_figure(
            figures.residual_heatmap(residual), "per-channel max |x| of the residual stream",
            "Per-channel max |x| (log colour scale) of the residual-stream tensors, block by block. Look for"
            " bright vertical stripes: a channel that is large in every block is a persistent outlier of the"
            " residual stream, which a per-tensor int8 scale has to cover."))
    else:
        sec.blocks.append(Block("note", f"{artifacts.ERRORS_CHANNELS} holds no residual-stream tensor."))
    candidates = ranked[ranked["tensor"].isin(order)]
    if not candidates.empty:
        worst = candidates.iloc[0]
        name = str(worst["tensor"])
        cmax = a.channels[name]
        kk = k if not math.isnan(k) else 6.0
        threshold = outlier_threshold(cmax, kk)
        n_over = int((cmax > threshold).sum()) if threshold > 0 else 0
        sec.blocks.append(_figure(
            figures.channel_maxima(cmax, threshold, name, kk), f"channel maxima of {name}",
            f"The tensor losing most bits, <code>{_esc(name)}</code>: max |x| of each of its {cmax.size} channels"
            f" (left) and their distribution (right). The dashed line is the outlier threshold {fmt_sig(kk)} ×"
            f" the 90th-percentile channel max = {fmt_sig(threshold)}; the {n_over} channel(s) above it (red) set the int8 scale for all"
            " the others."))
        reported = num(worst.get("n_outlier_channels"))
        if not math.isnan(reported) and int(reported) != n_over:
            sec.blocks.append(Block("warn", f"{artifacts.ERRORS_CHANNELS} gives {n_over} channel(s) above the threshold for"
                                            f" {_esc(name)}, the table {int(reported)}: the two files may come"
                                            " from different runs."))
    return sec


WEIGHT_TABLE_COLUMNS = [
    Column("site", "layer", numeric=False),
    Column("path", "module path", numeric=False, title="where the site lives in the model's library"),
    Column("kind", "kind", numeric=False),
    Column("block", "block", fmt_int),
    Column("role", "role", numeric=False),
    Column("w_min", "min w", fmt_sig, title="weight units"),
    Column("w_max", "max w", fmt_sig, title="weight units"),
    Column("per_tensor_sqnr_db", "per-tensor SQNR (dB)", DB1),
    Column("per_channel_sqnr_db", "per-channel SQNR (dB)", DB1),
    Column("per_channel_gain_db", "per-channel gain (dB)", DB1),
]


def weights_section(a: Artefacts) -> Section:
    sec = Section("weights", "Weight ranges and granularity")
    spec = artifacts.ERRORS_WEIGHTS
    if a.weights is None:
        sec.missing = _missing_note(_name(spec), _cmd(a.out, spec.command))
        return sec
    df = a.weights.rows
    need = {"site", "kind", "block", "role", "w_min", "w_max", "per_tensor_sqnr_db", "per_channel_sqnr_db"}
    if df.empty or not need <= set(df):
        sec.blocks.append(Block("warn", f"{_name(spec)} lacks columns {sorted(need - set(df))}."))
        return sec
    gain = pd.to_numeric(df.get("per_channel_gain_db"), errors="coerce")
    sec.blocks.append(_figure(
        figures.weight_ranges(df), "weight SQNR and range per layer",
        "Top: SQNR (dB) of each layer's int8 weights with one scale per tensor (grey) and one per output channel"
        " (blue). A long stem means per-channel scales matter for that layer; a low blue point is a layer whose"
        f" weights are hard to quantize even per channel. Median per-channel gain: {DB1(gain.median())} dB."
        " Bottom: the float weight range per layer."))
    sec.blocks.append(Block("details", f"All {len(df)} weights", blocks=[Block("table", table=make_table(
        "weights-table", "Weight values in the model's units, SQNR and gains in dB.",
        WEIGHT_TABLE_COLUMNS, _records(df)))]))
    return sec


# -- rendering ---------------------------------------------------------------------
def _environment() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def model_name(model: Any) -> str:
    """What the report calls a model: the embedded default by its name
    (tiny-vit-fashion), a local folder by its last component, a hub id whole."""
    text = str(model).rstrip("/")
    parts = Path(text).parts
    if tuple(parts[-len(DEFAULT_MODEL_TAIL):]) == DEFAULT_MODEL_TAIL:
        return DEFAULT_MODEL_NAME
    hub_id = len(parts) == 2 and not text.startswith((".", "/", "~")) and not Path(text).exists()
    return text if hub_id or not parts else parts[-1]


def build_context(out_dir: Path, title: str | None = None) -> dict[str, Any]:
    a = Artefacts(out_dir)
    sections = [accuracy_section(a), planner_section(a), skiplist_section(a), summary_section(a),
                sensitivity_section(a), depth_section(a), outlier_section(a), weights_section(a)]
    speed = speed_section(a)
    if speed is not None:
        sections.insert(1, speed)
    first: dict[str, Any] = {}
    for _, meta in a.all_meta():
        for key in ("model", "family", "data", "seed"):
            if _missing(first.get(key)):
                first[key] = meta[key]
    facts = [(key, fmt_text(first[key])) for key in ("model", "family", "data", "seed") if not _missing(first.get(key))]
    name = model_name(first["model"]) if not _missing(first.get("model")) else out_dir.resolve().name
    verdict = a.plan.meta["verdict"] if a.plan is not None and not _missing(a.plan.meta["verdict"]) else None
    return {"title": title or name, "subtitle": "INT8 post-training quantization report", "facts": facts,
            "verdict": verdict, "sections": sections, "warnings": a.warnings, "out_dir": str(out_dir)}


def render_report(out_dir: Path, *, title: str | None = None) -> Path:
    """Write ``out_dir/report.html`` from the artefacts found there; return its path."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no such output folder: {out_dir}")
    html = _environment().get_template("report.html.j2").render(**build_context(out_dir, title))
    path = out_dir / "report.html"
    atomic_write_text(path, html)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.html", description="Write OUT_DIR/report.html.")
    p.add_argument("out_dir", type=Path, help="a folder the vitq commands wrote")
    p.add_argument("--title")
    args = p.parse_args(argv)
    try:
        print(render_report(args.out_dir, title=args.title))
    except FileNotFoundError as e:
        print(f"reports: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
