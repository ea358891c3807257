"""Wall time and peak RSS of `vitq analyze` at default settings on the shared ImageNet
probe (issue 20's goal: <= 20 min on 2 idle CPU cores), with the time of each stage read
from the artefacts that run wrote.

    .venv/bin/python scripts/bench_analyze.py [--out out/bench-analyze] [-- extra vitq args]

The output folder is emptied first (a rerun into a used folder would reuse its
measurements); the decode cache outside it is kept, as a user's second run would.
Prints a markdown table and writes bench_analyze.json in the output folder, and vitq's
output to <out>.log beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STAGES = {  # artefact -> stage name (the run.json beside each table holds its wall time)
    "latency_sites.run.json": "latency table (ONNX Runtime exports and timing)",
    "sensitivity_taylor_op.run.json": "taylor estimate",
    "sensitivity_only_op.run.json": "only sensitivity (measured candidates)",
    "plan_steps.run.json": "planner search + confirm",
    "errors_activations.run.json": "error analysis",
    "accuracy.run.json": "accuracy table (all val images)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "dinov2-s14-in1k-probe"))
    ap.add_argument("--data", default=str(SHARED / "data" / "imagenet-mini"))
    ap.add_argument("--out", default=str(ROOT / "out" / "bench-analyze"))
    ap.add_argument("extra", nargs="*", help="extra `vitq analyze` arguments (after --)")
    args = ap.parse_args()
    if not Path(args.model).is_dir():
        sys.exit(f"bench needs {args.model} (the shared ImageNet probe)")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "vitq"), "analyze", "--model", args.model, "--data", args.data,
           "--out", str(out), "--no-progress", *args.extra]
    load = os.getloadavg()[0]
    t0 = time.time()
    log = out.with_name(out.name + ".log")  # beside the folder: vitq's printed tables and verdict
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(f"vitq analyze exited with {proc.returncode} (log: {log})")
    result = {"command": " ".join(cmd), "wall_s": round(wall, 1), "wall_min": round(wall / 60, 1),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2, 2),
              "load_avg_at_start": round(load, 2), "load_avg_at_end": round(os.getloadavg()[0], 2), "stages": {}}
    first = next(iter(out.glob("*.run.json")), None)
    if first is not None:
        result["stages"]["calibration"] = json.loads(first.read_text()).get("calibration_s")
    for name, stage in STAGES.items():
        path = out / name
        if path.is_file():
            result["stages"][stage] = json.loads(path.read_text()).get("wall_s")
    (out / "bench_analyze.json").write_text(json.dumps(result, indent=2))
    print("| what | value |\n|---|---|")
    print(f"| `vitq analyze` wall time | {result['wall_min']} min ({result['wall_s']} s; goal <= 20 min) |")
    print(f"| peak RSS | {result['peak_rss_gb']} GB |")
    for stage, s in result["stages"].items():
        print(f"| {stage} | {s} s |")
    print(f"| load average at start / end | {result['load_avg_at_start']} / {result['load_avg_at_end']} |")


if __name__ == "__main__":
    main()
