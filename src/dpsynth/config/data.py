"""The `data` section: where the raw sources come from and how they become the
public / private / test splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from dpsynth.choices import EMBEDDED_KINDS, SourceKind
from dpsynth.config.checks import check

SplitRole = Literal["public", "private", "test"]


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """Where one raw dataset comes from.

    Attributes:
        kind: the reader (DESIGN.md "Data sources").
        path: file, folder or `s3://` URI; `None` only for the embedded kinds
            (`digits`, `printed-digits`).
        hospitals: camelyon17 only: which hospitals (WILDS `center`) to take.
        size: printed-digits only: how many images to render (class-balanced).
        seed: printed-digits only: the rendering jitter's seed.
    """

    kind: SourceKind = "digits"
    path: str | None = None
    hospitals: tuple[int, ...] | None = None
    size: int | None = None
    seed: int = 0

    def validate(self, name: str) -> None:
        check(self.kind in EMBEDDED_KINDS or bool(self.path), f"{name}.path", self.path,
               f"source kind {self.kind!r} needs a path (a file, folder or s3:// URI)")
        if self.kind == "printed-digits":
            check(self.size is not None and 10 <= self.size <= 1_000_000, f"{name}.size",
                   self.size, "printed-digits needs a size in [10, 1000000] (images to render)")
            check(self.path is None, f"{name}.path", self.path,
                   "printed-digits is rendered, not read; remove the path")
        else:
            check(self.size is None, f"{name}.size", self.size,
                   "only printed-digits sources have a size; remove it")
        if self.hospitals is not None:
            check(self.kind == "camelyon17", f"{name}.hospitals", self.hospitals,
                   "only camelyon17 sources have hospitals")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How raw sources become the public / private / test splits.

    `private` is the sensitive dataset. If `public` / `test` are null they are
    carved out of `private`'s pool by `fractions` (stratified by class, seeded).
    A source that has an official test set (cifar10 `test_batch`) gives it to
    `test` when `test` is null. The defaults are the embedded default experiment
    (params.yaml): private = scikit-learn's handwritten digits, public = 6000
    printed digits rendered from matplotlib's fonts (its own source: the public
    fraction is 0), test = 20% of the handwritten pool.
    """

    private: SourceConfig = field(default_factory=SourceConfig)
    public: SourceConfig | None = field(
        default_factory=lambda: SourceConfig(kind="printed-digits", size=6000))
    test: SourceConfig | None = None
    fractions: Mapping[str, float] = field(
        default_factory=lambda: {"public": 0.0, "private": 0.8, "test": 0.2})
    image_size: int = 8
    channels: Literal[1, 3] = 1
    shard_size: int = 10_000

    def __post_init__(self) -> None:
        self.private.validate("data.private")
        if self.public is not None:
            self.public.validate("data.public")
        if self.test is not None:
            self.test.validate("data.test")
        check(set(self.fractions) == {"public", "private", "test"}, "data.fractions",
               dict(self.fractions), "needs exactly the keys public, private, test")
        check(all(0 <= v <= 1 for v in self.fractions.values())
               and abs(sum(self.fractions.values()) - 1) < 1e-6, "data.fractions",
               dict(self.fractions), "values must be in [0, 1] and sum to 1")
        check(4 <= self.image_size <= 512, "data.image_size", self.image_size,
               "must be in [4, 512]")
        check(self.shard_size >= 1, "data.shard_size", self.shard_size, "must be >= 1")

