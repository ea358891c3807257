"""The one registry decorator: a class registered under a name as its (stateless) instance in
a dict, a taken name refused. Formats (quant.formats) and export targets (vitq.targets) use it."""

from __future__ import annotations

from typing import Callable, TypeVar

C = TypeVar("C", bound=type)


def registrar(table: dict, what: str) -> Callable[[str], Callable[[C], C]]:
    """``register(name)``, a class decorator that sets ``cls.name`` and puts ``cls()`` in
    ``table`` under ``name``; ``what`` names the kind in the error for a name taken."""
    def register(name: str) -> Callable[[C], C]:
        def decorate(cls: C) -> C:
            if name in table:
                raise ValueError(f"{what} {name!r} is already registered ({type(table[name]).__name__})")
            cls.name = name
            table[name] = cls()
            return cls
        return decorate
    return register
