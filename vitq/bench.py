"""``vitq analyze --bench``: how fast FP32 and the quantized configs run on this CPU.

Variants: FP32 torch eager, FP32 ONNX Runtime, and every config (presets and plan) as
its Q/DQ ONNX export in ONNX Runtime (real int8 kernels). For each: latency at batch 1
(ms) and throughput at batch 8 (images/s), medians of ``runs`` timed runs after
``warmup`` runs, taken over ``rounds`` rounds in which the variants run interleaved
(one after another, round-robin), with the spread (max - min) / median of the round
medians; the ONNX file size. All variants run in this process (the thorough
measurement, one fresh process per variant with peak RSS, is
``scripts/bench_int8.py``). Written through :data:`analysis.artifacts.SPEED`; the
report shows it. Timings need an otherwise idle machine: the load average at the start
is recorded next to them.
"""

from __future__ import annotations

import os
import statistics
import time

import pandas as pd
import torch

from analysis import artifacts
from quant.config import QuantConfig

from .backends import OnnxRuntimeInt8, OrtRunner, example_pixels
from .timing import run_times


def _time(run, x: torch.Tensor, warmup: int, runs: int) -> float:
    return statistics.median(run_times(run, x, warmup, runs))


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run_bench(session, configs: dict[str, QuantConfig], *, threads: int | None = None, warmup: int = 2,
              runs: int = 5, rounds: int = 3) -> tuple[pd.DataFrame, list[str]]:
    """Time FP32 and ``configs``; writes ``speed.csv/json`` and returns the table and
    lines to print."""
    t0 = time.time()
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    example = example_pixels(session)
    x1 = example[:1].contiguous()
    x8 = x1.expand(8, *x1.shape[1:]).contiguous()
    exporter = OnnxRuntimeInt8(session.qmodel, session.out / "onnx", example, threads=threads)
    variants: list[tuple[str, str, object, float | None]] = []
    state = session.qmodel.prepare(None)

    def fp32_eager(x):
        session.qmodel.restore(state)
        return session.qmodel(x)
    variants.append(("fp32", "torch eager", fp32_eager, None))
    for name, config in {"fp32": None, **configs}.items():
        result = exporter.export(name, config)
        variants.append((name, "onnxruntime", OrtRunner(result.path, threads, result), result.file_bytes / 2**20))
    times: dict[int, dict[str, list[float]]] = {i: {"b1": [], "b8": []} for i in range(len(variants))}
    for _ in range(rounds):
        for i, (_, _, run, _) in enumerate(variants):
            times[i]["b1"].append(_time(run, x1, warmup, runs))
            times[i]["b8"].append(_time(run, x8, warmup, runs))
    rows = []
    for i, (name, backend, _, mb) in enumerate(variants):
        b1, b8 = statistics.median(times[i]["b1"]), statistics.median(times[i]["b8"])
        rows.append({"config": name, "backend": backend, "file_mb": mb, "latency_b1_ms": 1000 * b1,
                     "latency_b1_spread": (max(times[i]["b1"]) - min(times[i]["b1"])) / b1,
                     "throughput_b8": 8 / b8, "throughput_b8_spread": (max(times[i]["b8"]) - min(times[i]["b8"])) / b8})
    df = pd.DataFrame(rows)
    df["speedup_b8_vs_fp32_eager"] = df["throughput_b8"] / df.loc[0, "throughput_b8"]
    import onnxruntime
    meta = {**session.describe(), "threads": threads, "warmup": warmup, "runs": runs, "rounds": rounds,
            "image_size": list(example.shape[-2:]), "cpu": _cpu(), "load_avg": round(load, 2),
            "onnxruntime": onnxruntime.__version__,
            "method": "one process, variants interleaved round-robin; medians over rounds of the per-round "
                      "median; spread = (max - min) / median of the round medians"}
    artifacts.write(session.out, artifacts.SPEED, df, meta, {"wall_s": round(time.time() - t0, 1)})
    lines = [f"speed ({threads} threads, {rounds} interleaved rounds, load average {load:.1f} at start):"]
    for r in rows:
        lines.append(f"  {r['config']:>10s} {r['backend']:<12s} {r['latency_b1_ms']:8.1f} ms b1  "
                     f"{r['throughput_b8']:7.1f} img/s b8  ({r['throughput_b8'] / rows[0]['throughput_b8']:.2f}x)")
    return df, lines
