"""Per-site (or per-group) sensitivity: quantize one candidate at a time (``only``) or
everything but one candidate (``all-but``) and measure the model's output.

Fast because a candidate whose first site is in block k only re-runs blocks k..end:
the background model's hidden state at every block boundary is computed once and
kept in disk-backed memmaps (memory stays bounded whatever the image count).
Resumable because every finished candidate is appended to a JSONL file that a rerun
with the same settings reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from quant.config import QuantConfig
from quant.model import QuantModel
from quant.sites import Site

from .metrics import output_metrics

MODES = ("only", "all-but")
GROUPS = ("op", "block", "kind")
RANK_METRICS = ("top1_drop", "kl", "agreement", "logit_sqnr_db")


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


class _Memmap:
    """A float32 array on disk filled chunk by chunk."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)

    def write(self, start: int, values: torch.Tensor) -> None:
        self.array[start:start + len(values)] = values.numpy()

    def read(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[start:stop]))


class BoundaryCache:
    """Pixels and the hidden states entering every block (and the head) for a fixed
    image set, under one background quantization state."""

    def __init__(self, qmodel: QuantModel, pixels: _Memmap, n: int, batch_size: int, folder: Path) -> None:
        self.qmodel, self.pixels, self.n, self.batch_size = qmodel, pixels, n, batch_size
        self.bounds: list[_Memmap] = []
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                h = qmodel.embed(pixels.read(start, start + batch_size))
                for k in range(qmodel.num_blocks + 1):
                    if len(self.bounds) <= k:
                        self.bounds.append(_Memmap(folder / f"bound_{k}.npy", (n, *h.shape[1:])))
                    self.bounds[k].write(start, h)
                    if k < qmodel.num_blocks:
                        h = qmodel.run_blocks(h, k, k + 1)

    @torch.inference_mode()
    def logits_from(self, start_block: int) -> torch.Tensor:
        """Logits of all images, re-running the model from ``start_block`` on."""
        out = []
        for i in range(0, self.n, self.batch_size):
            if start_block < 0:
                h = self.qmodel.embed(self.pixels.read(i, i + self.batch_size))
                start = 0
            else:
                h, start = self.bounds[start_block].read(i, i + self.batch_size), start_block
            out.append(self.qmodel.head(self.qmodel.run_blocks(h, start)).double())
        return torch.cat(out)


