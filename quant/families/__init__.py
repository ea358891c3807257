"""Family adapters: one module per model family, found through a registry.

``family_of(model)`` returns the adapter (:class:`FamilyAdapter`) that knows the
model's layout; ``quant.model.QuantModel`` does everything else through it.

Adding a family = adding one module here whose adapter class is decorated with
``@register_family("name")`` (usually a subclass of
``hf_common.HFPreNormAdapter`` for a HF pre-norm ViT); the adapter also loads the
family's models (``load``) and builds a tiny random one for the tests (``tiny``), which
run every registered family. Every module of this package is imported below, so no
list needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    REGISTRY,
    SUPPORTED,
    FamilyAdapter,
    ModelLoadError,
    Quantizer,
    Quantizers,
    UnsupportedModelError,
    family_of,
    loader_for,
    register_family,
    unregister_family,
)

__all__ = ["REGISTRY", "SUPPORTED", "FamilyAdapter", "ModelLoadError", "Quantizer", "Quantizers",
           "UnsupportedModelError", "family_of", "loader_for", "register_family", "unregister_family"]

# Import every module of the package so its @register_family runs (sorted: a stable
# registry order whatever the file system lists first).
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
del _module
