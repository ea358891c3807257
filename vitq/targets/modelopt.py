"""NVIDIA ModelOpt's PyTorch quantization (``mtq.quantize(model, config, forward_loop)``),
its ``mtq.INT8_DEFAULT_CFG`` as the base config and the plan in its ``quant_cfg``.

The model ModelOpt quantizes is a float copy of the classifier as vitq holds it with its
own forward back (vitq's patched forwards and hooks removed; its logits are checked equal to
vitq's float model, else a TargetError). The names are the quantizers ModelOpt inserts in
that model, read from one ``mtq.quantize`` on one calibration image with the base config and
every attention bmm and module output quantizer switched on (the placement run; which
quantizers exist and which are ever called does not depend on the data):

- a Linear/Conv site: ``<module>.input_quantizer`` and ``.weight_quantizer`` of the module
  whose weight is the site's (matched through the parameter, as the family adapter names it);
- a ``matmul_qk`` / ``matmul_av`` site: the ``q_bmm``/``k_bmm`` or ``p_bmm``/``v_bmm``
  quantizers of the attention module ModelOpt wraps (its ``_QuantAttention``) above the
  block's q projection;
- a LayerNorm output site: ``<module>.output_quantizer`` of ModelOpt's ``QuantLayerNorm``.

The config: the base's entries, then ``{"quantizer_name": NAME, "enable": False}`` for the
quantizers of the plan's float Linear/Conv sites, ``{"quantizer_name": NAME, "cfg": ...}``
switching on the bmm / LayerNorm output quantizers of its int8 sites (the base leaves them
off), and ``enable: False`` for every quantizer the base switches on at no int8 site of the
plan (ModelOpt's ``QuantLayerNorm`` input quantizers: the plan quantizes no LayerNorm
input). The quantizers it leaves on are checked to be exactly the int8 sites'.

What ModelOpt does not carry, each read from the placement run and listed with the reason: a
quantizer inserted but never called (with 8-bit integers ``_QuantAttention`` calls its
``p_bmm_quantizer`` only inside its FP8/NVFP4 attention kernels: an int8 ``matmul_av`` keeps
its probabilities float there), and the sites without any quantizer of ModelOpt's (residual
adds, the softmax and GELU outputs: its quantizers sit in modules). ModelOpt's INT8 is
symmetric (amax / 127) with ``max`` calibration: a config with asymmetric activations or
another observer is refused in one line. ``apply`` runs ModelOpt's fake-quant model in torch.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from pathlib import Path

import torch

from .base import (EXCLUDE, NONE, QUANTIZE, Applied, ExportContext, Logits, SiteRow, Target, TargetError, TargetExport,
                   python_literal, register_target)

INT8 = {"num_bits": 8, "axis": None}  # per-tensor 8-bit, ModelOpt's input_quantizer setting in INT8_DEFAULT_CFG
SLOT_QUANTIZERS = {"linear": ("input_quantizer", "weight_quantizer"), "conv": ("input_quantizer", "weight_quantizer"),
                   "matmul_qk": ("q_bmm_quantizer", "k_bmm_quantizer"), "matmul_av": ("p_bmm_quantizer", "v_bmm_quantizer"),
                   "layernorm": ("output_quantizer",)}
PROBE = [{"quantizer_name": "*bmm_quantizer", "cfg": INT8}, {"quantizer_name": "*output_quantizer", "cfg": INT8}]


def float_copy(qmodel) -> torch.nn.Module:
    """A copy of ``qmodel``'s classifier with the library's own forward: the original
    parameters, no patched forward, no hook, no quantizer of vitq's."""
    saved = qmodel.snapshot()
    try:
        qmodel.apply(None)
        model = copy.deepcopy(qmodel.model)
    finally:
        qmodel.restore(saved)
    for module in model.modules():
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_vitq", None)
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return model.eval()


def check_float_copy(qmodel, model: torch.nn.Module, example: torch.Tensor) -> None:
    """TargetError unless the copy's logits are vitq's float model's (the same classifier)."""
    saved = qmodel.snapshot()
    try:
        qmodel.apply(None)
        ref = qmodel(example)
    finally:
        qmodel.restore(saved)
    with torch.no_grad():
        out = model(pixel_values=example).logits
    if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())):
        raise TargetError(f"--to modelopt: {type(model).__name__} with its own forward gives other logits than vitq's "
                          f"float model (max difference {float((out - ref).abs().max()):.3g}); ModelOpt would quantize "
                          f"another model")


def mtq_quantize(model: torch.nn.Module, config: dict, calibration) -> torch.nn.Module:
    """``mtq.quantize`` of ``model`` (in place) with ``config``, calibrated on the pixel
    batches ``calibration``."""
    import modelopt.torch.quantization as mtq

    def forward_loop(m):
        with torch.no_grad():
            for pixels in calibration:
                m(pixel_values=pixels)
    return mtq.quantize(model, copy.deepcopy(config), forward_loop)


