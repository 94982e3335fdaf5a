"""The privacy statement of the report, in plain words plus the numbers, made
from the DP model's `privacy.json` and the privacy ledger.

What it never states: the private split's size N, and the two mechanism values
that give it away, the sample rate q = B/N and (with the published ε, δ, steps
and accountant, which determine q through the accountant) the noise multiplier
σ (PRIVACY.md rule 6). They are shown only with `report.disclose_private_size`.

>>> delta_text(1e-5), epsilon_text(9.99463757221694), odds_factor_text(1.0)
('1e-5', '9.99', '2.72')
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from dpsynth.choices import ACCOUNTANTS

def epsilon_text(epsilon: float) -> str:
    """ε as the report prints it (two decimals; the same everywhere on the page)."""
    return f"{epsilon:.2f}"


def delta_text(delta: float) -> str:
    """δ without exponent padding: 1e-05 -> 1e-5."""
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m[1].replace('+', '')}{m[2]}", f"{delta:g}")


def odds_factor_text(epsilon: float) -> str:
    """e^ε to three significant digits, with thousands separators."""
    x = math.exp(epsilon)
    if x < 10:
        return f"{x:.2f}"
    digits = 2 - int(math.floor(math.log10(x)))
    return f"{round(x, digits):,.{max(digits, 0)}f}"


@dataclass(frozen=True)
class Budget:
    """What the privacy ledger says about the private dataset, in public terms.

    The composed ε is not here: it is a function of the private split's size N
    through the calibration (PRIVACY.md rule 8), so it stays in the ledger.

    Attributes:
        runs: how many runs the ledger records on the dataset (crashed and
            reserved ones included: they count in full).
        budget_epsilon: the dataset's budget ε (`privacy.dataset_budget_epsilon`).
        budget_delta: the budget's δ (`privacy.dataset_budget_delta`), at which
            every run is composed.
        within: whether all runs composed stay within the budget; False only when
            the budget was lowered after runs were admitted.
        read_now: the ledger was read for this report; False when `runs` is the
            count a stage recorded when it finished (`recorded_by`).
        recorded_by: which stage recorded `runs` when the ledger was not read: the
            fine-tuning, or the sweep (its extra DP runs came after).
    """

    runs: int
    budget_epsilon: float
    budget_delta: float
    within: bool
    read_now: bool
    recorded_by: str = "finetune"


@dataclass(frozen=True)
class Row:
    """One line of the numbers table."""

    name: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Statement:
    """The privacy section: plain words first, then the numbers."""

    headline: str
    paragraphs: tuple[str, ...]
    protected: tuple[str, ...]
    not_protected: tuple[str, ...]
    numbers: tuple[Row, ...]
    warning: str | None  # set when the DP noise was seeded (a test run)


def privacy_statement(privacy: Mapping[str, Any], *, expected_batch_size: int | None,
                      target_epsilon: float, budget: Budget | None, dataset: str,
                      disclose_private_size: bool, nonprivate_baseline: bool,
                      memorization: bool) -> Statement:
    """The statement for the DP model described by `privacy` (its `privacy.json`).

    Args:
        privacy: `{"epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
            "aug_multiplicity", "max_grad_norm", "accountant", "sampler",
            "seeded_for_test"}`.
        expected_batch_size: B, the fine-tuning's `finetune.batch_size` (public).
        target_epsilon: `finetune.epsilon`, the target σ was calibrated to: the
            guarantee stated. The accounted ε (at most the target) is a function
            of N through the calibration, so it is stated only with
            `disclose_private_size` (PRIVACY.md rule 8).
        budget: the ledger's account of the dataset, if known.
        dataset: how to name the private dataset (its source kind).
        disclose_private_size: also print σ and q (they give N).
        nonprivate_baseline: the report shows the non-private baseline accuracy.
        memorization: the report shows the audit's memorization aggregates.
    """
    # the public target: the run is (target, δ)-DP since its accounted ε is at most it
    eps, delta = float(target_epsilon), float(privacy["delta"])
    eps_s, delta_s = epsilon_text(eps), delta_text(delta)
    headline = (f"The synthetic data carries an (ε = {eps_s}, δ = {delta_s}) "
                "differential-privacy guarantee for every image of the private dataset.")
    paragraphs = (
        f"A diffusion model was first trained on public data, then fine-tuned on the private "
        f"dataset ({dataset}) with differentially private stochastic gradient descent "
        f"(DP-SGD). That fine-tuning is (ε = {eps_s}, δ = {delta_s})-differentially private "
        "with respect to each image of the private dataset. Everything released afterwards "
        "— the model, the synthetic images and every number computed from the synthetic "
        "images alone — is post-processing of the fine-tuning and carries the same "
        "guarantee.",
        "In plain words: whether or not any one image was in the private dataset, every "
        "possible result of the training, and so everything derived from the model, has "
        f"nearly the same probability. The two probabilities differ at most by a factor "
        f"e^ε ≈ {odds_factor_text(eps)}, except with probability at most δ = {delta_s}. "
        "Smaller ε is a stronger guarantee. The bound holds against any attacker, whatever "
        "they know; the audit below shows what one concrete attack achieves.",
    )
    protected = (
        f"Each image of the private dataset ({dataset}) used for fine-tuning. The guarantee "
        "is per image: a person who contributed k images is protected as a group of k, "
        "roughly at k·ε.",
    )
    not_protected = [
        "The public data used for pre-training: no privacy was applied to it.",
        "The real test split, held-out real data used only for evaluation: the distances, "
        "accuracies and ranking scores below are measured on it, and the real images shown "
        "next to the synthetic ones come from it. They are not covered by (ε, δ).",
    ]
    if nonprivate_baseline:
        not_protected.append(
            "The non-private baseline accuracy: a classifier trained on the real private "
            "data, shown for comparison only.")
    if memorization:
        not_protected.append(
            "The audit's memorization figures: aggregates computed on the private data "
            "(no image, distance or index is released).")

    sampler = privacy.get("sampler", "poisson")
    batch = f", expected batch size B = {expected_batch_size}" if expected_batch_size else ""
    if disclose_private_size:
        sampling_value = (f"{sampler.capitalize()} sampling{batch}, "
                          f"rate q = {privacy['sample_rate']:.4g}")
        sampling_meaning = ("each private image joins each step's batch independently with "
                            "probability q = B/N")
        sigma_value = f"{privacy['noise_multiplier']:.4g}"
    else:
        # q = B/N is the private split's size in disguise; σ too: with ε, δ, the steps and
        # the accountant it determines q (PRIVACY.md rule 6)
        sampling_value = f"{sampler.capitalize()} sampling{batch}"
        sampling_meaning = ("each private image joins each step's batch independently with "
                            "the same probability q = B/N; q is not stated, since it would "
                            "reveal the private dataset's size N")
        sigma_value = "withheld"
    accountant = str(privacy["accountant"])
    numbers = [
        Row("Privacy guarantee (ε, δ)", f"({eps_s}, {delta_s})",
            "the configured target: σ was calibrated so that the accountant's ε after all "
            "steps is at most this, at this δ"
            + (f"; the accounted ε is {epsilon_text(float(privacy['epsilon']))}"
               if disclose_private_size else "; the exact accounted ε is not stated: "
               "through the calibration it depends on the private dataset's size N")),
        Row("Accountant", ACCOUNTANTS.get(accountant, accountant),
            "how ε is computed from σ, q and the number of steps"),
        Row("Sampling", sampling_value, sampling_meaning),
        Row("Noise multiplier σ", sigma_value,
            "Gaussian noise of standard deviation σ·C is added to the summed clipped "
            "gradients once per step"
            + ("" if disclose_private_size else "; not stated: with ε, δ, the steps and "
               "the accountant it would give q, and so N")),
        Row("Clipping norm C", f"{privacy['max_grad_norm']:g}",
            "each image's gradient is scaled down to at most this norm"),
        Row("Augmentation multiplicity K", str(privacy["aug_multiplicity"]),
            "each image's gradient is the mean over K augmented copies, clipped once"),
        Row("Steps", str(privacy["steps"]), "noisy DP-SGD updates of the model"),
        _budget_row(budget, delta_s, accountant),
        Row("Noise seeded for a test", "yes: NOT a private run" if privacy["seeded_for_test"]
            else "no", "the DP noise came from a fixed seed (tests only)"
            if privacy["seeded_for_test"] else "the DP noise came from the operating "
            "system's entropy source"),
    ]
    warning = None
    if privacy["seeded_for_test"]:
        warning = ("Test run: the DP noise was drawn from a fixed seed (finetune.noise_seed). "
                   "Anyone who knows the seed can recompute the noise, so the guarantee "
                   "above does not hold for this model. Do not release it or its samples.")
    return Statement(headline, paragraphs, protected, tuple(not_protected), tuple(numbers),
                     warning)


def _budget_row(budget: Budget | None, delta_s: str, accountant: str) -> Row:
    """The ledger's row: the runs on record against the budget (ε, δ). `delta_s`
    is the model's δ; the budget has its own (`Budget.budget_delta`)."""
    name = "Dataset budget (privacy ledger)"
    if budget is None:
        return Row(name, "unknown", "the fine-tuning recorded no ledger count")
    # public settings and a run count only: no composed or remaining ε (PRIVACY.md rule 8)
    runs = f"{budget.runs} run{'s' if budget.runs != 1 else ''} on record"
    limit = f"(ε ≤ {budget.budget_epsilon:g}, δ = {delta_text(budget.budget_delta)})"
    where = ("composed within the budget" if budget.within else
             "composed past the budget now configured (it was lowered after they ran; no "
             "further run is admitted)")
    value = f"{runs}, {where} {limit}; crashed runs count in full"
    when = ("so far" if budget.read_now else
            "as the ledger stood when this model finished training"
            if budget.recorded_by == "finetune" else
            "as the ledger stood when the privacy-utility sweep finished")
    return Row(name, value, f"every DP run on this private dataset {when}, composed at the "
               f"budget's δ ({accountant.upper()} accountant); the composed ε is not stated, "
               "since it depends on the private dataset's size")