class ResultLog:
    """Append-only JSONL of finished candidates; a torn last line (killed run) is ignored."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if path.is_file():
            lines = path.read_text().splitlines()
            for line in lines[1:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[row["candidate"]] = row
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings}) + "\n")

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[row["candidate"]] = row


def settings_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def analyze_sensitivity(qmodel: QuantModel, config: QuantConfig, pixels_batches: Iterable[torch.Tensor],
                        labels: torch.Tensor, out_dir: Path, *, mode: str = "only", group: str = "op",
                        rank_by: str = "top1_drop", settings: dict | None = None, naive: bool = False,
                        only: list[str] | None = None, progress: bool = True,
                        batch_size: int = 32) -> tuple[pd.DataFrame, dict]:
    """Rank candidates by how much they hurt (``only``) or help (``all-but``).

    ``config`` gives the int8 specs and, for ``all-but``, the background model. Returns
    the ranked table and run metadata (wall time, speed-up over naive re-evaluation).
    ``naive`` re-runs every candidate from the pixels (for checks and benchmarks);
    ``only`` restricts the run to the named candidates.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if rank_by not in RANK_METRICS:
        raise ValueError(f"unknown ranking metric {rank_by!r}; choose one of {', '.join(RANK_METRICS)}")
    config.validate(qmodel.sites)
    cands = make_candidates(qmodel.sites, config, group)
    if only is not None:
        cands = [c for c in cands if c.name in set(only)]
    if not cands:
        raise ValueError("no candidate to measure: the config keeps every site float")
    n = len(labels)
    settings = {**(settings or {}), "mode": mode, "group": group, "images": n, "config": config.to_dict()}
    stem = f"sensitivity_{mode.replace('-', '_')}_{group}"
    log = ResultLog(out_dir / f"{stem}.{settings_key(settings)}.jsonl", settings)
    todo = [c for c in cands if c.name not in log.done]
    if len(todo) < len(cands):
        print(f"resuming: {len(cands) - len(todo)} of {len(cands)} candidates already done ({log.path})")

    t0 = time.time()
    fp32_state = qmodel.prepare(None)
    base_state = qmodel.prepare(config)
    _remove_stale_scratch(out_dir)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=out_dir) as tmp:
        tmp = Path(tmp)
        pixels, seen = None, 0
        for batch in pixels_batches:
            if pixels is None:
                pixels = _Memmap(tmp / "pixels.npy", (n, *batch.shape[1:]))
            pixels.write(seen, batch)
            seen += len(batch)
        if seen != n:
            raise ValueError(f"expected {n} images, got {seen}")
        background = fp32_state if mode == "only" else base_state
        qmodel.restore(fp32_state)
        t_ref = time.time()
        fp32_cache = BoundaryCache(qmodel, pixels, n, batch_size, _mkdir(tmp / "fp32"))
        reference = fp32_cache.logits_from(qmodel.num_blocks)
        full_pass_s = time.time() - t_ref  # one full forward (plus caching): the naive cost per candidate
        cache = fp32_cache
        if mode == "all-but":
            qmodel.restore(base_state)
            cache = BoundaryCache(qmodel, pixels, n, batch_size, _mkdir(tmp / "base"))
        fp32 = output_metrics(reference, reference, labels)
        baseline = output_metrics(cache.logits_from(qmodel.num_blocks), reference, labels)
        num_blocks = qmodel.num_blocks
        t_loop = time.time()
        for cand in tqdm(todo, desc=f"sensitivity {mode}", unit="cand", disable=not progress):
            qmodel.restore(background)
            for site in cand.sites:
                if mode == "only":
                    qmodel.quantize_site(site.name, config.spec_for(site, "activation"),
                                         config.spec_for(site, "weight"))
                else:
                    qmodel.float_site(site.name)
            start = -1 if naive else cand.start(num_blocks)
            row = {"candidate": cand.name, **_describe(cand), "mode": mode, "start_block": start,
                   **output_metrics(cache.logits_from(start), reference, labels)}
            log.append(row)
        loop_s = time.time() - t_loop
        qmodel.apply(None)
    elapsed = time.time() - t0
    df = _rank(pd.DataFrame([log.done[c.name] for c in cands]), fp32, baseline, mode, rank_by)
    run = {"measured_now": len(todo),
            "wall_s": round(elapsed, 2), "candidates_s": round(loop_s, 2), "full_pass_s": round(full_pass_s, 3),
            "naive_estimate_s": round(full_pass_s * len(todo), 2),
            # one naive candidate = one full forward; the cached run pays its caches once
            "speedup_vs_naive": round(full_pass_s * len(todo) / elapsed, 2) if todo and not naive else None,
            "log": str(log.path)}
    meta = {"mode": mode, "group": group, "images": n, "candidates": len(cands), "fp32": fp32,
            "baseline": baseline, "rank_by": rank_by, "run": run}
    return df, meta


SCRATCH_PREFIX = "vitq-sens-"


def _remove_stale_scratch(out_dir: Path) -> None:
    """Delete scratch caches left by killed runs (their process is gone)."""
    for folder in out_dir.glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _describe(cand: Candidate) -> dict:
    s = cand.sites
    one = len(s) == 1
    return {"kind": s[0].kind if len({x.kind for x in s}) == 1 else "group",
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
    df = df.sort_values([rank_by, "kl"], ascending=[not harmful_first, mode != "only"], kind="stable")
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def most_sensitive_fc(table: pd.DataFrame, n: int = 2) -> list[str]:
    """The ``n`` highest-ranked MLP fc sites of a per-site table (for ``mixed_2``)."""
    fc = table[table["role"].isin(["fc1", "fc2"])].sort_values("rank")
    if len(fc) < n:
        raise ValueError(f"the sensitivity table has {len(fc)} MLP fc site(s); need {n}")
    return fc["candidate"].head(n).tolist()
