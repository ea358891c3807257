"""The family adapter contract, the registry and the helpers adapters share.

transformers does not expose residual additions or the attention matmuls as
modules, so quantizing a classifier needs per-family knowledge: where the blocks,
norms and heads are, how a block post-processes each branch, how to attach a
quantizer to each site. A :class:`FamilyAdapter` holds all of it for one family;
``quant.model.QuantModel`` only talks to the adapter, never to the HF layout.

A family is one module of this package with one class decorated by
:func:`register_family`; the package imports all its modules, so nothing else has
to change to add one.
"""

from __future__ import annotations

import types
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Mapping, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..sites import BLOCK_ROLES, Site

# A quantizer as an adapter sees it: tensor in, (fake-quantized) tensor out.
# ``quant.model.TensorQuantizer`` is one; adapters need nothing more from it.
Quantizer = Callable[[torch.Tensor], torch.Tensor]
# site name -> slot -> quantizer (``QuantModel.quantizers``)
Quantizers = Mapping[str, Mapping[str, Quantizer]]


class UnsupportedModelError(ValueError):
    """The model is not one of the ViT-family classifiers vitq knows how to quantize."""


class ModelLoadError(ValueError):
    """The model cannot be loaded, with a message that says what to do."""


class FamilyAdapter(ABC):
    """Everything vitq needs to know about one model family.

    Adapters are stateless: the model is passed to every method, so one instance
    can serve several models. ``name`` (stored in run metadata) is set by
    :func:`register_family`; ``model_classes`` lists the ``type(model).__name__``
    values (or ``module.Class`` names) the adapter handles.
    """

    name: ClassVar[str] = ""
    # ``type(model).__name__`` values, or ``module.Class`` names where the bare name is taken by
    # another library's class (timm's and torchvision's ``VisionTransformer``): a qualified
    # name is matched first
    model_classes: ClassVar[tuple[str, ...]] = ()
    # The ``--model SCHEME:ARCH`` sources the family loads (torchvision's ViT: "torchvision");
    # None: Hugging Face model folders and hub ids, which every HF family loads alike
    # (``hf_loading.HFLoading``: the checkpoint's architecture then picks the family).
    scheme: ClassVar[str | None] = None

    # -- loading, and a tiny model for tests -------------------------------
    @classmethod
    @abstractmethod
    def load(cls, source: str, weights: str | None) -> tuple[nn.Module, object]:
        """The classifier (eval mode) and its image processor, called as vitq calls a HF
        one (``processor(images=..., return_tensors="pt")["pixel_values"]``), from
        ``--model source`` and ``--weights``; the model carries ``config.id2label``.
        Raises :class:`ModelLoadError` with a one-line message saying what to do."""

    @classmethod
    @abstractmethod
    def tiny(cls, seed: int = 0, **overrides) -> nn.Module:
        """A tiny random classifier of the family (eval mode, 32 px input, 5 classes), built
        from a config with ``overrides`` applied and weights drawn from ``seed``, so that the
        tests run every registered family without a list of them. Raises ImportError when the
        library the family needs is not installed."""

    def check(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` for a variant of a handled class that the
        adapter cannot quantize (e.g. a config option it does not implement)."""

    def restructure(self, model: nn.Module) -> None:
        """Restructure ``model`` once, in place and float-equivalently, so that every
        weighted site is a module of its own (torchvision: the fused q/k/v projection of
        ``nn.MultiheadAttention`` becomes three Linear modules). Called by
        :func:`family_of`; must be idempotent. Default: nothing."""

    # -- sites and instrumentation ----------------------------------------
    @abstractmethod
    def sites(self, model: nn.Module) -> list[Site]:
        """All quantization sites of ``model`` in execution order; names, order and
        roles are persisted in configs and results, so they must never change. Names
        are canonical (``quant.sites``: the same whatever library holds the
        architecture); ``Site.path`` is the module path in the installed library."""

    @abstractmethod
    def instrument(self, model: nn.Module, sites: Sequence[Site], quantizers: Quantizers) -> None:
        """Route every slot of every site through ``quantizers[site.name][slot]``,
        in place (patched forwards and hooks), keeping the float maths bit-exact when
        every quantizer is the identity."""

    def weight(self, model: nn.Module, site: Site) -> torch.Tensor:
        """The weight tensor of a weighted (linear/conv) site: ``site.path`` is its module."""
        return model.get_submodule(site.path).weight

    def norm_consumers(self, model: nn.Module, sites: Sequence[Site]) -> dict[str, list[str]]:
        """LayerNorm site -> the Linear sites reading its output, and nothing else:
        the norms whose output can be smoothed (``QuantConfig.smooth``: the scale
        folds into the norm's affine and the consumers' weight columns). Default:
        none (the family does not support smoothing)."""
        return {}

    # -- the forward, split so analyses can restart at any block --------------
    def backbone(self, model: nn.Module) -> nn.Module:
        """The module holding embeddings and blocks (the model itself unless nested)."""
        return model

    @abstractmethod
    def embed(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> token sequence entering block 0."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """One (instrumented) block applied to ``hidden``."""
        return block(hidden)

    @abstractmethod
    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> logits (final norm included)."""

    # -- shape facts -------------------------------------------------------
    def num_blocks(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    @abstractmethod
    def head_dim(self, model: nn.Module) -> int:
        """Width of one attention head (the inner dimension of probs @ V)."""

    @abstractmethod
    def num_tokens(self, model: nn.Module) -> int:
        """Sequence length at the model's configured image size, special tokens included."""


# -- registry --------------------------------------------------------------------
REGISTRY: dict[str, type[FamilyAdapter]] = {}
# Sorted model class names of all registered families; updated in place so that
# ``from quant.families import SUPPORTED`` stays current when a family registers later.
SUPPORTED: list[str] = []

A = TypeVar("A", bound=type[FamilyAdapter])


def _refresh_supported() -> None:
    SUPPORTED[:] = sorted({c for adapter in REGISTRY.values() for c in adapter.model_classes})


def register_family(name: str) -> Callable[[A], A]:
    """Class decorator: make ``cls`` the adapter of family ``name``.

    Refuses a name or model class that is already taken: two adapters for one class
    would make the choice depend on import order.
    """
    def decorate(cls: A) -> A:
        if not cls.model_classes:
            raise TypeError(f"family {name!r}: {cls.__name__}.model_classes is empty")
        if name in REGISTRY:
            raise ValueError(f"family {name!r} is already registered ({REGISTRY[name].__name__})")
        taken = {c: n for n, a in REGISTRY.items() for c in a.model_classes}
        clash = sorted(set(cls.model_classes) & set(taken))
        if clash:
            raise ValueError(f"family {name!r}: {clash[0]} is already handled by family {taken[clash[0]]!r}")
        cls.name = name
        REGISTRY[name] = cls
        _refresh_supported()
        return cls
    return decorate


def unregister_family(name: str) -> None:
    """Remove family ``name`` (tests that register a throw-away family clean up with it)."""
    del REGISTRY[name]
    _refresh_supported()


def loader_for(source: str) -> type[FamilyAdapter]:
    """The family class that loads ``--model source``: the one whose scheme prefixes it
    (``torchvision:vit_b_16``), else a Hugging Face one (folder or hub id)."""
    scheme = source.split(":", 1)[0] if ":" in source else None
    schemed = [a for a in REGISTRY.values() if a.scheme is not None]
    for adapter_cls in schemed:
        if adapter_cls.scheme == scheme:
            return adapter_cls
    hf = [a for a in REGISTRY.values() if a.scheme is None]
    if not hf:
        raise ModelLoadError(f"--model {source}: no family loads it; use "
                             f"{', '.join(a.scheme + ':NAME' for a in schemed)}")
    return hf[0]


def family_of(model: nn.Module) -> FamilyAdapter:
    """The adapter for ``model``, or :class:`UnsupportedModelError` naming what is supported."""
    cls = type(model).__name__
    qualified = f"{type(model).__module__}.{type(model).__qualname__}"
    for name in (qualified, cls):  # a family naming the class with its module first
        for adapter_cls in REGISTRY.values():
            if name in adapter_cls.model_classes:
                adapter = adapter_cls()
                adapter.check(model)
                adapter.restructure(model)
                return adapter
    raise UnsupportedModelError(
        f"unsupported model class {cls}; vitq supports: {', '.join(SUPPORTED)}"
    )


# -- instrumentation helpers shared by all adapters --------------------------------
def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    q = self._vitq
    return F.linear(q["input"](x), q["weight"](self.weight), self.bias)


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    q = self._vitq
    return self._conv_forward(q["input"](x), q["weight"](self.weight), self.bias)


def patch_weighted(module: nn.Module, kind: str, slots: Mapping[str, Quantizer]) -> None:
    """Replace the forward of a Linear (``kind`` 'linear') or Conv2d ('conv') so its
    input and weight pass through ``slots['input']`` and ``slots['weight']``."""
    module._vitq = slots
    fwd = {"linear": _linear_forward, "conv": _conv_forward}[kind]
    module.forward = types.MethodType(fwd, module)


def hook_output(module: nn.Module, quantizer: Quantizer) -> None:
    """Pass ``module``'s output through ``quantizer`` (a forward hook: no module edit)."""
    def hook(mod, args, output):
        return quantizer(output)
    module.register_forward_hook(hook)


def route_outside_blocks(model: nn.Module, sites: Sequence[Site], quantizers: Quantizers) -> None:
    """The part of ``instrument`` every family shares: each Linear/Conv site's input and weight
    through its quantizers (patched forward), each LayerNorm outside a block's own roles (the
    final norm, a patch merging's norm) through its output quantizer (a hook). The block roles
    are routed by each family's own block forward (:func:`block_slots`)."""
    for site in sites:
        if site.kind in ("linear", "conv"):
            patch_weighted(model.get_submodule(site.path), site.kind, quantizers[site.name])
        elif site.kind == "layernorm" and site.role not in BLOCK_ROLES:
            hook_output(model.get_submodule(site.path), quantizers[site.name]["output"])


def block_slots(sites: Sequence[Site], quantizers: Quantizers, block: int) -> dict:
    """Role -> quantizers of the sites of block ``block`` that its block forward runs."""
    return {s.role: quantizers[s.name] for s in sites if s.block == block and s.role in BLOCK_ROLES}
