"""The planner over formats (``vitq plan --formats int8,a16w8,float``): the moves that give a
site or a group of sites another numeric format, with their estimated objective change per
cost change.

A site's estimated ``only`` KL in a format comes from the sensitivity tables: the ``only``
table (measured, or the taylor estimate) for the format the start config gives it, the
per-format taylor estimate (:func:`analysis.taylor.taylor_format_estimates`) for the others,
0 for a format that keeps it float. Two kinds of move:

- *more precise* (the planner's paths): a group (all residual adds, all ``matmul_av``, one
  block) or one site to a format of the list whose estimated KL is lower and whose cost is
  no lower, ordered by estimated KL gained per unit of cost added (``float`` as the planner's
  float fallbacks always were: every group, gain clipped at 0);
- *cheaper* (trimming): one site to the format of the list that saves cost at the least
  estimated KL lost per unit of cost saved (a float site back to int8, an int8 Linear to
  ``w4a8``, ...), least harm per saving first.

``float`` moves go to the skip-list (``float_sites``), the others to per-site ``formats``
entries, so a plan that only keeps sites float still reads as a skip-list. With the list
``int8,float`` the moves are the planner's float fallbacks and trims exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable

from quant.config import QuantConfig
from quant.formats import FORMATS, get_format
from quant.sites import Site

FLOAT = "float"
MIN_COST = 1e-3  # a cost change below this counts as this much (free moves order by gain alone)


@dataclass
class FormatChange:
    """One move: ``sites`` to format ``fmt``; ``estimate`` orders the moves (KL gained per
    cost added for a more precise move, KL lost per cost saved for a cheaper one)."""

    change: str  # what a person reads: "a16w8 all residual adds", "float blocks.1.mlp.fc2", "int8 head"
    sites: tuple[str, ...]
    fmt: str
    estimate: float
    make: Callable[[QuantConfig], QuantConfig]


def parse_formats(text: str, minimum: int = 2) -> list[str]:
    """``int8,a16w8,float`` -> the format names in the order given, checked against the
    registry (a one-line ValueError naming the known ones); at least ``minimum`` of them
    (the planner needs two to choose between)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ValueError(f"--formats: unknown format(s) {', '.join(unknown)}; formats are {', '.join(FORMATS)}")
    if len(names) < minimum:
        raise ValueError(f"--formats {text!r}: give at least {minimum} format(s)"
                         + (" to choose between (e.g. int8,a16w8,float)" if minimum > 1 else ""))
    return names


def only_int8_and_float(formats: list[str] | None) -> bool:
    """The planner's choice before formats: int8 or float (None: the default)."""
    return formats is None or set(formats) <= {"int8", FLOAT}


def format_name(config: QuantConfig, site: Site) -> str:
    """The format ``config`` runs ``site`` in: ``float`` when every tensor stays float."""
    return FLOAT if config.is_float(site) else config.format_of(site).name


def quantizes_otherwise(config: QuantConfig, site: Site, fmt) -> bool:
    """Whether format ``fmt`` (a quant.formats class) quantizes ``site``, and not as ``config``
    does: a weight-only format at a site without weights keeps it float (no), ``w4a8`` at a
    matmul is its int8 (no when ``config`` runs it int8), any quantizing format at a site
    ``config`` keeps float (yes)."""
    return not fmt.keeps_float(site) and (config.is_float(site)
                                          or config.slot_specs(site, fmt) != config.slot_specs(site))


def without_float(config: QuantConfig, names: list[str], sites) -> QuantConfig:
    """``config`` with the sites ``names`` back in int8: a pattern matching one of them is
    replaced by the other sites it matches, every other pattern is kept as written."""
    drop = set(names)
    kept: list[str] = []
    for pattern in config.float_sites:
        probe = replace(config, float_sites=[pattern], float_kinds=[])
        matched = [s.name for s in sites if probe.is_float(s)]
        if drop & set(matched):
            kept += [n for n in matched if n not in drop]
        else:
            kept.append(pattern)
    return replace(copy.deepcopy(config), float_sites=list(dict.fromkeys(kept)))


def with_format(config: QuantConfig, names: list[str], fmt: str, sites: list[Site]) -> QuantConfig:
    """``config`` with the sites ``names`` in format ``fmt``: ``float`` adds them to the
    skip-list; another format takes them off it and gives each a ``formats`` entry of its
    own, written last so that it wins over any glob (none when the format is already theirs)."""
    if fmt == FLOAT:
        return config.with_float(names)
    by_name = {s.name: s for s in sites}
    new = without_float(config, names, sites)
    formats = {k: v for k, v in new.formats.items() if k not in names}
    probe = replace(new, formats=formats)
    formats.update({n: fmt for n in names if probe.format_of(by_name[n]).name != fmt})
    return replace(new, formats=formats)


