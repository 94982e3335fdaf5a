"""Exponential moving average of weights (used for sampling)."""

from __future__ import annotations

import copy

import torch


class EMA:
    """`shadow = decay * shadow + (1 - decay) * weights`, after each real optimizer step.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) so early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow.parameters(), net.parameters()):
            s.lerp_(p.detach(), 1 - d)
        for s, b in zip(self.shadow.buffers(), net.buffers()):
            s.copy_(b)
