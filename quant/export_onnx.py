"""Export a QuantModel to ONNX with QuantizeLinear/DequantizeLinear at its int8 tensors.

The graph is the instrumented model itself, captured by ``torch.export`` and
translated by torch's dynamo ONNX exporter (``torch.onnx.export(..., dynamo=True)``,
which needs ``onnxscript``). During export (:func:`export_mode`) every quantizing
slot runs ``quantized_decomposed.quantize_per_{tensor,channel}`` followed by the
matching ``dequantize_*`` op (torch's PT2E Q/DQ ops, which ``torch.export`` keeps as
they are and onnxscript's torchlib writes as QuantizeLinear + DequantizeLinear). So
the Q/DQ placement is by construction the one the fake-quant simulation runs: an int8
activation gets a Q/DQ pair with its calibrated scale and zero point (uint8 when
asymmetric, int8 when symmetric), a float site gets nothing. (The simulation's own
op, ``torch.fake_quantize_per_tensor_affine`` with tensor qparams, cannot be captured:
``torch.export`` decomposes it into ``_fake_quantize_per_tensor_affine_cachemask_tensor_qparams``,
which has no fake-tensor kernel in torch 2.13/2.14. The TorchScript exporter, which
torch deprecates, is no longer used.)

Weights: in QUANT mode a weight quantizer returns its cached fake-quantized weight,
which a trace would freeze into a float constant. During export weight quantizers
run Q -> DQ on the float weight instead; the post-processing (:func:`fold_weights`)
then replaces each ``Q(constant W)`` by an int8 initializer holding the integer codes,
bit-exact with the simulation's weights. A Linear's ``DQ -> Transpose`` (``x @ W.T``)
is folded too: the int8 initializer is stored transposed (``[in, out]``) and a
per-channel DQ uses ``axis=1`` (the output channel), the layout ONNX Runtime's QDQ
fusions expect. A ``Clip`` to the full int8/uint8 range between a Q and its DQ (how
torchlib writes a per-channel quantize's clamp) is a no-op and is dropped.

Remedies need nothing here: a config's smoothing (``QuantConfig.smooth``) and bias
correction change the model's parameters (LayerNorm affine, consumer weights,
Linear biases), which the export writes as they are: smoothed LayerNorm weights and
biases and corrected biases as float initializers, smoothed weights as int8.

Formats beyond int8 (``QuantConfig.formats``: int16 activations, int4 weights per channel
or group-wise, FP8 E4M3) take another route, because torch's Q/DQ ops and torchlib know
8-bit integers only: during export such a slot runs ``vitq_export::placeholder(x, slot)``,
an identity op the exporter writes as a ``vitq.export.Placeholder`` node naming the slot,
and :func:`expand_placeholders` replaces each by opset-21 ``QuantizeLinear`` +
``DequantizeLinear`` with the slot's parameters (uint16/int16 zero points, FLOAT8E4M3FN
zero points) or, for a weight, by an int4/int8/int16/FP8 initializer holding the codes the
simulation rounds to, and a ``DequantizeLinear`` (``axis``, and ``block_size`` for
group-wise weights: ONNX's blocked quantization). The model is then written at opset 21.

Only standard ``ai.onnx`` ops are produced (opset >= 18, the dynamo exporter's; 21 when a
tensor is not an 8-bit integer). Integer tensors of 4, 8 or 16 bits and FP8 E4M3 can be
exported; other widths are refused.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .config import ConfigError
from .model import QuantModel, TensorQuantizer
from .modes import OBSERVE, QUANT
from .quantizer import E4M3_MAX, QParams, expanded_qparams, quantize_to_int
from .store import atomic_write

Q_OP, DQ_OP = "QuantizeLinear", "DequantizeLinear"
STANDARD_DOMAINS = ("", "ai.onnx")
INT8_RANGES = {(0, 255): "uint8", (-128, 127): "int8"}
# integer grids opset 21 Q/DQ holds beside the 8-bit ones, by (qmin, qmax)
WIDE_RANGES = {(0, 65535): "uint16", (-32768, 32767): "int16", (0, 15): "uint4", (-8, 7): "int4"}
E4M3 = "float8e4m3fn"
PLACEHOLDER_DOMAIN, PLACEHOLDER_OP = "vitq.export", "Placeholder"
WIDE_OPSET = 21  # the first opset with int4/int16 Q/DQ and blocked quantization
OPTIMIZE = False


class ExportError(ConfigError):
    """The current quantization state cannot be written as a standard ONNX Q/DQ graph
    (a ConfigError: the CLI reports it in one line)."""


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise ExportError("ONNX export needs the `onnx` package: pip install 'vitq[onnx]'") from None
    return onnx


# -- what the graph must contain -------------------------------------------------
@dataclass
class Int8Tensor:
    """One distinct quantized tensor (``dtype``: its ONNX element type, int8 or another
    format's): the quantizer slots that quantize the same tensor
    with identical parameters (q/k/v projections read one LayerNorm output) share
    one Q/DQ pair in the graph."""

    slots: list[str]
    is_weight: bool
    dtype: str
    per_channel: bool


def onnx_dtype(qp: QParams) -> str:
    """The ONNX element type of ``qp``'s codes (uint8, int8, int16, int4, float8e4m3fn, ...)."""
    if qp.encoding == "e4m3":
        return E4M3
    return {**INT8_RANGES, **WIDE_RANGES}[(qp.qmin, qp.qmax)]


def is_standard_int8(qp: QParams) -> bool:
    """What torch's Q/DQ ops export as they are (opset 18): 8-bit integers per tensor or
    per channel; everything else goes through a placeholder (module docstring)."""
    return qp.encoding == "int" and qp.group_size is None and (qp.qmin, qp.qmax) in INT8_RANGES


def _qkey(qp: QParams) -> tuple:
    return (qp.qmin, qp.qmax, qp.ch_axis, tuple(qp.scale.tolist()), tuple(qp.zero_point.tolist()))


def _check_exportable(qmodel: QuantModel) -> None:
    for tq in qmodel.tensor_quantizers():
        if tq.mode == OBSERVE:
            raise ExportError(f"{tq.name} is observing (calibration in progress); apply a config first")
        if tq.mode != QUANT:
            continue
        qp = tq.qparams
        if qp.encoding == "int" and (qp.qmin, qp.qmax) not in {**INT8_RANGES, **WIDE_RANGES}:
            raise ExportError(f"{tq.name}: {tq.spec.bits}-bit quantization cannot be exported; "
                              f"ONNX Q/DQ holds 4-, 8- and 16-bit integers and FP8 E4M3")
        if qp.group_size is not None and not tq.is_weight:  # pragma: no cover - QuantConfig refuses it
            raise ExportError(f"{tq.name}: group-wise quantization of an activation cannot be exported")


def int8_tensors(qmodel: QuantModel, example_pixels: torch.Tensor) -> list[Int8Tensor]:
    """The distinct quantized tensors of the current state (int8, and the other formats'
    int16/int4/FP8), found by running the model once with a tap on every quantizing slot
    (independent of any ONNX graph)."""
    _check_exportable(qmodel)
    seen: dict[tuple, Int8Tensor] = {}
    keep: list[torch.Tensor] = []  # keep inputs alive so their id() stays unique

    def tap(tq: TensorQuantizer, x: torch.Tensor, out: torch.Tensor) -> None:
        if tq.mode != QUANT:
            return
        keep.append(x)
        key = (id(x), _qkey(tq.qparams))
        if key in seen:
            seen[key].slots.append(tq.name)
        else:
            seen[key] = Int8Tensor([tq.name], tq.is_weight, onnx_dtype(tq.qparams), tq.qparams.per_channel)

    tqs = [tq for tq in qmodel.tensor_quantizers() if tq.mode == QUANT]
    for tq in tqs:
        tq.taps.append(tap)
    try:
        qmodel(example_pixels[:1])
    finally:
        for tq in tqs:
            tq.taps.remove(tap)
    return list(seen.values())


# -- tracing -----------------------------------------------------------------------
class _ExportQuantizer(TensorQuantizer):
    """A TensorQuantizer as seen by the exporter: weights are fake-quantized from the
    float weight (traceable as Q -> DQ) rather than returned from the cache; taps
    are not run."""

    _scalar_qparams: tuple[float, int] | None = None  # per-tensor (scale, zero point), read before tracing

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == QUANT:
            if not is_standard_int8(self.qparams):
                return _placeholder_op()(x, self.name)
            return export_qdq(x, self.qparams, self._scalar_qparams)
        return x


_PLACEHOLDER: list = []  # the registered torch op, once


def _placeholder_op():
    """``torch.ops.vitq_export.placeholder(x, slot)``: an identity op ``torch.export``
    keeps as it is (a custom op), written to ONNX as ``vitq.export.Placeholder``."""
    if not _PLACEHOLDER:
        @torch.library.custom_op("vitq_export::placeholder", mutates_args=())
        def placeholder(x: torch.Tensor, slot: str) -> torch.Tensor:
            return x.clone()

        @placeholder.register_fake
        def _(x, slot):
            return torch.empty_like(x)
        _PLACEHOLDER.append(torch.ops.vitq_export.placeholder.default)
    return _PLACEHOLDER[0]


def _placeholder_translation() -> dict:
    """The exporter's translation of the placeholder op: a ``vitq.export.Placeholder``
    node with the slot's name (its ONNX schema registered once)."""
    import onnx
    import onnxscript
    from onnx.defs import OpSchema

    if not onnx.defs.has(PLACEHOLDER_OP, PLACEHOLDER_DOMAIN):
        onnx.defs.register_schema(OpSchema(
            PLACEHOLDER_OP, PLACEHOLDER_DOMAIN, 1, inputs=[OpSchema.FormalParameter("x", "T")],
            outputs=[OpSchema.FormalParameter("y", "T")], type_constraints=[("T", ["tensor(float)"], "")],
            attributes=[OpSchema.Attribute("slot", OpSchema.AttrType.STRING, "quantizer slot name")]))
    node = getattr(onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1), PLACEHOLDER_OP)

    def translate(x, slot: str):
        return node(x, slot=slot)
    return {_placeholder_op(): translate}


