"""The DP mechanism as `dpsynth finetune` wires it, tested from the outside
(PRIVACY.md, "What the tests must show": the stage as wired).

The stage is run as users run it (`finetune.run` on real shard folders) and only
its behaviour is observed: every gradient the optimizer receives (a global
optimizer step hook), the metrics and params it logs (a recording tracker), and
the `privacy.json` it writes. Nothing here re-derives the update from the
stage's own helpers.

The observation trick: a "pre-trained" model whose output is its last bias
alone (the last GroupNorm's affine and the last convolution's weights zeroed,
that bias set to B0 = 10). Then every parameter but that bias gets an exactly
zero per-example gradient, so the optimizer receives the Gaussian noise alone in
~180k coordinates; and each example's gradient is one positive number
2 (B0 - mean noise) ~ 20 > C, clipped to exactly C, so the bias coordinate is
(|batch| C + noise) / divisor. A learning rate of 1e-12 keeps the model in that
state for the whole run. From these, per step: the noise std per coordinate,
the realised batch size (up to the noise), and the divisor.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dpsynth.config import Config
from dpsynth.diffusion.unet import load_model
from dpsynth.errors import ConfigError
from dpsynth.io.shards import write_dataset
from dpsynth.stages import finetune
from dpsynth.tracking import NullTracker
from dpsynth.training.precision import BF16_CLIP_MARGIN

ENGINES = ("vmap", "bookkeeping")  # finetune.per_example
NUM_PRIVATE = 300  # the size of the `private_dir` fixture (tests/stages/conftest.py)
DIGIT_CLASSES = tuple(str(k) for k in range(10))
B0 = 10.0  # the crafted model's output bias: every example's gradient ~ 2 * B0 > C
BATCH = 24  # expected logical batch B = qN, with N = NUM_PRIVATE = 300
C = 1.0
Z = 5.0  # tolerances in standard errors


def logged(tracker: NullTracker) -> list[tuple[str, float, int | None]]:
    """(name, value, step) of every metric the stage logged (NullTracker keeps them)."""
    return [(k, v, step) for metrics, step in tracker.metrics for k, v in metrics.items()]


@pytest.fixture
def optimizer_grads() -> Iterator[list[list[torch.Tensor]]]:
    """Every optimizer step taken while the test runs: the gradients it received,
    one flat list per step in the optimizer's parameter order."""
    steps: list[list[torch.Tensor]] = []

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        steps.append([p.grad.detach().clone() for group in opt.param_groups
                      for p in group["params"]])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def bias_only_model(pretrained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pre-trained model made to output its last bias B0 alone."""
    out = tmp_path_factory.mktemp("bias-only") / "pretrain"
    shutil.copytree(pretrained_dir, out)
    for name in ("model.safetensors", "ema.safetensors"):
        weights = load_file(out / name)
        for key in ("conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight"):
            weights[key] = torch.zeros_like(weights[key])
        weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], B0)
        save_file(weights, out / name)
    return out


def param_names(model_dir: Path) -> list[str]:
    _, net, _ = load_model(model_dir)
    return [n for n, _ in net.named_parameters()]


@pytest.fixture
def mech_cfg(dp_cfg: Callable[..., Config]) -> Callable[..., Config]:
    def make(*overrides: str) -> Config:
        return dp_cfg(f"finetune.batch_size={BATCH}", "finetune.physical_batch_size=64",
                      "finetune.aug_multiplicity=1", f"finetune.max_grad_norm={C}",
                      "finetune.lr=1e-12", "finetune.epsilon=10", "finetune.checkpoint_every=50",
                      "finetune.log_every=50", *overrides)

    return make


def observe(steps: list[list[torch.Tensor]], names: list[str], divisor: float
            ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Per step: the noise std per coordinate (times the divisor), the batch size
    estimate (bias coordinate times the divisor / C), and the noise vectors."""
    bias = names.index("conv_out.bias")
    assert all(len(s) == len(names) for s in steps)
    noise = torch.stack([torch.cat([g.flatten() for i, g in enumerate(s) if i != bias])
                         for s in steps])
    std = noise.pow(2).mean(1).sqrt().numpy() * divisor
    sizes = np.array([float(s[bias].sum()) for s in steps]) * divisor / C
    return std, sizes, noise


@pytest.mark.parametrize("engine", ENGINES)
def test_the_stage_releases_the_mechanism_privacy_json_claims(
        engine: str, mech_cfg: Callable[..., Config], bias_only_model: Path, private_dir: Path,
        digits_public_dir: Path, tmp_path: Path, torch_one_thread: None,
        optimizer_grads: list[list[torch.Tensor]]) -> None:
    """Batch sizes ~ Binomial(N, q), noise std sigma C / (qN) every step, divisor
    qN, one noisy update per accounted step, nothing private logged; with either
    per-example engine."""
    steps = 150
    cfg = mech_cfg(f"finetune.steps={steps}", f"finetune.per_example={engine}")
    tracker = NullTracker()
    out = tmp_path / "finetune"
    finetune.run(cfg, model_dir=bias_only_model, private_dir=private_dir,
                 public_dir=digits_public_dir, out_dir=out, tracker=tracker)
    privacy = json.loads((out / "privacy.json").read_text())
    sigma, q = privacy["noise_multiplier"], privacy["sample_rate"]
    n = NUM_PRIVATE  # what the test wrote, not what the stage says
    assert q == pytest.approx(BATCH / n, rel=1e-12), "the accounted q is not B/N"
    assert privacy["steps"] == steps and privacy["sampler"] == "poisson"

    # one optimizer step per accounted step
    assert len(optimizer_grads) == steps, "noisy updates applied != steps accounted"
    names = param_names(bias_only_model)
    std, sizes, noise = observe(optimizer_grads, names, divisor=q * n)

    # every step's noise has std sigma C per coordinate once multiplied by qN: the
    # accounted sigma (not another), divided by the expected batch size (not the
    # realised one, which varies by ~20% step to step), added once (not twice)
    d = noise.shape[1]
    tol = Z * math.sqrt(1 / (2 * d)) + 2e-3  # std of a std estimate, + signal leakage
    assert np.all(np.abs(std / (sigma * C) - 1) < tol), (std / (sigma * C)).min()
    # fresh noise each step
    corr = torch.corrcoef(noise[:20])
    assert (corr - torch.eye(20)).abs().max() < Z / math.sqrt(d)

    # realised batch sizes: Binomial(N, q) -- mean qN, variance qN(1 - q) -- seen
    # through N(0, sigma^2) noise (the bias coordinate's own noise)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < Z * math.sqrt((var + sigma ** 2) / steps), sizes.mean()
    total = var + sigma ** 2  # the variance of each observation
    observed = sizes.var(ddof=1)
    assert abs(observed - total) < Z * total * math.sqrt(2 / (steps - 1)), (observed, total)
    # fixed-size batches would leave only the noise's variance
    assert observed > sigma ** 2 + var / 2

    # nothing private-derived is logged: the metric names are the publishable ones
    published = {"public_loss", "epsilon", "delta", "steps", "final_public_loss",
                 "dataset_runs", "resumed_from_step"}
    metrics = logged(tracker)
    assert {k for k, _, _ in metrics} <= published, metrics
    assert not any(math.isclose(v, q, rel_tol=1e-3) or math.isclose(v, sigma, rel_tol=1e-3)
                   or v == n for _, v, _ in metrics)
    final = {k: v for k, v, step in metrics if step is None}
    assert final["epsilon"] == cfg.finetune.epsilon  # the public target, not the accounted
    assert not any(str(v) in (str(n), f"{q:.4g}", f"{sigma:.4g}") for v in tracker.params.values())


def test_release_runs_draw_fresh_noise_and_batches(
        mech_cfg: Callable[..., Config], bias_only_model: Path, private_dir: Path,
        digits_public_dir: Path, tmp_path: Path, torch_one_thread: None,
        optimizer_grads: list[list[torch.Tensor]]) -> None:
    """Two release runs (no test seed) of one config on the same data: different
    noise, and different Poisson batches (not a public seed's)."""
    steps = 60
    cfg = mech_cfg(f"finetune.steps={steps}", "finetune.noise_seed=null")
    names = param_names(bias_only_model)
    runs = []
    for name in ("a", "b"):
        optimizer_grads.clear()
        finetune.run(cfg, model_dir=bias_only_model, private_dir=private_dir,
                     public_dir=digits_public_dir, out_dir=tmp_path / name, tracker=NullTracker())
        privacy = json.loads((tmp_path / name / "privacy.json").read_text())
        assert privacy["seeded_for_test"] is False
        runs.append(observe(optimizer_grads, names, privacy["sample_rate"] * NUM_PRIVATE))
    sigma = privacy["noise_multiplier"]
    (_, sizes_a, noise_a), (_, sizes_b, noise_b) = runs
    # independent noise: no correlation beyond chance in any step
    d = noise_a.shape[1]
    corr = torch.nn.functional.cosine_similarity(noise_a, noise_b, dim=1)
    assert corr.abs().max() < Z / math.sqrt(d), corr.abs().max()
    # the same batches would differ by the two noises alone: mean square 2 sigma^2;
    # independent Binomial batches add 2 qN(1 - q) ~ 44 >> 2 sigma^2 ~ 1
    ratio = float(np.mean((sizes_a - sizes_b) ** 2)) / (2 * sigma ** 2)
    assert ratio > 4, f"the two runs drew the same batches (ratio {ratio:.2f})"


def test_the_monitoring_loss_is_computed_on_the_public_split(
        dp_cfg: Callable[..., Config], pretrained_dir: Path, private_dir: Path,
        digits_public_dir: Path, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path,
        torch_one_thread: None) -> None:
    """With a learning rate that leaves the model unchanged, the published loss
    depends on the public split and not at all on the private one."""
    images, labels = digits
    other_private = tmp_path / "other-private"
    write_dataset(other_private, images[1400:1400 + NUM_PRIVATE],
                  labels[1400:1400 + NUM_PRIVATE], DIGIT_CLASSES, source="sklearn-digits")
    other_public = tmp_path / "other-public"
    write_dataset(other_public, images[1100:1400], labels[1100:1400], DIGIT_CLASSES,
                  source="sklearn-digits")
    cfg = dp_cfg("finetune.lr=1e-12", "finetune.steps=2", "finetune.log_every=1")

    def losses(private: Path, public: Path, name: str) -> list[float]:
        tracker = NullTracker()
        finetune.run(cfg, model_dir=pretrained_dir, private_dir=private, public_dir=public,
                     out_dir=tmp_path / name, tracker=tracker)
        return [v for k, v, _ in logged(tracker) if k == "public_loss"]

    base = losses(private_dir, digits_public_dir, "base")
    assert len(base) == 2
    assert losses(other_private, digits_public_dir, "other-private") == pytest.approx(
        base, rel=1e-6, abs=1e-7), "the monitoring loss moved with the private split"
    assert losses(private_dir, other_public, "other-public") != pytest.approx(
        base, rel=1e-3), "the monitoring loss ignores the public split"


@pytest.mark.parametrize("engine", [*ENGINES, "bookkeeping-bf16"])
@pytest.mark.parametrize("removed", ["first", "middle", "last"])
def test_removing_one_record_moves_the_clipped_sum_by_at_most_c(
        removed: str, engine: str, dp_cfg: Callable[..., Config], pretrained_dir: Path,
        digits_public_dir: Path, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path,
        torch_one_thread: None, optimizer_grads: list[list[torch.Tensor]]) -> None:
    """Neighbouring datasets (add/remove one record), as the stage wires the
    mechanism: every record in the batch (q = 1), the secret seed fixed so that
    both runs draw the same noise; then noisy sum(D) - noisy sum(D') is the
    clipped sum's difference, and it must be the removed record's term alone
    (norm C: every gradient here is far above C), with either engine and with
    the book-keeping one under bf16."""
    images, labels = digits
    n, c = 40, 0.1
    full = tmp_path / "full"
    write_dataset(full, images[1000:1000 + n], labels[1000:1000 + n], DIGIT_CLASSES,
                  source="sklearn-digits")
    r = {"first": 0, "middle": n // 2, "last": n - 1}[removed]
    keep = [i for i in range(n) if i != r]
    less = tmp_path / "less"
    write_dataset(less, images[1000:1000 + n][keep], labels[1000:1000 + n][keep],
                  DIGIT_CLASSES, source="sklearn-digits")
    sums = []
    for folder, size in ((full, n), (less, n - 1)):
        optimizer_grads.clear()
        cfg = dp_cfg(f"finetune.batch_size={size}", "finetune.physical_batch_size=16",
                     f"finetune.max_grad_norm={c}", "finetune.aug_multiplicity=2",
                     f"finetune.per_example={engine.split('-')[0]}",
                     f"finetune.precision={'bf16' if engine.endswith('bf16') else 'fp32'}",
                     f"privacy.ledger_dir={tmp_path / 'ledger' / folder.name}")
        finetune.run(cfg, model_dir=pretrained_dir, private_dir=folder,
                     public_dir=digits_public_dir, out_dir=tmp_path / f"out-{folder.name}",
                     tracker=NullTracker(), stop_after=1)
        assert len(optimizer_grads) == 1
        # q = 1: the divisor qN is the split's size
        sums.append(torch.cat([g.flatten() for g in optimizer_grads[0]]).double() * size)
    moved = (sums[0] - sums[1]).norm().item()
    assert moved <= c * (1 + 1e-3), f"removing the {removed} record moved the sum by {moved / c:.2f} C"
    # bf16 clips to C (1 - 2**-6) (training.precision.BF16_CLIP_MARGIN)
    exact = c * (1 - BF16_CLIP_MARGIN) if engine.endswith("bf16") else c
    assert moved >= exact * (1 - 1e-3), "the removed record's clipped gradient should be exactly C"


def test_only_the_trainable_weights_are_trained_and_they_get_the_full_noise(
        mech_cfg: Callable[..., Config], bias_only_model: Path, private_dir: Path,
        digits_public_dir: Path, tmp_path: Path, torch_one_thread: None,
        optimizer_grads: list[list[torch.Tensor]]) -> None:
    """finetune.trainable: the optimizer sees the matching weights alone, with the
    same per-coordinate noise sigma C / (qN); every other weight is published as
    it was pre-trained. A pattern that matches nothing is refused before any run."""
    steps = 40
    patterns = ["conv_out.*", "*norm*"]
    cfg = mech_cfg(f"finetune.steps={steps}", f"finetune.trainable={json.dumps(patterns)}",
                   "finetune.lr=1e-3")
    out = tmp_path / "finetune"
    finetune.run(cfg, model_dir=bias_only_model, private_dir=private_dir,
                 public_dir=digits_public_dir, out_dir=out, tracker=NullTracker())
    _, before, _ = load_model(bias_only_model)  # fine-tuning starts from the EMA weights
    _, after, _ = load_model(out, use_ema=False)
    names = [n for n, _ in before.named_parameters()]
    trained = [n for n in names if n.startswith("conv_out.") or "norm" in n]
    assert 0 < len(trained) < len(names)
    sizes = {n: p.numel() for n, p in before.named_parameters()}
    assert len(optimizer_grads) == steps
    assert all([g.numel() for g in s] == [sizes[n] for n in trained] for s in optimizer_grads)
    privacy = json.loads((out / "privacy.json").read_text())
    sigma, q = privacy["noise_multiplier"], privacy["sample_rate"]
    std, _, noise = observe(optimizer_grads, trained, divisor=q * NUM_PRIVATE)
    d = noise.shape[1]
    assert np.all(np.abs(std / (sigma * C) - 1) < Z * math.sqrt(1 / (2 * d)) + 2e-3)
    a, b = dict(before.named_parameters()), dict(after.named_parameters())
    changed = [n for n in names if n not in trained and not torch.equal(a[n], b[n])]
    assert not changed, changed
    assert not any(torch.equal(a[n], b[n]) for n in trained)  # lr 1e-3 moves them

    with pytest.raises(ConfigError, match=r"finetune.trainable: '\*attn_typo\*' matches no"):
        finetune.run(mech_cfg("finetune.trainable=['*attn_typo*']"), model_dir=bias_only_model,
                     private_dir=private_dir, public_dir=digits_public_dir,
                     out_dir=tmp_path / "typo", tracker=NullTracker())
    assert not (tmp_path / "typo").exists()
