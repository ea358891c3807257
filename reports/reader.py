"""The artefacts of one output folder, read through :mod:`analysis.artifacts` on first
use. An unreadable file (or one without its declared columns) becomes a warning at
the top of the report and is treated as absent, its name kept in :attr:`unreadable`."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from analysis import artifacts
from analysis.artifacts import TableSpec

from .format import is_true, records


class Artefacts:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.warnings: list[str] = []
        self.unreadable: set[str] = set()
        self._tables: dict[str, artifacts.Table | None] = {}
        self._yamls: dict[str, tuple[str | None, dict[str, Any] | None]] = {}

    def table(self, spec: TableSpec) -> artifacts.Table | None:
        """The table ``spec`` (None when absent or unreadable); each file is read once."""
        if spec.stem not in self._tables:
            try:
                self._tables[spec.stem] = artifacts.read(self.out, spec)
            except artifacts.SchemaError as e:
                self.warnings.append(f"{e}; its section is left out")
                self.unreadable.add(spec.file)
                self._tables[spec.stem] = None
        return self._tables[spec.stem]

    def tables(self) -> list[artifacts.Table]:
        """Every table artefact present, in the schema's order."""
        return [t for spec in artifacts.table_specs() if (t := self.table(spec)) is not None]

    def all_meta(self) -> list[tuple[str, dict[str, Any]]]:
        return [(t.path.name, t.meta) for t in self.tables()]

    @property
    def plan(self) -> artifacts.Table | None:
        """The planner's run: its three tables carry the same meta and run info."""
        return next((t for s in (artifacts.PLAN_STEPS, artifacts.PLAN_TRIED, artifacts.PLAN_CONFIRM)
                     if (t := self.table(s)) is not None), None)

    def chosen_step(self) -> dict[str, Any] | None:
        """The planner's chosen point (the row of plan_steps marked ``plan``)."""
        steps = self.table(artifacts.PLAN_STEPS)
        rows = [r for r in records(steps.rows) if is_true(r.get("plan"))] if steps is not None else []
        return rows[0] if rows else None

    def float_site_costs(self, sites: list[str]) -> list[dict[str, Any]]:
        """Each of ``sites`` with its latency group's ``group``, ``cost_ms`` and ``free``
        flag from latency_sites (a site in no group: its name alone; [] without the table)."""
        t = self.table(artifacts.LATENCY)
        if t is None:
            return []
        rows = t.rows if "format" not in t.rows else t.rows[t.rows["format"] == "float"]  # float rows only
        groups = {m: r for r in records(rows) for m in str(r["members"]).split(",")}
        return [{"site": s, **({k: groups[s][k] for k in ("group", "cost_ms", "free")} if s in groups else {})}
                for s in sites]

    @cached_property
    def channels(self) -> dict[str, np.ndarray] | None:
        """errors_channels.npz: per-channel max |x| of every activation tensor."""
        path = self.out / artifacts.ERRORS_CHANNELS
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: np.asarray(z[k], dtype=float) for k in z.files}
        except (OSError, ValueError) as e:
            self.warnings.append(f"could not read {artifacts.ERRORS_CHANNELS}: {e}")
            return None

    def yaml(self, name: str) -> tuple[str | None, dict[str, Any] | None]:
        """A YAML artefact as (text, mapping); the mapping None when it is not one."""
        if name not in self._yamls:
            self._yamls[name] = self._read_yaml(name)
        return self._yamls[name]

    def _read_yaml(self, name: str) -> tuple[str | None, dict[str, Any] | None]:
        path = self.out / name
        if not path.is_file():
            return None, None
        text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            self.warnings.append(f"{name} is not valid YAML ({str(e).splitlines()[0]}); shown as is")
            return text, None
        if not isinstance(data, dict):
            self.warnings.append(f"{name} is not a mapping; shown as is")
            return text, None
        return text, data

    def preset_yamls(self) -> dict[str, str]:
        """The YAML of every configuration eval/analyze measured: config_<name>.yaml,
        else the QuantConfig stored in the table's meta."""
        out: dict[str, str] = {}
        for t in (self.table(artifacts.ACCURACY), self.table(artifacts.EVAL)):
            for name, cfg in ((t.meta["configs"] if t is not None else None) or {}).items():
                path = self.out / artifacts.config_file(name)
                if name not in out:
                    out[name] = path.read_text() if path.is_file() else yaml.safe_dump(cfg, sort_keys=False)
        return out
