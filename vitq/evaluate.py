"""Accuracy of several quantization configs in one pass over the images.

Each batch is decoded once and run under every config (their quantizer states are
prepared up front and swapped in), so FP32 and all presets see identical inputs and
the label-free metrics (agreement, KL, logit SQNR) compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import pandas as pd
import torch
from tqdm import tqdm

from analysis.metrics import kl_divergence, top1_agreement, topk_correct
from quant.config import QuantConfig
from quant.model import QuantModel

FP32 = "fp32"


@dataclass
class _Tally:
    top1: list[torch.Tensor] = field(default_factory=list)
    top5: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    signal: float = 0.0
    noise: float = 0.0


def evaluate_configs(qmodel: QuantModel, configs: dict[str, QuantConfig | None],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[int]]],
                     total: int | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per config (FP32 first): top-1/top-5 (%), drop vs FP32 (pp), top-1
    agreement with FP32 (%), mean KL(FP32 || config) and logit SQNR (dB)."""
    configs = {FP32: None, **{k: v for k, v in configs.items() if k != FP32}}
    states = {name: qmodel.prepare(cfg) for name, cfg in configs.items()}
    tallies = {name: _Tally() for name in configs}
    for pixels, labels, _ in tqdm(batches, total=total, desc="evaluate", unit="batch", disable=not progress):
        reference = None
        for name, state in states.items():
            qmodel.restore(state)
            logits = qmodel(pixels).double()
            reference = logits if reference is None else reference
            t = tallies[name]
            t.top1.append(topk_correct(logits, labels, 1))
            t.top5.append(topk_correct(logits, labels, 5))
            t.agree.append(top1_agreement(reference, logits))
            t.kl.append(kl_divergence(reference, logits))
            t.signal += float(reference.pow(2).sum())
            t.noise += float((reference - logits).pow(2).sum())
    rows = []
    for name, cfg in configs.items():
        t = tallies[name]
        if not t.top1:
            raise ValueError("no image was evaluated")
        top1, top5 = 100 * torch.cat(t.top1).double().mean(), 100 * torch.cat(t.top5).double().mean()
        rows.append({
            "config": name,
            "images": int(torch.cat(t.top1).numel()),
            "top1": float(top1),
            "top5": float(top5),
            "agreement": float(100 * torch.cat(t.agree).double().mean()),
            "kl": float(torch.cat(t.kl).mean()),
            "logit_sqnr_db": float("inf") if t.noise == 0 else float(10 * torch.log10(torch.tensor(t.signal / t.noise))),
            "int8_sites": 0 if cfg is None else len(cfg.int8_sites(qmodel.sites)),
            "float_sites": len(qmodel.sites) if cfg is None else len(qmodel.sites) - len(cfg.int8_sites(qmodel.sites)),
        })
    df = pd.DataFrame(rows)
    df.insert(4, "top1_drop", df.loc[0, "top1"] - df["top1"])
    df.insert(5, "top5_drop", df.loc[0, "top5"] - df["top5"])
    qmodel.apply(None)
    return df
