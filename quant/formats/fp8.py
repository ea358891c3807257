"""``fp8``: FP8 E4M3 weights and activations (``scale = amax / 448``; weights per output
channel or per tensor as the config's ``weight.per_channel`` says, activations per
tensor), simulated by rounding through ``torch.float8_e4m3fn``."""

from __future__ import annotations

from dataclasses import replace

from ..quantizer import QuantSpec
from .base import Format, register_format


@register_format("fp8")
class FP8(Format):
    weight_bits = 8
    activation_bits = 8
    description = "FP8 E4M3 weights and activations"

    def activation(self, spec: QuantSpec) -> QuantSpec:
        return replace(spec, bits=8, symmetric=True, encoding="e4m3", group_size=None)

    def weight(self, spec: QuantSpec) -> QuantSpec:
        return replace(spec, bits=8, symmetric=True, encoding="e4m3", group_size=None)
