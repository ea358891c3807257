"""Swin Transformer (HF ``SwinForImageClassification``), transformers 4.40+ and 5.x.

Swin's blocks are pre-norm blocks with the same 14 sites as ViT's, but attention runs
inside (shifted) windows with a relative position bias (plus, in shifted blocks, the
shift mask) added to the scores before the softmax, and stages end with a patch
merging (LayerNorm over 2x2 neighbouring tokens concatenated, then a Linear halving
the width). Sites, canonically named by stage:

- ``patch_embed`` (conv) and ``patch_embed.norm`` (its LayerNorm);
- ``stages.S.blocks.J.<role>``: the 14 block sites (``attn.q`` ... ``residual_mlp``),
  ``Site.block`` being the running block index over all stages (Swin-T: 0..11);
- ``stages.S.downsample.norm`` and ``stages.S.downsample`` (the patch-merging Linear),
  in the block of the stage's last block (it runs as part of it, see below);
- ``norm`` (final LayerNorm, before mean pooling) and ``head``.

The forward is split as analyses need it (restart at any block): the token sequence
between blocks is (batch, tokens, channels) at the block's stage resolution, and the
last block of a stage applies the stage's patch merging, so the next block receives
the next stage's sequence. The block forward is written out explicitly (window
partition, cyclic shift, padding, bias, both matmuls, softmax, residual adds visible),
equal to the library's up to float rounding.
"""

from __future__ import annotations

import types
from typing import Sequence

import torch
from torch import nn

from ..sites import Site, block_sites
from .base import FamilyAdapter, Quantizers, UnsupportedModelError, block_slots, register_family, route_outside_blocks
from .hf_common import find_parts
from .hf_loading import HFLoading
from .prenorm import attention, block_norm_consumers, block_paths

# role -> where the module may live inside a SwinLayer: transformers 5.x, then 4.x
SWIN_PARTS = {
    "q": ("attention.q_proj", "attention.self.query"),
    "k": ("attention.k_proj", "attention.self.key"),
    "v": ("attention.v_proj", "attention.self.value"),
    "o": ("attention.o_proj", "attention.output.dense"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "act": ("mlp.activation_fn", "intermediate.intermediate_act_fn"),
    "fc2": ("mlp.fc2", "output.dense"),
}


def _window_ops():
    from transformers.models.swin.modeling_swin import window_partition, window_reverse
    return window_partition, window_reverse


def relative_position_bias(layer: nn.Module, q_owner: nn.Module) -> torch.Tensor:
    """(1, heads, N, N): the block's relative position bias over one window of N tokens."""
    rpb = getattr(layer.attention, "relative_position_bias", None)
    if isinstance(rpb, nn.Module):  # 5.x
        return rpb()
    table, index = q_owner.relative_position_bias_table, q_owner.relative_position_index  # 4.x
    n = index.shape[-1]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


# The tiny random Swin (``Swin.tiny``): 8x8 patch grid, two stages (2 blocks each) joined by a
# patch merging; window 2 gives shifted windows with the shift mask in the odd blocks
TINY = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2,
            num_labels=5)


