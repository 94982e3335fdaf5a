"""Typed, validated configuration.

One frozen dataclass per `params.yaml` section. Values are checked when the
dataclass is built, and errors name the field (`pretrain.steps=0: must be >= 1`).
Config fields are public settings only: nothing derived from private data lives
here (PRIVACY.md rule 6).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from dpsynth.choices import (EMBEDDED_KINDS, AccountantKind, ExtractorKind, PerExampleKind,
                             SamplerKind, SourceKind)
from dpsynth.errors import ConfigError

SplitRole = Literal["public", "private", "test"]


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


@dataclass(frozen=True)
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
        _check(self.kind in EMBEDDED_KINDS or bool(self.path), f"{name}.path", self.path,
               f"source kind {self.kind!r} needs a path (a file, folder or s3:// URI)")
        if self.kind == "printed-digits":
            _check(self.size is not None and 10 <= self.size <= 1_000_000, f"{name}.size",
                   self.size, "printed-digits needs a size in [10, 1000000] (images to render)")
            _check(self.path is None, f"{name}.path", self.path,
                   "printed-digits is rendered, not read; remove the path")
        else:
            _check(self.size is None, f"{name}.size", self.size,
                   "only printed-digits sources have a size; remove it")
        if self.hospitals is not None:
            _check(self.kind == "camelyon17", f"{name}.hospitals", self.hospitals,
                   "only camelyon17 sources have hospitals")


@dataclass(frozen=True)
class DataConfig:
    """How raw sources become the public / private / test splits.

    `private` is the sensitive dataset. If `public` / `test` are unset they are
    carved out of `private`'s pool by `fractions` (stratified by class, seeded).
    A source that has an official test set (cifar10 `test_batch`) gives it to
    `test` when `test` is unset.
    """

    private: SourceConfig = field(default_factory=SourceConfig)
    public: SourceConfig | None = None
    test: SourceConfig | None = None
    fractions: Mapping[str, float] = field(
        default_factory=lambda: {"public": 0.25, "private": 0.55, "test": 0.20})
    image_size: int = 8
    channels: Literal[1, 3] = 1
    shard_size: int = 10_000

    def __post_init__(self) -> None:
        self.private.validate("data.private")
        if self.public is not None:
            self.public.validate("data.public")
        if self.test is not None:
            self.test.validate("data.test")
        _check(set(self.fractions) == {"public", "private", "test"}, "data.fractions",
               dict(self.fractions), "needs exactly the keys public, private, test")
        _check(all(0 <= v <= 1 for v in self.fractions.values())
               and abs(sum(self.fractions.values()) - 1) < 1e-6, "data.fractions",
               dict(self.fractions), "values must be in [0, 1] and sum to 1")
        _check(4 <= self.image_size <= 512, "data.image_size", self.image_size,
               "must be in [4, 512]")
        _check(self.shard_size >= 1, "data.shard_size", self.shard_size, "must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """Class-conditional UNet (diffusers `UNet2DModel`, GroupNorm throughout).

    `attention_levels` lists the resolution levels (0 = full resolution) whose
    blocks get self-attention.
    """

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (2,)
    norm_num_groups: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check(len(self.block_out_channels) >= 1, "model.block_out_channels",
               self.block_out_channels, "needs at least one level")
        _check(self.norm_num_groups >= 1, "model.norm_num_groups", self.norm_num_groups,
               "must be >= 1")
        _check(all(c >= 1 for c in self.block_out_channels), "model.block_out_channels",
               self.block_out_channels, "each must be >= 1")
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "model.block_out_channels", self.block_out_channels,
               f"each must be a multiple of model.norm_num_groups={self.norm_num_groups}")
        _check(self.layers_per_block >= 1, "model.layers_per_block", self.layers_per_block,
               "must be >= 1")
        _check(all(0 <= a < len(self.block_out_channels) for a in self.attention_levels),
               "model.attention_levels", self.attention_levels,
               f"levels must be in [0, {len(self.block_out_channels) - 1}]")
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class TimestepConfig:
    """Distribution of training timesteps t in [0, num_train_timesteps).

    `uniform`, or `piecewise`: a mixture of uniform distributions on
    `intervals` (half-open [lo, hi)) with `weights` -- the paper's biased
    timestep sampling (Ghalebikesabi et al. 2023, Sec. 3.2).
    """

    kind: Literal["uniform", "piecewise"] = "uniform"
    intervals: tuple[tuple[int, int], ...] = ()
    weights: tuple[float, ...] = ()

    def validate(self, name: str, num_train_timesteps: int) -> None:
        if self.kind == "uniform":
            return
        _check(len(self.intervals) >= 1 and len(self.intervals) == len(self.weights),
               f"{name}.intervals", self.intervals,
               f"piecewise needs one weight per interval (got {len(self.weights)} weights)")
        for lo, hi in self.intervals:
            _check(0 <= lo < hi <= num_train_timesteps, f"{name}.intervals", self.intervals,
                   f"each [lo, hi) needs 0 <= lo < hi <= {num_train_timesteps}")
        _check(all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
               f"{name}.weights", self.weights, "must be >= 0 with a positive sum")


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward process and training objective."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    label_dropout: float = 0.1  # classifier-free guidance: p(label -> null)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)

    def __post_init__(self) -> None:
        _check(self.num_train_timesteps >= 2, "diffusion.num_train_timesteps",
               self.num_train_timesteps, "must be >= 2")
        _check(0 <= self.label_dropout < 1, "diffusion.label_dropout", self.label_dropout,
               "must be in [0, 1)")
        self.timesteps.validate("diffusion.timesteps", self.num_train_timesteps)


@dataclass(frozen=True)
class PretrainConfig:
    """Non-private pre-training on the public split."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, f"pretrain.{name}", getattr(self, name),
                   "must be >= 1")
        _check(self.lr > 0, "pretrain.lr", self.lr, "must be > 0")
        _check(self.warmup_steps >= 0, "pretrain.warmup_steps", self.warmup_steps,
               "must be >= 0")
        _check(0 <= self.ema_decay < 1, "pretrain.ema_decay", self.ema_decay,
               "must be in [0, 1)")


