"""Accuracy budgets decided from per-image paired values: met, not met, or undecided
with the images that would decide it; fixed-sample and sequential (streamed batches).

Per-image values, one per image, FP32 and the config measured on the same images
(``analysis.metrics.OutputStats`` arrays):

=============  =====================================  ======  =====================
kind           per-image value                        unit    budget
=============  =====================================  ======  =====================
``top1_drop``  FP32 correct - config correct (-1/0/1)  pp      upper (drop <= b)
``agreement``  config top-1 == FP32 top-1 (0/1)        %       lower (agreement >= b)
``kl``         KL(FP32 || config), nats                nats    upper (KL <= b)
=============  =====================================  ======  =====================

**Fixed-sample rule** (:func:`decide`). With the mean ``m`` of the values and its
standard error ``SE = sd / sqrt(n)`` (``sd`` the per-image standard deviation), for an
upper budget ``b``: *met* when ``m + z SE <= b``, *not met* when ``m - z SE > b``, else
*undecided*; ``z = 1.645``, the one-sided 95 % normal quantile (a lower budget mirrors
this). Each of the two claims is wrong at most 5 % of the time, up to the normal
approximation (simulated with the true drop on the budget, 1000 images, 6 % discordance:
5.2-5.7 % of 2000 draws; a drop above the budget is called met less often). For the top-1 drop the
per-image variance is ``p_disc - d**2`` (``p_disc``: the share of images whose FP32 and
config correctness differ, ``d``: the drop), the normal approximation of McNemar's
paired test. For the two 0/1-step kinds (top-1 drop, agreement) the variance is taken
as at least that of three discordant images in ``n`` (``3/n (1 - 3/n)``): with none
observed the one-sided 95 % bound on a rate is about ``3/n`` (the rule of three), so a
clean sample never proves more than its size allows.

**Images needed** when undecided: the ``n`` at which a fixed-sample test at the same
``z`` decides with probability :data:`POWER` (80 %) if the true value equals the
current estimate, ``n = ((z + z_power) sd / |m - b|)**2`` (``z_power = 0.842``); for
the top-1 drop ``sd**2 = p_disc - d**2`` from the measured discordance. An estimate on
the budget needs infinitely many images: past :data:`IMAGE_CAP` the decision says it
cannot be decided.

**Sequential rule** (:class:`SequentialBudget`): batches of further images are streamed
in and the test stops at the first decision. Testing at ``z = 1.645`` at every look would
raise the error of each claim well above 5 % (tests/test_budget.py shows it); instead a
group-sequential design with ``looks`` equally spaced looks up to ``max_images`` spends
the 5 % over the looks with the Lan-DeMets O'Brien-Fleming-type spending function
``alpha(t) = 2 - 2 Phi(z_{alpha/2} / sqrt(t))`` (t: the share of ``max_images``
measured), the critical values found by the recursive numerical integration of Armitage,
McPherson and Rowe (Lan & DeMets 1983, Biometrika 70:659; Jennison & Turnbull 2000,
*Group Sequential Methods with Applications to Clinical Trials*, ch. 7 and 19). Early
looks need overwhelming evidence, the last little more than one fixed test (10 looks:
z = 6.09 at the first, 1.79 at the last; 1.645 without looks); each claim's boundary is
computed on its own (non-binding), so each stays wrong at most 5 % of the time under
optional stopping.

**Several candidates** (the plan and its cheaper neighbours, measured on the same further
images): a fixed-sequence procedure keeps the 5 %. The candidates are tested in an order
set before the images are seen (the plan, then ever cheaper ones), each at the full 5 %,
and testing stops at the first one not shown met; only the ones before it are called met
(Maurer, Hothorn and Lehmacher 1995; Westfall and Krishen 2001). A candidate that violates
the budget is called met only if every test before it and its own went wrong, so the chance
of calling any violating candidate met stays at most 5 % (:func:`overall` joins the
budgets of one candidate: all of them must be met).

numpy only, no torch: the planner passes its per-image arrays in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

ALPHA = 0.05  # error rate of each claim ("met", "not met")
POWER = 0.80  # probability with which the images-needed figure decides, at the current estimate
IMAGE_CAP = 1_000_000  # beyond this many images a budget "cannot be decided"
MAX_LOOKS = 100  # looks of one sequential test (the integration grid grows with them)
OUTCOMES = ("met", "not met", "undecided")


@dataclass(frozen=True)
class Kind:
    """One kind of budget: what a per-image value is and which side the budget bounds."""

    name: str
    label: str  # what a person reads: "top-1 drop"
    unit: str  # of estimates and budgets: "pp", "%", "" (KL in nats)
    scale: float  # per-image value -> unit (100 for pp and %)
    upper: bool  # the budget is an upper limit (drop, KL) or a lower one (agreement)
    allowed: tuple[float, ...] | None  # the only per-image values possible, None = any finite

    def format(self, value: float) -> str:
        return f"{value:.3g}" if self.unit == "" else f"{value:.2f} {self.unit}"


KINDS = {k.name: k for k in (
    Kind("top1_drop", "top-1 drop", "pp", 100.0, True, (-1.0, 0.0, 1.0)),
    Kind("agreement", "agreement", "%", 100.0, False, (0.0, 1.0)),
    Kind("kl", "KL", "", 1.0, True, None),
)}


def kind_of(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown budget kind {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


# -- normal distribution (math.erfc; numpy has none) ----------------------------------
_erfc = np.frompyfunc(math.erfc, 1, 1)


def norm_sf(x):
    """P(Z > x) for a standard normal Z (array or scalar)."""
    return np.asarray(_erfc(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)), dtype=np.float64) / 2.0


def norm_isf(p: float) -> float:
    """The x with P(Z > x) = p, by bisection (p in (0, 1))."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a tail probability must lie in (0, 1), got {p}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erfc(mid / math.sqrt(2.0)) / 2 > p else (lo, mid)
    return (lo + hi) / 2


