"""What keeping each group of sites float (and, with ``--formats``, running it in each other
format) costs in ONNX Runtime (latency_sites, written by ``vitq plan --cost latency``): the
planner's latency cost, group by group."""

from __future__ import annotations

from typing import Any

from analysis import artifacts

from ..format import Column, esc, fmt_fixed, fmt_int, fmt_text, is_missing, is_true, make_table, records, text_column
from ..reader import Artefacts
from ..registry import Section, register_section

MS = fmt_fixed(2)


def _delta(r: dict[str, Any]) -> str:
    if is_missing(r.get("delta_ms")):
        return "–"
    interval = ("" if is_missing(r.get("delta_lo_ms")) or is_missing(r.get("delta_hi_ms"))
                else f" [{MS(r['delta_lo_ms'])}, {MS(r['delta_hi_ms'])}]")
    return MS(r["delta_ms"]) + interval


COLUMNS = [
    text_column("group", "group"),
    Column("sites", "sites", fmt_int),
    Column("start_ms", "start (ms)", MS, title="the start config, ms per batch (median)"),
    Column("float_ms", "variant (ms)", MS, title="the start config with this group float (or in the row's format),"
                                                " ms per batch (median)"),
    Column("delta_ms", "slowdown [95 % interval] (ms)", text=_delta,
           title="median of the paired per-round differences, float minus start, ms per batch"),
    Column("spread_ms", "spread (ms)", MS, title="max - min of the group's timed runs"),
    Column("cost_ms", "cost per site (ms)", fmt_fixed(3), title="the planner's cost of one float site; 0 when free"),
    Column("cost_per_site", "cost per site (%)", fmt_fixed(2), title="of the start config's time"),
    text_column("free", "measurable", fmt=lambda v: "no measurable cost" if is_true(v) else "yes",
                title="free: the interval of the slowdown reaches 0 or below"),
]


FORMAT = text_column("format", "format", title="the group float, or in this format (--formats)")


@register_section("latency", "Latency cost of float sites", order=45, optional=True,
                  needs={artifacts.LATENCY: (*(c.key for c in COLUMNS), "format")})
def latency(a: Artefacts, sec: Section) -> None:
    t = a.table(artifacts.LATENCY)
    m, rows = t.meta, records(t.rows)
    formats = "format" in t.rows
    free = [r for r in rows if is_true(r.get("free"))]
    sec.add("p", f"Each group of int8 sites of the start config was kept float in turn and timed against the start"
                 f" config in {esc(fmt_text(m['backend']))}: batch {fmt_int(m['batch'])}, {fmt_int(m['runs'])} paired"
                 f" rounds, {esc(fmt_text(m['threads']))} threads, timing noise {MS(m['noise_ms'])} ms. {len(free)} of"
                 f" {len(rows)} {'variants' if formats else 'groups'} have no measurable cost: free as far as the"
                 " planner's latency cost goes.")
    if formats:
        sec.add("p", "Each group was also timed in each listed format that runs it otherwise than the start config"
                     " (rows with that format): what ONNX Runtime's CPU provider makes of it, a real kernel or"
                     " Q/DQ around float ops, is what it costs the planner.")
    sec.add_table(make_table(
        "latency-table", "One row per group of sites (kind/role); times in ms per batch. Free groups are shaded.",
        [COLUMNS[0], FORMAT, *COLUMNS[1:]] if formats else COLUMNS, rows,
        row_class=lambda r: "ref-row" if is_true(r.get("free")) else ""))
