"""The Python API: vitq's commands as functions for notebooks.

``vitq.analyze(model=..., data=..., out=...)`` and the single steps (``vitq.sites``,
``vitq.evaluate`` / ``vitq.eval``, ``vitq.sensitivity``, ``vitq.errors``, ``vitq.plan``)
run the same pipeline steps as the command line (:mod:`vitq.pipeline`), write the same
artefacts into the output folder (and reuse its calibration cache and result logs), and
return result objects whose tables are pandas DataFrames and whose plan is a
:class:`quant.config.QuantConfig`.

``model`` is what ``--model`` takes (None: the embedded default; a HF folder or hub id;
``torchvision:vit_b_16`` or ``timm:vit_base_patch16_224`` with ``weights=``), or a classifier
already in memory (``nn.Module`` of a supported family, e.g. a fine-tuned
``ViTForImageClassification``).
An in-memory model needs ``processor=``: a HF image processor, or a callable taking a
PIL image and returning a (C, H, W) tensor (a torchvision transform); ``labels=`` (the
class names, in output order) when its folder names are not in its ``config.id2label``
(a model without a HF config needs it). vitq instruments a deep copy: the model passed
is left unchanged. Its output folder is ``out/<name>`` (``name=``, default the class
name), and its caches are keyed by a hash of its weights.

The command line's ``eval`` and ``analyze`` run :func:`evaluate_session` and
:func:`analyze_session` below, so both paths are one.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import pandas as pd
from torch import nn

from analysis import artifacts
from analysis.planner import REFERENCES, Budget, Planner
from quant.config import ConfigError, QuantConfig
from quant.families import family_of
from quant.families.torchvision_vit import LabelConfig, TorchvisionProcessor
from quant.names import PRESETS
from quant.presets import preset
from reports.html import render_report

from .models import LoadedModel, in_memory_model, load_model
from .pipeline import (PlanOptions, planner_measurements, run_errors, run_eval, run_plan, run_sensitivity,
                       run_taylor, save_eval)
from .session import Options, Session

__all__ = ["Analysis", "ErrorsResult", "EvalResult", "PlanResult", "SensitivityResult", "analyze",
           "analyze_session", "errors", "eval_configs", "evaluate", "evaluate_session", "load", "open_session", "plan",
           "sensitivity", "sites", "sites_table"]

# what ``model=`` takes: a source as ``--model`` takes it, or a classifier in memory
ModelArg = Union[str, os.PathLike, nn.Module, None]


# -- results ---------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """``vitq eval``: one row per configuration (FP32 first), as ``eval.csv`` holds it."""

    table: pd.DataFrame
    configs: dict[str, QuantConfig]
    meta: dict
    paths: list[Path]
    backend_line: str | None = None  # a real backend's agreement with the simulation


@dataclass
class SensitivityResult:
    """``vitq sensitivity``: candidates ranked (``sensitivity_<mode>_<group>.csv`` or the taylor estimate)."""

    table: pd.DataFrame
    meta: dict
    paths: list[Path]


@dataclass
class ErrorsResult:
    """``vitq errors``: per activation tensor and per weight (``errors_activations/weights.csv``)."""

    activations: pd.DataFrame
    weights: pd.DataFrame
    meta: dict
    paths: list[Path]


@dataclass
class PlanResult:
    """``vitq plan``: the plan as a QuantConfig (``plan.yaml``) and the search's tables."""

    config: QuantConfig
    float_sites: list[str]  # the sites the plan keeps float (``plan_skiplist.yaml``)
    met: bool
    verdict: str
    steps: pd.DataFrame  # plan_steps.csv
    tried: pd.DataFrame  # plan_tried.csv
    confirm: pd.DataFrame | None  # plan_confirm.csv (None without confirm images)
    meta: dict
    paths: list[Path]
    planner: Planner = field(repr=False)


@dataclass
class Analysis:
    """``vitq analyze``: plan, errors, the accuracy table (FP32, presets, plan) and the report."""

    plan: PlanResult
    errors: ErrorsResult
    accuracy: pd.DataFrame  # accuracy.csv
    report: Path
    out: Path
    bench_lines: list[str] = field(default_factory=list)


# -- the model and the session -----------------------------------------------------------------
def _processor(processor: object) -> object:
    """A HF image processor (or one of vitq's, called like it) as is; any other callable
    (PIL image -> (C, H, W) tensor) wrapped so vitq can call it like a HF one."""
    try:
        from transformers import ImageProcessingMixin
    except ImportError:  # pragma: no cover - transformers is a dependency
        ImageProcessingMixin = ()
    if isinstance(processor, (ImageProcessingMixin, TorchvisionProcessor)):
        return processor
    if not callable(processor):
        raise TypeError(f"processor: expected a HF image processor or a callable (PIL image -> tensor), "
                        f"got {type(processor).__name__}")
    return TorchvisionProcessor(processor)


