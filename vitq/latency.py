"""What keeping a site float costs in real time: a per-site latency table measured once
with ONNX Runtime on this machine (``vitq plan --cost latency``).

MACs say nothing about a residual add, yet keeping it float costs time: Q/DQ pairs
around it, a fused int8 chain broken in two (ViT-B/16 ``mixed_1`` 9.8 img/s against
``all``'s 12.3 img/s). So the table times the start config in ONNX Runtime and, for
each group of sites of one kind and role (all residual adds after attention, all
fc2, ...), the same config with that group float; the slowdown per site, in % of
the start config's time, is that site's cost. Sessions are timed round-robin so a
drift of the machine hits every variant alike; medians of ``runs`` timings.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from quant.config import QuantConfig
from quant.model import QuantModel
from quant.sites import Site

from .backends import OnnxRuntimeInt8


def site_groups(config: QuantConfig, sites: list[Site]) -> dict[str, list[str]]:
    """int8 sites of ``config`` grouped by kind and role (``residual/residual_mlp``): sites
    of one group do the same work in every block, so they share one latency cost."""
    groups: dict[str, list[str]] = {}
    for s in config.int8_sites(sites):
        groups.setdefault(f"{s.kind}/{s.role}", []).append(s.name)
    return groups


def measure_site_latency(qmodel: QuantModel, config: QuantConfig, pixels: torch.Tensor, *, runs: int = 5,
                         threads: int | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per site group: its sites, the median time of ``config`` and of ``config``
    with the group float (ms per batch of ``pixels``), and the cost of one site of the
    group in % of ``config``'s time (negative when float is faster)."""
    from tqdm import tqdm

    groups = site_groups(config, qmodel.sites)
    with tempfile.TemporaryDirectory(prefix="vitq-latency-") as tmp:
        backend = OnnxRuntimeInt8(qmodel, Path(tmp), pixels[:1], threads=threads)
        variants = {"start": backend.build("start", config)}
        for label, members in tqdm(groups.items(), desc="latency: export", unit="graph", disable=not progress):
            variants[label] = backend.build(label.replace("/", "_"), config.with_float(members))
        for run in variants.values():  # warm-up: first runs allocate and pick kernels
            run(pixels)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in tqdm(range(runs), desc="latency: timing", unit="round", disable=not progress):
            for label, run in variants.items():
                t0 = time.perf_counter()
                run(pixels)
                times[label].append(1000 * (time.perf_counter() - t0))
    base = statistics.median(times["start"])
    rows = []
    for label, members in groups.items():
        ms = statistics.median(times[label])
        rows.append({"group": label, "kind": label.split("/")[0], "role": label.split("/")[1],
                     "sites": len(members), "members": ",".join(members), "start_ms": base, "float_ms": ms,
                     "spread_ms": max(times[label]) - min(times[label]),
                     "cost_per_site": 100 * (ms - base) / base / len(members)})
    return pd.DataFrame(rows)


def unit_costs(table: pd.DataFrame) -> dict[str, float]:
    """site -> cost of keeping it float (% of the start config's time), floored at 0: a
    group measured faster in float is free, not a gain, as far as the planner goes."""
    return {name: max(float(r["cost_per_site"]), 0.0) for _, r in table.iterrows() for name in r["members"].split(",")}
