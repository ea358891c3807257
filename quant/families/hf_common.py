"""What HF ViT, DeiT and DINOv2 share: a pre-norm encoder, on transformers 4.40+ or 5.x.

The three families differ only in attribute names, in what a block does to a
branch before its residual add, and in the head; :class:`HFPreNormAdapter` finds
the block's modules under either version's names and leaves the rest to
:class:`~quant.families.prenorm.PreNormAdapter` (canonical sites, the explicit block
forward). transformers 5.x names them ``attention.q_proj`` ... ``attention.o_proj``,
``mlp.fc1``/``mlp.fc2``; 4.x ``attention.attention.query`` ... ``attention.output.dense``
and ``intermediate.dense``/``output.dense`` (ViT, DeiT) or ``mlp.fc1``/``mlp.fc2``
(DINOv2). Both map to the same canonical names (``blocks.4.attn.q``, ``blocks.4.mlp.fc2``);
``Site.path`` keeps the installed version's module path.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import UnsupportedModelError
from .hf_loading import HFLoading
from .prenorm import PreNormAdapter

# The tiny random models of the HF pre-norm families (``tiny``): 2 blocks of width 32 on
# 32 px images in 8 px patches (16 patches), 5 classes; eager attention (the matmuls vitq
# instruments are the ones the library computes)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=5, attn_implementation="eager")

# role -> where the module may live inside a block, transformers 5.x first, then 4.x
PART_PATHS = {
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "o": ("attention.o_proj", "attention.output.dense"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "act": ("mlp.activation_fn", "mlp.activation", "intermediate.intermediate_act_fn"),
    "fc2": ("mlp.fc2", "output.dense"),
}


def find(owner: nn.Module, role: str, candidates: tuple[str, ...]) -> nn.Module:
    """The first of ``candidates`` that is a submodule of ``owner``."""
    for path in candidates:
        try:
            return owner.get_submodule(path)
        except AttributeError:
            continue
    raise UnsupportedModelError(f"{type(owner).__name__}: no {role} module (looked for {', '.join(candidates)}); "
                                f"this transformers version's layout is not supported")


def find_parts(layer: nn.Module, norm1: str, norm2: str, paths: dict = PART_PATHS) -> dict[str, nn.Module]:
    parts = {role: find(layer, role, candidates) for role, candidates in paths.items()}
    parts["norm1"], parts["norm2"] = getattr(layer, norm1), getattr(layer, norm2)
    return parts


class HFPreNormAdapter(HFLoading, PreNormAdapter):
    """A HF classifier ``model.<backbone>`` with ``embeddings``, a list of pre-norm
    blocks and a final ``layernorm``; the classifier heads are the model's Linear children.
    ``tiny`` builds ``model_class(config_class(**TINY, **overrides))``."""

    backbone_attr: str = ""  # attribute of the classifier holding the backbone
    layers_paths: tuple[str, ...] = ("layers", "encoder.layer")  # the block list: 5.x, 4.x
    norm1: str = "layernorm_before"
    norm2: str = "layernorm_after"
    final_norm_attr: str = "layernorm"
    special_tokens: int = 1  # CLS (+ distillation token, registers, ...)
    head_names: dict[str, str] = {"classifier": "head"}  # Linear child -> canonical name
    tiny_classes: tuple[str, str] = ("", "")  # transformers' (config class, model class) of ``tiny``
    tiny_defaults: dict = {}  # the family's own departures from TINY

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> nn.Module:
        import transformers

        config_class, model_class = (getattr(transformers, name) for name in cls.tiny_classes)
        torch.manual_seed(seed)
        return model_class(config_class(**{**TINY, **cls.tiny_defaults, **overrides})).eval()

    # -- what differs between families -----------------------------------
    def post_attn(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        drop = getattr(layer, "dropout", None)  # 5.x; 4.x drops inside the attention output
        return drop(h) if drop is not None else h

    post_mlp = post_attn

    def classify(self, model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
        """Final-norm output -> logits; default: the classifier on the CLS token."""
        return model.classifier(seq[:, 0, :])

    # -- layout ----------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.backbone_attr)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return find(self.backbone(model), "block list", self.layers_paths)

    def parts(self, layer: nn.Module) -> dict[str, nn.Module]:
        return find_parts(layer, self.norm1, self.norm2)

    def num_heads(self, model: nn.Module) -> int:
        return model.config.num_attention_heads

    def patch_embed(self, model: nn.Module) -> nn.Module:
        return self.backbone(model).embeddings.patch_embeddings.projection

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.backbone(model), self.final_norm_attr)

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        return [(self.head_names.get(name, name), module) for name, module in model.named_children()
                if isinstance(module, nn.Linear)]

    # -- running ---------------------------------------------------------
    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(model).embeddings(pixel_values)

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.classify(model, self.final_norm(model)(hidden))

    # -- shape facts -----------------------------------------------------
    def head_dim(self, model: nn.Module) -> int:
        return model.config.hidden_size // model.config.num_attention_heads

    def num_tokens(self, model: nn.Module) -> int:
        return self.backbone(model).embeddings.patch_embeddings.num_patches + self.special_tokens