def _set_labels(model: nn.Module, labels: Sequence[str]) -> None:
    labels = [str(x) for x in labels]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "id2label"):
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    else:
        model.config = LabelConfig(labels)


def load(model: ModelArg = None, *, weights: str | os.PathLike | None = None, processor: object = None,
         labels: Sequence[str] | None = None, name: str | None = None) -> LoadedModel:
    """``model`` as vitq loads it (see the module docstring): a source through
    :func:`vitq.models.load_model`, or a deep copy of an in-memory classifier with its processor."""
    if not isinstance(model, nn.Module):
        if processor is not None or labels is not None or name is not None:
            raise ValueError("processor=, labels= and name= are for a model passed in memory (an nn.Module); "
                             "a model folder or hub id carries its own")
        return load_model(model, weights)
    if weights is not None:
        raise ValueError("weights= is for a 'torchvision:NAME' or 'timm:ARCH' model; an in-memory model "
                         "carries its weights")
    if processor is None:
        raise ValueError("an in-memory model needs processor=: its HF image processor, or a callable taking a "
                         "PIL image and returning a (C, H, W) tensor")
    model = copy.deepcopy(model)  # vitq instruments the model in place: never the caller's
    family_of(model)  # an unsupported class fails here, naming what is supported
    if labels is not None:
        _set_labels(model, labels)
    if not hasattr(getattr(model, "config", None), "id2label"):
        raise ValueError("this model has no config.id2label: pass labels=[class names in output order], "
                         "named like the class folders of the data")
    return in_memory_model(model, _processor(processor), name or type(model).__name__)


def open_session(model: ModelArg = None, data: str | os.PathLike | None = None, *,
                 weights: str | os.PathLike | None = None, processor: object = None,
                 labels: Sequence[str] | None = None, name: str | None = None, out: str | os.PathLike | None = None,
                 calib: int = 256, seed: int = 0, batch_size: int = 32, device: str = "auto", tf32: bool = False,
                 workers: int | None = None, max_bad: float = 0.001, decode_cache: str | None = None,
                 progress: bool = True, limit: int | None = None) -> Session:
    """The session every function below runs in (model, data, output folder, options as
    the command line's: ``calib`` = ``--calib`` ...). ``data`` None: the embedded images."""
    loaded = load(model, weights=weights, processor=processor, labels=labels, name=name)
    opts = Options(model=None if isinstance(model, nn.Module) else (None if model is None else str(model)),
                   data=None if data is None else str(data), out=None if out is None else str(out), calib=calib,
                   limit=limit, batch_size=batch_size, seed=seed, workers=workers, max_bad=max_bad,
                   progress=progress, device=device, tf32=tf32, decode_cache=decode_cache,
                   weights=None if weights is None else str(weights))
    return Session(opts, loaded)


def _config(session: Session, config: QuantConfig | str | os.PathLike | None) -> QuantConfig:
    """A QuantConfig, a YAML/JSON file of one, or None (preset ``all``), validated against the model."""
    if config is None:
        config = preset("all", session.sites)
    elif not isinstance(config, QuantConfig):
        config = QuantConfig.load(config)
    config.validate(session.sites)
    return config


# -- the steps on a session (the command line runs these too) ------------------------------------
def sites_table(session: Session) -> pd.DataFrame:
    """One row per site: canonical name, kind, block, role, tensors, module path."""
    df = pd.DataFrame([{"name": s.name, "kind": s.kind, "block": s.block, "role": s.role,
                        "tensors": "+".join(s.slots), "path": s.path} for s in session.sites])
    df["block"] = df["block"].astype("Int64")
    return df


def eval_configs(session: Session, presets: Iterable[str], configs: Iterable[QuantConfig | str | os.PathLike] = (),
                 mixed_2_float: list[str] | None = None) -> dict[str, QuantConfig]:
    """The presets (``fp32`` is always evaluated, so it adds nothing) and the ``configs``
    (QuantConfig or file), by name, each validated against the model."""
    names = list(presets)
    for n in names:
        if n not in PRESETS:
            raise ConfigError(f"unknown preset {n!r}; presets are {', '.join(PRESETS)}")
    out = {n: preset(n, session.sites, mixed_2_float) for n in names if n != "fp32"}
    for cfg in configs:
        cfg = cfg if isinstance(cfg, QuantConfig) else QuantConfig.load(cfg)
        out[cfg.name] = cfg
    for cfg in out.values():
        cfg.validate(session.sites)
    return out


