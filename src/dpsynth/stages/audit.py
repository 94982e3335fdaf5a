"""`dpsynth audit`: check the DP guarantee empirically and look for memorization.

1. Membership audit in one training run (Steinke, Nasr & Jagielski 2023): a
   twin of the fine-tuning run -- same pre-trained start, same DP-SGD code
   (`noisy_gradient`), same (epsilon, delta) target, C, K and timestep
   distribution -- trains on noise canaries, each included with probability
   1/2. Each canary is scored by the twin's denoising loss on a fixed (t, noise)
   grid; the guesses give an epsilon lower bound at the configured confidence
   and TPR at low FPR. The verdict is "failed" when the bound exceeds the twin's
   accounted epsilon, "inconclusive" when the canaries cannot certify the claim
   even with a perfect attack (256 at 95% and delta = 1e-5 certify at most
   about 3.3-4, far below the default claim 10), "passed" only otherwise. A
   check twin, the same run with sigma calibrated to `audit.check_epsilon` (an
   epsilon the audit can refute), is what gives a broken mechanism a chance to
   fail at such claims; a non-private control (no clipping, no noise) shows that
   the audit could see membership if it leaked. The twins read public data
   only, so the audit spends none of the private dataset's budget (nothing goes
   to the ledger).
2. Memorization: the generated samples against the private split (ratio test,
   nearest-neighbour distances against a held-out split). Computed on private
   data: only aggregates leave the stage, labelled as not covered by (ε, δ).

What leaves the stage states the claim as the public target `finetune.epsilon`:
the model's accounted epsilon (privacy.json) is a function of the private
split's size through the calibration (PRIVACY.md rule 8). The twins' own
accounted epsilons depend on the public canaries only and are published.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dpsynth.audit import canaries
from dpsynth.audit.memorization import memorization
from dpsynth.audit.one_run import (audit_bound, auc, max_certifiable_epsilon, roc_curve,
                                   tpr_at_fpr)
from dpsynth.config import Config
from dpsynth.devices import default_device
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.samplers import from_uint8
from dpsynth.diffusion.unet import load_model, read_privacy
from dpsynth.errors import InputError
from dpsynth.eval.classifier import read_labelled
from dpsynth.io.atomic import atomic_dir
from dpsynth.plots import plot_audit_roc
from dpsynth.privacy import accounting
from dpsynth.privacy.dp_sgd import check_model, dp_step
from dpsynth.privacy.per_example import use_vmap_friendly_attention
from dpsynth.provenance import write_run_info
from dpsynth.stages.common import write_metrics
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


AuditStatus = Literal["passed", "failed", "inconclusive"]


@dataclass(frozen=True, kw_only=True)
class AuditResult:
    out_dir: Path
    claimed_epsilon: float  # the public target finetune.epsilon (PRIVACY.md rule 8)
    audit_epsilon: float  # the twin's accounted epsilon (calibrated to the same target)
    dp: MembershipAudit
    check: MembershipAudit  # the twin at audit.check_epsilon
    control: MembershipAudit | None
    status: AuditStatus  # the verdict on the claim (the DP twin)
    check_status: AuditStatus  # the verdict on the check twin
    metrics: dict[str, Any]


def summary(result: AuditResult, cfg: Config) -> str:
    """The CLI's one line about a finished run. The claim is the public target (the
    model's accounted epsilon gives N); the twins' own accounted epsilons follow the
    public canaries only."""
    control = (f"; non-private control {result.control.epsilon_lower_bound:.2f}"
               if result.control else "")
    return (f"{result.status} at the claim epsilon = {result.claimed_epsilon:g} (the DP "
            f"twin's lower bound {result.dp.epsilon_lower_bound:.2f} at "
            f"{cfg.audit.confidence:.0%} confidence vs its accounted "
            f"{result.audit_epsilon:.2f}; these canaries certify at most "
            f"{result.metrics['audit_max_certifiable_epsilon']:.2f}); check twin "
            f"{result.check_status} ({result.check.epsilon_lower_bound:.2f} vs its accounted "
            f"{result.metrics['check_epsilon']:.2f}){control}; memorized fraction "
            f"{result.metrics['memorized_fraction']:.4f} (metrics in "
            f"{result.out_dir / 'metrics.json'})")


def _score(scores: np.ndarray, included: np.ndarray, cfg: Config, delta: float
           ) -> MembershipAudit:
    ac = cfg.audit
    bound = audit_bound(scores, included, guess_fractions=ac.guess_fractions, delta=delta,
                        confidence=ac.confidence)
    return MembershipAudit(bound.epsilon_lower_bound, bound.guesses, bound.correct,
                           auc(scores, included), tpr_at_fpr(scores, included, 0.01),
                           tpr_at_fpr(scores, included, 0.05), roc_curve(scores, included))


def audit_status(bound: float, *, accounted: float, claim: float, max_certifiable: float,
                 what: str, setting: str) -> tuple[AuditStatus, str]:
    """The verdict on one twin and the sentence that says why.

    "failed" when the attack proves more than the twin's accounted ε (the
    mechanism is not what the accountant assumes); "inconclusive" when the
    largest ε this audit can certify (`max_certifiable_epsilon`) does not exceed
    the claim: whatever the attack, the audit could not have refuted it, so not
    failing says nothing; "passed" only otherwise.

    Args:
        bound: the attack's ε lower bound for the twin.
        accounted: the twin's accounted ε (its σ calibrated to `claim`).
        claim: the target the twin stands for (`finetune.epsilon`, or
            `audit.check_epsilon` for the check twin).
        max_certifiable: the largest bound the audit can give with its canaries.
        what: the twin, in words ("the DP twin").
        setting: the audit's settings, in words ("256 canaries at 95% confidence
            and delta = 1e-05").

    >>> audit_status(0.0, accounted=9.98, claim=10.0, max_certifiable=3.34,
    ...              what="the DP twin", setting="256 canaries")[0]
    'inconclusive'
    >>> audit_status(0.2, accounted=0.99, claim=1.0, max_certifiable=3.34,
    ...              what="the check twin", setting="256 canaries")[0]
    'passed'
    >>> audit_status(2.5, accounted=0.99, claim=1.0, max_certifiable=3.34,
    ...              what="the check twin", setting="256 canaries")[0]
    'failed'
    """
    if bound > accounted:
        return "failed", (f"the attack proved epsilon >= {bound:.2f} for {what}, accounted at "
                          f"epsilon = {accounted:.2f}: the DP implementation may be broken")
    if max_certifiable <= claim:
        return "inconclusive", (f"inconclusive at epsilon = {claim:g}: {setting} certify at "
                                f"most epsilon = {max_certifiable:.2f} (a perfect attack), so "
                                f"no attack could refute this claim ({what}: "
                                f"epsilon >= {bound:.2f})")
    return "passed", (f"the attack proved epsilon >= {bound:.2f} for {what}, within its "
                      f"accounted epsilon = {accounted:.2f}; {setting} could have proved up "
                      f"to {max_certifiable:.2f}")


def audit_setting(cfg: Config) -> str:
    """The settings that cap what the audit can certify, in words."""
    return (f"{cfg.audit.num_canaries} canaries at {cfg.audit.confidence:.0%} confidence and "
            f"delta = {cfg.finetune.delta:g}")


@dataclass(frozen=True)
class Twins:
    """The twins' audits: at the claimed target, at `audit.check_epsilon`, and the
    non-private control; each DP twin with its own accounted ε."""

    audit_epsilon: float
    dp: MembershipAudit
    check_epsilon: float
    check: MembershipAudit
    control: MembershipAudit | None
    max_certifiable_epsilon: float  # the most this draw of canaries can certify


def membership_audit(cfg: Config, model_dir: Path, device: str | torch.device | None = None
                     ) -> Twins:
    """Train the DP twins (and the control) on canaries from `model_dir`; score them.

    Two DP twins run the released code path (`canaries.train(private=True)`): one
    with σ calibrated to the fine-tuning's target `finetune.epsilon` (the claim),
    one with σ calibrated to `audit.check_epsilon`, small enough that the audit
    can refute it: at the default claim (ε = 10) no one-run audit with a few
    hundred canaries can, so the check twin is what gives a broken mechanism a
    chance to fail. The twins run on `device` (default the GPU when there is
    one); the canaries, their draws and the twins' noise stay on the CPU, as in
    `dpsynth finetune`.

    Args:
        cfg: resolved config (sections seed, diffusion, finetune, audit).
        model_dir: the pre-trained model every twin starts from.
        device: where the twins train.

    Returns:
        The three audits, the DP twins' accounted ε, and the largest ε this draw
        of canaries can certify (known before training: a warning says so at once
        when `audit.check_epsilon` is not below it).
    """
    fc, ac = cfg.finetune, cfg.audit
    device = torch.device(device) if device is not None else default_device()
    spec, _, _ = load_model(model_dir)
    rng = np.random.default_rng([cfg.seed, 0xA0D17])  # public randomness: seeded for DVC
    images, labels = canaries.make_canaries(ac.num_canaries,
                                            (spec.image_size, spec.image_size, spec.channels),
                                            spec.num_classes, rng)
    included = canaries.include_half(ac.num_canaries, rng)
    # known before any training: the canaries and their draw are public
    max_cert = max_certifiable_epsilon(included, guess_fractions=ac.guess_fractions,
                                       delta=fc.delta, confidence=ac.confidence)
    if ac.check_epsilon >= max_cert:
        log.warning("audit.check_epsilon=%g is not below the %.2f that %s can certify: the "
                    "check twin will be inconclusive too; lower audit.check_epsilon or raise "
                    "audit.num_canaries", ac.check_epsilon, max_cert, audit_setting(cfg))
    x_all, y_all = from_uint8(torch.from_numpy(images)), torch.from_numpy(labels).long()
    x_in, y_in = x_all[torch.from_numpy(included)], y_all[torch.from_numpy(included)]
    q = ac.batch_size / len(x_in)  # public: the canaries are public
    loss = DenoisingLoss.from_config(dataclasses.replace(cfg.diffusion, timesteps=fc.timesteps),
                                     spec.null_label)

    def audit_one(target_epsilon: float | None, name: str) -> tuple[float, MembershipAudit]:
        """(accounted ε, audit) of one twin; `target_epsilon=None`: the control."""
        sigma, epsilon = 0.0, math.inf
        if target_epsilon is not None:
            sigma = accounting.calibrate_noise_multiplier(
                target_epsilon=target_epsilon, delta=fc.delta, sample_rate=q, steps=ac.steps,
                accountant=fc.accountant)
            epsilon = accounting.epsilon([(sigma, q, ac.steps)], fc.delta, fc.accountant)
        step = dp_step(fc, noise_multiplier=sigma, expected_batch_size=q * len(x_in))
        _, net, _ = load_model(model_dir)
        check_model(net)
        net.to(device)
        if fc.per_example == "vmap":  # fused SDPA has no vmap rule; the hooks need none
            use_vmap_friendly_attention(net)
        torch.manual_seed(cfg.seed)
        canaries.train(net, loss, x_in, y_in, step=step, sample_rate=q, steps=ac.steps,
                       lr=ac.lr, private=target_epsilon is not None,
                       train_generator=torch.Generator().manual_seed(cfg.seed + 11),
                       noise_generator=torch.Generator().manual_seed(cfg.seed + 12),
                       desc=f"audit: {name}")
        losses = canaries.denoising_losses(net, loss, x_all, y_all, draws=ac.score_draws,
                                           seed=cfg.seed + 13, t_range=ac.score_t_range)
        return epsilon, _score(-losses.numpy(), included, cfg, fc.delta)  # lower loss: "in"

    audit_epsilon, dp = audit_one(fc.epsilon, "DP twin")
    check_epsilon, check = audit_one(ac.check_epsilon, "check twin")
    control = audit_one(None, "non-private control")[1] if ac.control else None
    return Twins(audit_epsilon, dp, check_epsilon, check, control, max_cert)


def run(cfg: Config, *, model_dir: Path, dp_model_dir: Path, synthetic_dir: Path,
        private_dir: Path, test_dir: Path, out_dir: Path, tracker: Tracker,
        device: str | torch.device | None = None) -> AuditResult:
    """Audit the fine-tuning mechanism and the generator; publish into `out_dir`.

    Args:
        cfg: resolved config (sections seed, diffusion, finetune, audit).
        model_dir: the pre-trained model the fine-tuning started from (the twin's start).
        dp_model_dir: the DP model (`finetune` output): its `privacy.json`
            mechanism settings must match `cfg.finetune`, and its accounted ε must
            not exceed `finetune.epsilon`, the claim the audit publishes.
        synthetic_dir: its samples (`sample` output), checked for memorization.
        private_dir: the private split (memorization only; aggregates leave).
        test_dir: real data not trained on (the test split), the baseline.
        out_dir: gets metrics.json, roc_dp.csv, roc_check.csv, roc_control.csv,
            roc.png, params.json, version.json -- published atomically.
        device: where the twins train; default the GPU when there is one.

    Raises:
        InputError: no `privacy.json` in `dp_model_dir`, a mechanism that differs
            from the config's, a model fine-tuned past `finetune.epsilon` (the
            message does not state its ε), or mismatched splits. Nothing is
            written then.
    """
    ac = cfg.audit
    privacy = read_privacy(dp_model_dir)
    if privacy is None:
        raise InputError(f"{dp_model_dir}: no privacy.json, so no DP claim to audit; pass the "
                         "folder `dpsynth finetune` wrote (--dp-model artifacts/finetune)")
    differs = [f"{k}: model {privacy[k]!r} vs finetune.{k}={getattr(cfg.finetune, k)!r}"
               for k in _MECHANISM if privacy.get(k) != getattr(cfg.finetune, k)]
    if differs:
        raise InputError(f"{dp_model_dir} was fine-tuned with other DP settings than the "
                         f"config's ({'; '.join(differs)}); audit with the config that made it")
    if float(privacy["epsilon"]) > cfg.finetune.epsilon:  # the value itself is not shown
        raise InputError(f"{dp_model_dir} was fine-tuned to a larger epsilon than "
                         f"finetune.epsilon={cfg.finetune.epsilon:g}; audit with the config "
                         "that made it")
    syn_x, _, manifest = read_labelled(synthetic_dir, "synthetic set")
    like = (manifest, f"synthetic set {synthetic_dir}")
    private_x, _, _ = read_labelled(private_dir, "private split", like=like)
    heldout_x, _, _ = read_labelled(test_dir, "held-out split", like=like)
    if len(private_x) < 2 or len(heldout_x) < 2:
        raise InputError(f"{private_dir} / {test_dir}: the memorization test needs at least "
                         "two images in each")
    tracker.log_params(cfg.section(*SECTIONS))

    t0 = time.perf_counter()
    twins = membership_audit(cfg, Path(model_dir), device)
    # the twins' time only: the memorization test's follows the private split's size
    twin_seconds = round(time.perf_counter() - t0, 2)
    dp, check, control = twins.dp, twins.check, twins.control
    pick = np.random.default_rng(cfg.seed).permutation(len(syn_x))[:ac.memorization_samples]
    mem = memorization(syn_x[pick], private_x, heldout_x, ratio=ac.memorization_ratio,
                       seed=cfg.seed)
    max_cert, setting = twins.max_certifiable_epsilon, audit_setting(cfg)
    status, reason = audit_status(dp.epsilon_lower_bound, accounted=twins.audit_epsilon,
                                  claim=cfg.finetune.epsilon, max_certifiable=max_cert,
                                  what="the DP twin", setting=setting)
    check_status, check_reason = audit_status(check.epsilon_lower_bound,
                                              accounted=twins.check_epsilon,
                                              claim=ac.check_epsilon, max_certifiable=max_cert,
                                              what="the check twin", setting=setting)
    # the claim is the public target: the model's accounted epsilon is a function of
    # N through the calibration, so it stays in privacy.json (PRIVACY.md rule 8)
    claimed = cfg.finetune.epsilon
    metrics: dict[str, Any] = {
        "claimed_epsilon": claimed, "delta": privacy["delta"],
        "audit_epsilon": twins.audit_epsilon, "num_canaries": ac.num_canaries,
        "confidence": ac.confidence, "audit_max_certifiable_epsilon": max_cert,
        **dp.metrics("membership"), "audit_status": status, "audit_status_reason": reason,
        "audit_passed": status == "passed",
        "check_epsilon": twins.check_epsilon, **check.metrics("check"),
        "check_status": check_status, "check_status_reason": check_reason}
    if control is not None:
        metrics |= control.metrics("control") | {
            "audit_has_power": control.epsilon_lower_bound >= POWER_EPSILON}
    metrics |= mem.metrics() | {"memorization_note": MEMORIZATION_NOTE,
                                "audit_seconds": twin_seconds}
    for name, verdict, why in (("DP twin", status, reason), ("check twin", check_status,
                                                              check_reason)):
        if verdict == "failed":
            log.error("audit %s FAILED: %s; do not release this model before finding out why",
                      name, why)
        elif verdict == "inconclusive":  # not an error: the audit cannot test this claim
            log.warning("audit %s: %s", name, why)
    if control is not None and not metrics["audit_has_power"]:
        log.warning("the non-private control's bound %.3f is below %.1f: the audit has little "
                    "power with these settings (raise audit.steps, audit.lr or "
                    "audit.num_canaries)", control.epsilon_lower_bound, POWER_EPSILON)

    curves = [("dp", f"DP twin, ε = {twins.audit_epsilon:.2f}", dp),
              ("check", f"check twin, ε = {twins.check_epsilon:.2f}", check)]
    curves += [("control", "non-private control", control)] if control else []
    with atomic_dir(out_dir) as tmp:
        for slug, _, audit in curves:
            with open(tmp / f"roc_{slug}.csv", "w", newline="") as f:
                csv.writer(f).writerows([["fpr", "tpr"], *zip(*audit.roc)])
        plot_audit_roc([(f"{name} (ε lower bound {a.epsilon_lower_bound:.2f})", *a.roc)
                        for _, name, a in curves], tmp / "roc.png",
                       f"Canary membership audit ({ac.num_canaries} canaries: certifies at "
                       f"most ε = {max_cert:.2f})")
        write_run_info(tmp, "audit", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float))})
    tracker.log_params({"memorization_note": MEMORIZATION_NOTE, "audit_status": status,
                        "check_status": check_status})
    tracker.log_artifact(out_dir / "roc.png")
    log.info("audit: %s (bound %.3f at accounted %.3f); check twin %s (bound %.3f at %.3f)%s; "
             "memorized fraction %.4f", status, dp.epsilon_lower_bound, twins.audit_epsilon,
             check_status, check.epsilon_lower_bound, twins.check_epsilon,
             f", control {control.epsilon_lower_bound:.3f}" if control else "",
             mem.memorized_fraction)
    return AuditResult(out_dir=Path(out_dir), claimed_epsilon=claimed,
                       audit_epsilon=twins.audit_epsilon, dp=dp, check=check, control=control,
                       status=status, check_status=check_status, metrics=metrics)