def conditional_power(gains: np.ndarray, n_total: int, *, need: str = "above", level: float = 0.95) -> float:
    """Probability that a paired test made on ``n_total`` images ends as ``need`` asks, given
    the per-image gains of its first ``len(gains)`` images and the trend they show (the rest
    of the images' mean gain equal to the mean so far; normal approximation; stochastic
    curtailment). ``need``: ``"above"``, the final two-sided ``level`` interval of the mean gain
    lies above 0 (the planner keeps a move); ``"not_below"``, its upper end reaches 0 (equal
    within the noise). 1 or 0 when no image is left to measure."""
    d = np.asarray(gains, dtype=np.float64)
    k = len(d)
    if need not in ("above", "not_below"):
        raise ValueError(f"need: 'above' or 'not_below', not {need!r}")
    if k == 0:
        return 1.0
    z = norm_isf((1.0 - level) / 2.0)  # two-sided critical value (1.96 at 95 %)
    s = float(d.std(ddof=1)) if k > 1 else 0.0
    m, total = float(d.mean()), float(d.sum())
    rest = n_total - k
    if rest <= 0 or s == 0.0:
        final = total / max(n_total, k) if rest <= 0 else m
        half = z * s / math.sqrt(max(n_total, k))
        ok = final - half > 0 if need == "above" else final + half >= 0
        return 1.0 if ok else 0.0
    # the final sum must exceed this: n * (mean - z se) > 0, or n * (mean + z se) >= 0
    bar = z * s * math.sqrt(n_total) * (1 if need == "above" else -1)
    return float(norm_sf((bar - total - rest * m) / (s * math.sqrt(rest))))


Z_ONE_SIDED = norm_isf(ALPHA)  # 1.645
Z_POWER = norm_isf(1.0 - POWER)  # 0.842


