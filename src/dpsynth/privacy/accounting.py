"""Privacy accounting for DP-SGD with Poisson sampling (PRIVACY.md rule 4).

A history is Opacus' list of ``(noise_multiplier, sample_rate, num_steps)``;
its ε at a given δ comes from a fresh Opacus PRV or RDP accountant (never GDP,
whose ε can be an underestimate). The noise multiplier is calibrated *before*
training so that the planned history meets the target (ε, δ) without ever
overshooting it.

>>> round(epsilon([(1.5, 0.04, 2250)], 1e-5, "rdp"), 4)  # Opacus' RDP test
7.3291
>>> round(epsilon([(1.5, 0.05, 1000)], 1e-6, "prv"), 4)  # Opacus' PRV test
6.21

Sample rates and noise multipliers derive from the private split's size
(PRIVACY.md rule 6), so no error message here prints them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from dpsynth.choices import AccountantKind
from dpsynth.errors import InputError

Step = tuple[float, float, int]  # (noise_multiplier, sample_rate, num_steps), Opacus' history

# Opacus' PRVAccountant.get_epsilon defaults; ε is reported as the upper bound
# of the PRV estimate, so the true ε is at most this.
PRV_EPS_ERROR = 0.01
# The PRV grid has 2L/mesh points (Gopi et al. 2021, Sec. 5); ~70 bytes each at
# peak. Typical fine-tuning histories need < 2e6; beyond 1e7 (~1 GB, ~10 s) ε
# is far past any useful budget (measured: σ=0.05, q=0.01, 100 steps needs
# 3e8 points, 18 GB and 3 minutes, and still returns inf).
MAX_PRV_GRID_POINTS = 10_000_000
# Calibration stops once ε(σ) is within this fraction below the target.
CALIBRATION_RTOL = 0.005
# The largest σ the calibration tries (Opacus' get_noise_multiplier stops there too).
MAX_NOISE_MULTIPLIER = 1e6


class PrvTooCostly(InputError):
    """The PRV grid for this history would be too large to compute."""


class EpsilonNotFinite(InputError):
    """The accountant returned ε = inf or nan."""


def epsilon(history: Sequence[Step], delta: float, accountant: AccountantKind) -> float:
    """The ε of the composition of all steps in `history`, at `delta`.

    Args:
        history: ``(noise_multiplier, sample_rate, num_steps)`` segments, composed
            in sequence (adaptive composition), as in Opacus' ``accountant.history``.
        delta: the δ at which ε is reported, in (0, 1).
        accountant: ``"prv"`` (Gopi et al. 2021; tighter) or ``"rdp"`` (Mironov 2017).

    Returns:
        ε, 0.0 for an empty history. For "prv" this is Opacus' upper bound
        (estimate + `PRV_EPS_ERROR`).

    Raises:
        InputError: a bad argument, or the PRV accountant cannot evaluate the
            history (the message suggests ``finetune.accountant=rdp``).

    >>> round(epsilon([(0.8, 0.001, 100)], 1e-6, "prv"), 4)
    0.2704
    >>> epsilon([], 1e-5, "prv")
    0.0
    """
    _check_accountant(accountant)
    _check_open_unit("delta", delta)
    steps = list(normalize_history(history))
    if not steps:
        return 0.0
    eps = EPSILON[accountant](steps, delta)
    if not math.isfinite(eps):
        raise EpsilonNotFinite(f"the {accountant.upper()} accountant returned epsilon={eps} "
                               "for this history: the noise multiplier is far too small; "
                               "lower finetune.epsilon (more noise) or finetune.steps")
    return eps


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float,
                               steps: int, accountant: AccountantKind) -> float:
    """The noise multiplier σ for which ``steps`` steps at ``sample_rate`` meet (ε, δ).

    Guarantees ``epsilon([(σ, sample_rate, steps)], delta, accountant) <= target_epsilon``
    (the returned σ is one whose ε was computed), and ε(σ) >= (1 - `CALIBRATION_RTOL`)
    times the target unless the search bracket on σ shrank to a relative width
    of 1e-4 first.

    Like Opacus' ``get_noise_multiplier``, a bracketed search; unlike it, the
    search runs in log σ with interpolation (about 5 evaluations instead of
    ~25), and for PRV it starts from the RDP answer (ε_PRV <= ε_RDP) and steps
    down, so PRV is never evaluated at the tiny σ where its grid explodes
    (Opacus' search bisects from σ=20 toward 0).

    Args:
        target_epsilon: the target ε (``finetune.epsilon``), > 0.
        delta: δ (``finetune.delta``), in (0, 1).
        sample_rate: Poisson sampling rate q = B/N, in (0, 1].
        steps: number of DP-SGD steps, >= 1.
        accountant: ``"prv"`` or ``"rdp"``.

    Returns:
        σ, the standard deviation of the Gaussian noise in units of the clipping norm.

    Raises:
        InputError: an argument is out of range, or no σ up to 1e6 reaches the target.

    >>> sigma = calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5,
    ...     sample_rate=0.01, steps=1000, accountant="rdp")
    >>> 7.96 <= epsilon([(sigma, 0.01, 1000)], 1e-5, "rdp") <= 8.0
    True
    """
    _check_accountant(accountant)
    if not (_is_real(target_epsilon) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise InputError(f"{target_epsilon=} must be a finite number > 0 (finetune.epsilon)")
    _check_open_unit("delta", delta)
    if not (_is_real(sample_rate) and 0 < sample_rate <= 1):  # not shown: q = B/N reveals N
        raise InputError("sample_rate must be in (0, 1]: finetune.batch_size must be >= 1 and "
                         "at most the private split's size")
    if not _is_count(steps):
        raise InputError(f"{steps=} must be an integer >= 1 (finetune.steps)")

    def log_ratio(kind: AccountantKind) -> Callable[[float], float]:
        cache: dict[float, float] = {}

        def f(sigma: float) -> float:  # log(ε(σ)/target); +inf where ε is too large to compute
            if sigma not in cache:
                try:
                    eps = epsilon([(sigma, sample_rate, int(steps))], delta, kind)
                    cache[sigma] = math.log(eps / target_epsilon) if eps > 0 else -math.inf
                except (PrvTooCostly, EpsilonNotFinite):
                    cache[sigma] = math.inf
            return cache[sigma]
        return f

    try:
        sigma_rdp: float | None = _smallest_sigma(log_ratio("rdp"), start=1.0, factor=2.0)
    except _Unreachable:
        sigma_rdp = None
    if accountant == "rdp" and sigma_rdp is not None:
        return sigma_rdp
    if accountant == "prv":
        try:
            if sigma_rdp is not None:  # PRV from above, in small steps: never at tiny σ
                return _smallest_sigma(log_ratio("prv"), start=sigma_rdp, factor=1.25)
            # RDP cannot certify ε below ~0.1-0.2 at any σ (Opacus' orders stop at 63)
            return _smallest_sigma(log_ratio("prv"), start=1.0, factor=2.0)
        except _Unreachable:
            pass
    raise InputError(f"{target_epsilon=} at {delta=} with {steps=} is unreachable: even "
                     f"noise_multiplier={MAX_NOISE_MULTIPLIER:.0e} spends more; raise "
                     "finetune.epsilon or lower finetune.steps or finetune.batch_size"
                     + (" (the RDP accountant cannot certify a very small epsilon at any "
                        "noise: try finetune.accountant=prv)" if accountant == "rdp" else ""))


def normalize_history(history: Sequence[Sequence[float]]) -> tuple[Step, ...]:
    """`history` as a tuple of ``(float, float, int)`` after checking each segment.

    Raises:
        InputError: a segment is not (noise_multiplier > 0, sample_rate in (0, 1],
            num_steps >= 1); the message gives its index, not its values.
    """
    return tuple(_check_step(i, step) for i, step in enumerate(history))


def check_delta(delta: float, dataset_size: int, name: str = "finetune.delta") -> None:
    """Refuse a δ that is not below 1/N for a private split of N examples.

    δ >= 1/N allows a mechanism that publishes one example outright. N itself
    is private (PRIVACY.md rule 6), so no message names it.

    Args:
        delta: ``finetune.delta`` (or the dataset's budget δ).
        dataset_size: N, the private split's size (a call-time value).
        name: the config field `delta` comes from, for the message.

    Raises:
        InputError: ``delta`` is not in (0, 1/N).
    """
    if not _is_count(dataset_size):
        raise InputError("the private split must hold at least one example")
    if not (_is_real(delta) and 0 < delta < 1):
        raise InputError(f"{name}={delta!r} must be in (0, 1)")
    if delta * dataset_size >= 1:
        raise InputError(f"{name}={delta} must be well below 1/N, N being the size of "
                         f"the private split (not shown: it is private); lower {name}")


def _rdp_epsilon(history: list[Step], delta: float) -> float:
    acc = RDPAccountant()
    acc.history = history
    return float(acc.get_epsilon(delta))


def _prv_epsilon(history: list[Step], delta: float) -> float:
    """Opacus' PRV ε, after checking the grid it would build is affordable."""
    delta_error = delta / 1000  # Opacus' default
    counts = [n for _, _, n in history]
    # Opacus' PRVAccountant._get_domain, without building the grid.
    half_width = compute_safe_domain_size(
        [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history], counts,
        eps_error=PRV_EPS_ERROR, delta_error=delta_error)
    mesh = PRV_EPS_ERROR / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    points = 2 * half_width / mesh
    if not points <= MAX_PRV_GRID_POINTS:  # also catches nan/inf
        raise PrvTooCostly(
            # the grid size is not shown: it derives from the sample rate, hence from N
            f"the PRV accountant would need a grid of more than {MAX_PRV_GRID_POINTS:.0e} "
            "points for this history: epsilon is far beyond any useful "
            "budget or there are very many steps; use finetune.accountant=rdp, or more noise "
            "(lower finetune.epsilon) or fewer finetune.steps")
    acc = PRVAccountant()
    acc.history = history
    try:
        return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error))
    except (ValueError, RuntimeError, ArithmeticError, MemoryError) as exc:
        raise InputError(f"the PRV accountant failed on this history at {delta=} ({exc}); use "
                         "finetune.accountant=rdp, or a larger finetune.delta, or settings with "
                         "more noise") from exc


