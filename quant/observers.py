"""Observers: turn calibration statistics into a clipping range [lo, hi].

Every activation tensor is calibrated once into a :class:`StreamingHistogram`
(exact min/max plus a fixed-size histogram, so memory does not grow with the number
of images). Each observer is then a function of that histogram, which lets the
planner and the analyzers try another observer, bit width or signedness without
running calibration again. Weight ranges are computed directly on the static weight
tensor, per tensor or per output channel.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .quantizer import QParams, QuantSpec, fake_quantize, qparams_from_range

# "unit": the fixed range [0, 1], for tensors whose range is known whatever the data
# (softmax probabilities, the input of matmul_av): unsigned 8-bit gives scale 1/255,
# zero point 0, as int8 attention kernels quantize them.
# "mean_minmax": the mean over calibration samples of each sample's min and max (NNCF's
# default activation range, MEAN_MINMAX): a range no single extreme image sets.
OBSERVERS = ("minmax", "mean_minmax", "percentile", "mse", "entropy", "unit")
FIXED_RANGES = {"unit": (0.0, 1.0)}


class NonFiniteError(ValueError):
    """NaN or Inf reached an observer: calibration data or model is broken."""


def check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{bad} non-finite value(s) (NaN/Inf)")


def check_observer(name: str) -> None:
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")


class StreamingHistogram:
    """Exact min/max and a histogram over [-R, R] that widens (re-binning) on demand,
    plus the sums of the per-sample minima and maxima (a sample: one index of the first
    axis of the tensor the site sees; an image in ViT, DeiT, DINOv2; a window in Swin's
    window attention).

    Bins are symmetric around zero so one histogram serves signed ranges and |x|
    (entropy calibration folds it). 2048 bins per side is TensorRT's resolution.
    """

    def __init__(self, bins_per_side: int = 2048) -> None:
        self.bins_per_side = bins_per_side
        self.hist = torch.zeros(2 * bins_per_side, dtype=torch.float64)
        self.radius = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.samples = 0
        self.sample_min_sum = 0.0  # float64 sums of each sample's min and max
        self.sample_max_sum = 0.0

    @property
    def bin_width(self) -> float:
        return self.radius / self.bins_per_side

    def centers(self) -> torch.Tensor:
        return (torch.arange(2 * self.bins_per_side, dtype=torch.float64) + 0.5) * self.bin_width - self.radius

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        per_sample = x.reshape(x.shape[0] if x.dim() > 1 else 1, -1)
        x = x.reshape(-1)
        check_finite(x)
        lo, hi = torch.aminmax(x)
        sample_lo, sample_hi = per_sample.aminmax(dim=1)
        self.samples += per_sample.shape[0]
        self.sample_min_sum += float(sample_lo.double().sum())
        self.sample_max_sum += float(sample_hi.double().sum())
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        self.count += x.numel()
        amax = max(abs(self.min), abs(self.max))
        if amax > self.radius:
            self._widen(amax)
        if self.radius == 0.0:  # only zeros so far
            self.hist[self.bins_per_side] += x.numel()
            return
        self.hist += torch.histc(x, bins=2 * self.bins_per_side, min=-self.radius, max=self.radius).double().cpu()

    def _widen(self, amax: float) -> None:
        # Grow geometrically so a slowly rising max does not re-bin on every batch;
        # old counts move with their bin centres.
        new_radius = max(amax, 1.25 * self.radius)
        new_width = new_radius / self.bins_per_side
        centers = self.centers() if self.radius > 0 else torch.zeros_like(self.hist)
        idx = ((centers + new_radius) / new_width).floor().long().clamp(0, 2 * self.bins_per_side - 1)
        self.hist = torch.bincount(idx, weights=self.hist, minlength=2 * self.bins_per_side)
        self.radius = new_radius

    def state_dict(self) -> dict:
        return {"hist": self.hist, "radius": self.radius, "min": self.min, "max": self.max, "count": self.count,
                "samples": self.samples, "sample_min_sum": self.sample_min_sum, "sample_max_sum": self.sample_max_sum}

    @classmethod
    def from_state_dict(cls, state: dict) -> "StreamingHistogram":
        h = cls(len(state["hist"]) // 2)
        h.hist, h.radius, h.min, h.max, h.count = (
            state["hist"], state["radius"], state["min"], state["max"], state["count"])
        h.samples, h.sample_min_sum, h.sample_max_sum = state["samples"], state["sample_min_sum"], state["sample_max_sum"]
        return h


class ChannelRange:
    """Per-channel (last dimension) min, max and sum of an activation, beside its
    per-tensor histogram: what SmoothQuant-style smoothing needs (the range of
    ``X / s`` is exact from them) and bias correction (the channel means)."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None  # float64
        self.rows = 0

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.rows, 1)).float()

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if rows.numel() == 0:
            return
        lo, hi, total = rows.amin(0).cpu(), rows.amax(0).cpu(), rows.sum(0, dtype=torch.float64).cpu()
        if self.min is None:
            self.min, self.max, self.sum = lo, hi, total
        else:
            if lo.shape != self.min.shape:
                raise ValueError(f"channel count changed during calibration ({self.min.numel()} -> {lo.numel()})")
            self.min, self.max, self.sum = torch.minimum(self.min, lo), torch.maximum(self.max, hi), self.sum + total
        self.rows += rows.shape[0]

    def state_dict(self) -> dict:
        return {"channel_min": self.min, "channel_max": self.max, "channel_sum": self.sum, "channel_rows": self.rows}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ChannelRange":
        c = cls()
        c.min, c.max, c.sum, c.rows = (state["channel_min"], state["channel_max"], state["channel_sum"],
                                       state["channel_rows"])
        return c


