"""Export a QuantModel to ONNX with QuantizeLinear/DequantizeLinear at its int8 tensors.

The graph is the instrumented model itself, traced by torch's TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``), which turns every
``torch.fake_quantize_per_{tensor,channel}_affine`` into a QuantizeLinear +
DequantizeLinear pair. So the Q/DQ placement is by construction the one the
fake-quant simulation runs: an int8 activation gets a Q/DQ pair with its
calibrated scale and zero point (uint8 when asymmetric, int8 when symmetric), a
float site gets nothing.

Weights: in QUANT mode a weight quantizer returns its cached fake-quantized weight,
which a trace would freeze into a float constant. During export
(:func:`export_mode`) weight quantizers run the fake-quant on the float weight
instead, so the trace sees ``Q(W) -> DQ``; the post-processing
(:func:`fold_weights`) then replaces each ``Q(constant W)`` by an int8 initializer
holding the integer codes, bit-exact with the simulation's weights. A Linear's
``DQ -> Transpose`` (the exporter's ``x @ W.T``) is folded too: the int8
initializer is stored transposed (``[in, out]``) and a per-channel DQ uses
``axis=1`` (the output channel), the layout ONNX Runtime's QDQ fusions expect.

Remedies need nothing here: a config's smoothing (``QuantConfig.smooth``) and bias
correction change the model's parameters (LayerNorm affine, consumer weights,
Linear biases), which the trace exports as they are: smoothed LayerNorm weights and
biases and corrected biases as float initializers, smoothed weights as int8.

Only standard ``ai.onnx`` ops are produced (opset >= 13, needed by per-channel
DequantizeLinear and tensor scales). Only 8-bit specs can be exported: opset 17
has no int4/int16 Q/DQ.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .config import ConfigError
from .model import OBSERVE, QUANT, QuantModel, TensorQuantizer
from .quantizer import QParams, fake_quantize, quantize_to_int
from .store import atomic_write

Q_OP, DQ_OP = "QuantizeLinear", "DequantizeLinear"
STANDARD_DOMAINS = ("", "ai.onnx")
INT8_RANGES = {(0, 255): "uint8", (-128, 127): "int8"}


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
    """One distinct int8 tensor: the quantizer slots that quantize the same tensor
    with identical parameters (q/k/v projections read one LayerNorm output) share
    one Q/DQ pair in the graph."""

    slots: list[str]
    is_weight: bool
    dtype: str
    per_channel: bool


def _qkey(qp: QParams) -> tuple:
    return (qp.qmin, qp.qmax, qp.ch_axis, tuple(qp.scale.tolist()), tuple(qp.zero_point.tolist()))


def _check_exportable(qmodel: QuantModel) -> None:
    for tq in qmodel.tensor_quantizers():
        if tq.mode == OBSERVE:
            raise ExportError(f"{tq.name} is observing (calibration in progress); apply a config first")
        if tq.mode == QUANT and (tq.qparams.qmin, tq.qparams.qmax) not in INT8_RANGES:
            raise ExportError(f"{tq.name}: {tq.spec.bits}-bit quantization cannot be exported; "
                              f"ONNX opset <= 20 Q/DQ is 8-bit only")


def int8_tensors(qmodel: QuantModel, example_pixels: torch.Tensor) -> list[Int8Tensor]:
    """The distinct int8 tensors of the current state, found by running the model
    once with a tap on every quantizing slot (independent of any ONNX graph)."""
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
            seen[key] = Int8Tensor([tq.name], tq.is_weight, INT8_RANGES[(tq.qparams.qmin, tq.qparams.qmax)],
                                   tq.qparams.per_channel)

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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == QUANT:
            return fake_quantize(x, self.qparams)
        return x


@contextlib.contextmanager
def export_mode(qmodel: QuantModel) -> Iterator[None]:
    """Within the block, every quantizer of ``qmodel`` behaves as :class:`_ExportQuantizer`."""
    _check_exportable(qmodel)
    classes = [(tq, type(tq)) for tq in qmodel.tensor_quantizers()]
    for tq, _ in classes:
        tq.__class__ = _ExportQuantizer
    try:
        yield
    finally:
        for tq, cls in classes:
            tq.__class__ = cls


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
    if rename:
        nodes = [n for n in graph.node if id(n) not in drop]
        for n in nodes:
            for pos, name in enumerate(n.input):
                if name in rename:
                    n.input[pos] = rename[name]
        del graph.node[:]
        graph.node.extend(nodes)
    return len(rename)


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
    int8_weights: int  # int8 initializers feeding a DequantizeLinear
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
    int8 = {TensorProto.INT8, TensorProto.UINT8}
    weights = sum(1 for n in graph.node if n.op_type == DQ_OP and arrays_dtype.get(n.input[0]) in int8)
    p = Path(path) if path is not None else None
    return ExportResult(p, ops.get(Q_OP, 0), ops.get(DQ_OP, 0), weights, ops.get(Q_OP, 0),
                        p.stat().st_size if p is not None and p.exists() else model.ByteSize(), ops)


def nonstandard_ops(model) -> list[str]:
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def export_onnx(qmodel: QuantModel, path: str | os.PathLike, example_pixels: torch.Tensor, opset: int = 17,
                dynamic_batch: bool = True, metadata: dict[str, str] | None = None) -> ExportResult:
    """Write the current quantization state of ``qmodel`` to ``path`` (ONNX, Q/DQ).

    ``example_pixels`` (N, 3, H, W) fixes the image size; the batch axis stays
    dynamic unless ``dynamic_batch`` is False. ``metadata`` goes to the model's
    metadata_props. The graph is checked to hold exactly one DequantizeLinear per
    distinct int8 tensor (:func:`int8_tensors`) and a QuantizeLinear per int8
    activation; returns what it contains.
    """
    onnx = _require_onnx()
    if opset < 13:
        raise ExportError(f"opset {opset}: per-channel Q/DQ needs opset >= 13")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    axes = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    example = example_pixels.detach()[:2].float()
    if len(example) == 1:  # trace at batch 2: nothing can mistake the batch size for a constant
        example = example.expand(2, *example.shape[1:]).contiguous()
    expected = int8_tensors(qmodel, example)
    try:
        with export_mode(qmodel), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings from transformers' shape checks, legacy-exporter notice
            torch.onnx.export(_Forward(qmodel), (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["pixel_values"], output_names=["logits"], dynamic_axes=axes,
                              do_constant_folding=True)
        model = onnx.load(str(tmp))
        graph = model.graph
        _constants_to_initializers(graph)
        _dedupe_qdq(graph)
        fold_weights(graph)
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
    finally:
        tmp.unlink(missing_ok=True)
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
