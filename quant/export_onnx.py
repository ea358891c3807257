"""Export a QuantModel to ONNX with QuantizeLinear/DequantizeLinear at its quantized tensors.

The graph is the instrumented model itself, captured by ``torch.export`` and
translated by torch's dynamo ONNX exporter (``torch.onnx.export(..., dynamo=True)``,
which needs ``onnxscript``). During export (:func:`export_mode`) every quantizing slot
runs ``vitq_export::placeholder(x, slot)``, an identity custom op that ``torch.export``
keeps and the exporter writes as a ``vitq.export.Placeholder`` node naming the slot;
:func:`expand_placeholders` then replaces each by the slot's Q/DQ, built here with its
calibrated parameters. So the Q/DQ placement is by construction the one the fake-quant
simulation runs, and a float site gets nothing. (The simulation's own op,
``torch.fake_quantize_per_tensor_affine`` with tensor qparams, cannot be captured:
``torch.export`` decomposes it into ``_fake_quantize_per_tensor_affine_cachemask_tensor_qparams``,
which has no fake-tensor kernel in torch 2.13/2.14; torch's PT2E Q/DQ ops, which torchlib
translates, know 8-bit integers only.)

- An activation gets ``QuantizeLinear -> DequantizeLinear`` with per-tensor scalars: a
  uint8/int8 zero point (int8 format), uint16/int16 (``a16w8``) or FLOAT8E4M3FN (``fp8``).
- A weight (the float initializer the placeholder reads) becomes an initializer holding
  the codes the simulation rounds to (int8, int4, int16, or E4M3 values), bit-exact with
  the simulation's weights, and a ``DequantizeLinear`` with ``axis`` when per channel and
  ``block_size`` when group-wise (ONNX's blocked quantization). A Linear's
  ``DQ -> Transpose`` (``x @ W.T``) is folded: the codes are stored transposed
  (``[in, out]``) and the axis swapped (1: the output channel), the layout ONNX Runtime's
  QDQ fusions expect.
- Q/DQ pairs quantizing one tensor with equal parameters (q/k/v read one LayerNorm
  output) are merged into one.

Remedies need nothing here: a config's smoothing (``QuantConfig.smooth``) and bias
correction change the model's parameters (LayerNorm affine, consumer weights,
Linear biases), which the export writes as they are: smoothed LayerNorm weights and
biases and corrected biases as float initializers, smoothed weights as int8.

Only standard ``ai.onnx`` ops are produced: opset 18 (the dynamo exporter's) when every
quantized tensor is an 8-bit integer, 21 (int4/int16 Q/DQ, blocked quantization, FP8)
otherwise. Integer tensors of 4, 8 or 16 bits and FP8 E4M3 can be exported; other widths
are refused.
"""

from __future__ import annotations

