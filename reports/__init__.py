"""The HTML report: ``render_report(out_dir)`` writes ``out_dir/report.html``.

``python -m reports.html OUT_DIR`` does the same from the shell.
"""

from __future__ import annotations

from typing import Any

__all__ = ["render_report"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m reports.html` does not import the module twice.
    if name == "render_report":
        from .html import render_report
        return render_report
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
