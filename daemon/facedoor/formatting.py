"""Small text helpers shared by the door's messages, logs and command-line tables."""
from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone


def iso_utc(epoch_s: float) -> str:
    """`2026-05-01T08:00:00.123Z`: UTC with milliseconds, the form every facedoor message uses."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def finite(x: float | None, digits: int = 4) -> float | None:
    """X rounded to DIGITS, or None for a missing or non-finite value (JSON has no inf/NaN)."""
    return round(float(x), digits) if x is not None and math.isfinite(x) else None


def distance(x: float | None, digits: int = 4) -> float | None:
    """A distance cut (not rounded) to DIGITS, so a match strictly below a threshold of at most
    DIGITS decimals never reads as equal to it (0.69996 -> 0.6999, not 0.7); None if not finite."""
    if x is None or not math.isfinite(x):
        return None
    scale = 10 ** digits
    return math.floor(float(x) * scale) / scale


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, header first, no trailing blanks."""
    lines = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