import contextlib
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
    """8-bit integers per tensor or per channel: what opset 18 Q/DQ holds (anything else
    needs opset 21)."""
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
    """A TensorQuantizer as seen by the exporter: a quantizing slot is a placeholder
    naming it (its float input passes through: a weight stays the float initializer
    until :func:`expand_placeholders`); taps are not run."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == QUANT:
            return _placeholder_op()(x, self.name)
        return x


# slot name -> parameters of every quantizing slot, while export_mode is active
_ACTIVE: dict[str, QParams] = {}


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


@contextlib.contextmanager
def export_mode(qmodel: QuantModel) -> Iterator[None]:
    """Within the block, every quantizer of ``qmodel`` behaves as :class:`_ExportQuantizer`
    and :func:`export_graph` knows the parameters of every quantizing slot."""
    _check_exportable(qmodel)
    classes = [(tq, type(tq)) for tq in qmodel.tensor_quantizers()]
    _ACTIVE.clear()
    for tq, _ in classes:
        tq.__class__ = _ExportQuantizer
        if tq.mode == QUANT:
            _ACTIVE[tq.name] = tq.qparams.to("cpu")
    try:
        yield
    finally:
        _ACTIVE.clear()
        for tq, cls in classes:
            tq.__class__ = cls


def trace_graph(module: nn.Module, example: torch.Tensor, opset: int = 18, dynamic_batch: bool = True,
                input_name: str = "pixel_values", output_name: str = "logits"):
    """``module(example)`` through the dynamo ONNX exporter as it comes out: every
    quantizing slot a ``vitq.export.Placeholder`` node naming it (call inside
    :func:`export_mode`; outside it the graph is the float one). The opset is raised to 21
    when a tensor is not an 8-bit integer. :func:`export_graph` turns it into Q/DQ;
    :mod:`quant.onnx_sites` reads which node of the float graph each site is."""
    _require_onnx()
    try:
        import onnxscript  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise ExportError("ONNX export needs the `onnxscript` package (torch's dynamo exporter): "
                          "pip install 'vitq[onnx]'") from None
    if opset < 18:
        raise ExportError(f"opset {opset}: the dynamo ONNX exporter writes opset >= 18")
    placeholders = dict(_ACTIVE)
    if any(not is_standard_int8(qp) for qp in placeholders.values()) and opset < WIDE_OPSET:
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
    return program.model_proto


def export_graph(module: nn.Module, example: torch.Tensor, opset: int = 18, dynamic_batch: bool = True,
                 input_name: str = "pixel_values", output_name: str = "logits"):
    """``module(example)`` through the dynamo ONNX exporter (:func:`trace_graph`),
    post-processed into a standard Q/DQ graph (placeholders expanded into Q/DQ pairs and
    quantized weight initializers, duplicate pairs merged); returns the ModelProto. Call
    inside :func:`export_mode`."""
    placeholders = dict(_ACTIVE)
    return finish_graph(trace_graph(module, example, opset, dynamic_batch, input_name, output_name), placeholders)


def finish_graph(model, placeholders: dict[str, QParams], float_slots: frozenset[str] | set[str] = frozenset()):
    """A traced graph (:func:`trace_graph`) made standard, in place: placeholders expanded
    into Q/DQ (those of ``float_slots`` removed: the tensor stays float), duplicate pairs
    merged, the exporter's stale shapes and per-node traces dropped. Returns the model."""
    graph = model.graph
    expand_placeholders(model, placeholders, float_slots)
    _dedupe_qdq(graph)
    del graph.value_info[:]  # the exporter's shapes of folded (transposed) weights are stale
    strip_node_metadata(graph)
    return model


def strip_node_metadata(graph) -> None:
    """Drop the exporter's per-node stack traces and FX names (~1.5 kB a node)."""
    for n in graph.node:
        n.doc_string = ""
        del n.metadata_props[:]


class Forward(nn.Module):
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

    values = np.array(values)  # C order, 0-d kept (np.ascontiguousarray makes it 1-d)
    if dtype == E4M3:
        bits = torch.from_numpy(values.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, values.shape, bits.tobytes(), raw=True)
    if dtype in ("int4", "uint4"):
        kind = TensorProto.INT4 if dtype == "int4" else TensorProto.UINT4
        return helper.make_tensor(name, kind, values.shape, values.astype(np.int32).reshape(-1).tolist())
    from onnx import numpy_helper
    return numpy_helper.from_array(values.astype(np.dtype(dtype)), name)


def expand_placeholders(model, placeholders: dict[str, QParams],
                        float_slots: frozenset[str] | set[str] = frozenset()) -> int:
    """Replace every ``vitq.export.Placeholder`` node by the Q/DQ of its slot (see the
    module docstring): an activation by QuantizeLinear + DequantizeLinear with per-tensor
    scalars, a weight (an initializer) by its codes and a DequantizeLinear, a following
    2-D Transpose folded into them (codes ``[in, out]``, the axis swapped). The placeholder
    of a slot in ``float_slots`` is removed (its readers read its float input), as if the
    slot had not been quantized when the graph was captured. Returns how many were replaced."""
    from onnx import helper, numpy_helper

    graph = model.graph
    arrays = _initializer_arrays(graph)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes, replaced = [], 0
    dropped: set[int] = set()
    bypass: dict[str, str] = {}  # output of a removed placeholder -> its input
    for n in list(graph.node):
        if id(n) in dropped:
            continue
        if n.domain != PLACEHOLDER_DOMAIN:
            nodes.append(n)
            continue
        slot = _attr(n, "slot")
        slot = slot.decode() if isinstance(slot, bytes) else slot
        if slot in float_slots:
            bypass[n.output[0]] = n.input[0]
            continue
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
        name, k = f"{x}_quantized", 1
        while name in arrays:  # a weight quantized twice (tied weights)
            name, k = f"{x}_quantized_{k}", k + 1
        arrays[name] = codes
        graph.initializer.extend([_typed_tensor(name, codes, dtype),
                                  numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
                                  _typed_tensor(f"{name}_zero_point", zp, dtype)])
        attrs = {} if axis is None else {"axis": int(axis)}
        if block is not None:
            attrs["block_size"] = int(block)
        nodes.append(helper.make_node(DQ_OP, [name, f"{name}_scale", f"{name}_zero_point"], [out],
                                      name=f"{prefix}_DQ", **attrs))
        replaced += 1
    if bypass:
        if any(o.name in bypass for o in graph.output):
            raise ExportError("a float slot's placeholder writes a graph output; export that config on its own")
        for n in nodes:
            for pos, name in enumerate(n.input):
                if name in bypass:
                    n.input[pos] = bypass[name]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    _prune(graph)
    return replaced


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


