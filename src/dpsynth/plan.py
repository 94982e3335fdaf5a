"""`dpsynth plan`: the privacy budget and compute of a fine-tuning run, before it runs.

From the dataset size N (private: a call argument, never stored) and public
settings, the planner gives what `dpsynth finetune` would do -- q = B/N, the
noise multiplier σ calibrated by the same accountant code, or ε for a given σ --
plus the noise-to-signal ratio per step, the FLOPs of the configured UNet and
the GPU-hours they take on a named device, and warnings for settings that
cannot work. Pure functions and frozen dataclasses; the CLI only prints.

>>> p = privacy_plan(dataset_size=2500, batch_size=100, steps=2250, delta=1e-5,
...                  accountant="rdp", noise_multiplier=1.5)  # Opacus' RDP test
>>> p.sample_rate, p.epochs, round(p.epsilon, 4)
(0.04, 90.0, 7.3291)
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from dpsynth.config import Config, FinetuneConfig
from dpsynth.diffusion.cost import ModelCost, unet_cost
from dpsynth.diffusion.unet import UNetSpec
from dpsynth.errors import ConfigError, InputError
from dpsynth.gpus import DEFAULT_DEVICE, DEVICES, MFU_BY_PRECISION, Device, Precision, gpu_hours
from dpsynth.privacy import accounting
from dpsynth.privacy.sampling import sample_rate as poisson_sample_rate

Level = Literal["warning"]

# Warning thresholds (each is explained where it fires, in `plan_warnings`).
DELTA_WARN_FRACTION = 0.1  # warn when δ > 0.1/N
HIGH_SAMPLE_RATE = 0.1
HOPELESS_NOISE_TO_SIGNAL = 10.0
WIDTH = 92  # of the text table's wrapped lines


@dataclass(frozen=True)
class Advice:
    """One warning of the planner: `code` is stable (for --json), `message` says what to do."""

    level: Level
    code: str
    message: str


@dataclass(frozen=True)
class PrivacyPlan:
    """What `dpsynth finetune` would use and spend (PRIVACY.md rule 4).

    Attributes:
        sample_rate: q = B/N (Poisson sampling).
        steps: S, DP-SGD steps (each a Poisson-sampled logical batch).
        epochs: S·q, expected passes over the private split.
        noise_multiplier: σ, calibrated to `target_epsilon`, or as given.
        epsilon: ε of S steps at (q, σ) at `delta`; ≤ `target_epsilon` when calibrated.
        target_epsilon: None in the inverse mode (σ given).
    """

    dataset_size: int
    batch_size: int
    sample_rate: float
    steps: int
    epochs: float
    noise_multiplier: float
    epsilon: float
    delta: float
    accountant: accounting.AccountantKind
    target_epsilon: float | None


@dataclass(frozen=True)
class NoiseToSignal:
    """The Gaussian noise in one averaged DP-SGD gradient against its signal.

    The update is (Σ clipped gradients + N(0, σ²C²I)) / B. Each clipped gradient
    has norm ≤ C, so the signal (their mean) has norm ≤ C, while the noise has
    std σC/B per coordinate and norm ≈ σC·√d/B over d parameters. In units of C:

    Attributes:
        per_coordinate: σ/B, the noise std per coordinate.
        per_step: σ√d/B, noise norm over the largest possible signal norm, one step.
        per_run: σ√d/(B√S): over all S steps, noise adds up like √S and a signal
            at most like S, so this is the noise of the sum of all updates over
            the largest signal it could carry. Large batches make it small (De et
            al. 2022, Sec. 3; Ghalebikesabi et al. 2023, Sec. 3).
    """

    per_coordinate: float
    per_step: float
    per_run: float


@dataclass(frozen=True)
class PhaseCost:
    """One phase of the run: FLOPs and GPU-hours at the assumed utilisation."""

    name: str
    images: int  # UNet evaluations (forward, or forward + backward when training)
    flops: float
    gpu_hours: float


@dataclass(frozen=True)
class ComputePlan:
    """The run's FLOPs by phase, as GPU-hours on `device` at `precision`'s peak
    times `mfu`, and a lower bound of fine-tuning's memory."""

    device: Device
    precision: Precision
    mfu: float
    model: ModelCost
    phases: tuple[PhaseCost, ...]
    memory_gb: float  # lower bound of fine-tuning memory (see `compute_plan`)

    @property
    def gpu_hours(self) -> float:
        return sum(p.gpu_hours for p in self.phases)


