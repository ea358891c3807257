"""Accuracy of several quantization configs in one pass over the images.

Each batch is decoded once and run under every config (their quantizer states are
prepared up front and swapped in; :func:`analysis.runner.stream`), so FP32 and all
presets see identical inputs and the label-free metrics (agreement, KL, logit
SQNR) compare like with like. Per-batch results go to a :class:`MeasurementLog`, so a
long evaluation resumes where it died.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd
import torch
from tqdm import tqdm

from quant.config import QuantConfig
from quant.sites import Site

from .cost import config_cost
from .measurement_log import MeasurementLog
from .metrics import OutputStats
from .runner import SwitchableModel, stream

FP32 = "fp32"


def accuracy_row(config: QuantConfig | None, stats: OutputStats, fp32: OutputStats, sites: list[Site],
                 macs: dict[str, float]) -> dict:
    """The columns of one measured config (eval and planner rows alike): OutputStats'
    summary with the drops against ``fp32`` (the FP32 run on the same images) and the top-1
    drop's paired standard error, site counts and the int8 share of matmul MACs (analysis.cost)."""
    return {**stats.summary(fp32), "top1_drop_se": stats.standard_errors(fp32)["top1_drop_se"],
            **config_cost(config, sites, macs)}


def evaluated_images(log: MeasurementLog) -> set[int]:
    """Positions of the images whose batches the log holds."""
    return {i for row in log.done.values() for i in row["indices"]}


def summarize(records: list[dict], configs: dict[str, QuantConfig | None], sites, macs: dict[str, float]
              ) -> pd.DataFrame:
    """One row per config (:func:`accuracy_row`), FP32 first."""
    if not records:
        raise ValueError("no image was evaluated")
    records = sorted(records, key=lambda r: r["first"])
    stats = {}
    for name in configs:
        stats[name] = OutputStats()
        for r in records:
            stats[name].extend(OutputStats.from_dict(r["configs"][name]))
    return pd.DataFrame([{"config": name, **accuracy_row(cfg, stats[name], stats[FP32], sites, macs)}
                         for name, cfg in configs.items()])


def evaluate_configs(model: SwitchableModel, configs: dict[str, QuantConfig | None],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[int]]], sites=None,
                     macs: dict[str, float] | None = None, total: int | None = None, progress: bool = True,
                     log: MeasurementLog | None = None) -> pd.DataFrame:
    """FP32 (always first) and ``configs`` on ``batches``; with ``log``, batches already
    in it are reused and new ones appended (the caller skips their images:
    :func:`evaluated_images`). ``model`` is the QuantModel or a backend served through
    the same interface (:class:`~analysis.runner.SwitchableModel`); ``sites`` default to
    its sites, ``macs`` (analysis.cost.site_macs) to none (no MAC share)."""
    sites = model.sites if sites is None else sites
    configs = {FP32: None, **{k: v for k, v in configs.items() if k != FP32}}
    states = {name: model.prepare(cfg) for name, cfg in configs.items()}
    records = list(log.done.values()) if log else []
    try:
        for idx, stats in stream(model, states, tqdm(batches, total=total, desc="evaluate", unit="batch",
                                                     disable=not progress)):
            record = {"candidate": f"images {idx[0]}-{idx[-1]}", "first": idx[0], "indices": idx,
                      "configs": {name: s.to_dict() for name, s in stats.items()}}
            records.append(log.add(record) if log else record)
    finally:
        model.apply(None)
    return summarize(records, configs, sites, macs or {})
