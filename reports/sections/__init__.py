"""The report's sections, one module each; importing this package registers every
module in it with :func:`reports.registry.register_section`, so a new section is one
new file here (and its test)."""

from __future__ import annotations

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
