"""Typed reads of manifest fields: every problem is a BundleError saying what was expected."""

from __future__ import annotations

import math

from vaeinfer.errors import BundleError


def get(data: dict, key: str, kind, where: str):
    if not isinstance(data, dict) or key not in data:
        raise BundleError(f"manifest: expected key {where}.{key}, it is missing")
    value = data[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BundleError(f"manifest: expected {where}.{key} to be {names}, got {type(value).__name__} {value!r:.80}")
    return value


def finite(value) -> bool:
    """A JSON number that is a finite float (huge ints, NaN and Infinity are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def positive(data: dict, key: str, where: str, limit: int = 1 << 16) -> int:
    value = get(data, key, int, where)
    if not 0 < value <= limit:
        raise BundleError(f"manifest: expected {where}.{key} in [1, {limit}], got {value}")
    return value
