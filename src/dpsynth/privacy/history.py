"""The accountant history a DP fine-tuning run plans, before it trains: what the
privacy ledger reserves for it (`dpsynth finetune`, and each point of a sweep).
"""

from __future__ import annotations

from dpsynth.config import FinetuneConfig
from dpsynth.privacy import accounting
from dpsynth.privacy.sampling import sample_rate


def planned_history(fc: FinetuneConfig, n: int) -> list[accounting.Step]:
    """The run's accountant history ``[(sigma, q, steps)]`` on `n` private records:
    sigma calibrated to ``finetune.epsilon`` at ``finetune.delta`` for Poisson
    sampling at q = B / n over ``finetune.steps`` steps. What the privacy ledger
    reserves; private (a function of n), never logged."""
    q = sample_rate(fc.batch_size, n)
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=fc.epsilon, delta=fc.delta, sample_rate=q, steps=fc.steps,
        accountant=fc.accountant)
    return [(sigma, q, fc.steps)]
