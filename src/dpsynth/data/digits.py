"""The embedded default source: scikit-learn's 8x8 handwritten digits.

1797 grey images shipped inside scikit-learn, so the whole pipeline runs on a
fresh machine with no download. It has no official split: one subset, `"all"`.
"""

from __future__ import annotations

import numpy as np

from dpsynth.config import SourceConfig
from dpsynth.data.sources import LabeledImages

DIGIT_CLASSES = tuple(str(d) for d in range(10))


class DigitsSource:
    """Reads `sklearn.datasets.load_digits()` (pixel values 0..16)."""

    def load(self, spec: SourceConfig) -> dict[str, LabeledImages]:
        """Return `{"all": 1797 images of shape (8, 8, 1)}`; `spec.path` is ignored."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 0..16 -> 0..255 by round(v * 255 / 16): 16 intensity levels plus zero.
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        return {"all": LabeledImages(images, digits.target.astype(np.int64), DIGIT_CLASSES,
                                     source="digits:sklearn.datasets.load_digits[all]")}
