"""The DP fine-tuning stage: the guarantee it reports, what it refuses, what it
publishes, and that kill/resume keeps the same accounting (PRIVACY.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from dpsynth.config import Config
from dpsynth.errors import InputError
from dpsynth.privacy import accounting, dp_sgd
from dpsynth.privacy.dp_sgd import check_model
from dpsynth.privacy.ledger import PrivacyLedger
from dpsynth.stages import finetune, sample
from dpsynth.stages.common import work_dir_for
from dpsynth.tracking import NullTracker, flatten
from dpsynth.training import loop

NUM_PRIVATE = 300  # the size of the `private_dir` fixture (tests/stages/conftest.py)

PRIVACY_KEYS = {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                "aug_multiplicity", "max_grad_norm", "accountant", "sampler", "seeded_for_test"}


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
    """The privacy ledger's key of a private split: its images, as a set."""
    from dpsynth.io.shards import read_dataset
    from dpsynth.privacy.ledger import dataset_key

    return dataset_key(read_dataset(private)[0])


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
    # the budget's delta, at which every run on the dataset is composed, too
    with pytest.raises(InputError, match="privacy.dataset_budget_delta") as info:
        run(dp_cfg("privacy.dataset_budget_delta=0.01"), *inputs, out)
    assert str(NUM_PRIVATE) not in str(info.value)
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
        check_model(net)
    check_model(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4)))


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
    real_save = loop.save_checkpoint  # the training loop saves the checkpoints

    def save(work_dir: Path, state: Any, **kw: Any) -> Path:
        events.append(("checkpoint", state.step))
        return real_save(work_dir, state, **kw)

    class Recorder(NullTracker):
        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            if "public_loss" in metrics:
                events.append(("release", step))

    monkeypatch.setattr(loop, "save_checkpoint", save)
    cfg = dp_cfg("finetune.checkpoint_every=100", "finetune.log_every=2")
    run(cfg, *inputs, tmp_path / "finetune", tracker=Recorder(), stop_after=5)
    released = [step for kind, step in events if kind == "release"]
    assert released == [2, 4]
    for step in released:
        i = events.index(("release", step))
        assert ("checkpoint", step) in events[:i], events


# --------------------------------------------------------------------------- divergence


