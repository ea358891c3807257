"""``a16w8``: 16-bit integer activations, int8 weights (the 16x8 mode of LiteRT and
edge NPUs for outlier-heavy tensors such as residual adds)."""

from __future__ import annotations

from dataclasses import replace

from ..quantizer import QuantSpec
from .base import Format, register_format


@register_format("a16w8")
class A16W8(Format):
    weight_bits = 8
    activation_bits = 16
    description = "int16 activations, int8 weights"

    def activation(self, spec: QuantSpec) -> QuantSpec:
        return replace(spec, bits=16, encoding="int")
