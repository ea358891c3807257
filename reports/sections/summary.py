"""The run's settings and, per command, what it measured and how long it took."""

from __future__ import annotations

from typing import Any

from analysis import artifacts

from ..format import Column, esc, fmt_int, fmt_sig, fmt_text, is_missing, make_table, text_column
from ..reader import Artefacts
from ..registry import Section, register_section

META_KEYS_CHECKED = ("model", "data", "seed", "calibration_images")  # of artifacts.RUN_CONTEXT
SETTINGS = (("model", "model"), ("family", "family"), ("data", "data"), ("seed", "seed"),
            ("calibration images", "calibration_images"), ("torch", "torch"), ("transformers", "transformers"))
RUN_COLUMNS = [text_column("step", "step"), text_column("artefact", "artefact(s)", wrap=True),
               text_column("command", "command"), Column("images", "val images", fmt_int),
               Column("calib", "calibration images", fmt_int),
               Column("calibration_s", "calibration (s)", fmt_sig, title="calibration, or loading its cache"),
               Column("wall", "wall time (s)", fmt_sig, title="the step itself, calibration excluded"),
               text_column("detail", "details", wrap=True)]


def run_rows(a: Artefacts) -> list[dict[str, Any]]:
    """One row per command run: its artefact(s), images and wall times (from the run info)."""
    rows = []
    for t in (a.table(artifacts.ACCURACY), a.table(artifacts.EVAL)):
        if t is not None:
            skipped = t.meta["skipped_images"] or []
            rows.append({"step": "evaluation", "artefact": t.path.name, "command": t.spec.command,
                         "images": t.meta["val_images"], "calib": t.meta["calibration_images"],
                         "calibration_s": t.run["calibration_s"], "wall": t.run["evaluation_s"],
                         "detail": f"{len(t.rows)} configs; {fmt_int(t.run['resumed_images'])} images resumed from"
                                   f" the log; {len(skipped)} unreadable image(s) skipped"})
    for t in (a.table(artifacts.sensitivity(m, g)) for m in artifacts.MODES for g in artifacts.GROUPS):
        if t is None:
            continue
        m, r = t.meta, t.run
        speed = (f"{fmt_sig(r['speedup_vs_naive'])}× faster than one full pass per candidate"
                 f" (~{fmt_sig(r['naive_estimate_s'])} s)" if not is_missing(r["speedup_vs_naive"]) else "")
        rows.append({"step": "sensitivity", "artefact": t.path.name, "command": t.spec.command, "images": m["images"],
                     "calib": m["calibration_images"], "calibration_s": r["calibration_s"], "wall": r["wall_s"],
                     "detail": "; ".join(x for x in (f"{fmt_int(m['candidates'])} candidates, ranked by"
                                                      f" {fmt_text(m['rank_by'])}",
                                                      f"{fmt_int(r['measured_now'])} measured now", speed) if x)})
    errors = [t for t in (a.table(artifacts.ERRORS_ACTIVATIONS), a.table(artifacts.ERRORS_WEIGHTS)) if t is not None]
    if errors:
        t = errors[0]
        rows.append({"step": "errors", "artefact": ", ".join(e.path.name for e in errors), "command": t.spec.command,
                     "images": t.meta["images"], "calib": t.meta["calibration_images"],
                     "calibration_s": t.run["calibration_s"], "wall": t.run["wall_s"],
                     "detail": f"outlier k = {fmt_sig(t.meta['outlier_k'])}"})
    plan = [x for s in (artifacts.PLAN_STEPS, artifacts.PLAN_TRIED, artifacts.PLAN_CONFIRM) if (x := a.table(s))]
    if plan:
        t, tried = plan[0], a.table(artifacts.PLAN_TRIED)
        rows.append({"step": "plan", "artefact": ", ".join(x.path.name for x in plan), "command": t.spec.command,
                     "images": t.meta["plan_images"], "calib": t.meta["calibration_images"],
                     "calibration_s": t.run["calibration_s"], "wall": t.run["wall_s"],
                     "detail": f"{fmt_int(len(tried.rows) if tried else None)} configurations tried;"
                               f" {fmt_int(t.run['measured_now'])} measurements run now (the rest from the log),"
                               f" confirm runs included; {fmt_int(t.meta['confirm_images'])} confirm images"})
    return rows


def meta_mismatches(metas: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = []
    for key in META_KEYS_CHECKED:
        seen: dict[str, list[str]] = {}
        for name, meta in metas:
            if not is_missing(meta[key]):
                seen.setdefault(str(meta[key]), []).append(name)
        if len(seen) > 1:
            out.append(f"<code>{key}</code> is " + ", ".join(
                f"{esc(v)} in {', '.join(names)}" for v, names in seen.items()))
    return out


def run_context(a: Artefacts) -> dict[str, Any]:
    """Model, data, seed ... : the first value any artefact's meta gives for each."""
    first: dict[str, Any] = {}
    for _, meta in a.all_meta():
        for k in artifacts.RUN_CONTEXT:
            if is_missing(first.get(k)):
                first[k] = meta[k]
    return first


@register_section("summary", "Run summary", order=50, always=True)
def summary(a: Artefacts, sec: Section) -> None:
    metas = a.all_meta()
    if not metas:
        sec.missing = "No artefact with run metadata in this folder; run the vitq commands with <code>--out</code>."
        return
    first = run_context(a)
    kv = [{"key": label, "value": fmt_text(first[k])} for label, k in SETTINGS if not is_missing(first.get(k))]
    sec.add_table(make_table("summary-table", "The run's settings (from the JSON metadata of the artefacts).",
                             [text_column("key", "setting"), text_column("value", "value")], kv, sortable=False,
                             narrow=True))
    runs = run_rows(a)
    walls = [f"{r['step']} {fmt_sig(r['wall'])} s" for r in runs]
    calib = list(dict.fromkeys(fmt_sig(r["calibration_s"]) for r in runs))
    sec.add("p", "Wall times: calibration " + " / ".join(f"{c} s" for c in calib)
                 + ("; " + ", ".join(walls) if walls else "") + ".")
    sec.add_table(make_table(
        "runs-table", "What each step measured: validation and calibration images, and its wall times in seconds"
                      " (from each artefact's run info; – where it is missing).", RUN_COLUMNS, runs, sortable=False))
    mismatch = meta_mismatches(metas)
    if mismatch:
        sec.add("warn", "The artefacts do not all come from the same settings: " + "; ".join(mismatch)
                        + ". Compare their numbers with care.")