@dataclass(frozen=True)
class FinetuneConfig:
    """DP-SGD fine-tuning on the private split (Ghalebikesabi et al. 2023, Sec. 3).

    The target (epsilon, delta) is the setting; the noise multiplier sigma is
    calibrated from it before training. `batch_size` is the *expected* logical
    batch B = qN of Poisson sampling; the sample rate q = B/N is computed at run
    time, since N is a property of the private data (PRIVACY.md rule 6).
    """

    epsilon: float = 10.0
    delta: float = 1e-5
    accountant: AccountantKind = "prv"
    # Poisson sampling is what the accountants assume; "shuffle" (fixed-size
    # shuffled batches) is refused: reported with Poisson accounting it can
    # understate epsilon many times over (Chua et al. 2024; Lebeda et al. 2024).
    batch_sampler: Literal["poisson", "shuffle"] = "poisson"
    batch_size: int = 128
    physical_batch_size: int = 32  # examples per vmapped micro-batch (memory only)
    steps: int = 200
    max_grad_norm: float = 1.0  # C
    aug_multiplicity: int = 4  # K draws of (t, noise, augmentation) per example
    augment: Literal["none", "flip", "flip_crop"] = "none"
    lr: float = 2e-4
    ema_decay: float = 0.99
    # params.yaml sets the paper's biased (piecewise) sampling; the code default is
    # uniform because piecewise intervals depend on diffusion.num_train_timesteps
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    checkpoint_every: int = 50
    log_every: int = 10
    # Only for tests: a fixed seed for the DP randomness (Poisson sampling and
    # Gaussian noise). Release runs leave it null and draw from OS entropy.
    noise_seed: int | None = None
    # Pre-trained on another label set (ImageNet32 -> CIFAR-10): start the class
    # embedding afresh for the private split's classes; every other weight is kept.
    reinit_class_embedding: bool = False
    # Which weights DP-SGD trains: glob patterns over parameter names ("*" = all);
    # the rest stay at their pre-trained values. Fewer trained coordinates means
    # less noise in the update: its norm grows like sqrt(d) (DP-LDM, DP-LoRA).
    # E.g. ["*norm*", "class_embedding.*"] trains the GroupNorms and the class
    # embedding only. A pattern that matches nothing is an error.
    trainable: tuple[str, ...] = ("*",)
    # > 0: each Linear/Conv2d weight that `trainable` matches is frozen and gets a
    # rank-`lora_rank` adapter (LoRA) instead; the other matched parameters (biases,
    # norms, embeddings) are trained directly. Merged into the weights on publish.
    lora_rank: int = 0
    lora_alpha: float | None = None  # adapter scale alpha / rank; None = rank (scale 1)
    # The per-example engine: vmap(grad) (the reference), or book-keeping hooks over
    # the B*K rows (privacy/bookkeeping.py; same clipped sum, one backward)
    per_example: PerExampleKind = "vmap"

    def __post_init__(self) -> None:
        _check(self.epsilon > 0, "finetune.epsilon", self.epsilon, "must be > 0")
        _check(len(self.trainable) >= 1 and all(isinstance(p, str) and p for p in self.trainable),
               "finetune.trainable", self.trainable,
               'needs at least one glob pattern over parameter names, e.g. ["*"]')
        _check(self.lora_rank >= 0, "finetune.lora_rank", self.lora_rank,
               "must be >= 0 (0 = no adapters)")
        _check(self.lora_alpha is None or self.lora_alpha > 0, "finetune.lora_alpha",
               self.lora_alpha, "must be > 0, or null for alpha = lora_rank")
        _check(0 < self.delta < 1, "finetune.delta", self.delta, "must be in (0, 1)")
        _check(self.batch_sampler == "poisson", "finetune.batch_sampler", self.batch_sampler,
               "shuffled fixed-size batches with Poisson accounting understate epsilon "
               "(Chua et al. 2024); use poisson")
        for name in ("batch_size", "physical_batch_size", "steps", "checkpoint_every",
                     "log_every"):
            _check(getattr(self, name) >= 1, f"finetune.{name}", getattr(self, name),
                   "must be >= 1")
        _check(self.aug_multiplicity >= 1, "finetune.aug_multiplicity", self.aug_multiplicity,
               "must be >= 1 (K augmentations per example)")
        _check(self.max_grad_norm > 0, "finetune.max_grad_norm", self.max_grad_norm,
               "must be > 0")
        _check(self.lr > 0, "finetune.lr", self.lr, "must be > 0")
        _check(0 <= self.ema_decay < 1, "finetune.ema_decay", self.ema_decay,
               "must be in [0, 1)")


