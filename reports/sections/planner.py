"""The mixed-precision planner: its budget and verdict, the frontier figure, the kept
points, every attempt and the confirmation on images the search never saw."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis import artifacts

from .. import figures
from ..format import (MAC_SHARE, PCT, PP, SITES_KEPT_FLOAT, Column, esc, fmt_fixed, fmt_int, fmt_sig, fmt_small,
                      fmt_text, fmt_yes, is_missing, is_true, make_table, num, plus_minus, records, text_column)
from ..reader import Artefacts
from ..registry import Section, command, missing_note, register_section

OBJECTIVE_NAMES = {"kl": "KL", "logit_mse": "logit MSE"}
MACS_COST = "% of matmul MACs kept float, plus a small charge per float residual add"
READS = ("attempt", "path", "change", "config", "kl", "logit_mse", "cost")


def _budget_text(budget: Any) -> str:
    if not isinstance(budget, dict):
        return "–"
    parts = [f"top-1 drop ≤ {fmt_sig(budget.get('max_drop'))} pp" if not is_missing(budget.get("max_drop")) else "",
             f"agreement ≥ {fmt_sig(budget.get('min_agreement'))} %" if not is_missing(budget.get("min_agreement")) else "",
             f"KL ≤ {fmt_sig(budget.get('max_kl'))} nats" if not is_missing(budget.get("max_kl")) else "",
             "beat every reference preset (KL lower with 95 % confidence, agreement no lower) at no higher cost"
             if is_true(budget.get("beat_references")) else ""]
    return ", ".join(p for p in parts if p) or "none"


def _outcome_text(m: dict[str, Any]) -> str:
    """met, or the outcome in bold (undecided, not met, ...; see the budgets section)."""
    if is_true(m["met"]):
        return "met"
    outcome = m.get("outcome")
    return f"<b>{esc(str(outcome) if not is_missing(outcome) and outcome != 'met' else 'not met')}</b>"


def _explicit(budget: Any) -> bool:
    return isinstance(budget, dict) and any(not is_missing(budget.get(k)) for k in ("max_drop", "min_agreement", "max_kl"))


def _interval(r: dict[str, Any]) -> str:
    lo, hi = r.get("gain_lo"), r.get("gain_hi")
    return "–" if is_missing(lo) or is_missing(hi) else f"[{fmt_small(lo)}, {fmt_small(hi)}]"


def _objective_column(objective: str) -> Column:
    return (Column("logit_mse", "logit MSE", fmt_small, title="search objective") if objective == "logit_mse"
            else Column("kl", "KL (nats)", fmt_small, title="search objective: mean KL(FP32 ‖ config)"))


def _gain_columns(objective: str) -> list[Column]:
    unit = "nats" if objective == "kl" else "logit MSE"
    return [Column("gain", f"gain ± se ({unit})", text=plus_minus("gain", "gain_se", fmt_small),
                   title=f"{objective} of the previous kept point minus this one's (> 0 = closer to FP32),"
                         " ± its paired-bootstrap standard error"),
            Column("gain_lo", "95 % interval of the gain", text=_interval,
                   title="paired bootstrap over images; a move is kept when the interval lies above 0")]


FORMAT_COLUMNS = [text_column("formats", "formats", title="the formats the configuration runs its sites in"),
                  text_column("int8_float_best", "best int8/float-only",
                              title="the best int8/float-only point measured by this search: the planner's rule over"
                                    " the configurations using int8 and float only, with its outcome")]


def _plan_columns(objective: str, kind: str, cost_unit: str, explicit: bool = False,
                  formats: bool = False) -> list[Column]:
    cols = [Column("attempt", "attempt", fmt_int), text_column("path", "path"), text_column("change", "change", wrap=True),
            *([text_column("kept", "kept", fmt=fmt_yes)] if kind == "tried" else []),
            *_gain_columns(objective), _objective_column(objective)]
    if objective != "kl":
        cols.append(Column("kl", "KL (nats)", fmt_small))
    cols += [Column("agreement", "agreement (%)", PCT), Column("top1_drop", "top-1 drop (pp)", PP),
             Column("float_sites", "float sites", fmt_int), SITES_KEPT_FLOAT, MAC_SHARE]
    if explicit:
        cols.append(text_column("budget_outcome", "budget", title="the explicit budget on the plan images: met, not"
                                                                  " met or undecided (one-sided 95 % bounds)"))
    if kind == "steps":
        cols += [Column("cost", "cost", fmt_fixed(1), title=f"the planner's cost: {cost_unit}"),
                 text_column("on_frontier", "frontier", fmt=fmt_yes), text_column("plan", "plan", fmt=fmt_yes)]
    return cols + (FORMAT_COLUMNS if formats else [])


CONFIRM_COLUMNS = [
    text_column("config", "config"),
    Column("images", "images", fmt_int, title="confirm images: disjoint from the plan images"),
    Column("top1", "top-1 (%)", PCT),
    Column("top1_drop", "top-1 drop ± se (pp)", text=plus_minus("top1_drop", "top1_drop_se", PP),
           title="vs FP32 on the same images, ± paired-bootstrap standard error"),
    Column("agreement", "agreement (%)", PCT),
    Column("kl", "KL (nats)", fmt_small),
    Column("float_sites", "float sites", fmt_int),
    SITES_KEPT_FLOAT,
    MAC_SHARE,
    Column("cost", "cost", fmt_fixed(1)),
]


def _cost_unit(m: dict[str, Any]) -> str:
    """What the cost axis counts: the planner's ``cost_unit`` when it says, else the MAC cost's unit."""
    if not is_missing(m.get("cost_unit")):
        return str(m["cost_unit"])
    if m.get("cost") == "latency":
        return f"% of the start config's ONNX Runtime latency the float sites add, from {artifacts.LATENCY.file}"
    return MACS_COST


def _int8_float_text(marked: Any, plan: dict[str, Any] | None, objective: str, cost_unit: str) -> str:
    """What the marked int8/float-only point is, beside the plan."""
    name = OBJECTIVE_NAMES.get(objective, objective)
    return (f"Best int8/float-only point measured by this search: attempt {fmt_int(marked['attempt'])}"
            f" ({esc(fmt_text(marked['change']))}), cost {fmt_sig(marked['cost'])} ({esc(cost_unit)}),"
            f" {esc(name)} {fmt_small(marked[objective])}, agreement {PCT(marked['agreement'])} %: the planner's"
            " rule over the presets and kept points of this search that use int8 and float only, outcome"
            f" <i>{esc(str(marked['int8_float_best']))}</i>. Not the int8-or-float planner's own plan (its search"
            " makes other moves: <code>vitq plan</code> without <code>--formats</code>)."
            + (f" The plan: cost {fmt_sig(plan['cost'])}, {esc(name)} {fmt_small(plan.get(objective))}, formats"
               f" {esc(fmt_text(plan.get('formats')))}." if plan is not None and not is_missing(plan.get("cost")) else ""))


@register_section("planner", "Mixed-precision planner", order=30, named=(artifacts.PLAN_STEPS,),
                  needs={artifacts.PLAN_STEPS: (*READS, "on_frontier", "plan", *artifacts.PLAN_FORMAT_COLUMNS),
                         artifacts.PLAN_TRIED: (*READS, "kept", *artifacts.PLAN_FORMAT_COLUMNS),
                         artifacts.PLAN_CONFIRM: ("config",)})
def planner(a: Artefacts, sec: Section) -> None:
    steps_t, tried_t, confirm_t = (a.table(s) for s in (artifacts.PLAN_STEPS, artifacts.PLAN_TRIED,
                                                         artifacts.PLAN_CONFIRM))
    m = a.plan.meta
    if not is_missing(m["verdict"]):
        sec.add("verdict", esc(m["verdict"]))
    noise = m["noise"] if isinstance(m["noise"], dict) else {}
    objective = str(noise.get("objective") or "kl")
    objective_name = esc(OBJECTIVE_NAMES.get(objective, objective))
    level = num(noise.get("level"))
    sec.add("p", (
        f"Budget: {esc(_budget_text(m['budget']))}; {_outcome_text(m)}"
        + (f" at attempt {fmt_int(m['met_at_step'])}" if not is_missing(m["met_at_step"]) else "")
        + f". Search objective: {objective_name} on {fmt_int(m['plan_images'])} plan images, starting from"
        f" <code>{esc(fmt_text(m['start']))}</code> and from the best reference preset"
        f" <code>{esc(fmt_text(m['best_reference']))}</code>. A move is kept when the"
        f" {fmt_fixed(0)(level * 100) if not math.isnan(level) else '95'} % interval of its gain"
        f" ({esc(noise.get('test') or 'bootstrap')}, {fmt_int(noise.get('resamples'))} resamples) lies above"
        " zero. The plan is then"
        f" measured again on {fmt_int(m['confirm_images'])} confirm images, beside the presets."))
    costs = a.float_site_costs([str(x) for x in m["float_sites"] or []])
    if costs:
        free = [r["site"] for r in costs if is_true(r.get("free"))]
        sec.add("p", f"Latency ({artifacts.LATENCY.file}): {len(free)} of the plan's {len(costs)} float site(s) have no"
                     " measurable cost" + (f" ({esc(', '.join(free))})" if free else "")
                     + "; the skip-list below marks each one.")
    cost_unit = _cost_unit(m)
    steps = steps_t.rows if steps_t is not None else pd.DataFrame()
    marked = figures.int8_float_best(steps if tried_t is None else tried_t.rows)
    if len(steps):
        budget = m["budget"] if isinstance(m["budget"], dict) else {}
        sec.add_figure(
            figures.frontier(steps, tried_t.rows if tried_t is not None else None, objective=objective,
                             max_objective=num(budget.get("max_kl")) if objective == "kl" else None,
                             cost=str(m.get("cost") or "macs"), cost_unit=m.get("cost_unit")),
            "the planner's frontier: cost against distance to FP32",
            f"Every configuration the planner measured, as cost (x: {esc(cost_unit)}) against {objective_name} to FP32"
            " (y, log scale; lower = closer). Grey: every attempt; lines: the kept points of each search path, in"
            " order; circled: the frontier (no other point is both cheaper and closer); diamonds: the reference"
            " presets; star: the plan, the cheapest frontier point that meets the budget (when the budget asks to"
            " beat the presets: the cheapest point whose KL is below every preset's by more than the noise,"
            " agreement no lower, int8 MAC share no lower and skip-list no longer than theirs)"
            + ("; open square: the best int8/float-only point measured by this search (below)"
               if marked is not None else "") + ". FP32 (cost 100+, distance 0) is off the log scale.")
        if marked is not None:
            sec.add("p", _int8_float_text(marked, a.chosen_step(), objective, cost_unit))
    elif steps_t is None:
        sec.add("note", missing_note(a, artifacts.PLAN_STEPS))
    if steps_t is not None:
        sec.add_table(make_table(
            "plan-table", "Kept points: the reference rows, then every move of each search path that beat the noise,"
                          " in order. Accuracy and agreement in %, drop in pp, KL in nats.",
            _plan_columns(objective, "steps", cost_unit, _explicit(m["budget"]), "formats" in steps), records(steps),
            row_class=lambda r: "plan-row" if is_true(r.get("plan")) else ""))
    if tried_t is not None:
        sec.add_table(make_table(
            "tried-table", f"Every measured attempt, kept or not ({len(tried_t.rows)}). <i>gain</i> is the"
                           " objective gained over the path's previous kept point.",
            _plan_columns(objective, "tried", cost_unit, _explicit(m["budget"]), "formats" in tried_t.rows),
            records(tried_t.rows),
            row_class=lambda r: "" if is_true(r.get("kept")) else "dropped-row"))
    if confirm_t is not None:
        sec.add_table(make_table(
            "confirm-table", f"The plan beside FP32 and the presets on {fmt_int(m['confirm_images'])} confirm"
                             " images the search never saw.", CONFIRM_COLUMNS, records(confirm_t.rows),
            row_class=lambda r: "plan-row" if r.get("config") == "plan" else
            ("ref-row" if r.get("config") == "fp32" else "")))
    else:
        sec.add("note", missing_note(a, artifacts.PLAN_CONFIRM, command_text=(
            f"{command(a.out, artifacts.PLAN_CONFIRM.command)} with confirm images (<code>--confirm-images</code> > 0)")))
