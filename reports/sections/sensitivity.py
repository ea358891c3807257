"""The measured sensitivity tables (``only`` and ``all-but``), one ranked figure and table each."""

from __future__ import annotations

from analysis import artifacts
from analysis.sensitivity import own_format_rows

from .. import figures
from ..format import DB1, PCT, PP, Column, esc, fmt_int, fmt_small, make_table, num, records, text_column
from ..reader import Artefacts
from ..registry import Block, Section, command, missing_note, register_section

TOP = 30  # candidates in the figure
RANK_LABELS = {"kl": Column("kl", "KL (nats)", fmt_small), "top1_drop": Column("top1_drop", "top-1 drop (pp)", PP),
               "agreement": Column("agreement", "agreement (%)", PCT),
               "logit_sqnr_db": Column("logit_sqnr_db", "logit SQNR (dB)", DB1),
               "logit_mse": Column("logit_mse", "logit MSE", fmt_small)}
COLUMNS = [
    Column("rank", "rank", fmt_int),
    text_column("candidate", "candidate"),
    text_column("path", "module path", title="where the site lives in the model's library"),
    text_column("kind", "kind"),
    Column("block", "block", fmt_int),
    text_column("role", "role"),
    Column("sites", "sites", fmt_int),
    Column("top1", "top-1 (%)", PCT),
    Column("top1_drop", "top-1 drop (pp)", PP),
    Column("top1_gain", "top-1 gain (pp)", PP, title="vs the all-int8 baseline"),
    Column("top5_drop", "top-5 drop (pp)", PP),
    Column("agreement", "agreement (%)", PCT),
    Column("kl", "KL (nats)", fmt_small),
    Column("logit_sqnr_db", "logit SQNR (dB)", DB1),
]
ONLY, ALL_BUT = artifacts.sensitivity("only", "op"), artifacts.sensitivity("all-but", "op")
SPECS = [artifacts.sensitivity(m, g) for m in artifacts.MODES for g in artifacts.GROUPS]


def sensitivity_columns(rank_by: str) -> list[Column]:
    """The ranking metric right after the candidate's description, the top-1 drop beside it."""
    key = Column(rank_by, RANK_LABELS[rank_by].label + " ▸ rank key", RANK_LABELS[rank_by].fmt,
                 title="the candidates are ranked by this column") if rank_by in RANK_LABELS else None
    head = COLUMNS[:7]
    rest = [c for c in COLUMNS[7:] if c.key not in (rank_by, "top1_drop")]
    drop = next(c for c in COLUMNS if c.key == "top1_drop")
    return [*head, *([key] if key else []), *([drop] if rank_by != "top1_drop" else []), *rest]


@register_section("sensitivity", "Sensitivity ranking", order=60, named=(ONLY, ALL_BUT),
                  needs={s: ("rank", "candidate", "kind", "kl", "top1_drop") for s in SPECS})
def sensitivity(a: Artefacts, sec: Section) -> None:
    present = {(m, g): t for m in artifacts.MODES for g in artifacts.GROUPS
               if (t := a.table(artifacts.sensitivity(m, g))) is not None}
    modes = {m for m, _ in present}
    if "only" not in modes:
        sec.add("note", missing_note(a, ONLY))
    if "all_but" not in modes:
        sec.add("note", "All-but sensitivity (everything int8 but the candidate) was not measured: it costs one full"
                        f" pass per candidate. Run {command(a.out, ALL_BUT.command)} (or"
                        f" <code>{esc(artifacts.ACCURACY.command)} --all-but</code>) to add it.")
    for (mode, group), t in present.items():
        flag = mode.replace("_", "-")
        m, df = t.meta, own_format_rows(t.rows)
        other = t.rows[~t.rows["own_format"].astype(bool)] if "own_format" in t.rows else t.rows.iloc[:0]
        if df.empty:
            sec.add("warn", f"{t.path.name} has no ranked candidates.")
            continue
        rank_by = str(m["rank_by"] or "kl")
        n = len(df)
        sec.add("h3", f"--mode {flag} --group {group}: {n} candidates, {fmt_int(m['images'])} images,"
                      f" ranked by {rank_by}")
        baseline = m["baseline"] or {}
        if mode == "only":
            explain = ("Each candidate is quantized alone on the FP32 model; the most damaging first. A large KL"
                       " (nats) or top-1 drop (pp) marks a site to keep float.")
        else:
            explain = ("Everything int8 except the candidate, which stays float; most helpful first. Bars right"
                       " of zero (pp) and KL bars short of the dashed baseline mark sites whose float copy"
                       f" recovers accuracy. All-int8 baseline: top-1 {PCT(baseline.get('top1'))} %,"
                       f" KL {fmt_small(baseline.get('kl'))} nats.")
        png = figures.sensitivity_bars(df, flag, top=TOP, baseline_kl=num(baseline.get("kl")) if mode != "only" else None)
        sec.add_figure(png, f"sensitivity ranking, {flag}, {group}",
                       f"Top {min(n, TOP)} of {n} by rank ({esc(rank_by)}). " + explain)
        sec.add("details", f"All {n} candidates ({t.path.name})", blocks=[
            Block("table", table=make_table(
                f"sens-{mode}-{group}", f"Ranked by {esc(rank_by)}. Accuracy in %, drops and gains in pp, KL in"
                                        " nats, SQNR in dB.", sensitivity_columns(rank_by), records(df)))])
        if len(other):
            counts = other["format"].value_counts(sort=False)
            sec.add("details", "Measured in other formats: " + ", ".join(f"{esc(f)} {int(n)}" for f, n in counts.items())
                    + f" candidates ({t.path.name})", blocks=[Block("table", table=make_table(
                        f"sens-{mode}-{group}-formats", "Each candidate quantized alone in the format named, the"
                        " rest float, measured on the same images (vitq plan --formats: the top candidates of each"
                        f" format by its taylor estimate); ranked by {esc(rank_by)} within each format.",
                        [text_column("format", "format"), *sensitivity_columns(rank_by)], records(other)))])
