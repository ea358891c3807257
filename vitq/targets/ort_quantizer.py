"""ONNX Runtime's static quantizer (``onnxruntime.quantization.quantize_static``).

The names are the nodes of vitq's FP32 ONNX export (``model_fp32.onnx``) that each site
is (:mod:`quant.onnx_sites`). ``quantize_static`` quantizes a MatMul's constant B only
when it is an initializer, and the exporter writes a Linear as ``MatMul(x,
Transpose(W))``; so the model handed to it (``ort_quantizer_fp32.onnx``) is that export
with each Transpose of an initializer folded into a transposed initializer under the
Transpose's output name: every other node, site nodes included, keeps its name.

Arguments: ``nodes_to_quantize`` (the nodes of the plan's int8 sites: nothing else is
quantized, not a bias Add, not the position-embedding Add), ``nodes_to_exclude`` (the
nodes of its float sites), ``op_types_to_quantize`` (their op types), the plan's global
scheme (uint8 asymmetric activations per tensor, int8 symmetric weights per channel, MinMax
calibration), and ``OpTypesToExcludeOutputQuantization`` for MatMul/Gemm/Conv: vitq
quantizes their inputs only. Where the two disagree the row says so: ORT quantizes an
Add's two inputs as well as its output (vitq's residual site: the output), and it has no
counterpart for vitq's output-only sites (softmax, GELU, LayerNorm outputs) in int8.
"""

from __future__ import annotations

import time
from pathlib import Path

from .base import (EXCLUDE, NONE, QUANTIZE, Applied, ExportContext, SiteRow, Target, TargetError, TargetExport,
                   python_literal, register_target)

INPUT_OPS = ("MatMul", "Gemm", "Conv")  # vitq quantizes their inputs, never their output
INPUT_KINDS = ("conv", "linear", "matmul_qk", "matmul_av", "residual")  # quantized: their node reads a DQ
OBSERVERS = {"minmax": "MinMax"}
MODEL_INPUT = "ort_quantizer_fp32.onnx"
MODEL_OUTPUT = "ort_quantizer_int8.onnx"


