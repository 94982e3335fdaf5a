"""`dpsynth audit`: check the DP guarantee empirically and look for memorization.

1. Membership audit in one training run (Steinke, Nasr & Jagielski 2023): a
   twin of the fine-tuning run -- same pre-trained start, same DP-SGD code
   (`noisy_gradient`), same (epsilon, delta) target, C, K and timestep
   distribution -- trains on noise canaries, each included with probability
   1/2. Each canary is scored by the twin's denoising loss on a fixed (t, noise)
   grid; the guesses give an epsilon lower bound at the configured confidence
   and TPR at low FPR. The bound must stay below the claimed epsilon. A
   non-private control (no clipping, no noise) shows that the audit could see
   membership if it leaked. The twin reads public data only, so the audit
   spends none of the private dataset's budget (nothing goes to the ledger).
2. Memorization: the generated samples against the private split (ratio test,
   nearest-neighbour distances against a held-out split). Computed on private
   data: only aggregates leave the stage, labelled as not covered by (ε, δ).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dpsynth.audit import canaries
from dpsynth.audit.memorization import memorization
from dpsynth.audit.one_run import audit_bound, auc, roc_curve, tpr_at_fpr
from dpsynth.config import Config
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.samplers import from_uint8
from dpsynth.diffusion.unet import load_model
from dpsynth.errors import InputError
from dpsynth.eval.classifier import default_device, read_labelled
from dpsynth.io.atomic import atomic_dir
from dpsynth.plots import plot_audit_roc
from dpsynth.privacy import accounting
from dpsynth.privacy.dp_sgd import DPStep
from dpsynth.privacy.per_example import use_vmap_friendly_attention
from dpsynth.provenance import write_run_info
from dpsynth.stages.common import write_metrics
from dpsynth.stages.finetune import check_model, read_privacy
from dpsynth.tracking import Tracker

log = logging.getLogger(__name__)
SECTIONS = ("seed", "diffusion", "finetune", "audit")
# The control must reject at least this epsilon for the audit to count as having
# power: a non-private model that the audit cannot tell from a 1-DP one would
# make any bound for the DP twin meaningless.
POWER_EPSILON = 1.0
MEMORIZATION_NOTE = ("memorized_fraction, heldout_memorized_fraction, nn_distance_*, "
                     "closer_to_private_fraction: aggregates computed on the private split, "
                     "NOT covered by (epsilon, delta); no image, distance or index is released")
# the mechanism settings a model's privacy.json and the config's finetune section share
_MECHANISM = ("delta", "max_grad_norm", "aug_multiplicity", "accountant")


@dataclass(frozen=True)
class MembershipAudit:
    """One model's audit: the bound and the attack's ROC summary."""

    epsilon_lower_bound: float
    guesses: int
    correct: int
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_5pct_fpr: float
    roc: tuple[list[float], list[float]]

    def metrics(self, prefix: str) -> dict[str, float | int]:
        return {f"{prefix}_{k}": getattr(self, k) for k in
                ("epsilon_lower_bound", "guesses", "correct", "auc", "tpr_at_1pct_fpr",
                 "tpr_at_5pct_fpr")}


@dataclass(frozen=True)
class AuditResult:
    out_dir: Path
    claimed_epsilon: float
    audit_epsilon: float  # the twin's accounted epsilon (calibrated to the same target)
    dp: MembershipAudit
    control: MembershipAudit | None
    metrics: dict[str, Any]


def _score(scores: np.ndarray, included: np.ndarray, cfg: Config, delta: float
           ) -> MembershipAudit:
    ac = cfg.audit
    bound = audit_bound(scores, included, guess_fractions=ac.guess_fractions, delta=delta,
                        confidence=ac.confidence)
    return MembershipAudit(bound.epsilon_lower_bound, bound.guesses, bound.correct,
                           auc(scores, included), tpr_at_fpr(scores, included, 0.01),
                           tpr_at_fpr(scores, included, 0.05), roc_curve(scores, included))


def membership_audit(cfg: Config, model_dir: Path, device: str | torch.device | None = None
                     ) -> tuple[float, MembershipAudit, MembershipAudit | None]:
    """Train the DP twin (and the control) on canaries from `model_dir`; score them.

    The twins run on `device` (default the GPU when there is one); the canaries,
    their draws and the twin's noise stay on the CPU, as in `dpsynth finetune`.

    Returns:
        (the twin's accounted epsilon, its audit, the control's audit or None).
    """
    fc, ac = cfg.finetune, cfg.audit
    device = torch.device(device) if device is not None else default_device()
    spec, _, _ = load_model(model_dir)
    rng = np.random.default_rng([cfg.seed, 0xA0D17])  # public randomness: seeded for DVC
    images, labels = canaries.make_canaries(ac.num_canaries,
                                            (spec.image_size, spec.image_size, spec.channels),
                                            spec.num_classes, rng)
    included = canaries.include_half(ac.num_canaries, rng)
    x_all, y_all = from_uint8(torch.from_numpy(images)), torch.from_numpy(labels).long()
    x_in, y_in = x_all[torch.from_numpy(included)], y_all[torch.from_numpy(included)]
    q = ac.batch_size / len(x_in)
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=fc.epsilon, delta=fc.delta, sample_rate=q, steps=ac.steps,
        accountant=fc.accountant)
    audit_epsilon = accounting.epsilon([(sigma, q, ac.steps)], fc.delta, fc.accountant)
    loss = DenoisingLoss.from_config(dataclasses.replace(cfg.diffusion, timesteps=fc.timesteps),
                                     spec.null_label)
    step = DPStep(noise_multiplier=sigma, max_grad_norm=fc.max_grad_norm,
                  expected_batch_size=q * len(x_in), physical_batch_size=fc.physical_batch_size,
                  aug_multiplicity=fc.aug_multiplicity, augment=fc.augment)

    def audit_one(private: bool) -> MembershipAudit:
        _, net, _ = load_model(model_dir)
        check_model(net)
        net.to(device)
        use_vmap_friendly_attention(net)
        torch.manual_seed(cfg.seed)
        name = "DP twin" if private else "non-private control"
        with tqdm(total=ac.steps, desc=f"audit: {name}", disable=None) as bar:
            canaries.train(net, loss, x_in, y_in, step=step, sample_rate=q, steps=ac.steps,
                           lr=ac.lr, private=private,
                           train_generator=torch.Generator().manual_seed(cfg.seed + 11),
                           noise_generator=torch.Generator().manual_seed(cfg.seed + 12),
                           on_step=lambda _: bar.update())
        losses = canaries.denoising_losses(net, loss, x_all, y_all, draws=ac.score_draws,
                                           seed=cfg.seed + 13, t_range=ac.score_t_range)
        return _score(-losses.numpy(), included, cfg, fc.delta)  # lower loss: "in"

    return audit_epsilon, audit_one(True), audit_one(False) if ac.control else None


def run(cfg: Config, *, model_dir: Path, generator_dir: Path, synthetic_dir: Path,
        private_dir: Path, heldout_dir: Path, out_dir: Path, tracker: Tracker,
        device: str | torch.device | None = None) -> AuditResult:
    """Audit the fine-tuning mechanism and the generator; publish into `out_dir`.

    Args:
        cfg: resolved config (sections seed, diffusion, finetune, audit).
        model_dir: the pre-trained model the fine-tuning started from (the twin's start).
        generator_dir: the DP model (`finetune` output): its `privacy.json` is the
            claim, and its mechanism settings must match `cfg.finetune`.
        synthetic_dir: its samples (`sample` output), checked for memorization.
        private_dir: the private split (memorization only; aggregates leave).
        heldout_dir: real data not trained on (the test split), the baseline.
        out_dir: gets metrics.json, roc_dp.csv, roc_control.csv, roc.png,
            params.json, version.json -- published atomically.
        device: where the twins train; default the GPU when there is one.

    Raises:
        InputError: no `privacy.json` in `generator_dir`, a mechanism that differs
            from the config's, or mismatched splits. Nothing is written then.
    """
    ac = cfg.audit
    privacy = read_privacy(generator_dir)
    if privacy is None:
        raise InputError(f"{generator_dir}: no privacy.json, so no DP claim to audit; pass the "
                         "folder `dpsynth finetune` wrote (--generator artifacts/finetune)")
    differs = [f"{k}: model {privacy[k]!r} vs finetune.{k}={getattr(cfg.finetune, k)!r}"
               for k in _MECHANISM if privacy.get(k) != getattr(cfg.finetune, k)]
    if differs:
        raise InputError(f"{generator_dir} was fine-tuned with other DP settings than the "
                         f"config's ({'; '.join(differs)}); audit with the config that made it")
    syn_x, _, manifest = read_labelled(synthetic_dir, "synthetic set")
    like = (manifest, f"synthetic set {synthetic_dir}")
    private_x, _, _ = read_labelled(private_dir, "private split", like=like)
    heldout_x, _, _ = read_labelled(heldout_dir, "held-out split", like=like)
    if len(private_x) < 2 or len(heldout_x) < 2:
        raise InputError(f"{private_dir} / {heldout_dir}: the memorization test needs at least "
                         "two images in each")
    tracker.log_params(cfg.section(*SECTIONS))

    t0 = time.perf_counter()
    audit_epsilon, dp, control = membership_audit(cfg, Path(model_dir), device)
    pick = np.random.default_rng(cfg.seed).permutation(len(syn_x))[:ac.memorization_samples]
    mem = memorization(syn_x[pick], private_x, heldout_x, ratio=ac.memorization_ratio,
                       seed=cfg.seed)
    passed = dp.epsilon_lower_bound <= audit_epsilon
    metrics: dict[str, Any] = {
        "claimed_epsilon": privacy["epsilon"], "delta": privacy["delta"],
        "audit_epsilon": audit_epsilon, "num_canaries": ac.num_canaries,
        "confidence": ac.confidence, **dp.metrics("membership"), "audit_passed": passed}
    if control is not None:
        metrics |= control.metrics("control") | {
            "audit_has_power": control.epsilon_lower_bound >= POWER_EPSILON}
    metrics |= mem.metrics() | {"memorization_note": MEMORIZATION_NOTE,
                                "audit_seconds": round(time.perf_counter() - t0, 2)}
    if not passed:
        log.error("the audit's epsilon lower bound %.3f exceeds the twin's accounted epsilon "
                  "%.3f at %.0f%% confidence: the DP implementation may be broken; do not "
                  "release this model before finding out why", dp.epsilon_lower_bound,
                  audit_epsilon, 100 * ac.confidence)
    if control is not None and not metrics["audit_has_power"]:
        log.warning("the non-private control's bound %.3f is below %.1f: the audit has little "
                    "power with these settings (raise audit.steps, audit.lr or "
                    "audit.num_canaries)", control.epsilon_lower_bound, POWER_EPSILON)

    curves = [("DP twin", dp)] + ([("non-private control", control)] if control else [])
    with atomic_dir(out_dir) as tmp:
        for name, audit in curves:
            slug = "dp" if audit is dp else "control"
            with open(tmp / f"roc_{slug}.csv", "w", newline="") as f:
                csv.writer(f).writerows([["fpr", "tpr"], *zip(*audit.roc)])
        plot_audit_roc([(f"{name} (ε lower bound {a.epsilon_lower_bound:.2f})", *a.roc)
                        for name, a in curves], tmp / "roc.png",
                       f"Canary membership audit, claimed ε = {audit_epsilon:.2f}")
        write_run_info(tmp, "audit", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float))})
    tracker.log_params({"memorization_note": MEMORIZATION_NOTE})
    tracker.log_artifact(out_dir / "roc.png")
    log.info("audit: epsilon lower bound %.3f (claimed %.3f)%s; memorized fraction %.4f",
             dp.epsilon_lower_bound, audit_epsilon,
             f", control {control.epsilon_lower_bound:.3f}" if control else "",
             mem.memorized_fraction)
    return AuditResult(Path(out_dir), privacy["epsilon"], audit_epsilon, dp, control, metrics)