def quantizer_state(model: torch.nn.Module) -> dict[str, tuple[bool, bool]]:
    """Name -> (enabled, calibrated: has an amax) of every ModelOpt TensorQuantizer in ``model``."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    return {n: (bool(m.is_enabled), getattr(m, "_amax", None) is not None)
            for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def enabled_by(model: torch.nn.Module, quant_cfg: list) -> set[str]:
    """The quantizers of a ModelOpt-converted ``model`` that ``quant_cfg`` switches on
    (ModelOpt's own ``set_quantizer_by_cfg``, on a copy)."""
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg

    probe = copy.deepcopy(model)
    set_quantizer_by_cfg(probe, copy.deepcopy(quant_cfg))
    return {n for n, (on, _) in quantizer_state(probe).items() if on}


def disabling_entry(base: list, name: str) -> str | None:
    """The last entry of the base ``quant_cfg`` that switches quantizer ``name`` off by its
    wildcard (None: none does, or a later one switches it on again)."""
    last = None
    for entry in base:
        if entry.get("parent_class") or not fnmatch.fnmatch(name, entry["quantizer_name"]):
            continue
        on = entry.get("enable", "cfg" in entry)
        last = None if on else entry["quantizer_name"]
    return last


class Placement:
    """What ModelOpt does on this model: its quantizers and which are called (the placement
    run), the modules they sit in, and the attention modules it wraps."""

    def __init__(self, model: torch.nn.Module, base: list, calibration) -> None:
        quantized = mtq_quantize(copy.deepcopy(model), {"quant_cfg": base + PROBE, "algorithm": "max"}, calibration)
        self.model = quantized
        self.state = quantizer_state(quantized)
        self.base_on = enabled_by(quantized, base)
        self.attention = sorted(n for n, m in quantized.named_modules() if hasattr(m, "q_bmm_quantizer"))
        owners = {n.rsplit(".", 1)[0] for n in self.state}
        self.module_types = sorted({type(quantized.get_submodule(o)).__name__ for o in owners if o})

    def attention_above(self, path: str) -> str | None:
        """The innermost attention module of ModelOpt's holding module ``path``."""
        above = [a for a in self.attention if path.startswith(a + ".")]
        return max(above, key=len) if above else None


def site_module(qmodel, site) -> str:
    """The module path that holds a Linear/Conv site's weight (through the parameter)."""
    w = qmodel.family.weight(qmodel.model, site)
    for name, p in qmodel.model.named_parameters(remove_duplicate=False):
        if p is w:
            return name.rsplit(".", 1)[0]
    raise TargetError(f"--to modelopt: site {site.name}: its weight is no parameter of the model")


def owner_of(qmodel, site, placement: Placement) -> tuple[str | None, str]:
    """The module of ModelOpt's that holds the site's quantizers, or None and why not."""
    if site.kind in ("linear", "conv"):
        return site_module(qmodel, site), ""
    if site.kind in ("matmul_qk", "matmul_av"):
        q = next((s for s in qmodel.sites if s.block == site.block and s.kind == "linear" and s.role == "q"), None)
        attention = placement.attention_above(site_module(qmodel, q)) if q is not None else None
        return attention, "ModelOpt wraps no attention module (_QuantAttention) above this block's q projection"
    if site.kind == "layernorm":
        return site.path, ""
    return None, (f"no quantizer of ModelOpt's sits at a {site.kind} output: its quantizers are in modules "
                  f"({', '.join(placement.module_types)}) and the attention's bmm inputs, read from mtq.quantize "
                  f"on this model")


def site_row(ctx: ExportContext, site, placement: Placement, base: list) -> tuple[SiteRow, list[str]]:
    """The site's row and the quantizers it needs on (QUANTIZE) or off (EXCLUDE)."""
    plan = "int8" if ctx.is_int8(site) else "float"
    owner, why = owner_of(ctx.qmodel, site, placement)
    if owner is None:
        return SiteRow(site.name, site.kind, plan, None, NONE, ("no counterpart: " + why) if plan == "int8" else
                       f"float: {why}"), []
    names = [f"{owner}.{q}" for q in SLOT_QUANTIZERS[site.kind]]
    missing = [n for n in names if n not in placement.state]
    if missing:
        text = f"ModelOpt inserted no {', '.join(n.rsplit('.', 1)[1] for n in missing)} in {owner}"
        return SiteRow(site.name, site.kind, plan, None, NONE,
                       ("no counterpart: " + text) if plan == "int8" else f"float: {text}"), []
    if plan == "float":
        if site.kind in ("linear", "conv"):
            return SiteRow(site.name, site.kind, plan, owner, EXCLUDE), names
        return SiteRow(site.name, site.kind, plan, None, NONE,
                       f"float: INT8_DEFAULT_CFG leaves {', '.join(names)} off and the export switches on only "
                       f"the int8 sites'"), []
    uncalled = [n for n in names if not placement.state[n][1]]
    if uncalled:
        return SiteRow(site.name, site.kind, plan, None, NONE,
                       f"no counterpart: ModelOpt inserts {', '.join(uncalled)} but never calls it with 8-bit integers "
                       f"(no amax after calibration in mtq.quantize on this model; _QuantAttention applies "
                       f"p_bmm_quantizer only in its FP8/NVFP4 attention kernels)"), []
    off = [(n, disabling_entry(base, n)) for n in names if n not in placement.base_on and site.kind in ("linear", "conv")]
    off = [(n, e) for n, e in off if e]
    if off:
        return SiteRow(site.name, site.kind, plan, None, NONE,
                       f"no counterpart: INT8_DEFAULT_CFG switches {off[0][0]} off (entry {off[0][1]!r}); the export "
                       f"keeps the base config's exclusions"), []
    return SiteRow(site.name, site.kind, plan, owner, QUANTIZE), names


@register_target("modelopt")
class ModelOpt(Target):
    tool = "NVIDIA ModelOpt mtq.quantize (INT8_DEFAULT_CFG + quant_cfg entries)"
    modules = ("modelopt.torch.quantization",)
    extra = "pip install 'vitq[modelopt]'"

    def build(self, ctx: ExportContext) -> TargetExport:
        import modelopt.torch.quantization as mtq

        a, w = ctx.config.activation, ctx.config.weight
        if not a.symmetric or a.observer != "minmax" or not w.symmetric or w.observer != "minmax":
            raise TargetError(f"config {ctx.config.name}: --to modelopt carries ModelOpt's INT8: symmetric activations "
                              f"and weights (amax / 127) on min-max ranges ('max' calibration); the config asks "
                              f"otherwise (activation.symmetric: true, observer: minmax)")
        if not ctx.calibration:
            raise TargetError("--to modelopt needs a calibration image (ModelOpt's placement is read from one "
                              "mtq.quantize run)")
        model = float_copy(ctx.qmodel)
        check_float_copy(ctx.qmodel, model, ctx.example)
        base = copy.deepcopy(mtq.INT8_DEFAULT_CFG["quant_cfg"])
        if not w.per_channel:
            base.append({"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": None}})
        placement = Placement(model, base, [ctx.calibration[0][:1]])
        rows, on, off = [], [], []
        for s in ctx.sites:
            row, names = site_row(ctx, s, placement, base)
            rows.append(row)
            (on if row.action == QUANTIZE else off).extend(names)
        entries = ([{"quantizer_name": n, "cfg": dict(INT8)} for n in on if n not in placement.base_on]
                   + [{"quantizer_name": n, "enable": False} for n in off])
        extra = sorted(placement.base_on - set(on) - set(off))
        entries += [{"quantizer_name": n, "enable": False} for n in extra]
        quant_cfg = base + entries
        left_on = enabled_by(placement.model, quant_cfg)
        if left_on != set(on):  # pragma: no cover - the entries name exact quantizers
            raise TargetError(f"--to modelopt: the config leaves {sorted(left_on ^ set(on))[:3]} otherwise than the "
                              f"plan asks")
        arguments = {"config": {"quant_cfg": quant_cfg, "algorithm": "max"},
                     "base": "INT8_DEFAULT_CFG", "plan_entries": len(entries),
                     "calibration_images": len([x for b in ctx.calibration for x in b])}
        return TargetExport(
            self.name, self.tool, arguments, python_call(arguments), rows,
            notes=["names: the quantizers mtq.quantize inserts in the classifier (its own forward), read from one "
                   "placement run on one calibration image with every bmm/output quantizer switched on",
                   f"switched off beyond the plan's float sites: {len(extra)} quantizer(s) INT8_DEFAULT_CFG switches "
                   f"on at no site of the plan ({', '.join(sorted({n.rsplit('.', 1)[1] for n in extra})) or 'none'}"
                   f"{', e.g. ' + extra[0] if extra else ''})"])

    def apply(self, export: TargetExport, ctx: ExportContext, folder: Path) -> Applied:
        folder.mkdir(parents=True, exist_ok=True)
        model = float_copy(ctx.qmodel)
        t0 = time.perf_counter()
        quantized = mtq_quantize(model, export.arguments["config"], ctx.calibration)
        quantize_s = time.perf_counter() - t0
        state = quantizer_state(quantized)
        int8 = [r.site for r in export.rows if r.name is not None and all(
            state.get(f"{r.name}.{q}", (False, False)) == (True, True) for q in SLOT_QUANTIZERS[r.kind])]
        return Applied(Logits(quantized).eval(), "torch-eager", int8, quantize_s,
                       {"quantizers_on": sum(on for on, _ in state.values()),
                        "quantizers_calibrated_on": sum(on and amax for on, amax in state.values())})


def python_call(arguments: dict) -> str:
    return f'''"""The plan for NVIDIA ModelOpt (written by vitq export --to modelopt)."""
import torch
import modelopt.torch.quantization as mtq

# mtq.INT8_DEFAULT_CFG's quant_cfg, then the plan's entries (exact quantizer names)
CONFIG = {python_literal(arguments["config"])}


def quantize(model, calibration_batches):
    """model: the float classifier (called as model(pixel_values=...)); pixel batches to calibrate on."""
    def forward_loop(m):
        with torch.no_grad():
            for pixels in calibration_batches:
                m(pixel_values=pixels)
    return mtq.quantize(model, CONFIG, forward_loop)  # fake-quant in torch; mtq's ONNX export for TensorRT
'''
