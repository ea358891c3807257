"""``w4a8``: int4 weights (per output channel, or group-wise with the config's
``weight.group_size``, e.g. 32/64/128), int8 activations."""

from __future__ import annotations

from dataclasses import replace

from ..quantizer import QuantSpec
from .base import Format, register_format


@register_format("w4a8")
class W4A8(Format):
    weight_bits = 4
    activation_bits = 8
    description = "int4 weights (per channel or group-wise), int8 activations"

    def weight(self, spec: QuantSpec) -> QuantSpec:
        return replace(spec, bits=4, encoding="int")
