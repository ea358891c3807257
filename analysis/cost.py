"""What a configuration costs: how much of the model's matmul work stays in int8, its
BitOps (MACs x operand bits, per format) and its weight bytes.

The cost the planner trades fidelity against, and the site counts every table
shows, computed in one place so the planner's rows and the evaluation's rows agree.
"""

from __future__ import annotations

import math

import torch

from quant.config import QuantConfig
from quant.formats.base import FLOAT_BITS
from quant.model import QuantModel
from quant.presets import preset
from quant.sites import Site

MATMUL_KINDS = ("linear", "conv", "matmul_qk", "matmul_av")


def site_macs(qmodel: QuantModel, pixels: torch.Tensor) -> dict[str, float]:
    """Multiply-accumulates per image of every Linear/Conv/matmul site, read from the
    tensor shapes of one float forward (no family-specific shape knowledge)."""
    macs: dict[str, float] = {}
    modules = dict(qmodel.model.named_modules())

    def tap(tq, x, out):
        # one image goes through (pixels[:1]): a tensor's elements are per image, whatever
        # its leading axes (Swin's attention runs on windows: batch x windows)
        site, per_image = tq.site, x.numel()
        if site.kind == "linear" and tq.slot == "input":
            macs[site.name] = per_image * modules[site.path].out_features
        elif site.kind == "conv" and tq.slot == "input":
            conv = modules[site.path]
            positions = (x.shape[-1] // conv.stride[1]) * (x.shape[-2] // conv.stride[0])
            macs[site.name] = positions * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        elif site.kind in ("matmul_qk", "matmul_av") and tq.slot in ("q", "v"):
            # q @ k^T: (H, T, D) x (H, D, T); probs @ v: (H, T, T) x (H, T, D): H*T*T*D each
            macs[site.name] = per_image * x.shape[-2]

    quantizers = [tq for tq in qmodel.tensor_quantizers() if tq.site.kind in MATMUL_KINDS]
    saved = qmodel.snapshot()
    for tq in quantizers:
        tq.taps.append(tap)
    try:
        qmodel.apply(None)
        qmodel(pixels[:1])
    finally:
        for tq in quantizers:
            tq.taps.remove(tap)
        qmodel.restore(saved)
    return macs


def float_site_names(config: QuantConfig | None, sites: list[Site]) -> list[str]:
    """Every site kept float, globs and float kinds expanded (FP32: all of them)."""
    if config is None:
        return [s.name for s in sites]
    return [s.name for s in sites if config.is_float(s)]


def config_cost(config: QuantConfig | None, sites: list[Site], macs: dict[str, float]) -> dict[str, float]:
    """int8 and float site counts (expanded), the skip-list length (float sites beyond the
    kinds a backend keeps float anyway: what a person chose to keep float) and the int8
    share of matmul MACs (%)."""
    floats = set(float_site_names(config, sites))
    kinds = set(config.float_kinds) if config is not None else set()
    skipped = sum(1 for s in sites if s.name in floats and s.kind not in kinds)
    total = sum(macs.values())
    int8_macs = sum(m for name, m in macs.items() if name not in floats)
    return {"int8_sites": len(sites) - len(floats), "float_sites": len(floats), "skipped_sites": skipped,
            "int8_macs_share": 100.0 * int8_macs / total if total else float("nan")}


def _bits(spec) -> int:
    return FLOAT_BITS if spec is None else spec.bits


def site_bitops(config: QuantConfig | None, site: Site, macs: float) -> float:
    """BitOps of one matmul site (AIMET's definition): MACs x bits of its two operands
    (a Linear/Conv: input x weight; a matmul: its two activations), a float operand
    counted at 32 bits; the bits are those of the site's specs under its format."""
    if config is None or config.is_float(site):
        return macs * FLOAT_BITS * FLOAT_BITS
    a, b = (_bits(spec) for spec in config.slot_specs(site).values())
    return macs * a * b


def bitops(config: QuantConfig | None, sites: list[Site], macs: dict[str, float]) -> float:
    """BitOps per image of ``config`` (None: FP32) over the matmul sites of ``macs``."""
    by_name = {s.name: s for s in sites}
    return sum(site_bitops(config, by_name[name], m) for name, m in macs.items())


def relative_bitops(config: QuantConfig | None, sites: list[Site], macs: dict[str, float]) -> float:
    """BitOps of ``config`` relative to the ``all`` preset (every matmul W8A8): 1.0 for
    ``all``, 16.0 for FP32."""
    return bitops(config, sites, macs) / bitops(preset("all", sites), sites, macs)


def weight_bytes(config: QuantConfig | None, qmodel: QuantModel) -> float:
    """Bytes of the Linear/Conv weights under ``config``: each element at its format's
    bits (float: 4 bytes), plus a float32 scale per output channel, per group
    (group-wise) or per tensor. Other parameters (biases, norms, embeddings) are not
    counted: they stay float in every config."""
    total = 0.0
    for site in qmodel.sites:
        if not site.has_weight():
            continue
        w = qmodel.family.weight(qmodel.model, site)
        spec = None if config is None or config.is_float(site) else config.slot_specs(site)["weight"]
        total += w.numel() * _bits(spec) / 8
        if spec is not None:
            total += 4 * _scale_count(w, spec)
    return total


def _scale_count(w: torch.Tensor, spec) -> int:
    if spec.group_size is not None:
        return w.shape[0] * -(-w.shape[1] // spec.group_size) * math.prod(w.shape[2:])
    return w.shape[0] if spec.per_channel else 1


# The costs that price every format exactly (``vitq plan --cost bitops|size``), with their units.
EXACT_COSTS = {
    "bitops": "% of all's BitOps (MACs x weight bits x activation bits, float at 32 bits)",
    "size": "MB of Linear/Conv weights (scales included)",
}


def exact_cost(kind: str, config: QuantConfig | None, qmodel: QuantModel, macs: dict[str, float]) -> float:
    """``bitops``: BitOps of ``config`` in % of the ``all`` preset's (100: every matmul W8A8);
    ``size``: its Linear/Conv weights in MB (10^6 bytes)."""
    if kind == "bitops":
        return 100.0 * relative_bitops(config, qmodel.sites, macs)
    if kind == "size":
        return weight_bytes(config, qmodel) / 1e6
    raise ValueError(f"unknown exact cost {kind!r}; choose one of {', '.join(EXACT_COSTS)}")
