"""Quantization maths: ranges -> (scale, zero point) -> fake-quant.

Integer grids (2..16 bits) go through torch's own ``fake_quantize_per_*_affine`` kernels
so the simulation rounds exactly as torch's int8 kernels do (``round(x * (1/scale))``,
half to even, then clamp) and passes gradients straight through. Two more grids:

- group-wise weights (``QuantSpec.group_size``): one scale per output channel and per
  group of ``group_size`` consecutive input channels (axis 1), ONNX's blocked quantization;
- FP8 E4M3 (``QuantSpec.encoding = "e4m3"``): ``x / scale`` saturated at +-448 and rounded
  to the nearest E4M3 value (half to even, subnormals down to 2^-9) by a cast through
  ``torch.float8_e4m3fn``; ``scale = amax / 448`` per tensor or per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest scale we ever emit: an all-zero tensor must not give scale 0 (division by
# zero) or NaN; float32 eps keeps the fake-quant of zeros exactly zero.
MIN_SCALE = float(torch.finfo(torch.float32).eps)

ENCODINGS = ("int", "e4m3")  # an integer grid, or FP8 E4M3 (torch.float8_e4m3fn)
E4M3_MAX = 448.0  # largest finite E4M3 value; larger magnitudes saturate to it


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, signedness, granularity, observer;
    ``group_size`` (weights): one scale per output channel and group of that many input
    channels; ``encoding``: ``int`` (an integer grid of ``bits``) or ``e4m3`` (FP8, 8 bits,
    symmetric by construction)."""

    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    group_size: int | None = None
    encoding: str = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer in 2..16, got {self.bits!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.encoding == "e4m3" and self.bits != 8:
            raise ValueError(f"encoding e4m3 is 8 bits, got bits {self.bits}")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
            if self.encoding != "int":
                raise ValueError("group_size applies to integer grids only (encoding int)")

    @property
    def qmin(self) -> int:
        if self.encoding == "e4m3":
            return -int(E4M3_MAX)
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        if self.encoding == "e4m3":
            return int(E4M3_MAX)
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass
class QParams:
    """Calibrated parameters of one tensor; tensors are 1-element or per-channel, or
    group-wise (``group_size``: shape (out, groups, *rest) of a weight (out, in, *rest),
    ``ch_axis`` 0); ``encoding`` as :class:`QuantSpec`'s."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    ch_axis: int | None = None
    group_size: int | None = None
    encoding: str = "int"

    @property
    def per_channel(self) -> bool:
        return self.ch_axis is not None

    def scalars(self) -> tuple[float, float, float, float]:
        """(1/scale as float32, scale, qmin - zp, qmax - zp) of a per-tensor QParams, as Python
        floats read once (a device sync once per config, none per forward)."""
        cached = self.__dict__.get("_scalars")
        if cached is None:
            scale = self.scale.reshape(-1)[:1].float().cpu()
            zp = int(self.zero_point.reshape(-1)[0])
            cached = (float(scale.reciprocal()), float(scale), float(self.qmin - zp), float(self.qmax - zp))
            self.__dict__["_scalars"] = cached
        return cached

    def to(self, device: torch.device | str) -> "QParams":
        """These parameters on ``device`` (self when already there)."""
        if self.scale.device == torch.device(device) and self.zero_point.device == torch.device(device):
            return self
        return QParams(self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax, self.ch_axis,
                       self.group_size, self.encoding)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, ch_axis: int | None = None) -> QParams:
    """Map a float range [lo, hi] (scalars or per-channel vectors) to scale/zero point.

    Symmetric: zero point 0, ``scale = max(|lo|, |hi|) / qmax`` so that +-amax land on
    +-127 (int8). Asymmetric: the range is widened to contain 0 (zero must be exactly
    representable, padding and ReLU-like zeros rely on it) and
    ``zero_point = qmin - round(lo / scale)``. E4M3: symmetric, ``scale = amax / 448``.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32).clone()
    hi = torch.as_tensor(hi, dtype=torch.float32).clone()
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("cannot quantize a non-finite range (NaN/Inf seen during calibration)")
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.encoding == "e4m3":
        scale = (torch.maximum(-lo, hi) / E4M3_MAX).clamp_min(MIN_SCALE)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return QParams(scale.reshape(-1), zero_point.reshape(-1), spec.qmin, spec.qmax, ch_axis, encoding="e4m3")
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (amax / spec.qmax).clamp_min(MIN_SCALE)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(MIN_SCALE)
        zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax).to(torch.int32)
    return QParams(scale.reshape(-1), zero_point.reshape(-1), spec.qmin, spec.qmax, ch_axis)


