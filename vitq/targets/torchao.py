"""torchao's PT2E quantization with ``X86InductorQuantizer`` (``prepare_pt2e`` /
``convert_pt2e``, then ``torch.compile`` for int8 kernels).

The names are module FQNs as ``X86InductorQuantizer.set_module_name_qconfig`` matches them:
the model is captured by ``torch.export`` (as PT2E needs it) and every ``aten.linear`` /
``aten.conv2d`` node of that graph is matched to a site through the parameter it reads
(the site's weight, as the family adapter names it); its name is the innermost module of
the node's ``nn_module_stack``. The recipe is per module type, Linear and Conv2d, with the
plan's scheme (uint8 asymmetric per-tensor activations on min-max observers, int8
symmetric per-channel weights), and ``set_module_name_qconfig(name, None)`` for the plan's
float Linear/Conv sites. The attention matmuls have no module of their own (they run in
the attention module, beside q/k/v/o) and residual adds are not a Linear/Conv: an int8
one has no counterpart in this recipe and is listed with that reason. The FQNs are those
of the model as vitq holds it (torchvision's fused q/k/v projection is split into three
Linears by its adapter).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .base import (EXCLUDE, NONE, QUANTIZE, Applied, ExportContext, Logits, SiteRow, Target, TargetError,
                   TargetExport, python_literal, register_target)

OPS = {"linear": "aten.linear.default", "conv": "aten.conv2d.default"}
OBSERVERS = {"minmax": "MinMaxObserver"}


def exported(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` of the float model, batch dynamic: the graph PT2E quantizes."""
    from quant.export_onnx import trace_example

    with torch.no_grad():
        return torch.export.export(Logits(model).eval(), (trace_example(example),),
                                   dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()


def module_fqn(node) -> str:
    """The innermost module of a node's ``nn_module_stack``, without the Logits wrapper's
    ``model.`` prefix (what set_module_name_qconfig matches, on the bare model)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    fqn = list(stack.values())[-1][0]
    return fqn[len("model."):] if fqn.startswith("model.") else fqn


def site_modules(qmodel, example: torch.Tensor) -> dict[str, str]:
    """Linear/Conv site name -> the FQN of its node's module in the exported graph."""
    params = {id(p): name for name, p in qmodel.model.named_parameters(remove_duplicate=False)}
    weights = {}
    for s in qmodel.sites:
        if s.kind in OPS:
            w = qmodel.family.weight(qmodel.model, s)
            if id(w) in params:
                weights[f"model.{params[id(w)]}"] = s.name
    saved = qmodel.snapshot()
    try:
        qmodel.apply(None)
        graph = exported(qmodel.model, example)
    finally:
        qmodel.restore(saved)
    out = {}
    for n in graph.graph.nodes:
        if n.op != "call_function" or str(n.target) not in OPS.values():
            continue
        w = n.args[1]
        if getattr(w, "op", None) == "get_attr" and w.target in weights:
            out[weights[w.target]] = module_fqn(n)
    return out


def row(ctx: ExportContext, site, fqn: str | None) -> SiteRow:
    plan = "int8" if ctx.is_int8(site) else "float"
    if site.kind in OPS:
        if not fqn:
            raise TargetError(f"--to torchao: site {site.name}: no {OPS[site.kind]} node of the exported graph reads "
                              f"its weight")
        return SiteRow(site.name, site.kind, plan, fqn, QUANTIZE if plan == "int8" else EXCLUDE)
    if plan == "float":
        return SiteRow(site.name, site.kind, plan, None, NONE, "float in this recipe (Linear/Conv modules only)")
    why = {"matmul_qk": "a matmul has no module of its own (it runs in the attention module, with q/k/v/o): "
                        "set_module_name_qconfig cannot select it",
           "matmul_av": "a matmul has no module of its own (it runs in the attention module, with q/k/v/o): "
                        "set_module_name_qconfig cannot select it",
           "residual": "a residual add is not a Linear/Conv: the recipe does not quantize it"}
    return SiteRow(site.name, site.kind, plan, None, NONE,
                   "no counterpart: " + why.get(site.kind, f"the recipe quantizes Linear/Conv inputs, not a "
                                                           f"{site.kind} output"))


@register_target("torchao")
class TorchAO(Target):
    tool = "torchao PT2E X86InductorQuantizer (set_module_type_qconfig / set_module_name_qconfig)"
    modules = ("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer",)
    extra = "pip install 'vitq[int8]'"

    def build(self, ctx: ExportContext) -> TargetExport:
        a, w = ctx.config.activation, ctx.config.weight
        if a.observer not in OBSERVERS or a.symmetric or not w.symmetric or not w.per_channel:
            raise TargetError(f"config {ctx.config.name}: --to torchao carries min-max uint8 asymmetric activations and "
                              f"int8 symmetric per-channel weights (the x86 int8 kernels'); the config asks otherwise")
        fqns = site_modules(ctx.qmodel, ctx.example)
        rows = [row(ctx, s, fqns.get(s.name)) for s in ctx.sites]
        arguments = {"quantizer": "X86InductorQuantizer",
                     "qconfig": {"activation": {"dtype": "uint8", "qscheme": "per_tensor_affine",
                                                "observer": OBSERVERS[a.observer]},
                                 "weight": {"dtype": "int8", "qscheme": "per_channel_symmetric", "ch_axis": 0,
                                            "observer": "PerChannelMinMaxObserver"}},
                     "module_types": [t for t, kind in (("torch.nn.Linear", "linear"), ("torch.nn.Conv2d", "conv"))
                                      if any(r.kind == kind and r.action == QUANTIZE for r in rows)],
                     "float_modules": [r.name for r in rows if r.action == EXCLUDE]}
        return TargetExport(self.name, self.tool, arguments, python_call(arguments), rows,
                            notes=["names: module FQNs from the nn_module_stack of the aten.linear/conv2d nodes of "
                                   "torch.export's graph of the model, matched to sites by the weight they read"])

    def apply(self, export: TargetExport, ctx: ExportContext, folder: Path) -> Applied:
        qmodel = ctx.qmodel
        t0 = time.perf_counter()
        saved = qmodel.snapshot()
        try:
            qmodel.apply(None)
            converted = pt2e_quantize(export.arguments, exported(qmodel.model, ctx.example), ctx.calibration)
        finally:
            qmodel.restore(saved)
        quantize_s = time.perf_counter() - t0
        int8 = set()
        for n in converted.graph.nodes:
            if n.op == "call_function" and str(n.target) in OPS.values():
                x = n.args[0]
                if getattr(x, "op", None) == "call_function" and "dequantize" in str(x.target):
                    int8.add(module_fqn(n))
        sites = [r.site for r in export.rows if r.name in int8]
        return Applied(converted, "torch", sites, quantize_s)


def pt2e_quantize(arguments: dict, graph: torch.fx.GraphModule, calibration) -> torch.fx.GraphModule:
    """prepare_pt2e / calibrate / convert_pt2e with the JSON ``arguments``."""
    from torchao.quantization.pt2e import observer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    q = arguments["qconfig"]
    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=getattr(observer, q["activation"]["observer"]).with_args(
                               eps=2 ** -12))
    weight = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric,
                              ch_axis=0, observer_or_fake_quant_ctr=getattr(observer, q["weight"]["observer"]).with_args(
                                  eps=2 ** -12))
    qconfig = QuantizationConfig(act, act, weight, None)
    quantizer = X86InductorQuantizer()
    for name in arguments["module_types"]:
        quantizer.set_module_type_qconfig({"torch.nn.Linear": nn.Linear, "torch.nn.Conv2d": nn.Conv2d}[name], qconfig)
    for fqn in arguments["float_modules"]:
        quantizer.set_module_name_qconfig(f"model.{fqn}", None)
    with torch.no_grad():
        prepared = prepare_pt2e(graph, quantizer)
        for pixels in calibration:
            prepared(pixels)
        return convert_pt2e(prepared)


def python_call(arguments: dict) -> str:
    return f'''"""The plan for torchao PT2E + X86InductorQuantizer (written by vitq export --to torchao)."""
import torch
from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

FLOAT_MODULES = {python_literal(arguments["float_modules"])}


def quantize(model, example, calibration_batches):
    """model: the float classifier (called as model(pixel_values=...)); example: a pixel batch."""
    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    weight = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric,
                              ch_axis=0, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=2 ** -12))
    qconfig = QuantizationConfig(act, act, weight, None)
    quantizer = X86InductorQuantizer()
    for module_type in ({", ".join(arguments["module_types"])}{"," if len(arguments["module_types"]) == 1 else ""}):
        quantizer.set_module_type_qconfig(module_type, qconfig)
    for name in FLOAT_MODULES:
        quantizer.set_module_name_qconfig(name, None)
    graph = torch.export.export(model.eval(), (), {{"pixel_values": example}}).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for pixels in calibration_batches:
            prepared(pixel_values=pixels)
    return convert_pt2e(prepared)  # run with torch.compile (inductor int8 kernels)
'''