def _decomposed_ops():
    """torch's ``quantized_decomposed`` op library (registered on import)."""
    if not hasattr(torch.ops.quantized_decomposed, "quantize_per_tensor"):
        importlib.import_module("torch.ao.quantization.fx._decomposed")  # registers the ops
    return torch.ops.quantized_decomposed


def export_qdq(x: torch.Tensor, qp: QParams, scalars: tuple[float, int] | None = None) -> torch.Tensor:
    """Quantize -> dequantize ``x`` with ``qp`` through the PT2E Q/DQ ops (what
    ``torch.export`` keeps and the ONNX exporter writes as QuantizeLinear/DequantizeLinear).
    Numerically the simulation's fake-quant (round(x * (1/scale)) + zp, clamped)."""
    ops = _decomposed_ops()
    dtype = torch.uint8 if qp.qmin == 0 else torch.int8
    if qp.per_channel:
        scale, zp = qp.scale.float(), qp.zero_point.to(torch.int64)
        q = ops.quantize_per_channel(x, scale, zp, qp.ch_axis, qp.qmin, qp.qmax, dtype)
        return ops.dequantize_per_channel(q, scale, zp, qp.ch_axis, qp.qmin, qp.qmax, dtype)
    # python numbers, read outside the trace (a tensor read inside it is data-dependent)
    scale, zp = scalars or (float(qp.scale.reshape(-1)[0]), int(qp.zero_point.reshape(-1)[0]))
    q = ops.quantize_per_tensor(x, scale, zp, qp.qmin, qp.qmax, dtype)
    return ops.dequantize_per_tensor(q, scale, zp, qp.qmin, qp.qmax, dtype)


