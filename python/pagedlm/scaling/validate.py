"""Argument checks shared by the scaling estimators.

Every check raises ValueError whose message starts with the offending field's name,
so a bad call says which argument to fix rather than failing deep inside a formula.
"""
from __future__ import annotations

import math
import numbers


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def fraction(name: str, value) -> float:
    """A number in (0, 1], such as model FLOPs utilisation."""
    value = positive_number(name, value)
    if value > 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def lookup(name: str, value: str, table: dict):
    """Case-insensitive lookup in a name -> entry table."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a name (string), got {value!r}")
    for key, entry in table.items():
        if key.lower() == value.lower():
            return entry
    raise ValueError(f"unknown {name} {value!r}; known: {', '.join(table)}")
