"""Torch-native int8: a config run through torch.export + torchao's PT2E flow
(``X86InductorQuantizer``, ``prepare_pt2e`` / ``convert_pt2e``) and ``torch.compile``
(inductor lowers the Q/DQ patterns to oneDNN int8 kernels).

What this path can run in int8: the site kinds in :data:`INT8_KINDS` (Conv and Linear:
int8 input and weight, float output), the operators X86InductorQuantizer quantizes
with a per-operator config. Everything else it keeps float. A config that wants any
other kind in int8 (``matmul_qk``, ``matmul_av``, ``residual``; the presets ``all``,
``mixed_1``, ``mixed_2`` do) is refused with the sites named and the line to add, as
is a config with smoothing or bias correction (they change parameters; not mapped
here) or with anything but 8-bit asymmetric per-tensor activations and 8-bit
symmetric per-channel weights (what the x86 int8 kernels take).

The config's float skip-list is applied per module: every float Conv/Linear site's
module (found through the weight the family adapter names, not by path) gets
``set_module_name_qconfig(name, None)``. Activation ranges come from the PT2E
observers calibrated on the same calibration images as the simulation (``minmax``:
torch's MinMaxObserver, the same range; any other observer: HistogramObserver, not
the same algorithm), so agreement with the simulation is measured, not assumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from quant.config import ConfigError, QuantConfig
from quant.model import QuantModel

INT8_KINDS = ("conv", "linear")


class TorchInt8Error(ConfigError):
    """The config cannot run on --backend torch-int8 (one line in the CLI)."""


def import_pt2e():
    """torchao's PT2E pieces, or a one-line error naming the extra to install."""
    try:
        from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer
    except ImportError as e:
        raise TorchInt8Error(f"--backend torch-int8 needs torchao (PT2E): pip install 'vitq[int8]' ({e})") from None
    return dict(HistogramObserver=HistogramObserver, MinMaxObserver=MinMaxObserver,
                PerChannelMinMaxObserver=PerChannelMinMaxObserver, convert_pt2e=convert_pt2e,
                prepare_pt2e=prepare_pt2e, QuantizationConfig=QuantizationConfig,
                QuantizationSpec=QuantizationSpec, X86InductorQuantizer=X86InductorQuantizer)


