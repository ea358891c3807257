"""Accuracy of several quantization configs in one pass over the images.

Each batch is decoded once and run under every config (their quantizer states are
prepared up front and swapped in; :func:`analysis.runner.stream`), so FP32 and all
presets see identical inputs and the label-free metrics (agreement, KL, logit
SQNR) compare like with like. Per-batch results are appended to a log, so a long
evaluation resumes where it died.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd
import torch
from tqdm import tqdm

from analysis.cost import config_cost
from analysis.metrics import OutputStats
from analysis.runner import stream
from quant.config import QuantConfig
from quant.store import ResultLog

FP32 = "fp32"


def summarize(records: list[dict], configs: dict[str, QuantConfig | None], sites, macs: dict[str, float]
              ) -> pd.DataFrame:
    """One row per config: OutputStats' summary, drops vs FP32 (pp), site counts and
    the int8 share of matmul MACs (analysis.cost)."""
    if not records:
        raise ValueError("no image was evaluated")
    records = sorted(records, key=lambda r: r["first"])
    rows = []
    for name, cfg in configs.items():
        stats = OutputStats()
        for r in records:
            stats.extend(OutputStats.from_dict(r["configs"][name]))
        rows.append({"config": name, **stats.summary(), **config_cost(cfg, sites, macs)})
    df = pd.DataFrame(rows)
    df.insert(4, "top1_drop", df.loc[0, "top1"] - df["top1"])
    df.insert(5, "top5_drop", df.loc[0, "top5"] - df["top5"])
    return df


def evaluate_configs(model, configs: dict[str, QuantConfig | None],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[int]]], sites=None,
                     macs: dict[str, float] | None = None, total: int | None = None, progress: bool = True,
                     log: ResultLog | None = None) -> pd.DataFrame:
    """FP32 (always first) and ``configs`` on ``batches``; with ``log``, batches already
    in it are reused and new ones appended (the caller skips their images). ``model``
    is the QuantModel or a backend with its prepare/restore/__call__ interface;
    ``sites`` default to its sites, ``macs`` (analysis.cost.site_macs) to none (no MAC share)."""
    sites = model.sites if sites is None else sites
    configs = {FP32: None, **{k: v for k, v in configs.items() if k != FP32}}
    states = {name: model.prepare(cfg) for name, cfg in configs.items()}
    records = list(log.done.values()) if log else []
    try:
        for idx, stats in stream(model, states, tqdm(batches, total=total, desc="evaluate", unit="batch",
                                                     disable=not progress)):
            record = {"candidate": f"images {idx[0]}-{idx[-1]}", "first": idx[0], "indices": idx,
                      "configs": {name: s.to_dict() for name, s in stats.items()}}
            records.append(record)
            if log:
                log.append(record)
    finally:
        model.apply(None)
    return summarize(records, configs, sites, macs or {})
