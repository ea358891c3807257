"""What keeping a site float, or running it in another format, costs in real time: a
per-site latency table measured once with ONNX Runtime on this machine (``vitq plan --cost
latency``).

What a deployment pays for a float site is time in the runtime, not a MAC share: keeping
a residual add float removes a Q/DQ pair that ONNX Runtime never fuses anyway (float
residual adds measured no slower, docs/results.md), while a float fc2 runs a float GEMM.
So the table times the start config in ONNX Runtime and, for each group of sites of one
kind and role (all residual adds after attention, all fc2, ...), the same config with
that group float (every variant's graph derived from one capture of the start config's:
:func:`quant.export_onnx.export_variants`). With ``formats`` (``--formats``), each group is
also timed in each listed format that runs it otherwise than the start config (a16w8: int16
activation Q/DQ; w4a8: int4 weights; ...), a row per (group, format) with a ``format``
column: what ONNX Runtime's CPU provider makes of that format, a real kernel (weight-only
int4/int8: MatMulNBits) or Q/DQ around float ops (int16 and FP8 activations), is what it
costs. Sessions are timed round-robin, so a drift of the machine hits every
variant alike, and each variant's slowdown is the median of its per-round *paired*
differences from the start config, with a distribution-free 95 % interval of that median
(order statistics of the rounds). A variant whose interval reaches 0 costs nothing
measurable (``free``; one measurably faster than the start too: costs are never below the
start's); the others cost their median slowdown, shared by their sites.
The noise of the table (``noise_ms``: the median half-width of the groups' intervals) is
the resolution of a latency difference: two configs whose predicted times differ by less
cost the same.
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from quant.config import QuantConfig
from quant.formats import get_format
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


def format_variants(config: QuantConfig, sites: list[Site], members: list[str],
                    formats: list[str]) -> list[str]:
    """The formats of ``formats`` (besides ``float``) that run the sites ``members`` otherwise
    than ``config`` does: ``w4a8`` at a matmul is its int8, a weight-only format at a residual
    add keeps it float (the float variant's time) and ``config``'s own format is the start."""
    from analysis.format_moves import quantizes_otherwise

    by = {s.name: s for s in sites}
    out = []
    for name in formats:
        fmt = get_format(name)
        if fmt.is_float or any(fmt.keeps_float(by[m]) for m in members):
            continue
        if any(quantizes_otherwise(config, by[m], fmt) for m in members):
            out.append(name)
    return out


def measure_site_latency(qmodel: QuantModel, config: QuantConfig, pixels: torch.Tensor, *, runs: int = 9,
                         threads: int | None = None, progress: bool = True,
                         formats: list[str] | None = None) -> pd.DataFrame:
    """One row per site group (and, with ``formats``, per (group, format) of
    :func:`format_variants`, a ``format`` column, ``float`` on the float rows): its sites,
    the median time of ``config`` and of the variant (``float_ms``: the group float, or in
    ``format``; ms per batch of ``pixels``), the median paired slowdown with its 95 %
    interval, whether it is measurable, and the cost of one site of the group (ms per batch,
    0 when not measurable; and in % of ``config``'s time, signed, as measured)."""
    from tqdm import tqdm

    from analysis.format_moves import with_format

    groups = site_groups(config, qmodel.sites)
    variants_of: dict[str, tuple[str, list[str], str]] = {}  # variant label -> (group, members, format)
    configs = {"start": config}
    for label, members in groups.items():
        variants_of[label] = (label, members, "float")
        configs[label] = config.with_float(members)
        for fmt in format_variants(config, qmodel.sites, members, formats or []):
            variants_of[f"{label}@{fmt}"] = (label, members, fmt)
            configs[f"{label}@{fmt}"] = with_format(config, members, fmt, qmodel.sites)
    with tempfile.TemporaryDirectory(prefix="vitq-latency-") as tmp:
        backend = OnnxRuntimeInt8(qmodel, Path(tmp), pixels[:1], threads=threads)
        # one capture of the graph, every variant derived from it (the Q/DQ placement and the
        # formats of each variant exactly; the start config's parameter values, which do not
        # change its time)
        if progress:
            print(f"latency: exporting {len(configs)} graphs from one capture", flush=True)
        safe = {k: k.replace("/", "_").replace("@", "_as_") for k in configs}
        built = backend.build_variants({safe[k]: c for k, c in configs.items()})
        variants = {label: built[safe[label]] for label in configs}
        for run in variants.values():  # warm-up: first runs allocate and pick kernels
            run(pixels)
        times: dict[str, list[float]] = {k: [] for k in variants}
        # each round times every variant once, in a new seeded order: in a fixed order the
        # start config always ran first, and graphs identical to it measured faster than it
        order, rng = list(variants), random.Random(0)
        for _ in tqdm(range(runs), desc="latency: timing", unit="round", disable=not progress):
            rng.shuffle(order)
            for label in order:
                t0 = time.perf_counter()
                variants[label](pixels)
                times[label].append(1000 * (time.perf_counter() - t0))
    base = statistics.median(times["start"])
    rows = []
    for label, (group, members, fmt) in variants_of.items():
        delta, lo, hi = median_interval([t - s for t, s in zip(times[label], times["start"])])
        free = lo <= 0
        rows.append({"group": group, "kind": group.split("/")[0], "role": group.split("/")[1],
                     **({"format": fmt} if formats is not None else {}),
                     "sites": len(members), "members": ",".join(members), "start_ms": base,
                     "float_ms": statistics.median(times[label]), "delta_ms": delta, "delta_lo_ms": lo,
                     "delta_hi_ms": hi, "spread_ms": max(times[label]) - min(times[label]), "free": free,
                     "cost_ms": 0.0 if free else delta / len(members),
                     "cost_per_site": 100 * delta / base / len(members)})
    return pd.DataFrame(rows)


def noise_ms(table: pd.DataFrame) -> float:
    """The resolution of the table: the median half-width of its groups' 95 % intervals."""
    return float(((table["delta_hi_ms"] - table["delta_lo_ms"]) / 2).median()) if len(table) else 0.0


def _float_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table if "format" not in table else table[table["format"] == "float"]


def unit_costs(table: pd.DataFrame) -> dict[str, float]:
    """site -> what keeping it float costs (ms per batch): its group's measured slowdown
    shared by the group's sites, 0 where the slowdown is not measurable (``free``)."""
    return {name: float(r["cost_ms"]) for _, r in _float_rows(table).iterrows() for name in r["members"].split(",")}


def format_unit_costs(table: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(site, format) -> what running it in that format costs (ms per batch), from the rows
    of the formats beyond float ({} for a table without formats); a (site, format) absent
    runs the site as the start config does (no cost)."""
    if "format" not in table:
        return {}
    other = table[table["format"] != "float"]
    return {(name, str(r["format"])): float(r["cost_ms"]) for _, r in other.iterrows()
            for name in r["members"].split(",")}
