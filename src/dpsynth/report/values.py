"""Reading a stage's published files for the report, and writing its numbers the
way the page words them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping


def read_json(folder: Path | None, name: str) -> Any:
    path = None if folder is None else folder / name
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def read_png(folder: Path | None, name: str) -> bytes | None:
    path = None if folder is None else folder / name
    return path.read_bytes() if path is not None and path.is_file() else None


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def signed(x: float | None) -> str:
    """A correlation; NaN (JSON null) when one of the rankings is constant."""
    return ("undefined (a constant ranking)" if x is None or math.isnan(x)
            else f"{x:+.2f}")


def interval(metrics: Mapping[str, Any], name: str) -> str:
    """"95% CI +0.40 to +0.90": the bootstrap interval of correlation `name` in rank's
    metrics; "" where it is undefined (a constant synthetic ranking) or the metrics
    predate it."""
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    if low is None or high is None:
        return ""
    return f"{100 * metrics['ci_confidence']:g}% CI {signed(low)} to {signed(high)}"
