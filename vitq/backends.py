"""Execution backends: where a quantization config actually runs.

Every backend has the same interface: ``build(name, config)`` maps a
:class:`~quant.config.QuantConfig` (None: FP32) to a :data:`Forward`, a callable
``pixels -> logits`` (CPU float32 torch tensor). The config -> backend mapping is
one piece of code per backend:

- :class:`TorchFakeQuant`: the fake-quant simulation of :class:`~quant.model.QuantModel`;
- :class:`OnnxRuntimeInt8`: the config exported as a standard Q/DQ ONNX graph
  (:func:`quant.export_onnx.export_onnx`), run by ONNX Runtime's CPU provider,
  which fuses the Q/DQ patterns into int8 kernels (real int8 execution);
- :class:`vitq.torch_int8.TorchInt8`: torch.export + torchao PT2E + torch.compile
  (conv/linear sites in int8; configs with other int8 kinds are refused).

:class:`BackendEval` lets :func:`analysis.evaluate.evaluate_configs` evaluate a backend
(FP32 row from the torch reference) and measures how well the backend agrees with
the fake-quant simulation of the same config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from analysis import artifacts
from quant.config import ConfigError, QuantConfig
from quant.export_onnx import ExportResult, export_onnx, export_variants, float_state
from analysis.metrics import OutputStats
from quant.model import QuantModel

Forward = Callable[[torch.Tensor], torch.Tensor]  # pixels -> logits of one built config


class Backend(Protocol):
    """Where a config runs (see the module docstring)."""

    name: str

    def build(self, name: str, config: QuantConfig | None) -> Forward:
        """``config`` (None: FP32) made runnable here, known as ``name`` (file names)."""
BACKENDS = ("torch", "onnxruntime", "torch-int8")


class BackendError(ConfigError):
    """A backend cannot run here (missing package) or failed to load a model (a
    ConfigError so that the CLI reports it in one line)."""


def _metadata(config: QuantConfig | None) -> dict[str, str]:
    import json
    return {"vitq.config": "fp32" if config is None else json.dumps(config.to_dict())}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "config"


class TorchFakeQuant:
    """The fake-quant simulation (QuantModel) as a backend."""

    name = "torch"

    def __init__(self, qmodel: QuantModel) -> None:
        self.qmodel = qmodel

    def build(self, name: str, config: QuantConfig | None) -> Forward:
        state = self.qmodel.prepare(config)

        def run(pixels: torch.Tensor) -> torch.Tensor:
            self.qmodel.restore(state)
            return self.qmodel(pixels).float()
        return run


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("--backend onnxruntime needs onnxruntime and onnx: pip install 'vitq[onnx]'") from None
    return onnxruntime


class OrtRunner:
    """One ONNX model in an ONNX Runtime CPU session. ``optimize=False`` runs the Q/DQ
    graph as written (float reference kernels, no int8 fusions): a second opinion
    on what the int8 kernels compute."""

    def __init__(self, path: str | Path, threads: int | None = None, export: ExportResult | None = None,
                 optimize: bool = True) -> None:
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        level = ort.GraphOptimizationLevel
        opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        # weight-only int4/int8 (DequantizeLinear -> MatMul) becomes MatMulNBits, which by
        # default quantizes its float input to int8 (accuracy level 4): not the format's
        # float activations. Level 1: float32 compute, as the simulation
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self.path, self.export = Path(path), export
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: x})[0])


class OnnxRuntimeInt8:
    """Configs exported to ``out_dir/model_<name>.onnx`` and run by ONNX Runtime.

    ``example_pixels`` fixes the image size of the graphs (take it from the image
    processor: DINOv2 is traced at the size it is fed); the batch axis is dynamic.
    ``threads``: ONNX Runtime intra-op threads (None: its default).
    """

    name = "onnxruntime"

    def __init__(self, qmodel: QuantModel, out_dir: str | Path, example_pixels: torch.Tensor,
                 threads: int | None = None, opset: int = 18) -> None:
        import_onnxruntime()
        self.qmodel, self.out_dir = qmodel, Path(out_dir)
        self.example, self.threads, self.opset = example_pixels, threads, opset
        self.exports: dict[str, ExportResult] = {}

    def export(self, name: str, config: QuantConfig | None) -> ExportResult:
        """Write ``config`` (None: FP32) as ``model_<name>.onnx``; the QuantModel's state is kept."""
        saved = self.qmodel.snapshot()
        try:
            self.qmodel.apply(config)
            result = export_onnx(self.qmodel, self.out_dir / f"model_{_safe(name)}.onnx", self.example, self.opset,
                                 metadata=_metadata(config))
        finally:
            self.qmodel.restore(saved)
        self.exports[name] = result
        return result

    def build(self, name: str, config: QuantConfig | None) -> OrtRunner:
        result = self.export(name, config)
        return OrtRunner(result.path, self.threads, result)

    def build_variants(self, configs: dict[str, QuantConfig]) -> dict[str, OrtRunner]:
        """Sessions of configs that quantize no slot the first does not (more sites float, or
        sites in another format), from one capture of the graph
        (:func:`quant.export_onnx.export_variants`: each graph has its config's Q/DQ placement
        and formats, the first config's parameter values; for timing)."""
        paths = {name: self.out_dir / f"model_{_safe(name)}.onnx" for name in configs}
        results = export_variants(self.qmodel, paths, configs, self.example, self.opset,
                                  {name: _metadata(c) for name, c in configs.items()})
        self.exports.update(results)
        return {name: OrtRunner(r.path, self.threads, r) for name, r in results.items()}


