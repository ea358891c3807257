"""The steps behind the commands (eval, sensitivity, errors, plan), each writing its
artefacts into the session's output folder as :mod:`analysis.artifacts` declares
them. ``vitq analyze`` chains them; each step resumes from what an interrupted run
left."""

from __future__ import annotations

import copy
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from analysis import artifacts
from analysis.cost import EXACT_COSTS, float_site_names, site_macs
from analysis.decide import LOOKS, Candidate, DecideResult, decide_candidates
from analysis.errors import ErrorReport, analyze_errors
from analysis.evaluate import FP32, evaluate_configs, evaluated_images
from analysis.format_moves import FormatMoves, only_int8_and_float, quantizes_otherwise
from analysis.measurement_log import MeasurementLog
from analysis.metrics import OutputStats
from analysis.planner import Budget, Planner, Point
from analysis.runner import Runner
from analysis.names import MEASURE_TOP, TAYLOR_IMAGES
from analysis.sensitivity import (analyze_sensitivity, make_candidates, own_format_rows,
                                  with_measured_formats)
from analysis.taylor import format_rows, taylor_table
from quant.config import ConfigError, QuantConfig
from quant.store import atomic_write_text, settings_key

from .session import Session

# Bumped when the per-image records of the logs change shape (old logs are not mixed in).
LOG_VERSION = 3  # 3: canonical site names (blocks.4.attn.q)


@dataclass
class EvalSet:
    """Preprocessed val images held in memory, shared by sensitivity and planner."""

    pixels: list[torch.Tensor]
    labels: torch.Tensor
    files: list[str]


def val_split(session: Session, total: int, n_plan: int, n_confirm: int,
               n_decide: int | None = 0) -> tuple[list[int], list[int], list[int]]:
    """Disjoint seeded positions among ``total`` val images: the plan images, then the
    confirm images, then the decide images (``n_decide`` None: all the others). The decide
    images keep their seeded random order: they are streamed look by look, and a sequential
    test needs every look to be a random sample (a val folder is listed class by class)."""
    order = random.Random(session.opts.seed).sample(range(total), total)
    n_plan = min(n_plan, total)
    n_confirm = max(n_confirm, 0)
    rest = order[n_plan + n_confirm:]
    return (sorted(order[:n_plan]), sorted(order[n_plan:n_plan + n_confirm]),
            rest if n_decide is None else rest[:max(n_decide, 0)])


def eval_set(session: Session, n: int, which: str = "plan", n_confirm: int = 0) -> EvalSet:
    """The ``plan`` images (``n`` of val, seeded) or the ``confirm`` images (the next
    ``n_confirm`` of the same seeded order: never a plan image), decoded once."""
    cached = session.__dict__.setdefault("_eval_sets", {})
    key = (n, which, n_confirm if which == "confirm" else 0)
    if key not in cached:
        val = session.images("val", None)  # one listing of the val folder
        plan, confirm, _ = val_split(session, len(val), n, n_confirm)
        images = val.subset(plan if which == "plan" else confirm)
        loaded = list(session.batches(images))
        by_id = dict(zip(images.ids, images.items))
        cached[key] = EvalSet([p for p, _, _ in loaded], torch.cat([lab for _, lab, _ in loaded]),
                              [str(by_id[i][0].resolve()) for _, _, idx in loaded for i in idx])
    return cached[key]


def runner(session: Session, data: EvalSet) -> Runner:
    """One Runner (FP32 reference computed once) per image set of the session."""
    cached = session.__dict__.setdefault("_runners", {})
    if id(data) not in cached:
        cached[id(data)] = Runner(session.qmodel, data.pixels, data.labels)
    return cached[id(data)]


def macs(session: Session) -> dict[str, float]:
    """Matmul MACs per image of every site: they depend only on the input's shape, so
    a blank image through the model's processor (no data file is read, none can fail)."""
    if "_macs" not in session.__dict__:
        from PIL import Image

        blank = Image.new("RGB", (256, 256))
        pixels = session.loaded.processor(images=blank, return_tensors="pt")["pixel_values"]
        session._macs = site_macs(session.qmodel, pixels[:1])
    return session._macs


def _run_info(session: Session, **extra) -> dict:
    return {"calibration_s": session.calibration_s, **extra}


