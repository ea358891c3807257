"""The report's sections, registered by a decorator in the spirit of optimum-quanto's
``@register_qmodule``: a section is one module under ``reports/sections/`` holding

    @register_section("depth", "Quantization noise along depth (SQNR)", order=70,
                      needs={artifacts.ERRORS_ACTIVATIONS: ("tensor", "kind", "acc_sqnr_db")})
    def depth(a: Artefacts, sec: Section) -> None:
        sec.add(...)

``order`` places it on the page; ``needs`` names the table artefacts it reads and the
columns it reads from each, which must be columns the schema declares, required or optional (checked when
the module is imported). The opening is written here once: the builder runs when one
of its artefacts is present; otherwise the section shows a note naming the missing
file and the command that writes it (``named``: the artefacts the note names, default
all of ``needs``), or, when ``optional``, is left out; ``shown_when`` adds a condition
on what the artefacts hold (e.g. an eval run with a real backend). A section with ``always=True``
runs its builder regardless and handles absence itself (:func:`missing_note`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from analysis.artifacts import TableSpec

from . import figures
from .format import HtmlTable, esc
from .reader import Artefacts


@dataclass
class Figure:
    uri: str
    alt: str
    caption: str


@dataclass
class Block:
    """One piece of a section: a heading, a paragraph, a figure, a table or a <pre>."""

    kind: str  # "h3", "h4", "p", "note", "warn", "verdict", "figure", "table", "details", "yaml"
    text: str = ""
    figure: Figure | None = None
    table: HtmlTable | None = None
    blocks: list["Block"] = field(default_factory=list)  # details content
    id: str = ""
    open: bool = False


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    missing: str = ""  # the note when the artefact is absent

    def add(self, kind: str, text: str = "", **kw) -> Block:
        block = Block(kind, text, **kw)
        self.blocks.append(block)
        return block

    def add_table(self, table: HtmlTable) -> None:
        self.blocks.append(Block("table", table=table))

    def add_figure(self, png: bytes, alt: str, caption: str) -> None:
        self.blocks.append(figure(png, alt, caption))


Builder = Callable[[Artefacts, Section], None]


@dataclass(frozen=True)
class SectionSpec:
    id: str
    title: str
    order: int
    needs: Mapping[TableSpec, tuple[str, ...]]
    named: tuple[TableSpec, ...]
    optional: bool
    always: bool
    shown_when: Callable[[Artefacts], bool] | None
    build: Builder

    def present(self, a: Artefacts) -> bool:
        return any(a.table(t) is not None for t in self.needs) and (self.shown_when is None or self.shown_when(a))


SECTIONS: dict[str, SectionSpec] = {}


def register_section(id: str, title: str, *, order: int, needs: Mapping[TableSpec, Iterable[str]] | None = None,
                     named: Iterable[TableSpec] | None = None, optional: bool = False, always: bool = False,
                     shown_when: Callable[[Artefacts], bool] | None = None) -> Callable[[Builder], Builder]:
    """Registers the decorated builder as the section ``id`` (see the module docstring)."""
    needs = {spec: tuple(cols) for spec, cols in (needs or {}).items()}
    for spec, cols in needs.items():
        undeclared = [c for c in cols if c not in spec.columns and c not in spec.optional]
        if undeclared:
            raise ValueError(f"section {id!r} reads columns {spec.stem} does not declare: {undeclared}")
    if not needs and not always:
        raise ValueError(f"section {id!r} needs no artefact: register it with always=True")

    def register(build: Builder) -> Builder:
        if id in SECTIONS:
            raise ValueError(f"a section {id!r} is already registered ({SECTIONS[id].build.__module__})")
        SECTIONS[id] = SectionSpec(id, title, order, needs, tuple(named or needs), optional, always, shown_when, build)
        return build
    return register


def build_sections(a: Artefacts) -> list[Section]:
    """Every registered section in page order; absent ones as notes (optional ones left out)."""
    out = []
    for spec in sorted(SECTIONS.values(), key=lambda s: (s.order, s.id)):
        sec = Section(spec.id, spec.title)
        if spec.always or spec.present(a):
            spec.build(a, sec)
        elif spec.optional:
            continue
        else:
            sec.missing = missing_note(a, *spec.named)
        out.append(sec)
    return out


# -- helpers the sections share -----------------------------------------------------------
def command(out: Path, cmd: str, *extra: str) -> str:
    """A command line in <code>, HTML-escaped (it goes into notes rendered as markup)."""
    return "<code>" + esc(" ".join([cmd, *extra, "--out", str(out)])) + "</code>"


def missing_note(a: Artefacts, *specs: TableSpec, command_text: str | None = None) -> str:
    """'Not available: no X in this folder. Run CMD to produce it.' for the artefacts
    ``specs`` (alternatives); an unreadable one is named as such."""
    commands = command_text or " or ".join(dict.fromkeys(command(a.out, s.command) for s in specs))
    bad = [s.file for s in specs if s.file in a.unreadable]
    if bad:
        return f"Not available: {esc(' and '.join(bad))} could not be read (see above). Run {commands} to write it again."
    return not_available(" or ".join(s.file for s in specs), commands)


def not_available(files: str, commands: str) -> str:
    """The note for files absent from the folder (``commands``: markup, see :func:`command`)."""
    return f"Not available: no {esc(files)} in this folder. Run {commands} to produce it."


def figure(png: bytes, alt: str, caption: str) -> Block:
    return Block("figure", figure=Figure(figures.data_uri(png), alt, caption))
