"""Accuracy of several quantization configs in one pass over the images.

Each batch is decoded once and run under every config (their quantizer states are
prepared up front and swapped in), so FP32 and all presets see identical inputs and
the label-free metrics (agreement, KL, logit SQNR) compare like with like. Per-batch
results can be appended to a log, so a long evaluation resumes where it died.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd
import torch
from tqdm import tqdm

from analysis.metrics import kl_divergence, top1_agreement, topk_correct
from analysis.sensitivity import ResultLog
from quant.config import QuantConfig
from quant.model import QuantModel

FP32 = "fp32"


def batch_record(qmodel: QuantModel, states: dict[str, dict], pixels: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, dict]:
    """Per-image hits and the SQNR sums of one batch, for every config."""
    out, reference = {}, None
    for name, state in states.items():
        qmodel.restore(state)
        logits = qmodel(pixels).double()
        reference = logits if reference is None else reference
        out[name] = {
            "top1": topk_correct(logits, labels, 1).tolist(),
            "top5": topk_correct(logits, labels, 5).tolist(),
            "agree": top1_agreement(reference, logits).tolist(),
            "kl": kl_divergence(reference, logits).tolist(),
            "signal": float(reference.pow(2).sum()),
            "noise": float((reference - logits).pow(2).sum()),
        }
    return out


def summarize(records: list[dict], configs: dict[str, QuantConfig | None], qmodel: QuantModel) -> pd.DataFrame:
    """One row per config: top-1/top-5 (%), drop vs FP32 (pp), agreement with FP32 (%),
    mean KL(FP32 || config) (nats), logit SQNR (dB), int8/float site counts."""
    if not records:
        raise ValueError("no image was evaluated")
    records = sorted(records, key=lambda r: r["first"])
    rows = []
    for name, cfg in configs.items():
        parts = [r["configs"][name] for r in records]

        def mean(key: str) -> float:
            values = torch.tensor([v for p in parts for v in p[key]], dtype=torch.float64)
            return float(values.mean())

        signal, noise = sum(p["signal"] for p in parts), sum(p["noise"] for p in parts)
        int8 = 0 if cfg is None else len(cfg.int8_sites(qmodel.sites))
        rows.append({
            "config": name, "images": sum(len(p["top1"]) for p in parts),
            "top1": 100 * mean("top1"), "top5": 100 * mean("top5"),
            "agreement": 100 * mean("agree"), "kl": mean("kl"),
            "logit_sqnr_db": float("inf") if noise == 0 else float(10 * torch.log10(torch.tensor(signal / noise))),
            "int8_sites": int8, "float_sites": len(qmodel.sites) - int8,
        })
    df = pd.DataFrame(rows)
    df.insert(4, "top1_drop", df.loc[0, "top1"] - df["top1"])
    df.insert(5, "top5_drop", df.loc[0, "top5"] - df["top5"])
    return df


def evaluate_configs(qmodel: QuantModel, configs: dict[str, QuantConfig | None],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[int]]],
                     total: int | None = None, progress: bool = True,
                     log: ResultLog | None = None) -> pd.DataFrame:
    """FP32 (always first) and ``configs`` on ``batches``; with ``log``, batches already
    in it are reused and new ones appended (the caller skips their images)."""
    configs = {FP32: None, **{k: v for k, v in configs.items() if k != FP32}}
    states = {name: qmodel.prepare(cfg) for name, cfg in configs.items()}
    records = list(log.done.values()) if log else []
    try:
        for pixels, labels, idx in tqdm(batches, total=total, desc="evaluate", unit="batch", disable=not progress):
            record = {"candidate": f"images {idx[0]}-{idx[-1]}", "first": idx[0], "indices": list(idx),
                      "configs": batch_record(qmodel, states, pixels, labels)}
            records.append(record)
            if log:
                log.append(record)
    finally:
        qmodel.apply(None)
    return summarize(records, configs, qmodel)