@dataclass(frozen=True)
class Plan:
    """Everything `dpsynth plan` reports for one setting."""

    privacy: PrivacyPlan
    noise: NoiseToSignal
    compute: ComputePlan
    aug_multiplicity: int
    max_grad_norm: float
    warnings: tuple[Advice, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; `dataset_size` is in it (the planner's user owns the data)."""
        c = self.compute
        return {
            "privacy": dataclasses.asdict(self.privacy),
            "noise": {**dataclasses.asdict(self.noise), "num_parameters": c.model.num_parameters,
                      "noise_std_per_coordinate": (self.privacy.noise_multiplier
                                                   * self.max_grad_norm
                                                   / self.privacy.batch_size),
                      "max_grad_norm": self.max_grad_norm},
            "compute": {"device": c.device.name, "precision": c.precision,
                        "peak_tflops": c.device.tflops[c.precision], "mfu": c.mfu,
                        "aug_multiplicity": self.aug_multiplicity,
                        "forward_flops_per_image": c.model.forward_flops,
                        "train_flops_per_image": c.model.train_flops,
                        "phases": {p.name: {"images": p.images, "flops": p.flops,
                                            "gpu_hours": p.gpu_hours} for p in c.phases},
                        "gpu_hours": c.gpu_hours, "memory_gb_lower_bound": c.memory_gb,
                        "device_memory_gb": c.device.memory_gb},
            "warnings": [dataclasses.asdict(w) for w in self.warnings],
        }


def steps_for_epochs(epochs: float, dataset_size: int, batch_size: int) -> int:
    """S = ceil(E·N/B): enough steps for E expected passes at q = B/N.

    Exact arithmetic on the decimal value of `epochs`, so 0.1 epochs is 1/10.

    >>> steps_for_epochs(1, 990, 128), steps_for_epochs(0.3, 1000, 100)  # not 4: exact
    (8, 3)
    """
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise InputError(f"--epochs={epochs!r} must be a number > 0")
    return max(1, math.ceil(Fraction(str(epochs)) * dataset_size / batch_size))


def privacy_plan(*, dataset_size: int, batch_size: int, steps: int, delta: float,
                 accountant: accounting.AccountantKind, target_epsilon: float | None = None,
                 noise_multiplier: float | None = None) -> PrivacyPlan:
    """σ for a target ε (as `dpsynth finetune` calibrates it), or ε for a given σ.

    The checks and calls are the fine-tuning stage's own, in its order:
    `check_delta`, `sampling.sample_rate`, `calibrate_noise_multiplier`.

    Raises:
        InputError: δ ≥ 1/N, B > N, neither or both of ε and σ, or ε unreachable.

    >>> p = privacy_plan(dataset_size=990, batch_size=128, steps=200, delta=1e-5,
    ...                  accountant="rdp", target_epsilon=10.0)
    >>> round(p.noise_multiplier, 3), round(p.epsilon, 3), round(p.epochs, 2)
    (1.238, 9.992, 25.86)
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise InputError("give exactly one of --epsilon (calibrate sigma to it) and "
                         "--noise-multiplier (report epsilon for it)")
    accounting.check_delta(delta, dataset_size)
    q = poisson_sample_rate(batch_size, dataset_size)
    if noise_multiplier is None:
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps,
            accountant=accountant)
    else:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise InputError(f"--noise-multiplier={noise_multiplier} must be finite and > 0")
        sigma = noise_multiplier
    eps = accounting.epsilon([(sigma, q, steps)], delta, accountant)
    return PrivacyPlan(dataset_size=dataset_size, batch_size=batch_size, sample_rate=q,
                       steps=steps, epochs=steps * q, noise_multiplier=sigma, epsilon=eps,
                       delta=delta, accountant=accountant, target_epsilon=target_epsilon)


def noise_to_signal(noise_multiplier: float, batch_size: int, num_parameters: int,
                    steps: int) -> NoiseToSignal:
    """Noise against signal of the averaged noisy gradient (see `NoiseToSignal`).

    >>> n = noise_to_signal(2.0, 1000, 1_000_000, 100)
    >>> n.per_coordinate, n.per_step, n.per_run
    (0.002, 2.0, 0.2)
    """
    per_step = noise_multiplier * math.sqrt(num_parameters) / batch_size
    return NoiseToSignal(per_coordinate=noise_multiplier / batch_size, per_step=per_step,
                         per_run=per_step / math.sqrt(steps))


def compute_plan(cfg: Config, model: ModelCost, *, steps: int, device: Device,
                 precision: Precision, mfu: float, whole_run: bool) -> ComputePlan:
    """Fine-tuning cost: S steps · B expected images · K copies, each a forward
    and backward (per-example gradients by vmap cost about the FLOPs of ordinary
    backprop; vmap's own overhead, clipping and noise, O(B·d) per step, are not
    counted). With `whole_run`, also pre-training (steps · batch, K = 1) and
    sampling (images · inference steps forwards, twice with guidance ≠ 1).
    """
    fc = cfg.finetune
    phases = [_phase("finetune", steps * fc.batch_size * fc.aug_multiplicity,
                     model.train_flops, device, precision, mfu)]
    if whole_run:
        pc, sc = cfg.pretrain, cfg.sample
        phases.insert(0, _phase("pretrain", pc.steps * pc.batch_size, model.train_flops,
                                device, precision, mfu))
        guided = 2 if sc.guidance_scale != 1.0 else 1  # conditional + unconditional
        phases.append(_phase("sample", sc.num_samples * sc.num_inference_steps * guided,
                             model.forward_flops, device, precision, mfu))
    # float32: weights, the clipped sum, Adam's two moments, the EMA copy, and the
    # activations of the physical_batch_size * K rows of one micro-batch. vmap also
    # holds every example's gradient and the attention score matrices (no fused
    # kernel under vmap); the book-keeping engine keeps fused SDPA (no score
    # matrices) and may discard per-example gradients, and under bf16 a saved
    # tensor takes at least 2 bytes per element. Temporaries come on top: a lower
    # bound (docs/scale.md has the measured peaks).
    rows = fc.physical_batch_size * fc.aug_multiplicity
    if fc.per_example == "vmap":
        per_row, gradients = model.activation_bytes, fc.physical_batch_size
    else:
        per_row = model.activation_bytes - model.attention_score_bytes
        per_row, gradients = (per_row / 2 if fc.precision == "bf16" else per_row), 0
    memory = (4 * model.num_parameters * (5 + gradients) + rows * per_row) / 1e9
    return ComputePlan(device=device, precision=precision, mfu=mfu, model=model,
                       phases=tuple(phases), memory_gb=memory)


def _phase(name: str, images: int, flops_per_image: int, device: Device,
           precision: Precision, mfu: float) -> PhaseCost:
    flops = float(images) * flops_per_image
    return PhaseCost(name, images, flops, gpu_hours(flops, device, precision, mfu))


def plan_warnings(privacy: PrivacyPlan, noise: NoiseToSignal,
                  compute: ComputePlan) -> tuple[Advice, ...]:
    """Settings that are allowed but likely wrong. (δ ≥ 1/N and B > N are errors,
    raised by `privacy_plan` as in training.)"""
    p, out = privacy, []
    if p.delta * p.dataset_size > DELTA_WARN_FRACTION:
        # δ bounds the probability mass where the ε bound may fail; at δ = 1/N one
        # example could be published whole. Convention: δ ≪ 1/N (PRIVACY.md rule 4).
        out.append(Advice("warning", "delta_not_small", (
            f"delta={p.delta:g} is more than 1/(10 N) = {0.1 / p.dataset_size:.2g} (N = "
            f"{p.dataset_size}): a mechanism that publishes each example whole with "
            f"probability delta is (0, delta)-DP and would publish delta*N = "
            f"{p.delta * p.dataset_size:.2g} examples on average; lower --delta to <= "
            f"{_round_down(0.1 / p.dataset_size):g} (benchmarks such as CIFAR-10 at 1e-5 "
            "keep delta*N = 0.5 only to compare with published results)")))
    if p.sample_rate > HIGH_SAMPLE_RATE:
        # Measured with this accountant (RDP, ε in [1, 10], S in [200, 2000]): from
        # q = 0.1 up the calibrated σ is within 40% of q·σ(q=1), the noise of full-batch
        # DP-GD scaled down by q: amplification by subsampling has nearly run out, and
        # σ/B barely falls as B grows (PRV, N = 990, ε = 10, equal compute S·B: q from
        # 0.016 to 0.13 lowers σ√d/(B√S) by 39%, q from 0.13 to 1 by only 22%).
        out.append(Advice("warning", "high_sample_rate", (
            f"sample rate q = B/N = {p.sample_rate:.3g} > {HIGH_SAMPLE_RATE:g}: subsampling "
            "amplifies privacy little at this rate, so each step costs nearly what a "
            "full-batch step would and a larger --batch-size lowers the noise sigma/B only "
            "slowly (the accounting is still exact); more private data is the lever, a "
            "smaller batch is not (it raises sigma/B)")))
    if noise.per_run > HOPELESS_NOISE_TO_SIGNAL:
        # Even if all S clipped gradients pointed the same way with the largest norm C,
        # the summed noise would be 10x the summed signal. 10, not 1: d counts every
        # parameter, and noise in directions the loss ignores does little harm (the
        # default digits run, which works, is at 0.7).
        out.append(Advice("warning", "noise_dominates", (
            f"noise-to-signal over the run sigma*sqrt(d)/(B*sqrt(S)) = {noise.per_run:.3g} "
            f"> {HOPELESS_NOISE_TO_SIGNAL:g}: the noise outweighs even the largest possible "
            "signal of all steps together; training is hopeless: raise --batch-size (most "
            "effective), --epsilon or --steps, or use a smaller model")))
    if compute.memory_gb > compute.device.memory_gb:
        out.append(Advice("warning", "memory", (
            f"fine-tuning needs more than {compute.memory_gb:.3g} GB (weights, optimizer, and "
            f"the per-example gradients and activations of finetune.physical_batch_size "
            f"examples x K copies) on a {compute.device.memory_gb:g} GB "
            f"{compute.device.name}: lower finetune.physical_batch_size (memory only; the "
            "privacy is unchanged)")))
    return tuple(out)


def _round_down(x: float) -> float:
    """x rounded down to one significant digit (a δ to suggest)."""
    scale = 10 ** math.floor(math.log10(x))
    return math.floor(x / scale) * scale


def with_flags(cfg: Config, **flags: Any) -> Config:
    """`cfg` with `--batch-size` etc. (names as in `FinetuneConfig`; None = keep)
    applied to its finetune section; an invalid value's error names the flag."""
    fc = cfg.finetune
    for name, value in flags.items():
        if value is None:
            continue
        try:
            fc = dataclasses.replace(fc, **{name: value})
        except ConfigError as err:
            raise InputError(f"--{name.replace('_', '-')}: {err}") from None
    return dataclasses.replace(cfg, finetune=fc)


def plan_run(cfg: Config, *, dataset_size: int, epochs: float | None = None,
             noise_multiplier: float | None = None, num_classes: int = 10,
             device: str = DEFAULT_DEVICE, precision: Precision | None = None,
             mfu: float | None = None, whole_run: bool = True) -> Plan:
    """The plan of `dpsynth finetune` with `cfg` on a private split of `dataset_size`.

    Args:
        cfg: settings (flags already applied with `with_flags`); the target ε
            is `cfg.finetune.epsilon` unless `noise_multiplier` is given.
        dataset_size: N, the private split's size (private: not stored).
        epochs: if given, replaces `cfg.finetune.steps` by ceil(E·N/B).
        noise_multiplier: the inverse mode: report ε for this σ.
        num_classes: classes of the private data (the UNet's label embedding).
        device, precision, mfu: where and how fast the FLOPs run; precision
            defaults to the config's `finetune.precision` (fp32 -> "tf32", bf16
            -> "bf16"), mfu to that precision's measured `MFU_BY_PRECISION`.
        whole_run: also cost pre-training and sampling.
    """
    fc: FinetuneConfig = cfg.finetune
    if precision is None:
        precision = "bf16" if fc.precision == "bf16" else "tf32"
    if mfu is None:
        mfu = MFU_BY_PRECISION[precision]
    if not (isinstance(dataset_size, int) and dataset_size >= 1):
        raise InputError(f"--dataset-size={dataset_size!r} must be an integer >= 1 (the "
                         "number of images in the private split)")
    if device not in DEVICES:
        raise InputError(f"--device={device!r} is not one of {', '.join(DEVICES)}")
    if not 0 < mfu <= 1:
        raise InputError(f"--mfu={mfu} must be in (0, 1] (the fraction of peak reached)")
    if num_classes < 1:
        raise InputError(f"--num-classes={num_classes} must be >= 1")
    if fc.batch_size > dataset_size:  # sampling.sample_rate refuses it too, without N
        raise InputError(f"--batch-size={fc.batch_size} is larger than --dataset-size="
                         f"{dataset_size}; lower --batch-size (B is the expected batch qN)")
    steps = fc.steps if epochs is None else steps_for_epochs(epochs, dataset_size,
                                                             fc.batch_size)
    try:
        privacy = privacy_plan(dataset_size=dataset_size, batch_size=fc.batch_size,
                               steps=steps, delta=fc.delta, accountant=fc.accountant,
                               target_epsilon=(None if noise_multiplier is not None
                                               else fc.epsilon),
                               noise_multiplier=noise_multiplier)
    except InputError as err:
        if fc.delta * dataset_size >= 1:
            raise InputError(f"--delta={fc.delta:g} is not below 1/N = {1 / dataset_size:.3g} "
                             f"(N = {dataset_size}): a mechanism could publish one example "
                             "whole; lower --delta to at most "
                             f"{_round_down(0.1 / dataset_size):g}") from None
        raise InputError(f"{err} (flags: --epsilon or --noise-multiplier, --steps or "
                         "--epochs, --batch-size, --accountant)") from None
    spec = UNetSpec(image_size=cfg.data.image_size, channels=cfg.data.channels,
                    num_classes=num_classes, model=cfg.model)
    model = unet_cost(spec)
    noise = noise_to_signal(privacy.noise_multiplier, fc.batch_size, model.num_parameters,
                            steps)
    compute = compute_plan(cfg, model, steps=steps, device=DEVICES[device],
                           precision=precision, mfu=mfu, whole_run=whole_run)
    return Plan(privacy=privacy, noise=noise, compute=compute,
                aug_multiplicity=fc.aug_multiplicity, max_grad_norm=fc.max_grad_norm,
                warnings=plan_warnings(privacy, noise, compute))


def render(plan: Plan) -> str:
    """The plan as a text table for a terminal."""
    p, n, c = plan.privacy, plan.noise, plan.compute
    mode = (f"calibrated to epsilon = {p.target_epsilon:g}" if p.target_epsilon is not None
            else "given (--noise-multiplier)")
    rows = [
        "privacy (the accountant and calibration of `dpsynth finetune`)",
        ("dataset size N", f"{p.dataset_size:,}", "private: printed here, stored nowhere"),
        ("expected batch B", f"{p.batch_size:,}", "Poisson sampling"),
        ("sample rate q = B/N", f"{p.sample_rate:.4g}", ""),
        ("steps S", f"{p.steps:,}", f"= {p.epochs:.3g} epochs (S*q)"),
        ("noise multiplier sigma", f"{p.noise_multiplier:.4g}", mode),
        ("epsilon", f"{p.epsilon:.4g}", f"at delta = {p.delta:g}, {p.accountant.upper()}"),
        "noise vs signal, in units of the clipping norm C = "
        f"{plan.max_grad_norm:g} (smaller is better)",
        ("per coordinate sigma/B", f"{n.per_coordinate:.3g}", "noise std of the mean gradient"),
        ("per step sigma*sqrt(d)/B", f"{n.per_step:.3g}", "noise norm / largest signal norm"),
        ("per run .../sqrt(S)", f"{n.per_run:.3g}",
         f"the same for the sum of all steps; > {HOPELESS_NOISE_TO_SIGNAL:g} is hopeless"),
        f"compute on {c.device.name} ({c.device.tflops[c.precision]:g} TFLOPS dense "
        f"{c.precision.upper()}, MFU {c.mfu:g} assumed)",
        ("UNet parameters d", f"{c.model.num_parameters:,}", ""),
        ("FLOPs per image", f"{_si(c.model.forward_flops)}FLOP",
         f"forward; {_si(c.model.train_flops)}FLOP forward + backward"),
    ]
    for ph in c.phases:
        what = {"pretrain": "pretrain.steps * batch", "sample":
                "num_samples * inference steps", "finetune":
                f"S * B * K (K = {plan.aug_multiplicity})"}[ph.name]
        rows.append((f"{ph.name}", f"{_si(ph.flops)}FLOP",
                     f"{_hours(ph.gpu_hours)}; {ph.images:,} images = {what}"))
    rows.append(("total", "", _hours(c.gpu_hours)))
    rows.append(("fine-tuning memory", f"> {c.memory_gb:.3g} GB",
                 f"of {c.device.memory_gb:g}; a micro-batch of physical_batch_size x K rows"))
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
        else:
            name, value, note = row
            lines.append(f"  {name:<26}{value:>16}  {note}".rstrip())
    lines.append(textwrap.fill(
        "GPU time = FLOPs / (peak * MFU); vmap overhead, data loading and evaluation are not "
        "counted, and small models reach far below the assumed MFU: a floor.", WIDTH,
        initial_indent="  ", subsequent_indent="  "))
    lines.append("warnings" + ("" if plan.warnings else ": none"))
    lines += [textwrap.fill(w.message, WIDTH, initial_indent="  - ", subsequent_indent="    ")
              for w in plan.warnings]
    return "\n".join(lines)


def _si(x: float) -> str:
    """3.1e13 -> '31 T'."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6),
                        ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def _hours(h: float) -> str:
    """GPU time in the unit that reads best."""
    if h >= 1:
        return f"{h:,.3g} GPU-hours" if h < 1000 else f"{h:,.0f} GPU-hours"
    return f"{h * 60:.3g} GPU-minutes" if h * 60 >= 1 else f"{h * 3600:.2g} GPU-seconds"