@contextlib.contextmanager
def export_mode(qmodel: QuantModel) -> Iterator[None]:
    """Within the block, every quantizer of ``qmodel`` behaves as :class:`_ExportQuantizer`."""
    _check_exportable(qmodel)
    classes = [(tq, type(tq)) for tq in qmodel.tensor_quantizers()]
    for tq, _ in classes:
        tq.__class__ = _ExportQuantizer
        if tq.mode == QUANT and not tq.qparams.per_channel:
            tq._scalar_qparams = (float(tq.qparams.scale.reshape(-1)[0]), int(tq.qparams.zero_point.reshape(-1)[0]))
    try:
        yield
    finally:
        for tq, cls in classes:
            tq.__class__ = cls
            tq.__dict__.pop("_scalar_qparams", None)


def _fold_param_casts(graph) -> int:
    """Fold ``Cast``/``CastLike`` of constants (how torchlib writes per-channel scales and
    zero points) into initializers, so that every Q/DQ parameter is an initializer;
    returns how many were folded. (The exporter's own optimizer is off: it would fold
    ``QuantizeLinear(constant weight)`` with ONNX's division by the scale, not bit-exact
    with the simulation's multiplication by its inverse; :func:`fold_weights` does it.)"""
    from onnx import helper, numpy_helper

    arrays = _initializer_arrays(graph)
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            arrays.setdefault(n.output[0], numpy_helper.to_array(n.attribute[0].t))
    folded, drop = 0, set()
    nodes = list(graph.node)  # hold the wrappers: id() of a dropped one must not be reused
    for n in nodes:
        if n.op_type not in ("Cast", "CastLike") or not all(i in arrays for i in n.input):
            continue
        x = arrays[n.input[0]]
        if n.op_type == "Cast":
            dtype = helper.tensor_dtype_to_np_dtype(_attr(n, "to"))
        else:
            dtype = arrays[n.input[1]].dtype
        if x.size > 1 << 16:  # parameters only, never a weight
            continue
        out = np.asarray(x).astype(dtype)
        arrays[n.output[0]] = out
        graph.initializer.append(numpy_helper.from_array(out, n.output[0]))
        drop.add(id(n))
        folded += 1
    if drop:
        kept = [n for n in nodes if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(kept)
    return folded


def _drop_noop_clips(graph) -> int:
    """Remove ``Q -> Clip(lo, hi) -> DQ`` clips whose bounds are the int8/uint8 range
    of the Q's output (no-ops: QuantizeLinear saturates to that range itself)."""
    arrays = _initializer_arrays(graph)
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def value(name):
        if name in arrays:
            return arrays[name]
        if name in consts:
            from onnx import numpy_helper
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    producers = {o: n for n in graph.node for o in n.output}
    rename, drop = {}, set()
    all_nodes = list(graph.node)  # hold the wrappers (see _fold_param_casts)
    for n in all_nodes:
        if n.op_type != "Clip" or len(n.input) < 3:
            continue
        q = producers.get(n.input[0])
        if q is None or q.op_type != Q_OP or len(q.input) < 3:
            continue
        zp, lo, hi = value(q.input[2]), value(n.input[1]), value(n.input[2])
        if zp is None or lo is None or hi is None:
            continue
        info = np.iinfo(zp.dtype)
        if int(lo) != info.min or int(hi) != info.max:
            raise ExportError(f"{n.name}: Clip({int(lo)}, {int(hi)}) after a QuantizeLinear narrows the "
                              f"{zp.dtype} range; not a standard Q/DQ pair")
        rename[n.output[0]] = n.input[0]
        drop.add(id(n))
    return _drop_and_rename(graph, all_nodes, drop, rename)


def export_graph(module: nn.Module, example: torch.Tensor, opset: int = 18, dynamic_batch: bool = True,
                 input_name: str = "pixel_values", output_name: str = "logits",
                 placeholders: dict[str, QParams] | None = None):
    """``module(example)`` through the dynamo ONNX exporter, post-processed into a
    standard Q/DQ graph (constants as initializers, placeholders expanded with
    ``placeholders`` (slot name -> its parameters), duplicate pairs merged, no-op clips
    dropped, weights folded to int8 initializers); returns the ModelProto. Call inside
    :func:`export_mode`."""
    onnx = _require_onnx()
    try:
        import onnxscript  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise ExportError("ONNX export needs the `onnxscript` package (torch's dynamo exporter): "
                          "pip install 'vitq[onnx]'") from None
    if opset < 18:
        raise ExportError(f"opset {opset}: the dynamo ONNX exporter writes opset >= 18")
    if placeholders and opset < WIDE_OPSET:
        opset = WIDE_OPSET
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                        input_names=[input_name], output_names=[output_name],
                                        dynamic_shapes=shapes, verbose=False, optimize=OPTIMIZE,
                                        custom_translation_table=_placeholder_translation() if placeholders else None)
        except Exception as e:  # torch.export / onnxscript raise many types
            raise ExportError(f"the dynamo ONNX exporter failed: {str(e).strip().splitlines()[0][:300]}") from e
    model = program.model_proto
    graph = model.graph
    _fold_param_casts(graph)
    _constants_to_initializers(graph)
    expand_placeholders(model, placeholders or {})
    _drop_noop_clips(graph)
    _prune(graph)
    _dedupe_qdq(graph)
    fold_weights(graph)
    del graph.value_info[:]  # the exporter's shapes of folded (transposed) weights are stale
    scalars = {i.name for i in graph.initializer if len(i.dims) == 0}
    for n in graph.node:  # the exporter's per-node stack traces and FX names: ~1.5 kB a node
        n.doc_string = ""
        del n.metadata_props[:]
        if n.op_type in (Q_OP, DQ_OP) and n.input[1] in scalars:  # per-tensor: an axis means nothing
            keep = [a for a in n.attribute if a.name != "axis"]
            del n.attribute[:]
            n.attribute.extend(keep)
    return model


