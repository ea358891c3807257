"""Where ONNX Runtime spends an int8 model's time: its profiler, aggregated by operator.

For each ONNX file: the ops of the graph ORT actually runs (after its QDQ fusions;
written with ORT_ENABLE_EXTENDED so the file is portable), and the kernel time per
op type over --runs runs at batch --batch (after one warm-up), with --threads
intra-op threads. Prints one table per model and writes ort_profile.json in --out.

    python scripts/ort_profile.py out/fmnist/onnx/model_all.onnx out/fmnist/onnx/model_mixed_1.onnx
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def profile(path: Path, batch: int, runs: int, threads: int, work: Path) -> dict:
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    fused_path = work / f"{path.stem}.fused.onnx"
    opts.optimized_model_filepath = str(fused_path)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused_ops = collections.Counter(n.op_type for n in onnx.load(str(fused_path)).graph.node)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / path.stem)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) else d for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    sess.run(None, {inp.name: x})
    for _ in range(runs):
        sess.run(None, {inp.name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    total_model = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3 / (runs + 1)
        if e.get("cat") == "Session" and e["name"] == "model_run":
            total_model += e["dur"] / 1e3 / (runs + 1)
    return {"file": str(path), "fused_ops": dict(fused_ops.most_common()), "ms_per_op_type": dict(
        sorted(per_op.items(), key=lambda kv: -kv[1])), "ms_per_run": total_model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.models:
            r = profile(path, args.batch, args.runs, args.threads, Path(tmp))
            results.append(r)
            print(f"\n{path} ({r['ms_per_run']:.1f} ms per run, batch {args.batch}, {args.threads} thread(s))")
            print("  graph ORT runs:", ", ".join(f"{k} {v}" for k, v in r["fused_ops"].items()))
            for op, ms in list(r["ms_per_op_type"].items())[:12]:
                print(f"  {op:28s} {ms:9.2f} ms  {100 * ms / max(r['ms_per_run'], 1e-9):5.1f} %")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_profile.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'ort_profile.json'}")


if __name__ == "__main__":
    sys.exit(main())
