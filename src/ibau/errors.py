"""The one error type for bad input.

Every bad argument, file or option combination the library is given raises
:class:`InputError` (a :class:`ValueError`) whose message names the parameter and says
how to fix it. The command line turns it into one line ``ibau: error: ...`` and exit
status 2, before any work is done. Readers and loaders raise subclasses
(:class:`ibau.data.DataError`, :class:`ibau.io.WeightsError`,
:class:`ibau.attacks.manifest.ManifestError`, :class:`ibau.bench.SpecError`) so callers
can tell the source apart, and catch them all as ``InputError``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["InputError", "check_number", "check_int", "check_choice"]


class InputError(ValueError):
    """A problem with the caller's input (argument, file, option combination)."""


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> Any:
    """``value`` is a finite real number within the bounds; else :class:`InputError` naming ``name``.

    ``low_open`` / ``high_open`` exclude the bound itself (``low=0, low_open=True``: positive).
    """
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise InputError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise InputError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              allow_none: bool = False) -> Any:
    """``value`` is an integer (not a bool) within ``[low, high]``; else :class:`InputError`."""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"{name} must be an integer, got {value!r}")
    return check_number(name, value, low=low, high=high)


def check_choice(name: str, value: Any, choices) -> Any:
    """``value`` is one of ``choices``; else :class:`InputError` listing them."""
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(str, sorted(choices, key=str)))}, got {value!r}")
    return value
