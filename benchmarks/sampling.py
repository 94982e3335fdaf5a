"""How close `dpsynth.diffusion.samplers.sample` runs to the cost of its UNet calls.

Sampling is `steps` UNet forwards plus a scheduler update per step. The bound
is therefore `steps x (time of one UNet forward on the same batch)`: a sampler
cannot be faster than that, and everything above it is overhead (scheduler
maths, noise draws, guidance concatenation, Python). This script builds the
UNet of the default `ModelConfig` at the default data shape (8x8x1, 10 classes,
random weights: the cost does not depend on the values), times the real
`sample()` for DDPM, DDIM and DPM-Solver++ with the default `SampleConfig`
batch size and step count, times the forward alone in the same process with
the same thread settings, and prints both with the overhead.

Usage:
    .venv/bin/python benchmarks/sampling.py            # batch 500, 25 steps
    .venv/bin/python benchmarks/sampling.py --quick    # a smoke run in seconds

Exit code 0 unless something fails; a missed overhead target is reported, not fatal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import get_args

import torch

from dpsynth.config import DataConfig, DiffusionConfig, ModelConfig, SampleConfig, SamplerKind
from dpsynth.diffusion.loss import make_noise_schedule
from dpsynth.diffusion.samplers import make_sampler, sample
from dpsynth.diffusion.unet import UNetSpec, build_unet

NUM_CLASSES = 10  # the default `digits` source
TARGET_OVERHEAD = 0.05  # sampling may cost at most 5 % more than its UNet forwards


@dataclass(frozen=True)
class Row:
    sampler: str
    batch_size: int
    steps: int
    sample_s: list[float]  # wall time of each timed `sample()` call
    bound_s: list[float]  # wall time of each timed loop of `steps` bare forwards

    @property
    def sample_median(self) -> float:
        return statistics.median(self.sample_s)

    @property
    def bound_median(self) -> float:
        return statistics.median(self.bound_s)

    @property
    def ratio(self) -> float:
        return self.sample_median / self.bound_median

    @property
    def noise(self) -> float:
        """Spread of the bound between rounds, relative: how far to trust `ratio`."""
        return (max(self.bound_s) - min(self.bound_s)) / self.bound_median

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.sample_median


def time_forward_loop(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      n: int) -> float:
    """Wall time of `n` UNet forwards in a loop, with the input forms `sample()` uses.

    Timed as a whole, like `sample()`, so that both sides of the ratio see the same
    kind of noise (a median of single forwards times n would drop the slow calls
    that a sampler's total cannot drop, and overstate the overhead on a busy machine).
    """
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(n):
            net(x, t, class_labels=y)
        return time.perf_counter() - t0


def benchmark(kinds: tuple[str, ...], batch_size: int, steps: int, repeats: int,
              guidance_scale: float, seed: int = 0) -> list[Row]:
    """Time each sampler and, right after it in each round (so both see the same
    machine load), a loop of `steps` bare forwards; `repeats` rounds."""
    data = DataConfig()
    spec = UNetSpec(image_size=data.image_size, channels=data.channels,
                    num_classes=NUM_CLASSES, model=ModelConfig())
    torch.manual_seed(seed)
    net = build_unet(spec).eval()
    schedule = make_noise_schedule(DiffusionConfig())
    shape = (spec.channels, spec.image_size, spec.image_size)
    labels = torch.arange(batch_size) % spec.num_classes  # class-balanced, as `sample` does

    # what the UNet sees per step: the batch, doubled under classifier-free guidance
    fwd_b = batch_size if guidance_scale == 1.0 else 2 * batch_size
    x = torch.randn((fwd_b, *shape), generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(500).expand(fwd_b)  # a 0-d timestep expanded, as in `sample`
    y = torch.cat([labels, torch.full_like(labels, spec.null_label)])[:fwd_b]

    def run_sampler(kind: str, n_steps: int) -> torch.Tensor:
        return sample(net, make_sampler(kind, schedule), labels, shape,  # type: ignore[arg-type]
                      num_inference_steps=n_steps, guidance_scale=guidance_scale,
                      null_label=spec.null_label,
                      generator=torch.Generator().manual_seed(seed))

    # warm-up: allocator, oneDNN kernels, scheduler code paths
    time_forward_loop(net, x, t, y, 2)
    for kind in kinds:
        out = run_sampler(kind, 2)
        if out.shape != (batch_size, *shape) or not bool((out.abs() <= 1).all()):
            raise RuntimeError(f"{kind}: bad output {tuple(out.shape)}, range "
                               f"[{float(out.min())}, {float(out.max())}]")

    sample_s: dict[str, list[float]] = {k: [] for k in kinds}
    bound_s: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind in kinds:
            t0 = time.perf_counter()
            run_sampler(kind, steps)
            sample_s[kind].append(time.perf_counter() - t0)
            bound_s[kind].append(time_forward_loop(net, x, t, y, steps))
    return [Row(kind, batch_size, steps, sample_s[kind], bound_s[kind]) for kind in kinds]


def format_table(rows: list[Row]) -> str:
    head = (f"{'sampler':<12} {'batch':>5} {'steps':>5} {'sample s':>9} {'img/s':>8} "
            f"{'bound s':>9} {'ratio':>6} {'overhead':>9} {'noise':>6}  "
            f"target<{TARGET_OVERHEAD:.0%}")
    lines = [head, "-" * len(head)]
    for r in rows:
        overhead = r.ratio - 1
        lines.append(f"{r.sampler:<12} {r.batch_size:>5} {r.steps:>5} {r.sample_median:>9.3f} "
                     f"{r.images_per_s:>8.1f} {r.bound_median:>9.3f} {r.ratio:>6.3f} "
                     f"{overhead:>+8.1%} {r.noise:>6.0%}  "
                     f"{'ok' if overhead < TARGET_OVERHEAD else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    default = SampleConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="batch 64, 5 steps, 2 repeats: checks the script, not the numbers")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default: sample.batch_size={default.batch_size}")
    p.add_argument("--steps", type=int, default=None,
                   help=f"default: sample.num_inference_steps={default.num_inference_steps}")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (median); default 3")
    p.add_argument("--guidance-scale", type=float, default=default.guidance_scale)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for everything (default: torch's choice)")
    p.add_argument("--samplers", nargs="+", default=list(get_args(SamplerKind)),
                   choices=list(get_args(SamplerKind)))
    args = p.parse_args(argv)

    batch_size = args.batch_size or (64 if args.quick else default.batch_size)
    steps = args.steps or (5 if args.quick else default.num_inference_steps)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; default ModelConfig "
          f"UNet, 8x8x1, {NUM_CLASSES} classes; guidance_scale={args.guidance_scale}; "
          f"median of {repeats} rounds", flush=True)
    rows = benchmark(tuple(args.samplers), batch_size, steps, repeats, args.guidance_scale)
    print(format_table(rows))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("sample s: median time of one sample() call; bound s: median time of `steps` bare "
          "UNet forwards on the batch the sampler feeds it; overhead = sample / bound - 1; "
          "noise: (max - min) / median of the bound over rounds. Overheads within the noise "
          "are not measurable on this machine: rerun on an idle one.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