def trace_example(example_pixels: torch.Tensor) -> torch.Tensor:
    """The batch the graphs are traced at: two images (one repeated when only one is
    given), so that nothing can mistake the batch size for a constant."""
    example = example_pixels.detach()[:2].float()
    if len(example) == 1:
        example = example.expand(2, *example.shape[1:]).contiguous()
    return example


def export_onnx(qmodel: QuantModel, path: str | os.PathLike, example_pixels: torch.Tensor, opset: int = 18,
                dynamic_batch: bool = True, metadata: dict[str, str] | None = None) -> ExportResult:
    """Write the current quantization state of ``qmodel`` to ``path`` (ONNX, Q/DQ).

    ``example_pixels`` (N, 3, H, W) fixes the image size; the batch axis stays
    dynamic unless ``dynamic_batch`` is False. ``metadata`` goes to the model's
    metadata_props. The graph is checked to hold exactly one DequantizeLinear per
    distinct int8 tensor (:func:`int8_tensors`) and a QuantizeLinear per int8
    activation; returns what it contains.
    """
    _require_onnx()
    example = trace_example(example_pixels)
    expected = int8_tensors(qmodel, example)
    with export_mode(qmodel):
        model = export_graph(Forward(qmodel), example, opset, dynamic_batch)
    return _check_and_write(model, Path(path), expected, metadata)


def export_variants(qmodel: QuantModel, paths: dict[str, str | os.PathLike], configs: dict,
                    example_pixels: torch.Tensor, opset: int = 18,
                    metadata: dict[str, dict[str, str]] | None = None) -> dict[str, ExportResult]:
    """Graphs of several configs that quantize no slot the first does not (they may keep more
    slots float, or quantize a slot in another format: int16 activations, int4 weights, ...),
    from ONE trace by the dynamo exporter (the slow part of an export): the first config's
    graph is traced (a placeholder at each of its quantizing slots), and each config's graph
    is that graph with the placeholders of the slots it keeps float removed and the others
    expanded into Q/DQ with its own parameters. Each graph has exactly its config's Q/DQ
    placement, checked as :func:`export_onnx` checks it; the opset is 21 for every graph when
    one of them needs it. Weights and biases are the first config's parameters (a weight's
    codes are its own format's rounding of them): a remedy whose values depend on which sites
    are float (bias correction of a Linear kept float) is not re-applied, so the graphs are for
    timing, not for accuracy. ``configs``: name -> QuantConfig, ``paths``: name -> file.
    ``qmodel``'s state is kept."""
    _require_onnx()
    example = trace_example(example_pixels)
    names = list(configs)
    saved = qmodel.snapshot()
    try:
        slots, expected = {}, {}
        for name in names:
            qmodel.apply(configs[name])
            slots[name] = {tq.name: tq.qparams.to("cpu") for tq in qmodel.tensor_quantizers() if tq.mode == QUANT}
            expected[name] = int8_tensors(qmodel, example)
        base = slots[names[0]]
        for name in names[1:]:
            extra = [k for k in slots[name] if k not in base]
            if extra:
                raise ExportError(f"config {name!r} quantizes {extra[0]}, which {names[0]!r} keeps float; "
                                  "variants may only quantize slots the first config quantizes")
        if any(not is_standard_int8(qp) for s in slots.values() for qp in s.values()):
            opset = max(opset, WIDE_OPSET)
        qmodel.apply(configs[names[0]])
        with export_mode(qmodel):
            raw = trace_graph(Forward(qmodel), example, opset)
    finally:
        qmodel.restore(saved)
    results = {}
    for name in names:
        model = type(raw)()
        model.CopyFrom(raw)
        finish_graph(model, slots[name], set(base) - set(slots[name]))
        results[name] = _check_and_write(model, Path(paths[name]), expected[name], (metadata or {}).get(name))
    return results


def _check_and_write(model, path: Path, expected: list[Int8Tensor], metadata: dict[str, str] | None) -> ExportResult:
    """Check a finished graph against the quantized tensors of its config (standard ops only;
    one DequantizeLinear per distinct quantized tensor, a QuantizeLinear per activation),
    write it to ``path`` and summarise it."""
    onnx = _require_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
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