def make_backend(kind: str, qmodel: QuantModel, out_dir: str | Path, example_pixels: torch.Tensor,
                 threads: int | None = None, calib: list[torch.Tensor] | None = None) -> Backend:
    if kind == "torch":
        return TorchFakeQuant(qmodel)
    if kind == "onnxruntime":
        return OnnxRuntimeInt8(qmodel, out_dir, example_pixels, threads)
    if kind == "torch-int8":
        from .torch_int8 import TorchInt8
        if not calib:
            raise BackendError("--backend torch-int8 needs calibration images")
        return TorchInt8(qmodel, calib, example_pixels, out_dir=out_dir)
    raise ValueError(f"unknown backend {kind!r}; backends are {', '.join(BACKENDS)}")


# -- evaluation through a backend -------------------------------------------------
@dataclass
class _SimTally:
    """The backend's logits against the simulation's (the reference here), through the
    one metrics accumulator, plus the largest logit difference seen."""

    stats: OutputStats = field(default_factory=OutputStats)
    max_abs_diff: float = 0.0

    def update(self, backend_logits: torch.Tensor, simulated: torch.Tensor) -> None:
        self.stats.update(backend_logits, simulated)
        self.max_abs_diff = max(self.max_abs_diff, float((simulated - backend_logits).abs().max()))

    def row(self) -> dict:
        s = self.stats.summary()
        return {"images": s["images"], "agreement": s["agreement"], "max_abs_logit_diff": self.max_abs_diff,
                "logit_sqnr_db": s["logit_sqnr_db"]}


