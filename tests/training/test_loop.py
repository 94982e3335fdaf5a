"""The one training loop (`dpsynth.training.loop`) on a tiny linear regression: the
plugged-in gradient is what the optimizer applies, a resumed run ends where an
uninterrupted one does, divergence stops the run and keeps the last good
checkpoint, and a DP loop releases only checkpointed values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch

from dpsynth.diffusion.ema import EMA
from dpsynth.tracking import NullTracker
from dpsynth.training import loop as loop_module
from dpsynth.training.checkpoint import TrainState, load_latest
from dpsynth.training.loop import (Checkpoints, Curve, Divergence, DivergenceCheck, Progress,
                                   TrainingLoop, all_finite)


class Diverged(Exception):
    def __init__(self, divergence: Divergence) -> None:
        super().__init__(f"diverged at step {divergence.step}")
        self.divergence = divergence


class RegressionGradient:
    """A mean squared error on a batch of 4 drawn from a checkpointed generator.
    `nan_loss_at` / `nan_grad_at` (1-based steps) inject faults."""

    def __init__(self, net: torch.nn.Linear, generator: torch.Generator,
                 nan_loss_at: int | None = None, nan_grad_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
        self.net, self.generator = net, generator
        self.nan_loss_at, self.nan_grad_at = nan_loss_at, nan_grad_at
        self.calls: list[int] = []  # the steps it was called for
        self.losses: list[float] = []  # what it returned

    def __call__(self, step: int) -> float:
        self.calls.append(step)
        self.losses.append(self._loss(step))
        return self.losses[-1]

    def _loss(self, step: int) -> float:
        idx = torch.randint(0, len(self.x), (4,), generator=self.generator)
        loss = (self.net(self.x[idx]) - self.y[idx]).pow(2).mean()
        if step + 1 == self.nan_loss_at:
            return float("nan")
        loss.backward()
        if step + 1 == self.nan_grad_at:  # a finite loss, a non-finite update
            self.net.weight.grad.fill_(float("inf"))
        return loss.item()


class Run:
    """A loop of 12 steps (log every 3, checkpoint every 4) and what it touched."""

    def __init__(self, work_dir: Path, *, every_step: bool = False,
                 before_release: bool = False, is_main: bool = True,
                 tracker: NullTracker | None = None, nan_loss_at: int | None = None,
                 nan_grad_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3, 1)
        self.ema = EMA(self.net, 0.9)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=0.05)
        self.generator = torch.Generator().manual_seed(1)
        self.gradient = RegressionGradient(self.net, self.generator, nan_loss_at, nan_grad_at)
        self.tracker = tracker or NullTracker()
        self.work_dir = work_dir
        self.saved: list[int] = []
        self.loop = TrainingLoop(
            net=self.net, optimizer=self.opt, gradient=self.gradient, steps=12, desc="test",
            ema=self.ema, is_main=is_main,
            learning_rate=lambda step: 0.05 * min(1.0, (step + 1) / 2),
            curve=Curve("loss", 3, lambda p: sum(p.window) / len(p.window), self.tracker),
            checkpoints=Checkpoints(work_dir, 4, self.checkpoint, saved=self.saved.append,
                                    before_release=before_release),
            divergence=DivergenceCheck(Diverged, every_step=every_step))

    def checkpoint(self, progress: Progress) -> TrainState:
        return self.loop.state(progress, generator=self.generator.get_state(), meta={
            "ema_num_updates": self.ema.num_updates, "history": progress.history,
            "window": progress.window})

    def run(self, end: int | None = None) -> Progress:
        state = load_latest(self.work_dir)
        progress = Progress() if state is None else self.loop.resume(state, self.generator)
        return self.loop.run(progress, end)

    def weights(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in (*self.net.parameters(),
                                             *self.ema.shadow.parameters())]


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- the step


class FixedGradient:
    """Sets `.grad` of every parameter to (step + 1) * `direction`; reports no loss."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __call__(self, step: int) -> None:
        for p in self.net.parameters():
            p.grad = torch.full_like(p, float(step + 1))
        return None


