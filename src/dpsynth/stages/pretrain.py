"""`dpsynth pretrain`: non-private diffusion training on the public split.

Public pre-training is what makes DP fine-tuning work at all (Ghalebikesabi et
al. 2023, Sec. 3.1): the private phase then only has to adapt the model.
Resumable: checkpoints in the work folder every `pretrain.checkpoint_every`
steps; a killed and resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dpsynth.config import Config
from dpsynth.data.roles import refuse_private_split
from dpsynth.devices import training_device
from dpsynth.diffusion.ema import EMA
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.unet import UNetSpec, build_unet, save_model
from dpsynth.errors import InputError, TrainingDiverged
from dpsynth.io.atomic import atomic_dir
from dpsynth.io.shards import read_dataset, read_manifest
from dpsynth.plots import plot_loss
from dpsynth.provenance import write_run_info
from dpsynth.stages.common import fingerprint, kept_checkpoint, work_dir_for, write_metrics
from dpsynth.tracking import Tracker
from dpsynth.training.checkpoint import TrainState, load_latest
from dpsynth.training.gradients import MeanLossGradient
from dpsynth.training.loop import (Checkpoints, Curve, Divergence, DivergenceCheck, Progress,
                                   TrainingLoop)
from dpsynth.training.workers import Workers

log = logging.getLogger(__name__)
SECTIONS = ("seed", "model", "diffusion", "pretrain")


@dataclass(frozen=True, kw_only=True)
class PretrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    resumed_from: int


def summary(result: PretrainResult, cfg: Config) -> str:
    """The CLI's one line about a finished run."""
    return (f"{result.steps} steps, final loss {result.final_loss:.4f}, model in "
            f"{result.out_dir}")


def _diverged(cfg: Config, step: int, what: str, work_dir: Path,
              last_saved: int | None) -> TrainingDiverged:
    pc = cfg.pretrain
    kept = kept_checkpoint(work_dir, last_saved, pc.checkpoint_every, "pretrain")
    return TrainingDiverged(
        f"pre-training diverged at step {step}: {what}. Nothing was published and the "
        f"diverged state was not saved; {kept}. Lower pretrain.lr (now {pc.lr:g}) or raise "
        f"pretrain.warmup_steps (now {pc.warmup_steps}); a changed pretrain section starts "
        "over, an unchanged re-run resumes from the checkpoint (e.g. after a hardware fault)")


