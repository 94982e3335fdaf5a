"""A public source from a simulator: printed digits, rendered like scikit-learn's.

The digits 0-9 drawn with the TrueType fonts matplotlib ships (DejaVu, STIX,
Computer Modern; symbol-only fonts skipped), each with seeded jitter (glyph
size, stroke width, aspect, small rotation and shift), then processed the way
the UCI/scikit-learn handwritten digits were made: a 32x32 binary bitmap,
reduced to 8x8 by counting the set pixels of each 4x4 block (values 0..16).

It is public data: nothing is downloaded and nothing private is read. Against
scikit-learn's handwritten digits it is a distribution shift (printed strokes,
few styles), the embedded stand-in for ImageNet -> CIFAR-10: a classifier trained
on it scores far below one trained on handwritten digits (docs/benchmarks.md).
Deterministic given `(size, seed)`: image `i` depends only on the seed and `i`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsynth.config import SourceConfig
from dpsynth.data.digits import DIGIT_CLASSES
from dpsynth.data.sources import LabeledImages
from dpsynth.errors import InputError

# The matplotlib fonts that draw the ten digits as text. Left out: the STIX size
# variants and STIXNonUni (no digit glyphs), DejaVu*Display (no digits),
# LastResortHE (a placeholder box for every code point), cmex10/cmsy10 (math
# symbols at the digits' code points) and cmmi10 (old-style digits).
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf",
    "cmtt10.ttf",
)

RENDER_PX = 96      # glyphs are drawn this large, then fitted into the 32x32 bitmap
BITMAP = 32         # the UCI preprocessing: 32x32 binary bitmap ...
BLOCK = 4           # ... counted in 4x4 blocks -> 8x8, values 0..16


@dataclass(frozen=True)
class Jitter:
    """The seeded variation of one rendering (all ranges are uniform)."""

    height: tuple[float, float] = (0.8, 1.0)        # glyph height / bitmap side
    aspect: tuple[float, float] = (0.8, 1.25)       # width stretch
    rotation: tuple[float, float] = (-12.0, 12.0)   # degrees
    stroke: tuple[int, int] = (0, 3)                # extra stroke width at RENDER_PX, inclusive
    shift: tuple[float, float] = (-1.5, 1.5)        # bitmap pixels, each axis


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder (found without importing matplotlib,
    which would read its rc files)."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise InputError("printed-digits renders matplotlib's bundled fonts, and matplotlib "
                         "is not installed; pip install matplotlib")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


def _glyph(font, digit: str, stroke: int, rotation: float):
    """The digit drawn white on black at RENDER_PX, rotated, cropped to its ink."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (2 * RENDER_PX, 2 * RENDER_PX), 0)
    ImageDraw.Draw(canvas).text((RENDER_PX // 2, RENDER_PX // 4), digit, font=font, fill=255,
                                stroke_width=stroke, stroke_fill=255)
    canvas = canvas.rotate(rotation, resample=Image.BILINEAR, expand=False)
    box = canvas.getbbox()
    return canvas.crop(box) if box else None


def render(index: int, seed: int, jitter: Jitter = Jitter(), fonts=None) -> tuple[np.ndarray, int]:
    """Image `index` of the source seeded `seed`: an (8, 8) array of counts 0..16
    and its label. Labels cycle 0..9 and fonts cycle within each label, so every
    prefix of the source is class-balanced."""
    from PIL import Image

    fonts = fonts if fonts is not None else _load_fonts()
    label = index % 10
    font = fonts[(index // 10) % len(fonts)]
    rng = np.random.default_rng([seed, index])
    stroke = int(rng.integers(jitter.stroke[0], jitter.stroke[1] + 1))
    glyph = _glyph(font, str(label), stroke, float(rng.uniform(*jitter.rotation)))
    if glyph is None:  # pragma: no cover - FONTS all draw every digit (tested)
        raise InputError(f"printed-digits: font {font.path} drew no ink for {label}")
    height = rng.uniform(*jitter.height) * BITMAP
    scale = height / glyph.height
    width = min(BITMAP, glyph.width * scale * rng.uniform(*jitter.aspect))
    w, h = max(1, round(width)), max(1, round(min(height, BITMAP)))
    small = np.asarray(glyph.resize((w, h), resample=Image.BILINEAR)) >= 128
    bitmap = np.zeros((BITMAP, BITMAP), bool)
    dx, dy = rng.uniform(*jitter.shift, size=2)
    x0 = int(np.clip(round((BITMAP - w) / 2 + dx), 0, BITMAP - w))
    y0 = int(np.clip(round((BITMAP - h) / 2 + dy), 0, BITMAP - h))
    bitmap[y0:y0 + h, x0:x0 + w] = small
    counts = bitmap.reshape(BITMAP // BLOCK, BLOCK, BITMAP // BLOCK, BLOCK).sum(axis=(1, 3))
    return counts.astype(np.uint8), label


_FONT_CACHE: dict[str, object] = {}


def _load_fonts():
    from PIL import ImageFont

    fonts = []
    for name in FONTS:
        path = font_dir() / name
        if name not in _FONT_CACHE:
            if not path.exists():
                raise InputError(f"printed-digits: matplotlib's font {path} is missing; "
                                 "reinstall matplotlib (pip install --force-reinstall matplotlib)")
            _FONT_CACHE[name] = ImageFont.truetype(str(path), RENDER_PX // 2)
        fonts.append(_FONT_CACHE[name])
    return fonts


class PrintedDigitsSource:
    """Renders `spec.size` printed digits with seed `spec.seed` (one subset, `"all"`)."""

    def load(self, spec: SourceConfig) -> dict[str, LabeledImages]:
        """Return `{"all": spec.size images of shape (8, 8, 1)}`, pixel values on
        the digits source's scale (0..16 mapped to 0..255)."""
        from tqdm import tqdm

        size, seed = spec.size, spec.seed
        fonts = _load_fonts()
        counts = np.empty((size, 8, 8), np.uint8)
        labels = np.empty(size, np.int64)
        for i in tqdm(range(size), desc="render printed digits", unit="img",
                      disable=size < 2000, leave=False):
            counts[i], labels[i] = render(i, seed, fonts=fonts)
        # Same mapping as DigitsSource: 0..16 -> round(v * 255 / 16).
        images = np.round(counts * (255.0 / 16.0)).astype(np.uint8)[..., None]
        return {"all": LabeledImages(images, labels, DIGIT_CLASSES,
                                     source=f"printed-digits:matplotlib-fonts[size={size},seed={seed}]")}
