"""`dpsynth plan`: the same σ and ε as training, exact FLOP and GPU-hour arithmetic,
each warning at its threshold, and the CLI's exit codes and JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import pytest
import yaml

from dpsynth import cli, config, plan
from dpsynth.diffusion.cost import ModelCost
from dpsynth.errors import InputError
from dpsynth.gpus import DEVICES, gpu_hours
from dpsynth.privacy import accounting
from dpsynth.privacy.sampling import sample_rate

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"block_out_channels": [16, 32], "attention_levels": [1], "norm_num_groups": 8}


def tiny_config(**finetune: object) -> config.Config:
    return config.from_dict({"model": TINY_MODEL, "finetune": {"accountant": "rdp", **finetune}})


# --------------------------------------------------------------------------- privacy


@pytest.mark.parametrize("accountant, q, steps, epsilon", [
    ("rdp", 128 / 990, 200, 10.0), ("rdp", 0.01, 1000, 2.0), ("prv", 0.01, 50, 2.0)])
def test_sigma_is_the_one_finetune_calibrates(accountant: str, q: float, steps: int,
                                              epsilon: float) -> None:
    n = 990 if q == 128 / 990 else 10_000
    p = plan.privacy_plan(dataset_size=n, batch_size=round(q * n), steps=steps, delta=1e-5,
                          accountant=accountant, target_epsilon=epsilon)
    # the call `dpsynth finetune` makes (stages/finetune.py), same arguments
    assert p.sample_rate == q
    assert p.noise_multiplier == accounting.calibrate_noise_multiplier(
        target_epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant)
    assert p.epsilon == accounting.epsilon([(p.noise_multiplier, q, steps)], 1e-5, accountant)


def test_plan_run_takes_the_finetune_settings_from_the_config() -> None:
    cfg = tiny_config(batch_size=64, steps=300, epsilon=3.0, delta=1e-6)
    p = plan.plan_run(cfg, dataset_size=5000, whole_run=False).privacy
    assert (p.batch_size, p.steps, p.delta, p.accountant) == (64, 300, 1e-6, "rdp")
    assert p.noise_multiplier == accounting.calibrate_noise_multiplier(
        target_epsilon=3.0, delta=1e-6, sample_rate=64 / 5000, steps=300, accountant="rdp")


def test_inverse_gives_opacus_reference_epsilon() -> None:
    # PRIVACY.md: q=0.04, σ=1.5, 2250 steps, δ=1e-5 -> RDP ε = 7.3291 (Opacus' RDP test)
    p = plan.privacy_plan(dataset_size=2500, batch_size=100, steps=2250, delta=1e-5,
                          accountant="rdp", noise_multiplier=1.5)
    assert (p.sample_rate, p.target_epsilon) == (0.04, None)
    assert round(p.epsilon, 4) == 7.3291


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_inverse_round_trips(target: float) -> None:
    args = dict(dataset_size=4000, batch_size=200, steps=500, delta=1e-6, accountant="rdp")
    sigma = plan.privacy_plan(**args, target_epsilon=target).noise_multiplier
    eps = plan.privacy_plan(**args, noise_multiplier=sigma).epsilon
    assert target * (1 - 2 * accounting.CALIBRATION_RTOL) <= eps <= target


def test_exactly_one_of_epsilon_and_sigma() -> None:
    args = dict(dataset_size=100, batch_size=10, steps=10, delta=1e-4, accountant="rdp")
    for both_or_neither in ({}, {"target_epsilon": 1.0, "noise_multiplier": 1.0}):
        with pytest.raises(InputError, match="exactly one"):
            plan.privacy_plan(**args, **both_or_neither)


def test_epochs_to_steps_and_back() -> None:
    assert plan.steps_for_epochs(1, 990, 128) == 8  # 7.73 -> 8
    assert plan.steps_for_epochs(3, 1000, 100) == 30
    assert plan.steps_for_epochs(0.3, 1000, 100) == 3  # 0.3*1000/100 is 3.0000000000000004
    assert plan.steps_for_epochs(1e-6, 1000, 100) == 1
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(InputError, match="--epochs"):
            plan.steps_for_epochs(bad, 1000, 100)
    p = plan.privacy_plan(dataset_size=990, batch_size=128, steps=8, delta=1e-5,
                          accountant="rdp", noise_multiplier=1.0)
    assert p.epochs == pytest.approx(8 * 128 / 990)  # S·q: at least 1, less than 1 + q


# --------------------------------------------------------------------------- compute


def test_cost_is_linear_in_k_b_and_steps_and_gpu_hours_are_flops_over_peak() -> None:
    cost = ModelCost(num_parameters=1000, forward_flops=10**9, train_flops=3 * 10**9,
                     activation_bytes=10**6)
    a100 = DEVICES["A100-80GB"]

    def finetune(steps: int = 100, **fc: int) -> plan.PhaseCost:
        cfg = tiny_config(**{"batch_size": 64, "aug_multiplicity": 4, **fc})
        c = plan.compute_plan(cfg, cost, steps=steps, device=a100, precision="tf32",
                              mfu=0.5, whole_run=False)
        assert [p.name for p in c.phases] == ["finetune"]
        return c.phases[0]

    base = finetune()
    assert base.images == 100 * 64 * 4 and base.flops == 100 * 64 * 4 * 3e9
    assert finetune(aug_multiplicity=8).flops == 2 * base.flops
    assert finetune(batch_size=128).flops == 2 * base.flops
    assert finetune(steps=300).flops == 3 * base.flops
    assert base.gpu_hours == pytest.approx(base.flops / (156e12 * 0.5) / 3600, rel=1e-12)
    assert gpu_hours(312e12 * 0.35 * 3600, a100, "bf16", 0.35) == pytest.approx(1.0)


def test_whole_run_adds_pretraining_and_sampling_with_guidance_doubling() -> None:
    cost = ModelCost(num_parameters=1000, forward_flops=10**9, train_flops=3 * 10**9,
                     activation_bytes=10**6)
    raw = {"model": TINY_MODEL, "pretrain": {"steps": 10, "batch_size": 8},
           "sample": {"num_samples": 50, "num_shards": 1, "num_inference_steps": 20}}
    for scale, evals in ((1.0, 50 * 20), (3.0, 50 * 20 * 2)):
        cfg = config.from_dict(raw, [f"sample.guidance_scale={scale}"])
        c = plan.compute_plan(cfg, cost, steps=5, device=DEVICES["H200"], precision="bf16",
                              mfu=0.35, whole_run=True)
        phases = {p.name: p for p in c.phases}
        assert list(phases) == ["pretrain", "finetune", "sample"]
        assert phases["pretrain"].flops == 10 * 8 * 3e9
        assert phases["sample"].images == evals and phases["sample"].flops == evals * 1e9
        assert c.gpu_hours == sum(p.gpu_hours for p in c.phases)


def test_memory_bound_counts_weights_optimizer_per_example_grads_and_activations() -> None:
    cost = ModelCost(num_parameters=10**6, forward_flops=1, train_flops=3, activation_bytes=10**7)
    cfg = tiny_config(physical_batch_size=8, aug_multiplicity=4, per_example="vmap")
    c = plan.compute_plan(cfg, cost, steps=1, device=DEVICES["L4"], precision="tf32", mfu=0.1,
                          whole_run=False)
    # vmap: float32 weights, clipped sum, Adam m and v, EMA (5 d) + 8 per-example gradients,
    # + activations of 8 x 4 rows
    assert c.memory_gb == pytest.approx((4e6 * (5 + 8) + 32 * 1e7) / 1e9)


@pytest.mark.parametrize("precision, per_row", [("fp32", 6e6), ("bf16", 3e6)])
def test_the_bookkeeping_bound_drops_score_matrices_and_per_example_grads(
        precision: str, per_row: float) -> None:
    """The book-keeping engine keeps fused attention (no score matrices) and need
    not hold every example's gradient; under bf16 a saved element is >= 2 bytes."""
    cost = ModelCost(num_parameters=10**6, forward_flops=1, train_flops=3,
                     activation_bytes=10**7, attention_score_bytes=4 * 10**6)
    cfg = tiny_config(physical_batch_size=8, aug_multiplicity=4, per_example="bookkeeping",
                      precision=precision)
    c = plan.compute_plan(cfg, cost, steps=1, device=DEVICES["L4"], precision="tf32", mfu=0.1,
                          whole_run=False)
    assert c.memory_gb == pytest.approx((4e6 * 5 + 32 * per_row) / 1e9)