class _Forward(nn.Module):
    """``QuantModel.__call__`` as a module (without its inference_mode, which a
    trace cannot record); holds the HF model so its weights become initializers."""

    def __init__(self, qmodel: QuantModel) -> None:
        super().__init__()
        self.model = qmodel.model
        self._qmodel = qmodel

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        q = self._qmodel
        return q.head(q.run_blocks(q.embed(pixel_values)))


# -- post-processing -------------------------------------------------------------
def _constants_to_initializers(graph) -> None:
    """Constant nodes feeding Q/DQ parameters become initializers; per-tensor
    scales/zero points become scalars (what the ONNX spec calls per-tensor)."""
    from onnx import numpy_helper

    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            users[name] = users.get(name, 0) + 1
    for n in graph.node:
        if n.op_type not in (Q_OP, DQ_OP):
            continue
        per_axis = False
        for pos in (1, 2):
            name = n.input[pos] if len(n.input) > pos else ""
            if name in consts:
                attr = consts[name].attribute[0]
                if attr.name != "value":
                    continue
                arr = numpy_helper.to_array(attr.t)
            elif name in inits:
                arr = numpy_helper.to_array(inits[name])
            else:
                continue
            if pos == 1:
                per_axis = any(a.name == "axis" for a in n.attribute) and arr.size > 1
            if not per_axis and arr.size == 1:
                arr = arr.reshape(())
            new = f"{name}__vitq"
            if new not in inits:
                inits[new] = numpy_helper.from_array(arr, new)
                graph.initializer.append(inits[new])
            n.input[pos] = new
    _prune(graph)


