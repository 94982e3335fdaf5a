"""Plots are real PNGs that show the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dpsynth.plots import plot_accuracy_curve, plot_loss, plot_rank_scatter


def test_loss_plot_is_a_png_with_a_curve(tmp_path: Path) -> None:
    plot_loss([[10, 1.0], [20, 0.5], [30, 0.2]], tmp_path / "loss.png", "t")
    img = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert img.shape == (350, 600, 3)
    # matplotlib's default line colour (C0, #1f77b4) is drawn
    assert (np.abs(img.astype(int) - [31, 119, 180]).sum(-1) < 30).sum() > 100


def _has_colour(path: Path, rgb: tuple[int, int, int], min_pixels: int) -> bool:
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(img - rgb).sum(-1) < 30).sum()) >= min_pixels


def test_accuracy_curve_shows_the_curve_and_the_labelled_baseline(tmp_path: Path) -> None:
    plot_accuracy_curve([250, 500, 1000, 2000], [0.6, 0.7, 0.8, 0.85], tmp_path / "a.png",
                        baseline=0.95)
    assert _has_colour(tmp_path / "a.png", (31, 119, 180), 100)  # C0: the curve
    assert _has_colour(tmp_path / "a.png", (214, 39, 40), 100)  # C3: the baseline
    plot_accuracy_curve([250, 500], [0.6, 0.7], tmp_path / "b.png")
    assert not _has_colour(tmp_path / "b.png", (214, 39, 40), 1)  # no baseline, no line


def test_rank_scatter_rings_the_chosen_config(tmp_path: Path) -> None:
    plot_rank_scatter([0.5, 0.9, 0.7], [0.95, 0.6, 0.8], 1, tmp_path / "s.png", "t")
    assert _has_colour(tmp_path / "s.png", (31, 119, 180), 50)  # the points
    assert _has_colour(tmp_path / "s.png", (214, 39, 40), 30)  # the ring
