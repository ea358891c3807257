"""Values and tables of the report: formatters, :class:`Column`, and :func:`make_table`,
which turns records into the cells the template prints (text plus the raw value a
sortable column sorts by). Every section formats through this module."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pandas as pd
from markupsafe import escape

SORTABLE_MIN_ROWS = 7  # shorter tables are read at a glance; longer ones get clickable headers


# -- values ------------------------------------------------------------------------
def num(value: Any) -> float:
    """A table value as float: None/''/unparseable -> nan, 'inf'/'-inf' strings -> inf."""
    if value is None or isinstance(value, bool):
        return float(value) if isinstance(value, bool) else math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value == ""


def is_true(value: Any) -> bool:
    return value is True or value in ("True", "true", 1)


def esc(text: Any) -> str:
    """HTML-escaped text, for values interpolated into markup."""
    return str(escape(str(text)))


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a table as dicts, missing values as None."""
    return [{k: (None if is_missing(v) else v) for k, v in row.items()} for row in df.to_dict(orient="records")]


# -- formatters ----------------------------------------------------------------------
def _special(v: float) -> str | None:
    """How a missing or infinite number reads: '–', '∞', '−∞' (None for a finite one)."""
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return None


def fmt_fixed(digits: int, signed: bool = False) -> Callable[[Any], str]:
    def f(value: Any) -> str:
        v = num(value)
        text = f"{v:+.{digits}f}" if signed and v != 0 else f"{v:.{digits}f}"
        return _special(v) or text.replace("-", "−")
    return f


def fmt_small(value: Any) -> str:
    """KL and friends: 0, 4 decimals, or scientific below 0.01."""
    v = num(value)
    if v == 0:
        return "0"
    return _special(v) or (f"{v:.4f}" if abs(v) >= 0.01 else f"{v:.2e}").replace("-", "−")


def fmt_sig(value: Any) -> str:
    v = num(value)
    return _special(v) or f"{v:.3g}".replace("-", "−")


def fmt_cosine(value: Any) -> str:
    v = num(value)
    return "–" if math.isnan(v) else f"{v:.6f}"


def fmt_int(value: Any) -> str:
    v = num(value)
    return "–" if math.isnan(v) else (f"{int(v)}" if math.isfinite(v) else fmt_sig(v))


def fmt_text(value: Any) -> str:
    return "–" if is_missing(value) else str(value)


def fmt_precision(value: Any) -> str:
    """The int8 flag of a tensor as 'int8' or 'float'."""
    if is_missing(value):
        return "–"
    return "int8" if is_true(value) else "float"


def fmt_yes(value: Any) -> str:
    return "yes" if is_true(value) else "no"


def fmt_ratio(value: Any) -> str:
    """A fraction as a whole percentage: 0.034 -> '3 %'."""
    v = num(value)
    return "–" if math.isnan(v) else f"{100 * v:.0f} %"


def fmt_times(value: Any) -> str:
    """A speed-up: 1.234 -> '1.23x'."""
    v = num(value)
    return "–" if math.isnan(v) else f"{v:.2f}x"


def fmt_list(limit: int = 10) -> Callable[[Any], str]:
    """'2;17;18;...' -> '2, 17, 18 … (+30)'."""
    def f(value: Any) -> str:
        if is_missing(value):
            return "–"
        items = [s for s in str(value).split(";") if s != ""]
        if not items:
            return "–"
        head = ", ".join(items[:limit])
        return head + (f" … (+{len(items) - limit})" if len(items) > limit else "")
    return f


def plus_minus(key: str, se: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    """'value ± se' from two fields of a row."""
    def f(r: dict[str, Any]) -> str:
        if is_missing(r.get(key)):
            return "–"
        return fmt(r.get(key)) + ("" if is_missing(r.get(se)) else f" ± {fmt(r.get(se))}")
    return f


PCT, PP, DB1, DB2 = fmt_fixed(2), fmt_fixed(2), fmt_fixed(1), fmt_fixed(2)


# -- tables --------------------------------------------------------------------------
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


def text_column(key: str, label: str, **kw: Any) -> Column:
    """A non-numeric column shown as is."""
    return Column(key, label, numeric=False, **kw)


@dataclass
class Cell:
    text: str
    sort: str  # data-v: the raw value the script sorts by ('' = missing, sorts last)
    cls: str = ""


@dataclass
class HtmlTable:
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
    return "" if is_missing(value) else str(value).lower()


def make_table(id: str, caption: str, columns: list[Column], rows: Iterable[dict[str, Any]],
               row_class: Callable[[dict[str, Any]], str] | None = None, sortable: bool | None = None,
               scroll: bool | None = None, narrow: bool = False) -> HtmlTable:
    """The columns any row has (all of them without rows), one line of cells per row."""
    rows = list(rows)
    cols = [c for c in columns if any(c.key in r for r in rows)] if rows else columns
    cells = [[Cell(c.text(r) if c.text else c.fmt(r.get(c.key)), _sort_value(c, r.get(c.key)),
                   "num" if c.numeric else ("wrap" if c.wrap else ""))
              for c in cols] for r in rows]
    n = len(cells)
    return HtmlTable(id=id, caption=caption, columns=cols, rows=cells,
                     row_classes=[row_class(r) if row_class else "" for r in rows],
                     sortable=n >= SORTABLE_MIN_ROWS if sortable is None else sortable,
                     scroll=n > 20 if scroll is None else scroll, narrow=narrow)


# Columns several sections show with the same label and tooltip.
SITES_KEPT_FLOAT = Column("skipped_sites", "sites kept float", fmt_int,
                          title="float sites beyond the kinds a backend keeps float anyway (LayerNorm, GELU,"
                                " softmax): the skip-list")
MAC_SHARE = Column("int8_macs_share", "int8 MACs (%)", fmt_fixed(1),
                   title="share of the multiply-accumulates of Linear/Conv/attention matmuls that run in int8")