# Per-tensor fake-quant of activations without gradients goes through the composed kernel
# below (bit-identical, ~1.6x faster on CPU than torch's per-element kernel); False: always
# torch's kernel (benchmarks compare the two).
FAST_PER_TENSOR = True


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize ``x`` with ``qp`` exactly as torch's int kernels would."""
    if qp.encoding == "e4m3":
        return fake_quantize_e4m3(x, qp)
    if qp.group_size is not None:
        scale, zp = expanded_qparams(qp, x)
        q = torch.clamp(torch.round(x * (1.0 / scale)) + zp, qp.qmin, qp.qmax)
        return _straight_through(x, (q - zp) * scale)
    if qp.per_channel:
        return torch.fake_quantize_per_channel_affine(
            x, qp.scale.to(x.device), qp.zero_point.to(x.device), qp.ch_axis, qp.qmin, qp.qmax
        )
    if FAST_PER_TENSOR and not (x.requires_grad and torch.is_grad_enabled()) and x.dtype == torch.float32:
        return _fake_quantize_composed(x, qp)
    return torch.fake_quantize_per_tensor_affine(
        x, qp.scale.to(x.device), qp.zero_point.to(x.device), qp.qmin, qp.qmax
    )


def _fake_quantize_composed(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``(clamp(zp + round(x / s), qmin, qmax) - zp) * s`` as torch computes it (``x * (1 / s)``
    in float32, round half to even), written as ``clamp(round(x * inv), qmin - zp, qmax - zp) * s``:
    integers are exact in float32, so the result is bit-identical; three passes, no mask.
    The scalars are read once per QParams (``QParams.scalars``), not once per call."""
    inv, scale, lo, hi = qp.scalars()
    y = torch.mul(x, inv)
    y.round_()
    y.clamp_(lo, hi)
    return y.mul_(scale)
def expanded_qparams(qp: QParams, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) broadcastable to ``x``: per tensor, per channel (along
    ``ch_axis``) or group-wise (each group's value repeated over its input channels)."""
    scale, zp = qp.scale.to(x.device), qp.zero_point.to(x.device)
    if qp.group_size is not None:
        rest = x.shape[2:]
        scale = scale.reshape(x.shape[0], -1, *rest).repeat_interleave(qp.group_size, 1)[:, :x.shape[1]]
        zp = zp.reshape(x.shape[0], -1, *rest).repeat_interleave(qp.group_size, 1)[:, :x.shape[1]]
        return scale, zp
    if qp.per_channel:
        shape = [1] * x.dim()
        shape[qp.ch_axis] = -1
        return scale.reshape(shape), zp.reshape(shape)
    return scale.reshape(()), zp.reshape(())


def _straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in value, the identity in gradient (as torch's fake-quant kernels)."""
    if x.requires_grad and torch.is_grad_enabled():
        return x + (y - x).detach()
    return y


def fake_quantize_e4m3(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``x / scale`` saturated at +-448, rounded to E4M3 (nearest, half to even, through
    ``torch.float8_e4m3fn``), times ``scale`` (ONNX's FP8 QuantizeLinear/DequantizeLinear)."""
    scale, _ = expanded_qparams(qp, x)
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)
    return _straight_through(x, q * scale)


def quantize_to_int(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes of ``x`` (int32), for export and for checking the maths."""
    if qp.encoding != "int":
        raise ValueError(f"quantize_to_int: {qp.encoding} codes are not integers")
    scale, zp = expanded_qparams(qp, x)
    return torch.clamp(torch.round(x * (1.0 / scale)) + zp, qp.qmin, qp.qmax).to(torch.int32)

