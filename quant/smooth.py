"""SmoothQuant-style scale migration (Xiao et al. 2023) for pre-norm ViT blocks.

A LayerNorm whose output X feeds only Linear layers (``norm1`` -> q/k/v,
``norm2`` -> fc1; which ones is family knowledge: ``FamilyAdapter.norm_consumers``)
can move the per-channel range of X into the consumers' weights: per input channel j

    s_j = max|X_j|^alpha / max_over_consumers(max_i |W[i, j]|)^(1 - alpha)

(both clamped at 1e-5, then s clamped to [1e-4, 1e4]); X' = X / s is obtained by
dividing the norm's affine weight and bias by s, and W'[:, j] = W[:, j] * s for
every consumer, so the float output is unchanged while X' has no outlier channels
(alpha 0.5 balances activation and weight ranges; NNCF uses 0.15 on vit_b_16).

``max|X_j|`` comes from the per-channel calibration statistics of the norm's output
(:class:`quant.observers.ChannelRange`), so smoothing needs no extra pass. The
activation range of a smoothed tensor is exact from the same statistics
(:func:`quant.observers.smoothed_range`), whatever the observer (see
``TensorQuantizer.quantize``). ``QuantModel.apply`` calls :func:`smoothing` and
owns the parameter bookkeeping (originals kept, snapshots carry the values).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

import torch

from .config import ConfigError, QuantConfig, matches
from .modes import SiteError

if TYPE_CHECKING:
    from .model import QuantModel

EPS = 1e-5
SCALE_RANGE = (1e-4, 1e4)


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel scales ``s`` (see the module docstring); ``weights`` are the
    consumers' [out, in] weights, ``act_absmax`` the [in] max |X_j|."""
    w_absmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    # the calibration statistics may live on another device than the weights (calibrated on CPU,
    # run on CUDA): the scales are computed where the weights are
    act = act_absmax.detach().float().to(w_absmax.device)
    s = act.clamp_min(EPS).pow(alpha) / w_absmax.clamp_min(EPS).pow(1.0 - alpha)
    return s.clamp(*SCALE_RANGE)


def smoothing_plan(qmodel: "QuantModel", config: QuantConfig) -> dict[str, tuple[float, list[str]]]:
    """LayerNorm site -> (alpha, consumer Linear sites) for every norm ``config`` smooths;
    a pattern that matches no smoothable norm is a ConfigError."""
    consumers = qmodel.family.norm_consumers(qmodel.model, qmodel.sites)
    for pattern in config.smooth:
        if not any(matches(qmodel.site_by_name[name], pattern) for name in consumers):
            close = difflib.get_close_matches(pattern, list(consumers), n=3, cutoff=0.5)
            hint = (f"; close matches: {', '.join(close)}" if close else
                    f"; smoothable norms: {', '.join(list(consumers)[:4])}{', ...' if len(consumers) > 4 else ''}"
                    if consumers else f"; the {qmodel.family.name} family supports no smoothing")
            raise ConfigError(f"smooth pattern {pattern!r} matches no LayerNorm whose output feeds Linear "
                              f"sites{hint}")
    plan = {}
    for site in qmodel.sites:
        alpha = config.smooth_alpha(site) if site.name in consumers else None
        if alpha is not None:
            plan[site.name] = (alpha, consumers[site.name])
    return plan


def smoothing(qmodel: "QuantModel", config: QuantConfig
              ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, list[str]]]]:
    """The smoothed parameter values (parameter name -> new tensor, computed from the
    model's current, i.e. original, parameters) and norm -> (scales, consumers)."""
    values: dict[str, torch.Tensor] = {}
    scales: dict[str, tuple[torch.Tensor, list[str]]] = {}
    model = qmodel.model
    for norm_name, (alpha, consumers) in smoothing_plan(qmodel, config).items():
        channels = qmodel.quantizers[norm_name]["output"].channels
        if channels is None or channels.min is None:
            raise SiteError(f"site {norm_name}:output: no per-channel calibration statistics; run calibration "
                            f"first")
        norm_path = qmodel.site_by_name[norm_name].path
        norm = model.get_submodule(norm_path)
        if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
            raise ConfigError(f"smooth {norm_name}: the norm has no affine weight and bias to fold the scales into")
        act_absmax = torch.maximum(channels.min.abs(), channels.max.abs())
        paths = [qmodel.site_by_name[c].path for c in consumers]
        weights = [model.get_submodule(c).weight for c in paths]
        s = smoothing_scales(act_absmax, weights, alpha)
        dev = norm.weight.device
        # parameter names (module paths), not site names
        values[f"{norm_path}.weight"] = (norm.weight.detach() / s.to(dev, norm.weight.dtype)).clone()
        values[f"{norm_path}.bias"] = (norm.bias.detach() / s.to(dev, norm.bias.dtype)).clone()
        for c, w in zip(paths, weights):
            values[f"{c}.weight"] = (w.detach() * s.to(w.device, w.dtype)).clone()
        scales[norm_name] = (s, consumers)
    return values, scales