def evaluate_session(session: Session, configs: dict[str, QuantConfig], *, limit: int | None = None,
                     backend: str = "torch") -> EvalResult:
    """``vitq eval``: calibrate (or reuse the cache), FP32 and ``configs`` on the val images
    (``limit``: a seeded sample) with the simulation or a real int8 ``backend``; writes eval.*."""
    session.images("train", session.opts.calib)  # fail on bad data before any long work
    session.images("val", limit)
    session.calibrate()
    model = session.qmodel
    if backend != "torch":
        from .backends import backend_eval
        model = backend_eval(session, backend)
    df, meta, run = run_eval(session, configs, limit=limit, model=model)
    line = None
    if backend != "torch":
        from .backends import add_simulation_columns
        line = add_simulation_columns(model, df, meta)
    paths = save_eval(session, df, meta, run, configs)
    return EvalResult(df, configs, meta, list(paths), line)


def plan_result(session: Session, planner: Planner, paths: list[Path]) -> PlanResult:
    """The result of ``run_plan``: the planner's tables, the meta it wrote into plan_steps.json."""
    meta = artifacts.read(session.out, artifacts.PLAN_STEPS).meta
    confirm = pd.DataFrame(planner.confirm_rows) if getattr(planner, "confirm_rows", None) else None
    return PlanResult(planner.plan_config, list(meta["float_sites"]), bool(planner.met), planner.verdict(),
                      planner.steps_table(), planner.tried_table(), confirm, meta, paths, planner)


def analyze_session(session: Session, start: QuantConfig, budget: Budget, plan_options: PlanOptions, *,
                    error_images: int = 64, limit: int | None = None, bench: bool = False) -> Analysis:
    """``vitq analyze``: plan (with its sensitivity), errors of ``start``, the accuracy table of
    FP32, the reference presets and the plan on the val images (``limit``: a seeded sample),
    optionally the ONNX Runtime speed table (``bench``), then the report."""
    session.images("val", limit)  # fail on bad data before any long work
    session.calibrate()
    planner, plan_paths = run_plan(session, start, budget, plan_options)
    report, error_paths = run_errors(session, start, images=error_images)
    configs = {n: preset(n, session.sites) for n in REFERENCES}
    configs["plan"] = planner.plan_config
    # the plan and confirm images are val images the planner measured every config on already
    df, meta, run = run_eval(session, configs, limit=limit,
                             known=planner_measurements(session, planner, plan_options, configs))
    save_eval(session, df, meta, run, configs, spec=artifacts.ACCURACY)
    lines: list[str] = []
    if bench:
        from .bench import run_bench
        _, lines = run_bench(session, configs)
    path = render_report(session.out)
    return Analysis(plan_result(session, planner, plan_paths),
                    ErrorsResult(report.activations, report.weights, report.meta, error_paths), df, path,
                    session.out, lines)


# -- the functions a notebook calls ------------------------------------------------------------
_SESSION_DOC = """``model``, ``data``, ``weights``, ``processor``, ``labels``, ``name``, ``out`` and the
    options ``calib``, ``seed``, ``batch_size``, ``device``, ``progress``, ... as :func:`open_session`."""


def sites(model: ModelArg = None, *, weights: str | os.PathLike | None = None, device: str = "cpu") -> pd.DataFrame:
    """The quantization sites of ``model`` (``vitq sites``): canonical name, kind, block, role,
    tensors, module path. An in-memory model needs no processor or labels here."""
    if isinstance(model, nn.Module):
        if weights is not None:
            raise ValueError("weights= is for a 'torchvision:NAME' or 'timm:ARCH' model; an in-memory model "
                             "carries its weights")
        loaded = in_memory_model(copy.deepcopy(model), None, type(model).__name__)
        return sites_table(Session(Options(device=device, progress=False), loaded))
    return sites_table(open_session(model, weights=weights, device=device, progress=False))


def evaluate(model: ModelArg = None, data=None, *, presets: Sequence[str] = ("all", "mixed_1", "mixed_2"),
             configs: Sequence[QuantConfig | str | os.PathLike] = (), limit: int | None = None,
             backend: str = "torch", **session) -> EvalResult:
    """``vitq eval``: FP32, ``presets`` and ``configs`` on the val images. Session arguments:
    see :func:`open_session`."""
    s = open_session(model, data, limit=limit, **session)
    return evaluate_session(s, eval_configs(s, presets, configs), limit=limit, backend=backend)


