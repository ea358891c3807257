"""One self-contained HTML report from whatever artefacts an output folder holds.

``render_report(out_dir)`` reads the tables the ``vitq`` commands write there
(``eval.json``, ``sensitivity_*.json``, ``errors_*.json`` + ``errors_channels.npz``,
the planner's ``plan_steps.json`` + ``plan.yaml``) and writes ``out_dir/report.html``:
figures inlined as base64 PNG, inline CSS, a small inline script for sortable
tables and the copy button; no external URL, CDN or font. A section whose artefact
is missing is replaced by a short note naming the command that produces it.
Nothing time-dependent goes in, so the same artefacts give the same bytes.

    python -m reports.html OUT_DIR [--title TITLE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from quant.store import atomic_write_text

from . import figures

TEMPLATES = Path(__file__).resolve().parent / "templates"
PLANNER_COMMAND = "vitq plan"  # the planner's command line (writes plan_steps.* and plan.yaml)
MODES = (("only", "only"), ("all_but", "all-but"))
GROUPS = ("op", "block", "kind")
TOP_SENSITIVITY = 30
WORST_TENSORS = 15
SORTABLE_MIN_ROWS = 7  # shorter tables are read at a glance; longer ones get clickable headers
META_KEYS_CHECKED = ("model", "data", "seed", "calibration_images")


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
    rows = [[Cell(c.fmt(r.get(c.key)), _sort_value(c, r.get(c.key)),
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
@dataclass
class Artefact:
    path: Path
    rows: pd.DataFrame
    meta: dict[str, Any]


class Artefacts:
    """The tables of one output folder; unreadable files become warnings."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.warnings: list[str] = []
        self.eval = self._table("eval.json")
        self.sensitivity = {(m, g): t for m, _ in MODES for g in GROUPS
                            if (t := self._table(f"sensitivity_{m}_{g}.json")) is not None}
        self.activations = self._table("errors_activations.json")
        self.weights = self._table("errors_weights.json")
        self.channels = self._npz("errors_channels.npz")
        self.plan_steps = self._table("plan_steps.json")
        self.plan_yaml, self.plan_config = self._yaml("plan.yaml")
        self.preset_yaml = {p.stem[len("config_"):]: p.read_text() for p in sorted(out.glob("config_*.yaml"))}

    def _table(self, name: str) -> Artefact | None:
        path = self.out / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())  # Python's json reads the Infinity/NaN tokens meta may hold
            rows = data["rows"]
            meta = data.get("meta") or {}
            if not isinstance(rows, list) or not isinstance(meta, dict):
                raise ValueError("'rows' must be a list and 'meta' a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.warnings.append(f"could not read {name}: {e}; its section is left out")
            return None
        return Artefact(path, pd.DataFrame(rows), meta)

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
            self.warnings.append(f"{name} is not a QuantConfig mapping; shown as is")
            return text, None
        return text, data

    def all_meta(self) -> list[tuple[str, dict[str, Any]]]:
        tables = [self.eval, *self.sensitivity.values(), self.activations, self.weights, self.plan_steps]
        return [(t.path.name, t.meta) for t in tables if t is not None]


# -- sections ----------------------------------------------------------------------
@dataclass
class Figure:
    uri: str
    alt: str
    caption: str


@dataclass
class Block:
    """One piece of a section: a heading, a paragraph, a figure, a table or a <pre>."""

    kind: str  # "h3", "p", "note", "warn", "figure", "table", "details", "yaml"
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


def _missing_note(files: str, command: str) -> str:
    return f"Not available: no {files} in this folder. Run {command} to produce it."


def _figure(png: bytes, alt: str, caption: str) -> Block:
    return Block("figure", figure=Figure(figures.data_uri(png), alt, caption))


def _cmd(out: Path, command: str, *extra: str) -> str:
    """A command line, HTML-escaped (it goes into notes rendered as markup)."""
    return _esc(" ".join([command, *extra, "--out", str(out)]))


ACCURACY_COLUMNS = [
    Column("config", "config", numeric=False),
    Column("source", "from", numeric=False, title="which command measured the row"),
    Column("images", "images", fmt_int, title="validation images"),
    Column("top1", "top-1 (%)", PCT),
    Column("top5", "top-5 (%)", PCT),
    Column("top1_drop", "top-1 drop (pp)", PP, title="FP32 top-1 minus this config's, percentage points"),
    Column("top5_drop", "top-5 drop (pp)", PP),
    Column("agreement", "agreement (%)", PCT, title="images whose top-1 class equals FP32's"),
    Column("kl", "KL (nats)", fmt_small, title="mean KL(FP32 ‖ config) of the class distributions"),
    Column("logit_sqnr_db", "logit SQNR (dB)", DB2, title="FP32 logits vs this config's"),
    Column("int8_sites", "int8 sites", fmt_int),
    Column("float_sites", "float sites", fmt_int),
    Column("int8_macs_share", "int8 share of matmul MACs (%)", fmt_fixed(1),
           title="share of the linear-layer FLOPs that run in int8"),
]


def accuracy_section(a: Artefacts) -> Section:
    sec = Section("accuracy", "Accuracy: FP32 vs quantized configs")
    records: list[dict[str, Any]] = []
    if a.eval is not None:
        for r in _records(a.eval.rows):
            records.append({**r, "source": "vitq eval"})
    plan_note = ""
    if a.plan_steps is not None and len(a.plan_steps.rows):
        steps = _records(a.plan_steps.rows)
        final = dict(steps[-1])
        name = (a.plan_config or {}).get("name") or final.get("config") or "plan"
        share = _plan_share_scale(a.plan_steps.rows)
        row = {"config": str(name), "source": f"planner, step {fmt_int(final.get('step'))}",
               "images": a.plan_steps.meta.get("images", a.plan_steps.meta.get("val_images")),
               **{k: final.get(k) for k in ("top1", "top5", "top1_drop", "top5_drop", "agreement", "kl",
                                            "logit_sqnr_db", "float_sites")}}
        if final.get("int8_macs_share") is not None:
            row["int8_macs_share"] = num(final["int8_macs_share"]) * share
        records.append(row)
        plan_note = (" The last row is the planner's final step (plan_steps.json); its images may differ from"
                     " vitq eval's, and its float-site count is as the planner reports it.")
    if not records:
        sec.missing = _missing_note("eval.json", f"<code>{_cmd(a.out, 'vitq eval')}</code>")
        sec.blocks.append(Block("table", table=make_table("accuracy-table", "no configuration measured yet",
                                                          ACCURACY_COLUMNS[:1], [])))
        return sec
    if a.eval is None:
        sec.blocks.append(Block("note", _missing_note("eval.json", f"<code>{_cmd(a.out, 'vitq eval')}</code>")
                                + " Only the planner's row is shown."))
    caption = ("Top-1/top-5 accuracy (%) on the labelled validation images, drop vs FP32 in percentage points (pp),"
               " and label-free distances to FP32: top-1 agreement (%), KL (nats), logit SQNR (dB; ∞ = identical)."
               " Look at the drop and agreement columns: a config is usable when both stay close to FP32."
               + plan_note)

    def row_class(r: dict[str, Any]) -> str:
        return "ref-row" if r.get("config") == "fp32" else ("plan-row" if str(r.get("source", "")).startswith(
            "planner") else "")
    sec.blocks.append(Block("table", table=make_table("accuracy-table", caption, ACCURACY_COLUMNS, records,
                                                      row_class, sortable=len(records) >= SORTABLE_MIN_ROWS)))
    return sec


def _plan_share_scale(rows: pd.DataFrame) -> float:
    """int8_macs_share is read as a fraction when every value is <= 1 (shown x100 as %)."""
    if "int8_macs_share" not in rows:
        return 1.0
    vals = pd.to_numeric(rows["int8_macs_share"], errors="coerce").abs()
    return 100.0 if vals.notna().any() and float(vals.max()) <= 1.0 else 1.0


def skiplist_section(a: Artefacts) -> Section:
    sec = Section("skiplist", "Chosen skip-list (sites kept float)")
    if a.plan_yaml is None:
        sec.missing = _missing_note("plan.yaml", f"the planner (<code>{_cmd(a.out, PLANNER_COMMAND)}</code>)")
        presets = _preset_yamls(a)
        if presets:
            inner = [Block("p", "The presets <code>vitq eval</code> measured, as loadable QuantConfigs"
                                " (<code>vitq eval --config FILE</code>):")]
            for name, text in presets:
                inner += [Block("h4", name), Block("yaml", text, id=f"preset-{_slug(name)}")]
            sec.blocks.append(Block("details", "Skip-lists of the evaluated presets", blocks=inner))
        return sec
    cfg = a.plan_config or {}
    sites = cfg.get("float_sites")
    if cfg and not isinstance(sites, list):
        sec.blocks.append(Block("warn", "plan.yaml has no <code>float_sites</code> list."))
        sites = []
    kinds = cfg.get("float_kinds")
    text = (f"The planner's configuration keeps <b>{len(sites or [])}</b> site(s) float"
            + (f" on top of the kinds kept float as a whole ({_esc(', '.join(map(str, kinds)))})" if kinds else "")
            + ". It is a complete QuantConfig: save it as a file and pass it to "
              "<code>vitq eval --config FILE</code>.")
    sec.blocks += [Block("p", text), Block("yaml", a.plan_yaml, id="skiplist-yaml")]
    return sec


def _preset_yamls(a: Artefacts) -> list[tuple[str, str]]:
    if a.preset_yaml:
        return list(a.preset_yaml.items())
    configs = (a.eval.meta.get("configs") if a.eval is not None else None) or {}
    return [(k, yaml.safe_dump(v, sort_keys=False)) for k, v in configs.items() if isinstance(v, dict)]


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower() or "x"


PLAN_COLUMNS = [
    Column("step", "step", fmt_int),
    Column("config", "config", numeric=False),
    Column("change", "change (site kept float or remedy)", numeric=False, wrap=True),
    Column("float_sites", "float sites", fmt_int),
    Column("top1", "top-1 (%)", PCT),
    Column("top5", "top-5 (%)", PCT),
    Column("top1_drop", "top-1 drop (pp)", PP),
    Column("agreement", "agreement (%)", PCT),
    Column("kl", "KL (nats)", fmt_small),
    Column("int8_macs_share", "int8 share of matmul MACs (%)", fmt_fixed(1)),
]


def planner_section(a: Artefacts) -> Section:
    sec = Section("planner", "Planner steps")
    if a.plan_steps is None:
        sec.missing = _missing_note("plan_steps.json", f"the planner (<code>{_cmd(a.out, PLANNER_COMMAND)}</code>)")
        return sec
    df = a.plan_steps.rows
    scale = _plan_share_scale(df)
    records = _records(df)
    if "int8_macs_share" in df:
        for r in records:
            r["int8_macs_share"] = num(r.get("int8_macs_share")) * scale
    if len(df) and ("top1_drop" in df or "int8_macs_share" in df):
        curve = df.copy()
        if "int8_macs_share" in curve:
            curve["int8_macs_share"] = pd.to_numeric(curve["int8_macs_share"], errors="coerce") * scale
        sec.blocks.append(_figure(
            figures.plan_curve(curve),
            "planner trade-off per step",
            "Each step keeps one more site float (or applies a remedy). Look for the step where the top-1 drop"
            " (red, pp) flattens out: later steps cost int8 compute (blue, % of linear FLOPs) for little accuracy."))
    sec.blocks.append(Block("table", table=make_table(
        "plan-table", "The planner's steps in order; <i>change</i> is what the step kept float or changed."
                      " Accuracy in %, drop in pp, KL in nats.", PLAN_COLUMNS, records)))
    return sec


def summary_section(a: Artefacts) -> Section:
    sec = Section("summary", "Run summary")
    metas = a.all_meta()
    if not metas:
        sec.missing = "No artefact with run metadata in this folder; run the vitq commands with <code>--out</code>."
        return sec
    first = {}
    for _, meta in metas:
        for k, v in meta.items():
            first.setdefault(k, v)
    general = [("model", first.get("model")), ("family", first.get("family")), ("data", first.get("data")),
               ("seed", first.get("seed")), ("calibration images", first.get("calibration_images")),
               ("torch", first.get("torch")), ("transformers", first.get("transformers"))]
    kv = [{"key": k, "value": fmt_text(v)} for k, v in general if not _missing(v)]
    sec.blocks.append(Block("table", table=make_table(
        "summary-table", "The run's settings (from the JSON metadata of the artefacts).",
        [Column("key", "setting", numeric=False), Column("value", "value", numeric=False)], kv, sortable=False,
        narrow=True)))
    runs = []
    if a.eval is not None:
        m = a.eval.meta
        skipped = m.get("skipped_images") or []
        runs.append({"artefact": "eval.json", "command": "vitq eval", "images": m.get("val_images"),
                     "calib": m.get("calibration_images"), "wall": _sum(m.get("calibration_s"), m.get("evaluation_s")),
                     "detail": f"calibration {fmt_sig(m.get('calibration_s'))} s + evaluation "
                               f"{fmt_sig(m.get('evaluation_s'))} s; {len(a.eval.rows)} configs; "
                               f"{len(skipped)} unreadable image(s) skipped"})
    for (mode, group), t in a.sensitivity.items():
        m = t.meta
        speed = f"{fmt_sig(m.get('speedup_vs_naive'))}× faster than naive" if m.get("speedup_vs_naive") else ""
        runs.append({"artefact": t.path.name, "command": f"vitq sensitivity --mode {m.get('mode', mode)}"
                     f" --group {m.get('group', group)}", "images": m.get("images"),
                     "calib": m.get("calibration_images"), "wall": m.get("wall_s"),
                     "detail": "; ".join(x for x in (f"{fmt_int(m.get('candidates'))} candidates",
                                                      f"ranked by {m.get('rank_by', '?')}", speed) if x)})
    for t in (a.activations, a.weights):
        if t is not None:
            m = t.meta
            runs.append({"artefact": t.path.name, "command": "vitq errors", "images": m.get("images"),
                         "calib": m.get("calibration_images"), "wall": m.get("wall_s"),
                         "detail": f"outlier k = {fmt_sig(m.get('outlier_k'))}" if t is a.activations else
                         f"{len(t.rows)} weights"})
    if a.plan_steps is not None:
        m = a.plan_steps.meta
        runs.append({"artefact": "plan_steps.json", "command": PLANNER_COMMAND,
                     "images": m.get("images", m.get("val_images")), "calib": m.get("calibration_images"),
                     "wall": m.get("wall_s"), "detail": f"{len(a.plan_steps.rows)} steps"})
    sec.blocks.append(Block("table", table=make_table(
        "runs-table", "What each artefact measured: validation images, calibration images and wall time"
                      " (s; – where the command does not record it).",
        [Column("artefact", "artefact", numeric=False), Column("command", "command", numeric=False),
         Column("images", "images", fmt_int), Column("calib", "calibration images", fmt_int),
         Column("wall", "wall time (s)", fmt_sig), Column("detail", "details", numeric=False, wrap=True)], runs,
        sortable=False)))
    mismatch = meta_mismatches(metas)
    if mismatch:
        sec.blocks.append(Block("warn", "The artefacts do not all come from the same settings: "
                                + "; ".join(mismatch) + ". Compare their numbers with care."))
    return sec


def _sum(*values: Any) -> float:
    vals = [num(v) for v in values]
    return math.nan if all(math.isnan(v) for v in vals) else sum(v for v in vals if not math.isnan(v))


def meta_mismatches(metas: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = []
    for key in META_KEYS_CHECKED:
        seen: dict[str, list[str]] = {}
        for name, meta in metas:
            if key in meta and not _missing(meta[key]):
                seen.setdefault(str(meta[key]), []).append(name)
        if len(seen) > 1:
            out.append(f"<code>{key}</code> is " + ", ".join(
                f"{_esc(v)} in {', '.join(names)}" for v, names in seen.items()))
    return out


def _esc(text: str) -> str:
    from markupsafe import escape
    return str(escape(text))


SENSITIVITY_COLUMNS = [
    Column("rank", "rank", fmt_int),
    Column("candidate", "candidate", numeric=False),
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


def sensitivity_section(a: Artefacts) -> Section:
    sec = Section("sensitivity", "Sensitivity ranking")
    if not a.sensitivity:
        sec.missing = _missing_note(
            "sensitivity_*.json", f"<code>{_cmd(a.out, 'vitq sensitivity')}</code> (and "
                                  f"<code>{_cmd(a.out, 'vitq sensitivity', '--mode all-but')}</code>)")
        return sec
    modes_present = {m for m, _ in a.sensitivity}
    for mode, flag in MODES:
        if mode not in modes_present:
            sec.blocks.append(Block("note", _missing_note(
                f"sensitivity_{mode}_*.json", f"<code>{_cmd(a.out, 'vitq sensitivity', '--mode ' + flag)}</code>")))
    for (mode, group), t in a.sensitivity.items():
        flag = dict(MODES)[mode]
        m = t.meta
        df = t.rows
        if df.empty or "rank" not in df or "candidate" not in df:
            sec.blocks.append(Block("warn", f"{t.path.name} has no ranked candidates."))
            continue
        n = len(df)
        head = (f"--mode {flag} --group {group}: {n} candidates, {fmt_int(m.get('images'))} images,"
                f" ranked by {m.get('rank_by', 'top1_drop')}")
        sec.blocks.append(Block("h3", head))
        baseline = m.get("baseline") or {}
        if mode == "only":
            explain = ("Each candidate is quantized alone on the FP32 model; worst first. Look at the top bars:"
                       " a large top-1 drop (pp) or KL (nats) marks a site to keep float.")
        else:
            explain = ("Everything int8 except the candidate, which stays float; most helpful first. Bars right"
                       " of zero (pp) and KL bars short of the dashed baseline mark sites whose float copy"
                       f" recovers accuracy. All-int8 baseline: top-1 {PCT(baseline.get('top1'))} %,"
                       f" KL {fmt_small(baseline.get('kl'))} nats.")
        shown = min(n, TOP_SENSITIVITY)
        png = figures.sensitivity_bars(df, flag, top=TOP_SENSITIVITY,
                                       baseline_kl=num(baseline.get("kl")) if mode != "only" else None)
        sec.blocks.append(_figure(png, f"sensitivity ranking, {flag}, {group}",
                                  f"Top {shown} of {n} by rank. " + explain))
        sec.blocks.append(Block("details", f"All {n} candidates ({t.path.name})", blocks=[
            Block("table", table=make_table(f"sens-{mode}-{group}",
                                            "Accuracy in %, drops and gains in pp, KL in"
                                            " nats, SQNR in dB.", SENSITIVITY_COLUMNS, _records(df)))]))
    return sec


def depth_section(a: Artefacts) -> Section:
    sec = Section("depth", "Quantization noise along depth (SQNR)")
    if a.activations is None:
        sec.missing = _missing_note("errors_activations.json", f"<code>{_cmd(a.out, 'vitq errors')}</code>")
        return sec
    df = a.activations.rows
    need = {"kind", "block", "role", "int8", "isolated_sqnr_db", "acc_sqnr_db"}
    if df.empty or not need <= set(df):
        sec.blocks.append(Block("warn", f"errors_activations.json lacks columns {sorted(need - set(df))}."))
        return sec
    sec.blocks.append(_figure(
        figures.sqnr_depth(df), "isolated and accumulated SQNR per block",
        "Signal-to-quantization-noise ratio (dB, higher is better) of every activation tensor, worst tensor of"
        " each site kind per block. Left: the tensor quantized alone (its own local cost). Right: what the"
        " quantized model passes on at that point, upstream noise included. A kind whose accumulated curve"
        " falls well below its isolated one is where noise piles up; a low isolated point is a tensor that is"
        " hard to quantize by itself. Dashed: kinds the config keeps float."))
    int8 = df[df["int8"].astype(bool)].copy()
    int8["_acc"] = pd.to_numeric(int8["acc_sqnr_db"], errors="coerce")
    worst = int8.sort_values("_acc", na_position="last").head(WORST_TENSORS)
    cols = [Column("tensor", "tensor", numeric=False), Column("kind", "kind", numeric=False),
            Column("block", "block", fmt_int), Column("isolated_sqnr_db", "isolated SQNR (dB)", DB1),
            Column("acc_sqnr_db", "accumulated SQNR (dB)", DB1), Column("acc_cosine", "accumulated cosine", fmt_sig_cos),
            Column("max_over_p99_9", "max / p99.9 (×)", fmt_sig), Column("bits_lost", "bits lost (bits)", fmt_fixed(2))]
    sec.blocks.append(Block("table", table=make_table(
        "depth-worst", f"The {len(worst)} int8 tensors with the lowest accumulated SQNR (dB).", cols,
        _records(worst), sortable=True)))
    all_cols = [Column("tensor", "tensor", numeric=False), Column("kind", "kind", numeric=False),
                Column("block", "block", fmt_int), Column("int8", "precision", fmt_bool, numeric=False),
                Column("isolated_sqnr_db", "isolated SQNR (dB)", DB1), Column("acc_sqnr_db", "accumulated SQNR (dB)", DB1),
                Column("isolated_cosine", "isolated cosine", fmt_sig_cos),
                Column("acc_cosine", "accumulated cosine", fmt_sig_cos),
                Column("acc_rel_l2", "accumulated rel. L2", fmt_sig)]
    sec.blocks.append(Block("details", f"All {len(df)} activation tensors in execution order", blocks=[
        Block("table", table=make_table("activations-table", "SQNR in dB; cosine and"
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
    Column("n_outlier_tokens", "outlier tokens (count)", fmt_int,
           title="token positions where an outlier channel exceeds the threshold"),
    Column("bits_lost", "bits lost (bits)", fmt_fixed(2),
           title="log2(max|x| / max of the other channels): int8 range only the outliers use"),
    Column("acc_sqnr_db", "accumulated SQNR (dB)", DB1),
]


def outlier_section(a: Artefacts) -> Section:
    sec = Section("outliers", "Activation outliers")
    if a.activations is None:
        sec.missing = _missing_note("errors_activations.json", f"<code>{_cmd(a.out, 'vitq errors')}</code>")
        return sec
    df = a.activations.rows.copy()
    k = num(a.activations.meta.get("outlier_k"))
    if "bits_lost" not in df:
        sec.blocks.append(Block("warn", "errors_activations.json has no bits_lost column."))
        return sec
    df["_bits"] = pd.to_numeric(df["bits_lost"], errors="coerce")
    df["_ratio"] = pd.to_numeric(df.get("max_over_p99_9"), errors="coerce")
    df["n_outlier_tokens"] = [len([t for t in str(v).split(";") if t]) if not _missing(v) else None
                              for v in df.get("outlier_tokens", [None] * len(df))]
    ranked = df.sort_values(["_bits", "_ratio"], ascending=False, na_position="last")
    with_out = ranked[ranked["_bits"] > 0]
    k_text = f"k = {fmt_sig(k)}" if not math.isnan(k) else "k"
    if with_out.empty:
        sec.blocks.append(Block("p", f"No tensor has outlier channels at {k_text} (a channel is an outlier when"
                                     " its max |x| exceeds k × the median channel max). The table lists the"
                                     " tensors with the heaviest tails (max / p99.9) instead."))
        top = df.sort_values("_ratio", ascending=False, na_position="last").head(WORST_TENSORS)
    else:
        top = with_out.head(WORST_TENSORS)
    sec.blocks.append(Block("table", table=make_table(
        "outlier-table",
        f"The {len(top)} tensors with the most int8 range lost to outlier channels ({k_text}: a channel is an"
        f" outlier when its max |x| exceeds k × the median channel max). <i>bits lost</i> = log2(max |x| / max"
        " of the other channels): that many of the 8 bits only serve the outliers under a per-tensor scale."
        f" {len(with_out)} of {len(df)} tensors carry outlier channels.",
        OUTLIER_COLUMNS, _records(top), sortable=True)))
    if a.channels is None:
        sec.blocks.append(Block("note", _missing_note("errors_channels.npz",
                                                      f"<code>{_cmd(a.out, 'vitq errors')}</code>")))
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
        sec.blocks.append(Block("note", "errors_channels.npz holds no residual-stream tensor."))
    candidates = ranked[ranked["tensor"].isin(order)]
    if not candidates.empty:
        worst = candidates.iloc[0]
        name = str(worst["tensor"])
        cmax = a.channels[name]
        kk = k if not math.isnan(k) else 6.0
        med = float(np.median(cmax)) if cmax.size else 0.0
        threshold = kk * med
        n_over = int((cmax > threshold).sum()) if threshold > 0 else 0
        sec.blocks.append(_figure(
            figures.channel_maxima(cmax, threshold, name, kk), f"channel maxima of {name}",
            f"The tensor losing most bits, <code>{_esc(name)}</code>: max |x| of each of its {cmax.size} channels"
            f" (left) and their distribution (right). The dashed line is the outlier threshold {fmt_sig(kk)} ×"
            f" median = {fmt_sig(threshold)}; the {n_over} channel(s) above it (red) set the int8 scale for all"
            " the others."))
        reported = num(worst.get("n_outlier_channels"))
        if not math.isnan(reported) and int(reported) != n_over:
            sec.blocks.append(Block("warn", f"errors_channels.npz gives {n_over} channel(s) above the threshold for"
                                            f" {_esc(name)}, the table {int(reported)}: the two files may come"
                                            " from different runs."))
    return sec


WEIGHT_TABLE_COLUMNS = [
    Column("site", "layer", numeric=False),
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
    if a.weights is None:
        sec.missing = _missing_note("errors_weights.json", f"<code>{_cmd(a.out, 'vitq errors')}</code>")
        return sec
    df = a.weights.rows
    need = {"site", "kind", "block", "role", "w_min", "w_max", "per_tensor_sqnr_db", "per_channel_sqnr_db"}
    if df.empty or not need <= set(df):
        sec.blocks.append(Block("warn", f"errors_weights.json lacks columns {sorted(need - set(df))}."))
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


def _model_name(a: Artefacts) -> str:
    for _, meta in a.all_meta():
        if meta.get("model"):
            parts = Path(str(meta["model"]).rstrip("/")).parts
            # 'vitq/default/model' -> 'default/model'; hub ids 'org/name' stay whole
            generic = len(parts) >= 2 and parts[-1] in ("model", "models")
            return "/".join(parts[-2:]) if generic or len(parts) == 2 else (parts[-1] if parts else str(meta["model"]))
    return a.out.resolve().name


def build_context(out_dir: Path, title: str | None = None) -> dict[str, Any]:
    a = Artefacts(out_dir)
    sections = [accuracy_section(a), skiplist_section(a), planner_section(a), summary_section(a),
                sensitivity_section(a), depth_section(a), outlier_section(a), weights_section(a)]
    first: dict[str, Any] = {}
    for _, meta in a.all_meta():
        for key, value in meta.items():
            first.setdefault(key, value)
    facts = [(k, fmt_text(first.get(key))) for k, key in (("model", "model"), ("family", "family"),
                                                             ("data", "data"), ("seed", "seed"))
             if not _missing(first.get(key))]
    return {"title": title or f"INT8 quantization report: {_model_name(a)}", "facts": facts,
            "sections": sections, "warnings": a.warnings, "out_dir": str(out_dir)}


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
    p.add_argument("out_dir", type=Path, help="a folder the vitq commands wrote (eval.json, ...)")
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
