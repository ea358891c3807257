"""Quantization noise along depth: isolated and accumulated SQNR of every activation."""

from __future__ import annotations

import pandas as pd

from analysis import artifacts

from .. import figures
from ..format import DB1, Column, fmt_cosine, fmt_fixed, fmt_int, fmt_precision, fmt_sig, is_true, make_table, records, text_column
from ..reader import Artefacts
from ..registry import Block, Section, register_section
from ..tensors import one_row_per_tensor

WORST_TENSORS = 15
TENSOR, KIND, BLOCK = text_column("tensor", "tensor"), text_column("kind", "kind"), Column("block", "block", fmt_int)
ISOLATED, ACCUMULATED = Column("isolated_sqnr_db", "isolated SQNR (dB)", DB1), Column("acc_sqnr_db", "accumulated SQNR (dB)", DB1)
WORST_COLUMNS = [TENSOR, KIND, BLOCK, ISOLATED, ACCUMULATED, Column("acc_cosine", "accumulated cosine", fmt_cosine),
                 Column("max_over_p99_9", "max / p99.9 (×)", fmt_sig), Column("bits_lost", "bits lost (bits)", fmt_fixed(2))]
ALL_COLUMNS = [TENSOR, KIND, BLOCK, text_column("int8", "precision", fmt=fmt_precision), ISOLATED, ACCUMULATED,
               Column("isolated_cosine", "isolated cosine", fmt_cosine),
               Column("acc_cosine", "accumulated cosine", fmt_cosine),
               Column("acc_rel_l2", "accumulated rel. L2", fmt_sig)]


@register_section("depth", "Quantization noise along depth (SQNR)", order=70,
                  needs={artifacts.ERRORS_ACTIVATIONS: ("tensor", "kind", "block", "role", "int8", "isolated_sqnr_db",
                                                        "acc_sqnr_db")})
def depth(a: Artefacts, sec: Section) -> None:
    df = a.table(artifacts.ERRORS_ACTIVATIONS).rows
    if df.empty:
        sec.add("warn", f"{artifacts.ERRORS_ACTIVATIONS.file} has no rows.")
        return
    sec.add_figure(
        figures.sqnr_depth(df), "isolated and accumulated SQNR per block",
        "Signal-to-quantization-noise ratio (dB, higher is better) of every activation tensor, worst tensor of"
        " each site kind per block. Left: the tensor quantized alone (its own local cost). Right: what the"
        " quantized model passes on at that point, upstream noise included. A kind whose accumulated curve"
        " falls well below its isolated one is where noise piles up; a low isolated point is a tensor that is"
        " hard to quantize by itself. Dashed: kinds the config keeps float.")
    tensors = one_row_per_tensor(df)
    int8 = tensors[tensors["int8"].map(is_true)].copy()
    int8["_acc"] = pd.to_numeric(int8["acc_sqnr_db"], errors="coerce")
    worst = int8.sort_values("_acc", na_position="last").head(WORST_TENSORS)
    sec.add_table(make_table(
        "depth-worst", f"The {len(worst)} int8 tensors with the lowest accumulated SQNR (dB); a tensor read by"
                       " several sites is listed once.", WORST_COLUMNS, records(worst), sortable=True))
    sec.add("details", f"All {len(df)} activation quantizers in execution order", blocks=[
        Block("table", table=make_table("activations-table", "One row per site input/output (a tensor read by"
                                        " two sites appears twice). SQNR in dB; cosine and"
                                        " relative L2 are unitless.", ALL_COLUMNS, records(df)))])
