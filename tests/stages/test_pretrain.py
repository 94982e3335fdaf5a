"""`dpsynth.stages.pretrain`: output layout, learning, determinism, exact resume
(in-process and after a real SIGKILL), atomic publishing, and what reaches the tracker."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest
import torch
from safetensors.torch import load_file

import dpsynth
from dpsynth.config import Config
from dpsynth.data.roles import refuse_private_split
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.unet import EMA_WEIGHTS, WEIGHTS, load_model
from dpsynth.errors import TrainingDiverged
from dpsynth.stages import pretrain
from dpsynth.stages.common import work_dir_for
from dpsynth.tracking import NullTracker, flatten
from dpsynth.training.checkpoint import LATEST, load_latest, save_checkpoint

pytestmark = pytest.mark.usefixtures("torch_one_thread")
SECTIONS = ("seed", "model", "diffusion", "pretrain")
METRIC_KEYS = {"final_loss", "steps", "num_params", "train_seconds", "resumed_from_step"}


def weights(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(out_dir / WEIGHTS), load_file(out_dir / EMA_WEIGHTS)


def assert_same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_model(out: Path, reference: Path) -> None:
    """Bit-identical weights, EMA weights and loss history."""
    (net, ema), (ref_net, ref_ema) = weights(out), weights(reference)
    assert_same_tensors(net, ref_net)
    assert_same_tensors(ema, ref_ema)
    assert (out / "loss.csv").read_text() == (reference / "loss.csv").read_text()


def loss_rows(out_dir: Path) -> list[tuple[int, float]]:
    with open(out_dir / "loss.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"]
    return [(int(s), float(v)) for s, v in rows[1:]]


def leftovers(parent: Path, name: str) -> list[Path]:
    """Temporary folders an atomic publish of `parent/name` could leave behind."""
    return sorted(parent.glob(f".{name}.tmp-*")) + sorted(parent.glob(f".{name}.old-*"))


def run(cfg: Config, public: Path, out: Path, tracker: Any = None, **kwargs: Any
        ) -> pretrain.PretrainResult:
    return pretrain.run(cfg, public_dir=public, out_dir=out, tracker=tracker or NullTracker(),
                        **kwargs)


# --------------------------------------------------------------------------- layout


def test_output_layout(pretrained_dir: Path, tiny_cfg: Config) -> None:
    names = {p.name for p in pretrained_dir.iterdir()}
    assert names == {"config.json", WEIGHTS, EMA_WEIGHTS, "loss.csv", "loss.png", "metrics.json",
                     "params.json", "version.json"}

    model_cfg = json.loads((pretrained_dir / "config.json").read_text())
    assert model_cfg["classes"] == [str(k) for k in range(10)]
    assert model_cfg["unet"]["image_size"] == 8 and model_cfg["unet"]["channels"] == 1
    assert model_cfg["unet"]["num_classes"] == 10
    assert model_cfg["unet"]["model"] == tiny_cfg.to_dict()["model"]
    spec, net, _ = load_model(pretrained_dir)  # loads back into the architecture it names
    assert spec.null_label == 10

    rows = loss_rows(pretrained_dir)
    log_every, steps = tiny_cfg.pretrain.log_every, tiny_cfg.pretrain.steps
    assert [s for s, _ in rows] == list(range(log_every, steps + 1, log_every))
    assert all(math.isfinite(v) and v > 0 for _, v in rows)

    metrics = json.loads((pretrained_dir / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert metrics["steps"] == steps and metrics["resumed_from_step"] == 0
    assert metrics["final_loss"] == rows[-1][1]
    assert metrics["num_params"] == sum(p.numel() for p in net.parameters())

    assert json.loads((pretrained_dir / "params.json").read_text()) == tiny_cfg.section(*SECTIONS)
    version = json.loads((pretrained_dir / "version.json").read_text())
    assert version["stage"] == "pretrain" and version["dpsynth"] == dpsynth.__version__
    assert "git_commit" in version

    # published EMA differs from the raw weights (it is an average, not a copy)
    net_w, ema_w = weights(pretrained_dir)
    assert any(not torch.equal(net_w[k], ema_w[k]) for k in net_w)
    # the work folder (checkpoints) is gone and no temporary folder is left behind
    assert not work_dir_for(pretrained_dir).exists()
    assert leftovers(pretrained_dir.parent, pretrained_dir.name) == []


def test_loss_goes_down(pretrained_dir: Path) -> None:
    losses = [v for _, v in loss_rows(pretrained_dir)]
    first, last = losses[0], sum(losses[-2:]) / 2
    # eps-prediction starts near E[eps^2] = 1; a dozen steps on digits reach ~0.45
    assert 0.7 < first < 1.5
    assert last < 0.7 * first, losses


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_weights_other_seed_different(
        tmp_path: Path, tiny_cfg: Config, make_cfg: Callable[..., Config],
        digits_public_dir: Path, pretrained_dir: Path) -> None:
    run(tiny_cfg, digits_public_dir, tmp_path / "again")
    assert_same_model(tmp_path / "again", pretrained_dir)

    run(make_cfg("seed=1"), digits_public_dir, tmp_path / "seed1")
    net, _ = weights(tmp_path / "seed1")
    ref, _ = weights(pretrained_dir)
    assert any(not torch.equal(net[k], ref[k]) for k in net)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stop_after", [4, 5, 7])  # 4: at a checkpoint; 5, 7: between them
def test_kill_and_resume_is_exact(tmp_path: Path, tiny_cfg: Config, digits_public_dir: Path,
                                  pretrained_dir: Path, stop_after: int) -> None:
    out = tmp_path / "pretrain"
    stopped = run(tiny_cfg, digits_public_dir, out, stop_after=stop_after)
    assert stopped.steps == stop_after
    assert not out.exists(), "a stopped run must publish nothing"
    assert leftovers(tmp_path, "pretrain") == []
    latest = json.loads((work_dir_for(out) / LATEST).read_text())
    assert latest["step"] == stop_after  # the stage checkpoints where it stops

    resumed = run(tiny_cfg, digits_public_dir, out, resume=True)
    assert resumed.resumed_from == stop_after and resumed.steps == tiny_cfg.pretrain.steps
    assert_same_model(out, pretrained_dir)
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == stop_after
    assert not work_dir_for(out).exists()


def test_retry_on_another_machine_resumes_from_the_s3_work_folder(
        s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_cfg: Config,
        digits_public_dir: Path, pretrained_dir: Path) -> None:
    """--out s3://...: each checkpoint is uploaded as it is saved (what a Kubeflow
    retry on another node needs); the retry, with an empty local disk, resumes
    from it and publishes the same model as an uninterrupted run."""
    from dpsynth.io import cache, published, work as work_io

    uri, work = s3.uri("art/pretrain"), "art/.work/pretrain/"

    def remote_latest() -> int | None:
        try:
            obj = s3.client.get_object(Bucket=s3.bucket, Key=work + LATEST)
        except s3.client.exceptions.NoSuchKey:
            return None
        return json.loads(obj["Body"].read())["step"]

    seen: list[tuple[int | None, int | None]] = []

    class Watcher(NullTracker):  # looks at S3 while the first attempt still trains
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            seen.append((step, remote_latest()))

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "node-1"))
    with work_io.publish(uri) as staged:
        out = staged.path
        run(tiny_cfg, digits_public_dir, out, tracker=Watcher(), stop_after=7,
            sync_work=staged.sync)  # the driver's explicit upload, called at checkpoints
    assert (6, 4) in seen  # checkpoint 4 was on S3 before step 7 ran
    assert remote_latest() == 7
    assert f"art/pretrain/{published.MARKER}" not in str(s3.client.list_objects_v2(
        Bucket=s3.bucket).get("Contents"))  # a stopped run publishes nothing

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "node-2"))  # another machine
    with work_io.publish(uri) as staged:
        out = staged.path
        resumed = run(tiny_cfg, digits_public_dir, out, sync_work=staged.sync)
    assert resumed.resumed_from == 7
    assert "Contents" not in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=work)
    with published.local_input(uri) as local:
        assert_same_model(local, pretrained_dir)


def test_resume_twice_is_exact(tmp_path: Path, tiny_cfg: Config, digits_public_dir: Path,
                               pretrained_dir: Path) -> None:
    out = tmp_path / "pretrain"
    run(tiny_cfg, digits_public_dir, out, stop_after=3)
    second = run(tiny_cfg, digits_public_dir, out, stop_after=9)
    assert second.resumed_from == 3 and not out.exists()
    final = run(tiny_cfg, digits_public_dir, out)
    assert final.resumed_from == 9
    assert_same_model(out, pretrained_dir)


def test_resume_with_dropout_is_exact(tmp_path: Path, make_cfg: Callable[..., Config],
                                     digits_public_dir: Path) -> None:
    # dropout draws from torch's global generator, which the checkpoint must carry
    cfg = make_cfg("model.dropout=0.3")
    straight = tmp_path / "straight"
    run(cfg, digits_public_dir, straight)
    out = tmp_path / "pretrain"
    run(cfg, digits_public_dir, out, stop_after=5)
    torch.manual_seed(12345)  # whatever the process did in between
    run(cfg, digits_public_dir, out)
    assert_same_model(out, straight)


def test_checkpoint_of_another_config_is_ignored(
        tmp_path: Path, tiny_cfg: Config, make_cfg: Callable[..., Config],
        digits_public_dir: Path, pretrained_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "pretrain"
    run(make_cfg("pretrain.lr=0.01"), digits_public_dir, out, stop_after=8)
    assert (work_dir_for(out) / LATEST).is_file()

    result = run(tiny_cfg, digits_public_dir, out, resume=True)
    assert result.resumed_from == 0
    assert "another config" in caplog.text
    assert_same_model(out, pretrained_dir)


def test_resume_false_starts_fresh(tmp_path: Path, tiny_cfg: Config, digits_public_dir: Path,
                                   pretrained_dir: Path) -> None:
    out = tmp_path / "pretrain"
    run(tiny_cfg, digits_public_dir, out, stop_after=8)
    # Poison the (compatible) checkpoint: resuming from it could not give the reference.
    state = load_latest(work_dir_for(out))
    assert state is not None
    state.net = {k: torch.zeros_like(v) for k, v in state.net.items()}
    state.ema = {k: torch.zeros_like(v) for k, v in state.ema.items()}
    save_checkpoint(work_dir_for(out), state)

    result = run(tiny_cfg, digits_public_dir, out, resume=False)
    assert result.resumed_from == 0
    assert_same_model(out, pretrained_dir)


# --------------------------------------------------------------------------- failures


def test_failure_mid_run_leaves_no_output(tmp_path: Path, tiny_cfg: Config,
                                          digits_public_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = DenoisingLoss.per_example

    def flaky(self: DenoisingLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash in step 6")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DenoisingLoss, "per_example", flaky)
    out = tmp_path / "pretrain"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_cfg, digits_public_dir, out)
    assert not out.exists()
    assert leftovers(tmp_path, "pretrain") == []
    # the checkpoint before the crash survives for a resume
    assert json.loads((work_dir_for(out) / LATEST).read_text())["step"] == 4


def test_failure_while_publishing_keeps_previous_output(
        tmp_path: Path, tiny_cfg: Config, digits_public_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "pretrain"
    out.mkdir()
    (out / "marker.txt").write_text("previous output")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pretrain, "write_metrics", broken)
    with pytest.raises(OSError, match="disk full"):
        run(tiny_cfg, digits_public_dir, out)
    assert [p.name for p in out.iterdir()] == ["marker.txt"]
    assert leftovers(tmp_path, "pretrain") == []


# --------------------------------------------------------------------------- real kill

CHILD = """
import json, sys, time
from pathlib import Path

