"""FP32 against every measured configuration: accuracy.json (vitq analyze), else eval.json."""

from __future__ import annotations

from typing import Any

from analysis import artifacts

from ..format import (DB2, MAC_SHARE, PCT, PP, SITES_KEPT_FLOAT, SORTABLE_MIN_ROWS, Column, esc, fmt_int, fmt_small,
                      make_table, plus_minus, records, text_column)
from ..reader import Artefacts
from ..registry import Section, command, missing_note, register_section

COLUMNS = [
    text_column("config", "config"),
    Column("images", "images", fmt_int, title="validation images"),
    Column("top1", "top-1 (%)", PCT),
    Column("top5", "top-5 (%)", PCT),
    Column("top1_drop", "top-1 drop ± se (pp)", text=plus_minus("top1_drop", "top1_drop_se", PP),
           title="FP32 top-1 minus this config's, percentage points, ± its paired standard error (per-image"
                 " correctness differences on the same images)"),
    Column("top5_drop", "top-5 drop (pp)", PP),
    Column("agreement", "agreement (%)", PCT, title="images whose top-1 class equals FP32's"),
    Column("kl", "KL (nats)", fmt_small, title="mean KL(FP32 ‖ config) of the class distributions"),
    Column("logit_sqnr_db", "logit SQNR (dB)", DB2, title="FP32 logits vs this config's"),
    Column("int8_sites", "int8 sites", fmt_int),
    Column("float_sites", "float sites", fmt_int, title="every site kept float, float kinds included"),
    SITES_KEPT_FLOAT,
    MAC_SHARE,
    text_column("source", "from", title="the command (and artefact) that measured the row"),
]
READS = ("config",)


@register_section("accuracy", "Accuracy: FP32 vs quantized configs", order=10, always=True,
                  needs={artifacts.ACCURACY: READS, artifacts.EVAL: READS, artifacts.PLAN_STEPS: ("attempt", "plan")})
def accuracy(a: Artefacts, sec: Section) -> None:
    """accuracy.json when present, else eval.json; with both, eval's other configs are
    appended and labelled. Without a measured ``plan`` row, the planner's chosen point
    (on its plan images) is added, labelled as such."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    acc, ev = a.table(artifacts.ACCURACY), a.table(artifacts.EVAL)
    main = acc if acc is not None else ev
    if main is not None:
        rows += [{**r, "source": f"{main.spec.command} ({main.path.name})"} for r in records(main.rows)]
    if acc is not None and ev is not None:
        seen = {r.get("config") for r in rows}
        extra = [r for r in records(ev.rows) if r.get("config") not in seen]
        rows += [{**r, "source": f"{ev.spec.command} ({ev.path.name})"} for r in extra]
        notes.append(f"The rows from {ev.spec.file} ({len(extra)} config(s) {acc.spec.file} lacks) were measured by a"
                     f" separate {esc(ev.spec.command)} run on {fmt_int(ev.meta['val_images'])} images.")
    chosen = a.chosen_step()
    if chosen is not None and not any(r.get("config") == "plan" for r in rows):
        rows.append({**chosen, "config": "plan",
                     "source": f"{artifacts.PLAN_STEPS.command}, attempt {fmt_int(chosen.get('attempt'))} (plan images)"})
        notes.append("The <i>plan</i> row is the planner's chosen point, measured on its plan images; run"
                     f" {command(a.out, artifacts.ACCURACY.command)} to measure it on every val image.")
    if not rows:
        sec.missing = missing_note(a, artifacts.ACCURACY, artifacts.EVAL)
        sec.add_table(make_table("accuracy-table", "no configuration measured yet", COLUMNS[:1], []))
        return
    caption = ("Top-1/top-5 accuracy (%) on the labelled validation images, drop vs FP32 in percentage points (pp),"
               " and label-free distances to FP32: top-1 agreement (%), KL (nats), logit SQNR (dB; ∞ = identical)."
               " <i>float sites</i> counts every site kept float, <i>sites kept float</i> only those beyond the"
               " kinds a backend keeps float anyway; <i>int8 MACs</i> is the share of the matmul multiply-accumulates"
               " (Linear, Conv, attention) that run in int8. " + " ".join(notes))

    def row_class(r: dict[str, Any]) -> str:
        return "ref-row" if r.get("config") == "fp32" else ("plan-row" if r.get("config") == "plan" else "")
    sec.add_table(make_table("accuracy-table", caption, COLUMNS, rows, row_class,
                             sortable=len(rows) >= SORTABLE_MIN_ROWS))
