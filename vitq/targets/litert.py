"""Google's AI Edge Quantizer on the LiteRT (TFLite) model: a recipe of ``regex`` ->
op config entries (``ai_edge_quantizer.Quantizer(float_tflite, recipe)``, calibrate, quantize).

The model is the classifier as vitq holds it, in its float state, converted by
``litert_torch.convert`` (the graph vitq's simulation runs, as torchao's target captures it);
its logits are checked against vitq's float model. The names are the *scopes* the quantizer
matches a recipe's regex against (an op's output tensor names joined by ``;``), read from
that .tflite, each site resolved to one op of the graph by its structure, never by a
name pattern:

- a Linear/Conv site: the FULLY_CONNECTED / CONV_2D op whose constant filter is the site's
  weight (bit-equal; a conv filter in LiteRT's OHWI layout);
- ``matmul_qk``: the BATCH_MATMUL whose operands come (through RESHAPE/TRANSPOSE) from the
  block's q and k ops; ``matmul_av``: the one whose operands come from a SOFTMAX (the
  block's ``softmax`` site) and from its v op;
- ``residual_attn`` / ``residual_mlp``: the ADD the o / fc2 op's output reaches (through
  layout ops and a multiply by a constant, DINOv2's LayerScale); ``gelu``: the GELU op the
  fc1 op feeds; a LayerNorm: the op producing the input of the block's q (``norm1``) or fc1
  (``norm2``) op, the final norm the op the head's input comes from through
  slicing/pooling/concatenation.

The recipe names the op of every int8 site, each by its whole scope (an anchored, escaped
regex that matches that op alone, checked), with the plan's scheme (int8 asymmetric
activations per tensor, int8 symmetric weights per channel, min-max), and the op of every
float site with ``no_quantize``; no ``.*`` entry, so nothing else is quantized. What a
LiteRT int8 op does beyond vitq's site is said in its row: an int8 FULLY_CONNECTED,
CONV_2D or BATCH_MATMUL also writes an int8 output, an ADD reads int8 inputs, a SOFTMAX or
GELU reads an int8 input. LiteRT's int8 activations are asymmetric (its kernels'): a config
with symmetric activations, per-tensor or asymmetric weights or another observer is refused
in one line. ``apply`` calibrates and quantizes with the recipe and runs the result in the
LiteRT interpreter (XNNPACK, one image per call: the converted graph has a batch of 1).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

from .base import (EXCLUDE, NONE, QUANTIZE, Applied, ExportContext, Logits, SiteRow, Target, TargetError, TargetExport,
                   python_literal, register_target)

LAYOUT = ("RESHAPE", "TRANSPOSE")
POOLING = LAYOUT + ("SLICE", "STRIDED_SLICE", "GATHER", "CONCATENATION", "MEAN")  # between the final norm and the head
OP_CONFIG = {"activation_tensor_config": {"num_bits": 8, "symmetric": False, "granularity": "TENSORWISE", "dtype": "INT"},
             "weight_tensor_config": {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"},
             "compute_precision": "INTEGER", "explicit_dequantize": False, "skip_checks": False,
             "min_weight_elements": 0}
BEYOND = {"FULLY_CONNECTED": "LiteRT's int8 FULLY_CONNECTED also writes an int8 output (vitq: input and weight only)",
          "CONV_2D": "LiteRT's int8 CONV_2D also writes an int8 output (vitq: input and weight only)",
          "BATCH_MATMUL": "LiteRT's int8 BATCH_MATMUL also writes an int8 output (vitq: both operands only)",
          "ADD": "LiteRT's int8 ADD also reads int8 inputs (vitq: the output only)",
          "SOFTMAX": "LiteRT's int8 SOFTMAX also reads an int8 input (vitq: the output only)",
          "GELU": "LiteRT's int8 GELU also reads an int8 input (vitq: the output only)"}
FP32_TFLITE = "litert_fp32.tflite"
INT8_TFLITE = "litert_int8.tflite"
INT8_TYPE = 9  # TensorType.INT8 in the TFLite schema


def convert(qmodel, example: torch.Tensor, path: Path) -> Path:
    """``litert_torch.convert`` of the float classifier (batch 1) written to ``path``;
    TargetError when its logits are not vitq's float model's."""
    import litert_torch

    x = example[:1].float()
    saved = qmodel.snapshot()
    try:
        qmodel.apply(None)
        with torch.no_grad():
            ref = qmodel(x)
            edge = litert_torch.convert(Logits(qmodel.model).eval(), (x,))
    finally:
        qmodel.restore(saved)
    out = torch.from_numpy(np.asarray(edge(x)))
    if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max())):
        raise TargetError(f"--to litert: the converted .tflite gives other logits than vitq's float model (max "
                          f"difference {float((out - ref).abs().max()):.3g})")
    path.parent.mkdir(parents=True, exist_ok=True)
    edge.export(str(path))
    return path


class Graph:
    """The ops of a .tflite's main subgraph: type, inputs, outputs, scope; the constant
    tensors' data (:meth:`read` builds one from a file)."""

    def __init__(self, types: list[str], inputs: list[list[int]], outputs: list[list[int]], scopes: list[str],
                 constants: dict, tensors: list | None = None) -> None:
        self.types, self.inputs, self.outputs, self.scopes = types, inputs, outputs, scopes
        self.constants, self.tensors = constants, tensors or []
        self.producer = {t: i for i, outs in enumerate(outputs) for t in outs}
        self.consumers: dict[int, list[int]] = {}
        for i, ins in enumerate(inputs):
            for t in ins:
                self.consumers.setdefault(t, []).append(i)

    @classmethod
    def read(cls, path: Path) -> "Graph":
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        model = fu.read_model(str(path))
        sg = model.subgraphs[0]
        inputs = [[t for t in op.inputs if t != -1] for op in sg.operators]
        constants = {t: fu.get_tensor_data(sg.tensors[t], model.buffers) for ops in inputs for t in ops}
        return cls([names[model.operatorCodes[op.opcodeIndex].builtinCode] for op in sg.operators], inputs,
                   [list(op.outputs) for op in sg.operators], [fu.get_op_scope(op, sg.tensors) for op in sg.operators],
                   {t: d for t, d in constants.items() if d is not None}, sg.tensors)

    def activations(self, op: int) -> list[int]:
        return [t for t in self.inputs[op] if t not in self.constants]

    def back(self, tensor: int, through=LAYOUT) -> set[int]:
        """The ops ``tensor`` comes from, back through ops of the types ``through``."""
        op = self.producer.get(tensor)
        if op is None:
            return set()
        if self.types[op] not in through:
            return {op}
        return set().union(*[self.back(t, through) for t in self.activations(op)])

    def forward(self, op: int) -> set[int]:
        """The ops ``op``'s output reaches, through layout ops and a multiply by a constant."""
        out = set()
        for t in self.outputs[op]:
            for c in self.consumers.get(t, []):
                scaled = self.types[c] == "MUL" and len(self.activations(c)) == 1
                out |= self.forward(c) if self.types[c] in LAYOUT or scaled else {c}
        return out

    def regex(self, op: int) -> str:
        return "^" + re.escape(self.scopes[op]) + "$"