# -- eval ------------------------------------------------------------------------------
def run_eval(session: Session, configs: dict[str, QuantConfig], *, limit: int | None = None,
             model=None, known: list[tuple[list[str], dict[str, OutputStats]]] = ()) -> tuple[pd.DataFrame, dict, dict]:
    """FP32 and ``configs`` on the val images (``limit``: a seeded sample); ``model``
    replaces the fake-quant simulation by another backend with the same interface.
    ``known``: image sets already measured by the same simulation (files, and per-image
    stats of ``"fp32"`` and every config in file order; analyze passes the planner's plan
    and confirm images): written into the log as measured, so only the other images run."""
    for cfg in configs.values():
        cfg.validate(session.sites)
    val = session.images("val", limit)
    t0 = time.time()
    backend = getattr(model, "backend", None)
    settings = {**session.settings(), "val_files": [str(p) for p, _ in val.items], "log_version": LOG_VERSION,
                "configs": {k: v.to_dict() for k, v in configs.items()}, "backend": type(model).__name__}
    log = MeasurementLog(session.out / f"eval.{settings_key(settings)}.jsonl", settings)
    reused = 0 if model is not None else _reuse_known(log, val, configs, known)
    done = evaluated_images(log)
    log.resuming(len(done), len(val), "images already evaluated")
    todo = val.subset([i for i in range(len(val)) if i not in done])
    df = evaluate_configs(model or session.qmodel, configs, session.batches(todo), session.sites, macs(session),
                          session.num_batches(todo), session.opts.progress, log=log)
    meta = {**session.describe(), "val_images": int(df.loc[0, "images"]), "skipped_images": session.bad,
            "configs": {k: v.to_dict() for k, v in configs.items()},
            "backend": getattr(backend, "name", "torch"), "simulation_agreement": None, "onnx_models": None}
    run = _run_info(session, evaluation_s=round(time.time() - t0, 1), resumed_images=len(done), reused_images=reused,
                    log=str(log.path))
    return df, meta, run


def _reuse_known(log: MeasurementLog, val, configs: dict[str, QuantConfig],
                 known: list[tuple[list[str], dict[str, OutputStats]]]) -> int:
    """Write each ``known`` image set into the eval log as one record (unless one of its
    images is not among ``val`` or already in the log, or a config is missing); returns how
    many images were added."""
    position = {str(Path(p).resolve()): i for i, (p, _) in enumerate(val.items)}
    done, added = evaluated_images(log), 0
    for files, stats in known:
        idx = [position.get(str(Path(f).resolve())) for f in files]
        if (not files or None in idx or done.intersection(idx) or any(n not in stats for n in (FP32, *configs))
                or any(len(stats[n]) != len(files) for n in (FP32, *configs))):
            continue
        log.add({"candidate": f"reused images {idx[0]}-{idx[-1]}", "first": min(idx), "indices": idx,
                 "configs": {n: stats[n].to_dict() for n in (FP32, *configs)}})
        done.update(idx)
        added += len(idx)
    return added


def save_frontier(planner: Planner, out: Path) -> None:
    """Every frontier point the planner measured (presets included, FP32 not) as its own
    QuantConfig YAML, named by its ``plan_steps.csv`` attempt: a researcher who wants another
    trade-off than the plan runs or exports one of them (``vitq eval --config``)."""
    folder = out / artifacts.PLAN_FRONTIER
    if folder.is_dir():
        for old in folder.glob("attempt-*.yaml"):
            old.unlink()
    for point in planner.frontier:
        if point.config is None:
            continue
        config = copy.deepcopy(point.config)
        config.name = f"frontier_{int(point.row['attempt'])}"
        config.save(out / artifacts.frontier_file(point.row["attempt"]))


def planner_measurements(session: Session, planner: Planner, opts: "PlanOptions",
                         configs: dict[str, QuantConfig]) -> list[tuple[list[str], dict[str, OutputStats]]]:
    """The planner's own measurements of FP32 and ``configs`` on its plan and confirm images
    (read from its logs; a config it never measured there is measured now), for
    :func:`run_eval`'s ``known``."""
    n_confirm = opts.images if opts.confirm_images is None else opts.confirm_images
    sets = [(eval_set(session, opts.images).files, False)]
    if planner.confirm_runner is not None and n_confirm > 0:
        sets.append((eval_set(session, opts.images, "confirm", n_confirm).files, True))
    return [(files, {FP32: planner.measure(None, confirm=confirm),
                     **{n: planner.measure(c, confirm=confirm) for n, c in configs.items()}})
            for files, confirm in sets]


