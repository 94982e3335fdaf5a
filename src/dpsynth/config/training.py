"""The `pretrain`, `finetune` (DP-SGD) and `privacy` (the dataset's budget) sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dpsynth.choices import AccountantKind, PerExampleKind, PrecisionKind
from dpsynth.config.checks import check
from dpsynth.config.model import TimestepConfig


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Non-private pre-training on the public split."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    checkpoint_every: int = 250
    log_every: int = 25
    # bf16: the forward and backward under bfloat16 autocast (float32 weights and
    # optimizer); about twice the throughput on Ampere and newer GPUs
    precision: PrecisionKind = "fp32"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            check(getattr(self, name) >= 1, f"pretrain.{name}", getattr(self, name),
                   "must be >= 1")
        check(self.lr > 0, "pretrain.lr", self.lr, "must be > 0")
        check(self.warmup_steps >= 0, "pretrain.warmup_steps", self.warmup_steps,
               "must be >= 0")
        check(0 <= self.ema_decay < 1, "pretrain.ema_decay", self.ema_decay,
               "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
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
    batch_size: int = 1024
    physical_batch_size: int = 64  # examples per per-example micro-batch (memory only)
    steps: int = 50
    max_grad_norm: float = 1.0  # C
    aug_multiplicity: int = 4  # K draws of (t, noise, augmentation) per example
    augment: Literal["none", "flip", "flip_crop"] = "none"
    lr: float = 5e-3
    ema_decay: float = 0.99
    # The paper's biased timestep sampling (Sec. 3.2), on the default 1000 timesteps:
    # a model with another diffusion.num_train_timesteps sets its own intervals.
    timesteps: TimestepConfig = field(default_factory=lambda: TimestepConfig(
        kind="piecewise", intervals=((0, 200), (200, 800), (800, 1000)),
        weights=(0.1, 0.7, 0.2)))
    checkpoint_every: int = 10
    log_every: int = 5
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
    # The per-example engine: book-keeping hooks over the B*K rows (privacy/
    # bookkeeping.py: one forward and one backward), or vmap(grad) (per_example.py:
    # every example's gradient materialised; the reference, the same clipped sum)
    per_example: PerExampleKind = "bookkeeping"
    # bf16 (book-keeping engine only): the B*K rows' forward and backward under
    # bfloat16 autocast; norms, clipping factors, the clipped sum and the noise stay
    # float32, and the factors clip to C * (1 - 2**-6) to absorb bf16 rounding
    precision: PrecisionKind = "fp32"

    def __post_init__(self) -> None:
        check(self.epsilon > 0, "finetune.epsilon", self.epsilon, "must be > 0")
        check(self.precision == "fp32" or self.per_example == "bookkeeping",
               "finetune.precision", self.precision,
               "bf16 needs finetune.per_example=bookkeeping (the vmap engine runs in "
               "float32): set both, or precision=fp32")
        check(len(self.trainable) >= 1 and all(isinstance(p, str) and p for p in self.trainable),
               "finetune.trainable", self.trainable,
               'needs at least one glob pattern over parameter names, e.g. ["*"]')
        check(self.lora_rank >= 0, "finetune.lora_rank", self.lora_rank,
               "must be >= 0 (0 = no adapters)")
        check(self.lora_alpha is None or self.lora_alpha > 0, "finetune.lora_alpha",
               self.lora_alpha, "must be > 0, or null for alpha = lora_rank")
        check(0 < self.delta < 1, "finetune.delta", self.delta, "must be in (0, 1)")
        check(self.batch_sampler == "poisson", "finetune.batch_sampler", self.batch_sampler,
               "shuffled fixed-size batches with Poisson accounting understate epsilon "
               "(Chua et al. 2024); use poisson")
        for name in ("batch_size", "physical_batch_size", "steps", "checkpoint_every",
                     "log_every"):
            check(getattr(self, name) >= 1, f"finetune.{name}", getattr(self, name),
                   "must be >= 1")
        check(self.aug_multiplicity >= 1, "finetune.aug_multiplicity", self.aug_multiplicity,
               "must be >= 1 (K augmentations per example)")
        check(self.max_grad_norm > 0, "finetune.max_grad_norm", self.max_grad_norm,
               "must be > 0")
        check(self.lr > 0, "finetune.lr", self.lr, "must be > 0")
        check(0 <= self.ema_decay < 1, "finetune.ema_decay", self.ema_decay,
               "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
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
        check(self.dataset_budget_epsilon > 0, "privacy.dataset_budget_epsilon",
               self.dataset_budget_epsilon, "must be > 0")
        check(0 < self.dataset_budget_delta < 1, "privacy.dataset_budget_delta",
               self.dataset_budget_delta, "must be in (0, 1)")

