"""Numeric formats a site can take: one module per format, found through a registry.

A format (:class:`Format`) says what the slots of a site become: the activation spec
and the weight spec it derives from the config's own specs (observers, symmetry,
granularity and overrides stay the config's; the format sets the bit width and the
encoding), ``None`` for a slot it keeps float, and the bits a cost function counts.
``QuantConfig.formats`` maps site names, globs or kinds to format names.

Adding a format = adding one module here whose class is decorated with
``@register_format("name")``; every module of this package is imported below, so no
list needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import FORMATS, Format, format_names, get_format, register_format, unregister_format

__all__ = ["FORMATS", "Format", "format_names", "get_format", "register_format", "unregister_format"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
del _module