class _Unreachable(Exception):
    pass


# The accountants by name (the names and their descriptions: `dpsynth.choices`).
EPSILON: dict[str, Callable[[list[Step], float], float]] = {
    "prv": _prv_epsilon,  # Gopi, Lee & Wutschitz 2021: tighter
    "rdp": _rdp_epsilon,  # Mironov 2017
}


def _smallest_sigma(f: Callable[[float], float], *, start: float, factor: float) -> float:
    """The smallest σ (to within tolerance) with ``f(σ) <= 0``, f decreasing in σ.

    Brackets the root by stepping from `start` by `factor`, then runs regula
    falsi on f against x = log σ (close to linear there), each step clipped to
    the inner 80% of the bracket so it always shrinks. Only a σ whose f was
    computed <= 0 is ever returned.
    """
    hi = start
    while f(hi) > 0:
        hi *= factor
        if hi > MAX_NOISE_MULTIPLIER:
            raise _Unreachable
    lo = hi / factor
    while f(lo) <= 0:
        hi, lo = lo, lo / factor
        if lo < 1e-6:  # ε(σ) -> inf as σ -> 0; not reached in practice
            return hi
    stop = math.log1p(-CALIBRATION_RTOL)
    for _ in range(100):
        f_lo, f_hi = f(lo), f(hi)
        if f_hi >= stop or hi / lo - 1 <= 1e-4:
            break
        x_lo, x_hi = math.log(lo), math.log(hi)
        if math.isfinite(f_lo) and math.isfinite(f_hi):
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
            x = min(max(x, x_lo + 0.1 * (x_hi - x_lo)), x_hi - 0.1 * (x_hi - x_lo))
        else:
            x = (x_lo + x_hi) / 2
        sigma = math.exp(x)
        if f(sigma) > 0:
            lo = sigma
        else:
            hi = sigma
    return hi


def _check_accountant(accountant: str) -> None:
    if accountant not in EPSILON:
        raise InputError(f"{accountant=} must be one of {sorted(EPSILON)} (finetune.accountant); "
                         "GDP is not offered: its epsilon can be an underestimate")


def _check_open_unit(name: str, value: float) -> None:
    if not (_is_real(value) and 0 < value < 1):
        raise InputError(f"{name}={value!r} must be in (0, 1) (finetune.{name})")


def _check_step(index: int, step: Sequence[float]) -> Step:
    """Validate one history segment; its values are not shown (they derive from N)."""
    try:
        sigma, q, n = step
    except (TypeError, ValueError):
        raise InputError(f"history[{index}] must be (noise_multiplier, sample_rate, "
                         "num_steps)") from None
    if not (_is_real(sigma) and math.isfinite(sigma) and sigma > 0):
        raise InputError(f"history[{index}]: noise_multiplier must be finite and > 0")
    if not (_is_real(q) and 0 < q <= 1):
        raise InputError(f"history[{index}]: sample_rate must be in (0, 1]")
    if not _is_count(n):
        raise InputError(f"history[{index}]: num_steps must be an integer >= 1")
    return (float(sigma), float(q), int(n))


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_count(n: object) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