import torch
torch.set_num_threads(1)  # as in the parent, so both compute bit-identical results

from dpsynth.config import from_dict
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.stages import pretrain
from dpsynth.tracking import NullTracker

raw, public, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
original = DenoisingLoss.per_example

def slow(self, *args, **kwargs):
    time.sleep(0.25)  # slow each step down so the parent can kill us mid-run
    return original(self, *args, **kwargs)

DenoisingLoss.per_example = slow
pretrain.run(from_dict(raw), public_dir=public, out_dir=out, tracker=NullTracker())
print("finished")
"""


def test_sigkill_then_resume_is_exact(tmp_path: Path, tiny_cfg: Config,
                                      digits_public_dir: Path, pretrained_dir: Path) -> None:
    out = tmp_path / "pretrain"
    latest = work_dir_for(out) / LATEST
    log = open(tmp_path / "child.log", "w+")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(tiny_cfg.to_dict()), str(digits_public_dir),
         str(out)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not latest.is_file():
            if child.poll() is not None:
                log.seek(0)
                pytest.fail(f"child exited ({child.returncode}) before a checkpoint: {log.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 120 s")
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()  # no-op if already dead
        child.wait(timeout=60)
        log.close()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    killed_at = json.loads(latest.read_text())["step"]
    assert 0 < killed_at < tiny_cfg.pretrain.steps

    result = run(tiny_cfg, digits_public_dir, out, resume=True)
    assert result.resumed_from == killed_at
    assert_same_model(out, pretrained_dir)


# --------------------------------------------------------------------------- privacy


class RawTracker(NullTracker):
    """A NullTracker that also keeps every metric value exactly as it was passed."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_metrics: list[tuple[dict[str, Any], int | None]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.raw_metrics.append((dict(metrics), step))
        super().log_metrics(metrics, step)