def one(ops: set[int], what: str) -> int:
    if len(ops) != 1:
        raise TargetError(f"--to litert: {len(ops)} ops of the converted .tflite are {what}; expected one")
    return next(iter(ops))


def folded_norms(qmodel) -> dict[str, tuple[str, np.ndarray]]:
    """Linear site -> (the LayerNorm site reading into it alone, that norm's scale): the
    scale litert_torch's converter folds into the Linear's weight columns."""
    out = {}
    for norm, linears in qmodel.family.norm_consumers(qmodel.model, qmodel.sites).items():
        scale = getattr(qmodel.model.get_submodule(qmodel.site_by_name[norm].path), "weight", None)
        if scale is not None:
            out.update({s: (norm, scale.detach().float().numpy()) for s in linears})
    return out


def weight_ops(graph: Graph, qmodel) -> dict[str, tuple[int, str | None]]:
    """Linear/Conv site -> (the FULLY_CONNECTED / CONV_2D op whose filter is its weight,
    bit-equal, or bit-equal to it with its LayerNorm's scale folded into the columns; the
    LayerNorm site folded in, else None)."""
    out = {}
    filters = {i: graph.constants.get(graph.inputs[i][1]) for i, t in enumerate(graph.types)
               if t in ("FULLY_CONNECTED", "CONV_2D") and len(graph.inputs[i]) > 1}
    folds = folded_norms(qmodel)
    for s in qmodel.sites:
        if s.kind not in ("linear", "conv"):
            continue
        w = qmodel.family.weight(qmodel.model, s).detach().float()
        w = (w.permute(0, 2, 3, 1) if s.kind == "conv" else w).contiguous().numpy()
        candidates = [(w, None)] + ([(w * folds[s.name][1][None, :], folds[s.name][0])] if s.name in folds else [])
        found = {(i, norm) for i, f in filters.items() for x, norm in candidates
                 if f is not None and f.shape == x.shape and np.array_equal(f, x)}
        if len({i for i, _ in found}) == 1 and len(found) == 2:  # a scale of ones: nothing folded
            found = {(i, None) for i, _ in found}
        out[s.name] = next(iter(found)) if len(found) == 1 else (one({i for i, _ in found},
                                                                     f"the {s.kind} op whose filter is site {s.name}'s "
                                                                     f"weight"), None)
    return out


