"""One registry style for models, attacks, defenses and datasets.

A :class:`Registry` is a ``dict`` from names to classes or factories, filled with its
``register`` decorator. Looking up an unknown name raises
:class:`~ibau.errors.InputError` (and ``KeyError``, for code that catches that) listing
the known names, so a typo on the command line becomes one clear error line.
Attributes that other layers derive from (display names, roles, cost order) live on
the registered classes themselves, never in separate lists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import InputError

__all__ = ["Registry", "UnknownName"]

T = TypeVar("T")


class UnknownName(InputError, KeyError):
    """An unknown registry name (an :class:`InputError` and a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(dict, Generic[T]):
    """``name -> item``; ``kind`` names the things it holds in error messages ("model", "attack")."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")``, or bare name from the item's ``name`` attribute."""

        def deco(item: T) -> T:
            key = name if name is not None else getattr(item, "name", None)
            if not key:
                raise ValueError(f"a {self.kind} needs a name to be registered")
            if key in self:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self[key] = item
            return item

        return deco

    def names(self) -> list[str]:
        return sorted(self)

    def get_or_raise(self, name: str) -> T:
        """The item registered as ``name``; :class:`UnknownName` listing the known names otherwise."""
        try:
            return self[name]
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None