def test_tracker_sees_only_config_and_scalar_metrics(tmp_path: Path, tiny_cfg: Config,
                                                     digits_public_dir: Path) -> None:
    tracker = RawTracker()
    out = tmp_path / "pretrain"
    run(tiny_cfg, digits_public_dir, out, tracker=tracker)

    expected = flatten(tiny_cfg.section(*SECTIONS))
    assert set(tracker.params) == set(expected) | {"num_params", "pretrain.workers"}
    assert tracker.params["pretrain.workers"] == 1
    assert {k: tracker.params[k] for k in expected} == expected
    assert isinstance(tracker.params["num_params"], int)
    for key, value in tracker.params.items():  # JSON scalars or short lists of them
        flat = value if isinstance(value, list) else [value]
        assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat), key

    names = set()
    for metrics, step in tracker.raw_metrics:
        names |= set(metrics)
        for key, value in metrics.items():
            assert type(value) is float, (key, type(value))  # no tensors / arrays / lists
        assert step is None or isinstance(step, int)
    assert names == {"loss"} | METRIC_KEYS

    # the loss series is exactly the published loss.csv, one point per logging window
    series = [(step, m["loss"]) for m, step in tracker.raw_metrics if "loss" in m]
    assert series == loss_rows(out)
    assert tracker.artifacts == [out / "loss.csv", out / "loss.png"]


