"""Quantization sites: the tensors a backend would quantize, with stable names.

A site is one operator; its *slots* are the tensors that become int8 when the site
is quantized: a Linear/Conv quantizes its input and weight, a matmul both inputs,
a residual add / softmax / GELU / LayerNorm its output.

Every site has two names. ``name`` is canonical: the same for one architecture
whatever library or library version holds it (``blocks.4.attn.q``,
``blocks.4.attn.matmul_qk``, ``blocks.4.mlp.fc2``, ``blocks.4.residual_mlp``,
``patch_embed``, ``norm``, ``head``; Swin: ``stages.2.blocks.1.attn.q``,
``stages.0.downsample``), so a config or skip-list written on one machine applies on
another and to the same architecture from another library. ``path`` is where the
operator lives in the installed library: its module path (``vit.layers.4.mlp.fc2``
on transformers 5.x, ``vit.encoder.layer.4.output.dense`` on 4.x,
``encoder.layers.encoder_layer_4.mlp.3`` in torchvision), or for an operator without
a module its owner's path and its role (``vit.layers.4.attention.matmul_qk``).
Configs accept both (``quant.config``). Which sites a model has is the business of
its family adapter (``quant.families``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    name: str  # canonical name (library-independent): blocks.4.attn.q
    kind: str
    block: int | None  # index of the transformer block (running over Swin's stages), None outside
    role: str  # what it is inside its block: q, k, v, o, fc1, fc2, norm1, ..., head
    path: str = ""  # module path in the installed library (default: the name)

    def __post_init__(self) -> None:
        if not self.path:
            object.__setattr__(self, "path", self.name)

    @property
    def slots(self) -> tuple[str, ...]:
        return SLOTS[self.kind]

    def has_weight(self) -> bool:
        return "weight" in self.slots


# The 14 sites of a pre-norm transformer block, in execution order:
# (role, kind, canonical name under the block's prefix).
BLOCK_LAYOUT = (
    ("norm1", "layernorm", "norm1"),
    ("q", "linear", "attn.q"),
    ("k", "linear", "attn.k"),
    ("v", "linear", "attn.v"),
    ("matmul_qk", "matmul_qk", "attn.matmul_qk"),
    ("softmax", "softmax", "attn.softmax"),
    ("matmul_av", "matmul_av", "attn.matmul_av"),
    ("o", "linear", "attn.o"),
    ("residual_attn", "residual", "residual_attn"),
    ("norm2", "layernorm", "norm2"),
    ("fc1", "linear", "mlp.fc1"),
    ("gelu", "gelu", "mlp.gelu"),
    ("fc2", "linear", "mlp.fc2"),
    ("residual_mlp", "residual", "residual_mlp"),
)
BLOCK_ROLES = tuple(role for role, _, _ in BLOCK_LAYOUT)


def block_sites(prefix: str, block: int, paths: dict[str, str]) -> list[Site]:
    """The 14 sites of one block: canonical names under ``prefix`` (``blocks.4``),
    ``paths`` maps each role to its path in the installed library."""
    return [Site(f"{prefix}.{suffix}", kind, block, role, paths[role]) for role, kind, suffix in BLOCK_LAYOUT]

