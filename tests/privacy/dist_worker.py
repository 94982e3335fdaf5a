"""Run under torchrun by test_distributed.py: one DP gradient per case on 2 workers.

Usage: torchrun --standalone --nproc_per_node 2 dist_worker.py OUT.safetensors
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from dpsynth.training.workers import Workers
from dpsynth.privacy.dp_sgd import DPStep, noisy_gradient
from dpsynth.privacy.draws import record_keys
from dist_cases import CASES, build  # type: ignore[import-not-found]


def main() -> None:
    torch.set_num_threads(1)
    workers = Workers.from_env(timeout_s=120)
    net, loss, x, y = build()
    out = {}
    for name, (indices, sigma, train_seed, noise_seed) in CASES.items():
        step = DPStep(noise_multiplier=sigma, max_grad_norm=0.5, expected_batch_size=4.0,
                      physical_batch_size=2, aug_multiplicity=2)
        # rank 0 alone knows the batch and the draw seed (the secret randomness)
        batch, draw_seed = workers.broadcast_step(
            torch.tensor(indices, dtype=torch.int64) if workers.is_main else None,
            train_seed if workers.is_main else None)
        grads = noisy_gradient(net, loss, x, y, batch, step, keys=record_keys(x, y),
                               draw_seed=draw_seed,
                               noise_generator=torch.Generator().manual_seed(noise_seed),
                               workers=workers)
        out[name] = torch.cat([g.flatten() for g in grads.values()])
    if workers.is_main:
        out["world_size"] = torch.tensor([workers.world_size])
        save_file(out, sys.argv[1])


if __name__ == "__main__":
    main()
