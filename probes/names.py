"""Names shared by config parsing and probe code; importing this module costs nothing."""

from __future__ import annotations


def check_aggregation(how: str) -> str:
    """Validate an aggregation name; returns it unchanged."""
    if how in ("mean", "max", "last"):
        return how
    kind, _, k = how.partition(":")
    if kind == "window" and k.isdigit() and int(k) > 0:
        return how
    raise ValueError(f"unknown aggregation {how!r}; allowed: mean, max, last, window:K (K a positive integer)")
