"""Quantization sites: the tensors a backend would quantize, with stable names.

A site is one operator; its *slots* are the tensors that become int8 when the site
is quantized: a Linear/Conv quantizes its input and weight, a matmul both inputs,
a residual add / softmax / GELU / LayerNorm its output. Names come from the module
path (``vit.layers.4.mlp.fc2``); operators without a module are named after their
owner (``vit.layers.4.attention.matmul_qk``, ``vit.layers.4.residual_mlp``).
Which sites a model has is the business of its family adapter (``quant.families``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .families import FamilyAdapter

KINDS = ("conv", "linear", "matmul_qk", "softmax", "matmul_av", "residual", "layernorm", "gelu")
SLOTS = {
    "conv": ("input", "weight"),
    "linear": ("input", "weight"),
    "matmul_qk": ("q", "k"),
    "matmul_av": ("probs", "v"),
    "residual": ("output",),
    "softmax": ("output",),
    "gelu": ("output",),
    "layernorm": ("output",),
}


@dataclass(frozen=True)
class Site:
    name: str
    kind: str
    block: int | None  # index of the transformer block, None outside the encoder
    role: str  # what it is inside its block: q, k, v, o, fc1, fc2, norm1, ..., head

    @property
    def slots(self) -> tuple[str, ...]:
        return SLOTS[self.kind]

    def has_weight(self) -> bool:
        return "weight" in self.slots


def discover_sites(model: nn.Module, family: FamilyAdapter | None = None) -> list[Site]:
    """All sites of ``model`` in execution order; the family adapter decides them
    (kept as a shortcut for ``family_of(model).sites(model)``)."""
    from .families import family_of  # the adapters import this module: import late

    return (family or family_of(model)).sites(model)
