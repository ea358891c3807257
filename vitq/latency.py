"""What keeping a site float costs in real time: a per-site latency table measured once
with ONNX Runtime on this machine (``vitq plan --cost latency``).

What a deployment pays for a float site is time in the runtime, not a MAC share: keeping
a residual add float removes a Q/DQ pair that ONNX Runtime never fuses anyway (float
residual adds measured no slower, docs/results.md), while a float fc2 runs a float GEMM.
So the table times the start config in ONNX Runtime and, for each group of sites of one
kind and role (all residual adds after attention, all fc2, ...), the same config with
that group float (every variant's graph derived from one capture of the start config's:
:func:`quant.export_onnx.export_float_variants`). Sessions are timed round-robin, so a drift of the machine hits every
variant alike, and each group's slowdown is the median of its per-round *paired*
differences from the start config, with a distribution-free 95 % interval of that median
(order statistics of the rounds). A group whose interval reaches 0 costs nothing
measurable (``free``); the others cost their median slowdown, shared by their sites.
The noise of the table (``noise_ms``: the median half-width of the groups' intervals) is
the resolution of a latency difference: two configs whose predicted times differ by less
cost the same.
"""

from __future__ import annotations

import math
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


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Median of ``values`` and a distribution-free interval for it: the order statistics
    ``k`` and ``n - k + 1`` with the largest ``k`` whose binomial tail ``P(B <= k - 1) <= (1 - level) / 2``
    (B ~ Binomial(n, 1/2)); with fewer than 6 values no interval reaches ``level``, the extremes
    are returned (coverage 1 - 2^(1-n))."""
    xs = sorted(values)
    n = len(xs)
    tail, k, cum = (1 - level) / 2, 1, 0.0
    for j in range(n):  # cum = P(B <= j)
        cum += math.comb(n, j) / 2 ** n
        if cum > tail:
            break
        k = j + 1  # P(B <= k - 1) <= tail: the k-th order statistic still qualifies
    k = min(k, (n + 1) // 2)
    return statistics.median(xs), xs[k - 1], xs[n - k]


def measure_site_latency(qmodel: QuantModel, config: QuantConfig, pixels: torch.Tensor, *, runs: int = 9,
                         threads: int | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per site group: its sites, the median time of ``config`` and of ``config``
    with the group float (ms per batch of ``pixels``), the median paired slowdown with its
    95 % interval, whether it is measurable, and the cost of one site of the group (ms per
    batch, 0 when not measurable; and in % of ``config``'s time, signed, as measured)."""
    from tqdm import tqdm

    groups = site_groups(config, qmodel.sites)
    with tempfile.TemporaryDirectory(prefix="vitq-latency-") as tmp:
        backend = OnnxRuntimeInt8(qmodel, Path(tmp), pixels[:1], threads=threads)
        # one capture of the graph, every variant derived from it (the Q/DQ placement of each
        # variant exactly; the start config's parameter values, which do not change its time)
        configs = {"start": config, **{label: config.with_float(members) for label, members in groups.items()}}
        if progress:
            print(f"latency: exporting {len(configs)} graphs from one capture", flush=True)
        built = backend.build_float_variants({k.replace("/", "_"): c for k, c in configs.items()})
        variants = {label: built[label.replace("/", "_")] for label in configs}
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
        delta, lo, hi = median_interval([t - s for t, s in zip(times[label], times["start"])])
        free = lo <= 0
        rows.append({"group": label, "kind": label.split("/")[0], "role": label.split("/")[1],
                     "sites": len(members), "members": ",".join(members), "start_ms": base,
                     "float_ms": statistics.median(times[label]), "delta_ms": delta, "delta_lo_ms": lo,
                     "delta_hi_ms": hi, "spread_ms": max(times[label]) - min(times[label]), "free": free,
                     "cost_ms": 0.0 if free else delta / len(members),
                     "cost_per_site": 100 * delta / base / len(members)})
    return pd.DataFrame(rows)


def noise_ms(table: pd.DataFrame) -> float:
    """The resolution of the table: the median half-width of its groups' 95 % intervals."""
    return float(((table["delta_hi_ms"] - table["delta_lo_ms"]) / 2).median()) if len(table) else 0.0


def unit_costs(table: pd.DataFrame) -> dict[str, float]:
    """site -> what keeping it float costs (ms per batch): its group's measured slowdown
    shared by the group's sites, 0 where the slowdown is not measurable (``free``)."""
    return {name: float(r["cost_ms"]) for _, r in table.iterrows() for name in r["members"].split(",")}
