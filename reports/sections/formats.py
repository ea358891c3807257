"""Sensitivity per format: the taylor estimate of every site's ``only`` KL in each format
it was estimated in (``--formats``), site x format, beside the measured ``only`` KL where the
planner measured the site in that format (``sensitivity_only_op`` with a ``format`` column),
with the format the plan gives it."""

from __future__ import annotations

import pandas as pd

from analysis import artifacts
from analysis.sensitivity import format_measurements
from quant.config import matches

from ..format import Column, esc, fmt_int, fmt_small, make_table, records, text_column
from ..reader import Artefacts
from ..registry import Section, register_section

SPEC = artifacts.sensitivity_taylor("op")
ONLY = artifacts.sensitivity("only", "op")


def site_by_format(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per site, one ``kl_<format>`` column per format (in the table's order), the
    sites in the order of their first format's estimate (most sensitive first)."""
    formats = list(dict.fromkeys(rows["format"]))
    wide = rows.pivot(index="candidate", columns="format", values="kl_estimate")
    first = rows[rows["format"] == formats[0]]
    order = first.sort_values("kl_estimate", ascending=False, kind="stable")["candidate"]
    wide = wide.reindex(order)[formats].add_prefix("kl_")
    facts = rows.drop_duplicates("candidate").set_index("candidate")[["kind", "block"]]
    return facts.join(wide, how="right").reset_index(), formats


def plan_format(plan: dict, site: str, kind: str) -> str:
    """The format a plan YAML (skip-list with ``formats``) gives ``site``: ``float`` when the
    skip-list names it, else the last ``formats`` entry naming it (a name, glob or kind),
    else ``int8``."""
    if kind in (plan.get("float_kinds") or []) or any(matches(site, p) for p in plan.get("float_sites") or []):
        return "float"
    name = "int8"
    for pattern, fmt in (plan.get("formats") or {}).items():
        if pattern == kind or matches(site, str(pattern)):
            name = str(fmt)
    return name


def _has_formats(a: Artefacts) -> bool:
    t = a.table(SPEC)
    return t is not None and "format" in t.rows


@register_section("formats", "Sensitivity per format (site x format)", order=66, optional=True,
                  needs={SPEC: ("candidate", "kind", "block", "kl_estimate", "format")}, shown_when=_has_formats)
def formats(a: Artefacts, sec: Section) -> None:
    t = a.table(SPEC)
    wide, names = site_by_format(t.rows)
    _, plan = a.yaml(artifacts.PLAN_SKIPLIST)
    columns = [text_column("candidate", "site"), text_column("kind", "kind"), Column("block", "block", fmt_int),
               *(Column(f"kl_{f}", f"{f}", fmt_small, title=f"estimated KL of the site alone in {f} (nats)")
                 for f in names)]
    only = a.table(ONLY)
    # (site, format) -> measured KL of every row, the config's own format included
    measured = {} if only is None else format_measurements(only.rows, own=True)
    for f in names:
        if any(fmt == f for _, fmt in measured):
            wide[f"measured_{f}"] = [measured.get((str(c), f)) for c in wide["candidate"]]
            columns.append(Column(f"measured_{f}", f"{f} measured", fmt_small,
                                  title=f"measured KL of the site alone in {f} (nats), {ONLY.file}"))
    if isinstance(plan, dict):
        wide["plan"] = [plan_format(plan, str(r.candidate), str(r.kind)) for r in wide.itertuples()]
        columns.append(text_column("plan", "plan's format"))
        counts = wide["plan"].value_counts()
        sec.add("p", "The plan (" + esc(artifacts.PLAN_SKIPLIST) + ") runs these sites in: "
                + ", ".join(f"{esc(k)} {int(v)}" for k, v in counts.items()) + ".")
    m = t.meta
    sec.add("p", f"Each site quantized alone in each format, the rest float: the taylor (Fisher) estimate of its KL"
                 f" to FP32, from one forward and {fmt_int(m['probes'])} backward passes on {fmt_int(m['images'])}"
                 " images that serve every format at once (each format's quantization noise is a perturbation"
                 " of its own). A format that keeps a site float estimates 0 (a weight-only format at a site"
                 " without weights). The planner over formats orders its moves by these estimates per unit of"
                 " cost; every move it keeps is measured."
                 + (f" Where the planner also measured a site alone in a format ({esc(ONLY.file)}: the top candidates"
                    " of each format by its estimate), the measured KL stands beside the estimate and the planner"
                    " used it instead." if measured else ""))
    sec.add_table(make_table("formats-by-site", f"KL estimates in nats ({esc(t.path.name)}); sites most sensitive"
                                                f" in {esc(names[0])} first.", columns, records(wide)))
