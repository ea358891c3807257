"""``float``: the site stays float (as a ``float_sites`` entry would keep it)."""

from __future__ import annotations

from ..quantizer import QuantSpec
from .base import FLOAT_BITS, Format, register_format


@register_format("float")
class Float(Format):
    weight_bits = FLOAT_BITS
    activation_bits = FLOAT_BITS
    description = "float (no quantization)"

    def activation(self, spec: QuantSpec) -> None:
        return None

    def weight(self, spec: QuantSpec) -> None:
        return None
