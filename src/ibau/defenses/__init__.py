"""Defenses behind one interface (``Defense.fit``) and a registry ``create(name, **kwargs)``."""

from __future__ import annotations

from .base import Defense, DefenseResult
from .deepinspect import DeepInspect
from .dp import DPSGD
from .fine_pruning import FinePruning
from .ibau import IBAU
from .naive_uap import NaiveUAP
from .nad import NAD
from .neural_cleanse import NeuralCleanse
from .tabor import TABOR

DEFENSES: dict[str, type[Defense]] = {cls.name: cls for cls in (IBAU, NeuralCleanse, TABOR, DeepInspect, FinePruning, NAD,
                                                                DPSGD, NaiveUAP)}


def create(name: str, **kwargs) -> Defense:
    try:
        cls = DEFENSES[name]
    except KeyError:
        raise KeyError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}") from None
    return cls(**kwargs)


__all__ = ["Defense", "DefenseResult", "IBAU", "NeuralCleanse", "TABOR", "DeepInspect", "DPSGD", "FinePruning", "NAD", "NaiveUAP", "DEFENSES", "create"]
