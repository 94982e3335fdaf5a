"""The DP fine-tuning stage: the guarantee it reports, what it refuses, what it
publishes, and that kill/resume keeps the same accounting (PRIVACY.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from safetensors.torch import load_file

from dpsynth.config import Config
from dpsynth.errors import InputError
from dpsynth.io.shards import write_dataset
from dpsynth.privacy import accounting
from dpsynth.privacy.ledger import PrivacyLedger
from dpsynth.stages import finetune, sample
from dpsynth.stages.common import work_dir_for
from dpsynth.tracking import NullTracker, flatten

NUM_PRIVATE = 300
DIGIT_CLASSES = tuple(str(k) for k in range(10))


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return np.round(d.images * 255 / 16).astype(np.uint8)[..., None], d.target.astype(np.int64)

PRIVACY_KEYS = {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                "aug_multiplicity", "max_grad_norm", "accountant", "sampler", "seeded_for_test"}


@pytest.fixture(scope="module")
def private_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels = digits_uint8()
    out = tmp_path_factory.mktemp("digits") / "private"
    write_dataset(out, images[1000:1000 + NUM_PRIVATE], labels[1000:1000 + NUM_PRIVATE],
                  DIGIT_CLASSES, source="sklearn-digits private", shard_size=200)
    return out


@pytest.fixture
def dp_cfg(make_cfg: Callable[..., Config], tmp_path: Path) -> Callable[..., Config]:
    """The tiny config with a small DP fine-tuning section and a per-test ledger."""

    def make(*overrides: str) -> Config:
        return make_cfg(
            "finetune.steps=6", "finetune.batch_size=24", "finetune.physical_batch_size=10",
            "finetune.aug_multiplicity=2", "finetune.checkpoint_every=2",
            "finetune.log_every=2", "finetune.accountant=rdp", "finetune.noise_seed=7",
            "finetune.timesteps={kind: piecewise, intervals: [[0, 30], [30, 100]], "
            "weights: [0.3, 0.7]}",
            f"privacy.ledger_dir={tmp_path / 'ledger'}", *overrides)

    return make


def run(cfg: Config, model: Path, private: Path, public: Path, out: Path,
        tracker: Any = None, **kw: Any) -> finetune.FinetuneResult:
    return finetune.run(cfg, model_dir=model, private_dir=private, public_dir=public,
                        out_dir=out, tracker=tracker or NullTracker(), **kw)


@pytest.fixture
def inputs(pretrained_dir: Path, private_dir: Path, digits_public_dir: Path,
           torch_one_thread: None) -> tuple[Path, Path, Path]:
    return pretrained_dir, private_dir, digits_public_dir


def test_publishes_dp_model_and_privacy_json(dp_cfg: Callable[..., Config],
                                             inputs: tuple[Path, Path, Path],
                                             tmp_path: Path) -> None:
    cfg = dp_cfg()
    out = tmp_path / "finetune"
    result = run(cfg, *inputs, out)
    privacy = json.loads((out / "privacy.json").read_text())
    assert set(privacy) == PRIVACY_KEYS
    q = 24 / NUM_PRIVATE
    assert privacy["sample_rate"] == pytest.approx(q)
    assert privacy["steps"] == 6 and privacy["aug_multiplicity"] == 2
    assert privacy["accountant"] == "rdp" and privacy["sampler"] == "poisson"
    assert privacy["seeded_for_test"] is True
    # the reported epsilon is the accountant's for the calibrated sigma, and <= target
    expected = accounting.epsilon([(privacy["noise_multiplier"], q, 6)], 1e-5, "rdp")
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert privacy["epsilon"] <= cfg.finetune.epsilon
    assert result.epsilon == privacy["epsilon"]
    for name in ("model.safetensors", "ema.safetensors", "config.json", "metrics.json",
                 "params.json", "version.json", "loss.csv", "loss.png"):
        assert (out / name).is_file(), name
    assert not work_dir_for(out).exists()
    # the model changed: fine-tuning did something
    before = load_file(inputs[0] / "ema.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_release_runs_are_not_seeded(dp_cfg: Callable[..., Config],
                                     inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run(dp_cfg("finetune.noise_seed=null", "finetune.steps=2"), *inputs, tmp_path / "a")
    run(dp_cfg("finetune.noise_seed=null", "finetune.steps=2"), *inputs, tmp_path / "b")
    assert json.loads((tmp_path / "a" / "privacy.json").read_text())["seeded_for_test"] is False
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a), "OS-entropy noise must differ per run"


def test_kill_and_resume_keeps_accounting_and_weights(dp_cfg: Callable[..., Config],
                                                      inputs: tuple[Path, Path, Path],
                                                      tmp_path: Path) -> None:
    cfg = dp_cfg()
    straight = run(cfg, *inputs, tmp_path / "straight")
    out = tmp_path / "finetune"
    stopped = run(cfg, *inputs, out, stop_after=3)  # killed between checkpoints 2 and 4
    assert stopped.steps == 3 and not out.exists()
    resumed = run(cfg, *inputs, out)
    assert resumed.resumed_from == 3
    a, b = (json.loads((d / "privacy.json").read_text()) for d in (tmp_path / "straight", out))
    assert (a["epsilon"], a["steps"]) == (b["epsilon"], b["steps"])
    assert straight.epsilon == resumed.epsilon
    # test-seeded: the secret generator is checkpointed, so weights match too
    x, y = (load_file(d / "model.safetensors") for d in (tmp_path / "straight", out))
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6)
    # the ledger holds one entry for the resumed run, not two
    ledger = PrivacyLedger(tmp_path / "ledger", _dataset_hash(inputs[1]))
    statuses = sorted(e.status for e in ledger.entries())
    assert statuses == ["completed", "completed"]  # straight + the resumed one


def _dataset_hash(private: Path) -> str:
    from dpsynth.io.shards import read_manifest

    return read_manifest(private).content_hash


def test_ledger_refuses_over_budget_and_writes_nothing(dp_cfg: Callable[..., Config],
                                                       inputs: tuple[Path, Path, Path],
                                                       tmp_path: Path) -> None:
    cfg = dp_cfg("finetune.epsilon=6", "privacy.dataset_budget_epsilon=6.5", "finetune.steps=2")
    run(cfg, *inputs, tmp_path / "first")
    out = tmp_path / "second"
    with pytest.raises(InputError, match="budget") as info:
        run(cfg, *inputs, out)
    assert "completed" in str(info.value) or "spent" in str(info.value)
    assert not out.exists() and not work_dir_for(out).exists()


def test_a_crashed_attempt_still_counts(dp_cfg: Callable[..., Config],
                                        inputs: tuple[Path, Path, Path],
                                        tmp_path: Path) -> None:
    cfg = dp_cfg("finetune.epsilon=6", "privacy.dataset_budget_epsilon=6.5", "finetune.steps=4")
    run(cfg, *inputs, tmp_path / "a", stop_after=1)
    # the attempt is abandoned (its checkpoint deleted): a fresh run is a new attempt
    import shutil

    shutil.rmtree(work_dir_for(tmp_path / "a"))
    with pytest.raises(InputError, match="budget"):
        run(cfg, *inputs, tmp_path / "a")


def test_delta_must_be_below_one_over_n(dp_cfg: Callable[..., Config],
                                        inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "finetune"
    with pytest.raises(InputError, match="finetune.delta") as info:
        run(dp_cfg("finetune.delta=0.01"), *inputs, out)
    assert str(NUM_PRIVATE) not in str(info.value)  # N is private
    assert not out.exists() and not (tmp_path / "ledger").exists()


def test_batch_larger_than_private_split_is_refused(dp_cfg: Callable[..., Config],
                                                    inputs: tuple[Path, Path, Path],
                                                    tmp_path: Path) -> None:
    with pytest.raises(InputError, match="finetune.batch_size") as info:
        run(dp_cfg("finetune.batch_size=5000"), *inputs, tmp_path / "o")
    assert str(NUM_PRIVATE) not in str(info.value)


def test_batchnorm_models_are_refused() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(InputError, match="BatchNorm"):
        finetune.check_model(net)
    finetune.check_model(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4)))


@pytest.mark.parametrize("override, message", [
    ("finetune.epsilon=0", "finetune.epsilon=0.0: must be > 0"),
    ("finetune.epsilon=-1", "finetune.epsilon=-1.0: must be > 0"),
    ("finetune.aug_multiplicity=0", "finetune.aug_multiplicity=0: must be >= 1"),
    ("finetune.batch_sampler=shuffle", "understate epsilon"),
])
def test_invalid_settings_are_refused(dp_cfg: Callable[..., Config], override: str,
                                      message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dp_cfg(override)


def test_tracker_never_sees_private_size_or_sample_rate(dp_cfg: Callable[..., Config],
                                                        inputs: tuple[Path, Path, Path],
                                                        tmp_path: Path) -> None:
    tracker = NullTracker()
    run(dp_cfg("finetune.steps=2"), *inputs, tmp_path / "o", tracker=tracker)
    values = list(tracker.params.values()) + [v for m, _ in tracker.metrics for v in m.values()]
    q = 24 / NUM_PRIVATE
    assert not any(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and (v == NUM_PRIVATE or v == pytest.approx(q)) for v in values)
    assert not any("sample_rate" in k or "noise_multiplier" in k
                   for k in [*tracker.params, *(k for m, _ in tracker.metrics for k in m)])
    sigma = json.loads((tmp_path / "o" / "privacy.json").read_text())["noise_multiplier"]
    assert not any(v == sigma for v in values)
    assert tracker.artifacts == [tmp_path / "o" / "loss.png"]  # never privacy.json or images
    assert flatten({"a": {"b": 1}}) == {"a.b": 1}


def test_samples_carry_the_models_guarantee(dp_cfg: Callable[..., Config],
                                            inputs: tuple[Path, Path, Path],
                                            tmp_path: Path) -> None:
    cfg = dp_cfg("finetune.steps=2")
    run(cfg, *inputs, tmp_path / "ft")
    sample.run(cfg, model_dir=tmp_path / "ft", out_dir=tmp_path / "s", tracker=NullTracker())
    assert (json.loads((tmp_path / "s" / "privacy.json").read_text())
            == json.loads((tmp_path / "ft" / "privacy.json").read_text()))


def test_only_checkpointed_steps_are_released(dp_cfg: Callable[..., Config],
                                              inputs: tuple[Path, Path, Path],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # a resume redoes steps after the last checkpoint with fresh noise: anything
    # logged about such a step would be a second, unaccounted release of it
    events: list[tuple[str, int]] = []
    real_save = finetune.save_checkpoint

    def save(work_dir: Path, state: Any, **kw: Any) -> Path:
        events.append(("checkpoint", state.step))
        return real_save(work_dir, state, **kw)

    class Recorder(NullTracker):
        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            if "public_loss" in metrics:
                events.append(("release", step))

    monkeypatch.setattr(finetune, "save_checkpoint", save)
    cfg = dp_cfg("finetune.checkpoint_every=100", "finetune.log_every=2")
    run(cfg, *inputs, tmp_path / "finetune", tracker=Recorder(), stop_after=5)
    released = [step for kind, step in events if kind == "release"]
    assert released == [2, 4]
    for step in released:
        i = events.index(("release", step))
        assert ("checkpoint", step) in events[:i], events
