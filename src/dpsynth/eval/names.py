"""The names of the evaluation metrics in the stages' metrics.json files."""

from __future__ import annotations

from typing import Any, Mapping


def distance_key(metrics: Mapping[str, Any]) -> str | None:
    """The first Fréchet distance among a stage's metrics (``fd_*`` or ``fid_*``)."""
    return next((k for k in metrics if k.startswith(("fid_", "fd_"))), None)
