"""Mixed-precision planner: the cheapest float fallback that meets an accuracy budget.

Order of work, every step measured on the same images with the whole configuration:
1. the reference rows (FP32, ``all``, ``mixed_1``, ``mixed_2``) and the start config;
2. cheap remedies before any float fallback: another activation observer everywhere,
   then, per offending site (worst of the ``only`` sensitivity ranking), another
   observer or per-channel weights, each kept only if it helps;
3. float sites greedily in order of their ``all-but`` benefit, each kept only if it
   helps, until the budget is met or no candidate is left.
Measurements are appended to a JSONL log, so an interrupted plan resumes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from quant.config import QuantConfig
from quant.model import QuantModel
from quant.observers import OBSERVERS
from quant.presets import preset

from .metrics import output_metrics
from .sensitivity import ResultLog, settings_key

MATMUL_KINDS = ("linear", "conv", "matmul_qk", "matmul_av")


@dataclass
class Budget:
    """Accuracy the plan must keep: top-1 drop vs FP32 (pp) and/or top-1 agreement (%)."""

    max_drop: float | None = 0.5
    min_agreement: float | None = None

    def met(self, row: dict) -> bool:
        ok = True
        if self.max_drop is not None:
            ok &= row["top1_drop"] <= self.max_drop
        if self.min_agreement is not None:
            ok &= row["agreement"] >= self.min_agreement
        return ok

    def score(self, row: dict) -> tuple:
        """Larger is better. With a ``min_agreement`` budget, agreement comes first
        (label-free; top-1 on a few hundred images moves in one-image steps and a
        remedy can win a lucky image while losing agreement), then the top-1 drop;
        KL breaks ties."""
        drop = -round(row["top1_drop"], 6)
        if self.min_agreement is not None:
            return (round(row["agreement"], 6), drop, -row["kl"])
        return (drop, -row["kl"])


def site_macs(qmodel: QuantModel, pixels: torch.Tensor) -> dict[str, float]:
    """Multiply-accumulates per image of every Linear/Conv/matmul site (from one forward)."""
    macs: dict[str, float] = {}
    modules = dict(qmodel.model.named_modules())
    head_dim = qmodel.head_dim

    def tap(tq, x, out):
        site, per_image = tq.site, x.numel() / len(x)
        if site.kind == "linear" and tq.slot == "input":
            macs[site.name] = per_image * modules[site.name].out_features
        elif site.kind == "conv" and tq.slot == "input":
            conv = modules[site.name]
            positions = (x.shape[-1] // conv.stride[1]) * (x.shape[-2] // conv.stride[0])
            macs[site.name] = positions * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        elif site.kind == "matmul_qk" and tq.slot == "q":
            macs[site.name] = per_image * x.shape[-2]
        elif site.kind == "matmul_av" and tq.slot == "probs":
            macs[site.name] = per_image * head_dim

    quantizers = [tq for tq in qmodel.tensor_quantizers() if tq.site.kind in MATMUL_KINDS]
    for tq in quantizers:
        tq.taps.append(tap)
    try:
        qmodel.apply(None)
        qmodel(pixels[:1])
    finally:
        for tq in quantizers:
            tq.taps.remove(tap)
    return macs


@dataclass
class Planner:
    qmodel: QuantModel
    pixels: list[torch.Tensor]
    labels: torch.Tensor
    out_dir: Path
    budget: Budget = field(default_factory=Budget)
    settings: dict = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        self.qmodel.apply(None)
        self.reference = self._logits()
        self.fp32 = output_metrics(self.reference, self.reference, self.labels)
        self.macs = site_macs(self.qmodel, self.pixels[0])
        self.log = ResultLog(self.out_dir / f"plan_measurements.{settings_key(self.settings)}.jsonl",
                             {**self.settings, "images": len(self.labels)})
        self.steps: list[dict] = []

    def _logits(self) -> torch.Tensor:
        return torch.cat([self.qmodel(p).double() for p in self.pixels])

    def measure(self, config: QuantConfig | None) -> dict:
        """Metrics of ``config`` on the plan images (read back from the log if done before)."""
        if config is None:
            return dict(self.fp32, top1_drop=0.0, top5_drop=0.0, int8_macs_share=0.0)
        key = settings_key(config.to_dict())
        if key not in self.log.done:
            self.qmodel.apply(config)
            row = {"candidate": key, **output_metrics(self._logits(), self.reference, self.labels)}
            self.qmodel.apply(None)
            self.log.append(row)
        row = {k: v for k, v in self.log.done[key].items() if k != "candidate"}
        row["top1_drop"] = self.fp32["top1"] - row["top1"]
        row["top5_drop"] = self.fp32["top5"] - row["top5"]
        int8 = {s.name for s in config.int8_sites(self.qmodel.sites)}
        row["int8_macs_share"] = 100 * sum(m for n, m in self.macs.items() if n in int8) / sum(self.macs.values())
        return row

    def _step(self, kind: str, config: QuantConfig | None, change: str) -> dict:
        row = {"step": len(self.steps), "kind": kind, "config": "fp32" if config is None else config.name,
               "change": change, "float_sites": 0 if config is None else len(config.float_sites),
               **self.measure(config)}
        self.steps.append(row)
        return row

    def plan(self, start: QuantConfig, only_table: pd.DataFrame, all_but_table: pd.DataFrame,
             offending: int = 4, max_fallbacks: int = 12, mixed_2_float: list[str] | None = None) -> QuantConfig:
        """The plan: see the module docstring. ``mixed_2_float`` picks the reference
        ``mixed_2`` row's fc sites (default: fc2 of blocks 4 and 5)."""
        t0 = time.time()
        sites = self.qmodel.sites
        self._step("reference", None, "FP32")
        for name in ("all", "mixed_1", "mixed_2"):
            self._step("reference", preset(name, sites, mixed_2_float), f"preset {name}")
        best = copy.deepcopy(start)
        best.name = "plan"
        best_row = self._step("start", best, f"start from {start.name}")

        def attempt(kind: str, candidate: QuantConfig, change: str) -> bool:
            nonlocal best, best_row
            if self.budget.met(best_row):
                return False
            row = self.measure(candidate)
            kept = self.budget.score(row) > self.budget.score(best_row)
            if kept:
                best, best_row = candidate, self._step(kind, candidate, change)
            return kept

        others = [obs for obs in OBSERVERS if obs != best.activation.observer]
        for obs in tqdm(others, desc="plan: global remedies", disable=not self.progress):
            attempt("remedy", _with(best, activation=replace(best.activation, observer=obs)),
                    f"activation observer {obs} everywhere")
        int8 = {s.name for s in best.int8_sites(sites)}
        worst = [n for n in only_table.sort_values("rank")["candidate"] if n in int8][:offending]
        for site_name in tqdm(worst, desc="plan: per-site remedies", disable=not self.progress):
            for obs in OBSERVERS:
                if obs != best.spec_for(self.qmodel.site_by_name[site_name], "activation").observer:
                    attempt("remedy", _override(best, site_name, "activation", observer=obs),
                            f"{site_name}: activation observer {obs}")
            site = self.qmodel.site_by_name[site_name]
            if site.has_weight() and not best.spec_for(site, "weight").per_channel:
                attempt("remedy", _override(best, site_name, "weight", per_channel=True),
                        f"{site_name}: per-channel weights")
        order = all_but_table.sort_values("rank")["candidate"].tolist()
        fallbacks = [n for n in order if n in int8][:max_fallbacks]
        for site_name in tqdm(fallbacks, desc="plan: float fallbacks", disable=not self.progress):
            if self.budget.met(best_row):
                break
            attempt("float", best.with_float([site_name]), f"float {site_name}")
        self.wall_s = time.time() - t0
        self.met = self.budget.met(best_row)
        return best

    def table(self) -> pd.DataFrame:
        cols = ["step", "kind", "config", "change", "float_sites", "top1", "top5", "top1_drop", "top5_drop",
                "agreement", "kl", "logit_sqnr_db", "int8_macs_share"]
        return pd.DataFrame(self.steps)[cols]


def _with(config: QuantConfig, **changes) -> QuantConfig:
    return replace(copy.deepcopy(config), **changes)


def _override(config: QuantConfig, site: str, part: str, **changes) -> QuantConfig:
    new = copy.deepcopy(config)
    new.overrides.setdefault(site, {}).setdefault(part, {}).update(changes)
    return new
