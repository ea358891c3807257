"""Per-site (or per-group) sensitivity: quantize one candidate at a time (``only``) or
everything but one candidate (``all-but``) and measure the model's output.

Fast because a candidate whose first site is in block k only re-runs blocks k..end:
the background model's hidden state at every block boundary is computed once and
kept in disk-backed memmaps (memory stays bounded whatever the image count).
Resumable because every finished candidate is appended to a JSONL file that a rerun
with the same settings reads back. Shardable the same way: ``shard=(i, n)`` measures
every n-th candidate into its own log, and any later run reads all logs of its
settings, so n processes (or GPUs) split one table and an unsharded run merges it.

Per format (``formats=``, the planner over formats): an ``only`` candidate can also be
measured quantized in another format than the config gives it; those rows go into the
same log (keyed ``<candidate>@<format>``) and the same table, which then has a ``format``
column (every row's format) and an ``own_format`` column (True: the config's own format,
the rows a table without formats holds; :func:`own_format_rows`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from quant.config import QuantConfig
from quant.formats import get_format
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
    fmt: str | None = None  # ``only`` in this format (a quant.formats name); None: the config's own

    @property
    def key(self) -> str:
        """Its key in the measurement log: the name, ``<name>@<format>`` in another format."""
        return self.name if self.fmt is None else f"{self.name}@{self.fmt}"

    def specs(self, config: QuantConfig, site: Site) -> dict:
        """The slot specs ``site`` is quantized with (``only``): the config's, in ``fmt`` when set."""
        return config.slot_specs(site) if self.fmt is None else config.slot_specs(site, get_format(self.fmt))

    def format_label(self, config: QuantConfig) -> str:
        """The format its rows are measured in: ``fmt``, else the config's format of its sites
        (``mixed`` when they differ)."""
        if self.fmt is not None:
            return self.fmt
        names = {config.format_of(s).name for s in self.sites}
        return names.pop() if len(names) == 1 else "mixed"

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
                        shard: tuple[int, int] | None = None,
                        formats: dict[str, list[str]] | None = None) -> tuple[pd.DataFrame, dict, dict]:
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

    ``formats`` (mode ``only``): format name -> candidates also measured quantized in that
    format (whatever ``only`` says), in the same log; the table then has ``format`` and
    ``own_format`` columns, the config's own rows ranked first as without formats, then
    each format's rows ranked among themselves.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if rank_by not in RANK_METRICS:
        raise ValueError(f"unknown ranking metric {rank_by!r}; choose one of {', '.join(RANK_METRICS)}")
    qmodel = runner.qmodel
    config.validate(qmodel.sites)
    every = make_candidates(qmodel.sites, config, group)
    cands = ([*every] if only is None else [c for c in every if c.name in set(only)]) + _format_candidates(
        every, formats or {}, mode)
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
    todo = [c for c in cands if c.key not in done]
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
                    qmodel.quantize_site(site.name, cand.specs(config, site))
                else:
                    qmodel.float_site(site.name)
            start = -1 if naive else cand.start(num_blocks)
            stats = runner.measure(qmodel.snapshot(), start, cache)
            log.add({"candidate": cand.key, **cand.describe(), "mode": mode, "start_block": start,
                     **({} if cand.fmt is None else {"format": cand.fmt}), **stats.summary()})
        loop_s = time.time() - t_loop
        qmodel.apply(None)
    elapsed = time.time() - t0
    rows = [{**done[c.key], "candidate": c.name, **drops(done[c.key], fp32)} for c in cands]
    if not formats:
        df = _rank(pd.DataFrame(rows), baseline, mode, rank_by)
    else:  # the config's own rows, then each format's, each ranked among themselves
        for c, row in zip(cands, rows):
            row.update({"format": c.format_label(config), "own_format": c.fmt is None})
        parts = [[r for c, r in zip(cands, rows) if c.fmt == f] for f in (None, *formats)]
        df = pd.concat([_rank(pd.DataFrame(p), baseline, mode, rank_by) for p in parts if p], ignore_index=True)
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


def _format_candidates(every: list[Candidate], formats: dict[str, list[str]], mode: str) -> list[Candidate]:
    """The candidates of ``formats`` (format -> candidate names) measured in that format."""
    if formats and mode != "only":
        raise ValueError("a candidate is measured in another format with --mode only")
    by_name = {c.name: c for c in every}
    out = []
    for fmt, names in formats.items():
        get_format(fmt)  # a KeyError naming the formats
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"no candidate {', '.join(unknown)} to measure in {fmt}")
        out += [replace(by_name[n], fmt=fmt) for n in names]
    return out


def own_format_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the config's own formats (a table without per-format rows: all of it)."""
    if "own_format" not in table:
        return table
    return table[table["own_format"].astype(bool)].reset_index(drop=True)


def format_measurements(table: pd.DataFrame, metric: str = "kl", *,
                        own: bool = False) -> dict[tuple[str, str], float]:
    """(candidate, format) -> ``metric`` of the rows measured in another format than the
    config's (``own``: of every row, the config's own format included); {} for a table without
    per-format rows."""
    if "own_format" not in table:
        return {}
    rows = table if own else table[~table["own_format"].astype(bool)]
    return {(str(r["candidate"]), str(r["format"])): float(r[metric]) for _, r in rows.iterrows()}


def with_measured_formats(estimates: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """A per-format taylor table (``candidate``, ``format``, ``kl_estimate``) with ``kl``: the
    measured ``only`` KL of ``table``'s per-format rows where one exists (``source``
    measured), else the estimate (``source`` taylor)."""
    measured = format_measurements(table)
    keys = list(zip(estimates["candidate"], estimates["format"]))
    return estimates.assign(kl=[measured.get(k, e) for k, e in zip(keys, estimates["kl_estimate"])],
                            source=["measured" if k in measured else "taylor" for k in keys])


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
    table = own_format_rows(table)
    fc = table[table["role"].isin(["fc1", "fc2"])].sort_values("rank")
    if len(fc) < n:
        raise ValueError(f"the sensitivity table has {len(fc)} MLP fc site(s); need {n}")
    return fc["candidate"].head(n).tolist()