def run(cfg: Config, *, public_dir: Path, out_dir: Path, tracker: Tracker,
        resume: bool = True, work_dir: Path | None = None,
        stop_after: int | None = None, device: str | torch.device | None = None,
        sync_work: Callable[[], None] | None = None) -> PretrainResult:
    """Train the UNet on `public_dir` and publish the EMA model into `out_dir`.

    Args:
        cfg: resolved config (sections seed, model, diffusion, pretrain).
        public_dir: the public split written by `prepare`.
        out_dir: published atomically when training completes.
        resume: continue from the latest compatible checkpoint in `work_dir`.
        work_dir: checkpoints; default `<out_dir parent>/.work/<out_dir name>`.
        sync_work: called after each checkpoint: the driver's upload of a mirrored
            `s3://` work folder (`dpsynth.io.work.Staged.sync`).
        stop_after: stop (without publishing) after this many steps -- tests use
            it to simulate a killed run.
        device: where the net, its EMA and the optimizer live; default the GPU when
            there is one (under torchrun, the worker's own). The batch draws stay on
            the CPU (one checkpointed CPU generator), so a CPU run is unchanged and a
            checkpoint resumes on either.

    Under torchrun (`WORLD_SIZE` > 1, one machine or several) the workers split each
    batch of `pretrain.batch_size` (the global batch) and sum their gradients, so
    they take the one-process run's steps; rank 0 alone logs, checkpoints and
    publishes, and every worker resumes from the same checkpoint.

    Raises:
        InputError: the public split is missing, bad or empty, or is the split
            `prepare` marked private.
        TrainingDiverged: the loss or the parameters became non-finite; the last
            good checkpoint stays in `work_dir`, nothing is published.
    """
    pc = cfg.pretrain
    work_dir = Path(work_dir) if work_dir else work_dir_for(out_dir)
    # before reading any image: pre-training is not private, so never on the private split
    refuse_private_split("public_dir", public_dir, read_manifest(public_dir),
                         "pre-training is not private: it may only see public data")
    images, labels, manifest = read_dataset(public_dir)
    if len(images) == 0:
        raise InputError(f"{public_dir}: the public split holds no images; pass the public "
                         "split of `dpsynth prepare` (e.g. artifacts/prepare/public)")
    h, w, c = manifest.shape
    spec = UNetSpec(image_size=h, channels=c, num_classes=len(manifest.classes), model=cfg.model)
    run_id = fingerprint(cfg.section(*SECTIONS), manifest.content_hash)

    # uint8 until a batch is drawn: ImageNet32 as float32 would take 15.7 GB
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels).long()
    workers = Workers.from_env()
    device = training_device(device)
    torch.manual_seed(cfg.seed)
    net = build_unet(spec).to(device).train()  # built on the CPU: the same init anywhere
    ema = EMA(net, pc.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=pc.lr, weight_decay=0.0)
    loss_fn = DenoisingLoss.from_config(cfg.diffusion, spec.null_label)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def checkpoint(progress: Progress) -> TrainState:
        return loop.state(progress, generator=gen.get_state(), meta={
            "run_id": run_id, "ema_num_updates": ema.num_updates,
            "history": progress.history, "window": progress.window})

    def diverged(d: Divergence) -> TrainingDiverged:
        what = ("the parameters after the update are not finite" if d.loss is None else
                f"the loss on a public batch is {d.loss}")  # public data: testing it is free
        return _diverged(cfg, d.step, what, work_dir, d.last_saved)

    loop = TrainingLoop(
        net=net, optimizer=opt, steps=pc.steps, desc="pretrain", ema=ema,
        gradient=MeanLossGradient(net, loss_fn, x_all, y_all, pc.batch_size, gen, device,
                                  workers=workers, precision=pc.precision),
        learning_rate=lambda step: pc.lr * min(1.0, (step + 1) / max(1, pc.warmup_steps)),
        curve=Curve("loss", pc.log_every, lambda p: sum(p.window) / len(p.window), tracker),
        checkpoints=Checkpoints(work_dir, pc.checkpoint_every, checkpoint, sync=sync_work),
        divergence=DivergenceCheck(diverged),  # the loss every step, the update at checkpoints
        is_main=workers.is_main)

    state = load_latest(work_dir) if resume else None
    if state is not None and state.meta.get("run_id") != run_id:
        log.warning("ignoring checkpoint in %s: it belongs to another config or dataset",
                    work_dir)
        state = None
    progress = Progress()
    if state is not None:
        progress = loop.resume(state, generator=gen)
        log.info("resuming pre-training from step %d", progress.step)
    if not workers.same(progress.step):  # e.g. a node that could not see the work folder
        raise InputError(f"pre-training workers resumed from different steps (this one: "
                         f"{progress.step}); every node needs the same work folder "
                         f"{work_dir} (a shared volume, or an s3:// output)")
    if state is None and workers.is_main and work_dir.exists():
        shutil.rmtree(work_dir)  # after every worker has looked for a checkpoint
    start = progress.step

    tracker.log_params(cfg.section(*SECTIONS) | {
        "pretrain.workers": workers.world_size,
        "num_params": sum(p.numel() for p in net.parameters())})
    t0 = time.perf_counter()
    end = pc.steps if stop_after is None else min(pc.steps, stop_after)
    history = loop.run(progress, end).history
    if end < pc.steps or not workers.is_main:
        if end == pc.steps:
            workers.agree(True)  # a worker ends once rank 0 has published the model
        return PretrainResult(out_dir=out_dir, steps=end,
                              final_loss=history[-1][1] if history else float("nan"),
                              resumed_from=start)

    final_loss = history[-1][1]
    metrics = {"final_loss": final_loss, "steps": pc.steps,
               "num_params": sum(p.numel() for p in net.parameters()),
               "train_seconds": round(time.perf_counter() - t0, 2), "resumed_from_step": start}
    with atomic_dir(out_dir) as tmp:
        save_model(tmp, spec, net, ema.shadow, extra={
            "classes": list(manifest.classes), "trained_on": manifest.content_hash,
            "run_id": run_id})
        with open(tmp / "loss.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss"])
            writer.writerows(history)
        plot_loss(history, tmp / "loss.png", "Pre-training loss (public split)")
        write_run_info(tmp, "pretrain", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    tracker.log_artifact(out_dir / "loss.csv")
    tracker.log_artifact(out_dir / "loss.png")
    shutil.rmtree(work_dir, ignore_errors=True)
    workers.agree(True)  # published: the other workers may end
    return PretrainResult(out_dir=out_dir, steps=pc.steps, final_loss=final_loss,
                          resumed_from=start)
