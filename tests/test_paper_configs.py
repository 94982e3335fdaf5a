"""The paper-scale configs (configs/cifar10.yaml, configs/camelyon17.yaml) load,
say what their comments say, and build the ~80M-parameter UNet they state."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dpsynth.config import Config, load
from dpsynth.diffusion.unet import UNetSpec, build_unet
from dpsynth.privacy import accounting

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def num_params(cfg: Config, num_classes: int) -> int:
    spec = UNetSpec(cfg.data.image_size, cfg.data.channels, num_classes, cfg.model)
    with torch.device("meta"):  # shapes only: no 320 MB of weights to initialise
        return sum(p.numel() for p in build_unet(spec).parameters())


@pytest.fixture(scope="module")
def cifar10() -> Config:
    return load(CONFIGS / "cifar10.yaml")


@pytest.fixture(scope="module")
def camelyon17() -> Config:
    return load(CONFIGS / "camelyon17.yaml")


def test_cifar10_builds_the_stated_80m_parameter_unet(cifar10: Config) -> None:
    assert num_params(cifar10, 10) == 80_391_171  # CIFAR-10's 10 classes + null
    assert num_params(cifar10, 1000) == 81_151_491  # ImageNet32's 1000 classes + null


def test_cifar10_is_the_paper_setting(cifar10: Config) -> None:
    d, f = cifar10.data, cifar10.finetune
    assert (d.private.kind, d.public and d.public.kind, d.test) == ("cifar10", "imagenet32", None)
    assert (d.image_size, d.channels) == (32, 3)
    assert (f.epsilon, f.delta, f.batch_size, f.aug_multiplicity, f.max_grad_norm) == (
        10.0, 1e-5, 4096, 32, 1.0)
    assert f.timesteps.kind == "piecewise" and f.noise_seed is None
    assert cifar10.diffusion.num_train_timesteps == 1000
    assert cifar10.sample.num_samples == 50_000
    assert "inception-v3-compat" in cifar10.fid.extractors and cifar10.fid.inception_weights
    c = cifar10.classify.classifier
    assert (c.depth, c.widen) == (40, 4)
    assert len(cifar10.rank.grid) >= 2 and max(cifar10.classify.sizes) <= 50_000


@pytest.mark.parametrize("name", ["cifar10", "camelyon17"])
def test_the_paper_values_they_take_from_the_defaults(name: str) -> None:
    """The config files state only what differs from the defaults: these are the
    values their comments say the paper (or its sources) sets that they inherit. A
    change of default that would move the paper experiment fails here."""
    cfg = load(CONFIGS / f"{name}.yaml")
    f, d = cfg.finetune, cfg.diffusion
    assert (d.num_train_timesteps, d.prediction_type, d.timesteps.kind) == (1000, "epsilon",
                                                                          "uniform")
    assert (f.epsilon, f.accountant, f.batch_sampler, f.max_grad_norm, f.noise_seed) == (
        10.0, "prv", "poisson", 1.0, None)
    assert (f.timesteps.kind, f.timesteps.intervals, f.timesteps.weights) == (
        "piecewise", ((0, 200), (200, 800), (800, 1000)), (0.1, 0.7, 0.2))
    assert (cfg.sample.eta, cfg.sample.guidance_scale) == (0.0, 1.0)
    assert (cfg.fid.kid_subsets, cfg.fid.kid_subset_size, cfg.fid.prc_neighborhood) == (
        100, 1000, 3)
    c = cfg.classify.classifier
    assert (c.dropout, c.batch_size, c.weight_decay, c.momentum) == (0.0, 128, 5e-4, 0.9)
    assert cfg.privacy.dataset_budget_epsilon == 30.0 and cfg.audit.check_epsilon == 1.0
    assert cfg.report.disclose_private_size is False


@pytest.mark.parametrize("name", ["cifar10", "camelyon17"])
def test_the_gpu_choices_measured_on_an_h200(name: str) -> None:
    """Not the paper's: dpsynth's engine, precision, micro-batch and head width, as
    their comments give the H200 measurements behind them (docs/scale.md)."""
    cfg = load(CONFIGS / f"{name}.yaml")
    f = cfg.finetune
    assert (f.per_example, f.precision, f.physical_batch_size) == ("bookkeeping", "bf16", 16)
    assert cfg.pretrain.precision == "bf16" and cfg.model.attention_head_dim == 8


def test_camelyon17_shares_the_model_and_splits_by_hospital(cifar10: Config,
                                                            camelyon17: Config) -> None:
    d = camelyon17.data
    assert (d.private.kind, d.private.hospitals, d.test) == ("camelyon17", None, None)
    assert d.public == cifar10.data.public  # one ImageNet32 pre-training for both
    assert (d.image_size, d.channels) == (32, 3)
    assert camelyon17.model == cifar10.model and camelyon17.pretrain == cifar10.pretrain
    assert num_params(camelyon17, 2) == 80_385_027
    assert camelyon17.finetune.epsilon == 10.0
    # 335,996 private patches (WILDS hospitals 0-2): delta must stay below 1/N
    accounting.check_delta(camelyon17.finetune.delta, 335_996)


@pytest.mark.parametrize("name, n, sigma", [("cifar10", 50_000, 1.98),
                                           ("camelyon17", 335_996, 0.67)])
def test_the_sigma_the_comments_state(name: str, n: int, sigma: float) -> None:
    f = load(CONFIGS / f"{name}.yaml").finetune
    got = accounting.calibrate_noise_multiplier(
        target_epsilon=f.epsilon, delta=f.delta, sample_rate=f.batch_size / n, steps=f.steps,
        accountant=f.accountant)
    assert got == pytest.approx(sigma, abs=0.005)


def _gpu_smoke():  # type: ignore[no-untyped-def]
    import importlib.util

    path = CONFIGS.parent / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_smoke_runs_on_the_cpu_with_tiny_sizes(tmp_path: Path) -> None:
    """benchmarks/gpu_smoke.py --cpu --quick: the script the GPU check runs, on the
    CPU with a tiny model (its real run needs CUDA)."""
    before = torch.get_num_threads()
    try:
        assert _gpu_smoke().main(["--cpu", "--quick", "--json", str(tmp_path / "s.json")]) == 0
    finally:
        torch.set_num_threads(before)
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["ok"] and all(s["finite"] for s in result["dp_steps"])
    assert result["extrapolated"]["logical_batch"] == 4096


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_gpu_smoke_without_cuda_says_so_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert _gpu_smoke().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