def _prune(graph) -> None:
    """Drop nodes and initializers nothing uses any more (one backward sweep)."""
    needed = {o.name for o in graph.output}
    keep = []
    for n in reversed(list(graph.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _drop_and_rename(graph, nodes, drop: set, rename: dict[str, str]) -> int:
    """Remove the nodes whose id() is in ``drop`` and point every input named in ``rename``
    at its replacement; ``nodes``: the graph's nodes (a held list when ids must stay valid).
    Returns how many tensors were renamed."""
    if rename:
        kept = [n for n in nodes if id(n) not in drop]
        for n in kept:
            for pos, name in enumerate(n.input):
                if name in rename:
                    n.input[pos] = rename[name]
        del graph.node[:]
        graph.node.extend(kept)
    return len(rename)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper
            return helper.get_attribute_value(a)
    return default


def _initializer_arrays(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def _dedupe_qdq(graph) -> int:
    """Merge Q/DQ pairs that quantize the same tensor with the same parameters (the
    exporter's CSE usually did it already); returns how many were merged."""
    arrays = _initializer_arrays(graph)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def key(q):
        params = tuple(arrays[i].tobytes() + str(arrays[i].dtype).encode() if i in arrays else i.encode()
                       for i in q.input[1:])
        return (q.input[0], params, _attr(q, "axis", 1))

    kept: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    drop = set()
    outputs = {o.name for o in graph.output}
    for q in [n for n in graph.node if n.op_type == Q_OP]:
        dqs = consumers.get(q.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != DQ_OP or dqs[0].output[0] in outputs:
            continue
        k = key(q)
        if k in kept:
            rename[dqs[0].output[0]] = kept[k]
            drop.update((id(q), id(dqs[0])))
        else:
            kept[k] = dqs[0].output[0]
    return _drop_and_rename(graph, graph.node, drop, rename)


def weight_codes(w: torch.Tensor, qp: QParams) -> np.ndarray:
    """The codes the simulation rounds weight ``w`` to: integers (int32), or E4M3 values
    as float32 (``w / scale`` saturated at +-448, through ``torch.float8_e4m3fn``)."""
    if qp.encoding == "e4m3":
        scale, _ = expanded_qparams(qp, w)
        return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float().numpy()
    return quantize_to_int(w, qp).numpy()


def _typed_tensor(name: str, values: np.ndarray, dtype: str):
    """An initializer of ONNX element type ``dtype`` (int4/uint4 packed, FP8 from the
    E4M3 values' bits) holding ``values``."""
    from onnx import TensorProto, helper

    values = np.ascontiguousarray(values)
    if dtype == E4M3:
        bits = torch.from_numpy(values.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, values.shape, bits.tobytes(), raw=True)
    if dtype in ("int4", "uint4"):
        kind = TensorProto.INT4 if dtype == "int4" else TensorProto.UINT4
        return helper.make_tensor(name, kind, values.shape, values.astype(np.int32).reshape(-1).tolist())
    from onnx import numpy_helper
    return numpy_helper.from_array(values.astype(np.dtype(dtype)), name)


def expand_placeholders(model, placeholders: dict[str, QParams]) -> int:
    """Replace every ``vitq.export.Placeholder`` node by the Q/DQ of its slot (see the
    module docstring): an activation by QuantizeLinear + DequantizeLinear with per-tensor
    scalars, a weight (an initializer) by its codes and a DequantizeLinear, a following
    2-D Transpose folded into them (codes ``[in, out]``, the axis swapped). Returns how
    many were replaced."""
    from onnx import helper, numpy_helper

    graph = model.graph
    arrays = _initializer_arrays(graph)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes, replaced = [], 0
    dropped: set[int] = set()
    for n in list(graph.node):
        if id(n) in dropped:
            continue
        if n.domain != PLACEHOLDER_DOMAIN:
            nodes.append(n)
            continue
        slot = _attr(n, "slot")
        slot = slot.decode() if isinstance(slot, bytes) else slot
        if slot not in placeholders:
            raise ExportError(f"placeholder for {slot}: no quantization parameters given")
        qp, dtype, x, out = placeholders[slot], onnx_dtype(placeholders[slot]), n.input[0], n.output[0]
        prefix = f"{slot.replace(':', '.')}_{dtype}"
        if x not in arrays:  # an activation: per-tensor scalars
            scale, zp = float(qp.scale.reshape(-1)[0]), int(qp.zero_point.reshape(-1)[0])
            graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}_scale"),
                                      _typed_tensor(f"{prefix}_zero_point", np.array(zp), dtype)])
            params = [f"{prefix}_scale", f"{prefix}_zero_point"]
            nodes.append(helper.make_node(Q_OP, [x, *params], [f"{prefix}_q"], name=f"{prefix}_Q"))
            nodes.append(helper.make_node(DQ_OP, [f"{prefix}_q", *params], [out], name=f"{prefix}_DQ"))
            replaced += 1
            continue
        w = torch.from_numpy(arrays[x].copy()).float()
        codes = weight_codes(w, qp)
        axis, block = (1, qp.group_size) if qp.group_size is not None else (qp.ch_axis, None)
        shape = (w.shape[0], -1, *w.shape[2:]) if block is not None else (-1,)
        scale = qp.scale.float().reshape(shape).numpy()
        zp = qp.zero_point.reshape(shape).numpy()
        after = consumers.get(out, [])
        if (len(after) == 1 and after[0].op_type == "Transpose" and codes.ndim == 2
                and list(_attr(after[0], "perm", [1, 0])) == [1, 0]):
            codes = codes.T
            if block is not None:
                scale, zp = scale.T, zp.T
            if axis is not None:
                axis = 1 - axis
            dropped.add(id(after[0]))
            out = after[0].output[0]
        if axis is None:
            scale, zp = scale.reshape(()), zp.reshape(())
        graph.initializer.extend([_typed_tensor(f"{prefix}_quantized", codes, dtype),
                                  numpy_helper.from_array(np.ascontiguousarray(scale, np.float32), f"{prefix}_scale"),
                                  _typed_tensor(f"{prefix}_zero_point", zp, dtype)])
        attrs = {} if axis is None else {"axis": int(axis)}
        if block is not None:
            attrs["block_size"] = int(block)
        nodes.append(helper.make_node(DQ_OP, [f"{prefix}_quantized", f"{prefix}_scale", f"{prefix}_zero_point"],
                                      [out], name=f"{prefix}_DQ", **attrs))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    _prune(graph)
    return replaced


def fold_weights(graph) -> int:
    """Replace ``Q(constant float W) -> DQ`` by ``int8 initializer -> DQ`` (and fold
    a following 2-D Transpose into the initializer); returns the weights folded."""
    from onnx import numpy_helper

    arrays = _initializer_arrays(graph)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    folded, drop, rename = 0, set(), {}
    for q in [n for n in graph.node if n.op_type == Q_OP]:
        w_name, s_name, z_name = q.input[0], q.input[1], q.input[2]
        if w_name not in arrays or s_name not in arrays or z_name not in arrays:
            continue  # an activation
        dqs = consumers.get(q.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != DQ_OP:
            raise ExportError(f"weight {w_name}: QuantizeLinear not followed by a single DequantizeLinear")
        dq = dqs[0]
        w = torch.from_numpy(arrays[w_name].copy())
        scale = torch.from_numpy(arrays[s_name].astype(np.float32).reshape(-1))
        zp = torch.from_numpy(arrays[z_name].astype(np.int32).reshape(-1))
        axis = _attr(q, "axis", 1) if scale.numel() > 1 else None
        if axis is not None and axis < 0:
            axis += w.dim()
        qmin, qmax = (0, 255) if arrays[z_name].dtype == np.uint8 else (-128, 127)
        # the simulation's own rounding (round(w * (1/scale)) half-to-even, + zp, clamp)
        codes = quantize_to_int(w, QParams(scale, zp, qmin, qmax, axis)).numpy().astype(arrays[z_name].dtype)
        after = consumers.get(dq.output[0], [])
        if (len(after) == 1 and after[0].op_type == "Transpose" and codes.ndim == 2
                and list(_attr(after[0], "perm", [1, 0])) == [1, 0] and dq.output[0] not in outputs):
            codes = codes.T.copy()
            if axis is not None:
                axis = 1 - axis
            rename[after[0].output[0]] = dq.output[0]
            drop.add(id(after[0]))
        name, k = f"{w_name}_quantized", 1
        while name in arrays:  # a weight quantized twice (tied weights)
            name, k = f"{w_name}_quantized_{k}", k + 1
        arrays[name] = codes
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes), name))
        dq.input[0] = name
        del dq.attribute[:]
        if axis is not None:
            from onnx import helper
            dq.attribute.append(helper.make_attribute("axis", int(axis)))
        drop.add(id(q))
        folded += 1
    nodes = [n for n in graph.node if id(n) not in drop]
    for n in nodes:
        for pos, name in enumerate(n.input):
            if name in rename:
                n.input[pos] = rename[name]
    for o in graph.output:
        if o.name in rename:  # pragma: no cover - a bare weight is never a model output
            raise ExportError(f"graph output {o.name} is a transposed weight")
    del graph.node[:]
    graph.node.extend(nodes)
    _prune(graph)
    return folded


