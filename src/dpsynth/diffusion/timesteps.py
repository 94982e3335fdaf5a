"""Distributions over training timesteps t in {0, ..., T-1}.

`Piecewise` is the paper's biased timestep sampling (Ghalebikesabi et al.
2023, Sec. 3.2): spending more of the (privacy-limited) training signal on the
timesteps that matter most for sample quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from dpsynth.config import TimestepConfig


class TimestepDistribution(Protocol):
    """Draws integer timesteps; `probs` is the exact pmf (for tests and plots)."""

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def probs(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Uniform:
    """t ~ U{0, ..., T-1}."""

    num_train_timesteps: int

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def probs(self) -> torch.Tensor:
        return torch.full((self.num_train_timesteps,), 1.0 / self.num_train_timesteps,
                          dtype=torch.float64)


@dataclass(frozen=True)
class Piecewise:
    """Mixture of uniforms on half-open `intervals` [lo, hi) with `weights`."""

    num_train_timesteps: int
    intervals: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        w = torch.tensor(self.weights, dtype=torch.float64)
        which = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
        lo = torch.tensor([a for a, _ in self.intervals])[which]
        width = torch.tensor([b - a for a, b in self.intervals])[which]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return lo + (u * width).long().clamp(max=width - 1)

    def probs(self) -> torch.Tensor:
        p = torch.zeros(self.num_train_timesteps, dtype=torch.float64)
        total = sum(self.weights)
        for (lo, hi), w in zip(self.intervals, self.weights):
            p[lo:hi] += w / total / (hi - lo)
        return p


def make_timestep_distribution(cfg: TimestepConfig,
                               num_train_timesteps: int) -> TimestepDistribution:
    if cfg.kind == "uniform":
        return Uniform(num_train_timesteps)
    return Piecewise(num_train_timesteps, cfg.intervals, cfg.weights)
