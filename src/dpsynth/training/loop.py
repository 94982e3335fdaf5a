"""One training loop for every trainer: pre-training (`stages.pretrain`), DP
fine-tuning (`stages.finetune`) and the audit's twin runs (`audit.canaries`).

The loop owns what they all do alike: the steps and their progress bar, the
optimizer step, the EMA, the divergence checks, periodic checkpoints, resuming
from one, and the logged curve. What a step's gradient is -- a plain mean-loss
backward on public data, or DP-SGD's clipped and noised sum -- is plugged in
(`Gradient`); what a stage adds around the loop (its privacy ledger, its error
messages, what its checkpoints carry) comes in as small callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from dpsynth.diffusion.ema import EMA
from dpsynth.tracking import Tracker
from dpsynth.training.checkpoint import TrainState, restore, save_checkpoint


class Gradient(Protocol):
    """One step's gradient: the plug-in point of the loop."""

    def __call__(self, step: int) -> float | None:
        """Leave the gradient of step `step` (0-based) in the `.grad` of the trained
        parameters (the loop zeroes them after each optimizer step).

        Returns:
            The batch's mean loss when it may be looked at (public data: the loop
            stops on a non-finite one), None when it may not (a private batch:
            testing its loss would be a release outside the accounting,
            PRIVACY.md rule 6).
        """
        ...


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` is finite (one device sync in all)."""
    flags = [torch.isfinite(p).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


@dataclass
class Progress:
    """Where a run stands: what the loop carries from step to step, and what a
    checkpoint keeps of it for a resume.

    Attributes:
        step: optimizer steps done.
        history: ``[step, value]`` of the curve at each log step.
        window: the losses `Gradient` returned since the last log step (a
            checkpoint between two log steps keeps them, so that a resumed
            curve equals the uninterrupted one).
        last_saved: the step of the newest checkpoint (for error messages).
    """

    step: int = 0
    history: list[list[float]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    last_saved: int | None = None

    @classmethod
    def of_checkpoint(cls, state: TrainState) -> "Progress":
        """The progress a checkpoint was saved at (its meta's `history`, `window`)."""
        return cls(step=state.step, history=state.meta["history"],
                   window=state.meta.get("window", []), last_saved=state.step)


@dataclass(frozen=True)
class Divergence:
    """A step after which training cannot go on.

    Attributes:
        step: the step (1-based) whose loss or update was not finite.
        loss: that non-finite loss; None when the loss was finite (or not looked
            at) and the parameters after the update are not.
        last_saved: the newest checkpoint's step (None: none was saved yet); a
            diverged state is never saved.
    """

    step: int
    loss: float | None
    last_saved: int | None


@dataclass(frozen=True)
class DivergenceCheck:
    """How the loop stops a run that diverged.

    Attributes:
        error: the stage's exception for a divergence (its message names the
            settings to change; it may also record the steps spent).
        every_step: test the parameters after every update. Needed where the
            loss may not be tested (DP: only the noisy update is post-processing);
            otherwise they are tested before each checkpoint, so that a diverged
            state is never saved (a finite loss does not prove a finite update).
    """

    error: Callable[[Divergence], Exception]
    every_step: bool = False


def _nothing(step: int) -> None:
    return None


@dataclass(frozen=True)
class Checkpoints:
    """Where and when the loop saves a checkpoint, and what the stage adds to it.

    Attributes:
        work_dir: the checkpoint folder (`training.checkpoint.save_checkpoint`).
        every: a checkpoint every this many steps, and after the run's last step.
        state: the checkpoint at `Progress.step`, usually `TrainingLoop.state`
            with the stage's meta (fingerprints, accountant history).
        saved: called with the step after each checkpoint is saved.
        before_release: DP: every log step is a checkpoint step too, and the
            curve's value is logged only once the checkpoint holding it is saved.
            A resume redoes the steps after the last checkpoint with fresh noise,
            and two noisy versions of a released step would spend more than the
            privacy ledger records.
        sync: called once each checkpoint is complete, before `saved`: the
            driver's upload of a mirrored `s3://` work folder
            (`dpsynth.io.work.Staged.sync`), so a retry elsewhere resumes from it.
    """

    work_dir: Path
    every: int
    state: Callable[[Progress], TrainState]
    saved: Callable[[int], None] = _nothing
    before_release: bool = False
    sync: Callable[[], None] | None = None


@dataclass(frozen=True)
class Curve:
    """The logged training curve: a value every `every` steps and at the run's last.

    Attributes:
        name: its name for the tracker and the progress bar ("loss").
        every: the logging interval.
        measure: the value at a log step, from the progress so far (e.g. the
            mean of `Progress.window`, or a loss on public data).
        tracker: where the values go, with the step as MLflow's step.
    """

    name: str
    every: int
    measure: Callable[[Progress], float]
    tracker: Tracker


@dataclass(frozen=True, eq=False)
class TrainingLoop:
    """`steps` optimizer steps of `net` with the pluggable `gradient`.

    Each step: set the learning rate, compute the gradient, stop on a non-finite
    loss, step the optimizer, test the parameters (every step or before a
    checkpoint), update the EMA, then -- on the main worker only -- log the curve
    and save the checkpoint that is due.

    Attributes:
        net: the model trained, in place.
        optimizer: its optimizer over the trained parameters.
        gradient: one step's gradient (`Gradient`).
        steps: the run's planned steps: the progress bar's total and the last
            log step (a run stopped early still counts towards the same plan).
        desc: the progress bar's label.
        ema: the weights' moving average, updated after every step.
        learning_rate: the learning rate of step `step` (0-based), set before
            its gradient; None: the optimizer's own.
        curve: what is logged, and when.
        checkpoints: where and when to save.
        divergence: how to stop a diverged run; None: no check (the audit's
            short twin runs publish no model).
        is_main: False on torchrun workers but rank 0, which keep their replica
            in sync (same summed gradient, same step) but neither log nor save.
        bar_format: tqdm's `bar_format` (DP: steps only, no rate: the rate
            follows the private batch sizes, PRIVACY.md rule 8).
    """

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    gradient: Gradient
    steps: int
    desc: str
    ema: EMA | None = None
    learning_rate: Callable[[int], float] | None = None
    curve: Curve | None = None
    checkpoints: Checkpoints | None = None
    divergence: DivergenceCheck | None = None
    is_main: bool = True
    bar_format: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoints is not None and self.checkpoints.before_release and (
                self.curve is None):
            raise ValueError("Checkpoints.before_release needs a curve to hold back")
        if self.checkpoints is not None and self.ema is None:
            raise ValueError("a checkpointed loop needs an EMA (TrainState.ema)")

    def state(self, progress: Progress, *, meta: dict[str, Any],
              generator: torch.Tensor | None = None,
              secret_rng: torch.Tensor | None = None) -> TrainState:
        """The checkpoint at `progress.step`: the net, its EMA, the optimizer and
        torch's global generator (dropout), with the stage's `meta` (JSON: saved
        as given, so its keys keep the stage's order) and generator states."""
        assert self.ema is not None  # __post_init__: checkpointed loops have one
        return TrainState(step=progress.step, net=self.net.state_dict(),
                          ema=self.ema.shadow.state_dict(),
                          optimizer=self.optimizer.state_dict(), generator=generator,
                          torch_rng=torch.get_rng_state(), secret_rng=secret_rng, meta=meta)

    def resume(self, state: TrainState, generator: torch.Generator | None = None
               ) -> Progress:
        """Put the net, EMA, optimizer, `generator` and torch's global generator
        back where `state` was; its progress, to pass to `run`."""
        restore(state, net=self.net, ema=self.ema, optimizer=self.optimizer,
                generator=generator)
        return Progress.of_checkpoint(state)

    def run(self, progress: Progress, end: int | None = None) -> Progress:
        """Train from `progress.step` to `end` (default `steps`); `progress` is
        updated in place and returned.

        Raises:
            The `divergence.error` of a non-finite loss or update; the diverged
            state is neither saved nor logged.
        """
        end = self.steps if end is None else end
        bar = tqdm(range(progress.step, end), initial=progress.step, total=self.steps,
                   desc=self.desc, disable=None, bar_format=self.bar_format)
        try:
            for step in bar:
                self._step(step, end, progress, bar)
        finally:
            bar.close()
        return progress

    def _step(self, step: int, end: int, progress: Progress, bar: tqdm) -> None:
        done = step + 1
        if self.learning_rate is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(step)
        loss = self.gradient(step)
        if loss is not None and not math.isfinite(loss) and self.divergence is not None:
            raise self.divergence.error(Divergence(done, loss, progress.last_saved))
        self.optimizer.step()  # DP: an empty batch still steps, noise only (PRIVACY.md rule 1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.divergence is not None and self.divergence.every_step:
            self._check_parameters(done, progress)
        if self.ema is not None:
            self.ema.update(self.net)
        progress.step = done
        if loss is not None:
            progress.window.append(loss)
        if not self.is_main:
            return
        curve, ckpt = self.curve, self.checkpoints
        value = None  # the curve's value, at log steps
        if curve is not None and (done % curve.every == 0 or done == self.steps):
            value = curve.measure(progress)
            progress.history.append([done, value])
            progress.window = []
        held = ckpt is not None and ckpt.before_release
        if value is not None and not held:
            self._release(done, value, bar)
        if ckpt is not None and (done % ckpt.every == 0 or done == end
                                 or (held and value is not None)):
            if self.divergence is not None and not self.divergence.every_step:
                self._check_parameters(done, progress)
            save_checkpoint(ckpt.work_dir, ckpt.state(progress), on_saved=ckpt.sync)
            ckpt.saved(done)
            progress.last_saved = done
        if value is not None and held:
            self._release(done, value, bar)

    def _check_parameters(self, done: int, progress: Progress) -> None:
        assert self.divergence is not None
        if not all_finite(self.net):
            raise self.divergence.error(Divergence(done, None, progress.last_saved))

    def _release(self, done: int, value: float, bar: tqdm) -> None:
        assert self.curve is not None
        self.curve.tracker.log_metrics({self.curve.name: value}, step=done)
        bar.set_postfix({self.curve.name: f"{value:.4f}"})
