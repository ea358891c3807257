"""Would batched candidates beat prefix caching? (issue 11, part 4)

Batching m ``only`` candidates that start at the same block means running blocks k..end
once on m x B images (each candidate's copy of the batch quantized at its own site)
instead of m times on B images; the prefix before block k is already shared by the
boundary cache either way. So batching can only win what a larger batch gains per image
on the suffix. This script measures exactly that upper bound on FP32 blocks (the batched
version would add per-copy quantization on top): for a few start blocks k, the time of
m passes of blocks k..end + head at batch B against one pass at batch m x B, interleaved,
medians of --reps. A ratio near 1.0 means batching cannot beat prefix caching here.

    .venv/bin/python scripts/bench_batched.py                    # Fashion-MNIST probe (ViT-S/14)
    .venv/bin/python scripts/bench_batched.py --quick            # tiny model: checks the script

Prints a markdown table and writes bench_batched.json in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vitq.session import Options, Session  # noqa: E402

SHARED = ROOT.parent / "shared"


def suffix_time(qmodel, hidden: torch.Tensor, start: int, chunks: int) -> float:
    """Seconds to run blocks ``start``..end and the head over ``hidden`` in ``chunks`` passes."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for h in hidden.chunk(chunks):
            qmodel.head(qmodel.run_blocks(h, start))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "dinov2-s14-fmnist-probe"))
    ap.add_argument("--data", default=str(SHARED / "data" / "fashion-mnist-mini"))
    ap.add_argument("--quick", action="store_true", help="the embedded tiny model (checks the script, not speed)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="images per candidate pass (B)")
    ap.add_argument("--candidates", type=int, default=4, help="candidates batched together (m)")
    ap.add_argument("--starts", type=int, nargs="+", help="start blocks (default: first, middle, last)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_batched"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = dict(device=args.device, progress=False, out=args.out)
    if not args.quick:
        if not Path(args.model).is_dir():
            sys.exit(f"bench needs {args.model} (a shared probe); --quick runs the tiny model")
        opts.update(model=args.model, data=args.data)
    session = Session(Options(**opts))
    qmodel = session.qmodel
    qmodel.apply(None)  # FP32: the suffix cost without quantization
    n = qmodel.num_blocks
    starts = args.starts or sorted({0, n // 2, n - 1})
    rows = []
    for b in args.batch:
        m = args.candidates
        pixels = torch.cat([p for p, _, _ in session.batches(session.images("val", m * b))])[: m * b]
        if len(pixels) < m * b:
            sys.exit(f"need {m * b} val images, found {len(pixels)}")
        with torch.inference_mode():
            embedded = qmodel.embed(pixels.to(session.device))
        for k in starts:
            with torch.inference_mode():
                hidden = qmodel.run_blocks(embedded, 0, k) if k else embedded
            suffix_time(qmodel, hidden, k, m)  # warm-up
            seq, bat = [], []
            for _ in range(args.reps):  # interleaved
                seq.append(suffix_time(qmodel, hidden, k, m))
                bat.append(suffix_time(qmodel, hidden, k, 1))
            s, t = statistics.median(seq), statistics.median(bat)
            rows.append({"batch_per_candidate": b, "candidates": m, "start_block": k, "blocks_run": n - k,
                         "sequential_s": round(s, 3), "batched_s": round(t, 3), "speedup": round(s / t, 3),
                         "sequential_spread_s": round(max(seq) - min(seq), 3),
                         "batched_spread_s": round(max(bat) - min(bat), 3)})
    result = {"model": "tiny" if args.quick else args.model, "device": str(session.device), "threads": args.threads,
              "reps": args.reps, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_batched.json").write_text(json.dumps(result, indent=2))
    print(f"model {result['model']}, {result['device']}, {args.threads} threads, medians of {args.reps}\n")
    print("| B | m | start block | m passes at B (s) | 1 pass at m x B (s) | batched speed-up | spreads (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_per_candidate']} | {r['candidates']} | {r['start_block']} | {r['sequential_s']} | "
              f"{r['batched_s']} | {r['speedup']:.2f}x | {r['sequential_spread_s']} / {r['batched_spread_s']} |")


if __name__ == "__main__":
    main()
