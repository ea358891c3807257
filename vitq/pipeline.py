"""The steps behind the commands (sensitivity, errors, plan), each writing its
artefacts into the session's output folder. ``vitq analyze`` chains them; each
step resumes from what an interrupted run left."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from analysis.errors import ErrorReport, analyze_errors
from analysis.planner import Budget, Planner
from analysis.sensitivity import ResultLog, analyze_sensitivity, most_sensitive_fc, settings_key
from quant.config import QuantConfig

from .evaluate import evaluate_configs
from .results import atomic_write_text, write_table
from .session import Session


@dataclass
class EvalSet:
    """Preprocessed val images held in memory, shared by sensitivity and planner."""

    pixels: list[torch.Tensor]
    labels: torch.Tensor
    files: list[str]


def eval_set(session: Session, n: int) -> EvalSet:
    cached = getattr(session, "_eval_sets", {})
    if n not in cached:
        images = session.images("val", n)
        loaded = list(session.batches(images))
        cached[n] = EvalSet([p for p, _, _ in loaded], torch.cat([lab for _, lab, _ in loaded]),
                            [str(images.items[i][0].resolve()) for _, _, idx in loaded for i in idx])
        session._eval_sets = cached
    return cached[n]


def run_eval(session: Session, configs: dict[str, QuantConfig], *, limit: int | None = None,
             model=None) -> tuple[pd.DataFrame, dict]:
    """FP32 and ``configs`` on the val images (``limit``: a seeded sample); ``model``
    replaces the fake-quant simulation by another backend with the same interface."""
    for cfg in configs.values():
        cfg.validate(session.sites)
    val = session.images("val", limit)
    t0 = time.time()
    settings = {**session.describe(), "val_files": [str(p) for p, _ in val.items],
                "configs": {k: v.to_dict() for k, v in configs.items()}, "backend": type(model).__name__}
    log = ResultLog(session.out / f"eval.{settings_key(settings)}.jsonl", settings)
    done = {i for r in log.done.values() for i in r["indices"]}
    if done:
        print(f"resuming: {len(done)} of {len(val)} images already evaluated ({log.path})")
    todo = val.subset([i for i in range(len(val)) if i not in done])
    df = evaluate_configs(model or session.qmodel, configs, session.batches(todo), session.num_batches(todo),
                          session.opts.progress, log=log)
    meta = {**session.describe(), "val_images": int(df.loc[0, "images"]), "skipped_images": session.bad,
            "configs": {k: v.to_dict() for k, v in configs.items()},
            "run": {"evaluation_s": round(time.time() - t0, 1), "resumed_images": len(done), "log": str(log.path)}}
    return df, meta


def save_eval(session: Session, df: pd.DataFrame, meta: dict, configs: dict[str, QuantConfig]) -> tuple[Path, Path]:
    """eval.csv/json and one config_<name>.yaml per evaluated config."""
    for name, cfg in configs.items():
        cfg.save(session.out / f"config_{name}.yaml")
    return write_table(df, session.out / "eval", meta)


def run_sensitivity(session: Session, config: QuantConfig, *, mode: str = "only", group: str = "op",
                    images: int = 512, rank_by: str = "top1_drop") -> tuple[pd.DataFrame, dict, list[Path]]:
    data = eval_set(session, images)
    settings = {**session.describe(), "val_files": data.files}
    df, meta = analyze_sensitivity(
        session.qmodel, config, iter(data.pixels), data.labels, session.out, mode=mode, group=group,
        rank_by=rank_by, settings=settings, progress=session.opts.progress, batch_size=session.opts.batch_size)
    stem = session.out / f"sensitivity_{mode.replace('-', '_')}_{group}"
    return df, meta, list(write_table(df, stem, {**session.describe(), **meta}))


def run_errors(session: Session, config: QuantConfig, *, images: int = 64,
               outlier_k: float = 6.0) -> tuple[ErrorReport, list[Path]]:
    val = session.images("val", images)
    settings = {**session.describe(), "val_files": [str(p.resolve()) for p, _ in val.items],
                "config": config.to_dict(), "outlier_k": outlier_k, "batch_size": session.opts.batch_size}
    session.out.mkdir(parents=True, exist_ok=True)
    report = analyze_errors(session.qmodel, config, (p for p, _, _ in session.batches(val)),
                            outlier_k=outlier_k, progress=session.opts.progress,
                            total=session.num_batches(val),
                            checkpoint=session.out / f"errors_state.{settings_key(settings)}.pt")
    report.meta.update(session.describe())
    return report, report.save(session.out)


def run_plan(session: Session, start: QuantConfig, budget: Budget, *, images: int = 512,
             offending: int = 4, max_fallbacks: int = 12) -> tuple[QuantConfig, pd.DataFrame, list[Path]]:
    """Sensitivity in both modes (reused when already measured), then the planner."""
    only, _, _ = run_sensitivity(session, start, mode="only", images=images)
    all_but, _, _ = run_sensitivity(session, start, mode="all-but", images=images)
    data = eval_set(session, images)
    planner = Planner(session.qmodel, data.pixels, data.labels, session.out, budget,
                      {**session.describe(), "val_files": data.files, "start": start.to_dict(),
                       "budget": vars(budget)}, session.opts.progress)
    plan = planner.plan(start, only, all_but, offending=offending, max_fallbacks=max_fallbacks,
                        mixed_2_float=most_sensitive_fc(only))
    steps = planner.table()
    plan.save(session.out / "plan.yaml")
    skiplist = {"float_kinds": plan.float_kinds, "float_sites": plan.float_sites}
    atomic_write_text(session.out / "plan_skiplist.yaml", _yaml(skiplist))
    meta = {**session.describe(), "budget": vars(budget), "met": planner.met, "run": {"wall_s": round(planner.wall_s, 1)},
            "plan_images": len(data.labels), "plan": plan.to_dict()}
    paths = [*write_table(steps, session.out / "plan_steps", meta), session.out / "plan.yaml",
             session.out / "plan_skiplist.yaml"]
    return plan, steps, paths


def _yaml(data: dict) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=False)