# -- sufficient statistics --------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """Count, mean and sum of squared deviations of per-image values; ``+`` pools two
    samples exactly (Chan et al.'s update), so streamed batches need not be kept."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: np.ndarray) -> "Sample":
        v = np.asarray(values, dtype=np.float64)
        if len(v) == 0:
            return cls()
        mean = float(v.mean())
        return cls(len(v), mean, float(((v - mean) ** 2).sum()))

    def __add__(self, other: "Sample") -> "Sample":
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        return Sample(n, self.mean + delta * other.n / n, self.m2 + other.m2 + delta ** 2 * self.n * other.n / n)

    @property
    def var(self) -> float:
        """Per-image variance (divided by n: for the top-1 drop exactly p_disc - d**2)."""
        return self.m2 / self.n if self.n else 0.0


def per_image(kind: Kind, values) -> np.ndarray:
    """``values`` as a float64 1-D array, checked against what the kind allows."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{kind.label}: per-image values must be a 1-D array, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{kind.label}: {int((~np.isfinite(v)).sum())} per-image value(s) are NaN/Inf "
                         "(top-1 without labels?)")
    if kind.allowed is not None and not np.isin(v, kind.allowed).all():
        raise ValueError(f"{kind.label}: per-image values must be in {{{', '.join(f'{a:g}' for a in kind.allowed)}}}"
                         f" (per image, not percentages), got {sorted(set(v.tolist()) - set(kind.allowed))[:3]}")
    return v


def _sd(kind: Kind, sample: Sample) -> float:
    """Per-image standard deviation, with the rule-of-three floor for 0/1-step kinds."""
    var = sample.var
    if kind.allowed is not None and sample.n > 0:
        rate = min(3.0 / sample.n, 0.5)
        var = max(var, rate * (1.0 - rate))
    return math.sqrt(var)


# -- decisions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """The outcome of one budget on ``images`` images. ``estimate``, ``lower``, ``upper``
    and ``budget`` are in the kind's unit (pp, %, nats); ``lower``/``upper`` are the
    one-sided bounds at critical value ``z`` (95 % each); ``images_needed`` only when
    undecided (None there too when more than IMAGE_CAP images would be needed)."""

    kind: str
    budget: float
    outcome: str
    estimate: float
    lower: float
    upper: float
    z: float
    images: int
    images_needed: int | None = None

    @property
    def decided(self) -> bool:
        return self.outcome != "undecided"

    @property
    def shows_upper(self) -> bool:
        """Whether :attr:`bound` is the upper one-sided bound."""
        return KINDS[self.kind].upper != (self.outcome == "not met")

    @property
    def bound(self) -> float:
        """The one-sided bound that decides: the one that would show the budget met (upper
        for an upper budget), unless it was shown not met (then the other one)."""
        return self.upper if self.shows_upper else self.lower

    def to_dict(self) -> dict:
        """The decision's fields, its ``bound`` and its one-line ``text`` (artefact meta)."""
        return {**asdict(self), "bound": self.bound, "text": self.describe()}

    def describe(self) -> str:
        """One line, e.g. "top-1 drop 0.42 pp, 95 % upper bound 1.61 pp > 0.30 pp:
        undecided at 256 images; ~3,900 images would decide it"."""
        kind = KINDS[self.kind]
        level = f"{100 * (1 - ALPHA):g} %"
        show_upper, bound = self.shows_upper, self.bound
        inside = bound <= self.budget if kind.upper else bound >= self.budget
        sign = ("<=" if kind.upper else ">=") if inside else (">" if kind.upper else "<")
        line = (f"{kind.label} {kind.format(self.estimate)}, {level} {'upper' if show_upper else 'lower'} bound "
                f"{kind.format(bound)} {sign} {kind.format(self.budget)}: {self.outcome} at {self.images:,} images")
        if self.outcome != "undecided":
            return line
        if self.images_needed is None:
            return f"{line}; cannot be decided (the estimate sits on the budget: more than {IMAGE_CAP:,} images)"
        return f"{line}; ~{round2(self.images_needed):,} images would decide it"


def round2(n: int) -> int:
    """``n`` rounded up to two significant digits (3,871 -> 3,900): how an images-needed
    figure is shown (it is an estimate)."""
    step = 10 ** max(0, len(str(n)) - 2)
    return -(-n // step) * step


def images_needed(sd: float, estimate: float, budget: float, z: float = Z_ONE_SIDED,
                  power: float = POWER) -> int | None:
    """Images at which a fixed-sample one-sided test at critical value ``z`` decides
    (met or not met) with probability ``power`` if the true per-image mean is
    ``estimate`` with per-image sd ``sd`` (same units); None beyond IMAGE_CAP."""
    gap = abs(estimate - budget)
    if gap == 0.0:
        return None
    n = ((z + norm_isf(1.0 - power)) * sd / gap) ** 2
    return None if n > IMAGE_CAP else max(1, math.ceil(n))


def judge(kind_name: str, sample: Sample, budget: float, z: float = Z_ONE_SIDED) -> Decision:
    """The decision from a sample's sufficient statistics (see the module docstring)."""
    kind = kind_of(kind_name)
    if sample.n == 0:
        raise ValueError(f"{kind.label}: no image was measured")
    se = _sd(kind, sample) / math.sqrt(sample.n)
    b = budget / kind.scale
    lower, upper = sample.mean - z * se, sample.mean + z * se
    if kind.upper:
        outcome = "met" if upper <= b else "not met" if lower > b else "undecided"
    else:
        outcome = "met" if lower >= b else "not met" if upper < b else "undecided"
    needed = images_needed(_sd(kind, sample), sample.mean, b, z) if outcome == "undecided" else None
    s = kind.scale
    return Decision(kind.name, budget, outcome, s * sample.mean, s * lower, s * upper, z, sample.n, needed)


def overall(decisions: list[Decision]) -> str:
    """One outcome for several budgets that must all hold: "not met" when one is shown not
    met, else "undecided" when one is undecided, else "met" (also for no budget)."""
    outcomes = {d.outcome for d in decisions}
    return "not met" if "not met" in outcomes else "undecided" if "undecided" in outcomes else "met"


def decide(kind_name: str, values, budget: float) -> Decision:
    """Fixed-sample decision of one budget from per-image values (see the module
    docstring): ``decide("top1_drop", fp32.array("top1") - stats.array("top1"), 0.3)``."""
    kind = kind_of(kind_name)
    return judge(kind.name, Sample.of(per_image(kind, values)), budget)


# -- the sequential test --------------------------------------------------------------------
_BOUNDS: dict[tuple[int, float], tuple[float, ...]] = {}


def obrien_fleming_bounds(looks: int, alpha: float = ALPHA) -> tuple[float, ...]:
    """One-sided critical values z_1..z_K of ``looks`` equally spaced looks whose
    crossing probabilities under the null sum to ``alpha``, spent by the Lan-DeMets
    O'Brien-Fleming-type function; computed by numerical integration of the score
    statistic's sub-density over the continuation region (Jennison & Turnbull, ch. 19)."""
    if looks < 1:
        raise ValueError(f"looks must be at least 1, got {looks}")
    if (looks, alpha) in _BOUNDS:
        return _BOUNDS[(looks, alpha)]
    z_half = norm_isf(alpha / 2)
    times = [k / looks for k in range(1, looks + 1)]
    spent = [float(2 * norm_sf(z_half / math.sqrt(t))) for t in times]
    bounds: list[float] = []
    grid = density = weights = None
    for k, t in enumerate(times):
        step = spent[k] - (spent[k - 1] if k else 0.0)
        if k == 0:
            b = norm_isf(step) * math.sqrt(t)
        else:
            sd = math.sqrt(t - times[k - 1])
            mass = weights * density

            def crossing(bound: float) -> float:
                return float((mass * norm_sf((bound - grid) / sd)).sum())

            lo, hi = float(grid[0]), float(grid[-1]) + 40 * sd
            for _ in range(100):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if crossing(mid) > step else (lo, mid)
            b = (lo + hi) / 2
        bounds.append(b / math.sqrt(t))
        if k + 1 < looks:  # the sub-density of the score S_k = Z_k sqrt(t) below the bound
            top = min(b, 9 * math.sqrt(t))
            points = max(400, math.ceil(8 * (top + 9 * math.sqrt(t)) / math.sqrt(times[k + 1] - t)))
            new = np.linspace(-9 * math.sqrt(t), top, points)
            if k == 0:
                density = np.exp(-new ** 2 / (2 * t)) / math.sqrt(2 * math.pi * t)
            else:
                kernel = np.exp(-(new[:, None] - grid[None, :]) ** 2 / (2 * sd ** 2)) / (sd * math.sqrt(2 * math.pi))
                density = kernel @ mass
            grid = new
            weights = np.full(points, new[1] - new[0])
            weights[[0, -1]] /= 2  # trapezoid rule
    _BOUNDS[(looks, alpha)] = tuple(bounds)
    return _BOUNDS[(looks, alpha)]


class SequentialBudget:
    """One budget decided on streamed batches of further images (see the module
    docstring): looks at ``round(k * max_images / looks)`` images, k = 1..looks, each
    against its O'Brien-Fleming critical value; stops at the first decision.

    ``update(values)`` adds one batch of per-image values (a batch may span several
    looks: each is taken at its exact image count) and returns :attr:`decision`: the
    latest look's; before the first look, the images so far against the first look's
    critical value, undecided whatever the bound (``images_needed``: the first look's
    count). After a decision further batches are ignored; images
    beyond ``max_images`` are a ValueError."""

    def __init__(self, kind: str, budget: float, max_images: int, looks: int = 10) -> None:
        self.kind = kind_of(kind)
        if not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive integer, got {max_images!r}")
        if not isinstance(looks, int) or not 1 <= looks <= min(MAX_LOOKS, max_images):
            raise ValueError(f"looks must be an integer in 1..{min(MAX_LOOKS, max_images)}, got {looks!r}")
        self.budget, self.max_images = budget, max_images
        self.at = [round(k * max_images / looks) for k in range(1, looks + 1)]  # image count of each look
        self.z = obrien_fleming_bounds(looks)
        self.sample = Sample()
        self.look = 0  # looks taken
        self.decision: Decision | None = None

    def update(self, values) -> Decision:
        if self.decision is not None and self.decision.decided:
            return self.decision
        v = per_image(self.kind, values)
        if self.sample.n + len(v) > self.max_images:
            raise ValueError(f"{self.kind.label}: {self.sample.n + len(v):,} images streamed, "
                             f"more than max_images={self.max_images:,}")
        start = 0
        while self.look < len(self.at) and self.sample.n + len(v) - start >= self.at[self.look]:
            end = start + self.at[self.look] - self.sample.n
            self.sample = self.sample + Sample.of(v[start:end])
            start = end
            self.decision = judge(self.kind.name, self.sample, self.budget, self.z[self.look])
            self.look += 1
            if self.decision.decided:
                return self.decision
        self.sample = self.sample + Sample.of(v[start:])
        if self.look == 0 and self.sample.n:  # no look yet: undecided, whatever the bound says
            pending = judge(self.kind.name, self.sample, self.budget, self.z[0])
            self.decision = replace(pending, outcome="undecided", images_needed=self.at[0])
        return self.decision
