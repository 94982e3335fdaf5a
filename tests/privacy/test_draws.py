"""Per-example training draws keyed by the record, and the secret randomness's
streams (PRIVACY.md rules 2 and 7): an example's draws depend on that example
and the step's secret seed alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.privacy.dp_sgd import SecretRandomness
from dpsynth.privacy.draws import disable_dropout, draw_for_examples, record_keys

Split = tuple[torch.Tensor, torch.Tensor]


def test_record_keys_depend_on_the_record_alone() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(6) % 3
    keys = record_keys(images, labels)
    assert keys.dtype == torch.int64 and len(set(keys.tolist())) == 6
    order = [4, 0, 5, 2]  # another position, other neighbours: the same key
    assert record_keys(images[order], labels[order]).tolist() == keys[order].tolist()
    relabelled = labels.copy()
    relabelled[1] += 1
    assert record_keys(images, relabelled)[1] != keys[1]
    touched = images.copy()
    touched[2, 3, 3, 0] ^= 1  # one bit of one pixel
    assert record_keys(touched, labels)[2] != keys[2]
    assert record_keys(torch.from_numpy(images), torch.from_numpy(labels)).tolist() == keys.tolist()


def test_an_examples_draws_do_not_depend_on_the_others(dp_loss: DenoisingLoss,
                                                       private_split: Split) -> None:
    x, y = private_split
    keys = record_keys(x, y)
    k = 3

    def draws(idx: list[int], seed: int) -> tuple[torch.Tensor, ...]:
        i = torch.tensor(idx)
        return draw_for_examples(dp_loss, x[i], y[i], keys[i], k, "flip", seed)

    alone = draws([5], 11)
    among = draws([0, 1, 2, 3, 4, 5], 11)  # position 5, after five others
    first = draws([5, 9], 11)  # position 0
    for a, b, c in zip(alone, among, first):
        assert torch.equal(a[0], b[5]) and torch.equal(a[0], c[0])
    # another step's seed: other draws
    other = draws([5], 12)
    assert not torch.equal(alone[3], other[3])  # diffusion noise
    with pytest.raises(ValueError, match="one record key per example"):
        draw_for_examples(dp_loss, x[:2], y[:2], keys[:1], k, "none", 0)


def test_dropout_is_switched_off_for_the_dp_step() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5),
                              torch.nn.Sequential(torch.nn.Dropout(0.0))).train()
    assert disable_dropout(net) == 1  # one with p > 0
    assert net.training and net[0].training  # the rest keeps training mode
    assert not net[1].training and not net[2][0].training
    x = torch.ones(8, 4)
    assert torch.equal(net(x), net(x))


def test_secret_randomness_streams_are_independent_and_seeded_only_for_tests() -> None:
    a, b = SecretRandomness.create(None), SecretRandomness.create(None)
    assert not a.seeded_for_test
    assert not torch.equal(torch.rand(8, generator=a.noise), torch.rand(8, generator=b.noise))
    assert a.draw_seed() != b.draw_seed()

    s, t = SecretRandomness.create(7), SecretRandomness.create(7)
    assert s.seeded_for_test
    torch.rand(1000, generator=s.batches)  # Poisson sampling of a larger split ...
    # ... shifts neither the noise nor the draw seeds
    assert torch.equal(torch.randn(8, generator=s.noise), torch.randn(8, generator=t.noise))
    assert s.draw_seed() == t.draw_seed()
    streams = [torch.rand(4, generator=g) for g in (t.batches, t.noise, t.draws)]
    assert not any(torch.equal(streams[i], streams[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    assert SecretRandomness.create(8).draw_seed() != SecretRandomness.create(7).draw_seed()

    saved = s.get_state()
    expected = (torch.rand(3, generator=s.batches), s.draw_seed())
    s.set_state(saved)
    assert torch.equal(torch.rand(3, generator=s.batches), expected[0])
    assert s.draw_seed() == expected[1]