def save_eval(session: Session, df: pd.DataFrame, meta: dict, run: dict, configs: dict[str, QuantConfig],
              spec: artifacts.TableSpec = artifacts.EVAL) -> tuple[Path, Path]:
    """The eval (or analyze's accuracy) table and one config_<name>.yaml per config."""
    for name, cfg in configs.items():
        cfg.save(session.out / artifacts.config_file(name))
    return artifacts.write(session.out, spec, df, meta, run)


# -- sensitivity ---------------------------------------------------------------------------
def run_sensitivity(session: Session, config: QuantConfig, *, mode: str = "only", group: str = "op",
                    images: int = 256, rank_by: str = "kl", only: list[str] | None = None,
                    shard: tuple[int, int] | None = None,
                    formats: dict[str, list[str]] | None = None) -> tuple[pd.DataFrame, dict, dict, list[Path]]:
    """Measured sensitivity (``only``: just these candidates, e.g. the estimate's top K;
    ``formats``: format -> candidates also measured in that format, rows of the same table).

    ``shard=(i, n)``: this process's share of the candidates, written to its shard log
    only (the path returned): a partial table is no artefact, the next unsharded run
    merges every shard's log and writes the table."""
    data = eval_set(session, images)
    settings = {**session.settings(), "val_files": data.files, "log_version": LOG_VERSION}
    df, meta, run = analyze_sensitivity(runner(session, data), config, session.out, mode=mode, group=group,
                                        rank_by=rank_by, settings=settings, only=only,
                                        progress=session.opts.progress, shard=shard, formats=formats)
    meta = {**session.describe(), **meta}
    run = _run_info(session, **run)
    if shard is not None:
        return df, meta, run, [Path(run["log"])]
    paths = artifacts.write(session.out, artifacts.sensitivity(mode, group), df, meta, run)
    return df, meta, run, list(paths)


def run_taylor(session: Session, config: QuantConfig, *, group: str = "op", images: int = 256,
               probes: int = 8, formats: list[str] | None = None) -> tuple[pd.DataFrame, dict, dict, list[Path]]:
    """The gradient estimate of every candidate's ``only`` KL (analysis.taylor) on the plan
    images; with ``formats``, of every (candidate, format) (a ``format`` column)."""
    data = eval_set(session, images)
    df, meta, run = taylor_table(runner(session, data), config, group=group, probes=probes, formats=formats,
                                 progress=session.opts.progress)
    meta = {**session.describe(), **meta}
    run = _run_info(session, **run)
    paths = artifacts.write(session.out, artifacts.sensitivity_taylor(group), df, meta, run)
    return df, meta, run, list(paths)


