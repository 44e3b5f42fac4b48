"""Defenses behind one interface (``Defense.fit``) and a registry ``create(name, **kwargs)``."""

from __future__ import annotations

from .base import Defense, DefenseResult
from .ibau import IBAU

DEFENSES: dict[str, type[Defense]] = {"ibau": IBAU}


def create(name: str, **kwargs) -> Defense:
    try:
        cls = DEFENSES[name]
    except KeyError:
        raise KeyError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}") from None
    return cls(**kwargs)


__all__ = ["Defense", "DefenseResult", "IBAU", "DEFENSES", "create"]
