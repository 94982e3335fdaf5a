"""The `model` and `diffusion` sections: the UNet and the forward process and
training objective (the timestep distribution is also fine-tuning's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dpsynth.config.checks import check


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Class-conditional UNet (diffusers `UNet2DModel`, GroupNorm throughout).

    `attention_levels` lists the resolution levels (0 = full resolution) whose
    blocks get self-attention.
    """

    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (2,)
    norm_num_groups: int = 8
    dropout: float = 0.0
    # channels per attention head (heads = channels / this); 8 is diffusers' old
    # default. The paper-scale configs choose theirs from a GPU measurement
    # (docs/scale.md): wider heads mean fewer [tokens x tokens] score matrices.
    attention_head_dim: int = 8

    def __post_init__(self) -> None:
        check(len(self.block_out_channels) >= 1, "model.block_out_channels",
               self.block_out_channels, "needs at least one level")
        check(self.norm_num_groups >= 1, "model.norm_num_groups", self.norm_num_groups,
               "must be >= 1")
        check(all(c >= 1 for c in self.block_out_channels), "model.block_out_channels",
               self.block_out_channels, "each must be >= 1")
        check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "model.block_out_channels", self.block_out_channels,
               f"each must be a multiple of model.norm_num_groups={self.norm_num_groups}")
        check(self.layers_per_block >= 1, "model.layers_per_block", self.layers_per_block,
               "must be >= 1")
        check(all(0 <= a < len(self.block_out_channels) for a in self.attention_levels),
               "model.attention_levels", self.attention_levels,
               f"levels must be in [0, {len(self.block_out_channels) - 1}]")
        check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")
        check(self.attention_head_dim >= 1, "model.attention_head_dim",
              self.attention_head_dim, "must be >= 1")
        for a in self.attention_levels:
            check(self.block_out_channels[a] % self.attention_head_dim == 0,
                  "model.attention_head_dim", self.attention_head_dim,
                  f"must divide the {self.block_out_channels[a]} channels of attention "
                  f"level {a} (model.block_out_channels)")


@dataclass(frozen=True, kw_only=True)
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
        check(len(self.intervals) >= 1 and len(self.intervals) == len(self.weights),
               f"{name}.intervals", self.intervals,
               f"piecewise needs one weight per interval (got {len(self.weights)} weights)")
        for lo, hi in self.intervals:
            check(0 <= lo < hi <= num_train_timesteps, f"{name}.intervals", self.intervals,
                   f"each [lo, hi) needs 0 <= lo < hi <= {num_train_timesteps} "
                   f"(diffusion.num_train_timesteps): set {name} for it, e.g. "
                   "{kind: uniform}")
        check(all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
               f"{name}.weights", self.weights, "must be >= 0 with a positive sum")


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """Forward process and training objective."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    label_dropout: float = 0.1  # classifier-free guidance: p(label -> null)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)

    def __post_init__(self) -> None:
        check(self.num_train_timesteps >= 2, "diffusion.num_train_timesteps",
               self.num_train_timesteps, "must be >= 2")
        check(0 <= self.label_dropout < 1, "diffusion.label_dropout", self.label_dropout,
               "must be in [0, 1)")
        self.timesteps.validate("diffusion.timesteps", self.num_train_timesteps)