def sensitivity(model: ModelArg = None, data=None, *, config=None, mode: str = "only", group: str = "op",
                images: int = 256, rank_by: str = "kl", method: str = "measured", probes: int = 8,
                **session) -> SensitivityResult:
    """``vitq sensitivity``: each candidate (``group`` op/block/kind) quantized alone (``mode``
    only) or kept float (all-but) on top of ``config`` (default preset ``all``), ranked;
    ``method="taylor"``: the gradient estimate of the ``only`` KL instead."""
    if method not in ("measured", "taylor"):
        raise ValueError(f"method: choose measured or taylor, not {method!r}")
    if method == "taylor" and mode != "only":
        raise ConfigError("method taylor estimates mode only; measure all-but with method measured")
    s = open_session(model, data, **session)
    start = _config(s, config)
    s.calibrate()
    if method == "taylor":
        df, meta, _, paths = run_taylor(s, start, group=group, images=images, probes=probes)
    else:
        df, meta, _, paths = run_sensitivity(s, start, mode=mode, group=group, images=images, rank_by=rank_by)
    return SensitivityResult(df, meta, list(paths))


def errors(model: ModelArg = None, data=None, *, config=None, images: int = 64, outlier_k: float = 6.0,
           **session) -> ErrorsResult:
    """``vitq errors``: isolated and accumulated error per activation, outliers, weight granularity."""
    s = open_session(model, data, **session)
    start = _config(s, config)
    s.calibrate()
    report, paths = run_errors(s, start, images=images, outlier_k=outlier_k)
    return ErrorsResult(report.activations, report.weights, report.meta, list(paths))


def _budget(max_drop, min_agreement, max_kl, beat_presets: bool) -> Budget:
    budget = Budget(max_drop, min_agreement, max_kl, beat_references=beat_presets)
    if budget.describe() == "none":
        raise ValueError("beat_presets=False needs a budget: max_drop, min_agreement or max_kl")
    return budget


def _plan_options(images, confirm_images, cost, measure_top, options: dict) -> PlanOptions:
    extra = {} if measure_top is None else {"measure_top": measure_top}
    return PlanOptions(images=images, confirm_images=confirm_images, cost=cost, **extra, **options)


def plan(model: ModelArg = None, data=None, *, config=None, max_drop: float | None = None,
         min_agreement: float | None = None, max_kl: float | None = None, beat_presets: bool = True,
         images: int = 256, confirm_images: int | None = None, cost: str = "auto", measure_top: int | None = None,
         plan_options: dict | None = None, **session) -> PlanResult:
    """``vitq plan``: the cheapest plan from ``config`` (default preset ``all``) that meets the
    budget (by default: beat every reference preset at no higher cost). ``plan_options``:
    further :class:`vitq.pipeline.PlanOptions` fields (objective, max_steps, all_but, ...)."""
    budget = _budget(max_drop, min_agreement, max_kl, beat_presets)
    opts = _plan_options(images, confirm_images, cost, measure_top, plan_options or {})
    s = open_session(model, data, **session)
    start = _config(s, config)
    s.calibrate()
    planner, paths = run_plan(s, start, budget, opts)
    return plan_result(s, planner, paths)


def analyze(model: ModelArg = None, data=None, *, config=None, max_drop: float | None = None,
            min_agreement: float | None = None, max_kl: float | None = None, beat_presets: bool = True,
            images: int = 256, confirm_images: int | None = None, cost: str = "auto", measure_top: int | None = None,
            error_images: int = 64, limit: int | None = None, bench: bool = False,
            plan_options: dict | None = None, **session) -> Analysis:
    """``vitq analyze``: plan, errors, accuracy table of FP32, presets and plan on the val images
    (``limit``: a seeded sample), and report.html, all in the output folder. Without ``model``
    and ``data`` it runs on the embedded default: ``vitq.analyze(out="out/x")``."""
    budget = _budget(max_drop, min_agreement, max_kl, beat_presets)
    opts = _plan_options(images, confirm_images, cost, measure_top, plan_options or {})
    s = open_session(model, data, limit=limit, **session)
    return analyze_session(s, _config(s, config), budget, opts, error_images=error_images, limit=limit, bench=bench)


for _f in (evaluate, sensitivity, errors, plan, analyze):
    _f.__doc__ += "\n\n    Session arguments: " + _SESSION_DOC
del _f
