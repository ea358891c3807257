"""QuantConfig: which sites are int8, how, and which stay float.

A config is data (YAML/JSON round-trip): default specs for activations and weights,
per-site overrides by name or glob, float kinds (the backend's limits: LayerNorm,
GELU and Softmax by default) and a float skip-list of names or globs. A pattern is
matched against each site's canonical name (``blocks.4.mlp.fc2``, the same for one
architecture in every library; what written configs use) and against its module path
in the installed library (``vit.layers.4.mlp.fc2``), so a path names the canonical
site it belongs to. Every pattern must match at least one site of the model it is
applied to, so a typo fails loudly.
Two remedies are options too: ``smooth`` (LayerNorm -> alpha, SmoothQuant-style
scale migration, :mod:`quant.smooth`) and ``bias_correction`` (Linear sites whose
bias absorbs their expected quantization shift, :mod:`quant.bias_correction`).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

import yaml

from .observers import check_observer
from .quantizer import QuantSpec
from .sites import KINDS, SLOTS, Site
from .store import atomic_write_text

BACKEND_FLOAT_KINDS = ("layernorm", "gelu", "softmax")
ACTIVATION_SLOTS = tuple(sorted({s for slots in SLOTS.values() for s in slots} - {"weight"}))


class ConfigError(ValueError):
    """A QuantConfig that cannot be applied (bad YAML, unknown key, site or observer)."""


def _spec(data: dict[str, Any] | None, base: QuantSpec, where: str) -> QuantSpec:
    data = dict(data or {})
    known = {f.name for f in fields(QuantSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    try:
        spec = replace(base, **data)
        check_observer(spec.observer)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return spec


@dataclass
class QuantConfig:
    name: str = "custom"
    activation: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, symmetric=False, observer="minmax"))
    weight: QuantSpec = field(
        default_factory=lambda: QuantSpec(bits=8, symmetric=True, per_channel=True, observer="minmax"))
    float_kinds: list[str] = field(default_factory=lambda: list(BACKEND_FLOAT_KINDS))
    float_sites: list[str] = field(default_factory=list)
    # pattern -> {"activation": {...}, "weight": {...}}: partial specs over the defaults
    overrides: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # SmoothQuant-style scale migration: LayerNorm site name/glob -> alpha in (0, 1)
    # (quant.smooth); the norm's output must feed Linear sites (the family knows which)
    smooth: dict[str, float] = field(default_factory=dict)
    # bias correction (quant.bias_correction): Linear site names/globs whose bias absorbs
    # the expected output shift of their weight quantization
    bias_correction: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = sorted(set(self.float_kinds) - set(KINDS))
        if bad:
            raise ConfigError(f"unknown site kind(s) {bad} in float_kinds; kinds are {list(KINDS)}")
        for pattern, spec in self.overrides.items():
            extra = sorted(set(spec) - {"activation", "weight", *ACTIVATION_SLOTS})
            if extra:
                raise ConfigError(f"override {pattern!r}: unknown key(s) {extra}; use activation/weight or an "
                                  f"activation slot ({', '.join(ACTIVATION_SLOTS)})")
            for part in spec:
                base = self.weight if part == "weight" else self.activation
                _spec(spec.get(part), base, f"override {pattern!r} {part}")
        if not isinstance(self.smooth, dict):
            raise ConfigError("smooth must map LayerNorm site names/globs to alpha in (0, 1)")
        for pattern, alpha in self.smooth.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
                raise ConfigError(f"smooth {pattern!r}: alpha must be a number in (0, 1), got {alpha!r}")
        if isinstance(self.bias_correction, str) or not all(isinstance(p, str) for p in self.bias_correction):
            raise ConfigError("bias_correction must be a list of Linear site names/globs")

    # -- decisions per site ----------------------------------------------
    def is_float(self, site: Site) -> bool:
        return site.kind in self.float_kinds or any(matches(site, p) for p in self.float_sites)

    def spec_for(self, site: Site, part: str, slot: str | None = None) -> QuantSpec:
        """The spec of ``part`` ('activation' or 'weight') at ``site``; later overrides win.
        With ``slot``, an override keyed by that slot's name (e.g. ``probs``, the
        softmax input of ``matmul_av``) applies on top of the site's activation spec."""
        spec = getattr(self, part)
        keys = (part,) if slot is None or part == "weight" else (part, slot)
        for key in keys:
            for pattern, override in self.overrides.items():
                if matches(site, pattern) and key in override:
                    spec = _spec(override[key], spec, f"override {pattern!r}")
        return spec

    def slot_specs(self, site: Site) -> dict[str, QuantSpec]:
        """The spec of every slot (tensor) of ``site``."""
        return {slot: self.spec_for(site, "weight" if slot == "weight" else "activation", slot)
                for slot in site.slots}

    def int8_sites(self, sites: Iterable[Site]) -> list[Site]:
        return [s for s in sites if not self.is_float(s)]

    def validate(self, sites: list[Site]) -> None:
        """Every skip-list entry and override pattern must match a site of this model."""
        for pattern in [*self.float_sites, *self.overrides]:
            if not any(matches(s, pattern) for s in sites):
                close = _close(pattern, sites)
                hint = f"; close matches: {', '.join(close)}" if close else "; `vitq sites` lists the names"
                raise ConfigError(f"pattern {pattern!r} matches no site of this model{hint}")
        for what, patterns, kind in (("smooth", self.smooth, "layernorm"),
                                     ("bias_correction", self.bias_correction, "linear")):
            for pattern in patterns:
                if not any(matches(s, pattern) for s in sites if s.kind == kind):
                    close = _close(pattern, [s for s in sites if s.kind == kind])
                    hint = f"; close matches: {', '.join(close)}" if close else "; `vitq sites` lists the names"
                    raise ConfigError(f"{what} pattern {pattern!r} matches no {kind} site of this model{hint}")

    def smooth_alpha(self, site: Site) -> float | None:
        """The smoothing alpha of LayerNorm ``site`` (later patterns win), or None."""
        alpha = None
        for pattern, a in self.smooth.items():
            if matches(site, pattern):
                alpha = float(a)
        return alpha

    def corrects_bias(self, site: Site) -> bool:
        return any(matches(site, p) for p in self.bias_correction)

    def with_float(self, patterns: Iterable[str], name: str | None = None) -> "QuantConfig":
        """A copy with more float sites (duplicates dropped, order kept)."""
        merged = list(dict.fromkeys([*self.float_sites, *patterns]))
        return replace(self, float_sites=merged, name=name or self.name)

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "activation": asdict(self.activation),
            "weight": asdict(self.weight),
            "float_kinds": list(self.float_kinds),
            "float_sites": list(self.float_sites),
            "overrides": dict(self.overrides),
            # written only when used, so existing configs keep their keys (and hashes)
            **({"smooth": {k: float(v) for k, v in self.smooth.items()}} if self.smooth else {}),
            **({"bias_correction": list(self.bias_correction)} if self.bias_correction else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ConfigError("a QuantConfig must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown}; a QuantConfig has {sorted(known)}")
        base = cls()
        return cls(
            name=str(data.get("name", base.name)),
            activation=_spec(data.get("activation"), base.activation, "activation"),
            weight=_spec(data.get("weight"), base.weight, "weight"),
            float_kinds=list(data.get("float_kinds", base.float_kinds)),
            float_sites=list(data.get("float_sites", []) or []),
            overrides=dict(data.get("overrides", {}) or {}),
            smooth=_mapping(data.get("smooth", {}), "smooth"),
            bias_correction=_str_list(data.get("bias_correction", []), "bias_correction"),
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(
            self.to_dict(), sort_keys=False)
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                              f"{str(e).splitlines()[0]}") from None
        return cls.from_dict(data)


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping of site name/glob -> alpha, got {type(value).__name__}")
    return dict(value)


def _str_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list of site names/globs, got {type(value).__name__}")
    return list(value)


def matches(site: Site | str, pattern: str) -> bool:
    """``pattern`` (a name or glob) names ``site``: its canonical name or its module path."""
    names = (site,) if isinstance(site, str) else (site.name, site.path)
    return any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names)


def _close(pattern: str, sites: list[Site]) -> list[str]:
    """Up to 3 canonical names close to ``pattern`` (compared with names and paths)."""
    by_key = {}
    for s in sites:
        by_key.setdefault(s.name, s.name)
        by_key.setdefault(s.path, s.name)
    close = difflib.get_close_matches(pattern, list(by_key), n=6, cutoff=0.5)
    return list(dict.fromkeys(by_key[c] for c in close))[:3]