# -- the whole export -------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    quantize_nodes: int
    dequantize_nodes: int
    int8_weights: int  # quantized weight initializers (int8, or int4/int16/FP8 of other formats) feeding a DQ
    activation_qdq: int  # QuantizeLinear nodes (activations quantized at run time)
    file_bytes: int
    ops: dict[str, int] = field(default_factory=dict)
    int8_tensors: list[Int8Tensor] = field(default_factory=list)  # what the graph was checked against

    @property
    def qdq_pairs(self) -> int:
        return self.dequantize_nodes


def summarize(model, path: str | os.PathLike | None = None) -> ExportResult:
    """Q/DQ statistics of an ONNX model (a ModelProto)."""
    graph = model.graph
    ops: dict[str, int] = {}
    for n in graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    arrays_dtype = {i.name: i.data_type for i in graph.initializer}
    from onnx import TensorProto
    coded = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT4,
             TensorProto.UINT4, TensorProto.FLOAT8E4M3FN}
    weights = sum(1 for n in graph.node if n.op_type == DQ_OP and arrays_dtype.get(n.input[0]) in coded)
    p = Path(path) if path is not None else None
    return ExportResult(p, ops.get(Q_OP, 0), ops.get(DQ_OP, 0), weights, ops.get(Q_OP, 0),
                        p.stat().st_size if p is not None and p.exists() else model.ByteSize(), ops)


