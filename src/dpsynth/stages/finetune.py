"""`dpsynth finetune`: DP-SGD fine-tuning of the pre-trained model on the private
split -- the only stage that trains on private data (PRIVACY.md).

Order of operations: validate the model (no BatchNorm), calibrate sigma to the
target (epsilon, delta) for the planned steps, reserve the run in the dataset's
privacy ledger (refused if the dataset's budget would be exceeded), then train
with Poisson-sampled logical batches, per-example clipping of the K-averaged
gradient, and Gaussian noise once per step. Released: the DP model (EMA and
raw weights), `privacy.json`, and metrics computed on *public* data only.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dpsynth.config import Config
from dpsynth.data.roles import refuse_private_split
from dpsynth.devices import training_device
from dpsynth.diffusion.ema import EMA
from dpsynth.diffusion.lora import add_lora, merge_lora
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.samplers import from_uint8
from dpsynth.diffusion.unet import load_model, save_model, weights_file, with_classes
from dpsynth.errors import ConfigError, DpsynthError, InputError, TrainingDiverged
from dpsynth.io.atomic import atomic_dir, atomic_write_json
from dpsynth.io.shards import read_dataset, read_manifest, sha256_file
from dpsynth.plots import plot_loss
from dpsynth.privacy import accounting, bookkeeping
from dpsynth.training.workers import Workers
from dpsynth.privacy.dp_sgd import PoissonGradient, SecretRandomness, check_model, dp_step
from dpsynth.privacy.draws import disable_dropout, record_keys
from dpsynth.privacy.history import planned_history
from dpsynth.privacy.ledger import PrivacyLedger, dataset_key
from dpsynth.privacy.per_example import use_vmap_friendly_attention
from dpsynth.provenance import write_run_info
from dpsynth.stages.common import fingerprint, kept_checkpoint, work_dir_for, write_metrics
from dpsynth.tracking import Tracker
from dpsynth.training.checkpoint import TrainState, load_latest
from dpsynth.training.loop import (Checkpoints, Curve, Divergence, DivergenceCheck, Progress,
                                   TrainingLoop)

log = logging.getLogger(__name__)
SECTIONS = ("seed", "diffusion", "finetune", "privacy")
EVAL_BATCH = 256  # fixed public examples x draws for the monitoring loss
# In the checkpoint fingerprint: checkpoints of an older mechanism (index-keyed
# draws, one secret stream) never resume into this one.
MECHANISM = "keyed-draws-3-streams"
# The progress bar shows steps only: its rate and times follow the realised
# Poisson batch sizes, which are private (PRIVACY.md rule 8).
PROGRESS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps{postfix}"
DIVERGED = "diverged.json"  # in the work folder: where the run diverged, for a resume


@dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    out_dir: Path
    epsilon: float
    noise_multiplier: float
    steps: int
    resumed_from: int


def summary(result: FinetuneResult, cfg: Config) -> str:
    """The CLI's one line about a finished run: the public target, not the accounted
    epsilon, which gives N (PRIVACY.md rule 8)."""
    return (f"(epsilon <= {cfg.finetune.epsilon:g}, delta = {cfg.finetune.delta:g})-DP model "
            f"after {result.steps} steps in {result.out_dir} (accounted values, private: "
            "privacy.json)")


def public_eval(net: torch.nn.Module, loss: DenoisingLoss, x: torch.Tensor, y: torch.Tensor,
                seed: int) -> float:
    """Denoising loss on a fixed public batch with fixed draws: a training curve
    that is post-processing of the DP model and public data, so safe to publish
    (the loss on private batches is not: PRIVACY.md rule 6)."""
    gen = torch.Generator().manual_seed(seed)
    t, noise, labels = loss.draw(x, y, gen)
    with torch.no_grad():
        return float(loss.per_example(net, x, labels, t, noise).mean())


def select_trainable(net: torch.nn.Module, patterns: Sequence[str], lora_rank: int = 0,
                     lora_alpha: float | None = None, seed: int = 0
                     ) -> list[torch.nn.Parameter]:
    """Freeze every parameter whose name matches none of `patterns` (globs); with
    `lora_rank` > 0, put a LoRA adapter on each matched Linear/Conv2d weight
    instead of training it (`dpsynth.diffusion.lora`). Returns the trained
    parameters: DP-SGD computes, clips and noises gradients of these only.

    Raises:
        ConfigError: a pattern matches no parameter (a typo would silently train
            less than asked).
    """
    names = [name for name, _ in net.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(f"finetune.trainable: {pattern!r} matches no parameter of the "
                              f"model; names look like {names[0]!r}, {names[-1]!r}")
    trained = []
    for name, p in net.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
    if lora_rank:
        adapted = add_lora(net, lora_rank, patterns, lora_alpha, seed=seed)
        if not adapted:
            raise ConfigError(f"finetune.lora_rank={lora_rank}: finetune.trainable={list(patterns)} "
                              "matches no Linear/Conv2d weight to adapt; set lora_rank: 0 or "
                              'add a weight pattern (e.g. "*")')
    for p in net.parameters():
        if p.requires_grad:
            trained.append(p)
    log.info("DP-SGD trains %d of %d weights (finetune.trainable=%s)",
             sum(p.numel() for p in trained), sum(p.numel() for p in net.parameters()),
             list(patterns))
    return trained


def _diverged(cfg: Config, step: int, work_dir: Path, last_saved: int | None, run_id: str,
              ledger: PrivacyLedger, is_main: bool) -> TrainingDiverged:
    """The error for a divergence at `step`. Rank 0 notes the steps taken in the
    ledger (the run's entry stays and counts in full) and, when a checkpoint
    exists, leaves `DIVERGED` in the work folder so that a resume accounts for
    the steps it redoes (`_account_redone_steps`)."""
    fc = cfg.finetune
    if is_main:
        ledger.record_progress(run_id, step)
        if last_saved is not None:
            atomic_write_json(work_dir / DIVERGED, {"run_id": run_id, "step": step,
                                                    "checkpoint_step": last_saved})
    kept = kept_checkpoint(work_dir, last_saved, fc.checkpoint_every, "finetune")
    resume = ("" if last_saved is None else
              f"; an unchanged re-run resumes from the checkpoint, and the privacy ledger "
              f"then also counts the {step - last_saved} step(s) it redoes")
    return TrainingDiverged(
        f"DP fine-tuning diverged at step {step}: the parameters after the noisy update are "
        f"not finite. Nothing was published and the diverged state was not saved; {kept}. "
        f"The run's privacy ledger entry stays: its steps were spent. Lower finetune.lr (now "
        f"{fc.lr:g}) or finetune.max_grad_norm (now {fc.max_grad_norm:g}) for a new run"
        f"{resume}")


def _account_redone_steps(ledger: PrivacyLedger, work_dir: Path, run_id: str,
                          resumed_from: int, sigma: float, q: float, cfg: Config) -> None:
    """Record, as one more ledger entry, the steps a resume after a divergence redoes.

    The divergence at step k was released (the error says so), and it is a
    function of steps resumed_from+1..k with their noise. A release run redoes
    those steps with fresh noise, so they are spent twice: the run's own entry
    counts them once, this entry once more (docs/privacy.md, "Releasing a step
    that a resume then redoes"). A test-seeded run redoes them with the same
    noise but is counted the same way (never under-counts). Raises the ledger's
    refusal if that would exceed the dataset's budget; the marker then stays for
    the next attempt.
    """
    marker = work_dir / DIVERGED
    if not marker.is_file():
        return
    info = json.loads(marker.read_text())
    redone = int(info["step"]) - resumed_from
    if info.get("run_id") == run_id and redone > 0:
        fc = cfg.finetune
        redo_id = f"{run_id}-redo-{resumed_from}-{info['step']}"
        ledger.reserve(redo_id, [(sigma, q, redone)], delta=fc.delta, accountant=fc.accountant,
                       target_epsilon=fc.epsilon,
                       budget_epsilon=cfg.privacy.dataset_budget_epsilon,
                       budget_delta=cfg.privacy.dataset_budget_delta)
        ledger.complete(redo_id, redone)
    marker.unlink()


def run(cfg: Config, *, model_dir: Path, private_dir: Path, public_dir: Path, out_dir: Path,
        tracker: Tracker, resume: bool = True, work_dir: Path | None = None,
        stop_after: int | None = None, device: str | torch.device | None = None,
        run_id: str | None = None, sync_work: Callable[[], None] | None = None
        ) -> FinetuneResult:
    """Fine-tune `model_dir` on `private_dir` with DP-SGD; publish into `out_dir`.

    Args:
        cfg: resolved config (sections seed, diffusion, finetune, privacy).
        model_dir: the pre-trained model (`dpsynth pretrain` output).
        private_dir: the private split (`prepare` output).
        public_dir: the public split, for the publishable monitoring loss only.
        out_dir: published atomically at the end.
        resume: continue the same run (same ledger entry, same accounting) from
            the latest checkpoint in `work_dir`.
        stop_after: stop after this many steps without publishing (tests).
        device: where the net, its EMA, the optimizer and the per-example gradients
            live; default the GPU when there is one (under torchrun, the worker's
            LOCAL_RANK GPU). The private split, Poisson sampling, the training draws
            and the Gaussian noise stay on the CPU, from CPU generators, and are
            moved: a CPU run is unchanged and checkpoints resume on any device.
        run_id: the privacy ledger's id for this run, when the caller reserved it
            already (`dpsynth sweep` reserves all its runs at once); it must be an
            id no attempt has trained under, or that of the checkpoint resumed.
            Default: a fresh random id (a checkpoint's own on resume).
        sync_work: called after each checkpoint: the driver's upload of a mirrored
            `s3://` work folder (`dpsynth.io.work.Staged.sync`).

    Raises:
        InputError: bad model or data, delta >= 1/N, batch larger than the data,
            or a run the privacy ledger refuses.
        TrainingDiverged: the parameters became non-finite; the last good
            checkpoint stays in `work_dir`, nothing is published.
    """
    fc = cfg.finetune
    work_dir = Path(work_dir) if work_dir else work_dir_for(out_dir)
    spec, net, model_cfg = load_model(model_dir)
    weights_sha = sha256_file(weights_file(model_dir))  # the file load_model read
    check_model(net)
    images, labels, manifest = read_dataset(private_dir)
    classes = list(model_cfg["classes"])
    relabelled = list(manifest.classes) != classes
    if relabelled and not fc.reinit_class_embedding:
        shown = classes if len(classes) <= 20 else f"{len(classes)} classes"
        raise InputError(f"{private_dir}: classes {list(manifest.classes)} differ from the "
                         f"model's {shown}; pre-train on data with the same label set, or "
                         "set finetune.reinit_class_embedding=true to start the class "
                         "embedding afresh for the private classes")
    if relabelled:  # public settings only: the label set is the data's schema, not data
        spec, net = with_classes(spec, net, len(manifest.classes), seed=cfg.seed)
        classes = list(manifest.classes)
    select_trainable(net, fc.trainable, fc.lora_rank, fc.lora_alpha, cfg.seed)  # before
    # the ledger: a typo in the patterns must cost nothing
    if fc.per_example == "bookkeeping":  # refuse layers it cannot clip, before the ledger too
        bookkeeping.trainable_layers(net)
    expected_shape = (spec.image_size, spec.image_size, spec.channels)
    if tuple(manifest.shape) != expected_shape:
        raise InputError(f"{private_dir}: images are {list(manifest.shape)}, the model expects "
                         f"{list(expected_shape)}; prepare the private split with the "
                         "data.image_size and data.channels the model was pre-trained with")
    if len(images) == 0:  # says N = 0 and nothing else: no private information
        raise InputError(f"{private_dir}: the private split holds no images; pass the "
                         "private split of `dpsynth prepare` (e.g. artifacts/prepare/private)")
    # Read the public split (for the monitoring loss) before the ledger: a bad
    # public input must stop the run before it reserves any privacy budget.
    # The monitoring loss is published, so never on the private split: neither
    # the one `prepare` marked private nor any folder of the private images.
    refuse_private_split("public_dir", public_dir, read_manifest(public_dir),
                         "the monitoring loss is published, so it is computed on public data")
    pub_images, pub_labels, pub_manifest = read_dataset(public_dir)
    private_key = dataset_key(images)  # the privacy ledger's key: the images, as a set
    if dataset_key(pub_images) == private_key:
        raise InputError(f"public_dir={str(public_dir)!r} holds the same images as "
                         f"private_dir={str(private_dir)!r}; the monitoring loss is published, "
                         "so it is computed on public data: pass the public split, "
                         "artifacts/prepare/public")
    if tuple(pub_manifest.shape) != expected_shape or len(pub_images) == 0:
        raise InputError(f"{public_dir}: the public split holds {len(pub_images)} images of "
                         f"shape {list(pub_manifest.shape)}, the model expects "
                         f"{list(expected_shape)}; pass the public split the model was "
                         "pre-trained on (e.g. artifacts/prepare/public)")
    if not relabelled and len(pub_manifest.classes) > spec.num_classes:
        raise InputError(f"{public_dir}: {len(pub_manifest.classes)} classes, the model has "
                         f"{spec.num_classes}; pass the public split the model was "
                         "pre-trained on (e.g. artifacts/prepare/public)")
    n = len(images)  # private: a call-time value, never logged (PRIVACY.md rule 6)
    accounting.check_delta(fc.delta, n)
    # every run on the dataset is composed at the budget's delta: it must be below 1/N too
    accounting.check_delta(cfg.privacy.dataset_budget_delta, n, "privacy.dataset_budget_delta")
    plan = planned_history(fc, n)
    sigma, q, _ = plan[0]
    config_id = fingerprint(cfg.section(*SECTIONS), weights_sha, manifest.content_hash, MECHANISM)

    workers = Workers.from_env()
    state = load_latest(work_dir) if resume else None
    if state is not None and state.meta.get("config_id") != config_id:
        log.warning("ignoring checkpoint in %s: it belongs to another config, model or dataset",
                    work_dir)
        state = None
    # A run id per attempt that starts from scratch; a resume keeps its id, so the
    # ledger counts a resumed run once and two separate runs twice. Rank 0 alone
    # cleans up, talks to the ledger, checkpoints and publishes.
    # random, not derived from config_id: that hashes the private manifest, and run
    # ids appear in ledger refusals (outside the private boundary)
    if state is not None and run_id is not None and state.meta.get("run_id") != run_id:
        log.warning("ignoring checkpoint in %s: it belongs to another run than %s",
                    work_dir, run_id)
        state = None
    run_id = state.meta["run_id"] if state else (run_id or f"run-{secrets.token_hex(8)}")
    ledger = PrivacyLedger(cfg.privacy.ledger_dir, private_key,  # local or s3://
                           legacy_key=manifest.content_hash)
    refusal: InputError | None = None
    workers.agree(True)  # every worker has read the checkpoint before rank 0 cleans up
    if workers.is_main:
        if state is None and work_dir.exists():
            shutil.rmtree(work_dir)
        try:
            ledger.reserve(run_id, plan, delta=fc.delta, accountant=fc.accountant,
                           target_epsilon=fc.epsilon,
                           budget_epsilon=cfg.privacy.dataset_budget_epsilon,
                           budget_delta=cfg.privacy.dataset_budget_delta)
            if state is not None:
                _account_redone_steps(ledger, work_dir, run_id, state.step, sigma, q, cfg)
        except InputError as err:
            refusal = err
    if not workers.agree(refusal is None):
        raise refusal or InputError("the privacy ledger refused this run (see rank 0's error)")

    device = training_device(device)
    torch.manual_seed(cfg.seed)
    net.train().to(device)
    if disable_dropout(net):  # position-keyed masks under vmap (privacy/draws.py)
        log.info("dropout is off during DP fine-tuning: its masks would depend on the "
                 "other examples of the micro-batch")
    if fc.per_example == "vmap":  # fused SDPA has no vmap rule; the hooks need none
        use_vmap_friendly_attention(net)
    ema = EMA(net, fc.ema_decay)  # a copy of the net: on the same device
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=fc.lr)
    diffusion = cfg.diffusion
    # training draws t from the (biased) fine-tuning distribution; monitoring uses
    # the pre-training one so the curve is comparable across runs
    loss = DenoisingLoss.from_config(dataclasses.replace(diffusion, timesteps=fc.timesteps),
                                     spec.null_label)
    eval_loss = DenoisingLoss.from_config(diffusion, spec.null_label)
    # every random choice of the mechanism -- batches, noise, the training draws --
    # comes from the secret randomness (PRIVACY.md rule 7); the draws are keyed by
    # each record's content, never by its index (rule 2, privacy/draws.py)
    rng = SecretRandomness.create(fc.noise_seed)
    seeded_for_test = rng.seeded_for_test
    pub_x = from_uint8(torch.from_numpy(pub_images[:EVAL_BATCH])).to(device)
    pub_y = torch.from_numpy(pub_labels[:EVAL_BATCH]).long().to(device)
    if relabelled:  # the public labels are of the pre-training set: score unconditionally
        pub_y = torch.full_like(pub_y, spec.null_label)
    gradient = PoissonGradient(
        net, loss, from_uint8(torch.from_numpy(images)), torch.from_numpy(labels).long(),
        keys=record_keys(images, labels), sample_rate=q, batches=rng.batches, draws=rng.draws,
        noise=rng.noise, workers=workers,
        dp_step=dp_step(fc, noise_multiplier=sigma, expected_batch_size=q * n))

    def checkpoint(progress: Progress) -> TrainState:
        return loop.state(progress, secret_rng=rng.get_state() if seeded_for_test else None,
                          meta={"config_id": config_id, "run_id": run_id,
                                "history": progress.history, "ema_num_updates": ema.num_updates,
                                "accountant_history": [[sigma, q, progress.step]]})

    def diverged(d: Divergence) -> TrainingDiverged:
        return _diverged(cfg, d.step, work_dir, d.last_saved, run_id, ledger, workers.is_main)

    loop = TrainingLoop(
        net=net, optimizer=opt, gradient=gradient, steps=fc.steps, desc="finetune (DP)",
        ema=ema, bar_format=PROGRESS_FORMAT, is_main=workers.is_main,
        curve=Curve("public_loss", fc.log_every, tracker=tracker, measure=lambda _: public_eval(
            ema.shadow, eval_loss, pub_x, pub_y, cfg.seed)),
        # Release (log) only state that is already checkpointed: a resume redoes
        # un-checkpointed steps with fresh noise, and two noisy versions of a
        # released step would spend more than the ledger records.
        checkpoints=Checkpoints(work_dir, fc.checkpoint_every, checkpoint, before_release=True,
                                saved=lambda step: ledger.record_progress(run_id, step),
                                sync=sync_work),
        # Divergence is detected on the parameters after the noisy step, never on the
        # loss of the private batch: the noisy update is the DP mechanism's output, so
        # testing it is post-processing and spends nothing, while a test of the private
        # loss (data-dependent) would be a release outside the accounting (PRIVACY.md
        # rule 6). The diverged state is never checkpointed, logged or published.
        divergence=DivergenceCheck(diverged, every_step=True))
    progress = Progress()
    if state is not None:
        progress = loop.resume(state)
        if seeded_for_test and state.secret_rng is not None:
            rng.set_state(state.secret_rng)  # release runs never persist it
        log.info("resuming DP fine-tuning from step %d", progress.step)
    start = progress.step

    tracker.log_params(cfg.section(*SECTIONS) | {"finetune.workers": workers.world_size})
    end = fc.steps if stop_after is None else min(fc.steps, stop_after)
    history = loop.run(progress, end).history
    epsilon = accounting.epsilon(plan, fc.delta, fc.accountant)
    if end < fc.steps or not workers.is_main:
        if end == fc.steps:
            workers.agree(True)  # a worker ends once rank 0 has published the model
        return FinetuneResult(out_dir=out_dir,
                              epsilon=epsilon if end == fc.steps else float("nan"),
                              noise_multiplier=sigma, steps=end, resumed_from=start)

    ledger.complete(run_id, fc.steps)
    privacy = {
        "epsilon": epsilon, "delta": fc.delta, "noise_multiplier": sigma, "sample_rate": q,
        "steps": fc.steps, "aug_multiplicity": fc.aug_multiplicity,
        "max_grad_norm": fc.max_grad_norm, "accountant": fc.accountant,
        "sampler": fc.batch_sampler, "seeded_for_test": seeded_for_test,
    }
    if epsilon > fc.epsilon:  # calibration never overshoots (tested); published is "<= target"
        raise DpsynthError("DP fine-tuning: the accounted epsilon exceeds finetune.epsilon "
                           "although sigma was calibrated to it; nothing was published. This "
                           "is a bug: please report it")
    # What leaves the private boundary states the guarantee as the public target
    # (epsilon <= finetune.epsilon, delta): the accounted epsilon, sigma and q are
    # functions of N through the calibration, so they stay in privacy.json
    # (PRIVACY.md rule 8, docs/privacy.md "Publishing epsilon without N"). No
    # wall time either: it follows the realised batch sizes.
    metrics = {"epsilon": fc.epsilon, "delta": fc.delta, "steps": fc.steps,
               "final_public_loss": history[-1][1],
               "dataset_runs": len(ledger.entries()),  # public: how often it was run
               "resumed_from_step": start}
    merge_lora(net), merge_lora(ema.shadow)  # adapters -> plain weights (no-op without)
    with atomic_dir(out_dir) as tmp:
        save_model(tmp, spec, net, ema.shadow, extra={
            "classes": classes, "dp": {"epsilon": fc.epsilon, "delta": fc.delta},
            "finetuned_from": weights_sha})
        atomic_write_json(tmp / "privacy.json", privacy)
        with open(tmp / "loss.csv", "w", newline="") as f:
            csv.writer(f).writerows([["step", "public_loss"], *history])
        plot_loss(history, tmp / "loss.png", "DP fine-tuning: loss on public data")
        write_run_info(tmp, "finetune", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_params({"privacy.seeded_for_test": seeded_for_test})
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    # privacy.json stays in the artifact folder: its sample_rate is q = B/N, derived
    # from the private split's size, which never goes to MLflow (PRIVACY.md rule 6)
    tracker.log_artifact(out_dir / "loss.png")
    shutil.rmtree(work_dir, ignore_errors=True)
    log.info("DP fine-tuning done: (epsilon <= %g, delta = %g)-DP (%s accountant), %d steps",
             fc.epsilon, fc.delta, fc.accountant, fc.steps)
    workers.agree(True)  # published: the other workers may end
    return FinetuneResult(out_dir=out_dir, epsilon=epsilon, noise_multiplier=sigma, steps=fc.steps,
                          resumed_from=start)