@pytest.mark.parametrize("engine, precision, b, measured_gib", [
    ("vmap", "fp32", 8, 101.6), ("bookkeeping", "bf16", 16, 45.4),
    ("bookkeeping", "bf16", 32, 89.4), ("bookkeeping", "fp32", 8, 25.6)])
def test_the_paper_models_bound_is_below_its_h200_peaks(engine: str, precision: str, b: int,
                                                        measured_gib: float) -> None:
    """A lower bound: below the peaks measured on an H200 (docs/scale.md, 2026-11-28
    and 2026-12-04), for each engine and precision."""
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "cifar10.yaml", [
        f"finetune.per_example={engine}", f"finetune.precision={precision}",
        f"finetune.physical_batch_size={b}"])
    got = plan.plan_run(cfg, dataset_size=50_000, device="H200").compute.memory_gb
    assert 0.25 * measured_gib * 2**30 / 1e9 < got < measured_gib * 2**30 / 1e9


# --------------------------------------------------------------------------- warnings


def _parts(*, n: int = 10_000, b: int = 100, delta: float = 1e-6, per_run: float = 1.0,
           memory_gb: float = 1.0) -> tuple[plan.PrivacyPlan, plan.NoiseToSignal,
                                            plan.ComputePlan]:
    privacy = plan.PrivacyPlan(dataset_size=n, batch_size=b, sample_rate=b / n, steps=100,
                               epochs=100 * b / n, noise_multiplier=1.0, epsilon=1.0,
                               delta=delta, accountant="rdp", target_epsilon=1.0)
    noise = plan.NoiseToSignal(per_coordinate=0.01, per_step=per_run * 10, per_run=per_run)
    compute = plan.ComputePlan(device=DEVICES["L4"], precision="tf32", mfu=0.35,
                               model=ModelCost(1000, 1, 3, 4), phases=(),
                               memory_gb=memory_gb)
    return privacy, noise, compute


