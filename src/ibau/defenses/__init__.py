"""Defenses behind one interface (``Defense.fit``) and one registry, :data:`DEFENSES`.

Adding a defense: its file (a :class:`Defense` subclass with ``name``, ``display_name``,
``short_name``, ``role`` and ``cost_order``), one registry line below, and its test. The
command line, the benchmark runner and its report read every list of defenses from the
registry. The registration order is the column order of the paper's Table 1.
"""

from __future__ import annotations

from ..registry import Registry
from .base import ROLES, Defense, DefenseResult
from .deepinspect import DeepInspect
from .dp import DPSGD
from .fine_pruning import FinePruning
from .ibau import IBAU
from .nad import NAD
from .naive_uap import NaiveUAP
from .neural_cleanse import NeuralCleanse
from .tabor import TABOR

#: name -> defense class
DEFENSES: Registry[type[Defense]] = Registry("defense")
DEFENSES.register()(IBAU)
DEFENSES.register()(NeuralCleanse)
DEFENSES.register()(DeepInspect)
DEFENSES.register()(TABOR)
DEFENSES.register()(FinePruning)
DEFENSES.register()(NAD)
DEFENSES.register()(DPSGD)
DEFENSES.register()(NaiveUAP)


def create(name: str, **kwargs) -> Defense:
    """The defense ``name`` with ``kwargs`` as settings; an unknown name raises
    :class:`~ibau.registry.UnknownName` (an ``InputError`` and a ``KeyError``)."""
    return DEFENSES.get_or_raise(name)(**kwargs)


__all__ = ["Defense", "DefenseResult", "IBAU", "NeuralCleanse", "TABOR", "DeepInspect", "DPSGD", "FinePruning", "NAD",
           "NaiveUAP", "DEFENSES", "ROLES", "create"]