@dataclass
class BackendEval:
    """QuantModel's :class:`~analysis.runner.SwitchableModel` interface (what
    ``evaluate_configs`` runs), served by a backend: FP32 (config None) runs the torch reference, every other config runs on
    ``backend`` and, when ``compare_simulation``, also through the fake-quant model to
    measure their agreement (:meth:`simulation_agreement`)."""

    qmodel: QuantModel
    backend: Backend
    compare_simulation: bool = True
    _forwards: list = field(default_factory=list)
    _sim: list = field(default_factory=list)
    _names: list = field(default_factory=list)
    _tallies: dict = field(default_factory=dict)
    _current: int = 0

    @property
    def sites(self):
        return self.qmodel.sites

    def prepare(self, config: QuantConfig | None) -> int:
        """The state of ``config``: its position among the built configs."""
        name = "fp32" if config is None else config.name
        if config is None:
            state = self.qmodel.prepare(None)
            forward, sim = None, state
        else:
            forward = self.backend.build(name, config)
            sim = self.qmodel.prepare(config) if self.compare_simulation else None
            self._tallies[name] = _SimTally()
        self._forwards.append(forward)
        self._sim.append(sim)
        self._names.append(name)
        return len(self._forwards) - 1

    def restore(self, key: int) -> None:
        self._current = key

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        forward, sim, name = self._forwards[self._current], self._sim[self._current], self._names[self._current]
        if forward is None:
            self.qmodel.restore(sim)
            return self.qmodel(pixels)
        out = forward(pixels)
        if sim is not None:
            self.qmodel.restore(sim)
            self._tallies[name].update(out, self.qmodel(pixels).float())
        return out

    def apply(self, config: QuantConfig | None) -> None:
        self.qmodel.apply(config)

    def simulation_agreement(self) -> dict[str, dict]:
        """Per config: top-1 agreement (%) of the backend with the fake-quant
        simulation, max |logit difference| and logit SQNR (dB) between them."""
        return {name: t.row() for name, t in self._tallies.items() if len(t.stats)}


def describe_export(int8: ExportResult, fp32: ExportResult | None = None) -> str:
    """One human line: Q/DQ count, int8 weights, file size (vs FP32)."""
    mb = int8.file_bytes / 2**20
    line = (f"{int8.path}: {int8.quantize_nodes} QuantizeLinear + {int8.dequantize_nodes} DequantizeLinear "
            f"({int8.int8_weights} int8 weight initializers), {mb:.2f} MiB")
    if fp32 is not None:
        line += f" vs FP32 {fp32.file_bytes / 2**20:.2f} MiB ({fp32.file_bytes / max(int8.file_bytes, 1):.2f}x smaller)"
    return line


def export_fp32_and_int8(qmodel: QuantModel, config: QuantConfig, out_dir: str | Path,
                         example_pixels: torch.Tensor, opset: int = 18) -> tuple[ExportResult, ExportResult]:
    """``out_dir/model_fp32.onnx`` and ``out_dir/model_int8.onnx`` (``config`` applied)."""
    out_dir = Path(out_dir)
    with float_state(qmodel):
        fp32 = export_onnx(qmodel, out_dir / "model_fp32.onnx", example_pixels, opset, metadata=_metadata(None))
    saved = qmodel.snapshot()
    try:
        qmodel.apply(config)
        int8 = export_onnx(qmodel, out_dir / "model_int8.onnx", example_pixels, opset, metadata=_metadata(config))
    finally:
        qmodel.restore(saved)
    return fp32, int8


# -- what the CLI runs ---------------------------------------------------------------
def example_pixels(session) -> torch.Tensor:
    """One preprocessed calibration image: the image size the ONNX graphs are traced at."""
    images = session.images("train", 1)
    pixels, _, _ = next(iter(session.batches(images)))
    return pixels[:1]


def calibration_pixels(session) -> list[torch.Tensor]:
    """The session's calibration images (the ones the simulation was calibrated on), as
    batches: what the PT2E observers of --backend torch-int8 see."""
    return [p for p, _, _ in session.batches(session.images("train", session.opts.calib))]


def run_export_pt2e(session, config: QuantConfig) -> list[str]:
    """``vitq export --format pt2e``: the PT2E-converted program of ``config`` as
    ``model_int8.pt2`` (torch.export.save; load with torch.export.load, run with
    torch.compile for int8 kernels)."""
    from .torch_int8 import quantize_pt2e, save_pt2e

    example = example_pixels(session)
    module = quantize_pt2e(session.qmodel, config, calibration_pixels(session), example)
    path = save_pt2e(module, example, session.out / "model_int8.pt2")
    config.save(session.out / "model_int8.yaml")
    n_int8 = len(config.int8_sites(session.sites))
    return [f"config {config.name}: {n_int8} of {len(session.sites)} sites int8 (conv/linear, PT2E + X86InductorQuantizer)",
            f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB) and {session.out / 'model_int8.yaml'}"]