@pytest.mark.parametrize("changes, codes", [
    ({}, []),
    ({"delta": 1e-5}, []),  # δN = 0.1: at the threshold, not above
    ({"delta": 1.01e-5}, ["delta_not_small"]),
    ({"b": 1000}, []),  # q = 0.1
    ({"b": 1001}, ["high_sample_rate"]),
    ({"per_run": 10.0}, []),
    ({"per_run": 10.01}, ["noise_dominates"]),
    ({"memory_gb": 24.0}, []),
    ({"memory_gb": 24.1}, ["memory"]),
    ({"delta": 5e-5, "b": 5000, "per_run": 50.0, "memory_gb": 30.0},
     ["delta_not_small", "high_sample_rate", "noise_dominates", "memory"]),
])
def test_each_warning_fires_exactly_above_its_threshold(changes: dict, codes: list) -> None:
    assert [w.code for w in plan.plan_warnings(*_parts(**changes))] == codes


def test_noise_to_signal_formulas() -> None:
    n = plan.noise_to_signal(3.0, 4096, 80_000_000, 2500)
    assert n.per_coordinate == 3.0 / 4096
    assert n.per_step == pytest.approx(3.0 * math.sqrt(80e6) / 4096)
    assert n.per_run == pytest.approx(n.per_step / 50)


def test_hopeless_noise_is_flagged_end_to_end() -> None:
    cfg = tiny_config(batch_size=2, steps=20, epsilon=0.5)  # tiny batches, strict ε
    p = plan.plan_run(cfg, dataset_size=990, whole_run=False)
    assert p.noise.per_run > plan.HOPELESS_NOISE_TO_SIGNAL
    assert "noise_dominates" in [w.code for w in p.warnings]


@pytest.mark.parametrize("changes, refused, allowed, match, training_check", [
    # δN = 1: refused, as `dpsynth finetune` refuses it; one example fewer is allowed
    ({"delta": 1e-3, "batch_size": 128}, 1000, 999, "--delta=0.001 is not below 1/N",
     lambda fc, n: accounting.check_delta(fc.delta, n)),
    ({"batch_size": 1001}, 1000, 1001, "--batch-size=1001 is larger than --dataset-size=1000",
     lambda fc, n: sample_rate(fc.batch_size, n)),
])
def test_errors_are_the_training_refusals(changes: dict, refused: int, allowed: int, match: str,
                                          training_check: Callable) -> None:
    cfg = tiny_config(**changes)
    with pytest.raises(InputError, match=match):
        plan.plan_run(cfg, dataset_size=refused, whole_run=False)
    with pytest.raises(InputError):
        training_check(cfg.finetune, refused)
    training_check(cfg.finetune, allowed)
    plan.plan_run(cfg, dataset_size=allowed, whole_run=False)


