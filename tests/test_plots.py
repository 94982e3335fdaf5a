"""Plots are real PNGs that show the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dpsynth.plots import plot_loss


def test_loss_plot_is_a_png_with_a_curve(tmp_path: Path) -> None:
    plot_loss([[10, 1.0], [20, 0.5], [30, 0.2]], tmp_path / "loss.png", "t")
    img = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert img.shape == (350, 600, 3)
    # matplotlib's default line colour (C0, #1f77b4) is drawn
    assert (np.abs(img.astype(int) - [31, 119, 180]).sum(-1) < 30).sum() > 100