@dataclass(frozen=True)
class PrivacyConfig:
    """Dataset-level privacy budget (ε, δ), enforced by the ledger across all runs.

    Every run on a dataset is composed at `dataset_budget_delta`, which the
    ledger records at its first reservation and which never changes after; a run
    whose `finetune.delta` exceeds it is refused.
    """

    dataset_budget_epsilon: float = 30.0
    dataset_budget_delta: float = 1e-5
    ledger_dir: str = "artifacts/ledger"

    def __post_init__(self) -> None:
        _check(self.dataset_budget_epsilon > 0, "privacy.dataset_budget_epsilon",
               self.dataset_budget_epsilon, "must be > 0")
        _check(0 < self.dataset_budget_delta < 1, "privacy.dataset_budget_delta",
               self.dataset_budget_delta, "must be in (0, 1)")


@dataclass(frozen=True)
class SampleConfig:
    """Synthetic data generation."""

    num_samples: int = 2000
    num_shards: int = 4
    batch_size: int = 500
    sampler: SamplerKind = "dpmsolver++"
    num_inference_steps: int = 25
    eta: float = 0.0  # DDIM only: 0 = deterministic DDIM, 1 = DDPM-like
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = conditional model alone

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_shards", "batch_size", "num_inference_steps"):
            _check(getattr(self, name) >= 1, f"sample.{name}", getattr(self, name),
                   "must be >= 1")
        _check(self.num_shards <= self.num_samples, "sample.num_shards", self.num_shards,
               f"must be <= sample.num_samples={self.num_samples}")
        _check(0 <= self.eta <= 1, "sample.eta", self.eta, "must be in [0, 1]")
        _check(self.guidance_scale >= 0, "sample.guidance_scale", self.guidance_scale,
               "must be >= 0")