def site_ops(graph: Graph, qmodel) -> tuple[dict[str, int], dict[str, str]]:
    """Site name -> its op in ``graph`` (see the module docstring); Linear site -> the
    LayerNorm site whose scale the converter folded into its weight."""
    weights = weight_ops(graph, qmodel)
    ops = {site: op for site, (op, _) in weights.items()}
    by_role = {(s.block, s.role): s.name for s in qmodel.sites}
    head = None
    for s in qmodel.sites:
        if s.kind in ("linear", "conv"):
            if s.block is None and s.kind == "linear":
                head = s
            continue
        role = lambda r: ops[by_role[(s.block, r)]]  # noqa: E731 - the op of the block's site of role r
        if s.kind in ("matmul_qk", "matmul_av"):
            a, b = ("q", "k") if s.kind == "matmul_qk" else (None, "v")
            found = set()
            for i, t in enumerate(graph.types):
                if t != "BATCH_MATMUL" or len(graph.activations(i)) != 2:
                    continue
                x, y = (graph.back(u) for u in graph.activations(i))
                first = (x == {role(a)}) if a else (len(x) == 1 and graph.types[next(iter(x))] == "SOFTMAX")
                if first and y == {role(b)}:
                    found.add(i)
            ops[s.name] = one(found, f"site {s.name}'s BATCH_MATMUL")
            if s.kind == "matmul_av" and (s.block, "softmax") in by_role:
                ops[by_role[(s.block, "softmax")]] = one(graph.back(graph.activations(ops[s.name])[0]),
                                                          f"the SOFTMAX of site {s.name}")
        elif s.kind == "residual":
            src = role("o" if s.role == "residual_attn" else "fc2")
            ops[s.name] = one({i for i in graph.forward(src) if graph.types[i] == "ADD"}, f"site {s.name}'s ADD")
        elif s.kind == "gelu":
            ops[s.name] = one({i for i in graph.forward(role("fc1")) if graph.types[i] == "GELU"},
                              f"site {s.name}'s GELU")
    for s in qmodel.sites:
        if s.kind == "layernorm":
            if s.role in ("norm1", "norm2"):
                reader = ops[by_role[(s.block, "q" if s.role == "norm1" else "fc1")]]
                ops[s.name] = one(graph.back(graph.activations(reader)[0]), f"site {s.name}'s output op")
            elif head is not None and s.block is None:
                ops[s.name] = one(graph.back(graph.activations(ops[head.name])[0], POOLING),
                                  f"site {s.name}'s output op (the head's input)")
    return ops, {site: norm for site, (_, norm) in weights.items() if norm}


def row(ctx: ExportContext, site, graph: Graph, op: int | None, folded: str | None = None) -> SiteRow:
    plan = "int8" if ctx.is_int8(site) else "float"
    if op is None:
        if plan == "int8":
            raise TargetError(f"--to litert: int8 site {site.name} has no op resolved in the converted .tflite")
        return SiteRow(site.name, site.kind, plan, None, NONE, "float: no op of the .tflite resolved for this site; "
                                                               "the recipe quantizes only the ops it names")
    if plan == "float":
        return SiteRow(site.name, site.kind, plan, graph.scopes[op], EXCLUDE)
    reason = BEYOND.get(graph.types[op], "")
    if folded and site.kind == "layernorm":
        reason += (f"; litert_torch folds this LayerNorm's scale and shift into the ops it feeds ({folded}): this op "
                   f"writes the normalized input before the affine")
    elif folded:
        reason += (f"; litert_torch folds LayerNorm {folded}'s scale into this op's weight columns (its shift into the "
                   f"bias): LiteRT quantizes that weight and the normalized input before the affine, vitq the weight "
                   f"and the LayerNorm's output")
    return SiteRow(site.name, site.kind, plan, graph.scopes[op], QUANTIZE, reason)