def run_export_target(session, config: QuantConfig, target: str, opset: int = 18) -> list[str]:
    """``vitq export --to TARGET``: ``config`` in the target's own terms, written to
    ``OUT/targets/<target>.json`` and ``.py`` (:mod:`vitq.targets`); returns the lines to print."""
    from .targets import ExportContext, get_target

    ctx = ExportContext(session.qmodel, config, session.out, example_pixels(session), calibration_pixels(session),
                        opset=opset)
    export = get_target(target).export(ctx)
    paths = export.write(session.out / "targets")
    lines = [export.summary()]
    lines += [f"  {r.site} ({r.plan}): {r.reason}" for r in export.unmatched()]
    return lines + [f"wrote {', '.join(str(p) for p in paths)}"]


def run_export(session, config: QuantConfig, opset: int = 18) -> list[str]:
    """``vitq export``: FP32 and int8 ONNX models of a calibrated session in its
    output folder, plus ``export.json``; returns the lines to print."""
    import json

    from quant.store import atomic_write_text

    example = example_pixels(session)
    fp32, int8 = export_fp32_and_int8(session.qmodel, config, session.out, example, opset)
    expected = len(int8.int8_tensors)
    config.save(session.out / "model_int8.yaml")
    info = {**session.describe(), "config": config.to_dict(), "opset": opset,
            "image_size": list(example.shape[-2:]), "distinct_int8_tensors": expected,
            "fp32": {"path": str(fp32.path), "bytes": fp32.file_bytes},
            "int8": {"path": str(int8.path), "bytes": int8.file_bytes, "quantize_linear": int8.quantize_nodes,
                     "dequantize_linear": int8.dequantize_nodes, "int8_weights": int8.int8_weights}}
    atomic_write_text(session.out / artifacts.EXPORT, json.dumps(info, indent=2, default=str) + "\n")
    n_int8 = len(config.int8_sites(session.sites))
    return [f"config {config.name}: {n_int8} of {len(session.sites)} sites int8, "
            f"{expected} distinct int8 tensors ({int8.int8_weights} weights, "
            f"{expected - int8.int8_weights} activations)",
            describe_export(int8, fp32),
            f"wrote {fp32.path}, {int8.path}, {session.out / 'model_int8.yaml'} and {session.out / artifacts.EXPORT}"]


def backend_eval(session, kind: str, threads: int | None = None) -> BackendEval:
    """What ``vitq eval --backend KIND`` evaluates instead of the bare QuantModel."""
    example = example_pixels(session)
    calib = calibration_pixels(session) if kind == "torch-int8" else None
    backend = make_backend(kind, session.qmodel, session.out / "onnx", example,
                           threads or torch.get_num_threads(), calib)
    return BackendEval(session.qmodel, backend, compare_simulation=kind != "torch")


def add_simulation_columns(evaluator: BackendEval, df, meta: dict) -> str:
    """Adds ``sim_agreement`` (top-1 agreement with the fake-quant simulation, %) to
    the eval table and the details to its meta; returns a line to print. Only the
    images run in this process count: batches a resumed evaluation took from its
    log were not re-run (``simulation_agreement[...]["images"]`` says how many did)."""
    sim = evaluator.simulation_agreement()
    df["sim_agreement"] = [100.0 if c == "fp32" else sim.get(c, {}).get("agreement", float("nan"))
                           for c in df["config"]]
    meta["backend"] = getattr(evaluator.backend, "name", str(evaluator.backend))
    meta["simulation_agreement"] = sim
    exports = getattr(evaluator.backend, "exports", {})
    meta["onnx_models"] = {k: {"path": str(v.path), "bytes": v.file_bytes, "quantize_linear": v.quantize_nodes,
                               "dequantize_linear": v.dequantize_nodes, "int8_weights": v.int8_weights}
                           for k, v in exports.items()}
    parts = [f"{k} {v['agreement']:.2f}% (max |dlogit| {v['max_abs_logit_diff']:.2g})" for k, v in sim.items()]
    return f"{meta['backend']} vs fake-quant top-1 agreement: " + ", ".join(parts)
