"""timm's Swin Transformer (``timm.models.swin_transformer.SwinTransformer``, v1):
``--model timm:swin_tiny_patch4_window7_224 --weights FILE`` (and its small/base/large, s3
siblings).

The sites and their canonical names are HF Swin's (``quant/families/swin.py``):
``patch_embed`` and ``patch_embed.norm``; ``stages.S.blocks.J.<role>`` (the 14 block
sites, ``Site.block`` the running block index); ``stages.S.downsample.norm`` and
``stages.S.downsample`` for the patch merging between stage S and S+1; ``norm`` and
``head``. timm runs that patch merging at the *start* of stage S+1
(``layers.{S+1}.downsample``); it is named, and run, as the end of stage S, as in HF, so
a skip-list applies to both libraries alike.

timm keeps tokens as (batch, H, W, C); between blocks vitq passes (batch, H*W, C) as for
HF Swin, and the last block of a stage also runs the next stage's patch merging, so
sensitivity restarts at any block. timm's fused ``qkv`` is split once into ``q``, ``k``,
``v`` (:class:`SplitWindowAttention`, the same parameters and relative position bias);
the block forward is written out (cyclic shift, padding, window partition, bias and
shift mask, both matmuls, softmax, residual adds visible), equal to timm's up to float
rounding (a test checks it).
"""

from __future__ import annotations

import types
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sites import Site, block_sites
from .base import FamilyAdapter, Quantizers, UnsupportedModelError, block_slots, register_family, route_outside_blocks
from .prenorm import attention, block_norm_consumers, block_paths
from .timm_common import TimmLoading, split_qkv
from .torchvision_vit import FLOAT_SLOTS

# The tiny random Swin (``TimmSwin.tiny``): HF's tiny Swin (8x8 patch grid, two stages of two
# blocks joined by a patch merging, window 2: shifted windows with the mask in odd blocks)
TINY = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=2,
            num_classes=5)