@register_target("litert")
class LiteRt(Target):
    tool = "AI Edge Quantizer on the LiteRT model (recipe: regex on op scopes -> op config)"
    modules = ("litert_torch", "ai_edge_quantizer", "ai_edge_litert.interpreter")
    extra = "pip install 'vitq[litert]'"

    def build(self, ctx: ExportContext) -> TargetExport:
        a, w = ctx.config.activation, ctx.config.weight
        if a.symmetric or a.observer != "minmax" or not w.symmetric or not w.per_channel or w.observer != "minmax":
            raise TargetError(f"config {ctx.config.name}: --to litert carries LiteRT's int8: asymmetric activations per "
                              f"tensor, symmetric per-channel weights, min-max ranges; the config asks otherwise")
        path = convert(ctx.qmodel, ctx.example, ctx.out / "targets" / FP32_TFLITE)
        graph = Graph.read(path)
        ops, folded = site_ops(graph, ctx.qmodel)
        into = {}  # LayerNorm site -> the sites its scale was folded into
        for linear, norm in folded.items():
            into.setdefault(norm, []).append(linear)
        rows = [row(ctx, s, graph, ops.get(s.name), folded.get(s.name) or ", ".join(into.get(s.name, [])))
                for s in ctx.sites]
        named = [ops[r.site] for r in rows if r.action in (QUANTIZE, EXCLUDE)]
        for op in named:  # each regex selects its op alone among the ops of its type
            matches = [i for i, t in enumerate(graph.types) if t == graph.types[op] and re.search(graph.regex(op),
                                                                                                   graph.scopes[i])]
            if matches != [op]:
                raise TargetError(f"--to litert: the scope {graph.scopes[op]!r} names {len(matches)} "
                                  f"{graph.types[op]} ops; it cannot select one site's op")
        if len(set(named)) != len(named):
            raise TargetError("--to litert: two sites resolve to one op of the converted .tflite")
        recipe = [{"regex": graph.regex(ops[r.site]), "operation": graph.types[ops[r.site]],
                   "algorithm_key": "min_max_uniform_quantize" if r.action == QUANTIZE else "no_quantize",
                   **({"op_config": OP_CONFIG} if r.action == QUANTIZE else {})}
                  for r in rows if r.action in (QUANTIZE, EXCLUDE)]
        arguments = {"float_model": str(path), "recipe": recipe,
                     "calibration_images": len([x for b in ctx.calibration for x in b])}
        return TargetExport(self.name, self.tool, arguments, python_call(arguments), rows,
                            files={"fp32_tflite": str(path)},
                            notes=["names: op scopes (output tensor names) of litert_torch.convert's .tflite of the "
                                   "model, each site resolved by the graph's structure and the weights the ops read; "
                                   "ops named by no entry stay float"])

    def apply(self, export: TargetExport, ctx: ExportContext, folder: Path) -> Applied:
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / INT8_TFLITE
        images = [x[None].numpy() for batch in ctx.calibration for x in batch]
        t0 = time.perf_counter()
        aeq_quantize(export.arguments, images, out)
        quantize_s = time.perf_counter() - t0
        graph = Graph.read(out)
        int8 = set()
        for i, t in enumerate(graph.types):
            ins = graph.activations(i)
            if ins and graph.tensors[ins[0]].type == INT8_TYPE and t not in ("QUANTIZE", "DEQUANTIZE"):
                int8.add(graph.scopes[i])
        sites = [r.site for r in export.rows if r.action != NONE and r.name in int8]
        return Applied(out, "litert", sites, quantize_s,
                       {"quantize_ops": graph.types.count("QUANTIZE"), "dequantize_ops": graph.types.count("DEQUANTIZE"),
                        "int8_ops": len(int8)})


def signature(model_path) -> tuple[str, str]:
    """The .tflite's (signature key, input name)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_path))
    key, sig = next(iter(interpreter.get_signature_list().items()))
    return key, sig["inputs"][0]


def aeq_quantize(arguments: dict, images: list, out: Path) -> None:
    """Calibrate and quantize ``arguments["float_model"]`` with the recipe on ``images``
    (float32 arrays (1, 3, H, W)), the result written to ``out``."""
    from ai_edge_quantizer import quantizer

    key, name = signature(arguments["float_model"])
    q = quantizer.Quantizer(arguments["float_model"], arguments["recipe"])
    calibration = q.calibrate({key: [{name: x.astype(np.float32)} for x in images]}, num_threads=1)
    q.quantize(calibration, enable_progress_report=False).export_model(str(out), overwrite=True)


class LiteRtRunner:
    """``pixels -> logits`` in the LiteRT interpreter, one image per call."""

    def __init__(self, model_path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
        key, self.input = signature(model_path)
        self.run = self.interpreter.get_signature_runner(key)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        outs = [next(iter(self.run(**{self.input: x[None].float().numpy()}).values())) for x in pixels]
        return torch.from_numpy(np.concatenate(outs)).float()


def python_call(arguments: dict) -> str:
    return f'''"""The plan for AI Edge Quantizer on the LiteRT model (written by vitq export --to litert)."""
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from ai_edge_quantizer import quantizer

FLOAT_MODEL = {arguments["float_model"]!r}  # litert_torch.convert of the float classifier (batch 1)
RECIPE = {python_literal(arguments["recipe"])}


def quantize(images, out="litert_int8.tflite"):
    """images: calibration images preprocessed as for the model, float32 arrays (3, H, W)."""
    key, sig = next(iter(Interpreter(model_path=FLOAT_MODEL).get_signature_list().items()))
    q = quantizer.Quantizer(FLOAT_MODEL, RECIPE)
    calibration = q.calibrate({{key: [{{sig["inputs"][0]: np.asarray(x, np.float32)[None]}} for x in images]}})
    q.quantize(calibration).export_model(out, overwrite=True)
    return out
'''
