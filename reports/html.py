"""One self-contained HTML report from whatever artefacts an output folder holds.

``render_report(out_dir)`` reads every artefact through :mod:`analysis.artifacts`
(the schema the writers use: file names, columns, meta keys, run keys and the command
that writes each one), builds every section registered under ``reports/sections/``
(:mod:`reports.registry`), and writes ``out_dir/report.html``: figures inlined as base64
PNG, inline CSS, a small inline script for sortable tables and the copy button; no
external URL, CDN or font. A section whose artefact is missing is replaced by a short
note naming the command that produces it. Nothing time-dependent goes in, so the same
artefacts give the same bytes.

    python -m reports.html OUT_DIR [--title TITLE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from analysis import artifacts
from quant.store import atomic_write_text

from . import sections  # noqa: F401 (registers every section)
from .format import fmt_text, is_missing
from .reader import Artefacts
from .registry import build_sections
from .sections.summary import run_context

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_MODEL_TAIL = ("vitq", "default", "model")  # the embedded default's folder ...
DEFAULT_MODEL_NAME = "tiny-vit-fashion"  # ... and its name (as vitq names its output folder)
FACTS = ("model", "family", "data", "seed")  # shown under the title


def _environment() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def model_name(model: Any) -> str:
    """What the report calls a model: the embedded default by its name
    (tiny-vit-fashion), a local folder by its last component, a hub id whole."""
    text = str(model).rstrip("/")
    parts = Path(text).parts
    if tuple(parts[-len(DEFAULT_MODEL_TAIL):]) == DEFAULT_MODEL_TAIL:
        return DEFAULT_MODEL_NAME
    hub_id = len(parts) == 2 and not text.startswith((".", "/", "~")) and not Path(text).exists()
    return text if hub_id or not parts else parts[-1]


def build_context(out_dir: Path, title: str | None = None) -> dict[str, Any]:
    a = Artefacts(out_dir)
    built = build_sections(a)
    first = run_context(a)
    facts = [(key, fmt_text(first[key])) for key in FACTS if not is_missing(first.get(key))]
    name = model_name(first["model"]) if not is_missing(first.get("model")) else out_dir.resolve().name
    plan = a.plan
    verdict = plan.meta["verdict"] if plan is not None and not is_missing(plan.meta["verdict"]) else None
    return {"title": title or name, "subtitle": "INT8 post-training quantization report", "facts": facts,
            "verdict": verdict, "sections": built, "warnings": a.warnings, "out_dir": str(out_dir)}


def render_report(out_dir: Path, *, title: str | None = None) -> Path:
    """Write ``out_dir/report.html`` from the artefacts found there; return its path."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no such output folder: {out_dir}")
    html = _environment().get_template("report.html.j2").render(**build_context(out_dir, title))
    path = out_dir / artifacts.REPORT
    atomic_write_text(path, html)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.html", description="Write OUT_DIR/report.html.")
    p.add_argument("out_dir", type=Path, help="a folder the vitq commands wrote")
    p.add_argument("--title")
    args = p.parse_args(argv)
    try:
        print(render_report(args.out_dir, title=args.title))
    except FileNotFoundError as e:
        print(f"reports: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
