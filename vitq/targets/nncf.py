"""NNCF post-training quantization of the OpenVINO model (``nncf.quantize`` with an
``nncf.IgnoredScope``).

The model is vitq's FP32 ONNX export converted by ``openvino.convert_model``; the names
are the friendly names of that ov.Model's operations, read from it: a site's operation is
the one whose output carries the site node's output tensor name (:mod:`quant.onnx_sites`
gives the node), or, where OpenVINO fused the node into a larger operation (the
attention matmuls and softmax become one ``ScaledDotProductAttention``, a Linear's bias
Add joins its MatMul), the first operation downstream that carries one.

Which sites NNCF quantizes at all is read from NNCF itself: ``nncf.quantize`` runs once
on one calibration image without an ignored scope (the placement does not depend on the
data) and every site's operation is checked for a FakeQuantize on its inputs. A site the
plan keeps int8 but NNCF leaves float (its TRANSFORMER scheme puts no FakeQuantize on a
residual Add, nor on the probabilities and V of an attention) is listed with that reason;
a float site whose operation NNCF shares with an int8 site cannot be excluded alone and
is listed too. The call keeps the plan's global scheme: asymmetric activations (preset
MIXED), min-max ranges for the ``minmax`` observer (NNCF's own default, the mean of
per-sample min-max, for ``mean_minmax``), no SmoothQuant, no bias correction.
"""

from __future__ import annotations

import time
from pathlib import Path

from .base import (EXCLUDE, NONE, QUANTIZE, Applied, ExportContext, SiteRow, Target, TargetError, TargetExport,
                   python_literal, register_target)

RANGES = {"minmax": "MINMAX", "mean_minmax": None}  # vitq observer -> RangeEstimatorParametersSet (None: NNCF's default)
SDPA = "ScaledDotProductAttention"
THROUGH = ("Convert", "Reshape", "Transpose")  # between a FakeQuantize and the op it feeds
OUTPUT_REASON = ("an output site: NNCF quantizes operations' inputs, so this output is int8 exactly where the "
                 "sites that read it are; nothing to name")


def ov_operations(ov_model, fp32_onnx, nodes: dict) -> dict:
    """Site name -> the ov.Model operation that holds the site's ONNX node (see the module
    docstring); TargetError when none does."""
    import onnx

    by_tensor = {}
    for op in ov_model.get_ordered_ops():
        for out in op.outputs():
            for name in out.get_names():
                by_tensor.setdefault(name, op)
    graph = onnx.load(str(fp32_onnx)).graph
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    out = {}
    for site, node in nodes.items():
        todo, seen, op = [node.output], set(), None
        while todo and op is None:
            t = todo.pop(0)
            if t in seen:
                continue
            seen.add(t)
            op = by_tensor.get(t)
            todo += [o for c in consumers.get(t, []) for o in c.output]
        if op is None:
            raise TargetError(f"--to nncf: site {site} (ONNX node {node.node}) has no operation in the OpenVINO model")
        out[site] = op
    return out


def reads_fake_quantize(op, index: int) -> bool:
    """Input ``index`` of ``op`` comes from a FakeQuantize (through Convert/Reshape/Transpose)."""
    if index >= op.get_input_size():
        return False
    src = op.input_value(index).get_node()
    while src.get_type_name() in THROUGH:
        src = src.input_value(0).get_node()
    return src.get_type_name() == "FakeQuantize"


def quantized_in(op, kind: str) -> bool:
    """The site (of ``kind``) whose operation is ``op`` reads quantized inputs in an NNCF model."""
    if op.get_type_name() == SDPA:
        if kind == "matmul_qk":
            return reads_fake_quantize(op, 0) and reads_fake_quantize(op, 1)
        return False  # matmul_av: the probabilities live inside the fused op
    if kind == "residual":
        return any(reads_fake_quantize(op, i) for i in range(op.get_input_size()))
    if kind in ("linear", "conv", "matmul_qk", "matmul_av"):
        return reads_fake_quantize(op, 0)
    return False  # output sites (softmax, GELU, LayerNorm): NNCF quantizes inputs of operations


