"""The HTML report: rendering from synthetic artefacts, and a real headless browser.

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
column, both ways, and record the verdict on `<body data-selftest>`.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.errors import ACTIVATION_COLUMNS, WEIGHT_COLUMNS
from reports import render_report
from reports import figures
from quant.store import write_table

SITE = "vit.layers.{b}.{op}"


# -- synthetic artefacts ---------------------------------------------------------------
def _meta(**extra):
    return {"model": "/models/tiny-vit", "family": "vit", "data": "/data/tiny", "seed": 0,
            "calibration_images": 64, "torch": "2.x", "transformers": "5.x", **extra}


def write_eval(out: Path) -> None:
    rows = [
        {"config": "fp32", "images": 100, "top1": 80.0, "top5": 95.0, "top1_drop": 0.0, "top5_drop": 0.0,
         "agreement": 100.0, "kl": 0.0, "logit_sqnr_db": math.inf, "int8_sites": 0, "float_sites": 20},
        {"config": "all", "images": 100, "top1": 74.0, "top5": 93.0, "top1_drop": 6.0, "top5_drop": 2.0,
         "agreement": 88.0, "kl": 0.12, "logit_sqnr_db": 14.2, "int8_sites": 14, "float_sites": 6},
        {"config": "mixed_1", "images": 100, "top1": 79.0, "top5": 95.0, "top1_drop": 1.0, "top5_drop": 0.0,
         "agreement": 97.0, "kl": 0.004, "logit_sqnr_db": 25.1, "int8_sites": 10, "float_sites": 10},
    ]
    write_table(pd.DataFrame(rows), out / "eval", _meta(val_images=100, skipped_images=[], calibration_s=1.5,
                                                         evaluation_s=3.0, configs={}))


def _sens_rows(mode: str, n: int = 9) -> pd.DataFrame:
    rows = []
    for i in range(n):
        b, op = divmod(i, 3)
        name = SITE.format(b=b, op=("mlp.fc1", "mlp.fc2", "residual_mlp")[op])
        top1 = 80.0 - (n - i) * 0.5 if mode == "only" else 74.0 + (n - i) * 0.3
        rows.append({"candidate": name, "kind": "residual" if op == 2 else "linear", "block": b,
                     "role": ("fc1", "fc2", "residual_mlp")[op], "sites": 1, "mode": mode, "start_block": b,
                     "top1": top1, "top5": 95.0, "agreement": 95.0, "kl": 0.01 * (n - i),
                     "logit_sqnr_db": 20.0 + i, "top1_drop": 80.0 - top1, "top5_drop": 0.0})
        if mode == "all-but":
            rows[-1]["top1_gain"] = top1 - 74.0
    df = pd.DataFrame(rows)
    df.insert(0, "rank", range(1, n + 1))
    return df


def write_sensitivity(out: Path, mode: str = "only") -> None:
    meta = _meta(mode=mode, group="op", images=50, candidates=9, measured_now=9, wall_s=2.5, full_pass_s=0.5,
                 naive_estimate_s=4.5, speedup_vs_naive=1.8, rank_by="top1_drop",
                 fp32={"top1": 80.0, "kl": 0.0, "logit_sqnr_db": math.inf},
                 baseline={"top1": 74.0, "kl": 0.12, "logit_sqnr_db": 14.0})
    write_table(_sens_rows(mode), out / f"sensitivity_{mode.replace('-', '_')}_op", meta)


def write_errors(out: Path, with_npz: bool = True) -> None:
    rng = np.random.default_rng(0)
    acts, channels = [], {}
    tensors = [("vit.embeddings.patch_embeddings.projection", "input", "conv", None, "patch_embed", True)]
    for b in range(3):
        tensors += [(SITE.format(b=b, op="mlp.fc1"), "input", "linear", b, "fc1", True),
                    (SITE.format(b=b, op="mlp.gelu"), "output", "gelu", b, "gelu", False),
                    (SITE.format(b=b, op="residual_mlp"), "output", "residual", b, "residual_mlp", True)]
    tensors.append(("classifier", "input", "linear", None, "head", True))
    for i, (site, slot, kind, block, role, int8) in enumerate(tensors):
        cmax = rng.uniform(0.5, 1.5, 32)
        if kind == "residual":
            cmax[[3, 17]] = [40.0, 25.0]  # two persistent outlier channels
        has_channels = kind != "conv"
        threshold = 6.0 * float(np.median(cmax))
        outliers = np.flatnonzero(cmax > threshold)
        bits = math.log2(cmax.max() / np.delete(cmax, outliers).max()) if outliers.size else 0.0
        row = {"tensor": f"{site}:{slot}", "site": site, "slot": slot, "kind": kind, "block": block, "role": role,
               "int8": int8, "max_abs": float(cmax.max()), "p99": 1.0, "p99_9": 1.4, "p99_99": 2.0,
               "max_over_p99_9": float(cmax.max()) / 1.4, "kurtosis": 3.0 + i,
               "n_outlier_channels": int(outliers.size) if has_channels else None,
               "outlier_channels": ";".join(map(str, outliers)) if has_channels else "",
               "outlier_tokens": "0;1;2" if outliers.size else "", "bits_lost": bits if has_channels else math.nan}
        for m, v in (("sqnr_db", 40.0 - 3 * i), ("cosine", 0.999), ("mse", 1e-4), ("rel_l2", 0.01)):
            row[f"isolated_{m}"] = v + (5 if m == "sqnr_db" else 0)
            row[f"acc_{m}"] = v
        acts.append(row)
        if has_channels:
            channels[f"{site}:{slot}"] = cmax
    acts_df = pd.DataFrame(acts, columns=list(ACTIVATION_COLUMNS))
    meta = _meta(images=16, batches=1, outlier_k=6.0)
    write_table(acts_df, out / "errors_activations", meta)
    weights = []
    for site, _, kind, block, role, _ in tensors:
        if kind in ("linear", "conv"):
            weights.append({"site": site, "kind": kind, "block": block, "role": role, "w_min": -0.3, "w_max": 0.25,
                            "per_tensor_sqnr_db": 35.0, "per_channel_sqnr_db": 41.0, "per_channel_gain_db": 6.0})
    write_table(pd.DataFrame(weights, columns=list(WEIGHT_COLUMNS)), out / "errors_weights", meta)
    if with_npz:
        np.savez(out / "errors_channels.npz", **channels)


def write_plan(out: Path) -> None:
    steps = pd.DataFrame([
        {"step": 0, "config": "all", "float_sites": 0, "change": "", "top1": 74.0, "top5": 93.0,
         "top1_drop": 6.0, "agreement": 88.0, "kl": 0.12, "int8_macs_share": 1.0},
        {"step": 1, "config": "plan_1", "float_sites": 1, "change": SITE.format(b=0, op="residual_mlp"),
         "top1": 78.0, "top5": 94.0, "top1_drop": 2.0, "agreement": 95.0, "kl": 0.02,
         "int8_macs_share": 1.0},
        {"step": 2, "config": "plan_2", "float_sites": 2, "change": SITE.format(b=1, op="mlp.fc2"),
         "top1": 79.6, "top5": 95.0, "top1_drop": 0.4, "agreement": 98.0, "kl": 0.005,
         "int8_macs_share": 0.93},
    ])
    write_table(steps, out / "plan_steps", _meta(images=100, wall_s=12.0))
    (out / "plan.yaml").write_text(
        "name: planned\nfloat_kinds:\n- layernorm\n- gelu\n- softmax\nfloat_sites:\n"
        f"- {SITE.format(b=0, op='residual_mlp')}\n- {SITE.format(b=1, op='mlp.fc2')}\noverrides: {{}}\n")


@pytest.fixture
def full(tmp_path: Path) -> Path:
    write_eval(tmp_path)
    write_sensitivity(tmp_path, "only")
    write_sensitivity(tmp_path, "all-but")
    write_errors(tmp_path)
    write_plan(tmp_path)
    return tmp_path


# -- HTML inspection -------------------------------------------------------------------
class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


def parse(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = Tags()
    p.feed(html)
    return p.tags


NOTE = "Not available"


# -- (a) rendering -----------------------------------------------------------------------
def test_full_report_renders_self_contained(full: Path):
    path = render_report(full)
    assert path == full / "report.html"
    html = path.read_text()
    tags = parse(html)
    assert 'id="accuracy-table"' in html
    for name in ("fp32", "all", "mixed_1", "planned"):
        assert f">{name}<" in html
    # Nothing is fetched: no remote reference in any attribute, no external script/style/font.
    for tag, attrs in tags:
        for key, value in attrs.items():
            assert not re.search(r"https?://|^//", value or ""), (tag, key, (value or "")[:80])
        assert tag != "link", attrs
        if tag == "script":
            assert "src" not in attrs
    assert "http://" not in html and "https://" not in html  # we write no URL anywhere
    assert "@import" not in html and "url(" not in html
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert len(images) >= 7  # 2 sensitivity, depth, heatmap, channel maxima, weights, planner
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "PNG" and img.width > 300 and img.height > 150
        assert attrs.get("alt")
    assert NOTE not in html  # every section has its artefact
    for section in ("accuracy", "skiplist", "planner", "summary", "sensitivity", "depth", "outliers", "weights"):
        assert f'<section id="{section}">' in html


def test_accuracy_table_on_top_with_planner_row_and_units(full: Path):
    html = render_report(full).read_text()
    sections = re.findall(r'<section id="([^"]+)"', html)
    assert sections[0] == "accuracy"
    table = html[html.index('id="accuracy-table"'):]
    table = table[:table.index("</table>")]
    assert 'class="plan-row"' in table and ">planned<" in table and "planner, step 2" in table
    assert ">∞<" in table  # FP32's logit SQNR, stored as "inf" in the JSON
    assert "93.0" in table  # int8 linear FLOPs share 0.93 shown as %
    for unit in ("top-1 (%)", "top-1 drop (pp)", "KL (nats)", "logit SQNR (dB)"):
        assert unit in table


def test_skiplist_yaml_is_copy_ready(full: Path):
    html = render_report(full).read_text()
    m = re.search(r'<pre id="skiplist-yaml">(.*?)</pre>', html, re.S)
    assert m
    import yaml
    from html import unescape
    data = yaml.safe_load(unescape(m.group(1)))
    assert data["float_sites"] == [SITE.format(b=0, op="residual_mlp"), SITE.format(b=1, op="mlp.fc2")]
    assert 'class="copy" data-target="skiplist-yaml"' in html
    assert "<b>2</b> site(s) float" in html


def test_long_tables_are_sortable_and_have_raw_sort_values(full: Path):
    html = render_report(full).read_text()
    for table_id in ("sens-only-op", "sens-all_but-op", "plan-table", "outlier-table", "activations-table"):
        if table_id == "plan-table":
            continue  # three steps: short tables are not sortable
        assert re.search(rf'<table id="{table_id}" class="data sortable"', html), table_id
    assert 'data-v="Infinity"' in html  # inf sorts as a number
    assert "addEventListener(\"click\"" in html


def test_missing_artefacts_give_notes_naming_commands(tmp_path: Path):
    write_eval(tmp_path)
    html = render_report(tmp_path).read_text()
    assert 'id="accuracy-table"' in html and ">mixed_1<" in html
    notes = re.findall(r'<p class="missing">(.*?)</p>', html, re.S)
    text = " ".join(notes)
    assert "sensitivity_*.json" in text and "vitq sensitivity" in text and "--mode all-but" in text
    assert "errors_activations.json" in text and "vitq errors" in text
    assert "errors_weights.json" in text
    assert "plan.yaml" in text and "plan_steps.json" in text
    assert "<img" not in html


def test_partial_artefacts(tmp_path: Path):
    write_sensitivity(tmp_path, "only")
    write_errors(tmp_path, with_npz=False)
    html = render_report(tmp_path).read_text()
    assert 'id="accuracy-table"' in html  # present even without eval.json (empty, with a note)
    assert "no eval.json" in html
    assert "sensitivity_all_but_*.json" in html  # the other mode is announced as missing
    assert "errors_channels.npz" in html  # heatmap note
    assert html.count("<img") == 3  # sensitivity, depth, weights


def test_empty_folder(tmp_path: Path):
    html = render_report(tmp_path).read_text()
    assert 'id="accuracy-table"' in html
    assert html.count(NOTE) >= 6


def test_unreadable_artefact_becomes_a_warning(tmp_path: Path):
    write_eval(tmp_path)
    (tmp_path / "errors_activations.json").write_text("{not json")
    html = render_report(tmp_path).read_text()
    assert "could not read errors_activations.json" in html
    assert ">mixed_1<" in html


def test_values_are_escaped(tmp_path: Path):
    write_eval(tmp_path)
    (tmp_path / "plan.yaml").write_text("name: x\nfloat_sites:\n- '<script>alert(1)</script>'\n")
    html = render_report(tmp_path, title="<b>t</b>").read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert "<b>t</b>" not in html


def test_mismatched_runs_are_flagged(tmp_path: Path):
    write_eval(tmp_path)
    write_sensitivity(tmp_path)
    data = json.loads((tmp_path / "sensitivity_only_op.json").read_text())
    data["meta"]["model"] = "/models/other"
    (tmp_path / "sensitivity_only_op.json").write_text(json.dumps(data))
    html = render_report(tmp_path).read_text()
    assert "do not all come from the same settings" in html and "/models/other" in html


def test_deterministic(full: Path):
    first = render_report(full).read_bytes()
    assert render_report(full).read_bytes() == first


def test_figures_are_png_with_fixed_size():
    df = _sens_rows("only")
    a, b = figures.sensitivity_bars(df, "only"), figures.sensitivity_bars(df, "only")
    assert a == b and a[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"Software" not in a and figures.data_uri(a).startswith("data:image/png;base64,")
    assert figures.short_name("vit.layers.3.attention.k_proj") == "b3 attention.k_proj"
    assert figures.short_name("dinov2.encoder.layer.11.mlp.fc2") == "b11 mlp.fc2"


# -- (b) a real browser --------------------------------------------------------------------
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


@needs_chromium
def test_browser_screenshot(full: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    report = render_report(full)
    shot = tmp / "shot.png"
    proc = _run_chromium(tmp, report.resolve().as_uri(), f"--screenshot={shot}", "--window-size=1280,2000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    assert img.getcolors(maxcolors=64) is None  # far more than a handful of colours: something was drawn
    assert not _console_lines(proc.stderr), _console_lines(proc.stderr)


@needs_chromium
def test_browser_dom_has_no_js_errors_and_tables_sort(full: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    report = render_report(full)
    proc = _run_chromium(tmp, report.resolve().as_uri() + "#selftest", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'id="accuracy-table"' in dom and ">planned<" in dom
    assert re.search(r'<body\b[^>]*data-report-ready="1"', dom)  # the main script ran to its end
    assert not _js_error_count(dom), _js_error_count(dom)  # no error event, rejection or console.error
    assert not _console_lines(proc.stderr), _console_lines(proc.stderr)
    m = re.search(r'data-selftest="([^"]*)"', dom)
    assert m and m.group(1).startswith("ok "), m and m.group(1)
    assert int(m.group(1).split()[1]) > 20  # several sortable tables, every column both ways


@needs_chromium
def test_browser_error_detection_works(full: Path, tmp_path_factory):
    """Negative control: a page with a failing script trips both detectors."""
    tmp = tmp_path_factory.mktemp("chromium")
    html = render_report(full).read_text()
    bad = tmp / "bad.html"
    bad.write_text(html.replace("</body>", "<script>undefinedFunctionXyz();</script></body>"))
    proc = _run_chromium(tmp, bad.as_uri(), "--dump-dom")
    assert _js_error_count(proc.stdout) == 1
    assert any("undefinedFunctionXyz" in line for line in _console_lines(proc.stderr))