@dataclass(frozen=True)
class DomainCnnConfig:
    """The domain feature extractor for FD: a small CNN classifier trained on the
    public split only (never the private one), whose penultimate layer gives the
    features. Deterministic for a given seed."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    width: int = 32  # channels of the first conv; doubled at each of the 2 downsamplings
    feature_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "width", "feature_dim"):
            _check(getattr(self, name) >= 1, f"fid.domain_cnn.{name}", getattr(self, name),
                   "must be >= 1")
        _check(self.lr > 0, "fid.domain_cnn.lr", self.lr, "must be > 0")


@dataclass(frozen=True)
class FidConfig:
    """Distribution metrics between synthetic data and the real test split.

    Each extractor gives its own metric names: `inception-v3-compat` gives
    `fid_inception`, `kid_inception`, ...; `domain-cnn` gives `fd_<source>_cnn`,
    ... (a Frechet distance in another feature space is not "FID").
    """

    extractors: tuple[ExtractorKind, ...] = ("domain-cnn",)
    # torch-fidelity's Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth),
    # a local path or s3:// URI: nothing is downloaded at run time.
    inception_weights: str | None = None
    batch_size: int = 256
    # FID uses streamed mean/covariance of all images; KID and precision/recall
    # need the features themselves, so they use a seeded uniform subsample of at
    # most this many per side (memory stays flat in the number of images).
    max_features: int = 10_000
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # clipped to the number of features kept
    prc_neighborhood: int = 3  # k of the k-NN balls (Kynkaanniemi et al. 2019)
    domain_cnn: DomainCnnConfig = field(default_factory=DomainCnnConfig)

    def __post_init__(self) -> None:
        _check(len(self.extractors) >= 1 and len(set(self.extractors)) == len(self.extractors),
               "fid.extractors", self.extractors, "needs at least one extractor, no repeats")
        for name in ("batch_size", "max_features", "kid_subsets", "kid_subset_size",
                     "prc_neighborhood"):
            _check(getattr(self, name) >= 1, f"fid.{name}", getattr(self, name), "must be >= 1")
        _check("inception-v3-compat" not in self.extractors or bool(self.inception_weights),
               "fid.inception_weights", self.inception_weights,
               "the inception-v3-compat extractor needs its weights file: download "
               "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's v0.2.0 "
               "release) on a machine with internet and set fid.inception_weights to its "
               "path or s3:// URI")


ClassifierAugment = Literal["none", "crop", "flip_crop"]


@dataclass(frozen=True)
class ClassifierConfig:
    """A downstream classifier: WRN-depth-widen (Zagoruyko & Komodakis 2016) and its
    training recipe (SGD, Nesterov momentum, cosine learning rate)."""

    depth: int = 10  # (depth - 4) % 6 == 0; the paper uses WRN-40-4 on CIFAR-10
    widen: int = 2
    dropout: float = 0.0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    augment: ClassifierAugment = "crop"  # kornia; digits are not flip-symmetric

    def validate(self, name: str) -> None:
        _check(self.depth >= 10 and (self.depth - 4) % 6 == 0, f"{name}.depth", self.depth,
               "WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...)")
        for key in ("widen", "epochs", "batch_size"):
            _check(getattr(self, key) >= 1, f"{name}.{key}", getattr(self, key), "must be >= 1")
        _check(0 <= self.dropout < 1, f"{name}.dropout", self.dropout, "must be in [0, 1)")
        _check(self.lr > 0, f"{name}.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, f"{name}.weight_decay", self.weight_decay,
               "must be >= 0")
        _check(0 <= self.momentum < 1, f"{name}.momentum", self.momentum, "must be in [0, 1)")


@dataclass(frozen=True)
class ClassifyConfig:
    """Downstream accuracy of a classifier trained on synthetic data only, as a
    function of the number of synthetic samples (paper Fig. 3)."""

    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    sizes: tuple[int, ...] = (250, 500, 1000, 2000)  # must be <= sample.num_samples
    # The same classifier trained on the real private split: the non-private upper
    # bound. For evaluation only: it is not covered by (epsilon, delta) and is
    # labelled so everywhere; turn it off where even that number must not leave.
    real_baseline: bool = True

    def __post_init__(self) -> None:
        self.classifier.validate("classify.classifier")
        _check(len(self.sizes) >= 1 and all(n >= 1 for n in self.sizes)
               and list(self.sizes) == sorted(set(self.sizes)), "classify.sizes", self.sizes,
               "needs increasing sizes >= 1")


# A small default grid (code default; params.yaml states its own).
_DEFAULT_GRID = (ClassifierConfig(lr=0.05), ClassifierConfig(lr=0.01),
                 ClassifierConfig(widen=1), ClassifierConfig(augment="none"))


@dataclass(frozen=True)
class RankConfig:
    """Hyperparameter ranking on synthetic data (paper Sec. 5.3, Fig. 4): each grid
    point is trained on a synthetic train split and scored on a synthetic
    validation split (which alone chooses) and on the real test split (which only
    measures whether the synthetic ranking holds).

    Attributes:
        grid: the classifier configurations to rank.
        val_fraction: share of the synthetic set held out as synthetic validation.
        bootstrap: resamples of the real test examples for the confidence interval
            of Spearman rho and Kendall tau (`dpsynth.eval.ranking.bootstrap_interval`).
        confidence: coverage of that percentile interval.
    """

    grid: tuple[ClassifierConfig, ...] = _DEFAULT_GRID
    val_fraction: float = 0.2
    bootstrap: int = 1000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        for i, c in enumerate(self.grid):
            c.validate(f"rank.grid[{i}]")
        _check(len(self.grid) >= 2, "rank.grid", len(self.grid),
               "a ranking needs at least 2 configurations")
        _check(0 < self.val_fraction < 1, "rank.val_fraction", self.val_fraction,
               "must be in (0, 1)")
        _check(0 < self.confidence < 1, "rank.confidence", self.confidence,
               "must be in (0, 1), e.g. 0.95")
        # each tail of a percentile interval needs a draw beyond the bound, else the
        # bound is just the most extreme draw (1e-9: 2 / 0.05 is 40.000000000000004)
        min_draws = math.ceil(2 / (1 - self.confidence) - 1e-9)
        _check(self.bootstrap >= min_draws, "rank.bootstrap", self.bootstrap,
               f"too few resamples for a {self.confidence:g} interval: need >= {min_draws} "
               "(2 / (1 - rank.confidence)); 1000 is usual")


@dataclass(frozen=True)
class AuditConfig:
    """`dpsynth audit`: an empirical check of the DP guarantee (PRIVACY.md,
    "Empirical checks") and of memorization, beside the proof.

    The membership audit (Steinke, Nasr & Jagielski 2023, one training run)
    trains a twin of the fine-tuning run from the same pre-trained model, with
    the same mechanism, (epsilon, delta) target, C and K, on `num_canaries`
    noise canaries each included with probability 1/2 (public data only: it
    spends none of the private budget), then a non-private control of the same
    run. Its own `steps`, `batch_size` and `lr` keep it cheap; a larger lr only
    makes the audit stronger (the guarantee holds for any lr).
    """

    num_canaries: int = 256  # m; about m/2 end up in the twin's training set
    steps: int = 100
    batch_size: int = 64  # expected logical batch of the twin runs (q = B / #included)
    lr: float = 2e-3
    score_draws: int = 8  # (t, noise) pairs per canary on the fixed scoring grid
    score_t_range: tuple[float, float] = (0.05, 0.5)  # fractions of T
    guess_fractions: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)  # k+ = k- = f * m / 2
    confidence: float = 0.95
    control: bool = True  # also train the non-private control (shows the audit's power)
    # A second DP twin with sigma calibrated to this epsilon: small enough that the
    # audit can refute it (256 canaries at 95% and delta = 1e-5 certify at most 4.05),
    # so a broken mechanism can fail the audit even when the claim (10) is too large
    # for any one-run audit to test.
    check_epsilon: float = 1.0
    memorization_samples: int = 2000  # generated samples checked against the private split
    memorization_ratio: float = 1 / 3  # near-copy: d1 / d2 below this (Carlini et al. 2023)

    def __post_init__(self) -> None:
        _check(self.num_canaries >= 8, "audit.num_canaries", self.num_canaries, "must be >= 8")
        _check(self.steps >= 1, "audit.steps", self.steps, "must be >= 1")
        # about m/2 canaries are included; the Poisson batch must stay below that
        _check(1 <= self.batch_size <= self.num_canaries // 4, "audit.batch_size",
               self.batch_size, f"must be in [1, audit.num_canaries // 4 = "
               f"{self.num_canaries // 4}] (about half the canaries are in the training set)")
        _check(self.lr > 0, "audit.lr", self.lr, "must be > 0")
        _check(self.check_epsilon > 0, "audit.check_epsilon", self.check_epsilon,
               "must be > 0 (the check twin's target epsilon)")
        _check(self.score_draws >= 1, "audit.score_draws", self.score_draws, "must be >= 1")
        lo, hi = self.score_t_range
        _check(0 <= lo <= hi <= 1, "audit.score_t_range", list(self.score_t_range),
               "must be [lo, hi] with 0 <= lo <= hi <= 1")
        _check(len(self.guess_fractions) >= 1 and all(0 < f <= 1 for f in self.guess_fractions),
               "audit.guess_fractions", list(self.guess_fractions),
               "needs at least one fraction in (0, 1]")
        _check(0.5 <= self.confidence < 1, "audit.confidence", self.confidence,
               "must be in [0.5, 1)")
        _check(self.memorization_samples >= 1, "audit.memorization_samples",
               self.memorization_samples, "must be >= 1")
        _check(0 < self.memorization_ratio < 1, "audit.memorization_ratio",
               self.memorization_ratio, "must be in (0, 1)")


@dataclass(frozen=True)
class ReportConfig:
    """`dpsynth report`: the self-contained HTML page a data owner hands on.

    The noise multiplier sigma and the sample rate q = B/N are withheld by
    default: q gives the private split's size N, and so does sigma together with
    the published epsilon, delta, steps and accountant (PRIVACY.md rule 6).
    """

    examples_per_class: int = 6  # synthetic (and real) images per class, side by side
    # Real images of the test split next to the synthetic ones. The test split is
    # real data, not covered by (epsilon, delta); turn off where even held-out
    # images must not be shown. Private images are never shown.
    real_examples: bool = True
    # Print sigma and q. Only where the private split's size is public anyway
    # (e.g. CIFAR-10's 50,000 training images).
    disclose_private_size: bool = False

    def __post_init__(self) -> None:
        _check(1 <= self.examples_per_class <= 32, "report.examples_per_class",
               self.examples_per_class, "must be in [1, 32]")


@dataclass(frozen=True)
class SweepConfig:
    """`dpsynth sweep`: the privacy-utility curve (paper Fig. 2): the public-only
    point (epsilon 0), the run's own DP model at ``finetune.epsilon``, and one more
    DP fine-tuning run per other target here, each sampled and scored like the
    run's, next to the real-data baseline.

    Every extra point is a run on the private data: the sweep reserves all of
    them in the privacy ledger at once, before any trains, and is refused whole
    when they would take the dataset past ``privacy.dataset_budget_epsilon``.

    Attributes:
        epsilons: the target epsilons, increasing (each a ``finetune.epsilon``; every
            other setting is the run's). Empty (the default, `make run`): the curve
            is the run's own points and nothing more is trained; `make sweep` sets
            [1, 2, 5, 10]. A target equal to ``finetune.epsilon`` is the run's model.
    """

    epsilons: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _check(all(e > 0 for e in self.epsilons), "sweep.epsilons", list(self.epsilons),
               "every target epsilon must be > 0 (the public-only point, epsilon 0, is "
               "the baseline stage's)")
        _check(all(a < b for a, b in zip(self.epsilons, self.epsilons[1:])), "sweep.epsilons",
               list(self.epsilons), "must be strictly increasing, e.g. [1, 2, 5, 10]")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking. The URI comes from `MLFLOW_TRACKING_URI` when set."""

    enabled: bool = True
    experiment: str = "dpsynth"
    tracking_uri: str = "sqlite:///mlflow.db"


@dataclass(frozen=True)
class StorageConfig:
    """Object storage for `s3://` paths (AWS S3, MinIO, ...), used by `dpsynth.io.s3`.

    Credentials are never configured here: boto3's standard chain finds them
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, a pod's role).

    Attributes:
        endpoint_url: S3 endpoint, e.g. `http://minio:9000`; the environment's
            AWS_ENDPOINT_URL(_S3) wins when set; unset means AWS.
        cache_dir: local copies of s3:// inputs and staging of outputs;
            DPSYNTH_CACHE_DIR wins; default `~/.cache/dpsynth`.
        retry_mode: botocore's retry mode for transient errors (throttling, 5xx).
        max_attempts: attempts per request, the first included.
        multipart_threshold_mb: files at least this large are sent and fetched in parts.
        multipart_chunksize_mb: part size (S3's minimum is 5 MiB).
        max_concurrency: parallel part transfers per file.
        addressing_style: `auto` is path-style with a custom endpoint (what MinIO
            wants), botocore's choice otherwise.
    """

    endpoint_url: str | None = None
    cache_dir: str | None = None
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: int = 5
    multipart_threshold_mb: int = 64
    multipart_chunksize_mb: int = 16
    max_concurrency: int = 4
    addressing_style: Literal["auto", "path", "virtual"] = "auto"

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            if "@" in self.endpoint_url.split("/")[2 if "//" in self.endpoint_url else 0]:
                # not echoed: the part before "@" would be a credential
                raise ConfigError("storage.endpoint_url: holds user:password@; remove it. "
                                  "Credentials come from boto3's standard chain "
                                  "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                                  "~/.aws, a pod's role), never from the config")
            _check(re.fullmatch(r"https?://[^/@\s]+(/\S*)?", self.endpoint_url) is not None,
                   "storage.endpoint_url", self.endpoint_url,
                   "must be an http(s)://host[:port] URL")
        _check(1 <= self.max_attempts <= 20, "storage.max_attempts", self.max_attempts,
               "must be in [1, 20]")
        _check(self.multipart_chunksize_mb >= 5, "storage.multipart_chunksize_mb",
               self.multipart_chunksize_mb, "must be >= 5 (S3's minimum part size)")
        _check(self.multipart_threshold_mb >= 5, "storage.multipart_threshold_mb",
               self.multipart_threshold_mb, "must be >= 5 (S3's minimum part size)")
        _check(1 <= self.max_concurrency <= 64, "storage.max_concurrency",
               self.max_concurrency, "must be in [1, 64]")


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration (`params.yaml`)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        # cross-section check: fine-tuning timesteps live in the diffusion's range
        self.finetune.timesteps.validate("finetune.timesteps", self.diffusion.num_train_timesteps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def section(self, *names: str) -> dict[str, Any]:
        """The resolved values of some sections, for logging as a stage's params."""
        full = self.to_dict()
        return {name: full[name] for name in names}


# --------------------------------------------------------------------------- loading


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float. PyYAML follows YAML 1.1, where
    a float needs a dot (`1.0e-3`), so `--set pretrain.lr=1e-3` was a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """YAML (safe) with `1e-3` read as a float, as `--set` and config files are read."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _build(cls: Any, raw: Any, where: str) -> Any:
    """Build dataclass/typed value `cls` from YAML data, naming `where` in errors."""
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}={raw!r}: must be a mapping")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known keys: "
                              f"{sorted(names)}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in raw.items()}
        try:
            return cls(**kwargs)
        except TypeError as err:  # e.g. a missing required field
            raise ConfigError(f"{where or 'config'}: {err}") from None
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], raw, where)
    if origin is Literal:
        # type-strict: `true` or `1.0` must not pass as the choice 1
        if not any(type(raw) is type(a) and raw == a for a in args):
            raise ConfigError(f"{where}={raw!r}: must be one of {list(args)}")
        return raw
    if origin is tuple:
        if not isinstance(raw, Sequence) or isinstance(raw, str):
            raise ConfigError(f"{where}={raw!r}: must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(raw))
        if len(raw) != len(args):
            raise ConfigError(f"{where}={raw!r}: must have {len(args)} items")
        return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, raw)))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}={raw!r}: must be a mapping")
        vt = args[1] if args else Any
        return {str(k): _build(vt, v, f"{where}.{k}") for k, v in raw.items()}
    if cls is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}={raw!r}: must be true or false")
        return raw
    if cls is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where}={raw!r}: must be an integer")
        return raw
    if cls is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{where}={raw!r}: must be a number")
        return float(raw)
    if cls is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}={raw!r}: must be a string")
        return raw
    return raw


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. pretrain.steps=100")
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml_load(value)


def from_dict(raw: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated `Config` from a mapping plus `--set` style overrides."""
    tree = json.loads(json.dumps(raw or {}))  # deep copy, plain types
    for assignment in overrides:
        _apply_override(tree, assignment)
    return _build(Config, tree, "")


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when `path` is None)."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass --config params.yaml "
                              "or one of configs/*.yaml")
        try:
            raw = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)  # one line, not PyYAML's multi-line text
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            why = getattr(err, "problem", None) or " ".join(str(err).split())
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {why}; "
                              "fix the file") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    return from_dict(raw, overrides)
