"""Export targets: a plan written in a deployment tool's own terms (``vitq export --to TOOL``).

A target (:class:`Target`) resolves every site of the model to the operator's name in
the tool's own graph of this model (never guessed from name patterns), writes the tool's
arguments as JSON and as the Python call that applies them (:class:`TargetExport`), and
lists every site with what the tool is told to do with it; a site the tool cannot carry
as the plan says is listed with the reason, never dropped. :meth:`Target.apply` runs the
tool's own quantizer on the exported arguments (``scripts/crosscheck.py``).

Adding a target = adding one module here whose class is decorated with
``@register_target("name")``; every module of this package is imported below, so no list
needs editing. Tools are imported only inside a target's methods: a missing one is a
one-line :class:`TargetError` naming what to install.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (EXCLUDE, NONE, QUANTIZE, TARGETS, Applied, ExportContext, SiteRow, Target, TargetError,
                   TargetExport, get_target, register_target, unregister_target)

__all__ = ["EXCLUDE", "NONE", "QUANTIZE", "TARGETS", "Applied", "ExportContext", "SiteRow", "Target", "TargetError",
           "TargetExport", "get_target", "register_target", "unregister_target"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")
del _module
