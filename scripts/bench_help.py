"""`vitq --help` wall time (issue 11 goal: <= 1.5 s): median of 5 runs of a fresh interpreter."""

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
times = []
for _ in range(5):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitq.cli", "--help"], cwd=ROOT, check=True, capture_output=True)
    times.append(time.perf_counter() - t0)
print(f"| vitq --help wall s (median of 5, min {min(times):.2f}) | {statistics.median(times):.2f} |")
