"""Plots people would rather see than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def plot_loss(history: Sequence[Sequence[float]], path: str | Path, title: str) -> None:
    """Training loss against step, from `[[step, loss], ...]`, saved as PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [row[0] for row in history]
    ax.plot(steps, [row[1] for row in history], lw=1.5)
    ax.set(xlabel="step", ylabel="loss (mean over logging window)", title=title, yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
