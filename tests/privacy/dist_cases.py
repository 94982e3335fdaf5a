"""The cases dist_worker.py runs on several workers and test_distributed.py on one."""

from __future__ import annotations

import torch

from dpsynth.config import DiffusionConfig, ModelConfig
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.unet import UNetSpec, build_unet
from dpsynth.privacy.per_example import use_vmap_friendly_attention

# name -> (logical batch indices, sigma, train seed, noise seed)
CASES = {
    "sigma0": ([0, 2, 3, 5, 7, 8, 11], 0.0, 0, 1),
    "noise_only": ([], 1.5, 0, 5),
    "both": ([1, 4, 6, 9], 1.5, 3, 9),
}


def build() -> tuple[torch.nn.Module, DenoisingLoss, torch.Tensor, torch.Tensor]:
    """A seeded tiny UNet, the real loss, and 12 seeded 'private' images."""
    torch.manual_seed(0)
    spec = UNetSpec(8, 1, 3, ModelConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                         attention_levels=(1,)))
    net = build_unet(spec).train()
    use_vmap_friendly_attention(net)
    loss = DenoisingLoss.from_config(DiffusionConfig(num_train_timesteps=100), spec.null_label)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.randint(0, 3, (12,), generator=gen)
    return net, loss, x, y
