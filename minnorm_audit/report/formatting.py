"""Number formats for the report page (its jinja filters) and its plots, and the flag order
they share.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

# The flag vocabulary is scoring's (pure numpy, nothing upstream of the report).
from ..scoring import FLAGS

__all__ = ["FLAGS", "format_count", "format_number", "format_percent"]


def format_count(value: Any) -> str:
    """``1234567`` -> ``"1,234,567"``; missing -> an em dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "\u2014"
    return f"{int(value):,}"


def format_number(value: Any) -> str:
    """Short form of a number for tables (4 significant digits); text passes through."""
    if value is None:
        return "\u2014"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return "\u2014"
        if math.isinf(number):
            return "\u221e" if number > 0 else "\u2212\u221e"
        if number == int(number) and abs(number) < 1e15:
            return f"{int(number):,}"
        if abs(number) >= 1e5 or abs(number) < 1e-3:
            return f"{number:.3e}"
        return f"{number:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def format_percent(value: Any, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "\u2014"
    return f"{100.0 * float(value):.{digits}f}%"


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