def test_the_plugged_in_gradient_is_what_the_optimizer_applies() -> None:
    net = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in net.parameters()]
    ema = EMA(net, 0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    progress = TrainingLoop(net=net, optimizer=opt, gradient=FixedGradient(net), steps=3,
                            desc="test", ema=ema).run(Progress())
    # SGD: w - 0.1 * (1 + 2 + 3), exactly the gradients the plug-in set
    for p, p0 in zip(net.parameters(), before):
        torch.testing.assert_close(p.detach(), p0 - 0.6, rtol=0, atol=1e-6)
        assert p.grad is None  # zeroed after each step
    assert progress.step == 3 and progress.history == [] and progress.window == []
    assert ema.num_updates == 3
    shadow = next(ema.shadow.parameters())
    assert not torch.equal(shadow, next(net.parameters()))  # an average, not a copy


def test_the_learning_rate_is_set_before_each_gradient() -> None:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    seen: list[float] = []
    fixed = FixedGradient(net)

    def gradient(step: int) -> None:
        seen.append(opt.param_groups[0]["lr"])
        return fixed(step)

    TrainingLoop(net=net, optimizer=opt, gradient=gradient, steps=4, desc="test",
                 learning_rate=lambda step: 0.05 * min(1.0, (step + 1) / 2)).run(Progress())
    assert seen == [0.025, 0.05, 0.05, 0.05]


def test_the_curve_and_checkpoints_follow_their_schedules(tmp_path: Path) -> None:
    run = Run(tmp_path / "work")
    progress = run.run()
    history = progress.history
    assert [step for step, _ in history] == [3, 6, 9, 12]
    assert run.tracker.metrics == [({"loss": v}, s) for s, v in history]
    # each logged value is the mean of the losses the gradient returned in its window
    losses = run.gradient.losses
    for step, value in history:
        assert value == pytest.approx(sum(losses[step - 3:step]) / 3, rel=1e-12)
    assert run.saved == [4, 8, 12] and progress.last_saved == 12
    assert sorted(p.name for p in (tmp_path / "work").glob("ckpt-*")) == [
        "ckpt-00000008", "ckpt-00000012"]  # save_checkpoint keeps two
    state = load_latest(tmp_path / "work")
    assert state is not None and state.meta["history"] == history and state.meta["window"] == []


def test_a_stop_between_log_steps_checkpoints_the_partial_window(tmp_path: Path) -> None:
    run = Run(tmp_path / "work")
    progress = run.run(end=5)  # a checkpoint at 4 and at the (early) end
    assert run.saved == [4, 5] and [s for s, _ in progress.history] == [3]
    state = load_latest(tmp_path / "work")
    assert state is not None and state.step == 5 and len(state.meta["window"]) == 2


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stops", [[5], [4, 9], [1, 2, 3, 11]])
def test_a_resumed_run_ends_with_the_weights_and_curve_of_an_uninterrupted_one(
        tmp_path: Path, stops: list[int]) -> None:
    straight = Run(tmp_path / "straight")
    straight_progress = straight.run()
    for stop in stops:
        Run(tmp_path / "resumed").run(end=stop)  # a fresh process each time
    resumed = Run(tmp_path / "resumed")
    progress = resumed.run()
    assert_equal(resumed.weights(), straight.weights())
    assert progress.history == straight_progress.history
    assert resumed.ema.num_updates == 12
    assert resumed.gradient.calls == list(range(stops[-1], 12))  # the rest, no step twice


# --------------------------------------------------------------------------- divergence


def test_a_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(
        tmp_path: Path) -> None:
    run = Run(tmp_path / "work", nan_loss_at=7)
    with pytest.raises(Diverged) as info:
        run.run()
    assert info.value.divergence == Divergence(step=7, loss=info.value.divergence.loss,
                                               last_saved=4)
    assert math.isnan(info.value.divergence.loss)
    assert all_finite(run.net)
    state = load_latest(tmp_path / "work")
    assert state is not None and state.step == 4 and run.saved == [4]
    # nothing of the diverged step was logged
    assert [s for _, s in run.tracker.metrics] == [3, 6]


@pytest.mark.parametrize("every_step, fault_at, caught_at, by_loss", [
    (False, 8, 8, False),  # before step 8's checkpoint, though the loss was finite
    (False, 6, 7, True),  # no checkpoint due: the next (public) loss is NaN
    (True, 6, 6, False),  # DP: after the update itself
])
def test_a_non_finite_update_is_never_saved(tmp_path: Path, every_step: bool, fault_at: int,
                                            caught_at: int, by_loss: bool) -> None:
    """Without `every_step` the parameters are tested before each checkpoint; with
    it, after every update (the loss of a private batch may not be looked at)."""
    run = Run(tmp_path / "work", nan_grad_at=fault_at, every_step=every_step)
    with pytest.raises(Diverged) as info:
        run.run()
    divergence = info.value.divergence
    assert (divergence.step, divergence.last_saved) == (caught_at, 4)
    assert (divergence.loss is not None and math.isnan(divergence.loss)) == by_loss
    state = load_latest(tmp_path / "work")
    assert state is not None and state.step == 4 and run.saved == [4]
    assert all(torch.isfinite(t).all() for t in (*state.net.values(), *state.ema.values()))
    # the fault gone, a re-run resumes from step 4 and ends where a clean run does
    clean, resumed = Run(tmp_path / "clean"), Run(tmp_path / "work")
    clean.run()
    resumed.run()
    assert_equal(resumed.weights(), clean.weights())


def test_without_a_divergence_check_nothing_is_tested(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 1)
    gradient = RegressionGradient(net, torch.Generator().manual_seed(1), nan_grad_at=1)
    TrainingLoop(net=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                 gradient=gradient, steps=2, desc="twin").run(Progress())
    assert not all_finite(net) and gradient.calls == [0, 1]


# --------------------------------------------------------------------------- DP release


def test_before_release_logs_only_checkpointed_values(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, int | None]] = []
    real_save = loop_module.save_checkpoint

    def save(work_dir: Path, state: TrainState, **kw: Any) -> Path:
        events.append(("checkpoint", state.step))
        return real_save(work_dir, state, **kw)

    class Recorder(NullTracker):
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            events.append(("release", step))
            super().log_metrics(metrics, step)

    monkeypatch.setattr(loop_module, "save_checkpoint", save)
    Run(tmp_path / "work", before_release=True, tracker=Recorder()).run()
    # every log step (3, 6, 9, 12) is a checkpoint step too, saved before its release
    assert events == [("release" if k else "checkpoint", s) for s, k in [
        (3, 0), (3, 1), (4, 0), (6, 0), (6, 1), (8, 0), (9, 0), (9, 1), (12, 0), (12, 1)]]


def test_other_workers_step_but_neither_log_nor_save(tmp_path: Path) -> None:
    main, other = Run(tmp_path / "main"), Run(tmp_path / "other", is_main=False)
    main.run()
    other.run()
    assert_equal(other.weights(), main.weights())  # the replicas stay in sync
    assert other.tracker.metrics == [] and other.saved == []
    assert not (tmp_path / "other").exists()


def test_before_release_needs_a_curve(tmp_path: Path) -> None:
    net = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="before_release"):
        TrainingLoop(net=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                     gradient=FixedGradient(net), steps=1, desc="x", ema=EMA(net, 0.9),
                     checkpoints=Checkpoints(tmp_path, 1, lambda p: None,  # type: ignore
                                             before_release=True))
