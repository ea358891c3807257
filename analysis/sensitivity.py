"""Per-site (or per-group) sensitivity: quantize one candidate at a time (``only``) or
everything but one candidate (``all-but``) and measure the model's output.

Fast because a candidate whose first site is in block k only re-runs blocks k..end:
the background model's hidden state at every block boundary is computed once and
kept in disk-backed memmaps (memory stays bounded whatever the image count).
Resumable because every finished candidate is appended to a JSONL file that a rerun
with the same settings reads back. Shardable the same way: ``shard=(i, n)`` measures
every n-th candidate into its own log, and any later run reads all logs of its
settings, so n processes (or GPUs) split one table and an unsharded run merges it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from quant.config import QuantConfig
from quant.sites import Site
from quant.store import settings_key

from .measurement_log import MeasurementLog
from .metrics import drops
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

    def describe(self) -> dict:
        """The table columns that say what the candidate is: path, kind, block, role, sites
        ("group" / "" / None where its sites differ)."""
        s = self.sites
        one = len(s) == 1
        return {"path": s[0].path if one else "", "kind": s[0].kind if len({x.kind for x in s}) == 1 else "group",
                "block": s[0].block if len({x.block for x in s}) == 1 else None,
                "role": s[0].role if one else "group", "sites": len(s)}


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
                        only: list[str] | None = None, progress: bool = True,
                        shard: tuple[int, int] | None = None) -> tuple[pd.DataFrame, dict, dict]:
    """Rank candidates by how much they hurt (``only``) or help (``all-but``).

    ``config`` gives the int8 specs and, for ``all-but``, the background model;
    ``runner`` holds the images and the FP32 reference. Returns the ranked table,
    its metadata and the run information (wall times, speed-up over naive
    re-evaluation). ``naive`` re-runs every candidate from the pixels (checks and
    benchmarks); ``only`` restricts the run to the named candidates.

    ``shard=(i, n)`` measures only the candidates at positions i, i+n, ... of the
    candidate list (after ``only``; round-robin, so every shard gets early and late
    blocks alike) and appends them to ``<log>.shard-<i>-of-<n>.jsonl``; its table
    covers those candidates only. Every run first reads what the main log and all
    shard logs of the same settings hold, and measures only what none has; an
    unsharded run also copies the shards' rows into the main log, so its result
    does not depend on the shard files staying around.
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
    total = len(cands)
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard {index}/{count}: need 0 <= i < n")
        cands = cands[index::count]
    n = len(runner)
    settings = {**(settings or {}), "mode": mode, "group": group, "images": n, "config": config.to_dict()}
    base = f"sensitivity_{mode.replace('-', '_')}_{group}.{settings_key(settings)}"
    main_path = out_dir / f"{base}.jsonl"
    shard_paths = sorted(out_dir.glob(f"{base}.shard-*.jsonl"))
    if shard is None:
        log = MeasurementLog(main_path, settings, read_also=shard_paths, adopt=True)
        if log.adopted:
            print(f"merged {log.adopted} candidates from {len(shard_paths)} shard log(s) into {log.path}")
    else:  # the main log is only read here: the other shards read it too
        log = MeasurementLog(out_dir / f"{base}.shard-{index}-of-{count}.jsonl", settings,
                             read_also=[main_path, *shard_paths])
    merged, done = log.adopted, log.done
    todo = [c for c in cands if c.name not in done]
    log.resuming(len(cands) - len(todo), len(cands), "candidates already done")
    shard_meta = {} if shard is None else {"shard": f"{index}/{count}", "candidates_total": total}
    if not cands:  # more shards than candidates: nothing for this one
        return pd.DataFrame(), {"mode": mode, "group": group, "images": n, "candidates": 0, **shard_meta}, {
            "wall_s": 0.0, "measured_now": 0, "merged_from_shards": 0, "log": str(log.path)}

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
            log.add({"candidate": cand.name, **cand.describe(), "mode": mode, "start_block": start, **stats.summary()})
        loop_s = time.time() - t_loop
        qmodel.apply(None)
    elapsed = time.time() - t0
    df = _rank(pd.DataFrame([{**done[c.name], **drops(done[c.name], fp32)} for c in cands]), baseline, mode, rank_by)
    run = {"wall_s": round(elapsed, 2), "measured_now": len(todo), "merged_from_shards": merged,
           "candidates_s": round(loop_s, 2),
           "full_pass_s": round(full_pass_s, 3), "naive_estimate_s": round(full_pass_s * len(todo), 2),
           # one naive candidate = one full forward; the cached run pays its cache once
           "speedup_vs_naive": round(full_pass_s * len(todo) / elapsed, 2) if todo and not naive else None,
           "log": str(log.path)}
    meta = {"mode": mode, "group": group, "images": n, "candidates": len(cands), "fp32": fp32,
            "baseline": baseline, "rank_by": rank_by}
    meta.update(shard_meta)  # a shard's table is partial: the pipeline does not write it as the artefact
    return df, meta, run


# For each ranking metric: does a larger value mean a more harmful candidate?
_HARMFUL_WHEN_LARGE = {"top1_drop": True, "kl": True, "agreement": False, "logit_sqnr_db": False}


def _rank(df: pd.DataFrame, baseline: dict, mode: str, rank_by: str) -> pd.DataFrame:
    """Worst first for ``only`` (what hurts most), most helpful first for ``all-but``."""
    df = df.copy()
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