# --------------------------------------------------------------------------- divergence


def nan_loss_from(k: int) -> Callable[..., torch.Tensor]:
    """A `DenoisingLoss.per_example` whose value is NaN from its k-th call (step k) on."""
    calls = {"n": 0}
    original = DenoisingLoss.per_example

    def loss(self: DenoisingLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        value = original(self, *args, **kwargs)
        return value * float("nan") if calls["n"] >= k else value

    return loss


def nan_update_at(k: int) -> Callable[..., torch.Tensor]:
    """A `DenoisingLoss.per_example` with a finite value at every step whose gradient is
    NaN at step k (d/dx sqrt(x) at 0 is inf, times 0): the loss check cannot see
    it, the parameters after the update are NaN."""
    calls = {"n": 0}
    original = DenoisingLoss.per_example

    def loss(self: DenoisingLoss, net: torch.nn.Module, *args: Any,
             **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        value = original(self, net, *args, **kwargs)
        if calls["n"] == k:
            value = value + torch.sqrt(next(net.parameters()).sum() * 0)
        return value

    return loss


@pytest.mark.parametrize("fault, step, what", [
    (nan_loss_from(7), 7, "the loss on a public batch is nan"),
    # step 8 is a checkpoint step: the diverged state must not be saved
    (nan_update_at(8), 8, "the parameters after the update are not finite"),
], ids=["nan-loss", "nan-update"])
def test_divergence_stops_keeps_the_last_good_checkpoint_and_can_resume(
        tmp_path: Path, tiny_cfg: Config, digits_public_dir: Path, pretrained_dir: Path,
        monkeypatch: pytest.MonkeyPatch, fault: Callable[..., torch.Tensor], step: int,
        what: str) -> None:
    out = tmp_path / "pretrain"
    work = work_dir_for(out)
    with monkeypatch.context() as m:
        m.setattr(DenoisingLoss, "per_example", fault)
        with pytest.raises(TrainingDiverged) as info:
            run(tiny_cfg, digits_public_dir, out)
    message = str(info.value)
    assert f"pre-training diverged at step {step}: {what}" in message
    assert f"the last good checkpoint (step 4) is kept in {work}" in message  # every 4 steps
    assert "pretrain.lr (now 0.002)" in message and "pretrain.warmup_steps" in message
    assert not out.exists() and leftovers(tmp_path, "pretrain") == []

    state = load_latest(work)
    assert state is not None and state.step == 4 < step
    assert [p.name for p in work.glob("ckpt-*")] == ["ckpt-00000004"]
    for tensors in (state.net, state.ema):
        assert all(torch.isfinite(v).all() for v in tensors.values())

    # the fault gone, an unchanged re-run resumes from it and ends where an
    # uninterrupted run does
    result = run(tiny_cfg, digits_public_dir, out)
    assert result.resumed_from == 4
    assert_same_model(out, pretrained_dir)


def test_divergence_before_the_first_checkpoint_says_a_rerun_starts_over(
        tmp_path: Path, tiny_cfg: Config, digits_public_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DenoisingLoss, "per_example", nan_loss_from(2))
    out = tmp_path / "pretrain"
    with pytest.raises(TrainingDiverged, match="diverged at step 2") as info:
        run(tiny_cfg, digits_public_dir, out)
    assert "no checkpoint was saved before it (the first is due at step 4" in str(info.value)
    assert not out.exists() and load_latest(work_dir_for(out)) is None


def _npz_source(path: Path, n: int = 40) -> str:
    """A `data.<role>=...` override value: an npz source of `n` 8x8 digits-classed images."""
    import numpy as np

    rng = np.random.default_rng(len(str(path)))
    np.savez(path, images=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
             labels=np.arange(n) % 10, classes=np.array([str(d) for d in range(10)]))
    return f"{{kind: npz, path: {path}}}"


@pytest.mark.parametrize("layout", ["carved", "own-public-and-test"])
def test_the_private_split_is_refused_as_public(tmp_path: Path, make_cfg: Callable[..., Config],
                                                layout: str) -> None:
    """Pre-training is not private: `--public` may not be the split `prepare` marked
    private, whether the other roles were carved from the pool too or came from
    their own sources (then the private split is the whole pool). Nothing is written."""
    from dpsynth.errors import InputError
    from dpsynth.io.shards import read_manifest
    from dpsynth.stages import prepare

    overrides = [] if layout == "carved" else [
        f"data.public={_npz_source(tmp_path / 'public.npz')}",
        f"data.test={_npz_source(tmp_path / 'test.npz')}"]
    prepared = prepare.run(make_cfg(*overrides), out_dir=tmp_path / "prepare",
                           tracker=NullTracker())
    if layout != "carved":
        assert prepared.private.count == 1797  # the whole pool
    out = tmp_path / "pretrain"
    with pytest.raises(InputError, match=r"public_dir=.*prepare/private.*is the PRIVATE split"
                                         r".*pre-training is not private.*"
                                         r"artifacts/prepare/public"):
        pretrain.run(make_cfg(), public_dir=tmp_path / "prepare" / "private", out_dir=out,
                     tracker=NullTracker())
    assert not out.exists() and not work_dir_for(out).exists()
    # the public split of the same prepare is not taken for the private one
    refuse_private_split("public_dir", tmp_path / "prepare" / "public",
                         read_manifest(tmp_path / "prepare" / "public"), "")
