"""Activation outliers: the tensors losing most int8 range to outlier channels, the
residual stream's channel maxima, and the worst tensor's channels."""

from __future__ import annotations

import math

import pandas as pd

from analysis import artifacts
from analysis.errors import outlier_threshold

from .. import figures
from ..format import (DB1, Column, esc, fmt_fixed, fmt_int, fmt_list, fmt_precision, fmt_sig, fmt_text, is_missing,
                      make_table, num, records, text_column)
from ..reader import Artefacts
from ..registry import Section, command, not_available, register_section
from ..tensors import one_row_per_tensor

WORST_TENSORS = 15
COLUMNS = [
    text_column("tensor", "tensor"),
    text_column("kind", "kind"),
    Column("block", "block", fmt_int),
    text_column("int8", "precision", fmt=fmt_precision),
    Column("max_abs", "max |x|", fmt_sig, title="activation units"),
    Column("max_over_p99_9", "max / p99.9 (×)", fmt_sig, title="max |x| over the 99.9th percentile of |x|"),
    Column("kurtosis", "kurtosis", fmt_sig, title="Pearson; a normal distribution gives 3"),
    Column("n_outlier_channels", "outlier channels (count)", fmt_int),
    text_column("outlier_channels", "outlier channels (indices)", fmt=fmt_list(8), wrap=True),
    text_column("n_outlier_tokens", "outlier tokens (count)", fmt=fmt_text,
                title="token positions where an outlier channel exceeds the threshold"),
    Column("bits_lost", "bits lost (bits)", fmt_fixed(2),
           title="log2(max|x| / max of the other channels): int8 range only the outliers use"),
    Column("acc_sqnr_db", "accumulated SQNR (dB)", DB1),
    text_column("also", "same tensor as", fmt=fmt_list(4), wrap=True,
                title="other sites reading this very tensor (listed once, here)"),
]


def _token_count(value) -> str | None:
    if is_missing(value):
        return None
    return "all" if str(value) == "all" else str(len([t for t in str(value).split(";") if t]))


@register_section("outliers", "Activation outliers", order=80,
                  needs={artifacts.ERRORS_ACTIVATIONS: ("tensor", "kind", "bits_lost", "max_over_p99_9",
                                                        "n_outlier_channels", "outlier_tokens")})
def outliers(a: Artefacts, sec: Section) -> None:
    t = a.table(artifacts.ERRORS_ACTIVATIONS)
    if t.rows.empty:
        sec.add("warn", f"{t.spec.file} has no rows.")
        return
    k = num(t.meta["outlier_k"])
    df = one_row_per_tensor(t.rows)
    df["_bits"] = pd.to_numeric(df["bits_lost"], errors="coerce")
    df["_ratio"] = pd.to_numeric(df["max_over_p99_9"], errors="coerce")
    df["n_outlier_tokens"] = [_token_count(v) for v in df["outlier_tokens"]]
    ranked = df.sort_values(["_bits", "_ratio"], ascending=False, na_position="last")
    with_out = ranked[ranked["_bits"] > 0]
    k_text = f"k = {fmt_sig(k)}" if not math.isnan(k) else "k"
    if with_out.empty:
        sec.add("p", f"No tensor has outlier channels at {k_text} (a channel is an outlier when its max |x| exceeds"
                     " k × the 90th-percentile channel max). The table lists the tensors with the heaviest tails"
                     " (max / p99.9) instead.")
        top = df.sort_values("_ratio", ascending=False, na_position="last").head(WORST_TENSORS)
    else:
        top = with_out.head(WORST_TENSORS)
    sec.add_table(make_table(
        "outlier-table",
        f"The {len(top)} tensors with the most int8 range lost to outlier channels ({k_text}: a channel is an"
        f" outlier when its max |x| exceeds k × the 90th-percentile channel max). <i>bits lost</i> = log2(max |x| / max"
        " of the other channels): that many of the 8 bits only serve the outliers under a per-tensor scale."
        f" {len(with_out)} of {len(df)} tensors carry outlier channels. Each tensor is listed once: one read by"
        " several sites (GELU's output is fc2's input) under its int8 reader, the others in <i>same tensor as</i>.",
        COLUMNS, records(top), sortable=True))
    channels = a.channels
    if channels is None:
        sec.add("note", not_available(artifacts.ERRORS_CHANNELS, command(a.out, t.spec.command)))
        return
    residual = [(name, channels[name]) for name, kind in zip(df["tensor"], df["kind"])
                if kind == "residual" and name in channels and channels[name].size]
    if residual:
        sec.add_figure(
            figures.residual_heatmap(residual), "per-channel max |x| of the residual stream",
            "Per-channel max |x| (log colour scale) of the residual-stream tensors, block by block. Look for"
            " bright vertical stripes: a channel that is large in every block is a persistent outlier of the"
            " residual stream, which a per-tensor int8 scale has to cover.")
    else:
        sec.add("note", f"{artifacts.ERRORS_CHANNELS} holds no residual-stream tensor.")
    candidates = ranked[ranked["tensor"].isin([n for n in df["tensor"] if n in channels])]
    if candidates.empty:
        return
    worst = candidates.iloc[0]
    name = str(worst["tensor"])
    cmax = channels[name]
    kk = k if not math.isnan(k) else 6.0
    threshold = outlier_threshold(cmax, kk)
    n_over = int((cmax > threshold).sum()) if threshold > 0 else 0
    sec.add_figure(
        figures.channel_maxima(cmax, threshold, name, kk), f"channel maxima of {name}",
        f"The tensor losing most bits, <code>{esc(name)}</code>: max |x| of each of its {cmax.size} channels"
        f" (left) and their distribution (right). The dashed line is the outlier threshold {fmt_sig(kk)} ×"
        f" the 90th-percentile channel max = {fmt_sig(threshold)}; the {n_over} channel(s) above it (red) set the int8"
        " scale for all the others.")
    reported = num(worst.get("n_outlier_channels"))
    if not math.isnan(reported) and int(reported) != n_over:
        sec.add("warn", f"{artifacts.ERRORS_CHANNELS} gives {n_over} channel(s) above the threshold for {esc(name)},"
                        f" the table {int(reported)}: the two files may come from different runs.")
