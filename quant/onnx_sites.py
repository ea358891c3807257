"""Which node of vitq's FP32 ONNX graph each quantization site is.

Deployment tools name operators by the nodes of their own graph, not by vitq's site
names. This module reads the correspondence off the exporter itself, never off name
patterns: the model is traced once more with every site quantized
(:func:`quant.export_onnx.trace_graph` inside :func:`~quant.export_onnx.export_mode`),
so that every quantizer slot is a ``vitq.export.Placeholder`` node naming it, and

- a site whose slots are an operator's inputs (Linear/Conv: input and weight; the
  attention matmuls: both operands) is the compute node its placeholders lead to, through
  layout ops (Transpose, Reshape, Identity, Cast);
- a site whose slot is an operator's output (residual add, softmax, GELU, LayerNorm) is
  the node that produces its placeholder's input, back through Identity and Cast (the
  exporter's dtype Cast after Softmax).

With the placeholders removed the traced graph is the FP32 graph node for node; the
two are walked side by side (same op types, same wiring, else :class:`ExportError`), so
every name returned is a node of the FP32 graph that was passed in (the file vitq
exports, ``model_fp32.onnx``). A site that does not resolve to exactly one node is an
error, not a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import QuantConfig
from .export_onnx import (PLACEHOLDER_DOMAIN, ExportError, Forward, export_mode, trace_example, trace_graph)
from .model import QuantModel

FORWARD_THROUGH = ("Identity", "Cast", "Transpose", "Reshape")  # layout ops between a slot and its operator
BACKWARD_THROUGH = ("Identity", "Cast")  # between an operator and its output slot
OUTPUT_SLOTS = ("output",)


@dataclass(frozen=True)
class SiteNode:
    """A site's operator in the FP32 ONNX graph."""

    site: str  # canonical site name
    kind: str
    node: str  # the node's name in the FP32 graph
    op_type: str
    inputs: tuple[str, ...]  # the node's input tensors (FP32 graph names)
    output: str  # its first output tensor


def _slot_of(node) -> str:
    for a in node.attribute:
        if a.name == "slot":
            return a.s.decode()
    raise ExportError(f"placeholder node {node.name} names no slot")


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)


def traced_with_every_site(qmodel: QuantModel, example_pixels: torch.Tensor, opset: int = 18):
    """The graph of ``qmodel`` with every site's slots as placeholder nodes (the model's
    state is kept). Needs a calibrated model: every activation slot takes its range."""
    saved = qmodel.snapshot()
    try:
        qmodel.apply(QuantConfig(name="every_site", float_kinds=[]))
        with export_mode(qmodel):
            return trace_graph(Forward(qmodel), trace_example(example_pixels), opset)
    finally:
        qmodel.restore(saved)


def site_nodes(qmodel: QuantModel, example_pixels: torch.Tensor, fp32_model) -> dict[str, SiteNode]:
    """Site name -> its node in ``fp32_model`` (the ModelProto of the FP32 export of
    ``qmodel``), for every site of the model (see the module docstring)."""
    traced = traced_with_every_site(qmodel, example_pixels, _opset(fp32_model))
    return resolve(traced, fp32_model, qmodel)


def resolve(traced, fp32_model, qmodel: QuantModel) -> dict[str, SiteNode]:
    """The correspondence of :func:`site_nodes`, from the placeholder graph ``traced``."""
    nodes = list(traced.graph.node)
    placeholders = {n.output[0]: n for n in nodes if n.domain == PLACEHOLDER_DOMAIN}
    by_slot = {_slot_of(n): n for n in placeholders.values()}

    def source(t: str) -> str:
        while t in placeholders:
            t = placeholders[t].input[0]
        return t

    consumers: dict[str, list] = {}
    producer: dict[str, object] = {}
    for n in nodes:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
        for t in n.output:
            producer[t] = n

    def forward(t: str) -> set[int]:
        out = set()
        for c in consumers.get(t, []):
            if c.domain == PLACEHOLDER_DOMAIN or c.op_type in FORWARD_THROUGH:
                out |= forward(c.output[0])
            else:
                out.add(id(c))
        return out

    def backward(t: str):
        n = producer.get(t)
        while n is not None and (n.domain == PLACEHOLDER_DOMAIN or n.op_type in BACKWARD_THROUGH):
            n = producer.get(n.input[0])
        return n

    plain = [n for n in nodes if n.domain != PLACEHOLDER_DOMAIN]
    twin = _walk_side_by_side(plain, list(fp32_model.graph.node), source)
    out: dict[str, SiteNode] = {}
    for site in qmodel.sites:
        slots = list(qmodel.quantizers[site.name])
        missing = [s for s in slots if f"{site.name}:{s}" not in by_slot]
        if missing:
            raise ExportError(f"site {site.name}: no placeholder for slot(s) {missing} in the traced graph")
        if slots == list(OUTPUT_SLOTS):
            found = backward(by_slot[f"{site.name}:output"].input[0])
            targets = {id(found)} if found is not None else set()
        else:
            reached = [forward(by_slot[f"{site.name}:{s}"].output[0]) for s in slots]
            targets = set.intersection(*reached)
        if len(targets) != 1:
            raise ExportError(f"site {site.name}: its slots lead to {len(targets)} operators of the traced "
                              f"graph, not one")
        f = twin[targets.pop()]
        out[site.name] = SiteNode(site.name, site.kind, f.name, f.op_type, tuple(f.input), f.output[0])
    return out


def _walk_side_by_side(plain: list, fp32: list, source) -> dict[int, object]:
    """id(traced node) -> the FP32 node at its place; ExportError where the graphs differ
    (op type, input count or wiring)."""
    if len(plain) != len(fp32):
        raise ExportError(f"the FP32 graph has {len(fp32)} nodes, the traced graph without its placeholders "
                          f"{len(plain)}: not the graph vitq exports for this model")
    tensors: dict[str, str] = {}
    twin = {}
    for i, (r, f) in enumerate(zip(plain, fp32)):
        if r.op_type != f.op_type or len(r.input) != len(f.input) or len(r.output) != len(f.output):
            raise ExportError(f"node {i} of the FP32 graph ({f.name}, {f.op_type}) differs from the traced graph's "
                              f"({r.op_type}): not the graph vitq exports for this model")
        for a, b in zip(r.input, f.input):
            a = source(a)
            if tensors.setdefault(a, b) != b:
                raise ExportError(f"node {i} of the FP32 graph ({f.name}) reads {b}, the traced graph's "
                                  f"{tensors[a]}: not the graph vitq exports for this model")
        for a, b in zip(r.output, f.output):
            tensors[a] = b
        twin[id(r)] = f
    return twin
