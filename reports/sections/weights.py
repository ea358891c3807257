"""Weight ranges per layer and what per-channel scales gain over per-tensor ones."""

from __future__ import annotations

import pandas as pd

from analysis import artifacts

from .. import figures
from ..format import DB1, Column, fmt_int, fmt_sig, make_table, records, text_column
from ..reader import Artefacts
from ..registry import Block, Section, register_section

COLUMNS = [
    text_column("site", "layer"),
    text_column("path", "module path", title="where the site lives in the model's library"),
    text_column("kind", "kind"),
    Column("block", "block", fmt_int),
    text_column("role", "role"),
    Column("w_min", "min w", fmt_sig, title="weight units"),
    Column("w_max", "max w", fmt_sig, title="weight units"),
    Column("per_tensor_sqnr_db", "per-tensor SQNR (dB)", DB1),
    Column("per_channel_sqnr_db", "per-channel SQNR (dB)", DB1),
    Column("per_channel_gain_db", "per-channel gain (dB)", DB1),
]


@register_section("weights", "Weight ranges and granularity", order=90,
                  needs={artifacts.ERRORS_WEIGHTS: ("site", "kind", "block", "role", "w_min", "w_max",
                                                    "per_tensor_sqnr_db", "per_channel_sqnr_db", "per_channel_gain_db")})
def weights(a: Artefacts, sec: Section) -> None:
    df = a.table(artifacts.ERRORS_WEIGHTS).rows
    if df.empty:
        sec.add("warn", f"{artifacts.ERRORS_WEIGHTS.file} has no rows.")
        return
    gain = pd.to_numeric(df["per_channel_gain_db"], errors="coerce")
    sec.add_figure(
        figures.weight_ranges(df), "weight SQNR and range per layer",
        "Top: SQNR (dB) of each layer's int8 weights with one scale per tensor (grey) and one per output channel"
        " (blue). A long stem means per-channel scales matter for that layer; a low blue point is a layer whose"
        f" weights are hard to quantize even per channel. Median per-channel gain: {DB1(gain.median())} dB."
        " Bottom: the float weight range per layer.")
    sec.add("details", f"All {len(df)} weights", blocks=[Block("table", table=make_table(
        "weights-table", "Weight values in the model's units, SQNR and gains in dB.", COLUMNS, records(df)))])
