"""The quantized model: a Hugging Face classifier with a quantizer at every site.

``QuantModel`` instruments the model in place (patched forwards and hooks, no edit
of the transformers source) and runs it as embed -> blocks -> head, so analysis
code can restart the forward at any block. Everything that depends on the
model's layout is delegated to its family adapter (``quant.families``). Each slot
of each site has a :class:`TensorQuantizer` that is either float (identity),
observing (calibration) or quantizing (fake-quant with calibrated parameters).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from .families import FamilyAdapter, family_of
from .observers import NonFiniteError, StreamingHistogram, activation_qparams, weight_qparams
from .quantizer import QParams, QuantSpec, fake_quantize
from .config import QuantConfig
from .sites import Site

FLOAT, OBSERVE, QUANT = "float", "observe", "quant"

# A tap sees (quantizer, float input, value passed on): the error analyzer uses it.
Tap = Callable[["TensorQuantizer", torch.Tensor, torch.Tensor], None]


class SiteError(RuntimeError):
    """A numerical fault at a named site (NaN/Inf, no calibration data)."""


class TensorQuantizer:
    """One tensor of one site: identity, calibration observer, or fake-quant."""

    def __init__(self, site: Site, slot: str) -> None:
        self.site, self.slot = site, slot
        self.mode = FLOAT
        self.stats = StreamingHistogram()
        self.spec: QuantSpec | None = None
        self.qparams: QParams | None = None
        self.taps: list[Tap] = []
        self._weight_cache: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return f"{self.site.name}:{self.slot}"

    @property
    def is_weight(self) -> bool:
        return self.slot == "weight"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == QUANT:
            if self.is_weight:
                out = self._weight_cache
            else:
                out = fake_quantize(x, self.qparams)
        else:
            if self.mode == OBSERVE and not self.is_weight:
                try:
                    self.stats.update(x)
                except NonFiniteError as e:
                    raise SiteError(f"site {self.name}: {e} during calibration") from None
            out = x
        for tap in self.taps:
            tap(self, x, out)
        return out

    def quantize(self, spec: QuantSpec, weight: torch.Tensor | None = None) -> None:
        """Switch to fake-quant with ``spec``: weights from their tensor, activations
        from the calibration statistics gathered in OBSERVE mode."""
        self.spec = spec
        if self.is_weight:
            self.qparams = weight_qparams(weight, spec)
            self._weight_cache = fake_quantize(weight.detach(), self.qparams)
        else:
            if self.stats.count == 0:
                raise SiteError(f"site {self.name}: no calibration data; run calibration first")
            self.qparams = activation_qparams(self.stats, spec)
        self.mode = QUANT

    def to_float(self) -> None:
        self.mode, self.spec, self.qparams, self._weight_cache = FLOAT, None, None, None


class QuantModel:
    """A supported HF classifier, instrumented; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.family: FamilyAdapter = family_of(model)
        self.model = model.eval()
        self.sites = self.family.sites(model)
        self.site_by_name = {s.name: s for s in self.sites}
        self.quantizers: dict[str, dict[str, TensorQuantizer]] = {
            s.name: {slot: TensorQuantizer(s, slot) for slot in s.slots} for s in self.sites
        }
        self._weights: dict[str, torch.Tensor] = {}
        self._instrument()

    # -- instrumentation -------------------------------------------------
    def _instrument(self) -> None:
        """Attach the quantizers; how is the family adapter's business."""
        self._weights = {s.name: self.family.weight(self.model, s) for s in self.sites if s.has_weight()}
        self.family.instrument(self.model, self.sites, self.quantizers)

    # -- running ---------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.family.backbone(self.model)

    @property
    def num_blocks(self) -> int:
        return self.family.num_blocks(self.model)

    @property
    def head_dim(self) -> int:
        """Width of one attention head (what analyses need instead of reading HF configs)."""
        return self.family.head_dim(self.model)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.family.embed(self.model, pixel_values)

    def run_blocks(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for block in list(self.family.blocks(self.model))[start:stop]:
            hidden = self.family.run_block(block, hidden)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.family.head(self.model, hidden)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits of the model under its current quantization state."""
        return self.head(self.run_blocks(self.embed(pixel_values)))

    # -- state -----------------------------------------------------------
    def tensor_quantizers(self) -> Iterator[TensorQuantizer]:
        for slots in self.quantizers.values():
            yield from slots.values()

    def set_mode(self, mode: str) -> None:
        """FLOAT everywhere, or OBSERVE on every activation (calibration)."""
        for tq in self.tensor_quantizers():
            tq.to_float()
            if mode == OBSERVE and not tq.is_weight:
                tq.mode = OBSERVE

    def quantize_site(self, name: str, specs: dict[str, QuantSpec]) -> None:
        """Fake-quantize every slot of site ``name`` with its spec (QuantConfig.slot_specs)."""
        for slot, tq in self.quantizers[name].items():
            tq.quantize(specs[slot], self._weights.get(name))

    def float_site(self, name: str) -> None:
        for tq in self.quantizers[name].values():
            tq.to_float()

    def apply(self, config: QuantConfig | None) -> None:
        """Quantize every site ``config`` does not keep float (None: all float)."""
        if config is None:
            self.set_mode(FLOAT)
            return
        config.validate(self.sites)
        for site in self.sites:
            if config.is_float(site):
                self.float_site(site.name)
            else:
                self.quantize_site(site.name, config.slot_specs(site))

    def snapshot(self) -> dict[str, tuple]:
        """The quantization state of every tensor, cheap to restore with :meth:`restore`
        (lets one pass over the data evaluate several configs)."""
        return {tq.name: (tq.mode, tq.spec, tq.qparams, tq._weight_cache) for tq in self.tensor_quantizers()}

    def restore(self, snapshot: dict[str, tuple]) -> None:
        for tq in self.tensor_quantizers():
            tq.mode, tq.spec, tq.qparams, tq._weight_cache = snapshot[tq.name]

    def prepare(self, config: QuantConfig | None) -> dict[str, tuple]:
        self.apply(config)
        return self.snapshot()

    def reset_calibration(self) -> None:
        for tq in self.tensor_quantizers():
            tq.stats = StreamingHistogram()

    def calibration_state(self) -> dict[str, dict]:
        """Calibration statistics of every activation tensor (saved for resume/reuse)."""
        return {tq.name: tq.stats.state_dict() for tq in self.tensor_quantizers() if not tq.is_weight}

    def load_calibration_state(self, state: dict[str, dict]) -> None:
        for tq in self.tensor_quantizers():
            if not tq.is_weight:
                tq.stats = StreamingHistogram.from_state_dict(state[tq.name])