def check_config(config: QuantConfig, sites) -> list:
    """The int8 sites of ``config`` if this path can run them; else TorchInt8Error."""
    int8 = config.int8_sites(sites)
    bad = [s for s in int8 if s.kind not in INT8_KINDS]
    if bad:
        kinds = sorted({s.kind for s in bad})
        names = ", ".join(s.name for s in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise TorchInt8Error(
            f"config {config.name}: --backend torch-int8 runs only {', '.join(INT8_KINDS)} sites in int8; "
            f"{len(bad)} int8 site(s) of kind {', '.join(kinds)} ({names}) cannot run there. Keep them float "
            f"(add {kinds} to float_kinds) or use --backend onnxruntime")
    other = {}
    for s in int8:
        fmt = config.format_of(s).name
        if fmt != "int8":
            other.setdefault(fmt, []).append(s.name)
    if other:
        listed = "; ".join(f"{fmt}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                           for fmt, names in other.items())
        raise TorchInt8Error(f"config {config.name}: --backend torch-int8 runs int8 only; format(s) {listed} are "
                             f"simulated only on this backend: use --backend onnxruntime (it runs every format)")
    if config.smooth or config.bias_correction:
        raise TorchInt8Error(f"config {config.name}: smoothing / bias correction are not mapped to "
                             f"--backend torch-int8; use --backend onnxruntime")
    a, w = config.activation, config.weight
    if a.bits != 8 or a.symmetric or a.per_channel or w.bits != 8 or not w.symmetric or not w.per_channel:
        raise TorchInt8Error(f"config {config.name}: --backend torch-int8 takes 8-bit asymmetric per-tensor "
                             f"activations and 8-bit symmetric per-channel weights (x86 int8 kernels)")
    for pattern in config.overrides:
        raise TorchInt8Error(f"config {config.name}: per-site overrides ({pattern!r}) are not mapped to "
                             f"--backend torch-int8")
    return int8


def torch_int8_config(config: QuantConfig) -> QuantConfig:
    """``config`` with every kind this path cannot run in int8 kept float."""
    from quant.sites import KINDS
    extra = [k for k in KINDS if k not in INT8_KINDS and k not in config.float_kinds]
    return QuantConfig.from_dict({**config.to_dict(), "name": f"{config.name}_linear",
                                  "float_kinds": list(config.float_kinds) + extra})


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _module_names(qmodel: QuantModel, sites: Iterable) -> dict[str, str]:
    """site name -> module path (in the model) of the module owning the site's weight."""
    owner = {}
    for name, module in qmodel.model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            owner[id(w)] = name
    out = {}
    for s in sites:
        w = qmodel.family.weight(qmodel.model, s)
        if id(w) in owner:
            out[s.name] = owner[id(w)]
    return out


def _weight_observer(base):
    """torch's per-channel symmetric observer divides amax by 127.5 ((qmax - qmin) / 2);
    the simulation (quant.quantizer.qparams_from_range) by qmax = 127. This one uses
    the simulation's rule, so both paths hold the same int8 weights."""
    from quant.quantizer import MIN_SCALE

    class SimulationWeightObserver(base):
        def calculate_qparams(self):
            amax = torch.maximum(-self.min_val, self.max_val)
            scale = (amax / 127).clamp_min(MIN_SCALE)
            return scale.float(), torch.zeros_like(scale, dtype=torch.int64)
    return SimulationWeightObserver


def quantize_pt2e(qmodel: QuantModel, config: QuantConfig, calib: list[torch.Tensor],
                  example: torch.Tensor) -> torch.fx.GraphModule:
    """The converted (Q/DQ reference) PT2E module of ``config``; the QuantModel's state is kept."""
    check_config(config, qmodel.sites)
    pt2e = import_pt2e()
    act_obs = pt2e["MinMaxObserver"] if config.activation.observer == "minmax" else pt2e["HistogramObserver"]
    spec = pt2e["QuantizationSpec"]
    act = spec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
               observer_or_fake_quant_ctr=act_obs.with_args(eps=2 ** -12))
    weight = spec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
                  observer_or_fake_quant_ctr=_weight_observer(pt2e["PerChannelMinMaxObserver"]).with_args(eps=2 ** -12))
    qconfig = pt2e["QuantizationConfig"](act, act, weight, None)
    quantizer = pt2e["X86InductorQuantizer"]()
    int8 = {s.name for s in config.int8_sites(qmodel.sites)}
    weighted = [s for s in qmodel.sites if s.kind in INT8_KINDS]
    names = _module_names(qmodel, weighted)
    for kind, module_type in (("linear", nn.Linear), ("conv", nn.Conv2d)):
        if any(s.kind == kind and s.name in int8 for s in weighted):
            quantizer.set_module_type_qconfig(module_type, qconfig)
    for s in weighted:
        if s.name not in int8 and s.name in names:
            quantizer.set_module_name_qconfig(f"model.{names[s.name]}", None)
    saved = qmodel.snapshot()
    try:
        qmodel.apply(None)  # every quantizer an identity: the float graph is what PT2E quantizes
        example = example.detach()[:2].float()
        if len(example) == 1:
            example = example.expand(2, *example.shape[1:]).contiguous()
        with torch.no_grad():
            exported = torch.export.export(_Logits(qmodel.model), (example,),
                                           dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
            prepared = pt2e["prepare_pt2e"](exported, quantizer)
            for pixels in calib:
                prepared(pixels)
            converted = pt2e["convert_pt2e"](prepared)
    finally:
        qmodel.restore(saved)
    return converted


class TorchInt8:
    """Configs run through PT2E + inductor (``torch.compile``); ``compile=False`` runs the
    converted Q/DQ reference graph eagerly (float kernels, for checking)."""

    name = "torch-int8"

    def __init__(self, qmodel: QuantModel, calib: list[torch.Tensor], example_pixels: torch.Tensor,
                 compile: bool = True, out_dir: str | Path | None = None) -> None:
        import_pt2e()
        self.qmodel, self.calib, self.example, self.compile = qmodel, calib, example_pixels, compile
        self.out_dir = Path(out_dir) if out_dir else None
        self.modules: dict[str, torch.fx.GraphModule] = {}

    def build(self, name: str, config: QuantConfig | None):
        if config is None:
            raise TorchInt8Error("the FP32 row runs on the torch reference")
        converted = quantize_pt2e(self.qmodel, config, self.calib, self.example)
        self.modules[name] = converted
        module = converted
        if self.compile:
            from torch._inductor import config as inductor_config
            inductor_config.freezing = True  # constant weights: lets inductor pack int8 weights for oneDNN
            module = torch.compile(converted)

        def run(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(pixels.float()).float()
        return run


def save_pt2e(module: torch.fx.GraphModule, example: torch.Tensor, path: str | Path) -> Path:
    """The converted module re-exported as a torch.export program (``.pt2``). To run it with
    int8 kernels elsewhere: ``import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer``
    (it registers inductor's int8 fusions), then ``torch.compile(torch.export.load(path).module())``
    under ``torch._inductor.config.freezing = True``; without that import inductor compiles the
    Q/DQ graph in float and it runs no faster than FP32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example.detach()[:2].float()
    if len(example) == 1:
        example = example.expand(2, *example.shape[1:]).contiguous()
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))
    return path