def smoothed_range(channels: ChannelRange, scale: torch.Tensor) -> tuple[float, float]:
    """The exact range of ``X / scale`` (scale > 0 per channel) from X's per-channel
    min/max: [min_j(min_j / s_j), max_j(max_j / s_j)]. Used for every observer on
    a smoothed tensor (see ``TensorQuantizer.quantize``)."""
    if channels.min is None:
        raise RuntimeError("no per-channel calibration statistics for this tensor")
    scale = scale.to(channels.min.device)  # statistics stay where calibration kept them (CPU)
    return float((channels.min / scale).min()), float((channels.max / scale).max())


def _clip(h: StreamingHistogram, threshold: float) -> tuple[float, float]:
    return max(h.min, -threshold), min(h.max, threshold)


def minmax_range(h: StreamingHistogram, spec: QuantSpec) -> tuple[float, float]:
    """The range that never clips."""
    return h.min, h.max


def mean_minmax_range(h: StreamingHistogram, spec: QuantSpec) -> tuple[float, float]:
    """The mean over calibration samples of each sample's min and of its max (NNCF's
    MEAN_MINMAX): extremes that only a few images reach are clipped."""
    return h.sample_min_sum / h.samples, h.sample_max_sum / h.samples


def percentile_range(h: StreamingHistogram, spec: QuantSpec) -> tuple[float, float]:
    """Clips both tails: [q(1-p), q(p)] of the observed distribution."""
    p = spec.percentile / 100.0
    cdf = torch.cumsum(h.hist, 0) / h.hist.sum()

    def quantile(q: float) -> float:
        i = min(int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64))[0]), len(cdf) - 1)
        prev = float(cdf[i - 1]) if i > 0 else 0.0
        frac = 0.0 if float(cdf[i]) == prev else (q - prev) / (float(cdf[i]) - prev)
        return i * h.bin_width - h.radius + frac * h.bin_width

    return max(h.min, quantile(1.0 - p)), min(h.max, quantile(p))


def mse_range(h: StreamingHistogram, spec: QuantSpec, candidates: int = 200) -> tuple[float, float]:
    """The clipping threshold with the least expected squared error.

    Error model: values inside the grid carry uniform rounding noise scale^2/12,
    values outside add their squared distance to the nearest grid edge.
    """
    centers, counts = h.centers(), h.hist
    amax = max(abs(h.min), abs(h.max))
    best, best_err = (h.min, h.max), math.inf
    for t in np.linspace(amax / candidates, amax, candidates):
        lo, hi = _clip(h, float(t))
        qp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
        scale, zp = float(qp.scale[0]), float(qp.zero_point[0])
        edge_lo, edge_hi = (spec.qmin - zp) * scale, (spec.qmax - zp) * scale
        distance = torch.where(centers < edge_lo, edge_lo - centers, (centers - edge_hi).clamp_min(0))
        inside = distance == 0
        err = float(counts[inside].sum()) * scale * scale / 12.0 + float((counts * distance**2).sum())
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def entropy_range(h: StreamingHistogram, spec: QuantSpec, stride: int = 8) -> tuple[float, float]:
    """TensorRT-style KL calibration on |x|: the threshold whose 2^(bits-1)-level
    quantization of the distribution diverges least from it."""
    b = h.bins_per_side
    folded = (h.hist[b:] + h.hist[:b].flip(0)).numpy()
    levels = 2 ** (spec.bits - 1)
    last = int(np.nonzero(folded)[0].max()) + 1
    if last <= levels:
        return h.min, h.max
    best_i, best_kl = last, math.inf
    for i in list(range(levels, last, stride)) + [last]:
        kl = _kl_for_threshold(folded, i, levels)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return _clip(h, (best_i + 0.5) * h.bin_width if best_i < last else best_i * h.bin_width)


