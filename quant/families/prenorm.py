"""What every plain (global-attention) pre-norm ViT shares, whatever library holds it.

A block is ``x + post_attn(attn(norm1(x)))`` then ``x + post_mlp(fc2(act(fc1(norm2(x)))))``
with multi-head attention ``o(softmax(q k^T * scale) v)``. :class:`PreNormAdapter` names
the 14 sites of each block canonically (``blocks.4.attn.q``, ``quant.sites.BLOCK_LAYOUT``)
and runs the block as one explicit forward, written here once, in which every slot of
every site is visible; a subclass only says where each part lives in its library
(:meth:`PreNormAdapter.parts`), and where the embedding, final norm and heads are.
The explicit forward computes what the library computes (the float maths is the same
up to float rounding: tests check it against each library's own forward).
"""

from __future__ import annotations

import types
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sites import Site, block_sites
from .base import FamilyAdapter, Quantizers, block_slots, route_outside_blocks

# The modules of a block (``parts``): 9 modules, the rest of the roles are operators.
PART_ROLES = ("norm1", "q", "k", "v", "o", "norm2", "fc1", "act", "fc2")


def parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def block_norm_consumers(sites: Sequence[Site], extra: Sequence[tuple[str, str]] = ()) -> dict[str, list[str]]:
    """Per block: ``norm1`` -> q/k/v, ``norm2`` -> fc1, and each (norm role, Linear role) of
    ``extra`` the block has: the norms whose output only those Linears read."""
    by_block: dict[int, dict[str, str]] = {}
    for s in sites:
        if s.block is not None:
            by_block.setdefault(s.block, {})[s.role] = s.name
    out: dict[str, list[str]] = {}
    for roles in by_block.values():
        out[roles["norm1"]] = [roles["q"], roles["k"], roles["v"]]
        out[roles["norm2"]] = [roles["fc1"]]
        for norm, linear in extra:
            if norm in roles:
                out[roles[norm]] = [roles[linear]]
    return out


def block_paths(names: dict[nn.Module, str], parts: dict[str, nn.Module], block_path: str) -> dict[str, str]:
    """Role -> path in the library for the 14 sites of a block: module paths for the
    modules; the attention operators under the module holding q, the GELU under the
    module holding fc1, the residual adds under the block."""
    paths = {role: names[parts[role]] for role in PART_ROLES if role != "act"}
    attn, mlp = parent(paths["q"]), parent(paths["fc1"])
    paths.update({"matmul_qk": f"{attn}.matmul_qk", "softmax": f"{attn}.softmax", "matmul_av": f"{attn}.matmul_av",
                  "gelu": f"{mlp}.gelu", "residual_attn": f"{block_path}.residual_attn",
                  "residual_mlp": f"{block_path}.residual_mlp"})
    return paths


def attention(slots: dict, q_mod: nn.Module, k_mod: nn.Module, v_mod: nn.Module, o_mod: nn.Module,
              x: torch.Tensor, num_heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention over the token axis of ``x`` (..., T, C) with both matmuls
    and the softmax passing through their quantizers (``slots``: role -> slot -> quantizer);
    ``bias`` (broadcast to (..., H, T, T)) is added to the scaled scores before the softmax
    (Swin's relative position bias and shift mask)."""
    shape = (*x.shape[:-1], num_heads, -1)
    q = q_mod(x).view(shape).transpose(-3, -2)
    k = k_mod(x).view(shape).transpose(-3, -2)
    v = v_mod(x).view(shape).transpose(-3, -2)
    qk, av = slots["matmul_qk"], slots["matmul_av"]
    scores = torch.matmul(qk["q"](q), qk["k"](k).transpose(-2, -1)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    probs = slots["softmax"]["output"](F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
    out = torch.matmul(av["probs"](probs), av["v"](v))
    return o_mod(out.transpose(-3, -2).reshape(*x.shape[:-1], -1))


class PreNormAdapter(FamilyAdapter):
    """A classifier whose blocks are plain pre-norm ViT blocks (see the module docstring)."""

    block_prefix = "blocks"

    # -- where things are (subclasses) ---------------------------------------
    def parts(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The block's modules by role: norm1, q, k, v, o, norm2, fc1, act, fc2."""
        raise NotImplementedError

    def num_heads(self, model: nn.Module) -> int:
        raise NotImplementedError

    def patch_embed(self, model: nn.Module) -> nn.Module:
        """The patch embedding Conv2d."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """(canonical name, Linear) of each classifier head."""
        raise NotImplementedError

    def post_attn(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """What a block does to the attention output before the residual add (dropout:
        identity in eval)."""
        return h

    def post_mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """What a block does to the MLP output before the residual add."""
        return h

    # -- sites -----------------------------------------------------------------
    def sites(self, model: nn.Module) -> list[Site]:
        names = {module: name for name, module in model.named_modules()}
        sites = [Site("patch_embed", "conv", None, "patch_embed", names[self.patch_embed(model)])]
        for i, layer in enumerate(self.blocks(model)):
            sites += block_sites(f"{self.block_prefix}.{i}", i, block_paths(names, self.parts(layer), names[layer]))
        sites.append(Site("norm", "layernorm", None, "final_norm", names[self.final_norm(model)]))
        sites += [Site(name, "linear", None, "head", names[module]) for name, module in self.heads(model)]
        return sites

    def norm_consumers(self, model: nn.Module, sites: Sequence[Site]) -> dict[str, list[str]]:
        """Pre-norm blocks: ``norm1`` feeds q/k/v, ``norm2`` feeds fc1 (the final norm
        feeds the head through token pooling: not smoothable)."""
        return block_norm_consumers(sites)

    # -- instrumentation -------------------------------------------------------
    def instrument(self, model: nn.Module, sites: Sequence[Site], quantizers: Quantizers) -> None:
        route_outside_blocks(model, sites, quantizers)
        heads = self.num_heads(model)
        for i, layer in enumerate(self.blocks(model)):
            layer.forward = types.MethodType(self._block_forward(self.parts(layer), block_slots(sites, quantizers, i), heads),
                                             layer)

    def _block_forward(self, p: dict[str, nn.Module], slots: dict, num_heads: int):
        adapter = self

        def forward(layer, hidden_states, *args, **kwargs):
            x = hidden_states
            h = slots["norm1"]["output"](p["norm1"](x))
            h = attention(slots, p["q"], p["k"], p["v"], p["o"], h, num_heads)
            x = slots["residual_attn"]["output"](adapter.post_attn(layer, h) + x)
            h = slots["norm2"]["output"](p["norm2"](x))
            h = p["fc2"](slots["gelu"]["output"](p["act"](p["fc1"](h))))
            return slots["residual_mlp"]["output"](adapter.post_mlp(layer, h) + x)
        return forward

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block(hidden)
