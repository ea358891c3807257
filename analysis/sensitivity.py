"""Per-site (or per-group) sensitivity: quantize one candidate at a time (``only``) or
everything but one candidate (``all-but``) and measure the model's output.

Fast because a candidate whose first site is in block k only re-runs blocks k..end:
the background model's hidden state at every block boundary is computed once and
kept in disk-backed memmaps (memory stays bounded whatever the image count).
Resumable because every finished candidate is appended to a JSONL file that a rerun
with the same settings reads back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from quant.config import QuantConfig
from quant.sites import Site
from quant.store import ResultLog, settings_key

from .runner import Runner, scratch

from .names import GROUPS, MODES, RANK_METRICS  # re-exported: a light module, the CLI parser reads it


@dataclass(frozen=True)
class Candidate:
    """What one measurement quantizes (only) or keeps float (all-but)."""

    name: str
    sites: tuple[Site, ...]

    def start(self, num_blocks: int) -> int:
        """First block the candidate touches: -1 = the patch embedding, num_blocks = the head."""
        starts = [-1 if s.role == "patch_embed" else (num_blocks if s.block is None else s.block)
                  for s in self.sites]
        return min(starts)


def make_candidates(sites: list[Site], config: QuantConfig, group: str) -> list[Candidate]:
    """Candidates among the sites ``config`` quantizes, one per site, block or kind."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose one of {', '.join(GROUPS)}")
    int8 = config.int8_sites(sites)
    if group == "op":
        return [Candidate(s.name, (s,)) for s in int8]
    key = (lambda s: "block " + ("-" if s.block is None else str(s.block))) if group == "block" else (
        lambda s: f"kind {s.kind}")
    groups: dict[str, list[Site]] = {}
    for s in int8:
        groups.setdefault(key(s), []).append(s)
    return [Candidate(name, tuple(members)) for name, members in groups.items()]


def analyze_sensitivity(runner: Runner, config: QuantConfig, out_dir: Path, *, mode: str = "only",
                        group: str = "op", rank_by: str = "kl", settings: dict | None = None, naive: bool = False,
                        only: list[str] | None = None, progress: bool = True) -> tuple[pd.DataFrame, dict, dict]:
    """Rank candidates by how much they hurt (``only``) or help (``all-but``).

    ``config`` gives the int8 specs and, for ``all-but``, the background model;
    ``runner`` holds the images and the FP32 reference. Returns the ranked table,
    its metadata and the run information (wall times, speed-up over naive
    re-evaluation). ``naive`` re-runs every candidate from the pixels (checks and
    benchmarks); ``only`` restricts the run to the named candidates.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if rank_by not in RANK_METRICS:
        raise ValueError(f"unknown ranking metric {rank_by!r}; choose one of {', '.join(RANK_METRICS)}")
    qmodel = runner.qmodel
    config.validate(qmodel.sites)
    cands = make_candidates(qmodel.sites, config, group)
    if only is not None:
        cands = [c for c in cands if c.name in set(only)]
    if not cands:
        raise ValueError("no candidate to measure: the config keeps every site float")
    n = len(runner)
    settings = {**(settings or {}), "mode": mode, "group": group, "images": n, "config": config.to_dict()}
    stem = f"sensitivity_{mode.replace('-', '_')}_{group}"
    log = ResultLog(out_dir / f"{stem}.{settings_key(settings)}.jsonl", settings)
    todo = [c for c in cands if c.name not in log.done]
    if len(todo) < len(cands):
        print(f"resuming: {len(cands) - len(todo)} of {len(cands)} candidates already done ({log.path})")

    t0 = time.time()
    fp32_state = runner.fp32_state
    base_state = runner.state(config)
    background = fp32_state if mode == "only" else base_state
    with scratch(out_dir) as tmp:
        t_ref = time.time()
        cache = runner.boundaries(background, tmp / "bounds")
        full_pass_s = time.time() - t_ref  # one full forward (plus caching): the naive cost per candidate
        baseline = runner.measure(base_state).summary()
        fp32 = runner.measure(fp32_state).summary()
        num_blocks = qmodel.num_blocks
        t_loop = time.time()
        for cand in tqdm(todo, desc=f"sensitivity {mode}", unit="cand", disable=not progress):
            qmodel.restore(background)
            for site in cand.sites:
                if mode == "only":
                    qmodel.quantize_site(site.name, config.slot_specs(site))
                else:
                    qmodel.float_site(site.name)
            start = -1 if naive else cand.start(num_blocks)
            stats = runner.measure(qmodel.snapshot(), start, cache)
            log.append({"candidate": cand.name, **_describe(cand), "mode": mode, "start_block": start,
                        **stats.summary()})
        loop_s = time.time() - t_loop
        qmodel.apply(None)
    elapsed = time.time() - t0
    df = _rank(pd.DataFrame([log.done[c.name] for c in cands]), fp32, baseline, mode, rank_by)
    run = {"wall_s": round(elapsed, 2), "measured_now": len(todo), "candidates_s": round(loop_s, 2),
           "full_pass_s": round(full_pass_s, 3), "naive_estimate_s": round(full_pass_s * len(todo), 2),
           # one naive candidate = one full forward; the cached run pays its cache once
           "speedup_vs_naive": round(full_pass_s * len(todo) / elapsed, 2) if todo and not naive else None,
           "log": str(log.path)}
    meta = {"mode": mode, "group": group, "images": n, "candidates": len(cands), "fp32": fp32,
            "baseline": baseline, "rank_by": rank_by}
    return df, meta, run


def _describe(cand: Candidate) -> dict:
    s = cand.sites
    one = len(s) == 1
    return {"path": s[0].path if one else "", "kind": s[0].kind if len({x.kind for x in s}) == 1 else "group",
            "block": s[0].block if len({x.block for x in s}) == 1 else None,
            "role": s[0].role if one else "group", "sites": len(s)}


# For each ranking metric: does a larger value mean a more harmful candidate?
_HARMFUL_WHEN_LARGE = {"top1_drop": True, "kl": True, "agreement": False, "logit_sqnr_db": False}


def _rank(df: pd.DataFrame, fp32: dict, baseline: dict, mode: str, rank_by: str) -> pd.DataFrame:
    """Worst first for ``only`` (what hurts most), most helpful first for ``all-but``."""
    df = df.copy()
    df["top1_drop"] = fp32["top1"] - df["top1"]
    df["top5_drop"] = fp32["top5"] - df["top5"]
    if mode == "all-but":
        df["top1_gain"] = df["top1"] - baseline["top1"]
    harmful_first = _HARMFUL_WHEN_LARGE[rank_by] == (mode == "only")
    df["block"] = df["block"].astype("Int64")  # None for sites outside the blocks
    tie = "top1_drop" if rank_by == "kl" else "kl"  # the drop beside KL; KL breaks other ties
    tie_harmful_first = _HARMFUL_WHEN_LARGE[tie] == (mode == "only")
    df = df.sort_values([rank_by, tie], ascending=[not harmful_first, not tie_harmful_first], kind="stable")
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def most_sensitive_fc(table: pd.DataFrame, n: int = 2) -> list[str]:
    """The ``n`` highest-ranked MLP fc sites of a per-site table (for ``mixed_2``)."""
    fc = table[table["role"].isin(["fc1", "fc2"])].sort_values("rank")
    if len(fc) < n:
        raise ValueError(f"the sensitivity table has {len(fc)} MLP fc site(s); need {n}")
    return fc["candidate"].head(n).tolist()
