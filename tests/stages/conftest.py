"""Shared fixtures for the stage tests: a tiny public split made from
scikit-learn's 8x8 digits, a tiny config, and one pretrained tiny model."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dpsynth.config import Config, from_dict
from dpsynth.io.shards import write_dataset
from dpsynth.stages import pretrain, sample
from dpsynth.tracking import NullTracker

DIGIT_CLASSES = tuple(str(k) for k in range(10))
NUM_PUBLIC = 400  # enough for the loss to fall in a dozen steps, small enough to load fast

# Every knob small: a whole pretrain run is ~12 steps of a ~180k-parameter UNet.
TINY: dict[str, Any] = {
    "seed": 0,
    # the splits of one pool (sklearn's digits), as the fixtures below make them
    "data": {"public": None, "fractions": {"public": 0.25, "private": 0.55, "test": 0.2}},
    "model": {"block_out_channels": [16, 32], "norm_num_groups": 8, "attention_levels": [1]},
    # 100 timesteps: fine-tuning samples uniformly (the default intervals are for 1000)
    "diffusion": {"num_train_timesteps": 100},
    "finetune": {"timesteps": {"kind": "uniform"}},
    "pretrain": {"steps": 12, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2,
                 "ema_decay": 0.9, "checkpoint_every": 4, "log_every": 2},
    # batch_size 8 < 10 per shard: a shard is sampled in two chunks from one generator
    "sample": {"num_samples": 30, "num_shards": 3, "batch_size": 8, "sampler": "dpmsolver++",
               "num_inference_steps": 3},
    "tracking": {"enabled": False},
}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: these models are tiny, and two threads on a busy
    two-core machine are up to 10x slower (spin-waiting), never faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 NHWC (N, 8, 8, 1); pixel v in 0..16 -> round(v * 255 / 16)."""
    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """`digits_uint8()`: all 1797 digits (uint8 NHWC) and their labels. Read-only."""
    return digits_uint8()


@pytest.fixture(scope="session")
def digits_public_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A public split (two shards) of the first NUM_PUBLIC digits. Read-only for tests."""
    images, labels = digits_uint8()
    out = tmp_path_factory.mktemp("digits") / "public"
    write_dataset(out, images[:NUM_PUBLIC], labels[:NUM_PUBLIC], DIGIT_CLASSES,
                  source="sklearn-digits", shard_size=250)
    return out


@pytest.fixture(scope="session")
def make_cfg() -> Callable[..., Config]:
    """`make_cfg("pretrain.steps=20", ...)`: the tiny config plus `--set` style overrides."""

    def make(*overrides: str) -> Config:
        return from_dict(TINY, overrides)

    return make


@pytest.fixture(scope="session")
def tiny_cfg(make_cfg: Callable[..., Config]) -> Config:
    return make_cfg()


@pytest.fixture(scope="session")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: Config,
                   digits_public_dir: Path) -> Path:
    """The output of one uninterrupted tiny pretrain run. Read-only for tests."""
    out = tmp_path_factory.mktemp("pretrained") / "pretrain"
    with one_torch_thread():
        pretrain.run(tiny_cfg, public_dir=digits_public_dir, out_dir=out,
                     tracker=NullTracker())
    return out


@pytest.fixture(scope="session")
def sampled_dir(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: Config,
                pretrained_dir: Path) -> Path:
    """All shards of `pretrained_dir`'s model made at once by `sample.run`. Read-only."""
    out = tmp_path_factory.mktemp("sampled") / "sample"
    with one_torch_thread():
        sample.run(tiny_cfg, model_dir=pretrained_dir, out_dir=out, tracker=NullTracker())
    return out


NUM_PRIVATE = 300  # the DP fine-tuning tests' private split
# the classify and fid recipes, made tiny: what the baseline and sweep stages score with
SCORING = ("classify.sizes=[20]", "classify.real_baseline=false",
           "classify.classifier={depth: 10, widen: 1, epochs: 2, batch_size: 16, lr: 0.05, "
           "weight_decay: 0.0, augment: none}",
           "fid.domain_cnn={steps: 20, batch_size: 32, lr: 1.0e-3, width: 8, feature_dim: 16}",
           "fid.kid_subset_size=10", "fid.kid_subsets=5")


@pytest.fixture(scope="session")
def scoring() -> tuple[str, ...]:
    """`--set` overrides of the tiny scoring recipes (SCORING)."""
    return SCORING


@pytest.fixture(scope="session")
def num_private() -> int:
    """The size of `private_dir`: tests check it never reaches published outputs."""
    return NUM_PRIVATE


@pytest.fixture(scope="session")
def private_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private split of NUM_PRIVATE digits disjoint from the public ones. Read-only."""
    images, labels = digits_uint8()
    out = tmp_path_factory.mktemp("digits") / "private"
    write_dataset(out, images[1000:1000 + NUM_PRIVATE], labels[1000:1000 + NUM_PRIVATE],
                  DIGIT_CLASSES, source="sklearn-digits private", shard_size=200)
    return out


@pytest.fixture
def dp_cfg(make_cfg: Callable[..., Config], tmp_path: Path) -> Callable[..., Config]:
    """The tiny config with a small, test-seeded DP fine-tuning section (6 steps,
    checkpoints every 2) and a per-test privacy ledger in `tmp_path / "ledger"`."""

    def make(*overrides: str) -> Config:
        return make_cfg(
            "finetune.steps=6", "finetune.batch_size=24", "finetune.physical_batch_size=10",
            "finetune.aug_multiplicity=2", "finetune.checkpoint_every=2",
            "finetune.log_every=2", "finetune.accountant=rdp", "finetune.noise_seed=7",
            "finetune.timesteps={kind: piecewise, intervals: [[0, 30], [30, 100]], "
            "weights: [0.3, 0.7]}",
            f"privacy.ledger_dir={tmp_path / 'ledger'}", *overrides)

    return make


NUM_EVAL_PRIVATE = 213  # distinctive: tests check it never reaches metrics or params


@pytest.fixture(scope="session")
def digits_eval_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs of the evaluation stages (classify, rank) made of disjoint real digits:
    `synthetic` (400, standing in for a perfect generator's samples), `test` (300),
    `private` (NUM_EVAL_PRIVATE), and `generator`, a stand-in DP model folder
    (config.json, model.safetensors, privacy.json). Read-only."""
    images, labels = digits_uint8()
    perm = np.random.default_rng(0).permutation(len(images))
    root = tmp_path_factory.mktemp("digits-eval")
    dirs = {}
    for name, lo, hi in [("synthetic", 0, 400), ("test", 400, 700),
                         ("private", 700, 700 + NUM_EVAL_PRIVATE)]:
        dirs[name] = root / name
        write_dataset(dirs[name], images[perm[lo:hi]], labels[perm[lo:hi]], DIGIT_CLASSES,
                      source="sklearn-digits", shard_size=250)
    dirs["generator"] = root / "generator"
    dirs["generator"].mkdir()
    for name in ("config.json", "model.safetensors", "privacy.json"):
        (dirs["generator"] / name).write_text("{}")
    return dirs