class FormatMoves:
    """The moves over ``formats`` (names of :mod:`quant.formats`), from the per-format
    estimates ``table`` ((site, format) -> estimated ``only`` KL, nats) and the start
    config (whose formats the planner's ``only`` estimates are of)."""

    def __init__(self, formats: list[str], table: dict[tuple[str, str], float], start: QuantConfig,
                 sites: list[Site]) -> None:
        for name in formats:
            get_format(name)
        self.formats, self.table, self.sites, self.start = list(formats), dict(table), sites, start
        self.start_format = {s.name: format_name(start, s) for s in sites}
        self._kept: dict[str, list[str]] = {}  # site -> _distinct(site)

    def _same(self, site: Site, a: str, b: str) -> bool:
        """Formats ``a`` and ``b`` run ``site`` alike (``w4a8`` at a matmul is int8, ``w8`` at a
        residual add float): the same slot specs, or float both."""
        def runs(fmt: str):
            f = get_format(fmt)
            return None if fmt == FLOAT or f.keeps_float(site) else self.start.slot_specs(site, f)
        return runs(a) == runs(b)

    def _distinct(self, site: Site) -> list[str]:
        """The listed formats that run ``site`` differently, the first of each alike group."""
        if site.name not in self._kept:
            kept: list[str] = []
            for fmt in self.formats:
                if not any(self._same(site, fmt, k) for k in kept):
                    kept.append(fmt)
            self._kept[site.name] = kept
        return self._kept[site.name]

    def estimate(self, site: Site, fmt: str, estimates: dict[str, float]) -> float | None:
        """Estimated ``only`` KL of ``site`` in ``fmt``: 0 when the format keeps it float, the
        planner's estimate (``estimates``, of the start config's format) for that format or one
        that runs the site alike, else the per-format table (None: not estimated)."""
        if fmt == FLOAT or get_format(fmt).keeps_float(site):
            return 0.0
        start = self.start_format[site.name]
        if fmt == start or (start != FLOAT and self._same(site, fmt, start)):
            return estimates.get(site.name, self.table.get((site.name, fmt), 0.0))
        return self.table.get((site.name, fmt))

    def _changes(self, config: QuantConfig, site: Site, fmt: str) -> bool:
        """Giving ``site`` format ``fmt`` changes what it runs (a weight-only format at a site
        without weights would keep it float: only ``float`` itself does that)."""
        now = format_name(config, site)
        if fmt == now:
            return False
        if fmt == FLOAT:
            return True
        return quantizes_otherwise(config, site, get_format(fmt))

    def _apply(self, config: QuantConfig, was: dict[str, str], fmt: str) -> QuantConfig:
        """``config`` with the sites of ``was`` that still run in the format they had when the
        move was made (``was``) in ``fmt``: a path applies its moves to later points, where a
        site a move named may have changed since (all residual adds float, then one of them to
        a16w8 would be a step back). No site left: ``config`` unchanged."""
        by_name = {s.name: s for s in self.sites}
        return with_format(config, [n for n, f in was.items() if format_name(config, by_name[n]) == f], fmt, self.sites)

    def precise(self, config: QuantConfig, estimates: dict[str, float],
                cost: Callable[[QuantConfig], float]) -> list[FormatChange]:
        """More precise moves from ``config``, largest estimated gain per cost first."""
        quantized = [s for s in config.int8_sites(self.sites) if s.name in estimates]
        groups: dict[str, list[Site]] = {}
        for kind, label in (("residual", "all residual adds"), ("matmul_av", "all matmul_av")):
            members = [s for s in quantized if s.kind == kind]
            if len(members) > 1:
                groups[label] = members
        for b in sorted({s.block for s in quantized if s.block is not None}):
            groups[f"block {b}"] = [s for s in quantized if s.block == b]
        groups.update({s.name: [s] for s in quantized})
        here = cost(config)
        moves = []
        for fmt in self.formats:
            for label, members in groups.items():
                changed = [s for s in members if fmt in self._distinct(s) and self._changes(config, s, fmt)]
                if not changed:
                    continue
                now = [self.estimate(s, format_name(config, s), estimates) for s in changed]
                new = [self.estimate(s, fmt, estimates) for s in changed]
                if None in now or None in new:
                    continue
                names = tuple(s.name for s in changed)
                was = {s.name: format_name(config, s) for s in changed}
                extra = cost(with_format(config, list(names), fmt, self.sites)) - here
                if fmt == FLOAT:  # the planner's float fallbacks: every group, gain clipped at 0
                    gain = sum(max(v, 0.0) for v in now)
                else:
                    gain = sum(now) - sum(new)
                    if gain <= 0 or extra < 0:  # not more precise (a cheaper format is a trim)
                        continue
                moves.append(FormatChange(f"{fmt} {label}", names, fmt, gain / max(extra, MIN_COST),
                                          lambda c, w=was, f=fmt: self._apply(c, w, f)))
        return sorted(moves, key=lambda m: -m.estimate)

    def cheaper(self, config: QuantConfig, estimates: dict[str, float],
                cost: Callable[[QuantConfig], float]) -> list[FormatChange]:
        """One move per site whose format can be made cheaper: to the format of the list that
        loses the least estimated KL per unit of cost saved; least harm per saving first."""
        here = cost(config)
        moves = []
        for site in self.sites:
            if site.kind in config.float_kinds:
                continue
            now = self.estimate(site, format_name(config, site), estimates)
            options = []
            for fmt in self._distinct(site):
                if not self._changes(config, site, fmt):
                    continue
                new = self.estimate(site, fmt, estimates)
                saving = here - cost(with_format(config, [site.name], fmt, self.sites))
                if saving <= 0 or new is None or now is None:
                    continue
                options.append((max(new - now, 0.0) / saving, -saving, fmt))
            if options:
                harm, _, fmt = min(options)
                was = {site.name: format_name(config, site)}
                moves.append(FormatChange(f"{fmt} {site.name}", (site.name,), fmt, harm,
                                          lambda c, w=was, f=fmt: self._apply(c, w, f)))
        return sorted(moves, key=lambda m: m.estimate)
