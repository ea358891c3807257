"""``int8``: today's W8A8, the config's own specs as they are (int8 weights per output
channel, uint8 activations per tensor by default)."""

from __future__ import annotations

from .base import Format, register_format


@register_format("int8")
class Int8(Format):
    weight_bits = 8
    activation_bits = 8
    description = "int8 weights and activations (W8A8)"