def poison_private_loss_from(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Make the loss on the private batches NaN from DP step k on (the public
    monitoring loss stays finite): the NaN flows through the per-example
    gradients into the noisy update, where the stage must catch it."""
    from dpsynth.diffusion.loss import DenoisingLoss

    steps = {"n": 0, "poisoned": False}
    real_step, real_loss = dp_sgd.noisy_gradient, DenoisingLoss.per_example

    def noisy_gradient(*args: Any, **kwargs: Any) -> Any:
        steps["n"] += 1
        steps["poisoned"] = steps["n"] >= k
        try:
            return real_step(*args, **kwargs)
        finally:
            steps["poisoned"] = False

    def per_example(self: DenoisingLoss, *args: Any) -> torch.Tensor:
        value = real_loss(self, *args)
        return value * float("nan") if steps["poisoned"] else value

    monkeypatch.setattr(dp_sgd, "noisy_gradient", noisy_gradient)  # PoissonGradient's
    monkeypatch.setattr(DenoisingLoss, "per_example", per_example)


def test_divergence_stops_keeps_the_last_good_checkpoint_and_the_ledger_entry(
        dp_cfg: Callable[..., Config], inputs: tuple[Path, Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dpsynth.errors import TrainingDiverged
    from dpsynth.training.checkpoint import load_latest

    cfg = dp_cfg()  # 6 steps, a checkpoint every 2
    straight = run(cfg, *inputs, tmp_path / "straight")
    out, work = tmp_path / "finetune", work_dir_for(tmp_path / "finetune")
    with monkeypatch.context() as m:
        poison_private_loss_from(m, 5)
        with pytest.raises(TrainingDiverged) as info:
            run(cfg, *inputs, out)
    message = str(info.value)
    assert "DP fine-tuning diverged at step 5: the parameters after the noisy update" in message
    assert f"the last good checkpoint (step 4) is kept in {work}" in message
    assert "finetune.lr" in message and "finetune.max_grad_norm" in message
    assert "ledger entry stays" in message and "1 step(s) it redoes" in message
    assert str(NUM_PRIVATE) not in message  # nothing derived from the private data
    assert not out.exists() and not list(tmp_path.glob(".finetune.*"))
    state = load_latest(work)
    assert state is not None and state.step == 4
    for tensors in (state.net, state.ema):
        assert all(torch.isfinite(v).all() for v in tensors.values())

    # the diverged run's reservation stays, in full (its steps were spent)
    ledger = PrivacyLedger(tmp_path / "ledger", _dataset_hash(inputs[1]))
    diverged = [e for e in ledger.entries() if e.run_id == state.meta["run_id"]]
    assert [(e.status, e.steps_done, e.planned_steps) for e in diverged] == [("reserved", 5, 6)]

    # resume, the fault gone: the same run finishes with the same guarantee and
    # (test-seeded noise) the weights of an uninterrupted run
    resumed = run(cfg, *inputs, out)
    assert resumed.resumed_from == 4 and resumed.epsilon == straight.epsilon
    a, b = (load_file(d / "model.safetensors") for d in (tmp_path / "straight", out))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # ... and the ledger also counts the redone step 5, whose first attempt's
    # divergence was released: two runs (straight, resumed) plus one redone step
    entries = {e.run_id: e for e in ledger.entries()}
    redo = entries.pop(f"{state.meta['run_id']}-redo-4-5")
    assert (redo.status, redo.planned_steps, redo.history[0][:2]) == (
        "completed", 1, (resumed.noise_multiplier, pytest.approx(24 / NUM_PRIVATE)))
    assert sorted(e.status for e in entries.values()) == ["completed", "completed"]


def test_the_private_loss_is_never_tested_for_divergence(
        dp_cfg: Callable[..., Config], inputs: tuple[Path, Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the private batches' loss *value* is NaN but its gradient is the true one (a
    # NaN constant added): only a check on the private loss would stop this run,
    # and that check would be a data-dependent release (PRIVACY.md rule 6)
    from dpsynth.diffusion.loss import DenoisingLoss

    private = {"on": False}
    real_step, real_loss = dp_sgd.noisy_gradient, DenoisingLoss.per_example

    def noisy_gradient(*args: Any, **kwargs: Any) -> Any:
        private["on"] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            private["on"] = False

    def per_example(self: DenoisingLoss, *args: Any) -> torch.Tensor:
        value = real_loss(self, *args)
        return value + torch.full_like(value, float("nan")).detach() if private["on"] else value

    monkeypatch.setattr(dp_sgd, "noisy_gradient", noisy_gradient)  # PoissonGradient's
    monkeypatch.setattr(DenoisingLoss, "per_example", per_example)
    out = tmp_path / "finetune"
    run(dp_cfg("finetune.steps=2"), *inputs, out)
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_divergence_before_any_checkpoint_leaves_nothing_to_resume(
        dp_cfg: Callable[..., Config], inputs: tuple[Path, Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dpsynth.errors import TrainingDiverged
    from dpsynth.training.checkpoint import load_latest

    poison_private_loss_from(monkeypatch, 1)
    out = tmp_path / "finetune"
    with pytest.raises(TrainingDiverged, match="diverged at step 1") as info:
        run(dp_cfg(), *inputs, out)
    assert "no checkpoint was saved before it" in str(info.value)
    assert "redoes" not in str(info.value)
    assert not out.exists() and load_latest(work_dir_for(out)) is None
    ledger = PrivacyLedger(tmp_path / "ledger", _dataset_hash(inputs[1]))
    assert [(e.status, e.steps_done) for e in ledger.entries()] == [("reserved", 1)]


def test_a_model_without_ema_weights_is_finetuned_from_its_raw_weights(
        dp_cfg: Callable[..., Config], inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import shutil

    from dpsynth.io.shards import sha256_file

    model = tmp_path / "model"
    shutil.copytree(inputs[0], model)
    (model / "ema.safetensors").unlink()  # load_model falls back to model.safetensors
    out = tmp_path / "finetune"
    run(dp_cfg("finetune.steps=2"), model, *inputs[1:], out)
    finetuned_from = json.loads((out / "config.json").read_text())["finetuned_from"]
    assert finetuned_from == sha256_file(model / "model.safetensors")


def test_another_label_set_needs_reinit_class_embedding(dp_cfg: Callable[..., Config],
                                                        inputs: tuple[Path, Path, Path],
                                                        tmp_path: Path) -> None:
    """Pre-trained on one label set, fine-tuned on another (ImageNet32 -> CIFAR-10):
    refused by default; with finetune.reinit_class_embedding the class embedding
    starts afresh for the private classes and the rest of the model is kept."""
    from dpsynth.io.shards import read_dataset, write_dataset

    model, private, public = inputs
    images, labels, _ = read_dataset(private)
    keep = labels < 3
    relabelled = tmp_path / "private-abc"
    write_dataset(relabelled, images[keep], labels[keep], ("a", "b", "c"), source="other labels",
                  shard_size=200)
    with pytest.raises(InputError, match="reinit_class_embedding"):
        run(dp_cfg(), model, relabelled, public, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "finetune"
    run(dp_cfg("finetune.reinit_class_embedding=true", "finetune.batch_size=16"), model,
        relabelled, public, out)
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == ["a", "b", "c"] and config["unet"]["num_classes"] == 3
    tuned, base = load_file(out / "model.safetensors"), load_file(model / "model.safetensors")
    assert tuned["class_embedding.weight"].shape[0] == 4  # 3 classes + the null label
    assert tuned["conv_in.weight"].shape == base["conv_in.weight"].shape
    # kept, then moved a little by a few DP steps: far closer than a fresh network
    assert (tuned["conv_in.weight"] - base["conv_in.weight"]).abs().mean() < 0.1 * base[
        "conv_in.weight"].abs().mean()


def _reshard(private: Path, out: Path, shard_size: int) -> Path:
    """The same private images in another order and sharding: what `prepare` with
    another `data.shard_size` (or a re-run that orders them otherwise) writes."""
    from dpsynth.io.shards import read_dataset, write_dataset

    images, labels, manifest = read_dataset(private)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(3)).numpy()
    write_dataset(out, images[order], labels[order], manifest.classes,
                  source=f"{manifest.source} (re-prepared)", shard_size=shard_size)
    return out


def test_re_sharding_the_private_split_keeps_its_ledger(dp_cfg: Callable[..., Config],
                                                       inputs: tuple[Path, Path, Path],
                                                       tmp_path: Path) -> None:
    """Re-preparing the same private images (another shard size and order) does not
    reset the dataset's budget: the ledger is keyed by the images, not the manifest."""
    from dpsynth.io.shards import read_manifest

    model, private, public = inputs
    cfg = dp_cfg("finetune.epsilon=6", "privacy.dataset_budget_epsilon=6.5", "finetune.steps=2")
    run(cfg, model, private, public, tmp_path / "first")
    assert json.loads((tmp_path / "first" / "metrics.json").read_text())["dataset_runs"] == 1
    resharded = _reshard(private, tmp_path / "private-again", shard_size=70)
    assert read_manifest(resharded).content_hash != read_manifest(private).content_hash
    ledger_file = tmp_path / "ledger" / f"{_dataset_hash(private)}.json"
    before = ledger_file.read_bytes()
    out = tmp_path / "second"
    with pytest.raises(InputError, match="budget exceeded") as info:
        run(cfg, model, resharded, public, out)
    assert "1 run(s) on record" in str(info.value)
    assert not out.exists() and not work_dir_for(out).exists()
    assert ledger_file.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ledger").glob("*.json")) == [ledger_file.name]


def test_the_dataset_budget_delta_binds_every_run(dp_cfg: Callable[..., Config],
                                                 inputs: tuple[Path, Path, Path],
                                                 tmp_path: Path) -> None:
    """finetune.delta above privacy.dataset_budget_delta is refused before training;
    a ledger opened at one budget delta refuses a run configured with another."""
    out = tmp_path / "above"
    with pytest.raises(InputError) as info:
        run(dp_cfg("finetune.delta=2e-5", "finetune.steps=2"), *inputs, out)
    message = str(info.value)
    assert "finetune.delta=2e-05" in message and "privacy.dataset_budget_delta=1e-05" in message
    assert "Lower finetune.delta" in message
    assert not out.exists() and not work_dir_for(out).exists()
    assert not (tmp_path / "ledger").exists()

    # the data owner's budget delta is 1e-4: the same run fits, and opens the ledger at it
    wide = dp_cfg("finetune.delta=2e-5", "finetune.steps=2", "privacy.dataset_budget_delta=1e-4")
    run(wide, *inputs, tmp_path / "wide")
    ledger = PrivacyLedger(tmp_path / "ledger", _dataset_hash(inputs[1]))
    assert ledger.budget_delta() == 1e-4 and [e.delta for e in ledger.entries()] == [2e-5]
    out = tmp_path / "changed"
    with pytest.raises(InputError, match="never changes") as info:
        run(dp_cfg("finetune.steps=2"), *inputs, out)  # budget delta back to the default
    assert "Set privacy.dataset_budget_delta=0.0001" in str(info.value)
    assert not out.exists() and len(ledger.entries()) == 1


def test_the_private_split_is_refused_as_public(dp_cfg: Callable[..., Config],
                                               make_cfg: Callable[..., Config],
                                               inputs: tuple[Path, Path, Path],
                                               tmp_path: Path) -> None:
    """The monitoring loss is published: `--public` may not be the split `prepare`
    marked private, nor any folder holding the private images. Nothing is written."""
    from dpsynth.stages import prepare

    model, private, public = inputs
    prepare.run(make_cfg(), out_dir=tmp_path / "prepare", tracker=NullTracker())
    cases = {"marked": (tmp_path / "prepare" / "private", "is the PRIVATE split"),
             "same folder": (private, "holds the same images as private_dir"),
             "same images": (_reshard(private, tmp_path / "copy", shard_size=64),
                             "holds the same images as private_dir")}
    for name, (bad, match) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        with pytest.raises(InputError, match=match) as info:
            run(dp_cfg(), model, private, bad, out)
        assert "artifacts/prepare/public" in str(info.value), name
        assert not out.exists() and not work_dir_for(out).exists(), name
    assert not (tmp_path / "ledger").exists()  # refused before any reservation