def nonstandard_ops(model) -> list[str]:
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def export_onnx(qmodel: QuantModel, path: str | os.PathLike, example_pixels: torch.Tensor, opset: int = 18,
                dynamic_batch: bool = True, metadata: dict[str, str] | None = None) -> ExportResult:
    """Write the current quantization state of ``qmodel`` to ``path`` (ONNX, Q/DQ).

    ``example_pixels`` (N, 3, H, W) fixes the image size; the batch axis stays
    dynamic unless ``dynamic_batch`` is False. ``metadata`` goes to the model's
    metadata_props. The graph is checked to hold exactly one DequantizeLinear per
    distinct int8 tensor (:func:`int8_tensors`) and a QuantizeLinear per int8
    activation; returns what it contains.
    """
    onnx = _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_pixels.detach()[:2].float()
    if len(example) == 1:  # trace at batch 2: nothing can mistake the batch size for a constant
        example = example.expand(2, *example.shape[1:]).contiguous()
    expected = int8_tensors(qmodel, example)
    placeholders = {tq.name: tq.qparams for tq in qmodel.tensor_quantizers()
                    if tq.mode == QUANT and not is_standard_int8(tq.qparams)}
    with export_mode(qmodel):
        model = export_graph(_Forward(qmodel), example, opset, dynamic_batch, placeholders=placeholders)
    graph = model.graph
    bad = nonstandard_ops(model)
    if bad:
        raise ExportError(f"the exported graph uses non-standard ops {bad}")
    n_q, n_dq = sum(n.op_type == Q_OP for n in graph.node), sum(n.op_type == DQ_OP for n in graph.node)
    n_w = sum(t.is_weight for t in expected)
    if n_dq != len(expected) or n_q != len(expected) - n_w:
        raise ExportError(f"exported graph has {n_q} QuantizeLinear / {n_dq} DequantizeLinear, expected "
                          f"{len(expected) - n_w} / {len(expected)} for the int8 tensors of this config")
    model.producer_name = "vitq"
    if metadata:
        onnx.helper.set_model_props(model, {str(k): str(v) for k, v in metadata.items()})
    onnx.checker.check_model(model)
    atomic_write(path, lambda f: f.write(model.SerializeToString()))
    result = summarize(model, path)
    result.int8_tensors = expected
    return result


@contextlib.contextmanager
def float_state(qmodel: QuantModel) -> Iterator[None]:
    """Everything float inside the block; the previous state comes back after."""
    saved = qmodel.snapshot()
    qmodel.apply(None)
    try:
        yield
    finally:
        qmodel.restore(saved)
