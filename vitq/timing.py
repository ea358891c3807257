"""The one timing loop of the speed measurements (``vitq analyze --bench`` and
``scripts/bench_int8.py``). Imports nothing heavy: the benchmark's ONNX Runtime
workers time without torch loaded, so their peak RSS is ONNX Runtime's own."""

from __future__ import annotations

import time
from typing import Any, Callable


def run_times(run: Callable[[Any], Any], x: Any, warmup: int, runs: int) -> list[float]:
    """Seconds taken by each of ``runs`` calls of ``run(x)``, after ``warmup`` untimed calls
    (first calls allocate, pick kernels or compile)."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return times