def fold_weight_transposes(model) -> int:
    """Replace every Transpose whose input is an initializer by the transposed initializer,
    named as the Transpose's output; returns how many (other nodes keep their names)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    kept, folded = [], 0
    for n in model.graph.node:
        if n.op_type == "Transpose" and len(n.input) == 1 and n.input[0] in inits:
            array = numpy_helper.to_array(inits[n.input[0]])
            perm = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "perm"), None)
            model.graph.initializer.append(numpy_helper.from_array(array.transpose(perm).copy(), n.output[0]))
            folded += 1
        else:
            kept.append(n)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {i for n in model.graph.node for i in n.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for i in unused:
        model.graph.initializer.remove(i)
    return folded


def row(ctx: ExportContext, site, node) -> SiteRow:
    plan = "int8" if ctx.is_int8(site) else "float"
    if plan == "float":
        return SiteRow(site.name, site.kind, plan, node.node, EXCLUDE)
    if node.op_type in INPUT_OPS:
        return SiteRow(site.name, site.kind, plan, node.node, QUANTIZE)
    if site.kind == "residual":
        return SiteRow(site.name, site.kind, plan, node.node, QUANTIZE,
                       "ORT quantizes the Add's two inputs as well as its output (vitq: the output only)")
    return SiteRow(site.name, site.kind, plan, None, NONE,
                   f"no counterpart: vitq quantizes this {site.kind} output (node {node.node}, {node.op_type}) for "
                   f"its consumers; quantize_static quantizes operators' inputs, not one output alone")


@register_target("ort-quantizer")
class OrtQuantizer(Target):
    tool = "ONNX Runtime quantize_static (QDQ)"
    modules = ("onnx",)
    extra = "pip install 'vitq[onnx]'"

    def build(self, ctx: ExportContext) -> TargetExport:
        import onnx

        a, w = ctx.config.activation, ctx.config.weight
        if a.observer not in OBSERVERS:
            raise TargetError(f"config {ctx.config.name}: --to {self.name}: activation observer {a.observer!r} has no "
                              f"quantize_static calibration method; use {', '.join(OBSERVERS)}")
        nodes = ctx.site_nodes()
        model = onnx.load(str(ctx.fp32_onnx()))
        folded = fold_weight_transposes(model)
        folder = ctx.out / "targets"
        folder.mkdir(parents=True, exist_ok=True)
        model_input = folder / MODEL_INPUT
        onnx.save(model, str(model_input))
        names = {n.name for n in model.graph.node}
        rows = [row(ctx, s, nodes[s.name]) for s in ctx.sites]
        lost = [r.name for r in rows if r.name is not None and r.name not in names]
        if lost:  # pragma: no cover - the fold removes Transposes only
            raise TargetError(f"--to {self.name}: site nodes {lost[:3]} vanished from {model_input}")
        quantize = [r.name for r in rows if r.action == QUANTIZE]
        arguments = {
            "model_input": str(model_input), "model_output": str(folder / MODEL_OUTPUT),
            "quant_format": "QDQ",
            "op_types_to_quantize": sorted({nodes[r.site].op_type for r in rows if r.action == QUANTIZE}),
            "per_channel": bool(w.per_channel),
            "activation_type": "QInt8" if a.symmetric else "QUInt8", "weight_type": "QInt8" if w.symmetric else "QUInt8",
            "nodes_to_quantize": quantize,
            "nodes_to_exclude": [r.name for r in rows if r.action == EXCLUDE],
            "calibrate_method": OBSERVERS[a.observer],
            "extra_options": {"ActivationSymmetric": bool(a.symmetric), "WeightSymmetric": bool(w.symmetric),
                              "MatMulConstBOnly": False, "DedicatedQDQPair": True,
                              "OpTypesToExcludeOutputQuantization": list(INPUT_OPS)},
        }
        return TargetExport(self.name, self.tool, arguments, python_call(arguments), rows,
                            files={"fp32_onnx": str(ctx.fp32_onnx()), "model_input": str(model_input)},
                            notes=[f"{model_input.name}: model_fp32.onnx with {folded} weight Transpose(s) folded "
                                   f"into initializers (quantize_static quantizes initializer weights only); "
                                   f"every other node keeps its name"])

    def apply(self, export: TargetExport, ctx: ExportContext, folder: Path) -> Applied:
        import onnx

        folder.mkdir(parents=True, exist_ok=True)
        out = folder / MODEL_OUTPUT
        t0 = time.perf_counter()
        quantize_static(export.arguments, ctx.calibration, out)
        quantize_s = time.perf_counter() - t0
        model = onnx.load(str(out))
        int8 = quantized_nodes(model)
        sites = [r.site for r in export.rows if r.name in int8 and r.kind in INPUT_KINDS]
        return Applied(out, "onnxruntime", sites, quantize_s,
                       {"quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
                        "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in model.graph.node)})


def quantize_static(arguments: dict, calibration, model_output: Path) -> None:
    """``onnxruntime.quantization.quantize_static`` with the JSON ``arguments`` (enums by
    name), calibrated on ``calibration`` (pixel batches, one image per calibration step)."""
    from onnxruntime import quantization as q

    args = dict(arguments)
    model_input = args.pop("model_input")
    args.pop("model_output")
    args["quant_format"] = q.QuantFormat[args["quant_format"]]
    args["activation_type"] = q.QuantType[args["activation_type"]]
    args["weight_type"] = q.QuantType[args["weight_type"]]
    args["calibrate_method"] = q.CalibrationMethod[args["calibrate_method"]]
    images = [x[None].numpy() for batch in calibration for x in batch]

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(images)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"pixel_values": x}

    q.quantize_static(model_input, str(model_output), Reader(), **args)


def quantized_nodes(model) -> set[str]:
    """Names of the nodes of a QDQ model that read a DequantizeLinear on their first input."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type != "QuantizeLinear" and n.input and n.input[0] in dq}


def python_call(arguments: dict) -> str:
    return f'''"""The plan for ONNX Runtime's quantize_static (written by vitq export --to ort-quantizer)."""
import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

ARGS = {python_literal(arguments)}


class Images(CalibrationDataReader):
    """Calibration images preprocessed as for the model: float32 arrays (3, H, W)."""

    def __init__(self, images):
        self.items = iter(images)

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {{"pixel_values": np.asarray(x, np.float32)[None]}}


def quantize(images):
    args = dict(ARGS)
    model_input, model_output = args.pop("model_input"), args.pop("model_output")
    args.update(quant_format=QuantFormat[args["quant_format"]], activation_type=QuantType[args["activation_type"]],
                weight_type=QuantType[args["weight_type"]], calibrate_method=CalibrationMethod[args["calibrate_method"]])
    quantize_static(model_input, model_output, Images(images), **args)
    return model_output
'''
