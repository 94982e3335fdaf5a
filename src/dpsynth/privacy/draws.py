"""The per-example training draws of DP-SGD, keyed by the record itself
(PRIVACY.md rule 2: an example's draws depend on that example alone).

Each example of a logical batch gets K draws of (augmentation, timestep t,
diffusion noise, label dropout) from a generator of its own, seeded by the
step's secret draw seed and the example's *record key*, a hash of its content.
So removing one record from the private split leaves every other record's
draws, and so its clipped gradient, unchanged: the clipped sum moves by at most
C, which is the sensitivity the accountant assumes. (Keying by the example's
index would not do: removing record 0 shifts every later index, and with it
every later record's draws; measured on 256 records with C = 0.1, the clipped
sum then moved by 10.9 C.) The step seed comes from the secret randomness
(`dp_sgd.SecretRandomness`), so the draws are not public either.

Two identical records (same pixels, same label) share a key and so their
draws: that does not change the sensitivity (removing one removes one term).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from dpsynth.diffusion.augment import AugmentKind, augment
from dpsynth.diffusion.loss import DenoisingLoss

_MASK63 = (1 << 63) - 1  # torch.Generator.manual_seed takes up to 64 bits; keep int64-safe


def record_keys(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
                ) -> torch.Tensor:
    """One 63-bit key per record, a hash of its pixels, shape and label.

    Args:
        images: [N, ...] the records' pixels, as read from the shards (uint8 NHWC)
            or as tensors (any dtype: the key hashes the raw bytes).
        labels: [N] integer labels.

    Returns:
        [N] int64 keys (CPU). They are private-derived values: used only to seed
        draws, never logged or saved.
    """
    images = np.ascontiguousarray(images.numpy() if isinstance(images, torch.Tensor) else images)
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)=} must equal {len(labels)=}")
    shape = repr(images.shape[1:]).encode()
    keys = [int.from_bytes(hashlib.blake2b(img.tobytes() + shape + int(label).to_bytes(
        8, "little", signed=True), digest_size=8).digest(), "little") & _MASK63
        for img, label in zip(images, labels)]
    return torch.tensor(keys, dtype=torch.int64)


def example_seed(draw_seed: int, key: int) -> int:
    """The seed of one example's generator at one step: a hash of (step seed, key)."""
    data = (int(draw_seed) & _MASK63).to_bytes(8, "little") + (int(key) & _MASK63).to_bytes(
        8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def draw_copies(loss: DenoisingLoss, x: torch.Tensor, y: torch.Tensor, k: int,
                kind: AugmentKind, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K draws of (augmentation, t, noise, label dropout) for each example.

    Args:
        x: [b, C, H, W]; y: [b].

    Returns:
        x0 [b, K, C, H, W], labels [b, K], t [b, K], noise [b, K, C, H, W].
    """
    b, shape = len(x), x.shape[1:]
    xk = augment(x.repeat_interleave(k, 0), kind, generator)
    t, noise, labels = loss.draw(xk, y.repeat_interleave(k, 0), generator)
    return (xk.view(b, k, *shape), labels.view(b, k), t.view(b, k),
            noise.view(b, k, *shape))


def draw_for_examples(loss: DenoisingLoss, x: torch.Tensor, y: torch.Tensor,
                      keys: torch.Tensor, k: int, kind: AugmentKind, draw_seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`draw_copies` with one generator per example, seeded by (step seed, record key).

    An example's draws depend on its own key and the step's seed only: not on
    the other records, its position in the split, the micro-batch or the worker
    that handles it. So micro-batching is memory-only, data-parallel workers
    reproduce one process's update exactly, and removing a record moves no
    other record's draws.

    Args:
        x: [b, C, H, W]; y: [b]; keys: [b] the examples' `record_keys`.
        draw_seed: the step's seed for the training draws (secret in release runs).
    """
    if len(keys) != len(x):
        raise ValueError(f"{len(keys)=} must equal {len(x)=}: one record key per example")
    parts = [draw_copies(loss, x[j:j + 1], y[j:j + 1], k, kind,
                         torch.Generator().manual_seed(example_seed(draw_seed, int(key))))
             for j, key in enumerate(keys)]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def disable_dropout(net: torch.nn.Module) -> int:
    """Put every dropout module of `net` in eval mode (identity); returns how many
    had p > 0.

    Under `vmap(..., randomness="different")` dropout masks are drawn from
    torch's global generator by the example's *position* in the micro-batch, so
    removing one record would change the other records' masks, and so their
    clipped gradients (rule 2). DP-SGD steps therefore train without weight
    dropout; their only randomness is the keyed draws above.
    """
    count = 0
    for module in net.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            count += module.p > 0
            module.eval()
    return count
