"""Data-parallel DP-SGD (2 gloo workers on CPU, launched with torchrun) matches one
process: the same update with sigma = 0, noise added once with the same sigma,
and the same reported epsilon for a whole fine-tuning run (PRIVACY.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpsynth.privacy.dp_sgd import DPStep, noisy_gradient
from dpsynth.privacy.draws import record_keys
from dist_cases import CASES, build  # type: ignore[import-not-found]

HERE = Path(__file__).parent
SIGMA, C, QN = 1.5, 0.5, 4.0


def torchrun(*args: str, cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("dist") / "grads.safetensors"
    torchrun(str(HERE / "dist_worker.py"), str(out), cwd=HERE)
    return load_file(out)


def one_process(name: str) -> torch.Tensor:
    indices, sigma, train_seed, noise_seed = CASES[name]
    net, loss, x, y = build()
    step = DPStep(noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=QN,
                  physical_batch_size=2, aug_multiplicity=2)
    grads = noisy_gradient(net, loss, x, y, torch.tensor(indices, dtype=torch.int64), step,
                           keys=record_keys(x, y), draw_seed=train_seed,
                           noise_generator=torch.Generator().manual_seed(noise_seed))
    return torch.cat([g.flatten() for g in grads.values()])


def test_ran_on_two_workers(two_workers: dict[str, torch.Tensor]) -> None:
    assert int(two_workers["world_size"]) == 2


def test_sigma_zero_update_equals_one_process(two_workers: dict[str, torch.Tensor]) -> None:
    single = one_process("sigma0")
    assert single.norm() > 0
    torch.testing.assert_close(two_workers["sigma0"], single, rtol=1e-4, atol=1e-6)


def test_noise_is_added_once_with_the_same_sigma(two_workers: dict[str, torch.Tensor]) -> None:
    # an empty batch: the result is the noise alone, (sigma C / qN) * z with z ~ N(0, I)
    z = two_workers["noise_only"] * QN / (SIGMA * C)
    p = z.numel()
    energy = z.pow(2).sum().item() / p
    # chi^2_P / P has standard deviation sqrt(2 / P); noise added by both workers
    # would give energy 2, sigma / sqrt(2) per worker would give 1 but differ below
    assert abs(energy - 1) < 5 * math.sqrt(2 / p), energy
    # the very noise one process adds with the same secret generator
    torch.testing.assert_close(two_workers["noise_only"], one_process("noise_only"))
    torch.testing.assert_close(two_workers["both"], one_process("both"), rtol=1e-4, atol=1e-6)


def test_finetune_on_two_workers_reports_the_same_epsilon(tmp_path: Path) -> None:
    """The whole stage under torchrun vs in one process: same privacy.json, close weights."""
    import numpy as np
    from sklearn.datasets import load_digits

    from dpsynth import config
    from dpsynth.io.shards import write_dataset
    from dpsynth.stages import finetune, pretrain
    from dpsynth.tracking import NullTracker

    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    classes = [str(k) for k in range(10)]
    write_dataset(tmp_path / "public", images[:200], d.target[:200], classes, "digits")
    write_dataset(tmp_path / "private", images[200:500], d.target[200:500], classes, "digits")
    overrides = [
        "model.block_out_channels=[8, 16]", "model.norm_num_groups=4", "model.attention_levels=[1]",
        "diffusion.num_train_timesteps=100", "finetune.timesteps={kind: uniform}",
        "pretrain.steps=2", "pretrain.batch_size=8",
        "finetune.steps=3", "finetune.batch_size=24", "finetune.physical_batch_size=8",
        "finetune.aug_multiplicity=2", "finetune.accountant=rdp", "finetune.noise_seed=11",
        "finetune.log_every=3", "tracking.enabled=false"]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("{}\n")
    cfg = config.load(cfg_file, overrides)
    pretrain.run(cfg, public_dir=tmp_path / "public", out_dir=tmp_path / "pre",
                 tracker=NullTracker())
    one = config.load(cfg_file, [*overrides, f"privacy.ledger_dir={tmp_path / 'ledger1'}"])
    finetune.run(one, model_dir=tmp_path / "pre", private_dir=tmp_path / "private",
                 public_dir=tmp_path / "public", out_dir=tmp_path / "one", tracker=NullTracker())
    sets = [arg for o in [*overrides, f"privacy.ledger_dir={tmp_path / 'ledger2'}"]
            for arg in ("--set", o)]
    torchrun("-m", "dpsynth.cli", "finetune", "-q", "--config", str(cfg_file), *sets,
             "--model", str(tmp_path / "pre"), "--private", str(tmp_path / "private"),
             "--public", str(tmp_path / "public"), "--out", str(tmp_path / "two"), cwd=tmp_path)
    a, b = (json.loads((tmp_path / d / "privacy.json").read_text()) for d in ("one", "two"))
    assert a == b  # epsilon, sigma, q, steps...: the same guarantee
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-5)
    ledgers = list((tmp_path / "ledger2").glob("*.json"))
    assert len(json.loads(ledgers[0].read_text())["entries"]) == 1  # rank 0 alone
