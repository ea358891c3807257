"""timm's ViT and DeiT (``timm.models.vision_transformer.VisionTransformer``,
``timm.models.deit.VisionTransformerDistilled``): ``--model timm:vit_base_patch16_224``,
``timm:deit_small_patch16_224``, ``timm:deit_base_distilled_patch16_224`` ... with ``--weights``.

The blocks are the plain pre-norm ViT blocks HF ViT has (plus timm's optional layer scale
``ls1``/``ls2``, applied before the residual adds like DINOv2's), so the sites and their
canonical names are the same (``blocks.4.attn.q`` ... ``blocks.4.residual_mlp``,
``patch_embed``, ``norm``, ``head``; the distilled DeiT adds ``head_dist``, like HF's):
a skip-list written for HF ViT applies unchanged. Where they live: ``patch_embed.proj``,
``blocks.4.norm1``, ``blocks.4.attn.{q,k,v,proj}``, ``blocks.4.mlp.{fc1,act,fc2}``,
``norm``, ``head``. timm fuses q/k/v into one Linear (``attn.qkv``);
:meth:`TimmViT.restructure` splits it once into three (``timm_common.SplitAttention``).

Variants whose extra operators would have no site (a norm before the blocks, q/k norms,
a norm in the MLP or after attention, gated attention, attention pooling, an fc_norm
after pooling, a patch-embedding norm, other block types) are refused by name.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import UnsupportedModelError, register_family
from .prenorm import PreNormAdapter
from .timm_common import SplitAttention, TimmLoading

# The tiny random model (``TimmViT.tiny``): HF's tiny ViT's depth and width (the same sites)
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)


def _identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


@register_family("timm_vit")
class TimmViT(TimmLoading, PreNormAdapter):
    model_classes = ("timm.models.vision_transformer.VisionTransformer", "timm.models.deit.VisionTransformerDistilled")

    @classmethod
    def tiny(cls, seed: int = 0, arch: str = "vit_tiny_patch16_224", **overrides) -> nn.Module:
        """A random tiny timm ViT (``arch`` another timm ViT/DeiT name, e.g. the distilled
        ``deit_tiny_distilled_patch16_224``), with a random (not zero) head."""
        import timm

        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, **{**TINY, **overrides}).eval()
        with torch.no_grad():
            for _, head in cls().heads(model):
                head.weight.normal_(0, 0.5)
        return model

    def check(self, model: nn.Module) -> None:
        from timm.models.vision_transformer import Attention, Block, Mlp

        problems = []
        if not _identity(model.norm_pre):
            problems.append("a norm before the blocks (norm_pre)")
        if not _identity(getattr(model.patch_embed, "norm", None)):
            problems.append("a patch-embedding norm")
        if not _identity(model.fc_norm) or not isinstance(model.norm, nn.LayerNorm):
            problems.append("a norm after pooling (fc_norm) instead of the final LayerNorm")
        if getattr(model, "attn_pool", None) is not None:
            problems.append("attention pooling")
        for block in model.blocks:
            if type(block) is not Block:
                problems.append(f"{type(block).__name__} blocks")
                break
            attn = block.attn
            if isinstance(attn, Attention) and (not _identity(attn.q_norm) or not _identity(attn.k_norm)
                                                or not _identity(attn.norm) or attn.gate is not None):
                problems.append("q/k norms, an attention-output norm or gated attention")
                break
            if not isinstance(attn, (Attention, SplitAttention)):
                problems.append(f"{type(attn).__name__} attention")
                break
            if type(block.mlp) is not Mlp or not _identity(block.mlp.norm):
                problems.append("an MLP other than fc1-activation-fc2")
                break
        if problems:
            raise UnsupportedModelError(f"timm {type(model).__name__} with {problems[0]} is not supported")

    def restructure(self, model: nn.Module) -> None:
        for block in model.blocks:
            if not isinstance(block.attn, SplitAttention):
                block.attn = SplitAttention(block.attn)

    # -- where things are ----------------------------------------------------
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def parts(self, layer: nn.Module) -> dict[str, nn.Module]:
        at, mlp = layer.attn, layer.mlp
        return {"norm1": layer.norm1, "q": at.q, "k": at.k, "v": at.v, "o": at.proj,
                "norm2": layer.norm2, "fc1": mlp.fc1, "act": mlp.act, "fc2": mlp.fc2}

    def post_attn(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer.drop_path1(layer.ls1(h))

    def post_mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer.drop_path2(layer.ls2(h))

    def num_heads(self, model: nn.Module) -> int:
        return model.blocks[0].attn.num_heads

    def patch_embed(self, model: nn.Module) -> nn.Module:
        return model.patch_embed.proj

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.norm

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        heads = [("head", model.head)]
        if hasattr(model, "head_dist"):
            heads.append(("head_dist", model.head_dist))
        return heads

    # -- running ---------------------------------------------------------------
    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        x = model._pos_embed(model.patch_embed(pixel_values))
        return model.norm_pre(model.patch_drop(x))

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(hidden))

    # -- shape facts -----------------------------------------------------------
    def head_dim(self, model: nn.Module) -> int:
        return model.blocks[0].attn.head_dim

    def num_tokens(self, model: nn.Module) -> int:
        return model.patch_embed.num_patches + model.num_prefix_tokens