# --------------------------------------------------------------------------- CLI


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_schema_and_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": TINY_MODEL, "finetune": {"batch_size": 100}}))
    monkeypatch.chdir(tmp_path)
    code, out, _ = _cli(capsys, "--config", str(cfg_file), "--dataset-size", "2500",
                        "--steps", "2250", "--noise-multiplier", "1.5", "--delta", "1e-5",
                        "--accountant", "rdp", "--device", "H200", "--json")
    assert code == 0
    got = json.loads(out)
    assert set(got) == {"config", "privacy", "noise", "compute", "warnings"}
    assert set(got["privacy"]) == {f.name for f in dataclasses.fields(plan.PrivacyPlan)}
    assert round(got["privacy"]["epsilon"], 4) == 7.3291
    assert got["privacy"]["target_epsilon"] is None
    assert {"per_coordinate", "per_step", "per_run", "num_parameters"} <= set(got["noise"])
    assert list(got["compute"]["phases"]) == ["pretrain", "finetune", "sample"]
    assert got["compute"]["device"] == "H200" and got["compute"]["peak_tflops"] == 494.5
    assert got["warnings"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # N stored nowhere


def test_cli_text_epochs_and_warnings(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _cli(capsys, "--dataset-size", "990", "--batch-size", "128", "--epochs", "1",
                        "--delta", "5e-4",
                        "--accountant", "rdp", "--set", "model.block_out_channels=[16,32]",
                        "--set", "model.attention_levels=[1]")
    assert code == 0
    assert "dpsynth plan: code defaults" in out
    assert "steps S                                  8  = 1.03 epochs" in out
    assert "pretrain" not in out  # without --config: fine-tuning only
    assert "delta=0.0005 is more than 1/(10 N)" in out
    assert "sample rate q = B/N = 0.129 > 0.1" in out


@pytest.mark.parametrize("args, message", [
    (["--dataset-size", "990", "--batch-size", "128", "--delta", "0.002"],
     "--delta=0.002 is not below 1/N"),
    (["--dataset-size", "100", "--batch-size", "128"],
     "--batch-size=128 is larger than --dataset-size=100"),
    (["--dataset-size", "990", "--batch-size", "0"], "--batch-size: finetune.batch_size=0"),
    (["--dataset-size", "990", "--batch-size", "128", "--epochs", "0"],
     "--epochs=0.0 must be a number > 0"),
    (["--dataset-size", "0"], "--dataset-size=0 must be an integer >= 1"),
    (["--dataset-size", "990", "--mfu", "0"], "--mfu=0.0 must be in (0, 1]"),
    (["--dataset-size", "990", "--batch-size", "128", "--noise-multiplier", "-1"],
     "--noise-multiplier=-1.0"),
])
def test_cli_bad_input_exits_2_naming_the_flag(args: list[str], message: str,
                                               capsys: pytest.CaptureFixture) -> None:
    code, out, err = _cli(capsys, *args, "--accountant", "rdp")
    assert (code, out) == (2, "")
    assert err.startswith("dpsynth plan: error: ") and message in err


@pytest.mark.parametrize("args", [["--steps", "5", "--epochs", "1"],
                                  ["--epsilon", "1", "--noise-multiplier", "1"], []])
def test_cli_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:  # [] lacks the required --dataset-size
        cli.main(["plan", *(["--dataset-size", "990"] if args else []), *args])
    assert exit_info.value.code == 2


def test_cli_help_says_inputs_outputs_and_gives_an_example(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "inputs:" in out and "outputs" in out and "--dataset-size" in out
    assert "example:\n  dpsynth plan --config params.yaml --dataset-size 990" in out


def test_docstring_examples_hold() -> None:
    import doctest

    from dpsynth import gpus
    from dpsynth.diffusion import cost

    for module in (plan, gpus, cost):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
