"""``w4``: weight-only int4 (per output channel or group-wise with ``weight.group_size``),
float activations."""

from __future__ import annotations

from dataclasses import replace

from ..quantizer import QuantSpec
from .base import FLOAT_BITS, Format, register_format


@register_format("w4")
class W4(Format):
    weight_bits = 4
    activation_bits = FLOAT_BITS
    description = "weight-only int4, float activations"

    def activation(self, spec: QuantSpec) -> None:
        return None

    def weight(self, spec: QuantSpec) -> QuantSpec:
        return replace(spec, bits=4, encoding="int")
