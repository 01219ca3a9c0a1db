"""Argument types shared by the benchmarks' command lines: bad input is an argparse error (exit 2,
with the usage), never a traceback."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]: positive integers, comma-separated."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (empty items dropped; at least one)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated names, got nothing")
    return values


def description(doc: str | None) -> str:
    """A module docstring's first paragraph, for argparse."""
    return (doc or "").strip().split("\n\n")[0]