def _kl_for_threshold(folded: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q): P = first ``i`` bins with the tail added to the last one, Q = those
    bins merged into ``levels`` groups and spread back over each group's non-empty bins."""
    p = folded[:i].copy()
    p[i - 1] += folded[i:].sum()
    nonzero = folded[:i] > 0
    groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
    group_mass = np.bincount(groups, weights=folded[:i], minlength=levels)
    group_support = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, group_mass[groups] / np.maximum(group_support[groups], 1), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return math.inf
    p, q = p / p_sum, q / q_sum
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))).sum())


_ACTIVATION_RANGES: dict[str, Callable[[StreamingHistogram, QuantSpec], tuple[float, float]]] = {
    "minmax": minmax_range,
    "mean_minmax": mean_minmax_range,
    "percentile": percentile_range,
    "mse": mse_range,
    "entropy": entropy_range,
}


def activation_qparams(h: StreamingHistogram, spec: QuantSpec) -> QParams:
    """Per-tensor quantization parameters of an activation from its calibration stats."""
    check_observer(spec.observer)
    if spec.group_size is not None:
        raise ValueError("group_size applies to weights only")
    if spec.encoding == "e4m3" and spec.observer in ("mse", "entropy"):
        raise ValueError(f"the {spec.observer} observer models an integer grid; use minmax, percentile or unit "
                         f"for e4m3 activations")
    if h.count == 0:
        raise RuntimeError("no calibration data reached this tensor")
    if spec.observer in FIXED_RANGES:
        lo, hi = FIXED_RANGES[spec.observer]
    else:
        lo, hi = (h.min, h.max) if h.radius == 0.0 else _ACTIVATION_RANGES[spec.observer](h, spec)
    return qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)


def weight_qparams(weight: torch.Tensor, spec: QuantSpec) -> QParams:
    """Quantization parameters of a weight (output channel = axis 0 when per-channel).

    Weights are static, so ranges come from the exact tensor: minmax, a percentile,
    or an MSE search over clipping factors measured with the real fake-quant.
    Group-wise (``spec.group_size`` g): one range per output channel, per group of g
    consecutive input channels (axis 1; the last group may be shorter) and per position
    of any further axes (a Conv's kernel), as ONNX's blocked quantization along axis 1.
    """
    check_observer(spec.observer)
    w = weight.detach().float()
    check_finite(w)
    if spec.group_size is not None:
        return _group_qparams(w, spec)
    rows = w.reshape(w.shape[0], -1) if spec.per_channel else w.reshape(1, -1)
    lo, hi = _row_ranges(rows, spec)
    return qparams_from_range(lo, hi, spec, ch_axis=0 if spec.per_channel else None)


def _group_qparams(w: torch.Tensor, spec: QuantSpec) -> QParams:
    if w.dim() < 2:
        raise ValueError(f"group_size needs a weight of 2 or more axes, got shape {tuple(w.shape)}")
    g, (out, n_in), rest = spec.group_size, w.shape[:2], w.shape[2:]
    groups = -(-n_in // g)
    # (out, groups * g, *rest) padded with copies of the last input channel (changes no range),
    # then one row per (out, group, *rest) holding its g values
    pad = groups * g - n_in
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad, *rest)], 1)
    rows = w.reshape(out, groups, g, *rest).movedim(2, -1).reshape(-1, g)
    lo, hi = _row_ranges(rows, spec)
    qp = qparams_from_range(lo, hi, spec, ch_axis=0)
    qp.group_size = g
    return qp


def _row_ranges(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] of each row of ``rows`` by the weight observer of ``spec``."""
    if spec.observer == "minmax":
        lo, hi = rows.amin(1), rows.amax(1)
    elif spec.observer == "percentile":
        q = spec.percentile / 100.0
        lo, hi = _row_quantile(rows, 1.0 - q), _row_quantile(rows, q)
    elif spec.observer == "mse":
        lo, hi = _mse_row_ranges(rows, spec)
    else:
        raise ValueError(f"the {spec.observer} observer calibrates activations; use minmax, percentile or mse "
                         f"for weights")
    return lo, hi


def _row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    n = rows.shape[1]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return rows.kthvalue(k, dim=1).values


def _mse_row_ranges(rows: torch.Tensor, spec: QuantSpec, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    lo0, hi0 = rows.amin(1), rows.amax(1)
    best_err = torch.full_like(lo0, math.inf)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for alpha in torch.linspace(1.0 / steps, 1.0, steps):
        lo, hi = lo0 * alpha, hi0 * alpha
        err = (fake_quantize(rows, qparams_from_range(lo, hi, spec, ch_axis=0)) - rows).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi
