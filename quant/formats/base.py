"""The format base class and its registry (see the package docstring)."""

from __future__ import annotations

from typing import ClassVar

from ..quantizer import QuantSpec
from ..registry import registrar
from ..sites import Site

FLOAT_BITS = 32  # what a float tensor counts in bit-based costs (AIMET's BitOps convention)


class Format:
    """One numeric format of a site. Subclasses set the class attributes and override
    :meth:`activation` / :meth:`weight` (the identity: the config's spec as it is)."""

    name: ClassVar[str] = ""
    weight_bits: ClassVar[int] = FLOAT_BITS  # bits of a weight element (FLOAT_BITS: float)
    activation_bits: ClassVar[int] = FLOAT_BITS  # bits of an activation element (FLOAT_BITS: float)
    description: ClassVar[str] = ""

    def activation(self, spec: QuantSpec) -> QuantSpec | None:
        """The spec of an activation slot, from the config's ``spec``; None: float."""
        return spec

    def weight(self, spec: QuantSpec) -> QuantSpec | None:
        """The spec of a weight slot, from the config's ``spec``; None: float."""
        return spec

    @property
    def is_float(self) -> bool:
        """Every tensor of any site stays float."""
        return self.weight_bits == FLOAT_BITS and self.activation_bits == FLOAT_BITS

    def keeps_float(self, site: Site) -> bool:
        """Every tensor of ``site`` stays float in this format (a weight-only format at a
        site without weights: a matmul, a residual add)."""
        return self.activation_bits == FLOAT_BITS and (self.weight_bits == FLOAT_BITS or not site.has_weight())

    def __repr__(self) -> str:
        return f"<format {self.name}>"


# name -> the format's (stateless) instance, in registration order
FORMATS: dict[str, Format] = {}

# ``@register_format("name")``: register a class as format ``name`` (refuses a name taken)
register_format = registrar(FORMATS, "format")


def unregister_format(name: str) -> None:
    """Remove format ``name`` (tests that register a throw-away format clean up with it)."""
    del FORMATS[name]


def format_names() -> list[str]:
    return list(FORMATS)


def get_format(name: str) -> Format:
    """The format called ``name``; KeyError (with the known names) when there is none."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; formats are {', '.join(FORMATS)}") from None
