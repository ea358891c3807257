"""QuantConfig: which sites are int8, how, and which stay float.

A config is data (YAML/JSON round-trip): default specs for activations and weights,
per-site overrides by name or glob, float kinds (the backend's limits: LayerNorm,
GELU and Softmax by default) and a float skip-list of names or globs. A pattern is
matched against each site's canonical name (``blocks.4.mlp.fc2``, the same for one
architecture in every library; what written configs use) and against its module path
in the installed library (``vit.layers.4.mlp.fc2``), so a path names the canonical
site it belongs to. Every pattern must match at least one site of the model it is
applied to, so a typo fails loudly.
``formats`` maps site names, globs or kinds to a numeric format (:mod:`quant.formats`:
``int8``, ``a16w8``, ``w4a8``, ``w8``, ``w4``, ``fp8``, ``float``); the last matching entry
wins, a site no entry names is ``int8``, and ``float_kinds`` / ``float_sites`` keep a site
float whatever its format (the skip-list stays a skip-list).
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

from .formats import FORMATS, Format
from .observers import check_observer
from .quantizer import QuantSpec
from .sites import KINDS, SLOTS, Site
from .store import atomic_write_text

BACKEND_FLOAT_KINDS = ("layernorm", "gelu", "softmax")
ACTIVATION_SLOTS = tuple(sorted({s for slots in SLOTS.values() for s in slots} - {"weight"}))
DEFAULT_FORMAT = "int8"  # the format of a site no ``formats`` entry names
# QuantSpec fields added after configs were first written: left out of to_dict at their
# default, so existing configs keep their serialisation (and the result logs' hashes)
_SPEC_DEFAULTS = {"group_size": None, "encoding": "int"}


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


def _spec_dict(spec: QuantSpec) -> dict[str, Any]:
    return {k: v for k, v in asdict(spec).items() if k not in _SPEC_DEFAULTS or v != _SPEC_DEFAULTS[k]}


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
    # site name / glob / kind -> format name (quant.formats); later entries win
    formats: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = sorted(set(self.float_kinds) - set(KINDS))
        if bad:
            raise ConfigError(f"unknown site kind(s) {bad} in float_kinds; kinds are {list(KINDS)}")
        if not isinstance(self.formats, dict):
            raise ConfigError("formats must map site names/globs/kinds to a format name")
        for pattern, name in self.formats.items():
            if name not in FORMATS:
                raise ConfigError(f"formats {pattern!r}: unknown format {name!r}; formats are "
                                  f"{', '.join(FORMATS)}")
        if self.activation.group_size is not None:
            raise ConfigError("activation: group_size applies to weights only")
        for pattern, spec in self.overrides.items():
            extra = sorted(set(spec) - {"activation", "weight", *ACTIVATION_SLOTS})
            if extra:
                raise ConfigError(f"override {pattern!r}: unknown key(s) {extra}; use activation/weight or an "
                                  f"activation slot ({', '.join(ACTIVATION_SLOTS)})")
            for part in spec:
                base = self.weight if part == "weight" else self.activation
                checked = _spec(spec.get(part), base, f"override {pattern!r} {part}")
                if part != "weight" and checked.group_size is not None:
                    raise ConfigError(f"override {pattern!r} {part}: group_size applies to weights only")
        if not isinstance(self.smooth, dict):
            raise ConfigError("smooth must map LayerNorm site names/globs to alpha in (0, 1)")
        for pattern, alpha in self.smooth.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
                raise ConfigError(f"smooth {pattern!r}: alpha must be a number in (0, 1), got {alpha!r}")
        if isinstance(self.bias_correction, str) or not all(isinstance(p, str) for p in self.bias_correction):
            raise ConfigError("bias_correction must be a list of Linear site names/globs")

    # -- decisions per site ----------------------------------------------
    def is_float(self, site: Site) -> bool:
        """Every tensor of ``site`` stays float: a float kind, a skip-list entry, the
        ``float`` format, or a weight-only format at a site without weights."""
        return (site.kind in self.float_kinds or any(matches(site, p) for p in self.float_sites)
                or self.format_of(site).keeps_float(site))

    def format_of(self, site: Site) -> Format:
        """The format the ``formats`` mapping gives ``site`` (the last matching entry; a
        kind matches its sites), else ``int8``. ``float_kinds``/``float_sites`` decide
        before it (:meth:`is_float`)."""
        name = DEFAULT_FORMAT
        for pattern, fmt in self.formats.items():
            if pattern == site.kind or matches(site, pattern):
                name = fmt
        return FORMATS[name]

    def spec_for(self, site: Site, part: str, slot: str | None = None) -> QuantSpec:
        """The config's spec of ``part`` ('activation' or 'weight') at ``site``, before its
        format (:meth:`slot_specs` applies it); later overrides win.
        With ``slot``, an override keyed by that slot's name (e.g. ``probs``, the
        softmax input of ``matmul_av``) applies on top of the site's activation spec."""
        spec = getattr(self, part)
        keys = (part,) if slot is None or part == "weight" else (part, slot)
        for key in keys:
            for pattern, override in self.overrides.items():
                if matches(site, pattern) and key in override:
                    spec = _spec(override[key], spec, f"override {pattern!r}")
        return spec

    def slot_specs(self, site: Site, fmt: Format | None = None) -> dict[str, QuantSpec | None]:
        """The spec of every slot (tensor) of ``site`` under its format, or under ``fmt``
        when given (None: that slot stays float, as the activations of a weight-only format)."""
        fmt = self.format_of(site) if fmt is None else fmt
        specs: dict[str, QuantSpec | None] = {}
        for slot in site.slots:
            if slot == "weight":
                specs[slot] = fmt.weight(self.spec_for(site, "weight"))
            else:
                specs[slot] = fmt.activation(self.spec_for(site, "activation", slot))
        return specs

    def int8_sites(self, sites: Iterable[Site]) -> list[Site]:
        """The sites with at least one quantized tensor (whatever their format)."""
        return [s for s in sites if not self.is_float(s)]

    def validate(self, sites: list[Site]) -> None:
        """Every skip-list entry, override and formats pattern must match a site of this
        model (a formats key may also be a kind the model has)."""
        kinds = {s.kind for s in sites}
        for pattern in [*self.float_sites, *self.overrides, *(p for p in self.formats if p not in kinds)]:
            if not any(matches(s, pattern) for s in sites):
                close = _close(pattern, sites)
                hint = f"; close matches: {', '.join(close)}" if close else "; `vitq sites` lists the names"
                raise ConfigError(f"pattern {pattern!r} matches no site of this model{hint}")
        for pattern, fmt in self.formats.items():
            named = [s for s in sites if pattern == s.kind or matches(s, pattern)]
            if not FORMATS[fmt].is_float and named and all(s.kind in self.float_kinds for s in named):
                kinds = sorted({s.kind for s in named})
                raise ConfigError(f"formats {pattern!r}: every site it names is of a float kind ({', '.join(kinds)}); "
                                  f"remove {', '.join(kinds)} from float_kinds to give it format {fmt}")
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
            "activation": _spec_dict(self.activation),
            "weight": _spec_dict(self.weight),
            "float_kinds": list(self.float_kinds),
            "float_sites": list(self.float_sites),
            "overrides": dict(self.overrides),
            # written only when used, so existing configs keep their keys (and hashes)
            **({"smooth": {k: float(v) for k, v in self.smooth.items()}} if self.smooth else {}),
            **({"bias_correction": list(self.bias_correction)} if self.bias_correction else {}),
            **({"formats": dict(self.formats)} if self.formats else {}),
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
            formats=_formats(data.get("formats", {})),
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


def _formats(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"formats must map site names/globs/kinds to a format name ({', '.join(FORMATS)})")
    return {str(k): v for k, v in value.items()}


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
