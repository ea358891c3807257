"""Mixed-precision planner: the cheapest configuration that meets an accuracy budget,
chosen on one image set and confirmed on another.

How it searches (every measurement on the same *plan* images, with the whole
configuration, per-image values logged so an interrupted plan resumes):

1. Reference rows: FP32, ``all``, ``mixed_1``, ``mixed_2``, ``nncf`` (NNCF's default placement).
2. Path from the start config (default ``all``): remedies first (another
   activation observer everywhere, the fixed [0, 1] range for softmax
   probabilities, SmoothQuant scale migration at three strengths (alpha 0.15, 0.5, 0.95), bias correction,
   another observer on the worst sites), then float fallbacks:
   candidate moves (one site, all residual adds, all ``matmul_av``, one block)
   ordered by estimated fidelity gained per unit of cost (gain from the
   sensitivity tables, cost from :mod:`analysis.cost`), each measured in turn.
3. A second path from the most accurate reference preset: the same remedies, then float
   fallbacks.

The search objective is smooth and per image: KL(FP32 || config) by default
(``logit_mse`` optional); top-1 on a few hundred images moves in one-image steps.
A move is kept only when it beats the current point by more than its noise: the
95 % paired-bootstrap interval of the per-image objective difference must lie
above zero. Budgets (top-1 drop, agreement, KL) are *checked*, never searched on:
each is met, not met or undecided on the images measured (:mod:`analysis.budget`, one-sided
95 % bounds of the per-image values; see :meth:`Budget.decisions`). A point whose budget is
undecided never counts as meeting it: the search goes on, on KL, and when no point meets it
the plan is the cheapest point not shown to violate it (outcome "undecided"). The plan
(and its cheaper frontier neighbours) can then be decided on further images
(:mod:`analysis.decide`).
By default the plan must also beat every reference preset: KL lower by more than the
noise, agreement no lower, at no higher cost than the costliest of them. The cost is what
the deployment pays where it was measured (``--cost latency``: ms per batch in ONNX
Runtime, :mod:`vitq.latency`; float sites whose slowdown is not measurable cost nothing,
and two costs closer than the table's noise are equal), else the float share of matmul
MACs. Every kept point lies on a path; the non-dominated ones (lower cost, lower
objective) form the frontier. A trimming path then returns float sites of the cheapest
qualifying point to int8 while it still qualifies (only sites whose return saves cost),
and the plan is the cheapest qualifying point measured, the most accurate among points
of equal cost. When no point beats every preset, the plan is the cheapest point whose
objective equals the most accurate preset's within the noise (that preset itself, or a
trimmed version of it that costs less): never a plan slower and worse than a preset.
The plan and the reference presets are then measured on disjoint *confirm* images.

Over formats (``format_moves``, :mod:`analysis.format_moves`): the float fallbacks become
moves to more precise formats of a list and trimming moves to cheaper ones, priced by an
exact cost of every format (``cost_kind``: BitOps or weight MB, :mod:`analysis.cost`); the
budget's caps (``max_bitops``, ``max_weight_mb``) bound what counts as a plan; a list without
``float`` (an integer-only target) admits as the plan only configs that keep no site float
beyond the float kinds (:meth:`Planner.admissible`), and a best preset that keeps other sites
float starts no path (its float sites could not leave it). Every
attempt's row then says the formats its config runs (``formats``), and among the attempts
the plan is chosen from (the presets and the kept points of every path) whose configs use
int8 and float only, the one the same rule (:meth:`Planner._choose`) picks is marked (``int8_float_best``: that rule's outcome, "" on
every other row): the best int8/float-only point measured by this search, which is not
literally what the int8-or-float planner would have reached (its moves differ).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm import tqdm

from quant.config import BACKEND_FLOAT_KINDS, QuantConfig
from quant.formats import FORMATS
from quant.presets import preset
from quant.store import settings_key

from .budget import Decision, conditional_power, decide, overall
from .cost import EXACT_COSTS, MATMUL_KINDS, config_cost, exact_cost
from .evaluate import accuracy_row
from .format_moves import FLOAT, FormatMoves, format_name, without_float
from .measurement_log import MeasurementLog
from .metrics import OutputStats, paired_bootstrap
from .runner import LOOK_IMAGES, BoundaryCache, Runner, scratch

OBJECTIVES = {"kl": "kl", "logit_mse": "mse"}  # objective -> OutputStats per-image key
REFERENCES = ("all", "mixed_1", "mixed_2", "nncf")
SITE_COST = 0.5  # cost of one float non-matmul site (residual add), in % of matmul MACs
# a move stops being measured once the chance that it passes its test on all plan images,
# under the trend of the images so far, is below this (analysis.budget.conditional_power)
FUTILITY = 0.02
SMOOTH_ALPHAS = (0.15, 0.5, 0.95)  # NNCF 3.4: 0.15 for torchvision vit_b_16, 0.95 its transformer default (the factor table's winner, docs/results.md); 0.5 SmoothQuant's


@dataclass
class Budget:
    """Accuracy the plan must keep, checked on measured rows: top-1 drop vs FP32 (pp),
    top-1 agreement with FP32 (%), mean KL (nats); None = not constrained."""

    max_drop: float | None = None
    min_agreement: float | None = None
    max_kl: float | None = None
    # also beat every reference preset: objective lower with 95 % confidence, agreement
    # no lower, at no higher cost (int8 MAC share and skip-list length) than the presets
    beat_references: bool = True
    # cost caps, exact (no noise): BitOps as a fraction of the ``all`` preset's (1.05: 5 % more),
    # Linear/Conv weight MB (analysis.cost); None = not constrained
    max_bitops: float | None = None
    max_weight_mb: float | None = None

    def limits(self) -> dict[str, float]:
        """The explicit budgets by :mod:`analysis.budget` kind, e.g. ``{"top1_drop": 0.3}``."""
        return {kind: value for kind, value in (("top1_drop", self.max_drop), ("agreement", self.min_agreement),
                                                ("kl", self.max_kl)) if value is not None}

    @property
    def explicit(self) -> bool:
        return bool(self.limits())

    def decisions(self, stats: OutputStats, fp32: OutputStats) -> list[Decision]:
        """Each explicit budget met, not met or undecided on the images of ``stats``
        (``fp32``: the FP32 run on the same images), from the per-image values with
        one-sided 95 % bounds (:func:`analysis.budget.decide`)."""
        return [decide(kind, per_image_values(kind, stats, fp32), value) for kind, value in self.limits().items()]

    def describe(self) -> str:
        parts = [f"top-1 drop <= {self.max_drop:g} pp" if self.max_drop is not None else "",
                 f"agreement >= {self.min_agreement:g} %" if self.min_agreement is not None else "",
                 f"KL <= {self.max_kl:g}" if self.max_kl is not None else "",
                 f"BitOps <= {self.max_bitops:g} x all's" if self.max_bitops is not None else "",
                 f"weights <= {self.max_weight_mb:g} MB" if self.max_weight_mb is not None else "",
                 "beat every reference preset at no higher cost" if self.beat_references else ""]
        return ", ".join(p for p in parts if p) or "none"

    def within_caps(self, row: dict) -> bool:
        """The cost caps hold for a planner row (its ``bitops``, % of ``all``'s, and ``weight_mb``)."""
        return ((self.max_bitops is None or row["bitops"] <= 100.0 * self.max_bitops + 1e-9)
                and (self.max_weight_mb is None or row["weight_mb"] <= self.max_weight_mb + 1e-12))


def per_image_values(kind: str, stats: OutputStats, fp32: OutputStats):
    """The per-image values a budget of ``kind`` is decided on: FP32 correct minus config
    correct (top-1 drop, paired), config top-1 == FP32 top-1 (agreement), KL."""
    if kind == "top1_drop":
        if len(fp32) != len(stats):
            raise ValueError(f"a top-1 drop needs the FP32 run on the same images ({len(fp32)} vs {len(stats)})")
        return fp32.array("top1") - stats.array("top1")
    return stats.array({"agreement": "agree", "kl": "kl"}[kind])


@dataclass
class Move:
    """One candidate change of a configuration."""

    change: str  # what a person reads: "float vit.layers.3.mlp.fc2", "matmul_av probs: unit range"
    kind: str  # "remedy" or "float"
    make: Callable[[QuantConfig], QuantConfig]
    estimate: float = 0.0  # estimated objective gain (from the sensitivity tables)
    floats: tuple[str, ...] = ()  # sites the move changes (float moves: keeps float)
    target: str = "float"  # the format those sites take (float and trim moves; analysis.format_moves)


@dataclass
class Point:
    """A measured configuration on a path."""

    config: QuantConfig
    stats: OutputStats
    row: dict


def cost_of(config: QuantConfig | None, sites, macs: dict[str, float], site_cost: float = SITE_COST) -> float:
    """Float share of matmul MACs (%) plus ``site_cost`` per float site that is neither
    a matmul nor a backend-float kind: keeping a residual add float is not free
    (measured: ViT-B/16 ``mixed_1`` 9.8 img/s vs ``all`` 12.3 img/s with ONNX Runtime)."""
    if config is None:
        return 100.0 + site_cost * sum(s.kind not in MATMUL_KINDS and s.kind not in BACKEND_FLOAT_KINDS
                                       for s in sites)
    extra = sum(1 for s in sites if config.is_float(s) and s.kind not in MATMUL_KINDS
                and s.kind not in BACKEND_FLOAT_KINDS)
    return 100.0 - config_cost(config, sites, macs)["int8_macs_share"] + site_cost * extra


def latency_cost(config: QuantConfig | None, sites, unit_costs: dict[str, float], base: float = 0.0,
                 format_costs: dict[tuple[str, str], float] | None = None) -> float:
    """``base`` (the start config's measured time) plus the measured per-site latency costs
    (``vitq.latency``: ms per batch, 0 where not measurable) of the sites ``config`` keeps
    float beyond the backend-float kinds and, with ``format_costs`` ((site, format) -> ms per
    batch), of the sites it runs in another format than the start's (a (site, format) the
    table lacks runs as the start config does: no cost)."""
    total = base
    for s in sites:
        if s.kind in BACKEND_FLOAT_KINDS:
            continue
        if config is None or config.is_float(s):
            total += unit_costs.get(s.name, 0.0)
        elif format_costs:
            total += format_costs.get((s.name, format_name(config, s)), 0.0)
    return total


class Planner:
    """See the module docstring. ``plan_runner`` and ``confirm_runner`` hold disjoint
    image sets of the same calibrated model."""

    def __init__(self, plan_runner: Runner, confirm_runner: Runner | None, out_dir: Path,
                 macs: dict[str, float], budget: Budget | None = None, settings: dict | None = None, *,
                 objective: str = "kl", site_cost: float = SITE_COST, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0, progress: bool = True, unit_costs: dict[str, float] | None = None,
                 cost_base: float = 0.0, cost_noise: float = 0.0, early_stop: bool = True,
                 futility: float = FUTILITY, look: int = LOOK_IMAGES, cost_kind: str | None = None,
                 format_moves: FormatMoves | None = None,
                 format_costs: dict[tuple[str, str], float] | None = None) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.runner, self.confirm_runner = plan_runner, confirm_runner
        self.qmodel = plan_runner.qmodel
        self.sites = self.qmodel.sites
        self.macs, self.budget = macs, budget or Budget()
        self.objective, self.site_cost = objective, site_cost
        self.unit_costs = unit_costs  # per-site latency costs (--cost latency); None: MACs
        self.format_costs = format_costs  # (site, format) latency costs (--cost latency --formats)
        # the start config's measured time, and the resolution of a cost difference (costs
        # closer than this are equal; 0 for MACs, which are exact)
        self.cost_base, self.cost_noise = cost_base, cost_noise
        # an exact cost of every format (analysis.cost.EXACT_COSTS: bitops, size), else None
        if cost_kind is not None and cost_kind not in EXACT_COSTS:
            raise ValueError(f"unknown cost {cost_kind!r}; exact costs are {', '.join(EXACT_COSTS)}")
        self.cost_kind = cost_kind
        self.format_moves = format_moves  # moves over formats (--formats); None: int8 or float
        self.level, self.n_boot, self.seed, self.progress = level, n_boot, seed, progress
        # stop measuring a move once it cannot pass its test (conditional power < futility)
        self.early_stop, self.futility, self.look = early_stop, futility, look
        settings = dict(settings or {})
        self.log = MeasurementLog(Path(out_dir) / f"plan_measurements.{settings_key(settings)}.jsonl",
                                  {**settings, "images": len(plan_runner)})
        self.confirm_log = None if confirm_runner is None else MeasurementLog(
            Path(out_dir) / f"plan_confirm.{settings_key(settings)}.jsonl",
            {**settings, "confirm_images": len(confirm_runner)})
        self.tried: list[dict] = []
        self.tried_points: list[Point] = []  # every attempt, FP32 included (config None)
        self._cache: tuple[str, BoundaryCache] | None = None
        self.out_dir = Path(out_dir)
        self._scratch: Path | None = None
        self.fp32 = self.measure(None)

    # -- measuring -------------------------------------------------------------------
    def measure(self, config: QuantConfig | None, *, confirm: bool = False, start_block: int = -1,
                background: QuantConfig | None = None,
                stop: Callable[[OutputStats], bool] | None = None) -> OutputStats:
        """Per-image metrics of ``config`` on the plan (or confirm) images, from the log
        when measured before. ``background``: a config equal to ``config`` before
        ``start_block``, whose cached block inputs may be reused. ``stop``: asked after every
        look (every ``look`` images, default :data:`analysis.runner.LOOK_IMAGES`) whether the move is hopeless; then
        the measurement ends early and covers the first images only. A logged measurement
        that stopped early is taken up again where it stopped when ``stop`` does not stop it
        there (or is None)."""
        runner, log = (self.confirm_runner, self.confirm_log) if confirm else (self.runner, self.log)
        key = "fp32" if config is None else settings_key(config.to_dict())
        done = None
        if key in log.done:
            stats = OutputStats.from_dict(log.done[key]["stats"])
            if len(stats) >= len(runner) or (stop is not None and stop(stats)):
                return stats
            done = stats  # stopped early before; this caller needs more images
        state = runner.fp32_state if config is None else runner.state(config)
        use_cache = background is not None and start_block > 0 and not confirm and self._scratch is not None
        cache = self._boundaries(background) if use_cache else None
        stats = runner.measure(state, start_block if cache is not None else -1, cache, stop=stop, done=done,
                               look=self.look)
        self.qmodel.apply(None)
        log.add({"candidate": key, "stats": stats.to_dict()})
        return stats

    def hopeless(self, versus: list[tuple[OutputStats, str]]) -> Callable[[OutputStats], bool] | None:
        """The early-stop rule of a move that must pass paired tests against ``versus``
        (``(stats, need)``: need ``"above"``, objective lower beyond the noise; ``"not_below"``,
        not higher beyond it): stop when the conditional power of any of them, under the
        trend of the images so far, is below ``futility``. None when early stopping is off."""
        if not self.early_stop or not versus:
            return None
        key, n = OBJECTIVES[self.objective], len(self.runner)

        def stop(stats: OutputStats) -> bool:
            k = len(stats)
            return any(conditional_power(other.array(key)[:k] - stats.array(key), n, need=need, level=self.level)
                       < self.futility for other, need in versus)
        return stop

    @property
    def measured_now(self) -> int:
        """Configurations measured (not read from the logs) by this process."""
        return self.log.measured_now + (self.confirm_log.measured_now if self.confirm_log else 0)

    def _boundaries(self, config: QuantConfig) -> BoundaryCache:
        key = settings_key(config.to_dict())
        if self._cache is None or self._cache[0] != key:
            folder = self._scratch / f"plan-{key}"
            self._cache = (key, self.runner.boundaries(self.runner.state(config), folder))
        return self._cache[1]

    def row(self, config: QuantConfig | None, stats: OutputStats, fp32: OutputStats | None = None) -> dict:
        """Summary, drops vs FP32 (``fp32``: the FP32 run on the same images, default the
        plan images), site counts, MAC share, planner cost and the explicit budget's
        outcome (met / not met / undecided; met when there is none) of one measurement."""
        fp32 = fp32 or self.fp32
        return {**accuracy_row(config, stats, fp32, self.sites, self.macs), **stats.standard_errors(fp32),
                "cost": self.cost(config), "budget_outcome": overall(self.budget.decisions(stats, fp32)),
                "bitops": exact_cost("bitops", config, self.qmodel, self.macs),
                "weight_mb": exact_cost("size", config, self.qmodel, self.macs)}

    def cost(self, config: QuantConfig | None) -> float:
        """The planner's cost of ``config``: float MAC share + residual charge, or the
        measured latency costs when the planner was given them."""
        if self.cost_kind is not None:
            return exact_cost(self.cost_kind, config, self.qmodel, self.macs)
        if self.unit_costs is not None:
            return latency_cost(config, self.sites, self.unit_costs, self.cost_base, self.format_costs)
        return cost_of(config, self.sites, self.macs, self.site_cost)

    def compare(self, new: OutputStats, current: OutputStats) -> dict[str, float]:
        """Objective gain of ``new`` over ``current`` (positive = better) with its paired
        bootstrap standard error and interval."""
        key = OBJECTIVES[self.objective]
        b = paired_bootstrap(current.array(key), new.array(key), n_boot=self.n_boot, seed=self.seed,
                             level=self.level)
        return {"gain": b["mean"], "gain_se": b["se"], "gain_lo": b["lo"], "gain_hi": b["hi"]}

    def compare_paired(self, new: OutputStats, ref: OutputStats) -> str:
        """``new`` against ``ref`` on the same images, by paired 95 % intervals: "better" when
        its objective gain lies above 0 and its top-1 agreement with FP32 is not lower beyond
        the noise; "worse" when either lies below 0; otherwise "within the noise"."""
        gain = self.compare(new, ref)
        agree = paired_bootstrap(100 * new.array("agree"), 100 * ref.array("agree"), n_boot=self.n_boot,
                                 seed=self.seed, level=self.level)
        if gain["gain_hi"] < 0 or agree["hi"] < 0:
            return "worse"
        return "better" if gain["gain_lo"] > 0 else "within the noise"

    def _record(self, path: str, kind: str, change: str, config: QuantConfig | None, stats: OutputStats,
                kept: bool, versus: OutputStats | None = None) -> dict:
        """One row of the tried table; a measurement stopped early (``stopped_early``) is
        compared and summarised on the images it covers."""
        n = len(stats)
        stopped = n < len(self.runner)
        row = {"attempt": len(self.tried), "path": path, "kind": kind, "change": change,
               "config": "fp32" if config is None else config.name, "kept": kept,
               **(self.compare(stats, versus.head(n)) if versus is not None else
                  {"gain": None, "gain_se": None, "gain_lo": None, "gain_hi": None}),
               **self.row(config, stats, self.fp32.head(n) if stopped else None), "stopped_early": stopped}
        self.tried.append(row)
        self.tried_points.append(Point(config, stats, row))
        return row

    # -- searching -------------------------------------------------------------------
    def plan(self, start: QuantConfig, only_table: pd.DataFrame, all_but_table: pd.DataFrame | None = None, *,
             mixed_2_float: list[str] | None = None, worst_sites: int = 3, max_steps: int = 12) -> QuantConfig:
        """Search both paths and return the plan (see the module docstring)."""
        t0 = time.time()
        self.paths: dict[str, list[Point]] = {}
        references: dict[str, Point] = {}
        self._record("reference", "reference", "FP32", None, self.fp32, True)
        for name in REFERENCES:
            cfg = preset(name, self.sites, mixed_2_float)
            stats = self.measure(cfg)
            references[name] = Point(cfg, stats, self._record("reference", "reference", f"preset {name}", cfg,
                                                              stats, True))
        self.references = references
        estimates = self._estimates(only_table, all_but_table)

        key = OBJECTIVES[self.objective]
        best_ref = min(references, key=lambda n: float(references[n].stats.array(key).mean()))
        self.best_reference = best_ref
        first = copy.deepcopy(start)
        first.name = "plan"
        with scratch(self.out_dir) as tmp:
            self._scratch = tmp
            try:
                self._path("start", first, f"start from {start.name}",
                           [*self._remedies(first, only_table, worst_sites), *self._floats(first, estimates)],
                           max_steps)
                # a preset keeping sites float a float-less format list cannot give (an integer-only
                # target) is no start: its path could only lead to points that are no plan
                if best_ref != start.name and self.admissible(references[best_ref].config):
                    ref = copy.deepcopy(references[best_ref].config)
                    ref.name = "plan"
                    # remedies there too: SmoothQuant on NNCF's float set is what NNCF's default adds
                    self._path(best_ref, ref, f"start from {best_ref}",
                               [*self._remedies(ref, only_table, worst_sites), *self._floats(ref, estimates)],
                               max_steps)
                found = self._trim_seed()
                self.trim_seed = found[0] if found else None
                if found is not None:
                    seed, keep = found
                    self.paths["trim"] = self._trim(seed, self._floats_to_trim(seed, estimates), keep, max_steps)
                elif self.budget.beat_references and self.admissible(references[best_ref].config):
                    # nothing beats every preset: make the most accurate one cheaper where that
                    # is measurable, keeping its objective within the noise (not a preset an
                    # integer-only list cannot give: its trimmed points would be no plan either)
                    seed = self.trim_seed = references[best_ref]
                    self.paths["trim"] = self._trim(seed, self._floats_to_trim(seed, estimates), self.matches_best,
                                                    max_steps)
            finally:
                self._scratch, self._cache = None, None

        points = [p for path in self.paths.values() for p in path] + list(references.values())
        points = [p for p in points if self.admissible(p.config)]
        self.frontier = pareto(points, self.objective)
        chosen, self.outcome = self._choose(points)
        self._set_chosen(chosen)
        if self.format_moves is not None:
            self._mark_int8_float(points)
        self.decisions = self.budget.decisions(chosen.stats, self.fp32)  # on the plan images
        self.wall_s = time.time() - t0
        return self.plan_config

    def _set_chosen(self, chosen: Point) -> None:
        self.met = self.outcome == "met"
        self.chosen = chosen
        plan = copy.deepcopy(chosen.config)
        plan.name = "plan"
        self.plan_config = plan

    # -- what counts as a plan -----------------------------------------------------------
    def budget_outcome(self, point: Point) -> str:
        """The explicit budget on the plan images: met, not met or undecided (met when there
        is none)."""
        return overall(self.budget.decisions(point.stats, self.fp32))

    def quality_ok(self, point: Point, undecided: bool = False) -> bool:
        """The explicit budget is met (one-sided 95 % bounds; with ``undecided``, also when
        undecided: not shown to be violated) and, when the budget asks for it, the point
        beats every reference preset in quality (:meth:`beats_references`)."""
        outcome = self.budget_outcome(point)
        if not (outcome == "met" or (undecided and outcome == "undecided")):
            return False
        return not self.budget.beat_references or self.beats_references(point)

    def beats_references(self, point: Point) -> bool:
        """Objective lower than every reference preset's by more than the paired-bootstrap
        noise, top-1 agreement no lower."""
        return all(self.compare(point.stats, ref.stats)["gain_lo"] > 0 and point.row["agreement"] >= ref.row["agreement"]
                   for ref in self.references.values())

    def cost_ok(self, point: Point) -> bool:
        """No costlier than the reference presets (always true when the budget does not ask
        to beat them). Measured latency: no more than the costliest preset's time plus the
        table's noise. MACs: int8 MAC share no lower than the lowest preset's, skip-list no
        longer than the longest preset's."""
        if not self.budget.within_caps(point.row):
            return False
        if not self.budget.beat_references:
            return True
        refs = [r.row for r in self.references.values()]
        if self.unit_costs is not None or self.cost_kind is not None:
            return point.row["cost"] <= max(r["cost"] for r in refs) + self.cost_noise
        share, skipped = point.row["int8_macs_share"], point.row["skipped_sites"]
        min_share = min(r["int8_macs_share"] for r in refs)
        return (share != share or share >= min_share - 1e-9) and skipped <= max(r["skipped_sites"] for r in refs)

    def feasible(self, point: Point, undecided: bool = False) -> bool:
        return self.quality_ok(point, undecided) and self.cost_ok(point)

    def matches_best(self, point: Point) -> bool:
        """Objective equal to the most accurate reference preset's within the noise (the
        95 % interval of the gain reaches 0 or above) and agreement no lower."""
        best = self.references[self.best_reference]
        return (self.compare(point.stats, best.stats)["gain_hi"] >= 0
                and point.row["agreement"] >= best.row["agreement"])

    def cheapest(self, points: list[Point]) -> Point:
        """The cheapest of ``points``, counting costs closer than the noise as equal: among
        those within ``cost_noise`` of the cheapest, the lowest objective."""
        low = min(p.row["cost"] for p in points)
        return min((p for p in points if p.row["cost"] <= low + self.cost_noise),
                   key=lambda p: (p.row[self.objective], p.row["cost"]))

    def admissible(self, config: QuantConfig) -> bool:
        """Whether ``config`` may be the plan: always, unless the planner over formats was given a
        list without ``float`` (an integer-only target, e.g. an NPU where a float residual add is
        a float island): then only configs that keep no site float beyond the float kinds
        (LayerNorm, GELU, Softmax, and those of the start config)."""
        moves = self.format_moves
        if moves is None or FLOAT in moves.formats:
            return True
        kinds = set(BACKEND_FLOAT_KINDS) | set(moves.start.float_kinds)
        return not any(config.is_float(s) and s.kind not in kinds for s in self.sites)

    def formats_used(self, config: QuantConfig | None) -> str:
        """The formats ``config`` runs its sites in (None: FP32, float), comma-separated in
        the registry's order, ``float`` last."""
        used = {FLOAT} if config is None else {format_name(config, s) for s in self.sites}
        order = list(FORMATS)
        return ",".join(sorted(used, key=lambda f: (f == FLOAT, order.index(f))))

    def _mark_int8_float(self, points: list[Point]) -> None:
        """Mark the best int8/float-only point measured by this search: among ``points`` (what
        the plan is chosen from: the reference presets and the kept points of every path) those
        whose configs run every site in int8 or float, the one :meth:`_choose` picks
        (``int8_float_best``: its outcome); every attempt's row gets ``formats``."""
        # the presets first: of equal points (a path's start is its preset) the preset's row is marked
        points = [p for p in sorted(points, key=lambda p: p.row["path"] != "reference")
                  if p.config is not None and not p.row["stopped_early"]
                  and set(self.formats_used(p.config).split(",")) <= {"int8", FLOAT}]
        best, outcome = self._choose(points, pareto(points, self.objective)) if points else (None, "")
        self.int8_float_best = best
        for p in self.tried_points:
            p.row["formats"] = self.formats_used(p.config)
            p.row["int8_float_best"] = outcome if best is not None and p.row is best.row else ""

    def _choose(self, points: list[Point], frontier: list[Point] | None = None) -> tuple[Point, str]:
        """The cheapest feasible point ("met"); else, when the presets were to be beaten
        too, the cheapest point meeting the explicit budget alone ("budget only"); else,
        when the explicit budget is undecided somewhere, the cheapest point not shown to
        violate it, among those that beat the presets at no higher cost when there are such
        ("undecided"); without an explicit budget the cheapest point equal to the most
        accurate preset within the noise ("matches best reference"); else the
        lowest-objective point of ``frontier`` (default: the search's frontier) ("not met")."""
        feasible = [p for p in points if self.feasible(p)]
        if feasible:
            return self.cheapest(feasible), "met"
        explicit = self.budget.explicit
        if self.budget.beat_references and explicit:
            meeting = [p for p in points if self.budget_outcome(p) == "met"]
            if meeting:
                return self.cheapest(meeting), "budget only"
        if explicit:
            undecided = [p for p in points if self.budget_outcome(p) == "undecided"]
            cap = self.references[self.best_reference].row["cost"] + self.cost_noise
            # beat the presets; else (when asked to) equal the most accurate one within the noise at
            # no more cost, never a point slower and worse than it; else any undecided point
            open_ = ([p for p in points if self.feasible(p, undecided=True)]
                     or (self.budget.beat_references
                         and [p for p in undecided if self.matches_best(p) and p.row["cost"] <= cap])
                     or undecided)
            if open_:
                return self.cheapest(open_), "undecided"
        if self.budget.beat_references and not explicit:
            cap = self.references[self.best_reference].row["cost"] + self.cost_noise
            matching = [p for p in points if self.matches_best(p) and p.row["cost"] <= cap]
            if matching:  # the best preset itself, unless it is no admissible plan (admissible)
                return self.cheapest(matching), "matches best reference"
        return min(self.frontier if frontier is None else frontier,
                   key=lambda p: (p.row[self.objective], p.row["cost"])), "not met"

    def _trim_seed(self) -> tuple[Point, Callable[[Point], bool]] | None:
        """Where trimming starts and what a trimmed point must keep: the cheapest feasible
        point, else the cheapest point whose quality is enough (trimming may bring its cost
        within the presets'); then the same with an undecided budget (not shown violated)."""
        points = [p for path in self.paths.values() for p in path if self.admissible(p.config)]
        for ok in (self.feasible, self.quality_ok, lambda p: self.feasible(p, undecided=True),
                   lambda p: self.quality_ok(p, undecided=True)):
            good = [p for p in points if ok(p)]
            if good:
                return self.cheapest(good), ok
        return None

    def _floats_to_trim(self, point: Point, estimates: dict[str, float]) -> list[Move]:
        """Return one float site to int8 at a time, least estimated harm per cost saved first;
        over formats, one site to a cheaper format at a time (analysis.format_moves)."""
        config = point.config
        if self.format_moves is not None:
            return [Move(m.change, "trim", m.make, m.estimate, m.sites, m.fmt)
                    for m in self.format_moves.cheaper(config, estimates, self.cost)]
        here = self.cost(config)
        moves = []
        for site in self.sites:
            if not config.is_float(site) or site.kind in config.float_kinds:
                continue
            saving = here - self.cost(without_float(config, [site.name], self.sites))
            if saving <= 0:
                continue
            harm = max(estimates.get(site.name, 0.0), 0.0)
            moves.append(Move(f"int8 {site.name}", "trim",
                              lambda c, n=site.name: without_float(c, [n], self.sites), harm / saving, (site.name,),
                              "int8"))
        return sorted(moves, key=lambda m: m.estimate)

    def _trim(self, seed: Point, moves: list[Move], keep: Callable[[Point], bool], max_steps: int) -> list[Point]:
        """Cost-reducing path: return float sites to int8 one at a time; a step is kept
        when the cheaper point still passes ``keep`` (with its 95 % confidence rules)."""
        current = seed
        path: list[Point] = []
        stop = self.hopeless(self._keep_tests(keep))
        bar = tqdm(moves[:max_steps], desc="plan: trimming float sites", unit="move", disable=not self.progress)
        for move in bar:
            candidate = move.make(current.config)
            candidate.name = "plan"
            stats = self.measure(candidate, start_block=self._start_block(move), background=current.config, stop=stop)
            point = Point(candidate, stats, {})
            point.row = self._record("trim", "trim", move.change, candidate, stats, False, current.stats)
            if len(stats) == len(self.runner) and keep(point):
                point.row["kept"] = True
                current = point
                path.append(point)
        return path

    def _keep_tests(self, keep: Callable[[Point], bool]) -> list[tuple[OutputStats, str]]:
        """The paired objective tests a trimmed point must pass to satisfy ``keep``: equal to
        the most accurate preset within the noise (:meth:`matches_best`), or, when the budget
        asks to beat the presets, lower than each of theirs. (Its other conditions, agreement
        and the explicit budget, are checked on all images only.)"""
        if keep == self.matches_best:
            return [(self.references[self.best_reference].stats, "not_below")]
        if self.budget.beat_references:
            return [(r.stats, "above") for r in self.references.values()]
        return []

    def _path(self, name: str, start: QuantConfig, change: str, moves: list[Move], max_steps: int) -> None:
        """Greedy path: try ``moves`` in order from ``start``; keep those that beat the noise;
        stop once the budget is met or ``max_steps`` float moves were measured."""
        stats = self.measure(start)
        current = Point(start, stats, self._record(name, "start", change, start, stats, True))
        path = [current]
        float_tried = 0
        bar = tqdm(moves, desc=f"plan: path from {name}", unit="move", disable=not self.progress)
        for move in bar:
            met = self.quality_ok(current)
            if met or (move.kind == "float" and float_tried >= max_steps):
                # say why the bar stops short (it counts every candidate move, not those needed)
                bar.set_postfix_str("budget met" if met else f"{max_steps} fallbacks tried")
                bar.close()
                break
            if move.kind == "float" and self._unchanged(move, current.config):
                continue  # nothing left to change
            candidate = move.make(current.config)
            candidate.name = "plan"
            start_block = self._start_block(move)
            stats = self.measure(candidate, start_block=start_block, background=current.config,
                                 stop=self.hopeless([(current.stats, "above")]))
            float_tried += move.kind == "float"
            kept = len(stats) == len(self.runner) and self.compare(stats, current.stats)["gain_lo"] > 0
            row = self._record(name, move.kind, move.change, candidate, stats, kept, current.stats)
            if kept:
                current = Point(candidate, stats, row)
                path.append(current)
        self.paths[name] = path

    def _start_block(self, move: Move) -> int:
        if move.kind not in ("float", "trim") or not move.floats:
            return -1
        blocks = [self.qmodel.site_by_name[s].block for s in move.floats]
        if any(b is None for b in blocks):
            return -1
        return min(blocks)

    # -- candidate moves ---------------------------------------------------------------
    def _estimates(self, only: pd.DataFrame, all_but: pd.DataFrame | None) -> dict[str, float]:
        """Estimated objective gain of keeping each site float: its ``all-but`` gain when
        that table exists, else its ``only`` damage (first order: damages add up)."""
        metric = "kl" if self.objective == "kl" else "logit_mse"
        if all_but is not None and metric in all_but:
            base = float(all_but.attrs.get("baseline", {}).get(metric, all_but[metric].max()))
            return {r["candidate"]: base - float(r[metric]) for _, r in all_but.iterrows()}
        if metric not in only:
            metric = "kl"
        return {r["candidate"]: float(r[metric]) for _, r in only.iterrows()}

    def _unchanged(self, move: Move, config: QuantConfig) -> bool:
        """Every site ``move`` changes already runs in its target format in ``config`` (over
        formats: the move changes no site, each having left the format it had when the move
        was made, :meth:`analysis.format_moves.FormatMoves.precise`)."""
        if self.format_moves is not None:
            return move.make(config).to_dict() == config.to_dict()
        return all(format_name(config, self.qmodel.site_by_name[s]) == move.target for s in move.floats)

    def _floats(self, config: QuantConfig, estimates: dict[str, float]) -> list[Move]:
        """Float moves ordered by estimated gain per unit of cost (largest first); over
        formats, the more precise format moves (analysis.format_moves)."""
        if self.format_moves is not None:
            return [Move(m.change, "float", m.make, m.estimate, m.sites, m.fmt)
                    for m in self.format_moves.precise(config, estimates, self.cost)]
        int8 = [s for s in config.int8_sites(self.sites) if s.name in estimates]
        groups: dict[str, list[str]] = {}
        for kind, label in (("residual", "all residual adds"), ("matmul_av", "all matmul_av")):
            members = [s.name for s in int8 if s.kind == kind]
            if len(members) > 1:
                groups[label] = members
        for b in sorted({s.block for s in int8 if s.block is not None}):
            groups[f"block {b}"] = [s.name for s in int8 if s.block == b]
        groups.update({s.name: [s.name] for s in int8})
        moves = []
        for label, members in groups.items():
            gain = sum(max(estimates[m], 0.0) for m in members)
            extra = config.with_float(members)
            cost = self.cost(extra) - self.cost(config)
            moves.append(Move(f"float {label}", "float", lambda c, m=tuple(members): c.with_float(m),
                              gain / max(cost, 1e-3), tuple(members)))
        return sorted(moves, key=lambda m: -m.estimate)

    def _remedies(self, config: QuantConfig, only: pd.DataFrame, worst_sites: int) -> list[Move]:
        """Cheap remedies, tried before any float fallback."""
        moves = [Move(f"activation observer {obs} everywhere", "remedy",
                      lambda c, o=obs: _with(c, activation=replace(c.activation, observer=o)))
                 for obs in ("percentile", "mse", "entropy") if obs != config.activation.observer]
        if any(s.kind == "matmul_av" for s in config.int8_sites(self.sites)):
            moves.append(Move("softmax probabilities (matmul_av input): fixed range [0, 1]", "remedy",
                              lambda c: _override(c, "*.matmul_av", "probs", observer="unit")))
        norms = self._smoothable_norm_patterns()
        for alpha in SMOOTH_ALPHAS if norms else ():
            moves.append(Move(f"SmoothQuant scale migration into the Linear weights, alpha {alpha:g}", "remedy",
                              lambda c, a=alpha: _with(c, smooth={p: a for p in norms})))
        if any(s.kind == "linear" for s in config.int8_sites(self.sites)):
            moves.append(Move("bias correction of every int8 Linear", "remedy",
                              lambda c: _with(c, bias_correction=["*"])))
        int8 = {s.name for s in config.int8_sites(self.sites)}
        ranked = only.sort_values("kl", ascending=False)["candidate"] if "kl" in only else only["candidate"]
        for name in [n for n in ranked if n in int8][:worst_sites]:
            for obs in ("percentile", "mse"):
                moves.append(Move(f"{name}: activation observer {obs}", "remedy",
                                  lambda c, n=name, o=obs: _override(c, n, "activation", observer=o)))
        return moves

    def _smoothable_norm_patterns(self) -> list[str]:
        """Globs naming every LayerNorm whose output feeds Linear sites (``*.layernorm_after``):
        short enough to read in plan.yaml, whatever the family calls its norms."""
        consumers = self.qmodel.family.norm_consumers(self.qmodel.model, self.sites)
        return sorted({"*." + name.rsplit(".", 1)[-1] for name, linears in consumers.items() if linears})

    # -- results -----------------------------------------------------------------------
    def steps_table(self) -> pd.DataFrame:
        """References and every kept point of every path, frontier points marked."""
        on_frontier = {id(p.row) for p in self.frontier}
        rows = [dict(r, on_frontier=id(r) in on_frontier, plan=r is self.chosen.row)
                for r in self.tried if r["kept"]]
        return pd.DataFrame(rows)

    def tried_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.tried)

    def confirm(self, mixed_2_float: list[str] | None = None) -> pd.DataFrame:
        """FP32, the reference presets and the plan on the confirm images, each with the
        paired-bootstrap interval of its objective gain over the best reference preset."""
        if self.confirm_runner is None:
            raise ValueError("no confirm images")
        fp32 = self.measure(None, confirm=True)
        configs = {"fp32": None, **{n: preset(n, self.sites, mixed_2_float) for n in REFERENCES},
                   "plan": self.plan_config}
        stats = {name: self.measure(cfg, confirm=True) for name, cfg in configs.items()}
        best = stats[self.best_reference]
        rows = []
        for name, cfg in configs.items():
            gain = self.compare(stats[name], best) if name != "fp32" else {}
            rows.append({"config": name, **self.row(cfg, stats[name], fp32),
                         **{f"{k}_vs_best_reference": v for k, v in gain.items()}})
        self.confirm_rows = rows
        self.confirm_paired = {n: self.compare_paired(stats["plan"], stats[n]) for n in REFERENCES}
        self.confirm_decisions = self.budget.decisions(stats["plan"], fp32)
        return pd.DataFrame(rows)

    # -- deciding on further images ------------------------------------------------------
    def decide_points(self, neighbours: int = 2) -> list[Point]:
        """What the decide stage tests, in its fixed order: the plan, then up to
        ``neighbours`` cheaper frontier points, the nearest first, that qualify as the plan
        did except for the budget's decision (not shown to violate it, and beat the presets
        at no higher cost when the plan does)."""
        plan = self.chosen
        if self.outcome == "not met":
            return [plan]
        strict = self.budget.beat_references and self.feasible(plan, undecided=True)
        ok = (lambda p: self.feasible(p, undecided=True)) if strict else (lambda p: self.budget_outcome(p) != "not met")
        cheaper = [p for p in reversed(self.frontier) if p.row["cost"] < plan.row["cost"] and p is not plan and ok(p)]
        return [plan, *cheaper[:neighbours]]

    def settle(self, points: list[Point], chosen: int | None, decisions: list[Decision], images: int) -> None:
        """The decide stage's result: ``chosen`` (position in ``points``, None when the plan
        is not met there) and the final ``decisions`` of the plan (or of the chosen point)
        on ``images`` further images. A met point becomes the plan ("met", or "budget only"
        when the presets were to be beaten and it does not beat them); otherwise the plan
        stays, "undecided" or "not met" as decided there."""
        self.decide_images, self.decided = images, decisions
        self.search_outcome, self.search_chosen = self.outcome, self.chosen
        point = points[0] if chosen is None else points[chosen]
        outcome = overall(decisions)
        if outcome == "met":
            beats = not self.budget.beat_references or (self.beats_references(point) and self.cost_ok(point))
            outcome = "met" if beats else "budget only"
        self.outcome = outcome
        self._set_chosen(point)

    def verdict(self) -> str:
        """Budget met or not (on the decide images when that stage ran, else on the plan
        images), at which point, float sites; each explicit budget's estimate, one-sided
        bound, decision and images needed; the plan against every reference preset on
        the confirm images."""
        c = self.chosen.row
        decide_images = getattr(self, "decide_images", None)
        where = (f"{decide_images} further images (sequential test)" if decide_images is not None
                 else f"{len(self.runner)} plan images")
        how = {"met": "met with 95 % confidence on",
               "budget only": "NOT met (the explicit budget alone is met) on",
               "undecided": "UNDECIDED on",
               "matches best reference": "NOT met on",
               "not met": "NOT met on"}[self.outcome]
        beats = self.budget.beat_references and self.feasible(self.chosen, undecided=True)
        matches = self.budget.beat_references and not beats and self.matches_best(self.chosen)
        open_ = ("the cheapest point not shown to violate it"
                 + (" that beats every reference preset at no higher cost" if beats else "")
                 + (f" whose {self.objective} equals the most accurate preset's ({self.best_reference}) within the noise"
                    if matches else ""))
        who = {"met": "the plan", "budget only": "the plan, the cheapest point meeting the explicit budget",
               "undecided": f"the plan, {open_}",
               "matches best reference": f"no measured point; the plan is the cheapest point whose {self.objective} "
                                         f"equals the most accurate preset's ({self.best_reference}) within the noise",
               "not met": f"no measured point; the plan is the lowest-{self.objective} point"}[self.outcome]
        if decide_images is not None:  # the outcome is the decide stage's; the search's stays beside it
            who = ("the plan" + ("" if self.chosen is self.search_chosen else
                                 f", a cheaper frontier point than the search's choice (attempt "
                                 f"{self.search_chosen.row['attempt']})")
                   + f" (on the plan images the search's outcome: {self.search_outcome})")
        text = (f"Budget ({self.budget.describe()}) {how} {where} by {who}"
                f" (attempt {c['attempt']}, {c['change']}): {c['skipped_sites']} sites kept float beyond the "
                f"backend-float kinds, {self.describe_cost(c['cost'])}, "
                f"int8 share of matmul MACs {c['int8_macs_share']:.1f} %, KL {c['kl']:.4g}, "
                f"agreement {c['agreement']:.2f} %, top-1 drop {c['top1_drop']:.2f} +- {c['top1_drop_se']:.2f} pp (SE).")
        if self.budget.explicit:
            text += f" On the {len(self.runner)} plan images: {_decisions_text(self.budget.decisions(self.chosen.stats, self.fp32))}."
            if decide_images is not None:
                text += f" On {decide_images} further images: {_decisions_text(self.decided)}."
        if self.outcome != "met" and self.budget.beat_references and not self.feasible(self.chosen, undecided=True):
            text += " " + self._why_not()
        rows = {r["config"]: r for r in getattr(self, "confirm_rows", [])}
        if rows:
            p = rows["plan"]
            paired = getattr(self, "confirm_paired", {})
            by = {v: [n for n in REFERENCES if paired.get(n) == v] for v in ("better", "within the noise", "worse")}
            if len(by["better"]) == len(REFERENCES):
                said = (f"better than every reference preset ({self.objective} lower beyond the paired noise, "
                        "agreement not lower beyond it)")
            else:
                said = "; ".join(f"{v} than {', '.join(ns)}" if v != "within the noise" else f"within the noise of {', '.join(ns)}"
                                 for v, ns in by.items() if ns)
                said = f"NOT better than every reference preset (paired 95 % intervals: {said})"
            b = rows[self.best_reference]
            text += (f" On {p['images']} confirm images the plan is {said}"
                     f"; against the best reference preset {self.best_reference}: KL {p['kl']:.4g} vs {b['kl']:.4g}, "
                     f"agreement {p['agreement']:.2f} vs {b['agreement']:.2f} %, {p['skipped_sites']} vs "
                     f"{b['skipped_sites']} sites kept float, int8 MAC share {p['int8_macs_share']:.1f} vs "
                     f"{b['int8_macs_share']:.1f} %, cost {p['cost']:.4g} vs {b['cost']:.4g} {self.cost_unit()}.")
            if self.budget.explicit and getattr(self, "confirm_decisions", None):
                text += f" Budget on the confirm images: {_decisions_text(self.confirm_decisions)}."
        if not self.budget.within_caps(c):
            text += (f" The plan is OVER the cost caps (no measured point within them qualified): BitOps "
                     f"{c['bitops']:.4g} % of all's, weights {c['weight_mb']:.4g} MB.")
        return text

    def cost_unit(self) -> str:
        if self.cost_kind is not None:
            return EXACT_COSTS[self.cost_kind]
        return "ms/batch (measured)" if self.unit_costs is not None else "(% float MACs + residual charge)"

    def describe_cost(self, cost: float) -> str:
        if self.unit_costs is None:
            return f"cost {cost:.3g} {self.cost_unit()}"
        return f"predicted latency {cost:.4g} ms per batch (noise {self.cost_noise:.2g} ms)"

    def _why_not(self) -> str:
        """Why no measured point beats the presets at their cost, in numbers: the best
        point within their cost, and the cheapest point that beats them in quality."""
        points = [p for path in self.paths.values() for p in path]
        within = [p for p in points if self.cost_ok(p)]
        better = [p for p in points if self.quality_ok(p)]
        refs = self.references.values()
        parts = [f"Reference presets: " + "; ".join(
            f"{n} KL {r.row['kl']:.4g}, agreement {r.row['agreement']:.2f} %, {r.row['skipped_sites']} float sites, "
            f"int8 MAC share {r.row['int8_macs_share']:.1f} %, {self.describe_cost(r.row['cost'])}"
            for n, r in self.references.items()) + "."]
        if within:
            b = min(within, key=lambda p: p.row[self.objective])
            parts.append(f"Best measured point within their cost (attempt {b.row['attempt']}): KL {b.row['kl']:.4g}, "
                         f"agreement {b.row['agreement']:.2f} %.")
        if better:
            b = min(better, key=lambda p: p.row["cost"])
            parts.append(f"Cheapest point that beats them in quality (attempt {b.row['attempt']}): "
                         f"{b.row['skipped_sites']} float sites, int8 MAC share {b.row['int8_macs_share']:.1f} %, "
                         f"{self.describe_cost(b.row['cost'])}.")
        else:
            parts.append(f"No measured point beats them all in quality ({len(points)} points measured;"
                         f" max worst-case agreement lead {max((p.row['agreement'] - max(r.row['agreement'] for r in refs)) for p in points):.2f} pp).")
        return " ".join(parts)


def _decisions_text(decisions: list[Decision]) -> str:
    return "; ".join(d.describe() for d in decisions)


def pareto(points: list[Point], objective: str = "kl") -> list[Point]:
    """Points not dominated in (cost, objective), cheapest first: along the result
    the objective strictly falls as the cost rises."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.row["cost"], p.row[objective])):
        if not front or p.row[objective] < front[-1].row[objective]:
            front.append(p)
    return front


def _with(config: QuantConfig, **changes) -> QuantConfig:
    return replace(copy.deepcopy(config), **changes)


def _override(config: QuantConfig, pattern: str, part: str, **changes) -> QuantConfig:
    new = copy.deepcopy(config)
    new.overrides.setdefault(pattern, {}).setdefault(part, {}).update(changes)
    return new
