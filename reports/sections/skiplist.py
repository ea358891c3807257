"""The plan's skip-list (plan_skiplist.yaml) and the plan as a QuantConfig (plan.yaml);
with a latency table, whether each float site costs measurable time."""

from __future__ import annotations

from analysis import artifacts

from ..format import Column, esc, fmt_fixed, fmt_int, is_missing, is_true, make_table, num, text_column
from ..reader import Artefacts
from ..registry import Block, Section, command, not_available, register_section

LATENCY_COLUMNS = [
    text_column("site", "float site"),
    text_column("group", "latency group"),
    Column("cost_ms", "cost (ms per batch)", fmt_fixed(3), title="the group's slowdown per site when float"),
    text_column("free", "measurable cost", fmt=lambda v: "no measurable cost" if is_true(v) else "yes",
                title="free: the 95 % interval of the group's slowdown reaches 0"),
]


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower() or "x"


@register_section("skiplist", "Chosen skip-list (sites kept float)", order=40, always=True,
                  needs={artifacts.PLAN_STEPS: ("skipped_sites", "plan"),
                         artifacts.LATENCY: ("group", "members", "cost_ms", "free")})
def skiplist(a: Artefacts, sec: Section) -> None:
    skiplist_text, skiplist = a.yaml(artifacts.PLAN_SKIPLIST)
    plan_text, _ = a.yaml(artifacts.PLAN_YAML)
    plan_command = command(a.out, artifacts.PLAN_STEPS.command)
    if skiplist_text is None and plan_text is None:
        sec.missing = not_available(artifacts.PLAN_SKIPLIST, plan_command)
        presets = a.preset_yamls()
        if presets:
            inner = [Block("p", "The configurations <code>vitq eval</code> measured, as loadable QuantConfigs"
                                " (<code>vitq eval --config FILE</code>):")]
            for name, text in presets.items():
                inner += [Block("h4", name), Block("yaml", text, id=f"preset-{_slug(name)}")]
            sec.add("details", "Skip-lists of the evaluated presets", blocks=inner)
        return
    if skiplist_text is not None:
        sites = (skiplist or {}).get("float_sites")
        kinds = (skiplist or {}).get("float_kinds") or []
        if not isinstance(sites, list):
            sec.add("warn", f"{artifacts.PLAN_SKIPLIST} has no <code>float_sites</code> list.")
            sites = []
        n = len(sites)
        sec.add("p", f"The plan keeps <b>{n}</b> site(s) float" + (
            f" beyond the kinds kept float as a whole ({esc(', '.join(map(str, kinds)))})" if kinds else "")
            + (": every other quantizable site is quantized." if n == 0 else
               "; the list below names them one by one (globs and blocks expanded)."))
        formats = (skiplist or {}).get("formats") or {}
        if isinstance(formats, dict) and formats:
            counts: dict[str, int] = {}
            for fmt in formats.values():
                counts[str(fmt)] = counts.get(str(fmt), 0) + 1
            sec.add("p", f"Beside int8 and float, the plan gives {len(formats)} entr{'y' if len(formats) == 1 else 'ies'}"
                         " another format (<code>formats:</code> below, the last entry naming a site wins): "
                         + esc(", ".join(f"{k} {v}" for k, v in counts.items())) + ".")
        sec.add("yaml", skiplist_text, id="skiplist-yaml")
        chosen = a.chosen_step()
        if chosen is not None and not is_missing(chosen.get("skipped_sites")) and int(num(chosen["skipped_sites"])) != n:
            sec.add("warn", f"{artifacts.PLAN_SKIPLIST} lists {n} site(s), the planner's chosen point keeps"
                            f" {fmt_int(chosen['skipped_sites'])} float: the files may come from different runs.")
        costs = a.float_site_costs([str(s) for s in sites])
        if costs:
            free = sum(is_true(r.get("free")) for r in costs)
            sec.add_table(make_table(
                "skiplist-latency", f"What each float site costs in ONNX Runtime ({artifacts.LATENCY.file}):"
                                    f" {free} of {len(costs)} have no measurable cost (their group's slowdown"
                                    " interval reaches 0).", LATENCY_COLUMNS, costs,
                row_class=lambda r: "ref-row" if is_true(r.get("free")) else ""))
    else:
        sec.add("note", not_available(artifacts.PLAN_SKIPLIST, plan_command))
    if plan_text is not None:
        sec.add("details", f"The complete plan as a QuantConfig ({artifacts.PLAN_YAML})", blocks=[
            Block("p", f"Pass it to <code>vitq eval --config {artifacts.PLAN_YAML}</code> or"
                       f" <code>vitq export --config {artifacts.PLAN_YAML}</code>."),
            Block("yaml", plan_text, id="plan-yaml")])
