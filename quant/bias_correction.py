"""Bias correction of quantized Linear layers (Nagel et al. 2019, data-free form
with calibration means).

Quantizing a Linear's weight shifts the expected output of every output channel
i by ``E[(W_q - W) x]_i = ((W_q - W) E[x])_i``: with an input whose channels
have a large mean (an offset), rounding errors of a row of W no longer average
out. ``QuantConfig.bias_correction`` lists the Linear sites whose bias absorbs
that shift (``b' = b - shift``); ``QuantModel.apply`` computes it without another
pass over the data (:func:`expected_shifts`), from

- ``W_q``: the weight as the config quantizes it (smoothed ``W'`` if the input is
  smoothed), ``W``: the float weight it quantizes;
- ``E[x]``: the per-channel mean of the Linear's input recorded by calibration
  (divided by ``s`` when the input is smoothed).

Approximations (documented choice): the input is taken as the FP32 model's input
(errors of upstream quantized layers are ignored) and the activation's own rounding
is taken as zero-mean (``E[x_q] ~ E[x]``), so the correction targets the weight
quantization shift, Nagel's analytic bias correction with empirical means.
:func:`measure_bias_shift` measures the real residual ``E[y_q - y]`` of every
corrected site in the quantized model on images (upstream quantization and
activation rounding included), which is what the tests check it lowers.

A site kept float by the config is not corrected. The corrected bias is a float
parameter: it exports as an ordinary float initializer. Sites made float later by
``QuantModel.float_site`` keep the corrected bias (apply the config again instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn.functional as F

from .config import ConfigError, QuantConfig
from .modes import QUANT, SiteError
from .sites import Site

if TYPE_CHECKING:
    from .model import QuantModel


def _targets(qmodel: "QuantModel", config: QuantConfig, all_int8: bool = False) -> list[Site]:
    """The int8 Linear sites to correct; a glob skips Linears without a bias (Swin's patch
    merging), a site named exactly keeps it (and :func:`corrected_biases` says why not)."""
    def eligible(s: Site) -> bool:
        return (qmodel.model.get_submodule(s.path).bias is not None
                or any(p in (s.name, s.path) for p in config.bias_correction))
    return [s for s in qmodel.sites if s.kind == "linear" and not config.is_float(s)
            and (config.corrects_bias(s) or (all_int8 and not config.bias_correction)) and eligible(s)]


def expected_shifts(qmodel: "QuantModel", config: QuantConfig) -> dict[str, torch.Tensor]:
    """Site -> ``(W_q - W) E[x]`` per output channel for the int8 Linear sites that
    ``config`` corrects, with ``config``'s quantizers already applied to ``qmodel``."""
    shifts = {}
    for site in _targets(qmodel, config):
        wq_tq, in_tq = qmodel.quantizers[site.name]["weight"], qmodel.quantizers[site.name]["input"]
        if wq_tq.mode != QUANT:
            continue
        if in_tq.channels is None or in_tq.channels.min is None:
            raise SiteError(f"site {in_tq.name}: no per-channel calibration statistics; run calibration first")
        w = qmodel.model.get_submodule(site.path).weight.detach().float()
        mean = in_tq.channels.mean.to(w.device)
        if in_tq.smooth is not None:
            mean = mean / in_tq.smooth.to(w.device)
        shifts[site.name] = (wq_tq._weight_cache.float() - w) @ mean
    return shifts


def corrected_biases(qmodel: "QuantModel", config: QuantConfig) -> dict[str, torch.Tensor]:
    """Parameter name -> corrected bias (original bias minus :func:`expected_shifts`)."""
    out = {}
    for name, shift in expected_shifts(qmodel, config).items():
        path = qmodel.site_by_name[name].path  # parameters are named by module path
        module = qmodel.model.get_submodule(path)
        if module.bias is None:
            raise ConfigError(f"bias_correction {name}: the Linear has no bias to correct")
        original = qmodel.original_parameter(f"{path}.bias")
        out[f"{path}.bias"] = (original - shift.to(original.device, original.dtype)).clone()
    return out


@torch.inference_mode()
def measure_bias_shift(qmodel: "QuantModel", config: QuantConfig, batches: Iterable[torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """Site -> the mean output error per output channel, ``E[y_q - y]``, of the Linear
    sites ``config`` corrects (every int8 Linear if it corrects none), measured over
    ``batches`` with ``config`` applied: ``y_q`` is the layer's output as the config
    runs it (quantized input and weight, corrected bias if corrected), ``y`` the
    float layer (float weight, original bias) on the same arriving input. With no
    correction this is the shift bias correction removes; with it, the residual.
    The model's state is kept."""
    saved = qmodel.snapshot()
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    taps = []
    try:
        qmodel.apply(config)
        for site in _targets(qmodel, config, all_int8=True):
            module = qmodel.model.get_submodule(site.path)
            w_tq = qmodel.quantizers[site.name]["weight"]
            original_bias = qmodel.original_parameter(f"{site.path}.bias") if module.bias is not None else None

            def tap(tq, x, out, module=module, w_tq=w_tq, original_bias=original_bias, name=site.name):
                wq = w_tq._weight_cache if w_tq.mode == QUANT else module.weight
                err = F.linear(out, wq, module.bias) - F.linear(x, module.weight, original_bias)
                err = err.reshape(-1, err.shape[-1]).double()
                sums[name] = sums.get(name, 0) + err.sum(0)
                rows[name] = rows.get(name, 0) + err.shape[0]

            tq = qmodel.quantizers[site.name]["input"]
            tq.taps.append(tap)
            taps.append((tq, tap))
        for pixels in batches:
            qmodel(pixels)
    finally:
        for tq, tap in taps:
            tq.taps.remove(tap)
        qmodel.restore(saved)
    return {name: (total / rows[name]).float() for name, total in sums.items()}
