"""The explicit accuracy budgets (--max-drop, --min-agreement, --max-kl): per budget and image
set the estimate, its one-sided 95 % bound, the decision and, when undecided, the images
that would decide it; the decide stage's looks (plan_decide.json)."""

from __future__ import annotations

from typing import Any

from analysis import artifacts
from analysis.budget import IMAGE_CAP, KINDS, round2

from ..format import Column, esc, fmt_fixed, fmt_int, fmt_text, is_missing, make_table, records, text_column
from ..reader import Artefacts
from ..registry import Section, register_section

LOOK_COLUMNS = ("candidate", "attempt", "look", "kind", "budget", "images", "z", "estimate", "bound", "outcome",
                "images_needed")


def _value(kind: str, value: Any) -> str:
    if is_missing(value) or kind not in KINDS:
        return "–"
    return KINDS[kind].format(float(value))


def _bound(d: dict[str, Any]) -> str:
    kind = KINDS.get(d.get("kind"))
    if kind is None or is_missing(d.get("bound")):
        return "–"
    shows_upper = kind.upper != (d.get("outcome") == "not met")
    return f"{'upper' if shows_upper else 'lower'} {_value(d['kind'], d['bound'])}"


def _needed(d: dict[str, Any]) -> str:
    if d.get("outcome") != "undecided":
        return ""
    return f"more than {IMAGE_CAP:,}" if is_missing(d.get("images_needed")) else f"~{round2(int(d['images_needed'])):,}"


DECISION_COLUMNS = [
    text_column("where", "images"),
    text_column("label", "budget"),
    Column("estimate", "estimate", text=lambda d: _value(d.get("kind"), d.get("estimate")),
           title="the mean of the per-image values on these images"),
    Column("bound", "one-sided 95 % bound", text=_bound, numeric=False,
           title="the bound that decides: inside the budget = met; the other bound beyond it = not met"),
    text_column("outcome", "decision"),
    Column("images", "images used", fmt_int),
    Column("images_needed", "images needed", text=_needed, numeric=False,
           title="when undecided: the images at which a test decides with 80 % probability if the true value is "
                 "the estimate (from the measured spread; for the top-1 drop the discordance rate)"),
]


def _decision_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    decide = m["decide"] if isinstance(m["decide"], dict) else None
    sets = [(f"{fmt_int(m['plan_images'])} plan images (search)", m["decisions"]),
            (f"{fmt_int(m['confirm_images'])} confirm images", m["confirm_decisions"])]
    if decide is not None:
        sets.append((f"further images (sequential test, {fmt_text(decide.get('backend'))})", decide.get("decisions")))
    rows = []
    for where, decisions in sets:
        for d in decisions or []:
            kind = KINDS.get(d.get("kind"))
            sign = "≤" if kind is None or kind.upper else "≥"
            rows.append({**d, "where": where,
                         "label": f"{kind.label if kind else d.get('kind')} {sign} {_value(d.get('kind'), d.get('budget'))}"})
    return rows


def _has_decisions(a: Artefacts) -> bool:
    return a.plan is not None and bool(a.plan.meta["decisions"])


@register_section("budgets", "Accuracy budgets: met, not met or undecided", order=25, optional=True,
                  needs={artifacts.PLAN_STEPS: ("attempt",), artifacts.PLAN_DECIDE: LOOK_COLUMNS},
                  shown_when=_has_decisions)
def budgets(a: Artefacts, sec: Section) -> None:
    m = a.plan.meta
    sec.add("p", "Each explicit budget is decided from the per-image values (top-1 drop: FP32 correct minus config"
                 " correct, paired; agreement; KL) with one-sided 95 % bounds: <b>met</b> when the bound on the budget's"
                 " side is inside it, <b>not met</b> when the other bound is beyond it, else <b>undecided</b> at that"
                 " many images, with the images that would decide it. A plan is never called met on an undecided"
                 f" budget. The plan's outcome: <b>{esc(fmt_text(m['outcome']))}</b>.")
    sec.add_table(make_table("budget-table", "The plan's budgets on each image set: the plan images (where it was"
                                             " chosen, so its estimate is optimistic), the confirm images and the"
                                             " further images of the decide stage.",
                             DECISION_COLUMNS, _decision_rows(m), sortable=False))
    t = a.table(artifacts.PLAN_DECIDE)
    if t is None:
        return
    dm = t.meta
    cands = ", ".join(f"{esc(fmt_text(c.get('name')))} (attempt {fmt_int(c.get('attempt'))}): {esc(fmt_text(c.get('outcome')))}"
                      for c in dm["candidates"] or [])
    chosen = dm["chosen"]
    sec.add("p", f"Decide stage ({esc(fmt_text(dm['backend']))}): {fmt_int(dm['images'])} of"
                 f" {fmt_int(dm['max_images'])} further images measured, {fmt_int(dm['looks'])} looks planned"
                 " (O'Brien-Fleming alpha spending: stopping at the first decision keeps each claim's error at 5 %)."
                 f" Candidates, tested in this order, each counted met only after every one before it: {cands}. "
                 + ("No candidate is met there: the plan stays the search's choice." if is_missing(chosen) else
                    f"Chosen: {esc(fmt_text(chosen))}."))
    rows = [{**r, "bound_text": _bound(r)} for r in records(t.rows)]
    sec.add_table(make_table(
        "decide-table", "Every look of each sequential test: images so far, the estimate, the bound at that look's"
                        " critical value z and the decision.",
        [text_column("candidate", "candidate"), Column("attempt", "attempt", fmt_int), Column("look", "look", fmt_int),
         Column("kind", "budget", numeric=False, text=lambda r: KINDS[r["kind"]].label if r.get("kind") in KINDS
                else fmt_text(r.get("kind"))), Column("images", "images", fmt_int), Column("z", "z", fmt_fixed(2)),
         Column("estimate", "estimate", text=lambda r: _value(r.get("kind"), r.get("estimate"))),
         Column("bound_text", "bound", numeric=False), text_column("outcome", "decision"),
         Column("images_needed", "images needed", text=_needed, numeric=False)],
        rows))
