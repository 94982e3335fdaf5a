"""Training precision (`pretrain.precision`, `finetune.precision`): float32, or
bfloat16 autocast of the forward and backward.

Under "bf16" the weights, the optimizer state and every gradient that reaches
`.grad` stay float32 (autocast casts each matmul's and convolution's inputs,
not the parameters); the losses are reduced in float32. DP fine-tuning's
per-example norms, clipping factors, clipped sum and noise are float32 too
(`privacy.bookkeeping`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dpsynth.choices import PrecisionKind

# bf16 keeps 8 significant bits: unit roundoff 2**-8. Under bf16 the book-keeping
# engine clips to C * (1 - BF16_CLIP_MARGIN), four roundoffs below C: the margin
# absorbs the rounding of the bf16 per-example gradients whose norm it takes
# while their share of the clipped sum is formed in float32 from the rows
# (tests/privacy/test_bookkeeping.py measures each example's realised
# contribution, and what removing one record moves, against C).
BF16_CLIP_MARGIN = 2.0 ** -6


def autocast(precision: PrecisionKind, device: torch.device) -> torch.autocast:
    """bfloat16 autocast on `device` for "bf16"; a disabled one (nothing) for "fp32"."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def full_precision(device: torch.device) -> torch.autocast:
    """Autocast off (inside an autocast region): for the float32 book-keeping."""
    return torch.autocast(device.type, enabled=False)


@contextmanager
def exact_float32() -> Iterator[None]:
    """float32 convolutions and matmuls in IEEE float32, not TF32, inside.

    cuDNN runs float32 convolutions in TF32 by default (inputs rounded to 10
    bits). Where the book-keeping engine takes an example's norm from one
    computation and its share of the clipped sum from another, both must be
    float32-exact for the share to stay within C. CPUs have no TF32: no effect.
    """
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
