"""Table cells: compact numbers, percentages, KiB, synaptic operations, markdown tables."""

from __future__ import annotations

import math

from .contract import TRAINED_KEY


# --------------------------------------------------------------------------- number formatting

def _num(value, digits: int = 3) -> str:
    """A compact human number: 1234567 -> '1.23M', 0.01234 -> '0.0123', None -> '–'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.{digits}g}{suffix}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _kib(value) -> str:
    return "–" if value is None else f"{value / 1024:.1f}"


def _syn(metrics: dict, key: str):
    return (metrics.get("synops") or {}).get(key)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _has_trained(*metrics: dict) -> bool:
    """Whether any of these metrics dicts holds a trained-ANN measurement."""
    return any(isinstance(m, dict) and m.get(TRAINED_KEY) is not None for m in metrics)
