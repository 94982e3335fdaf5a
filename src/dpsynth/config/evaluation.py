"""The sections of the stages after fine-tuning: `sample`, `fid`, `classify`,
`rank`, `audit`, `report`, `sweep`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from dpsynth.choices import ExtractorKind, SamplerKind
from dpsynth.config.checks import check


@dataclass(frozen=True, kw_only=True)
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
            check(getattr(self, name) >= 1, f"sample.{name}", getattr(self, name),
                   "must be >= 1")
        check(self.num_shards <= self.num_samples, "sample.num_shards", self.num_shards,
               f"must be <= sample.num_samples={self.num_samples}")
        check(0 <= self.eta <= 1, "sample.eta", self.eta, "must be in [0, 1]")
        check(self.guidance_scale >= 0, "sample.guidance_scale", self.guidance_scale,
               "must be >= 0")


@dataclass(frozen=True, kw_only=True)
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
            check(getattr(self, name) >= 1, f"fid.domain_cnn.{name}", getattr(self, name),
                   "must be >= 1")
        check(self.lr > 0, "fid.domain_cnn.lr", self.lr, "must be > 0")


@dataclass(frozen=True, kw_only=True)
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
    kid_subset_size: int = 300  # clipped to the number of features kept
    prc_neighborhood: int = 3  # k of the k-NN balls (Kynkaanniemi et al. 2019)
    domain_cnn: DomainCnnConfig = field(default_factory=DomainCnnConfig)

    def __post_init__(self) -> None:
        check(len(self.extractors) >= 1 and len(set(self.extractors)) == len(self.extractors),
               "fid.extractors", self.extractors, "needs at least one extractor, no repeats")
        for name in ("batch_size", "max_features", "kid_subsets", "kid_subset_size",
                     "prc_neighborhood"):
            check(getattr(self, name) >= 1, f"fid.{name}", getattr(self, name), "must be >= 1")
        check("inception-v3-compat" not in self.extractors or bool(self.inception_weights),
               "fid.inception_weights", self.inception_weights,
               "the inception-v3-compat extractor needs its weights file: download "
               "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's v0.2.0 "
               "release) on a machine with internet and set fid.inception_weights to its "
               "path or s3:// URI")


ClassifierAugment = Literal["none", "crop", "flip_crop"]


@dataclass(frozen=True, kw_only=True)
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
        check(self.depth >= 10 and (self.depth - 4) % 6 == 0, f"{name}.depth", self.depth,
               "WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...)")
        for key in ("widen", "epochs", "batch_size"):
            check(getattr(self, key) >= 1, f"{name}.{key}", getattr(self, key), "must be >= 1")
        check(0 <= self.dropout < 1, f"{name}.dropout", self.dropout, "must be in [0, 1)")
        check(self.lr > 0, f"{name}.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, f"{name}.weight_decay", self.weight_decay,
               "must be >= 0")
        check(0 <= self.momentum < 1, f"{name}.momentum", self.momentum, "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
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
        check(len(self.sizes) >= 1 and all(n >= 1 for n in self.sizes)
               and list(self.sizes) == sorted(set(self.sizes)), "classify.sizes", self.sizes,
               "needs increasing sizes >= 1")


# Configurations of clearly different quality, so that a ranking can show (params.yaml
# gives the measured accuracies): good recipes, a large lr, too few epochs, a tiny lr,
# a diverging lr.
_DEFAULT_GRID = tuple(ClassifierConfig(**point) for point in (
    {"epochs": 20}, {"depth": 16, "epochs": 20}, {"epochs": 20, "augment": "none"},
    {"lr": 1.0, "epochs": 10}, {"widen": 1, "epochs": 2, "augment": "none"},
    {"epochs": 1, "augment": "none"}, {"lr": 0.002, "epochs": 5},
    {"lr": 5.0, "epochs": 5}))


@dataclass(frozen=True, kw_only=True)
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
        check(len(self.grid) >= 2, "rank.grid", len(self.grid),
               "a ranking needs at least 2 configurations")
        check(0 < self.val_fraction < 1, "rank.val_fraction", self.val_fraction,
               "must be in (0, 1)")
        check(0 < self.confidence < 1, "rank.confidence", self.confidence,
               "must be in (0, 1), e.g. 0.95")
        # each tail of a percentile interval needs a draw beyond the bound, else the
        # bound is just the most extreme draw (1e-9: 2 / 0.05 is 40.000000000000004)
        min_draws = math.ceil(2 / (1 - self.confidence) - 1e-9)
        check(self.bootstrap >= min_draws, "rank.bootstrap", self.bootstrap,
               f"too few resamples for a {self.confidence:g} interval: need >= {min_draws} "
               "(2 / (1 - rank.confidence)); 1000 is usual")


@dataclass(frozen=True, kw_only=True)
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
        check(self.num_canaries >= 8, "audit.num_canaries", self.num_canaries, "must be >= 8")
        check(self.steps >= 1, "audit.steps", self.steps, "must be >= 1")
        # about m/2 canaries are included; the Poisson batch must stay below that
        check(1 <= self.batch_size <= self.num_canaries // 4, "audit.batch_size",
               self.batch_size, f"must be in [1, audit.num_canaries // 4 = "
               f"{self.num_canaries // 4}] (about half the canaries are in the training set)")
        check(self.lr > 0, "audit.lr", self.lr, "must be > 0")
        check(self.check_epsilon > 0, "audit.check_epsilon", self.check_epsilon,
               "must be > 0 (the check twin's target epsilon)")
        check(self.score_draws >= 1, "audit.score_draws", self.score_draws, "must be >= 1")
        lo, hi = self.score_t_range
        check(0 <= lo <= hi <= 1, "audit.score_t_range", list(self.score_t_range),
               "must be [lo, hi] with 0 <= lo <= hi <= 1")
        check(len(self.guess_fractions) >= 1 and all(0 < f <= 1 for f in self.guess_fractions),
               "audit.guess_fractions", list(self.guess_fractions),
               "needs at least one fraction in (0, 1]")
        check(0.5 <= self.confidence < 1, "audit.confidence", self.confidence,
               "must be in [0.5, 1)")
        check(self.memorization_samples >= 1, "audit.memorization_samples",
               self.memorization_samples, "must be >= 1")
        check(0 < self.memorization_ratio < 1, "audit.memorization_ratio",
               self.memorization_ratio, "must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
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
        check(1 <= self.examples_per_class <= 32, "report.examples_per_class",
               self.examples_per_class, "must be in [1, 32]")


@dataclass(frozen=True, kw_only=True)
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
        check(all(e > 0 for e in self.epsilons), "sweep.epsilons", list(self.epsilons),
               "every target epsilon must be > 0 (the public-only point, epsilon 0, is "
               "the baseline stage's)")
        check(all(a < b for a, b in zip(self.epsilons, self.epsilons[1:])), "sweep.epsilons",
               list(self.epsilons), "must be strictly increasing, e.g. [1, 2, 5, 10]")

