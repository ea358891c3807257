"""Paired-bootstrap gain of one configuration over others on the images of an accuracy
table (`vitq eval` / `vitq analyze` output folder): per-image KL and top-1 agreement from
its eval log, the planner's own `paired_bootstrap` (2000 resamples, seed 0, 95 %).

    .venv/bin/python scripts/paired_gain.py out/in1k-default --config plan --against mixed_1,mixed_2,all

`--other DIR:CONFIG` (repeatable) also pairs it with CONFIG of another run's accuracy table
(e.g. the int8/float plan of a run without `--formats`), image by image: both tables must
hold the same val files. `--images confirm` (or `plan`, `rest`) keeps the planner's confirm
images (its plan images; the others) of a `vitq analyze` folder: the plan images are those
of its `plan_measurements.*.jsonl`, the confirm images the other set the planner measured
and the accuracy table reused; `--images-from DIR` takes those sets from another `vitq analyze`
folder (e.g. to compare frontier configs a `vitq eval` measured on every val image, on the
confirm images of the analyze run that chose them).

Positive gain = the config is better (lower KL, higher agreement).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from analysis.metrics import paired_bootstrap  # noqa: E402
from quant.store import read_log  # noqa: E402


class Table:
    """The per-image rows of one output folder's accuracy table, by val-image index."""

    def __init__(self, out: str):
        logs = sorted(Path(out).glob("eval.*.jsonl"))
        if len(logs) != 1:
            sys.exit(f"expected one eval.*.jsonl in {out}, found {len(logs)}")
        self.out, self.log = Path(out), logs[0]
        self.files = [str(Path(f).resolve()) for f in json.loads(self.log.open().readline())["settings"]["val_files"]]
        self.rows = [r for r in read_log(self.log).values() if "configs" in r]

    def per_image(self, config: str, key: str) -> dict[int, float]:
        values: dict[int, float] = {}
        for r in self.rows:
            if config not in r["configs"]:
                sys.exit(f"{self.out}: no config {config!r} in its accuracy table ({', '.join(r['configs'])})")
            vals = r["configs"][config][key]
            idx = r.get("indices") or list(range(r["first"], r["first"] + len(vals)))
            values.update(zip(idx, vals))
        return values

    def image_set(self, which: str) -> set[int]:
        """Indices of the planner's ``plan`` or ``confirm`` images, or the ``rest``."""
        every = set(range(len(self.files)))
        if which == "all":
            return every
        logs = sorted(self.out.glob("plan_measurements.*.jsonl"))
        if len(logs) != 1:
            sys.exit(f"--images {which}: expected one plan_measurements.*.jsonl in {self.out}, found {len(logs)}")
        position = {f: i for i, f in enumerate(self.files)}
        plan = {position[str(Path(f).resolve())] for f in json.loads(logs[0].open().readline())["settings"]["val_files"]}
        reused = [set(r["indices"]) for r in self.rows if str(r.get("candidate", "")).startswith("reused images")]
        confirm = [s for s in reused if s != plan]
        if len(confirm) != 1:
            sys.exit(f"--images {which}: {self.out}'s accuracy table holds no single reused confirm set")
        return {"plan": plan, "confirm": confirm[0], "rest": every - plan - confirm[0]}[which]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output folder holding one eval.*.jsonl")
    ap.add_argument("--config", default="plan")
    ap.add_argument("--against", default="mixed_1,mixed_2,all")
    ap.add_argument("--other", action="append", default=[], metavar="DIR:CONFIG",
                    help="also pair with CONFIG of another output folder's accuracy table")
    ap.add_argument("--images", choices=("all", "plan", "confirm", "rest"), default="all")
    ap.add_argument("--images-from", metavar="DIR", help="the vitq analyze folder whose plan/confirm images "
                    "--images names (default: the first argument)")
    args = ap.parse_args()
    table = Table(args.out)
    sets = table if args.images_from is None else Table(args.images_from)
    if sets.files != table.files:
        sys.exit(f"--images-from {args.images_from}: its accuracy table holds other val files than {args.out}'s")
    keep = sets.image_set(args.images)
    refs = [(c, table, c) for c in args.against.split(",") if c]
    for spec in args.other:
        folder, _, config = spec.rpartition(":")
        if not folder or not config:
            sys.exit(f"--other {spec!r}: write DIR:CONFIG")
        other = Table(folder)
        if other.files != table.files:
            sys.exit(f"--other {spec!r}: its accuracy table holds other val files than {args.out}'s")
        refs.append((spec, other, config))

    def arrays(t: Table, config: str, key: str, images: list[int]) -> np.ndarray:
        values = t.per_image(config, key)
        missing = [i for i in images if i not in values]
        if missing:
            sys.exit(f"{t.out}: {config!r} was not measured on {len(missing)} of the images")
        return np.array([values[i] for i in images], dtype=np.float64)

    images = sorted(keep)
    print(f"{len(images)} images ({args.images}), {table.log}\n")
    print("| against | its KL | KL gain [95 % CI] | agreement gain pp [95 % CI] |\n|---|---|---|---|")
    mine_kl, mine_agree = arrays(table, args.config, "kl", images), arrays(table, args.config, "agree", images)
    for label, t, config in refs:
        ref_kl, ref_agree = arrays(t, config, "kl", images), arrays(t, config, "agree", images)
        kl = paired_bootstrap(ref_kl, mine_kl)
        agree = paired_bootstrap(100 * mine_agree, 100 * ref_agree)
        print(f"| {label} | {ref_kl.mean():.4g} | {kl['mean']:.4g} [{kl['lo']:.4g}, {kl['hi']:.4g}] | "
              f"{agree['mean']:+.1f} [{agree['lo']:+.1f}, {agree['hi']:+.1f}] |")
    print(f"\n{args.config}: KL {mine_kl.mean():.4g}, agreement {100 * mine_agree.mean():.2f} %")


if __name__ == "__main__":
    main()
