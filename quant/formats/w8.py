"""``w8``: weight-only int8 (the weights int8 as the config says, activations float)."""

from __future__ import annotations

from ..quantizer import QuantSpec
from .base import FLOAT_BITS, Format, register_format


@register_format("w8")
class W8(Format):
    weight_bits = 8
    activation_bits = FLOAT_BITS
    description = "weight-only int8, float activations"

    def activation(self, spec: QuantSpec) -> None:
        return None