@register_family("swin")
class Swin(HFLoading, FamilyAdapter):
    model_classes = ("SwinForImageClassification",)

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> nn.Module:
        """A random tiny Swin with a random (not zero) relative position bias, so a forward
        that dropped it would differ."""
        from transformers import SwinConfig, SwinForImageClassification

        torch.manual_seed(seed)
        model = SwinForImageClassification(SwinConfig(**{**TINY, **overrides})).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "relative_position_bias_table" in name:
                    p.normal_(0, 1)
        return model

    def check(self, model: nn.Module) -> None:
        if not isinstance(model.classifier, nn.Linear):
            raise UnsupportedModelError("Swin without a classifier head (num_labels 0) is not supported")

    def restructure(self, model: nn.Module) -> None:
        """Mark each block with its stage's token grid and, for a stage's last block, the
        patch merging that follows it (plain attributes: no module is re-registered)."""
        grid = tuple(model.swin.embeddings.patch_grid)
        for stage in model.swin.encoder.layers:
            for j, layer in enumerate(stage.blocks):
                last = j == len(stage.blocks) - 1
                layer.__dict__["_vitq_swin"] = {"dims": grid, "downsample": stage.downsample if last else None}
            if stage.downsample is not None:
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)

    # -- layout ------------------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        return model.swin

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [layer for stage in model.swin.encoder.layers for layer in stage.blocks]

    def parts(self, layer: nn.Module) -> dict[str, nn.Module]:
        return find_parts(layer, "layernorm_before", "layernorm_after", SWIN_PARTS)

    def sites(self, model: nn.Module) -> list[Site]:
        names = {module: name for name, module in model.named_modules()}
        emb = model.swin.embeddings
        sites = [Site("patch_embed", "conv", None, "patch_embed", names[emb.patch_embeddings.projection]),
                 Site("patch_embed.norm", "layernorm", None, "patch_norm", names[emb.norm])]
        g = 0
        for s, stage in enumerate(model.swin.encoder.layers):
            for j, layer in enumerate(stage.blocks):
                paths = block_paths(names, self.parts(layer), names[layer])
                sites += block_sites(f"stages.{s}.blocks.{j}", g, paths)
                g += 1
            if stage.downsample is not None:
                ds = stage.downsample
                sites += [Site(f"stages.{s}.downsample.norm", "layernorm", g - 1, "downsample_norm", names[ds.norm]),
                          Site(f"stages.{s}.downsample", "linear", g - 1, "downsample", names[ds.reduction])]
        sites += [Site("norm", "layernorm", None, "final_norm", names[model.swin.layernorm]),
                  Site("head", "linear", None, "head", names[model.classifier])]
        return sites

    def norm_consumers(self, model: nn.Module, sites: Sequence[Site]) -> dict[str, list[str]]:
        """``norm1`` feeds q/k/v (window partition, shift and zero padding commute with a
        per-channel scale), ``norm2`` feeds fc1, a patch merging's norm its Linear."""
        return block_norm_consumers(sites, [("downsample_norm", "downsample")])

    # -- instrumentation -----------------------------------------------------------
    def instrument(self, model: nn.Module, sites: Sequence[Site], quantizers: Quantizers) -> None:
        self.restructure(model)
        route_outside_blocks(model, sites, quantizers)
        for i, layer in enumerate(self.blocks(model)):
            layer.forward = types.MethodType(self._block_forward(self.parts(layer), block_slots(sites, quantizers, i)), layer)

    def _block_forward(self, p: dict[str, nn.Module], slots: dict):
        window_partition, window_reverse = _window_ops()
        q_owner = None

        def forward(layer, hidden_states, input_dimensions, *args, **kwargs):
            nonlocal q_owner
            if q_owner is None:
                q_owner = next(m for m in layer.modules() if getattr(m, "num_attention_heads", None)
                               and any(c is p["q"] for c in m.children()))
            layer.set_shift_and_window_size(input_dimensions)
            height, width = input_dimensions
            batch, _, channels = hidden_states.shape
            ws, shift = int(layer.window_size), int(layer.shift_size)
            x = hidden_states
            h = slots["norm1"]["output"](p["norm1"](x)).view(batch, height, width, channels)
            h, pad = layer.maybe_pad(h, height, width)
            _, hp, wp, _ = h.shape
            if shift > 0:
                h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            windows = window_partition(h, ws).view(-1, ws * ws, channels)
            bias = relative_position_bias(layer, q_owner)
            mask = layer.get_attn_mask(hp, wp, dtype=h.dtype, device=h.device)
            if mask is not None:  # (windows, N, N): the shift mask, per window of every image
                bias = (bias + mask.to(bias.dtype).unsqueeze(1)).repeat(batch, 1, 1, 1)
            out = attention(slots, p["q"], p["k"], p["v"], p["o"], windows, q_owner.num_attention_heads, bias)
            out = window_reverse(out.view(-1, ws, ws, channels), ws, hp, wp)
            if shift > 0:
                out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
            if pad[3] > 0 or pad[5] > 0:
                out = out[:, :height, :width, :].contiguous()
            out = out.reshape(batch, height * width, channels)
            x = slots["residual_attn"]["output"](x + layer.drop_path(out))
            h = slots["norm2"]["output"](p["norm2"](x))
            h = p["fc2"](slots["gelu"]["output"](p["act"](p["fc1"](h))))
            return slots["residual_mlp"]["output"](h + x)
        return forward

    # -- running -------------------------------------------------------------------
    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model.swin.embeddings(pixel_values)[0]

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        info = block.__dict__.get("_vitq_swin")
        if info is None:
            raise RuntimeError("Swin block not prepared: get the adapter through quant.families.family_of")
        dims = info["dims"]
        if hidden.shape[1] != dims[0] * dims[1]:
            raise ValueError(f"Swin block expects {dims[0]}x{dims[1]} tokens, got {hidden.shape[1]}: images must "
                             f"have the model's configured size")
        out = block(hidden, dims)
        if isinstance(out, tuple):  # the library's own forward (not instrumented)
            out = out[0]
        if info["downsample"] is not None:
            out = info["downsample"](out, dims)
        return out

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        seq = model.swin.layernorm(hidden)
        return model.classifier(torch.flatten(model.swin.pooler(seq.transpose(1, 2)), 1))

    # -- shape facts -----------------------------------------------------------------
    def head_dim(self, model: nn.Module) -> int:
        return model.config.embed_dim // model.config.num_heads[0]

    def num_tokens(self, model: nn.Module) -> int:
        grid = model.swin.embeddings.patch_grid
        return grid[0] * grid[1]
