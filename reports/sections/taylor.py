"""The gradient (taylor/Fisher) estimate of each candidate's ``only`` KL against the
measurement, for the candidates present in both tables."""

from __future__ import annotations

from typing import Any

import pandas as pd

from analysis import artifacts
from analysis.sensitivity import own_format_rows
from analysis.taylor import format_rows, rank_agreement

from .. import figures
from ..format import Column, esc, fmt_fixed, fmt_int, fmt_sig, fmt_small, make_table, num, records, text_column
from ..reader import Artefacts
from ..registry import Block, Section, register_section

COLUMNS = [
    text_column("candidate", "candidate"),
    text_column("kind", "kind"),
    Column("block", "block", fmt_int),
    Column("rank", "rank by estimate", fmt_int, title="among every candidate"),
    Column("kl_estimate", "KL estimate (nats)", fmt_small),
    Column("kl", "measured KL (nats)", fmt_small, title="vitq sensitivity --mode only"),
    Column("estimate_rank", "estimate rank (both)", fmt_int, title="among the candidates measured both ways"),
    Column("measured_rank", "measured rank (both)", fmt_int, title="among the candidates measured both ways"),
    text_column("measured", "measured"),
]
SPECS = [artifacts.sensitivity_taylor(g) for g in artifacts.GROUPS]


def joined(estimate: pd.DataFrame, measured: pd.DataFrame | None) -> pd.DataFrame:
    """The estimate's rows with the measured KL beside them and, over the candidates in
    both, each one's rank (1 = largest KL) by the estimate and by the measurement."""
    df = estimate.copy()
    kl = measured.set_index("candidate")["kl"] if measured is not None else pd.Series(dtype=float)
    df["kl"] = df["candidate"].map(kl)
    both = df["kl"].notna()
    df["measured"] = ["yes" if b else "no" for b in both]
    df.loc[both, "estimate_rank"] = df.loc[both, "kl_estimate"].rank(ascending=False, method="min")
    df.loc[both, "measured_rank"] = df.loc[both, "kl"].rank(ascending=False, method="min")
    return df


def _agreement(df: pd.DataFrame, measured: pd.DataFrame) -> str:
    both = df[df["measured"] == "yes"]
    if len(both) < 3:
        return f"{len(both)} candidate(s) measured both ways: too few to compare ranks."
    r: dict[str, Any] = rank_agreement(both.set_index("candidate")["kl_estimate"], measured)
    top10 = r["top10_in_top15"]
    return (f"Over the {r['candidates']} candidates measured both ways the Spearman rank correlation is"
            f" {fmt_fixed(2)(r['spearman'])}; {top10} of the measured top 10 are in the estimate's top 15.")


@register_section("taylor", "Fast sensitivity: taylor estimate vs measured", order=65, optional=True,
                  needs={s: ("rank", "candidate", "kind", "block", "kl_estimate") for s in SPECS})
def taylor(a: Artefacts, sec: Section) -> None:
    for group, spec in zip(artifacts.GROUPS, SPECS):
        t = a.table(spec)
        if t is None:
            continue
        measured_t = a.table(artifacts.sensitivity("only", group))
        measured = own_format_rows(measured_t.rows) if measured_t is not None else None
        df = joined(format_rows(t.rows, "int8"), measured)  # the other formats: the formats section
        m = t.meta
        sec.add("h3", f"--group {group}: {len(df)} candidates estimated, {int((df['measured'] == 'yes').sum())}"
                      " also measured")
        sec.add("p", f"The estimate ({esc(m['method'])}: one forward and {fmt_int(m['probes'])} backward passes on"
                     f" {fmt_int(m['images'])} images, {fmt_sig(t.run['wall_s'])} s; the Fisher probes capture"
                     f" {fmt_fixed(0)(100 * num(m['fisher_trace_captured_mean']))} % of its trace on"
                     " average) orders the candidates; the planner measures the top ones and keeps the estimate"
                     " for the rest. " + (_agreement(df, measured) if measured is not None else
                                          f"No {artifacts.sensitivity('only', group).file} to compare with."))
        both = df[df["measured"] == "yes"]
        if len(both) >= 2:
            sec.add_figure(figures.taylor_ranks(both), f"taylor estimate against measured KL, {group}",
                           "Left: each candidate measured both ways at its rank by the estimate (x) and by the"
                           " measured KL (y); on the dashed diagonal the estimate orders it exactly. Right: the"
                           " estimated against the measured KL (nats, log-log). Colour: site kind.")
        sec.add("details", f"All {len(df)} estimates ({t.path.name})", blocks=[Block("table", table=make_table(
            f"taylor-{group}", "KL in nats; ranks 1 = most sensitive. <i>measured</i>: also in the measured"
                               " table.", COLUMNS, records(df)))])