def nncf_quantize(arguments: dict, images: list, ignored: bool = True):
    """``nncf.quantize`` of ``openvino.convert_model(arguments["model"])`` with the JSON
    ``arguments`` on ``images`` (float32 arrays (1, 3, H, W)); ``ignored=False`` drops the
    ignored scope (the placement run)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    adv = arguments["advanced_parameters"]
    ranges = adv["activations_range_estimator_params"]
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(**adv["smooth_quant_alphas"]),
        disable_bias_correction=adv["disable_bias_correction"],
        **({"activations_range_estimator_params": getattr(RangeEstimatorParametersSet, ranges)} if ranges else {}))
    scope = arguments["ignored_scope"]
    return nncf.quantize(ov.convert_model(arguments["model"]), nncf.Dataset(images),
                         model_type=nncf.ModelType[arguments["model_type"]],
                         preset=nncf.QuantizationPreset[arguments["preset"]],
                         subset_size=min(arguments["subset_size"], len(images)),
                         ignored_scope=nncf.IgnoredScope(**scope) if ignored and scope["names"] else None,
                         advanced_parameters=advanced)


@register_target("nncf")
class Nncf(Target):
    tool = "NNCF nncf.quantize on the OpenVINO model (IgnoredScope)"
    modules = ("openvino", "nncf")
    extra = "pip install 'vitq[peers]'"

    def build(self, ctx: ExportContext) -> TargetExport:
        import openvino as ov

        a, w = ctx.config.activation, ctx.config.weight
        if a.observer not in RANGES:
            raise TargetError(f"config {ctx.config.name}: --to nncf: activation observer {a.observer!r} has no NNCF "
                              f"range estimator here; use {', '.join(RANGES)}")
        if not w.symmetric or not w.per_channel:
            raise TargetError(f"config {ctx.config.name}: --to nncf: NNCF quantizes weights symmetric per channel; "
                              f"the config asks otherwise")
        if not ctx.calibration:
            raise TargetError("--to nncf needs a calibration image (NNCF's placement is read from one nncf.quantize run)")
        fp32 = ctx.fp32_onnx()
        nodes = ctx.site_nodes()
        ops = ov_operations(ov.convert_model(str(fp32)), fp32, nodes)
        arguments = {
            "model": str(fp32), "model_type": "TRANSFORMER", "preset": "PERFORMANCE" if a.symmetric else "MIXED",
            "subset_size": len([x for b in ctx.calibration for x in b]),
            "ignored_scope": {"names": [], "validate": True},
            "advanced_parameters": {"smooth_quant_alphas": {"matmul": -1, "convolution": -1},
                                    "disable_bias_correction": True,
                                    "activations_range_estimator_params": RANGES[a.observer]}}
        placement = nncf_quantize(arguments, [ctx.calibration[0][:1].numpy()], ignored=False)
        placed = {op.get_friendly_name(): op for op in placement.get_ordered_ops()}
        rows, owner = [], {}
        for s in ctx.sites:
            name, op_type = ops[s.name].get_friendly_name(), ops[s.name].get_type_name()
            default = name in placed and quantized_in(placed[name], s.kind)
            if s.slots == ("output",):  # softmax, GELU, LayerNorm, residual outputs
                if s.kind != "residual":
                    plan = "int8" if ctx.is_int8(s) else "float"
                    rows.append(SiteRow(s.name, s.kind, plan, None, NONE, OUTPUT_REASON if plan == "float" else
                                        f"no counterpart: {OUTPUT_REASON}; its int8 output is not carried"))
                    continue
            if name not in placed:
                raise TargetError(f"--to nncf: OpenVINO names the operation of site {s.name} differently on each "
                                  f"conversion ({name}): it cannot be named in an IgnoredScope")
            if not ctx.is_int8(s):
                rows.append(SiteRow(s.name, s.kind, "float", name, EXCLUDE))
            elif default:
                rows.append(SiteRow(s.name, s.kind, "int8", name, QUANTIZE))
                owner.setdefault(name, s.name)
            else:
                fused = f" (fused into {op_type} {name} by OpenVINO)" if op_type == SDPA else f" ({op_type} {name})"
                rows.append(SiteRow(s.name, s.kind, "int8", None, NONE,
                                    f"no counterpart: NNCF (model_type=TRANSFORMER) puts no FakeQuantize on this "
                                    f"operation's inputs{fused}, read from nncf.quantize's placement on this model"))
        for r in rows:  # a float site on an operation an int8 site needs cannot be excluded alone
            if r.action == EXCLUDE and r.name in owner:
                r.action, r.reason = NONE, (f"shares the OpenVINO operation {r.name} with int8 site {owner[r.name]}; "
                                            f"NNCF quantizes that operation's inputs for both")
        arguments["ignored_scope"]["names"] = sorted({r.name for r in rows if r.action == EXCLUDE})
        return TargetExport(self.name, self.tool, arguments, python_call(arguments), rows,
                            files={"fp32_onnx": str(fp32)},
                            notes=["names: friendly names of openvino.convert_model(model_fp32.onnx)'s operations; "
                                   "which sites NNCF quantizes: read from nncf.quantize on one calibration image"])

    def apply(self, export: TargetExport, ctx: ExportContext, folder: Path) -> Applied:
        import openvino as ov

        folder.mkdir(parents=True, exist_ok=True)
        images = [x[None].numpy() for batch in ctx.calibration for x in batch]
        t0 = time.perf_counter()
        quantized = nncf_quantize(export.arguments, images)
        quantize_s = time.perf_counter() - t0
        ov.save_model(quantized, str(folder / "nncf_int8.xml"))
        ops = {op.get_friendly_name(): op for op in quantized.get_ordered_ops()}
        sites = [r.site for r in export.rows if r.name in ops and quantized_in(ops[r.name], r.kind)]
        return Applied(quantized, "openvino", sites, quantize_s,
                       {"fake_quantize_ops": sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())})


def python_call(arguments: dict) -> str:
    adv = arguments["advanced_parameters"]
    ranges = adv["activations_range_estimator_params"]
    ranges_arg = f",\n        activations_range_estimator_params=RangeEstimatorParametersSet.{ranges}" if ranges else ""
    return f'''"""The plan for NNCF on the OpenVINO model (written by vitq export --to nncf)."""
import nncf
import numpy as np
import openvino as ov
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
from nncf.quantization.range_estimator import RangeEstimatorParametersSet

IGNORED = {python_literal(arguments["ignored_scope"]["names"])}


def quantize(images):
    """images: calibration images preprocessed as for the model, float32 arrays (3, H, W)."""
    model = ov.convert_model({arguments["model"]!r})
    return nncf.quantize(
        model, nncf.Dataset([np.asarray(x, np.float32)[None] for x in images]),
        model_type=nncf.ModelType.{arguments["model_type"]}, preset=nncf.QuantizationPreset.{arguments["preset"]},
        subset_size={arguments["subset_size"]}, ignored_scope=nncf.IgnoredScope(names=IGNORED, validate=True),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1, convolution=-1),
            disable_bias_correction=True{ranges_arg}))
'''
