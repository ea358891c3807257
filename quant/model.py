"""The quantized model: a Hugging Face classifier with a quantizer at every site.

``QuantModel`` instruments the model in place (patched forwards and hooks, no edit
of the transformers source) and runs it as embed -> blocks -> head, so analysis
code can restart the forward at any block. Everything that depends on the
model's layout is delegated to its family adapter (``quant.families``). Each slot
of each site has a :class:`TensorQuantizer` that is either float (identity),
observing (calibration) or quantizing (fake-quant with calibrated parameters).

Two config options change model parameters (``QuantConfig.smooth``: LayerNorm
affine and consumer weights, :mod:`quant.smooth`; ``QuantConfig.bias_correction``:
Linear biases, :mod:`quant.bias_correction`). ``apply`` always starts from the
original parameters (copies kept on first change) and :meth:`QuantModel.snapshot`
carries the changed values, so ``restore`` swaps parameters with the quantizers.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from .bias_correction import corrected_biases
from .families import FamilyAdapter, family_of
from .modes import FLOAT, OBSERVE, QUANT, SiteError
from .observers import (FIXED_RANGES, ChannelRange, NonFiniteError, StreamingHistogram, activation_qparams,
                        smoothed_range, weight_qparams)
from .quantizer import QParams, QuantSpec, fake_quantize, qparams_from_range
from .config import QuantConfig
from .sites import Site
from .smooth import smoothing, smoothing_plan

# snapshot key of the model parameters a config changed (smoothing, bias correction)
PARAMS_KEY = "__params__"

# A tap sees (quantizer, float input, value passed on): the error analyzer uses it.
Tap = Callable[["TensorQuantizer", torch.Tensor, torch.Tensor], None]


class TensorQuantizer:
    """One tensor of one site: identity, calibration observer, or fake-quant."""

    def __init__(self, site: Site, slot: str) -> None:
        self.site, self.slot = site, slot
        self.mode = FLOAT
        self.stats = StreamingHistogram()
        # per-channel (last dim) statistics of the tensors smoothing/bias correction use
        self.channels: ChannelRange | None = ChannelRange() if tracks_channels(site, slot) else None
        # per-channel scales s when this tensor is a smoothed X / s (set by QuantModel.apply)
        self.smooth: torch.Tensor | None = None
        self.spec: QuantSpec | None = None
        self.qparams: QParams | None = None
        self.taps: list[Tap] = []
        # (quantizer, float input, value passed on) -> the value passed on instead: lets an
        # analysis replace the output (analysis.taylor adds a differentiable perturbation)
        self.perturb: Callable[["TensorQuantizer", torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._weight_cache: torch.Tensor | None = None
        self._range_cache: dict[tuple, QParams] = {}  # (count, spec) -> qparams of the current stats

    @property
    def stats(self) -> StreamingHistogram:
        return self._stats

    @stats.setter
    def stats(self, value: StreamingHistogram) -> None:
        self._stats = value
        self._range_cache = {}  # new statistics: every cached range is stale

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
                out = _memo_fake_quantize(x, self.qparams)
        else:
            if self.mode == OBSERVE and not self.is_weight:
                try:
                    self.stats.update(x)
                    if self.channels is not None:
                        self.channels.update(x)
                except NonFiniteError as e:
                    raise SiteError(f"site {self.name}: {e} during calibration") from None
            out = x
        if self.perturb is not None:
            out = self.perturb(self, x, out)
        for tap in self.taps:
            tap(self, x, out)
        return out

    def quantize(self, spec: QuantSpec, weight: torch.Tensor | None = None,
                 device: torch.device | None = None) -> None:
        """Switch to fake-quant with ``spec``: weights from their tensor, activations
        from the calibration statistics gathered in OBSERVE mode.

        A smoothed activation (``self.smooth``: the tensor is X / s) takes the exact
        range of X / s from X's per-channel min/max, for every observer: the
        histogram observers (percentile, mse, entropy) saw X, not X / s, so they
        fall back to that exact (minmax) range; fixed-range observers keep theirs."""
        self.spec = spec
        try:
            self._quantize(spec, weight, device)
        except ValueError as e:  # a spec this tensor cannot take (group_size on a 1-D weight, ...)
            raise SiteError(f"site {self.name}: {e}") from None
        self.mode = QUANT

    def _quantize(self, spec: QuantSpec, weight: torch.Tensor | None, device: torch.device | None) -> None:
        if self.is_weight:
            self.qparams = weight_qparams(weight, spec)
            self._weight_cache = fake_quantize(weight.detach(), self.qparams)
        else:
            if self.stats.count == 0:
                raise SiteError(f"site {self.name}: no calibration data; run calibration first")
            if self.smooth is not None and spec.observer not in FIXED_RANGES:
                lo, hi = smoothed_range(self.channels, self.smooth)
                self.qparams = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
            else:
                # the histogram observers (mse, entropy) search hundreds of ranges: compute
                # each (statistics, spec) once, however often configs are applied
                key = (self.stats.count, spec)
                if key not in self._range_cache:
                    self._range_cache[key] = activation_qparams(self.stats, spec)
                self.qparams = self._range_cache[key]
            if device is not None:  # once per config, not once per forward
                self.qparams = self.qparams.to(device)

    def to_float(self) -> None:
        self.mode, self.spec, self.qparams, self._weight_cache = FLOAT, None, None, None


# The last activation fake-quant: (input, its version, qparams scalars, output). The q, k and
# v projections read one tensor with equal parameters (one calibration of one tensor): it
# is quantized once, not three times. Only without autograd, only per-tensor parameters.
_LAST: list = [None, -1, None, None]
REUSE_SHARED_INPUTS = True  # False: quantize every slot anew (benchmarks compare the two)


def _memo_fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    if qp.per_channel or not REUSE_SHARED_INPUTS or (x.requires_grad and torch.is_grad_enabled()):
        return fake_quantize(x, qp)
    key = qp.scalars()
    version = None if x.is_inference() else x._version  # inference tensors keep no version counter
    if _LAST[0] is x and _LAST[1] == version and _LAST[2] == key:
        return _LAST[3]
    out = fake_quantize(x, qp)
    _LAST[:] = [x, version, key, out]
    return out


def _forget_last() -> None:
    _LAST[:] = [None, -1, None, None]


def tracks_channels(site: Site, slot: str) -> bool:
    """Tensors whose per-channel statistics calibration records: LayerNorm outputs
    (smoothing) and Linear inputs (smoothing, bias correction)."""
    return site.kind == "layernorm" or (site.kind == "linear" and slot == "input")


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
        self._originals: dict[str, torch.Tensor] = {}  # parameter name -> original value (copy)
        self._param_values: dict[str, torch.Tensor] = {}  # parameters currently changed -> value
        self._instrument()

    # -- instrumentation -------------------------------------------------
    def _instrument(self) -> None:
        """Attach the quantizers; how is the family adapter's business."""
        self._instrument_weights()
        self.family.instrument(self.model, self.sites, self.quantizers)

    def _instrument_weights(self) -> None:
        self._weights = {s.name: self.family.weight(self.model, s) for s in self.sites if s.has_weight()}

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

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live: inputs are moved there by :meth:`embed`,
        quantization parameters by the quantizers (everything follows the model)."""
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "QuantModel":
        """Move the model (and with it every quantizer) to ``device``; state returns to FLOAT
        (snapshots taken before the move hold tensors of the old device)."""
        self.apply(None)
        self.model.to(device)
        self._instrument_weights()
        return self

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _forget_last()  # a new forward: nothing of the last one is reused
        return self.family.embed(self.model, pixel_values.to(self.device, non_blocking=True))

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
        """FLOAT everywhere, or OBSERVE on every activation (calibration); the
        original parameters (no smoothing, no bias correction) either way."""
        self._reset_parameters()
        for tq in self.tensor_quantizers():
            tq.to_float()
            if mode == OBSERVE and not tq.is_weight:
                tq.mode = OBSERVE

    def quantize_site(self, name: str, specs: dict[str, QuantSpec | None]) -> None:
        """Fake-quantize every slot of site ``name`` with its spec (QuantConfig.slot_specs);
        a slot whose spec is None stays float (a weight-only format's activations)."""
        for slot, tq in self.quantizers[name].items():
            if specs[slot] is None:
                tq.to_float()
            else:
                tq.quantize(specs[slot], self._weights.get(name), self.device)

    def float_site(self, name: str) -> None:
        for tq in self.quantizers[name].values():
            tq.to_float()

    def apply(self, config: QuantConfig | None) -> None:
        """Quantize every site ``config`` does not keep float (None: all float), from
        the original parameters: smoothing first (parameters changed, smoothed
        tensors marked), then the quantizers, then bias correction (biases)."""
        if config is None:
            self.set_mode(FLOAT)
            return
        config.validate(self.sites)
        if config.smooth:
            smoothing_plan(self, config)  # a bad pattern fails before the state changes
        self._reset_parameters()
        values, scales = smoothing(self, config) if config.smooth else ({}, {})
        self._set_parameters(values)
        for norm, (s, consumers) in scales.items():
            self.quantizers[norm]["output"].smooth = s
            for name in consumers:
                self.quantizers[name]["input"].smooth = s
        for site in self.sites:
            if config.is_float(site):
                self.float_site(site.name)
            else:
                self.quantize_site(site.name, config.slot_specs(site))
        if config.bias_correction:
            self._set_parameters({**values, **corrected_biases(self, config)})

    # -- parameters changed by a config -------------------------------------
    def original_parameter(self, name: str) -> torch.Tensor:
        """The value parameter ``name`` had before any config changed it."""
        if name in self._originals:
            return self._originals[name]
        return self.model.get_parameter(name).detach()

    def _set_parameters(self, values: dict[str, torch.Tensor]) -> None:
        """Parameters named in ``values`` take those values, every other parameter a
        config changed before goes back to its original (values are never edited in
        place, so an unchanged one is not copied again)."""
        with torch.no_grad():
            for name in values:
                if name not in self._originals:
                    self._originals[name] = self.model.get_parameter(name).detach().clone()
            for name, original in self._originals.items():
                new = values.get(name, original)
                if new is not self._param_values.get(name, original):
                    self.model.get_parameter(name).copy_(new)
        self._param_values = dict(values)

    def _reset_parameters(self) -> None:
        self._set_parameters({})
        for tq in self.tensor_quantizers():
            tq.smooth = None

    def snapshot(self) -> dict[str, tuple]:
        """The quantization state of every tensor, cheap to restore with :meth:`restore`
        (lets one pass over the data evaluate several configs); under ``PARAMS_KEY``
        the parameters the state changed (smoothing, bias correction)."""
        state: dict = {tq.name: (tq.mode, tq.spec, tq.qparams, tq._weight_cache, tq.smooth)
                       for tq in self.tensor_quantizers()}
        state[PARAMS_KEY] = dict(self._param_values)
        return state

    def restore(self, snapshot: dict[str, tuple]) -> None:
        _forget_last()
        self._set_parameters(snapshot.get(PARAMS_KEY, {}))
        for tq in self.tensor_quantizers():
            tq.mode, tq.spec, tq.qparams, tq._weight_cache, tq.smooth = snapshot[tq.name]

    def prepare(self, config: QuantConfig | None) -> dict[str, tuple]:
        self.apply(config)
        return self.snapshot()

    def reset_calibration(self) -> None:
        for tq in self.tensor_quantizers():
            tq.stats = StreamingHistogram()
            if tq.channels is not None:
                tq.channels = ChannelRange()

    def calibration_state(self) -> dict[str, dict]:
        """Calibration statistics of every activation tensor (saved for resume/reuse):
        the histogram, plus per-channel min/max/sum for LayerNorm outputs and Linear inputs."""
        return {tq.name: {**tq.stats.state_dict(), **(tq.channels.state_dict() if tq.channels is not None else {})}
                for tq in self.tensor_quantizers() if not tq.is_weight}

    def load_calibration_state(self, state: dict[str, dict]) -> None:
        """Load :meth:`calibration_state`; a state saved before per-channel or per-sample
        statistics existed is refused (calibrate again)."""
        for tq in self.tensor_quantizers():
            if tq.is_weight:
                continue
            if tq.name not in state:
                raise ValueError(f"calibration state has no statistics for {tq.name}: it was saved for another "
                                 f"model; calibrate again")
            if "samples" not in state[tq.name]:
                raise ValueError(f"calibration state of {tq.name} has no per-sample statistics (saved by an older "
                                 f"vitq); calibrate again")
            if tq.channels is not None and "channel_min" not in state[tq.name]:
                raise ValueError(f"calibration state of {tq.name} has no per-channel statistics (saved by an older "
                                 f"vitq); calibrate again")
        for tq in self.tensor_quantizers():
            if not tq.is_weight:
                tq.stats = StreamingHistogram.from_state_dict(state[tq.name])
                if tq.channels is not None:
                    tq.channels = ChannelRange.from_state_dict(state[tq.name])
