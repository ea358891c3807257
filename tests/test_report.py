"""The HTML report, rendered from artefacts the real commands wrote.

A session fixture runs ``vitq analyze`` once on the embedded default (with a KL
budget the ``all`` preset misses, so the planner searches, keeps some moves and
drops others) and ``vitq eval`` once in a second folder (one preset and one
``--config`` file); the tests render those folders and read the HTML.

The browser tests need Chromium (`apt-get install -y chromium` on Debian/Ubuntu) and
are skipped with a reason when it is absent. They detect JavaScript errors two ways:

1. the page itself: its first script counts every `error` / `unhandledrejection`
   event and `console.error` call on `<html data-js-errors=N>`, and its main script
   sets `<body data-report-ready="1">` as its last statement; `--dump-dom` prints the
   DOM after load, so a healthy page shows `data-report-ready="1"` and no
   `data-js-errors` (a script that failed to parse never sets the ready flag);
2. Chromium's own log: with `--enable-logging=stderr --v=0` every console message
   of the page is written to stderr as a `...:CONSOLE:...` line, and the report logs
   nothing, so any such line is a failure.

A negative control injects a failing script and checks that both detectors fire.
Opening the page with `#selftest` also makes it sort every sortable table by every
column, both ways, record the verdict on `<body data-selftest>`, and record how far
the page overflows the window sideways on `<body data-overflow-px>`.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from markupsafe import escape
from PIL import Image

from analysis import artifacts
from reports import figures, render_report
from reports.format import fmt_fixed, fmt_int, fmt_list, fmt_sig, fmt_small
from reports.html import model_name
from reports.tensors import one_row_per_tensor
from vitq.cli import main as vitq

ROOT = Path(__file__).resolve().parents[1]
# analyze on the embedded default, cheapened (calibration 64, 300 val images, 128 plan/confirm images);
# the KL budget is below the `all` preset's KL, so the planner has to search.
ANALYZE = ["--no-progress", "--calib", "64", "--limit", "300", "--eval-images", "128", "--error-images", "16",
           "--max-kl", "0.0002"]
EXTRA_CONFIG = "fc2_float"  # the config file vitq eval measures beside the preset
NOTE = "Not available"


# -- artefacts from the real commands ---------------------------------------------------
@pytest.fixture(scope="session")
def analyzed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analyze")
    assert vitq(["analyze", "--out", str(out), *ANALYZE]) == 0
    return out


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    cfg = out.parent / f"{EXTRA_CONFIG}.yaml"
    cfg.write_text(f"name: {EXTRA_CONFIG}\nfloat_sites:\n- blocks.1.mlp.fc2\n")
    assert vitq(["eval", "--out", str(out), "--no-progress", "--calib", "64", "--limit", "100",
                 "--preset", "all", "--config", str(cfg)]) == 0
    return out


@pytest.fixture(scope="session")
def html(analyzed: Path) -> str:
    return render_report(analyzed).read_text()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.jsonl", "calibration.pt", "report.html"))
    return dst


def _table(src: artifacts.TableSpec, out: Path) -> artifacts.Table:
    t = artifacts.read(out, src)
    assert t is not None, src.stem
    return t


# -- HTML inspection -------------------------------------------------------------------
class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


def parse(text: str) -> list[tuple[str, dict[str, str | None]]]:
    p = Tags()
    p.feed(text)
    return p.tags


def table(text: str, table_id: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(header labels, [(row class, cell texts)]) of the table with that id."""
    start = text.index(f'<table id="{table_id}"')
    body = text[start:text.index("</table>", start)]
    head = [unescape(re.sub(r"<[^>]+>", "", h)).strip() for h in re.findall(r"<th\b[^>]*>(.*?)</th>", body, re.S)]
    rows = []
    for attrs, inner in re.findall(r"<tr\b([^>]*)>(.*?)</tr>", body.split("<tbody>", 1)[1], re.S):
        cls = re.search(r'class="([^"]*)"', attrs)
        rows.append((cls.group(1) if cls else "",
                     [unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td\b[^>]*>(.*?)</td>", inner, re.S)]))
    return head, rows


def column(text: str, table_id: str, label: str) -> list[str]:
    head, rows = table(text, table_id)
    i = head.index(label)
    return [cells[i] for _, cells in rows]


def section(text: str, section_id: str) -> str:
    start = text.index(f'<section id="{section_id}">')
    return text[start:text.index("</section>", start)]


def notes(text: str) -> str:
    return " ".join(unescape(re.sub(r"<[^>]+>", "", n)) for n in re.findall(r'<p class="missing">(.*?)</p>', text, re.S))


def image(attrs: dict) -> Image.Image:
    src = attrs["src"] or ""
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


# -- the report of vitq analyze -----------------------------------------------------------
def test_self_contained_with_every_section(html: str, analyzed: Path):
    tags = parse(html)
    for tag, attrs in tags:
        for key, value in attrs.items():
            assert not re.search(r"https?://|^//", value or ""), (tag, key, (value or "")[:80])
        assert tag != "link", attrs
        if tag == "script":
            assert "src" not in attrs
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html and "url(" not in html
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert len(images) >= 6  # frontier, sensitivity, depth, heatmap, channel maxima, weights
    for attrs in images:
        img = image(attrs)
        assert img.format == "PNG" and img.width > 300 and img.height > 150 and attrs.get("alt")
    assert NOTE not in html  # analyze writes every artefact but all-but sensitivity (announced, not missing)
    found = re.findall(r'<section id="([^"]+)"', html)
    # latency: where onnx, onnxruntime and onnxscript are installed (--cost auto measures it)
    latency = ["latency"] if artifacts.LATENCY.path(analyzed).is_file() else []
    assert found == ["accuracy", "budgets", "planner", "skiplist", *latency, "summary", "sensitivity", "taylor", "depth",
                     "outliers", "weights"]


def test_title_is_the_model_name(html: str, analyzed: Path):
    assert _table(artifacts.ACCURACY, analyzed).meta["model"].rstrip("/").endswith("vitq/default/model")
    assert "<h1>tiny-vit-fashion</h1>" in html
    assert re.search(r"<title>tiny-vit-fashion\b", html)
    assert "default/model</h1>" not in html and "<title>default/model" not in html


def test_model_name_rules():
    assert model_name("/work/x/vitq/default/model") == "tiny-vit-fashion"
    assert model_name("/models/vit-b16/") == "vit-b16"
    assert model_name("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    assert model_name("./checkpoints/model") == "model"


def test_every_wall_time_is_shown(html: str, analyzed: Path):
    runs = section(html, "summary")
    steps = column(runs, "runs-table", "step")
    assert steps == ["evaluation", "sensitivity", "errors", "plan"]
    for label in ("wall time (s)", "calibration (s)"):
        values = column(runs, "runs-table", label)
        assert values and "–" not in values, (label, values)
    expected = {"evaluation": _table(artifacts.ACCURACY, analyzed).run["evaluation_s"],
                "sensitivity": _table(artifacts.sensitivity("only", "op"), analyzed).run["wall_s"],
                "errors": _table(artifacts.ERRORS_ACTIVATIONS, analyzed).run["wall_s"],
                "plan": _table(artifacts.PLAN_STEPS, analyzed).run["wall_s"]}
    assert dict(zip(steps, column(runs, "runs-table", "wall time (s)"))) == {
        k: fmt_sig(v) for k, v in expected.items()}
    calib = fmt_sig(_table(artifacts.ACCURACY, analyzed).run["calibration_s"])
    assert f"Wall times: calibration {calib} s;" in runs
    for step, value in expected.items():
        assert f"{step} {fmt_sig(value)} s" in runs


def test_accuracy_table_from_accuracy_json(html: str, analyzed: Path):
    acc = _table(artifacts.ACCURACY, analyzed)
    sec = section(html, "accuracy")
    head, rows = table(sec, "accuracy-table")
    for label in ("int8 sites", "float sites", "sites kept float", "int8 MACs (%)", "top-1 drop ± se (pp)", "KL (nats)"):
        assert label in head
    assert column(sec, "accuracy-table", "config") == list(acc.rows["config"])
    assert column(sec, "accuracy-table", "top-1 drop ± se (pp)") == [
        f"{fmt_fixed(2)(r['top1_drop'])} ± {fmt_fixed(2)(r['top1_drop_se'])}" for _, r in acc.rows.iterrows()]
    assert set(column(sec, "accuracy-table", "from")) == {"vitq analyze (accuracy.json)"}
    assert [cls for cls, _ in rows].count("plan-row") == 1


def test_budgets_section_shows_the_decisions_the_planner_wrote(html: str, analyzed: Path):
    meta = _table(artifacts.PLAN_STEPS, analyzed).meta
    decide = _table(artifacts.PLAN_DECIDE, analyzed)
    sec = section(html, "budgets")
    written = [*meta["decisions"], *(meta["confirm_decisions"] or []), *meta["decide"]["decisions"]]
    assert [d["kind"] for d in written] == ["kl"] * 3  # --max-kl, on the plan, confirm and decide images
    assert column(sec, "budget-table", "decision") == [d["outcome"] for d in written]
    assert column(sec, "budget-table", "images used") == [fmt_int(d["images"]) for d in written]
    assert column(sec, "decide-table", "images") == [fmt_int(v) for v in decide.rows["images"]]
    assert decide.meta["decisions"] == meta["decide"]["decisions"]
    last = decide.rows[decide.rows["candidate"] == "plan"].iloc[-1]
    assert last["outcome"] == meta["decide"]["decisions"][0]["outcome"]  # the last look is the final decision
    assert meta["decide"]["decisions"][0]["text"] in meta["verdict"]


def test_float_site_counts_agree_between_accuracy_and_planner(html: str, analyzed: Path):
    steps = _table(artifacts.PLAN_STEPS, analyzed).rows
    assert not set(artifacts.PLAN_FORMAT_COLUMNS) & set(steps)  # the int8-or-float planner's rows, as before formats
    chosen = steps[steps["plan"].astype(bool)]
    assert len(chosen) == 1
    chosen = chosen.iloc[0]
    assert int(chosen["skipped_sites"]) > 0  # the budget made the planner keep sites float
    acc_head, acc_rows = table(section(html, "accuracy"), "accuracy-table")
    plan_head, plan_rows = table(section(html, "planner"), "plan-table")
    acc_plan = dict(zip(acc_head, next(c for cls, c in acc_rows if cls == "plan-row")))
    step_plan = dict(zip(plan_head, next(c for cls, c in plan_rows if cls == "plan-row")))
    assert step_plan["attempt"] == fmt_int(chosen["attempt"])
    for label, key, fmt in (("float sites", "float_sites", fmt_int), ("sites kept float", "skipped_sites", fmt_int),
                            ("int8 MACs (%)", "int8_macs_share", fmt_fixed(1))):
        assert acc_plan[label] == step_plan[label] == fmt(chosen[key]), label
    acc_int8 = int(_table(artifacts.ACCURACY, analyzed).rows.set_index("config").loc["plan", "int8_sites"])
    assert acc_plan["int8 sites"] == fmt_int(acc_int8) == fmt_int(chosen["int8_sites"])


def test_verdict_on_top_and_in_the_planner_section(html: str, analyzed: Path):
    verdict = _table(artifacts.PLAN_STEPS, analyzed).meta["verdict"]
    assert verdict and str(escape(verdict)) in html
    main = html[html.index("<main>"):]
    assert main.index('id="verdict"') < main.index('<section id="accuracy">')
    assert f'<p class="verdict">{escape(verdict)}</p>' in section(html, "planner")


def test_frontier_figure(html: str, analyzed: Path):
    planner = section(html, "planner")
    imgs = [a for t, a in parse(planner) if t == "img"]
    assert len(imgs) == 1 and "frontier" in (imgs[0]["alt"] or "")
    img = np.asarray(image(imgs[0]).convert("RGB")).astype(int)
    red = np.array([0xC0, 0x39, 0x2B])  # figures.BAD: the plan's star
    assert (np.abs(img - red).sum(axis=2) < 30).sum() > 50


def test_frontier_draws_every_series_it_names(analyzed: Path):
    steps = _table(artifacts.PLAN_STEPS, analyzed).rows
    tried = _table(artifacts.PLAN_TRIED, analyzed).rows
    assert (~tried["kept"].astype(bool)).any()  # some attempts were dropped: the grey series has its own points
    both = figures.frontier(steps, tried)
    assert both == figures.frontier(steps, tried)  # deterministic
    assert both != figures.frontier(steps, None)  # the tried series is drawn
    no_plan = steps.assign(plan=False)
    assert both != figures.frontier(no_plan, tried)  # the plan is drawn
    assert figures.frontier(steps, tried, max_objective=2e-4) != both  # the budget line is drawn


def test_steps_tried_and_confirm_tables(html: str, analyzed: Path):
    planner = section(html, "planner")
    steps = _table(artifacts.PLAN_STEPS, analyzed).rows
    tried = _table(artifacts.PLAN_TRIED, analyzed).rows
    confirm = _table(artifacts.PLAN_CONFIRM, analyzed).rows
    assert column(planner, "plan-table", "attempt") == [fmt_int(v) for v in steps["attempt"]]
    head, rows = table(planner, "tried-table")
    for label in ("change", "kept", "gain ± se (nats)", "95 % interval of the gain", "KL (nats)", "agreement (%)",
                  "top-1 drop (pp)", "float sites", "int8 MACs (%)"):
        assert label in head
    assert len(rows) == len(tried)
    kept = column(planner, "tried-table", "kept")
    assert kept == ["yes" if k else "no" for k in tried["kept"]] and "no" in kept
    measured = tried[tried["gain"].notna()].iloc[0]
    cells = dict(zip(head, rows[int(np.flatnonzero(tried["attempt"] == measured["attempt"])[0])][1]))
    assert cells["gain ± se (nats)"] == f"{fmt_small(measured['gain'])} ± {fmt_small(measured['gain_se'])}"
    assert cells["95 % interval of the gain"] == f"[{fmt_small(measured['gain_lo'])}, {fmt_small(measured['gain_hi'])}]"
    head, rows = table(planner, "confirm-table")
    assert [c[0] for _, c in rows] == list(confirm["config"])
    plan = dict(zip(head, next(c for _, c in rows if c[0] == "plan")))
    row = confirm.set_index("config").loc["plan"]
    assert plan["top-1 drop ± se (pp)"] == f"{fmt_fixed(2)(row['top1_drop'])} ± {fmt_fixed(2)(row['top1_drop_se'])}"


def test_skiplist_shows_the_expanded_names(html: str, analyzed: Path):
    sec = section(html, "skiplist")
    m = re.search(r'<pre id="skiplist-yaml">(.*?)</pre>', sec, re.S)
    assert m
    shown = yaml.safe_load(unescape(m.group(1)))
    written = yaml.safe_load((analyzed / artifacts.PLAN_SKIPLIST).read_text())
    assert shown == written and not any("*" in s for s in shown["float_sites"])  # globs expanded
    steps = _table(artifacts.PLAN_STEPS, analyzed).rows
    n = int(steps[steps["plan"].astype(bool)].iloc[0]["skipped_sites"])
    assert len(shown["float_sites"]) == n
    assert f"The plan keeps <b>{n}</b> site(s) float" in sec
    assert 'class="copy" data-target="skiplist-yaml"' in sec and '<pre id="plan-yaml">' in sec


def test_sensitivity_ranked_by_kl_with_the_drop_beside_it(html: str, analyzed: Path):
    t = _table(artifacts.sensitivity("only", "op"), analyzed)
    assert t.meta["rank_by"] == "kl"
    sec = section(html, "sensitivity")
    head, rows = table(sec, "sens-only-op")
    i = head.index("KL (nats) ▸ rank key")
    assert head[i + 1] == "top-1 drop (pp)" and head[:i] == ["rank", "candidate", "module path", "kind", "block", "role", "sites"]
    kl = list(t.rows.sort_values("rank")["kl"])
    assert kl == sorted(kl, reverse=True)
    assert [c[i] for _, c in rows] == [fmt_small(v) for v in t.rows["kl"]]
    assert "All-but sensitivity" in sec and "--mode all-but" in sec  # not measured: says how to add it


def test_each_outlier_tensor_once(html: str, analyzed: Path):
    raw = _table(artifacts.ERRORS_ACTIVATIONS, analyzed).rows
    fc2_inputs = raw[(raw["role"] == "fc2") & (raw["slot"] == "input")]
    assert len(fc2_inputs) and fc2_inputs["same_tensor_as"].str.endswith("mlp.gelu:output").all()
    sec = section(html, "outliers")
    tensors = column(sec, "outlier-table", "tensor")
    also = column(sec, "outlier-table", "same tensor as")
    assert tensors and len(tensors) == len(set(tensors))
    aliases = {a for cell in also for a in cell.replace("…", "").split(", ") if a.strip() not in ("", "–")}
    assert not aliases & set(tensors)  # a tensor listed under another's name is not listed again
    assert not any(t.endswith("mlp.gelu:output") for t in tensors)  # kept under its int8 reader, fc2:input
    for t, a in zip(tensors, also):
        if t.endswith("mlp.fc2:input"):
            assert t.replace("mlp.fc2:input", "mlp.gelu:output") in a


def test_one_row_per_tensor_rules():
    stats = {"max_abs": 3.0, "p99_9": 2.0, "kurtosis": 50.0}
    rows = pd.DataFrame([
        {"tensor": "b.0.mlp.fc1:input", "block": 0, "int8": True, "max_abs": 4.0, "p99_9": 3.0, "kurtosis": 3.0},
        {"tensor": "b.0.mlp.gelu:output", "block": 0, "int8": False, **stats},
        {"tensor": "b.0.mlp.fc2:input", "block": 0, "int8": True, **stats},
        {"tensor": "b.1.mlp.gelu:output", "block": 1, "int8": False, **stats},  # equal numbers, other block
    ])
    out = one_row_per_tensor(rows)
    assert list(out["tensor"]) == ["b.0.mlp.fc1:input", "b.0.mlp.fc2:input", "b.1.mlp.gelu:output"]
    assert list(out["also"]) == ["", "b.0.mlp.gelu:output", ""]
    declared = rows.assign(same_tensor_as=["", "", "", "b.0.mlp.fc2:input"])  # the writer's own word wins
    out = one_row_per_tensor(declared)
    assert list(out["tensor"]) == ["b.0.mlp.fc1:input", "b.0.mlp.gelu:output", "b.0.mlp.fc2:input"]
    assert list(out["also"]) == ["", "", "b.1.mlp.gelu:output"]


def test_second_render_is_byte_identical(analyzed: Path, tmp_path: Path):
    out = _copy(analyzed, tmp_path / "out")
    first = render_report(out).read_bytes()
    assert render_report(out).read_bytes() == first


def test_long_tables_are_sortable(html: str):
    for table_id in ("sens-only-op", "tried-table", "outlier-table", "activations-table", "weights-table"):
        assert re.search(rf'<table id="{table_id}" class="data sortable"', html), table_id
    assert 'data-v="Infinity"' in html  # FP32's logit SQNR, stored as "inf"


def test_reports_spell_no_file_name_and_import_nothing_from_vitq():
    for path in (ROOT / "reports").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) vitq\b", text, re.M), path
        names = re.findall(r"""["'][\w*.-]+\.(?:json|yaml|npz|csv|pt|html)["']""", text)
        assert not names, (path.name, names)
        for stale in ("wall_s\")", "speedup_vs_naive\")", "int8_linear_flops_share", "_plan_share_scale",
                      'meta.get("images"'):
            assert stale not in text, (path.name, stale)


# -- other folders ------------------------------------------------------------------------
def test_eval_only_folder_names_the_missing_commands(evaluated: Path):
    text = render_report(evaluated).read_text()
    assert column(section(text, "accuracy"), "accuracy-table", "config") == ["fp32", "all", EXTRA_CONFIG]
    assert set(column(section(text, "accuracy"), "accuracy-table", "from")) == {"vitq eval (eval.json)"}
    missing = {s: notes(section(text, s)) for s in ("planner", "skiplist", "sensitivity", "depth", "outliers",
                                                     "weights")}
    assert "plan_steps.json" in missing["planner"] and "vitq plan --out" in missing["planner"]
    assert "plan_skiplist.yaml" in missing["skiplist"] and "vitq plan --out" in missing["skiplist"]
    assert "vitq sensitivity --mode only --group op --out" in missing["sensitivity"]
    assert "errors_activations.json" in missing["depth"] and "vitq errors --out" in missing["depth"]
    assert "errors_activations.json" in missing["outliers"] and "vitq errors --out" in missing["outliers"]
    assert "errors_weights.json" in missing["weights"] and "vitq errors --out" in missing["weights"]
    assert "<img" not in text and 'id="verdict"' not in text
    assert column(section(text, "summary"), "runs-table", "step") == ["evaluation"]
    assert "–" not in column(section(text, "summary"), "runs-table", "wall time (s)")


def test_empty_folder_names_analyze(tmp_path: Path):
    text = render_report(tmp_path).read_text()
    assert 'id="accuracy-table"' in text and text.count(NOTE) >= 6
    assert "vitq analyze --out" in notes(section(text, "accuracy"))


def test_eval_beside_accuracy_is_appended_and_labelled(analyzed: Path, evaluated: Path, tmp_path: Path):
    out = _copy(analyzed, tmp_path / "both")
    for p in evaluated.iterdir():
        if p.name.startswith(artifacts.EVAL.stem + ".") or p.name == artifacts.config_file(EXTRA_CONFIG):
            shutil.copy(p, out / p.name)
    text = render_report(out).read_text()
    sec = section(text, "accuracy")
    configs = column(sec, "accuracy-table", "config")
    sources = column(sec, "accuracy-table", "from")
    acc = list(_table(artifacts.ACCURACY, out).rows["config"])
    assert configs == [*acc, EXTRA_CONFIG]  # eval's fp32 and all are not repeated
    assert sources == ["vitq analyze (accuracy.json)"] * len(acc) + ["vitq eval (eval.json)"]
    assert column(section(text, "summary"), "runs-table", "step")[:2] == ["evaluation", "evaluation"]


def test_unreadable_artefact_becomes_a_warning(evaluated: Path, tmp_path: Path):
    out = _copy(evaluated, tmp_path / "bad")
    (out / f"{artifacts.ERRORS_ACTIVATIONS.stem}.json").write_text("{not json")
    text = render_report(out).read_text()
    assert "could not read errors_activations.json" in text
    assert f">{EXTRA_CONFIG}<" in text


def test_values_are_escaped(evaluated: Path, tmp_path: Path):
    out = _copy(evaluated, tmp_path / "esc")
    (out / artifacts.PLAN_YAML).write_text("name: x\nfloat_sites:\n- '<script>alert(1)</script>'\n")
    text = render_report(out, title="<b>t</b>").read_text()
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    assert "<b>t</b>" not in text


def test_mismatched_runs_are_flagged(evaluated: Path, tmp_path: Path):
    out = _copy(evaluated, tmp_path / "mix")
    data = json.loads(artifacts.EVAL.path(out).read_text())
    data["meta"]["model"] = "/models/other"
    artifacts.ACCURACY.path(out).write_text(json.dumps(data))
    text = render_report(out).read_text()
    assert "do not all come from the same settings" in text and "/models/other" in text
    assert "do not all come from the same settings" not in render_report(evaluated).read_text()


# -- formatters and figures -----------------------------------------------------------------
def test_formatters():
    assert fmt_small(0) == "0" and fmt_small(0.000429) == "4.29e−04" and fmt_small(0.1234) == "0.1234"
    assert fmt_small(None) == "–" and fmt_small("inf") == "∞"
    assert fmt_fixed(2)(-0.1) == "−0.10" and fmt_fixed(1)(float("nan")) == "–"
    assert fmt_int(42.0) == "42" and fmt_int(None) == "–"
    assert fmt_list(2)("2;17;18;30") == "2, 17 … (+2)" and fmt_list()("") == "–"
    assert fmt_sig(3.14159) == "3.14"


def test_figures_are_png_and_deterministic(analyzed: Path):
    df = _table(artifacts.sensitivity("only", "op"), analyzed).rows
    a, b = figures.sensitivity_bars(df, "only"), figures.sensitivity_bars(df, "only")
    assert a == b and a[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"Software" not in a and figures.data_uri(a).startswith("data:image/png;base64,")
    assert figures.short_name("vit.layers.3.attention.k_proj") == "b3 attention.k_proj"
    assert figures.short_name("dinov2.encoder.layer.11.mlp.fc2") == "b11 mlp.fc2"
    assert figures.short_name("blocks.3.attn.k") == "b3 attn.k"


# -- a real browser --------------------------------------------------------------------
def _chromium() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian/Ubuntu: apt-get install -y chromium)")


def _run_chromium(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}",
           "--enable-logging=stderr", "--v=0", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _js_error_count(dom: str) -> int:
    """The page's own error count, from the data-js-errors attribute of <html> (0 if absent)."""
    m = re.search(r"<html\b[^>]*>", dom)
    assert m, "no <html> tag in the dumped DOM"
    count = re.search(r'\bdata-js-errors="(\d+)"', m.group(0))
    return int(count.group(1)) if count else 0


def _console_lines(stderr: str) -> list[str]:
    """Console messages of the page, as Chromium logs them with --enable-logging=stderr."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _overflow(dom: str) -> int:
    m = re.search(r'<body\b[^>]*data-overflow-px="(\d+)"', dom)
    assert m, "the self-test did not record the page overflow"
    return int(m.group(1))


@needs_chromium
@pytest.mark.parametrize("width", [1280, 390])
def test_browser_screenshot(analyzed: Path, html: str, tmp_path: Path, width: int):
    report = analyzed / artifacts.REPORT
    shot = tmp_path / "shot.png"
    proc = _run_chromium(tmp_path, report.resolve().as_uri(), f"--screenshot={shot}", f"--window-size={width},2000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (width, 2000)
    assert img.getcolors(maxcolors=64) is None  # far more than a handful of colours: something was drawn
    assert not _console_lines(proc.stderr), _console_lines(proc.stderr)


@needs_chromium
def test_browser_dom_has_no_js_errors_tables_sort_and_phone_width_fits(analyzed: Path, html: str, tmp_path: Path):
    report = analyzed / artifacts.REPORT
    proc = _run_chromium(tmp_path, report.resolve().as_uri() + "#selftest", "--dump-dom", "--window-size=390,2000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'id="accuracy-table"' in dom and 'id="tried-table"' in dom
    assert re.search(r'<body\b[^>]*data-report-ready="1"', dom)  # the main script ran to its end
    assert not _js_error_count(dom), _js_error_count(dom)
    assert not _console_lines(proc.stderr), _console_lines(proc.stderr)
    m = re.search(r'data-selftest="([^"]*)"', dom)
    assert m and m.group(1).startswith("ok "), m and m.group(1)
    assert int(m.group(1).split()[1]) > 20  # several sortable tables, every column both ways
    assert _overflow(dom) == 0  # at 390 px nothing pushes the page sideways


@needs_chromium
def test_browser_detectors_work(analyzed: Path, html: str, tmp_path: Path):
    """Negative controls: a failing script trips both error detectors; a wide element the overflow check."""
    bad = tmp_path / "bad.html"
    bad.write_text(html.replace("</body>", "<script>undefinedFunctionXyz();</script></body>"))
    proc = _run_chromium(tmp_path, bad.as_uri(), "--dump-dom")
    assert _js_error_count(proc.stdout) == 1
    assert any("undefinedFunctionXyz" in line for line in _console_lines(proc.stderr))
    wide = tmp_path / "wide.html"
    wide.write_text(html.replace("<main>", '<main><div style="width:2000px">x</div>'))
    proc = _run_chromium(tmp_path, wide.as_uri() + "#selftest", "--dump-dom", "--window-size=390,2000")
    assert _overflow(proc.stdout) > 1000
