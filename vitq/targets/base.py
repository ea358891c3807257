"""The export target base class, its registry and what every target writes (see the
package docstring)."""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from quant.config import ConfigError, QuantConfig
from quant.model import QuantModel
from quant.registry import registrar
from quant.sites import Site
from quant.store import atomic_write_text

QUANTIZE, EXCLUDE, NONE = "quantize", "exclude", "none"  # what the target is told to do with a site


class TargetError(ConfigError):
    """A plan cannot be written for a target (a tool missing, a setting it cannot express):
    one line in the CLI."""


@dataclass
class SiteRow:
    """One site of the model in the target's terms."""

    site: str  # canonical site name
    kind: str
    plan: str  # int8 / float: what the plan does with it
    name: str | None  # the operator's name in the target's graph; None: no counterpart there
    action: str  # QUANTIZE / EXCLUDE (named in the skip-list) / NONE (nothing to say: see reason)
    reason: str = ""  # why the target's result differs from the plan here, or why it has no name


@dataclass
class TargetExport:
    """What ``vitq export --to TARGET`` writes: the tool's arguments (JSON-able), the
    Python call that applies them, a row per site and the files the call reads."""

    target: str
    tool: str
    arguments: dict
    python: str
    rows: list[SiteRow]
    files: dict[str, str] = field(default_factory=dict)  # role -> path (the FP32 model the names are in, ...)
    notes: list[str] = field(default_factory=list)

    def names(self, action: str) -> list[str]:
        return [r.name for r in self.rows if r.action == action and r.name is not None]

    def unmatched(self) -> list[SiteRow]:
        """Sites whose precision in the target differs from the plan's (with the reason)."""
        return [r for r in self.rows if (r.plan == "int8") != (r.action == QUANTIZE)]

    def to_dict(self) -> dict:
        return {"target": self.target, "tool": self.tool, "arguments": self.arguments, "files": self.files,
                "notes": self.notes, "python": self.python, "sites": [asdict(r) for r in self.rows]}

    def write(self, folder: Path) -> list[Path]:
        """``folder/<target>.json`` and ``folder/<target>.py``; returns the paths."""
        folder.mkdir(parents=True, exist_ok=True)
        stem = self.target.replace("-", "_")
        js, py = folder / f"{stem}.json", folder / f"{stem}.py"
        atomic_write_text(js, json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_text(py, self.python)
        return [js, py]

    def summary(self) -> str:
        n_q, n_x = len(self.names(QUANTIZE)), len(self.names(EXCLUDE))
        off = self.unmatched()
        line = f"{self.target} ({self.tool}): {n_q} site operators quantized, {n_x} named in the skip-list"
        if off:
            line += (f"; {len(off)} site(s) int8 in the plan without an int8 counterpart there "
                     f"({', '.join(r.site for r in off[:3])}{' ...' if len(off) > 3 else ''}; reasons in the JSON)")
        return line


@dataclass
class Applied:
    """An exported plan applied by the tool's own quantizer: ``model`` is the quantized
    model as the tool gives it (an ONNX path, an ov.Model, a torch module), ``runtime``
    what runs it (onnxruntime, openvino, torch); ``int8_sites`` are the sites whose operator
    reads quantized inputs in the tool's result (read from it, not assumed)."""

    model: object
    runtime: str
    int8_sites: list[str]
    quantize_s: float
    detail: dict = field(default_factory=dict)


class Logits(torch.nn.Module):
    """The classifier as ``pixels -> logits``; its own module names are the model's under
    ``model.``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class ExportContext:
    """What a target reads: the calibrated model, the plan, the output folder, an example
    image; the FP32 ONNX export and the site -> ONNX node table are made once, when a
    target first asks."""

    def __init__(self, qmodel: QuantModel, config: QuantConfig, out: Path, example: torch.Tensor,
                 calibration: list[torch.Tensor] | None = None, opset: int = 18) -> None:
        self.qmodel, self.config, self.out, self.example = qmodel, config, Path(out), example
        self.calibration = calibration or []
        self.opset = opset
        self._fp32 = None
        self._nodes = None

    @property
    def sites(self) -> list[Site]:
        return self.qmodel.sites

    def is_int8(self, site: Site) -> bool:
        return not self.config.is_float(site)

    def fp32_onnx(self) -> Path:
        """``out/model_fp32.onnx``, vitq's FP32 export (written once)."""
        if self._fp32 is None:
            from quant.export_onnx import export_onnx, float_state
            with float_state(self.qmodel):
                self._fp32 = export_onnx(self.qmodel, self.out / "model_fp32.onnx", self.example, self.opset,
                                         metadata={"vitq.config": "fp32"}).path
        return self._fp32

    def site_nodes(self) -> dict:
        """Site name -> :class:`quant.onnx_sites.SiteNode` of the FP32 ONNX export."""
        if self._nodes is None:
            import onnx

            from quant.onnx_sites import site_nodes
            self._nodes = site_nodes(self.qmodel, self.example, onnx.load(str(self.fp32_onnx())))
        return self._nodes


class Target:
    """One deployment tool. Subclasses set the class attributes and implement :meth:`build`."""

    name: ClassVar[str] = ""
    tool: ClassVar[str] = ""  # the tool and its entry point, in words
    modules: ClassVar[tuple[str, ...]] = ()  # what must import for build()
    extra: ClassVar[str] = ""  # what to install when one is missing

    def require(self) -> None:
        """TargetError naming the extra to install when a module of :attr:`modules` is missing."""
        for module in self.modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise TargetError(f"--to {self.name} needs {module} ({e}); install it: {self.extra}") from None

    def build(self, ctx: ExportContext) -> TargetExport:
        raise NotImplementedError

    def apply(self, export: TargetExport, ctx: ExportContext, folder: Path) -> Applied:
        """``export`` applied by the tool's own quantizer, calibrated on ``ctx.calibration``
        (pixel batches, vitq's calibration images), its files written to ``folder``
        (scripts/crosscheck.py)."""
        raise NotImplementedError

    def export(self, ctx: ExportContext) -> TargetExport:
        self.require()
        check_expressible(ctx.config, ctx.sites, self.name)
        return self.build(ctx)


def check_expressible(config: QuantConfig, sites: list[Site], target: str) -> None:
    """TargetError unless ``config`` is a skip-list over one global int8 scheme, the part of
    a plan every target carries: 8-bit activations per tensor, 8-bit weights, no per-site
    formats or overrides, no smoothing, no bias correction."""
    other = sorted({config.format_of(s).name for s in config.int8_sites(sites)} - {"int8"})
    problems = []
    if other:
        problems.append(f"formats {', '.join(other)}")
    if config.overrides:
        problems.append(f"per-site overrides ({', '.join(map(repr, config.overrides))})")
    if config.smooth:
        problems.append("smoothing")
    if config.bias_correction:
        problems.append("bias correction")
    if config.activation.bits != 8 or config.activation.per_channel:
        problems.append("activations other than 8-bit per tensor")
    if config.weight.bits != 8:
        problems.append("weights other than 8-bit")
    if problems:
        raise TargetError(f"config {config.name}: --to {target} carries a float skip-list over one int8 scheme; "
                          f"this config also has {'; '.join(problems)}")


# name -> the target's (stateless) instance, in registration order
TARGETS: dict[str, Target] = {}

# ``@register_target("name")``: register a class as target ``name`` (refuses a name taken)
register_target = registrar(TARGETS, "target")


def unregister_target(name: str) -> None:
    del TARGETS[name]


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown export target {name!r}; targets are {', '.join(TARGETS)}") from None


def python_literal(value) -> str:
    """``value`` (JSON-able) as Python source."""
    import pprint
    return pprint.pformat(value, width=110, sort_dicts=False)