def format_top(measure_top: int | None, per_format: int | None = None) -> int:
    """Candidates measured per format beyond int8 and float: ``per_format`` when given, else a
    quarter of ``measure_top`` rounded up (0: every candidate, as ``measure_top`` 0 or None)."""
    if per_format is not None:
        return per_format
    return -(-measure_top // 4) if measure_top else 0


def format_candidates(session: Session, config: QuantConfig, by_format: pd.DataFrame, formats: list[str],
                      top: int) -> dict[str, list[str]]:
    """Per format of ``formats`` beyond int8 and float: the candidates to measure in it, the
    top ``top`` (0: all) by its taylor estimate among the sites it quantizes otherwise than
    ``config`` does (a weight-only format at a residual add keeps it float: estimate 0; ``w4a8``
    at a matmul is its int8)."""
    from quant.formats import get_format

    by = session.qmodel.site_by_name
    chosen: dict[str, list[str]] = {}
    for name in formats:
        if name in ("int8", "float"):
            continue
        fmt = get_format(name)
        rows = format_rows(by_format, name).sort_values("kl_estimate", ascending=False, kind="stable")
        names = [c for c in rows["candidate"] if quantizes_otherwise(config, by[c], fmt)]
        if names:
            chosen[name] = names[:top] if top else names
    return chosen


def only_sensitivity(session: Session, config: QuantConfig, images: int, measure_top: int | None,
                     probes: int = 8, taylor_images: int = TAYLOR_IMAGES, formats: list[str] | None = None,
                     measure_top_format: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The ``only`` table the planner reads. ``measure_top`` None or 0: every candidate measured.
    Else the candidates are ordered by the taylor estimate (on the first ``taylor_images`` of
    the ``images`` plan images: it only orders) and only the top ``measure_top`` measured on
    all of them; the others keep their estimate as ``kl`` (column ``source``: measured / taylor).
    With ``formats``, the taylor estimate covers int8 and each of them in one pass (its int8
    rows order the candidates), the top :func:`format_top` candidates of each format beyond
    int8 and float (by that format's estimate) are measured in it too (rows of the same
    ``only`` artefact and log), and the per-format table is returned beside the ``only``
    table with ``kl``: the measured KL where there is one, else the estimate (else None)."""
    by_format = None
    if formats is not None:
        by_format, _, _, _ = run_taylor(session, config, images=min(images, taylor_images), probes=probes,
                                        formats=["int8", *formats])
    per_format = None if by_format is None else format_candidates(
        session, config, by_format, formats, format_top(measure_top, measure_top_format))
    # every candidate measured anyway: an estimate would order nothing
    if not measure_top or measure_top >= len(make_candidates(session.sites, config, "op")):
        table, _, _, _ = run_sensitivity(session, config, mode="only", images=images, formats=per_format or None)
        only = own_format_rows(table).drop(columns=["format", "own_format"], errors="ignore")
        return only.assign(source="measured"), (None if by_format is None else with_measured_formats(by_format, table))
    if by_format is not None:
        estimate = format_rows(by_format, "int8").drop(columns=["format"])
    else:
        estimate, _, _, _ = run_taylor(session, config, images=min(images, taylor_images), probes=probes)
    top = estimate["candidate"].head(measure_top).tolist()
    table, _, _, _ = run_sensitivity(session, config, mode="only", images=images, only=top,
                                     formats=per_format or None)
    measured = own_format_rows(table).drop(columns=["format", "own_format"], errors="ignore")
    rest = estimate[~estimate["candidate"].isin(top)].drop(columns=["rank"]).rename(columns={"kl_estimate": "kl"})
    merged = pd.concat([measured.drop(columns=["rank"]).assign(source="measured"), rest.assign(source="taylor")],
                       ignore_index=True)
    merged = merged.sort_values("kl", ascending=False, kind="stable").reset_index(drop=True)
    merged.insert(0, "rank", range(1, len(merged) + 1))
    return merged, (None if by_format is None else with_measured_formats(by_format, table))


# -- errors ------------------------------------------------------------------------------------
def run_errors(session: Session, config: QuantConfig, *, images: int = 64,
               outlier_k: float = 6.0) -> tuple[ErrorReport, list[Path]]:
    t0 = time.time()
    val = session.images("val", images)
    settings = {**session.settings(), "val_files": [str(p.resolve()) for p, _ in val.items],
                "config": config.to_dict(), "outlier_k": outlier_k, "batch_size": session.opts.batch_size}
    session.out.mkdir(parents=True, exist_ok=True)
    checkpoint = session.out / f"errors_state.{settings_key(settings)}.pt"
    report = analyze_errors(session.qmodel, config, (p for p, _, _ in session.batches(val)),
                            outlier_k=outlier_k, progress=session.opts.progress,
                            total=session.num_batches(val), checkpoint=checkpoint)
    report.meta.update(session.describe())
    paths = report.save(session.out, _run_info(session, wall_s=round(time.time() - t0, 1)))
    checkpoint.unlink(missing_ok=True)  # the tables hold everything now
    return report, paths


# -- plan ----------------------------------------------------------------------------------------
@dataclass
class PlanOptions:
    images: int = 256  # plan images (sensitivity and search)
    confirm_images: int | None = None  # disjoint confirm images (default: as many as plan images)
    objective: str = "kl"
    max_steps: int = 12  # float moves measured per path
    worst_sites: int = 3  # sites offered per-site observer remedies
    all_but: bool = False  # also measure the all-but sensitivity (better gain estimates, much slower)
    # "latency" (measured with ONNX Runtime), "macs" (float MAC share + residual charge),
    # "bitops" (% of all's BitOps), "size" (weight MB) or "auto": bitops when `formats` go beyond
    # int8 and float, else latency where ONNX Runtime and the exporter are installed, else macs
    cost: str = "auto"
    # the formats the planner chooses between (quant.formats names); None: int8 or float
    formats: list[str] | None = None
    latency_batch: int = 8
    latency_runs: int = 15
    latency_threads: int | None = None  # ONNX Runtime intra-op threads of the latency table (None: its default)
    measure_top: int | None = MEASURE_TOP  # only-candidates measured, in taylor order (None/0: all)
    # per format beyond int8 and float: candidates measured in it, in its taylor order
    # (None: a quarter of measure_top, rounded up; 0: all)
    measure_top_format: int | None = None
    probes: int = 8  # Fisher probes of the taylor estimate
    taylor_images: int = TAYLOR_IMAGES  # plan images the estimate uses (the first ones)
    # further val images the decide stage may stream (None: every val image that is neither a
    # plan nor a confirm image; 0: no decide stage); it runs only with an explicit budget
    decide_images: int | None = None
    decide_backend: str = "torch"  # torch (the simulation), onnxruntime or torch-int8
    decide_neighbours: int = 2  # cheaper frontier points decided after the plan
    early_stop: bool = True  # stop measuring a move once its test is hopeless (Planner.hopeless)


LATENCY_VERSION = 2  # 2: paired per-round differences with their interval, free groups, ms costs


def resolve_cost(cost: str, formats: list[str] | None = None) -> str:
    """``auto`` -> ``bitops`` when ``formats`` go beyond int8 and float (the costs that price
    every format without a measurement); else ``latency`` where the latency table can be
    measured (onnx, onnxruntime and onnxscript importable), else ``macs`` with a note on stderr
    saying what to install. ``macs`` prices int8 or float only: with other formats, a
    ConfigError; ``latency`` prices every listed format by its measured time in ONNX Runtime."""
    multi = not only_int8_and_float(formats)
    if cost != "auto":
        if cost not in ("macs", "latency", *EXACT_COSTS):
            raise ValueError(f"unknown cost {cost!r}; choose auto, macs, latency, {', '.join(EXACT_COSTS)}")
        if multi and cost == "macs":
            raise ConfigError(f"--cost macs prices a site in int8 or float only; with --formats "
                              f"{','.join(formats)} use --cost bitops, size or latency")
        return cost
    if multi:
        return "bitops"
    import importlib.util
    import sys

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"vitq: note: {', '.join(missing)} not installed: the planner's cost is the float share of matmul "
              "MACs, not measured latency (pip install 'vitq[onnx]')", file=sys.stderr)
        return "macs"
    return "latency"


def run_latency(session: Session, config: QuantConfig, *, batch: int = 8, runs: int = 9,
                threads: int | None = None, formats: list[str] | None = None) -> pd.DataFrame:
    """The per-site latency table of ``config`` (:mod:`vitq.latency`; with ``formats``, also
    each site group in each of them), measured once per output folder, config and formats: a
    table already there with the same settings is reused."""
    from .latency import measure_site_latency, noise_ms

    meta = {**session.describe(), "config": config.to_dict(), "batch": batch, "runs": runs, "threads": threads,
            "backend": "onnxruntime", "version": LATENCY_VERSION, "formats": formats}
    old = artifacts.read(session.out, artifacts.LATENCY)
    if old is not None and all(old.meta.get(k) == v for k, v in meta.items() if k not in ("torch", "transformers")):
        return old.rows
    t0 = time.time()
    pixels = torch.cat(eval_set(session, batch).pixels)[:batch]
    table = measure_site_latency(session.qmodel, config, pixels, runs=runs, threads=threads,
                                 progress=session.opts.progress, formats=formats)
    meta["noise_ms"] = noise_ms(table)
    artifacts.write(session.out, artifacts.LATENCY, table, meta, _run_info(session, wall_s=round(time.time() - t0, 1)))
    return table


def run_plan(session: Session, start: QuantConfig, budget: Budget,
             opts: PlanOptions | None = None) -> tuple[Planner, list[Path]]:
    """Sensitivity (reused when already measured), the planner's search on the plan
    images, confirmation on the confirm images; writes plan_* artefacts."""
    opts = opts or PlanOptions()
    n_confirm = opts.images if opts.confirm_images is None else opts.confirm_images
    formats = None if only_int8_and_float(opts.formats) else list(opts.formats)
    if formats is not None and opts.objective != "kl":
        raise ConfigError(f"--formats {','.join(formats)} estimates each format's KL: use --objective kl")
    cost = resolve_cost(opts.cost, formats)
    # the estimate is of KL: another objective measures every candidate
    only, by_format = only_sensitivity(session, start, opts.images,
                                       opts.measure_top if opts.objective == "kl" else None, opts.probes,
                                       opts.taylor_images, formats, opts.measure_top_format)
    all_but = None
    if opts.all_but:
        all_but, ab_meta, _, _ = run_sensitivity(session, start, mode="all-but", images=opts.images)
        all_but.attrs["baseline"] = ab_meta["baseline"]
    plan_data = eval_set(session, opts.images)
    confirm_data = eval_set(session, opts.images, "confirm", n_confirm) if n_confirm > 0 else None
    if confirm_data is not None and not len(confirm_data.labels):
        confirm_data = None
    settings = {**session.settings(), "val_files": plan_data.files, "start": start.to_dict(),
                "log_version": LOG_VERSION}
    latency = {}
    if cost == "latency":
        from .latency import format_unit_costs, noise_ms, unit_costs

        table = run_latency(session, start, batch=opts.latency_batch, runs=opts.latency_runs,
                            threads=opts.latency_threads, formats=formats)
        latency = {"unit_costs": unit_costs(table), "cost_base": float(table["start_ms"].iloc[0]) if len(table) else 0.0,
                   "cost_noise": noise_ms(table), "format_costs": format_unit_costs(table) if formats else None}
    moves = None if by_format is None else FormatMoves(
        formats, {(r.candidate, r.format): float(r.kl) for r in by_format.itertuples()}, start, session.sites)
    planner = Planner(runner(session, plan_data), None if confirm_data is None else runner(session, confirm_data),
                      session.out, macs(session), budget, settings, objective=opts.objective,
                      seed=session.opts.seed, progress=session.opts.progress, early_stop=opts.early_stop,
                      cost_kind=cost if cost in EXACT_COSTS else None, format_moves=moves, **latency)
    plan = planner.plan(start, only, all_but, worst_sites=opts.worst_sites, max_steps=opts.max_steps)
    decided = None
    if budget.explicit and opts.decide_images != 0:
        # the positions eval_set drew (not the images read: an unreadable one keeps its place)
        decided = run_decide(session, planner, opts, opts.images, max(n_confirm, 0))
        plan = planner.plan_config
    confirm = planner.confirm() if confirm_data is not None else pd.DataFrame()
    plan.save(session.out / artifacts.PLAN_YAML)
    save_frontier(planner, session.out)
    floats = [n for n in float_site_names(plan, session.sites)
              if session.qmodel.site_by_name[n].kind not in plan.float_kinds]
    atomic_write_text(session.out / artifacts.PLAN_SKIPLIST,
                      yaml.safe_dump({"float_kinds": plan.float_kinds, "float_sites": floats,
                                      **({"formats": dict(plan.formats)} if plan.formats else {})}, sort_keys=False))
    meta = {**session.describe(), "budget": vars(budget), "met": planner.met, "outcome": planner.outcome,
            "cost": cost, "cost_unit": (f"ms per batch of {opts.latency_batch} in ONNX Runtime (measured)"
                                        if cost == "latency" else EXACT_COSTS.get(cost, "% float MACs + residual charge")),
            "cost_noise": planner.cost_noise,
            "met_at_step": planner.chosen.row["attempt"] if planner.met else None,
            "plan_images": len(plan_data.labels), "confirm_images": 0 if confirm_data is None else len(confirm_data.labels),
            "plan": plan.to_dict(), "float_sites": floats, "start": start.name,
            "best_reference": planner.best_reference, "verdict": planner.verdict(),
            "noise": {"objective": planner.objective, "test": "paired bootstrap over images", "level": planner.level,
                      "resamples": planner.n_boot},
            "decisions": [d.to_dict() for d in budget.decisions(planner.chosen.stats, planner.fp32)],
            "confirm_decisions": [d.to_dict() for d in getattr(planner, "confirm_decisions", [])] if len(confirm) else None,
            "decide": None if decided is None else _decide_summary(decided[0], opts)}
    run = _run_info(session, wall_s=round(planner.wall_s, 1), measured_now=planner.measured_now,
                    log=str(planner.log.path))
    paths = [*artifacts.write(session.out, artifacts.PLAN_STEPS, planner.steps_table(), meta, run),
             *artifacts.write(session.out, artifacts.PLAN_TRIED, planner.tried_table(), meta, run)]
    if len(confirm):
        paths += artifacts.write(session.out, artifacts.PLAN_CONFIRM, confirm, meta, run)
    if decided is not None:
        result, decide_run = decided
        paths += artifacts.write(session.out, artifacts.PLAN_DECIDE, pd.DataFrame(result.rows),
                                 {**session.describe(), **_decide_summary(result, opts)},
                                 {**_run_info(session), **decide_run})
    return planner, [*paths, session.out / artifacts.PLAN_YAML, session.out / artifacts.PLAN_SKIPLIST]


# -- the decide stage ------------------------------------------------------------------------
def decide_model(session: Session, backend: str):
    """What the decide stage runs: the simulation (``torch``), or a real int8 backend
    served through the same interface (FP32 stays the torch reference)."""
    if backend == "torch":
        return session.qmodel
    from .backends import BackendEval, calibration_pixels, example_pixels, make_backend

    calib = calibration_pixels(session) if backend == "torch-int8" else None
    return BackendEval(session.qmodel, make_backend(backend, session.qmodel, session.out / "onnx",
                                                    example_pixels(session), torch.get_num_threads(), calib),
                       compare_simulation=False)


def _chunked_batches(session: Session, images, chunk: int):
    """``images`` batch by batch, decoded ``chunk`` images at a time: a stage that stops
    early decodes no more than it measured (plus one chunk)."""
    for start in range(0, len(images), chunk):
        yield from session.batches(images.subset(list(range(start, min(start + chunk, len(images))))))


def run_decide(session: Session, planner: Planner, opts: PlanOptions, n_plan: int,
               n_confirm: int) -> tuple[DecideResult, dict] | None:
    """The plan (and its cheaper frontier neighbours) on further val images, neither plan
    nor confirm images, streamed until every explicit budget is decided
    (:mod:`analysis.decide`); the planner takes the result (:meth:`Planner.settle`).
    None when there is no further image."""
    t0 = time.time()
    val = session.images("val", None)
    _, _, positions = val_split(session, len(val), n_plan, n_confirm, opts.decide_images)
    if not positions:
        print("vitq: note: no val image is left beside the plan and confirm images: the budget is decided on the "
              "plan images only", file=sys.stderr)
        return None
    points: list[Point] = planner.decide_points(opts.decide_neighbours)
    candidates = []
    for i, point in enumerate(points):
        name = "plan" if i == 0 else f"neighbour_{i}"
        config = copy.deepcopy(point.config)
        config.name = name
        candidates.append(Candidate(name, int(point.row["attempt"]), config))
    images = val.subset(positions)
    limits = planner.budget.limits()
    settings = {**session.describe(), "val_files": [str(p) for p, _ in images.items], "log_version": LOG_VERSION,
                "candidates": {c.name: c.config.to_dict() for c in candidates}, "limits": limits,
                "backend": opts.decide_backend, "looks": LOOKS}
    log = MeasurementLog(session.out / f"plan_decide.{settings_key(settings)}.jsonl", settings)
    done = evaluated_images(log)
    todo = images.subset([i for i in range(len(images)) if images.ids[i] not in done])
    chunk = max(session.opts.batch_size, -(-len(images) // min(LOOKS, len(images))))
    result = decide_candidates(lambda: decide_model(session, opts.decide_backend), candidates, limits, _chunked_batches(session, todo, chunk), len(images),
                               log=log, total=session.num_batches(todo), progress=session.opts.progress)
    chosen = 0 if result.chosen is None else result.chosen
    planner.settle(points, result.chosen, result.decisions[candidates[chosen].name], result.images)
    return result, {"wall_s": round(time.time() - t0, 1), "measured_now": log.measured_now,
                    "resumed_images": result.resumed, "log": str(log.path)}


def _decide_summary(result: DecideResult, opts: PlanOptions) -> dict:
    """The decide stage's meta (plan_decide.json, and ``decide`` in plan_steps.json)."""
    chosen = None if result.chosen is None else result.candidates[result.chosen].name
    final = result.candidates[result.chosen or 0].name
    return {"backend": opts.decide_backend, "max_images": result.max_images, "looks": result.looks,
            "images": result.images,
            "candidates": [{"name": c.name, "attempt": c.attempt, "outcome": result.outcomes[c.name]}
                           for c in result.candidates],
            "chosen": chosen, "decisions": [d.to_dict() for d in result.decisions[final]]}
