"""Paired-bootstrap gain of one configuration over others on the images of an accuracy
table (`vitq eval` / `vitq analyze` output folder): per-image KL and top-1 agreement from
its eval log, the planner's own `paired_bootstrap` (2000 resamples, seed 0, 95 %).

    .venv/bin/python scripts/paired_gain.py out/in1k-default --config plan --against mixed_1,mixed_2,all

Positive gain = the config is better (lower KL, higher agreement).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from analysis.metrics import paired_bootstrap  # noqa: E402
from quant.store import read_log  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output folder holding one eval.*.jsonl")
    ap.add_argument("--config", default="plan")
    ap.add_argument("--against", default="mixed_1,mixed_2,all")
    args = ap.parse_args()
    logs = sorted(Path(args.out).glob("eval.*.jsonl"))
    if len(logs) != 1:
        sys.exit(f"expected one eval.*.jsonl in {args.out}, found {len(logs)}")
    rows = sorted(read_log(logs[0]).values(), key=lambda r: r["first"])

    def per_image(config: str, key: str) -> np.ndarray:
        return np.concatenate([r["configs"][config][key] for r in rows])

    print(f"{len(per_image(args.config, 'kl'))} images, {logs[0]}\n")
    print("| against | KL gain [95 % CI] | agreement gain pp [95 % CI] |\n|---|---|---|")
    for ref in [c for c in args.against.split(",") if c]:
        kl = paired_bootstrap(per_image(ref, "kl"), per_image(args.config, "kl"))
        agree = paired_bootstrap(100 * per_image(args.config, "agree"), 100 * per_image(ref, "agree"))
        print(f"| {ref} | {kl['mean']:.4f} [{kl['lo']:.4f}, {kl['hi']:.4f}] | "
              f"{agree['mean']:+.1f} [{agree['lo']:+.1f}, {agree['hi']:+.1f}] |")


if __name__ == "__main__":
    main()
