"""Quantization sites: the tensors a backend would quantize, with stable names.

A site is one operator; its *slots* are the tensors that become int8 when the site
is quantized: a Linear/Conv quantizes its input and weight, a matmul both inputs,
a residual add / softmax / GELU / LayerNorm its output. Names come from the module
path (``vit.layers.4.mlp.fc2``); operators without a module are named after their
owner (``vit.layers.4.attention.matmul_qk``, ``vit.layers.4.residual_mlp``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .families import Family

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


def discover_sites(model: nn.Module, family: Family) -> list[Site]:
    """All sites of ``model`` in execution order."""
    names = {module: name for name, module in model.named_modules()}
    backbone = getattr(model, family.backbone)
    sites = [Site(names[backbone.embeddings.patch_embeddings.projection], "conv", None, "patch_embed")]
    for i, layer in enumerate(family.blocks(model)):
        at, mlp, path = layer.attention, layer.mlp, names[layer]
        sites += [
            Site(names[getattr(layer, family.norm1)], "layernorm", i, "norm1"),
            Site(names[at.q_proj], "linear", i, "q"),
            Site(names[at.k_proj], "linear", i, "k"),
            Site(names[at.v_proj], "linear", i, "v"),
            Site(f"{names[at]}.matmul_qk", "matmul_qk", i, "matmul_qk"),
            Site(f"{names[at]}.softmax", "softmax", i, "softmax"),
            Site(f"{names[at]}.matmul_av", "matmul_av", i, "matmul_av"),
            Site(names[at.o_proj], "linear", i, "o"),
            Site(f"{path}.residual_attn", "residual", i, "residual_attn"),
            Site(names[getattr(layer, family.norm2)], "layernorm", i, "norm2"),
            Site(names[mlp.fc1], "linear", i, "fc1"),
            Site(f"{names[mlp]}.gelu", "gelu", i, "gelu"),
            Site(names[mlp.fc2], "linear", i, "fc2"),
            Site(f"{path}.residual_mlp", "residual", i, "residual_mlp"),
        ]
    sites.append(Site(names[backbone.layernorm], "layernorm", None, "final_norm"))
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            sites.append(Site(name, "linear", None, "head"))
    return sites
