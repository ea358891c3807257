"""What HF ViT, DeiT and DINOv2 share: a pre-norm encoder with eager attention.

The three families differ only in attribute names, in what a block does to a
branch before its residual add, and in the head; :class:`HFPreNormAdapter` does
the rest (sites, instrumentation, embed/blocks/head) and subclasses fill in those
differences as class attributes and small overrides. Written against
transformers 5.x module names (``q_proj``, ``o_proj``, ``mlp.fc1``, ``mlp.fc2``).
"""

from __future__ import annotations

import types
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from ..sites import Site
from .base import FamilyAdapter, Quantizer, Quantizers, hook_output, patch_weighted

ATTENTION = "vitq_eager"


def _vitq_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention with the two matmuls and softmax made visible."""
    q = module._vitq
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn = torch.matmul(q["matmul_qk"]["q"](query), q["matmul_qk"]["k"](key).transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn = attn + attention_mask
    attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(query.dtype)
    attn = q["softmax"]["output"](attn)
    attn = F.dropout(attn, p=dropout, training=module.training)
    out = torch.matmul(q["matmul_av"]["probs"](attn), q["matmul_av"]["v"](value))
    return out.transpose(1, 2).contiguous(), attn


AttentionInterface.register(ATTENTION, _vitq_attention)


class HFPreNormAdapter(FamilyAdapter):
    """A HF classifier ``model.<backbone>`` with ``embeddings``, a list of pre-norm
    blocks (``norm1 -> attention -> post_attn -> +``, ``norm2 -> mlp -> post_mlp -> +``)
    and a final ``layernorm``; the classifier heads are the model's Linear children."""

    backbone_attr: str = ""  # attribute of the classifier holding the backbone
    layers_path: str = "layers"  # dotted path of the block ModuleList inside the backbone
    norm1: str = "layernorm_before"
    norm2: str = "layernorm_after"
    final_norm: str = "layernorm"
    special_tokens: int = 1  # CLS (+ distillation token, registers, ...)

    # -- what differs between families -----------------------------------
    def post_attn(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """What a block does to the attention output before the residual add."""
        return layer.dropout(h)

    def post_mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """What a block does to the MLP output before the residual add."""
        return layer.dropout(h)

    def classify(self, model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
        """Final-norm output -> logits; default: the classifier on the CLS token."""
        return model.classifier(seq[:, 0, :])

    # -- layout ----------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.backbone_attr)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).get_submodule(self.layers_path)

    def sites(self, model: nn.Module) -> list[Site]:
        names = {module: name for name, module in model.named_modules()}
        backbone = self.backbone(model)
        sites = [Site(names[backbone.embeddings.patch_embeddings.projection], "conv", None, "patch_embed")]
        for i, layer in enumerate(self.blocks(model)):
            at, mlp, path = layer.attention, layer.mlp, names[layer]
            sites += [
                Site(names[getattr(layer, self.norm1)], "layernorm", i, "norm1"),
                Site(names[at.q_proj], "linear", i, "q"),
                Site(names[at.k_proj], "linear", i, "k"),
                Site(names[at.v_proj], "linear", i, "v"),
                Site(f"{names[at]}.matmul_qk", "matmul_qk", i, "matmul_qk"),
                Site(f"{names[at]}.softmax", "softmax", i, "softmax"),
                Site(f"{names[at]}.matmul_av", "matmul_av", i, "matmul_av"),
                Site(names[at.o_proj], "linear", i, "o"),
                Site(f"{path}.residual_attn", "residual", i, "residual_attn"),
                Site(names[getattr(layer, self.norm2)], "layernorm", i, "norm2"),
                Site(names[mlp.fc1], "linear", i, "fc1"),
                Site(f"{names[mlp]}.gelu", "gelu", i, "gelu"),
                Site(names[mlp.fc2], "linear", i, "fc2"),
                Site(f"{path}.residual_mlp", "residual", i, "residual_mlp"),
            ]
        sites.append(Site(names[getattr(backbone, self.final_norm)], "layernorm", None, "final_norm"))
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                sites.append(Site(name, "linear", None, "head"))
        return sites

    def norm_consumers(self, model: nn.Module, sites: Sequence[Site]) -> dict[str, list[str]]:
        """Pre-norm blocks: ``norm1`` feeds q/k/v, ``norm2`` feeds fc1 (the final norm
        feeds the head through token pooling: not smoothable)."""
        by_block: dict[int, dict[str, str]] = {}
        for s in sites:
            if s.block is not None:
                by_block.setdefault(s.block, {})[s.role] = s.name
        out = {}
        for roles in by_block.values():
            out[roles["norm1"]] = [roles["q"], roles["k"], roles["v"]]
            out[roles["norm2"]] = [roles["fc1"]]
        return out

    # -- instrumentation -------------------------------------------------
    def instrument(self, model: nn.Module, sites: Sequence[Site], quantizers: Quantizers) -> None:
        model.config._attn_implementation = ATTENTION
        for site in sites:
            if site.kind in ("linear", "conv"):
                patch_weighted(model.get_submodule(site.name), site.kind, quantizers[site.name])
            elif site.kind == "layernorm":
                hook_output(model.get_submodule(site.name), quantizers[site.name]["output"])
        for i, layer in enumerate(self.blocks(model)):
            by_role = {s.role: quantizers[s.name] for s in sites if s.block == i}
            hook_output(layer.mlp.activation_fn, by_role["gelu"]["output"])
            layer.attention._vitq = {role: by_role[role] for role in ("matmul_qk", "softmax", "matmul_av")}
            layer.forward = types.MethodType(
                self._block_forward(by_role["residual_attn"]["output"], by_role["residual_mlp"]["output"]), layer)

    def _block_forward(self, res_attn: Quantizer, res_mlp: Quantizer):
        """The pre-norm block forward with both residual adds quantizable."""
        adapter = self

        def forward(layer, hidden_states, attention_mask=None, **kwargs):
            residual = hidden_states
            h = getattr(layer, adapter.norm1)(hidden_states)
            h, _ = layer.attention(h, attention_mask, **kwargs)
            hidden_states = res_attn(adapter.post_attn(layer, h) + residual)
            h = layer.mlp(getattr(layer, adapter.norm2)(hidden_states))
            return res_mlp(adapter.post_mlp(layer, h) + hidden_states)
        return forward

    # -- running ---------------------------------------------------------
    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(model).embeddings(pixel_values)

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block(hidden, None)

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.classify(model, getattr(self.backbone(model), self.final_norm)(hidden))

    # -- shape facts -----------------------------------------------------
    def head_dim(self, model: nn.Module) -> int:
        return model.config.hidden_size // model.config.num_attention_heads

    def num_tokens(self, model: nn.Module) -> int:
        return self.backbone(model).embeddings.patch_embeddings.num_patches + self.special_tokens
