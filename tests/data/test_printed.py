"""The printed-digits source: public data rendered from matplotlib's fonts."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from dpsynth.config import SourceConfig
from dpsynth.data import printed
from dpsynth.data.printed import PrintedDigitsSource
from dpsynth.data.sources import load_source


def load(size: int, seed: int = 0):
    return load_source(SourceConfig(kind="printed-digits", size=size, seed=seed))["all"]


def test_deterministic_given_the_seed_and_prefix_stable() -> None:
    a, b = load(200, seed=3), load(200, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    # Image i depends on (seed, i) only: a larger source starts with the smaller one.
    np.testing.assert_array_equal(load(300, seed=3).images[:200], a.images)
    other = load(200, seed=4)
    assert (other.images != a.images).any(axis=(1, 2, 3)).mean() > 0.9


def test_layout_values_are_counts_of_16_and_classes_are_balanced() -> None:
    data = load(1000)
    assert data.images.shape == (1000, 8, 8, 1) and data.images.dtype == np.uint8
    assert data.classes == tuple("0123456789")
    # The digits source's scale: block counts 0..16 mapped by round(v * 255 / 16).
    levels = {int(round(v * 255 / 16)) for v in range(17)}
    assert set(np.unique(data.images).tolist()) <= levels
    assert data.images.max() == 255 and data.images.min() == 0
    np.testing.assert_array_equal(np.bincount(data.labels, minlength=10), np.full(10, 100))
    assert len({img.tobytes() for img in data.images}) > 950  # the jitter varies them


def test_every_font_draws_ten_distinct_digits() -> None:
    fonts = printed._load_fonts()
    assert len(fonts) == len(printed.FONTS) >= 20
    no_jitter = printed.Jitter(height=(1, 1), aspect=(1, 1), rotation=(0, 0), stroke=(0, 0),
                               shift=(0, 0))
    for f, name in enumerate(printed.FONTS):
        digits = [printed.render(10 * f + d, seed=0, jitter=no_jitter, fonts=fonts)
                  for d in range(10)]
        assert [label for _, label in digits] == list(range(10))
        counts = [img for img, _ in digits]
        assert all(img.sum() > 0 for img in counts), name
        assert len({img.tobytes() for img in counts}) == 10, name


def test_it_looks_like_digits_but_is_shifted_from_handwriting() -> None:
    """A 3-NN on printed digits reads handwritten ones far better than chance and
    far worse than one trained on handwriting: the shift the benchmark needs."""
    data = load(3000)
    x = data.images[..., 0].reshape(len(data), -1) / 255.0
    real = load_digits()
    knn = KNeighborsClassifier(3).fit(x, data.labels)
    accuracy = (knn.predict(real.data / 16.0) == real.target).mean()
    assert 0.4 < accuracy < 0.85


def test_reads_no_file_but_matplotlib_fonts() -> None:
    """Public by construction: while it renders, nothing is opened but the
    bundled fonts (reading e.g. scikit-learn's digits would show here)."""
    import sys

    printed._FONT_CACHE.clear()
    PrintedDigitsSource().load(SourceConfig(kind="printed-digits", size=10))  # imports warm
    printed._FONT_CACHE.clear()
    opened: dict[str, list[str]] = {"printed": [], "control": []}
    window = [""]

    def hook(event: str, args: tuple) -> None:
        if window[0] and event == "open" and isinstance(args[0], (str, Path)):
            opened[window[0]].append(str(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: switched off below
    try:
        window[0] = "printed"
        data = PrintedDigitsSource().load(SourceConfig(kind="printed-digits", size=20))
        window[0] = "control"
        load_digits()  # the positive control: its reads must be seen
    finally:
        window[0] = ""
    assert any("digits" in p for p in opened["control"]), "the hook is blind"
    fonts = printed.font_dir()
    assert all(Path(p).parent == fonts for p in opened["printed"]), opened["printed"]
    assert len(data["all"]) == 20
