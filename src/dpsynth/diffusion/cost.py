"""What one image costs the configured UNet: FLOPs of a forward and a backward
pass, and the activation memory kept for the backward, counted on the meta
device (no weights, no memory), for `dpsynth plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from dpsynth.diffusion.unet import UNetSpec, build_unet
from dpsynth.privacy.per_example import use_vmap_friendly_attention


@dataclass(frozen=True)
class ModelCost:
    """The UNet's size and its cost for one image (one timestep, one copy).

    FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`:
    convolutions, matrix products and attention, a multiply-add as 2 FLOPs (as
    datasheet peaks count them); normalisation and elementwise ops are not.

    Attributes:
        num_parameters: d.
        forward_flops: one forward pass.
        train_flops: forward + backward (weight and activation gradients).
        activation_bytes: float32 tensors saved for the backward, per image.
        attention_score_bytes: the part of them that is attention's
            [tokens x tokens] score matrices, which fused SDPA kernels never
            materialise (the book-keeping engine keeps SDPA; vmap cannot).
    """

    num_parameters: int
    forward_flops: int
    train_flops: int
    activation_bytes: int
    attention_score_bytes: int = 0


def forward_backward_flops(forward: Callable[[], torch.Tensor]) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of `forward()` and the backward of its sum.

    >>> net = torch.nn.Linear(3, 4)  # forward 2·3·4 per row; backward: weight grad only
    >>> forward_backward_flops(lambda: net(torch.ones(5, 3)))
    (120, 240)
    """
    with FlopCounterMode(display=False) as counter:
        out = forward()
    fwd = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    return fwd, fwd + counter.get_total_flops()


def saved_activation_bytes(net: torch.nn.Module, forward: Callable[[], torch.Tensor],
                           only: Callable[[torch.Tensor], bool] | None = None) -> int:
    """Bytes of the tensors autograd keeps from `forward()` for the backward,
    each storage once, the parameters not counted (`only`: those tensors alone).

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> saved_activation_bytes(net, lambda: net(torch.ones(5, 3)))  # input 5x3, ReLU out 5x4
    140
    """
    params = {id(p.untyped_storage()) for p in net.parameters()}
    storages: dict[int, torch.UntypedStorage] = {}  # id -> storage (kept alive: ids stay unique)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if id(storage) not in params and (only is None or only(t)):
            storages[id(storage)] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(s.nbytes() for s in storages.values())


def unet_cost(spec: UNetSpec) -> ModelCost:
    """The cost of the UNet `build_unet(spec)` per image, built on the meta device
    (an 80M-parameter model is counted in about a second), with attention as
    fine-tuning runs it: explicit matrix products, which the counter sees on every
    device (fused CPU attention kernels are not counted).

    >>> from dpsynth.config import ModelConfig
    >>> c = unet_cost(UNetSpec(image_size=8, channels=1, num_classes=10, model=ModelConfig()))
    >>> c.num_parameters, c.forward_flops, c.train_flops, c.activation_bytes
    (280881, 7778304, 23314432, 224776)
    """
    batch = 2  # any batch > 1 is the same per image; 1 could take special paths
    with torch.device("meta"):
        net = build_unet(spec).train()
        use_vmap_friendly_attention(net)
        x = torch.zeros(batch, spec.channels, spec.image_size, spec.image_size)
        t = torch.zeros(batch, dtype=torch.long)
        y = torch.zeros(batch, dtype=torch.long)

        def forward() -> torch.Tensor:
            return net(x, t, class_labels=y).sample

        fwd, total = forward_backward_flops(forward)
        activations = saved_activation_bytes(net, forward)
        # [batch * heads, T, T] at the attention levels and the mid block (the lowest)
        levels = {*spec.model.attention_levels, len(spec.model.block_out_channels) - 1}
        tokens = {(spec.image_size // 2 ** level) ** 2 for level in levels}
        scores = saved_activation_bytes(net, forward, only=lambda v: (
            v.ndim == 3 and v.shape[-1] == v.shape[-2] and v.shape[-1] in tokens))
    return ModelCost(num_parameters=sum(p.numel() for p in net.parameters()),
                     forward_flops=fwd // batch, train_flops=total // batch,
                     activation_bytes=activations // batch,
                     attention_score_bytes=scores // batch)