class SplitWindowAttention(nn.Module):
    """timm's ``WindowAttention`` with its fused ``qkv`` split into ``q``, ``k``, ``v``; ``proj``,
    the relative position bias table and its index kept."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.window_area = attn.num_heads, attn.window_area
        self.q, self.k, self.v = split_qkv(attn.qkv, attn.qkv.out_features // 3)
        self.proj = attn.proj
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)

    def position_bias(self) -> torch.Tensor:
        """(1, heads, N, N) over one window of N tokens."""
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return window_attention(FLOAT_SLOTS, self, x, mask)


def window_attention(slots: dict, attn: SplitWindowAttention, windows: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Attention within windows (windows * batch, N, C), the position bias and (shifted
    blocks) the (windows, N, N) mask added to the scores before the softmax."""
    bias = attn.position_bias()
    if mask is not None:  # every image's windows in turn, as window_partition orders them
        bias = (bias + mask.to(bias.dtype).unsqueeze(1)).repeat(windows.shape[0] // mask.shape[0], 1, 1, 1)
    return attention(slots, attn.q, attn.k, attn.v, attn.proj, windows, attn.num_heads, bias)


@register_family("timm_swin")
class TimmSwin(TimmLoading, FamilyAdapter):
    model_classes = ("timm.models.swin_transformer.SwinTransformer",)

    @classmethod
    def tiny(cls, seed: int = 0, arch: str = "swin_tiny_patch4_window7_224", **overrides) -> nn.Module:
        """A random tiny timm Swin with a random (not near-zero) relative position bias and head."""
        import timm

        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, **{**TINY, **overrides}).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "relative_position_bias_table" in name:
                    p.normal_(0, 1)
            model.head.fc.weight.normal_(0, 0.5)
        return model

    def check(self, model: nn.Module) -> None:
        if not isinstance(getattr(model.head, "fc", None), nn.Linear) or model.head.global_pool.pool_type != "avg":
            raise UnsupportedModelError("timm Swin without a Linear head on average pooling is not supported")
        if not isinstance(model.patch_embed.norm, nn.LayerNorm):
            raise UnsupportedModelError("timm Swin without its patch-embedding LayerNorm (patch_norm) is not supported")

    def restructure(self, model: nn.Module) -> None:
        """Split every block's fused qkv, and mark each block with the next stage's patch
        merging when it is its stage's last block (a plain attribute: nothing re-registered)."""
        stages = list(model.layers)
        for s, stage in enumerate(stages):
            following = stages[s + 1].downsample if s + 1 < len(stages) else None
            for j, block in enumerate(stage.blocks):
                if not isinstance(block.attn, SplitWindowAttention):
                    block.attn = SplitWindowAttention(block.attn)
                last = j == len(stage.blocks) - 1
                block.__dict__["_vitq_downsample"] = following if last else None

    # -- layout ------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [block for stage in model.layers for block in stage.blocks]

    def parts(self, block: nn.Module) -> dict[str, nn.Module]:
        at, mlp = block.attn, block.mlp
        return {"norm1": block.norm1, "q": at.q, "k": at.k, "v": at.v, "o": at.proj,
                "norm2": block.norm2, "fc1": mlp.fc1, "act": mlp.act, "fc2": mlp.fc2}

    def sites(self, model: nn.Module) -> list[Site]:
        names = {module: name for name, module in model.named_modules()}
        sites = [Site("patch_embed", "conv", None, "patch_embed", names[model.patch_embed.proj]),
                 Site("patch_embed.norm", "layernorm", None, "patch_norm", names[model.patch_embed.norm])]
        stages, g = list(model.layers), 0
        for s, stage in enumerate(stages):
            for j, block in enumerate(stage.blocks):
                sites += block_sites(f"stages.{s}.blocks.{j}", g, block_paths(names, self.parts(block), names[block]))
                g += 1
            if s + 1 < len(stages):  # the merging timm runs first in the next stage ends this one
                ds = stages[s + 1].downsample
                sites += [Site(f"stages.{s}.downsample.norm", "layernorm", g - 1, "downsample_norm", names[ds.norm]),
                          Site(f"stages.{s}.downsample", "linear", g - 1, "downsample", names[ds.reduction])]
        sites += [Site("norm", "layernorm", None, "final_norm", names[model.norm]),
                  Site("head", "linear", None, "head", names[model.head.fc])]
        return sites

    def norm_consumers(self, model: nn.Module, sites: Sequence[Site]) -> dict[str, list[str]]:
        """As HF Swin: ``norm1`` feeds q/k/v, ``norm2`` fc1, a patch merging's norm its Linear."""
        return block_norm_consumers(sites, [("downsample_norm", "downsample")])

    # -- instrumentation -----------------------------------------------------------
    def instrument(self, model: nn.Module, sites: Sequence[Site], quantizers: Quantizers) -> None:
        self.restructure(model)
        route_outside_blocks(model, sites, quantizers)
        for i, block in enumerate(self.blocks(model)):
            block.forward = types.MethodType(self._block_forward(self.parts(block), block_slots(sites, quantizers, i)), block)

    def _block_forward(self, p: dict[str, nn.Module], slots: dict):
        from timm.models.swin_transformer import window_partition, window_reverse

        def forward(block, x):  # (batch, H, W, C), as timm's block takes it
            batch, height, width, channels = x.shape
            (wh, ww), (sh, sw) = block.window_size, block.shift_size
            h = slots["norm1"]["output"](p["norm1"](x))
            if sh or sw:
                h = torch.roll(h, shifts=(-sh, -sw), dims=(1, 2))
            h = F.pad(h, (0, 0, 0, (ww - width % ww) % ww, 0, (wh - height % wh) % wh))
            _, hp, wp, _ = h.shape
            windows = window_partition(h, (wh, ww)).view(-1, wh * ww, channels)
            mask = block.get_attn_mask(h) if getattr(block, "dynamic_mask", False) else block.attn_mask
            out = window_attention(slots, block.attn, windows, mask)
            out = window_reverse(out.view(-1, wh, ww, channels), (wh, ww), hp, wp)[:, :height, :width, :]
            if sh or sw:
                out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
            x = slots["residual_attn"]["output"](x + block.drop_path1(out)).reshape(batch, -1, channels)
            h = slots["norm2"]["output"](p["norm2"](x))
            h = p["fc2"](slots["gelu"]["output"](p["act"](p["fc1"](h))))
            x = slots["residual_mlp"]["output"](x + block.drop_path2(h))
            return x.reshape(batch, height, width, channels)
        return forward

    # -- running -------------------------------------------------------------------
    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        x = model.patch_embed(pixel_values)  # (batch, H, W, C)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if "_vitq_downsample" not in block.__dict__:
            raise RuntimeError("Swin block not prepared: get the adapter through quant.families.family_of")
        height, width = block.input_resolution
        if hidden.shape[1] != height * width:
            raise ValueError(f"Swin block expects {height}x{width} tokens, got {hidden.shape[1]}: images must "
                             f"have the model's configured size")
        x = block(hidden.reshape(hidden.shape[0], height, width, -1))
        if block.__dict__["_vitq_downsample"] is not None:
            x = block.__dict__["_vitq_downsample"](x)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        height, width = self.blocks(model)[-1].input_resolution
        x = model.norm(hidden.reshape(hidden.shape[0], height, width, -1))
        return model.forward_head(x)

    # -- shape facts -----------------------------------------------------------------
    def head_dim(self, model: nn.Module) -> int:
        first = self.blocks(model)[0].attn
        return first.q.out_features // first.num_heads

    def num_tokens(self, model: nn.Module) -> int:
        height, width = model.patch_embed.grid_size
        return height * width
