"""The training and sampling stages on each available device (the CPU here; the GPU
too where there is one): `device="cpu"` is the CPU run bit for bit, a GPU run
reports the same privacy accounting and close numbers, and checkpoints and
published models are device-independent (a run stopped on one device resumes on
the CPU)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpsynth.config import Config
from dpsynth.io.shards import shard_name
from dpsynth.stages import audit, finetune, pretrain, sample
from dpsynth.tracking import NullTracker

pytestmark = pytest.mark.usefixtures("torch_one_thread", "exact_cuda")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def exact_cuda() -> Iterator[None]:
    """No TF32 on the GPU while comparing with the CPU: its 10-bit mantissa would
    turn float rounding into visible differences. (The stages keep PyTorch's
    defaults: TF32 convolutions on.)"""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "ema.safetensors")


def assert_same_or_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                         device: str, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].device.type == "cpu", name  # published on the CPU, whatever ran
        if device == "cpu":
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_pretrain_stopped_on_a_device_resumes_on_the_cpu(
        device: str, tiny_cfg: Config, digits_public_dir: Path, pretrained_dir: Path,
        tmp_path: Path) -> None:
    out = tmp_path / "pretrain"
    kw = dict(public_dir=digits_public_dir, out_dir=out, tracker=NullTracker())
    pretrain.run(tiny_cfg, **kw, device=device, stop_after=4)
    pretrain.run(tiny_cfg, **kw, device="cpu")
    # Adam moves a weight by ~lr whatever its gradient's size: where float error flips
    # the sign of a near-zero gradient, a weight can differ by a few lr (2e-3)
    assert_same_or_close(weights(out), weights(pretrained_dir), device, atol=0.05)
    got, want = (json.loads((d / "metrics.json").read_text())["final_loss"]
                 for d in (out, pretrained_dir))
    assert got == want if device == "cpu" else got == pytest.approx(want, rel=0.02)


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_on_a_device_keeps_the_accounting(
        device: str, dp_cfg: Callable[..., Config], pretrained_dir: Path, private_dir: Path,
        digits_public_dir: Path, tmp_path: Path) -> None:
    """The same (test-seeded) Poisson batches and noise on any device: the same
    privacy.json, and weights equal (CPU) or close (GPU). Stopped on the device and
    resumed on the CPU, the run is one run for the ledger."""
    cfg = dp_cfg()
    kw = dict(model_dir=pretrained_dir, private_dir=private_dir,
              public_dir=digits_public_dir, tracker=NullTracker())
    finetune.run(cfg, **kw, out_dir=tmp_path / "reference", device="cpu")
    out = tmp_path / "moved"
    finetune.run(cfg, **kw, out_dir=out, device=device, stop_after=3)
    finetune.run(cfg, **kw, out_dir=out, device="cpu")
    got, want = (json.loads((d / "privacy.json").read_text())
                 for d in (out, tmp_path / "reference"))
    assert got == want
    # at most 6 steps of lr 2e-4 can differ (see the pre-training test)
    assert_same_or_close(weights(out), weights(tmp_path / "reference"), device, atol=5e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_on_a_device_gives_the_cpu_images(device: str, tiny_cfg: Config,
                                                 pretrained_dir: Path, sampled_dir: Path,
                                                 tmp_path: Path) -> None:
    sample.make_shards(tiny_cfg, model_dir=pretrained_dir, shard_dir=tmp_path, device=device)
    for i in range(tiny_cfg.sample.num_shards):
        with np.load(tmp_path / shard_name(i)) as a, np.load(sampled_dir / shard_name(i)) as b:
            assert np.array_equal(a["labels"], b["labels"])
            if device == "cpu":
                assert np.array_equal(a["images"], b["images"])
            else:  # float error may move a pixel across a rounding boundary
                diff = np.abs(a["images"].astype(int) - b["images"].astype(int))
                assert diff.mean() < 0.5 and diff.max() <= 8


@pytest.mark.parametrize("device", DEVICES)
def test_the_audit_twin_on_a_device(device: str, make_cfg: Callable[..., Config],
                                    pretrained_dir: Path) -> None:
    cfg = make_cfg("finetune.physical_batch_size=16", "finetune.aug_multiplicity=2",
                   "finetune.accountant=rdp", "audit.num_canaries=32", "audit.steps=3",
                   "audit.batch_size=8", "audit.score_draws=2")
    on_cpu = audit.membership_audit(cfg, pretrained_dir, "cpu")
    twins = audit.membership_audit(cfg, pretrained_dir, device)
    assert (twins.audit_epsilon, twins.check_epsilon) == (on_cpu.audit_epsilon,
                                                          on_cpu.check_epsilon)
    control, control_cpu = twins.control, on_cpu.control
    if device == "cpu":
        assert twins == on_cpu
    else:  # same canaries, draws and noise: the scores differ by float error only
        assert twins.dp.auc == pytest.approx(on_cpu.dp.auc, abs=0.1)
        assert twins.check.auc == pytest.approx(on_cpu.check.auc, abs=0.1)
        assert control is not None and control_cpu is not None
        assert control.auc == pytest.approx(control_cpu.auc, abs=0.1)
