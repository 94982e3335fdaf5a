"""What one DP-SGD step costs over the work it cannot avoid, and over Opacus.

A DP logical step with augmentation multiplicity K runs the UNet forward and
backward on B*K rows (B examples, K augmented copies each), then clips one
gradient per example, adds noise and steps the optimiser. The physical floor
of that work is a *non-private* step on the same B*K-row batch: forward,
backward of the mean loss, Adam step. This script times, on the same UNet, in
the same process, in alternating rounds:

- `nonprivate`: that floor (diffusers' default SDPA attention);
- `ours`: the real `dpsynth.privacy.dp_sgd.noisy_gradient` (physical batch = B,
  sigma = 1, C = 1, one micro-batch) then Adam, with the vmap engine
  (`finetune.per_example=vmap`) and the vmap-friendly attention processor that
  `dpsynth finetune` installs for it;
- `bookkeeping`: the same `noisy_gradient` with the book-keeping engine
  (`finetune.per_example=bookkeeping`, `dpsynth.privacy.bookkeeping`: one forward
  and one backward over the B*K rows, ghost or instantiated norms per layer, the
  clipped sum from the stored activations), diffusers' fused SDPA attention kept;
- `opacus`: the established approach (DPDM, Dockhorn et al. 2023): Opacus
  `GradSampleModule` in hooks mode on the K-replicated B*K-row batch, per-sample
  gradients reshaped to [B, K, ...] and averaged over K, clipped per example,
  summed, Gaussian noise, then Adam;
- `ours-sdpa` (only with `--methods`): `noisy_gradient` without the processor
  swap, to show what the SDPA vmap fallback costs.

Peak memory is measured in a fresh subprocess per (method, K): the script
re-invokes itself with `--measure METHOD --k K`; the child builds the model,
runs one warm-up step, resets the kernel's RSS high-water mark
(`/proc/self/clear_refs`), runs one measured step, and reports
`VmHWM - RSS before the measured step` (the import of torch peaks higher than
a step, so a plain `ru_maxrss` would hide it),
plus the bytes of the per-example gradient tensors the method materialises.

Usage:
    .venv/bin/python benchmarks/dp_step.py                  # smoke and digits UNets, B=16, K=4
    .venv/bin/python benchmarks/dp_step.py --models default8  # ModelConfig() at 8x8x1 (1.11M)
    .venv/bin/python benchmarks/dp_step.py --models unet16  # ~0.69M-param UNet at 16x16
    .venv/bin/python benchmarks/dp_step.py --quick          # a smoke run: checks the script

Exit code 0 unless something fails; a missed target is reported, not fatal.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpsynth import config
from dpsynth.config import DiffusionConfig, ModelConfig
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.unet import UNetSpec, build_unet
from dpsynth.privacy.dp_sgd import DPStep, gaussian_noise, noisy_gradient
from dpsynth.privacy.draws import draw_copies, record_keys
from dpsynth.privacy.per_example import clipped_sum, per_example_grads, \
    use_vmap_friendly_attention

NUM_CLASSES = 10  # the default `digits` source
TARGET_OURS_OVER_FLOOR = 1.2  # a DP step may cost at most 1.2x the non-private B*K step
TARGET_SPEEDUP_OVER_OPACUS = 1.5  # ... and must be at least 1.5x faster than Opacus hooks
METHODS = ("nonprivate", "ours", "bookkeeping", "opacus", "ours-sdpa")
REPO = Path(__file__).resolve().parents[1]
# name -> (image size, the config whose `model` section it is; None: see model_for)
MODELS = {"smoke": (8, "configs/smoke.yaml"), "digits": (8, "params.yaml"),
          "default8": (8, None), "unet16": (16, None)}
SIGMA, CLIP, LR = 1.0, 1.0, 1e-4


def model_for(name: str) -> tuple[int, ModelConfig]:
    """(image size, model) of a benchmark model: the `model` section of the smoke
    config or of params.yaml (the digits run) at 8x8; the default `ModelConfig` at
    8x8; at 16x16 a smaller one (~0.69M parameters), the size of the UNet behind
    the issue's orientation numbers."""
    size, path = MODELS[name]
    if path is not None:
        return size, config.load(REPO / path).model
    if size == 8:
        return size, ModelConfig()
    return size, ModelConfig(block_out_channels=(16, 32, 64))


@dataclass
class Bench:
    """Everything one method needs: its own copy of the net (same initial weights),
    its own Adam, the data, and the generators."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    loss: DenoisingLoss
    x: torch.Tensor  # [B, C, H, W] in [-1, 1]
    y: torch.Tensor  # [B]
    k: int
    gen: torch.Generator
    noise_gen: torch.Generator

    @property
    def b(self) -> int:
        return len(self.x)

    @functools.cached_property
    def keys(self) -> torch.Tensor:
        """The records' keys (the stage computes them once per run, not per step)."""
        return record_keys(self.x, self.y)


def patch_opacus_conv() -> None:
    """Make Opacus' Conv2d grad sampler correct on UNet2DModel.

    Opacus 1.6's `unfold2d` (pad + `as_strided`) assumes a contiguous NCHW activation.
    In the UNet's low-resolution blocks (the mid block, the first up block) the conv
    input arrives channels-last-strided, and the per-sample gradients come out all
    zero (silently: `strict=True` does not catch it). `check_opacus_matches` fails
    without this patch. The fix is one `.contiguous()` per conv input, a copy the
    Opacus baseline pays for.
    """
    from opacus import GradSampleModule
    from opacus.grad_sample.conv import compute_conv_grad_sample

    def conv_grad_sample(layer, activations, backprops):  # noqa: ANN001, ANN202
        return compute_conv_grad_sample(layer, [activations[0].contiguous()], backprops)

    GradSampleModule.GRAD_SAMPLERS[torch.nn.Conv2d] = conv_grad_sample


def make_bench(method: str, base: torch.nn.Module, loss: DenoisingLoss, x: torch.Tensor,
               y: torch.Tensor, k: int, seed: int) -> Bench:
    net = copy.deepcopy(base).train()
    if method == "ours":
        use_vmap_friendly_attention(net)  # as `dpsynth finetune` does for vmap
    if method == "opacus":
        from opacus import GradSampleModule

        patch_opacus_conv()
        # strict=True passes: every parameterised module of UNet2DModel is a Conv2d,
        # Linear, GroupNorm or Embedding, which Opacus hooks support.
        net = GradSampleModule(net, batch_first=True, loss_reduction="sum", strict=True)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    return Bench(net, opt, loss, x, y, k, torch.Generator().manual_seed(seed + 1),
                 torch.Generator().manual_seed(seed + 2))


def step_nonprivate(bn: Bench) -> None:
    """The floor: forward + backward of the mean loss over the B*K rows, Adam."""
    x0, labels, t, noise = draw_copies(bn.loss, bn.x, bn.y, bn.k, "none", bn.gen)
    shape = x0.shape[2:]
    value = bn.loss.per_example(bn.net, x0.reshape(-1, *shape), labels.reshape(-1),
                                t.reshape(-1), noise.reshape(-1, *shape)).mean()
    bn.opt.zero_grad(set_to_none=True)
    value.backward()
    bn.opt.step()


def step_ours(bn: Bench, engine: str = "vmap") -> None:
    """The real `noisy_gradient` (one micro-batch of B), then Adam, as in finetune."""
    step = DPStep(noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=float(bn.b),
                  physical_batch_size=bn.b, aug_multiplicity=bn.k, per_example=engine)
    draw_seed = int(torch.randint(0, 2**62, (1,), generator=bn.gen))
    grads = noisy_gradient(bn.net, bn.loss, bn.x, bn.y, torch.arange(bn.b), step,
                           keys=bn.keys, draw_seed=draw_seed, noise_generator=bn.noise_gen)
    for name, p in bn.net.named_parameters():
        p.grad = grads[name]
    bn.opt.step()
    bn.opt.zero_grad(set_to_none=True)


def opacus_grads(bn: Bench, x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of the K-averaged loss via Opacus hooks on B*K rows:
    name -> [B, *param.shape]. Leaves `grad_sample` set (the caller frees it)."""
    b, k, shape = x0.shape[0], x0.shape[1], x0.shape[2:]
    rows = bn.loss.per_example(bn.net, x0.reshape(-1, *shape), labels.reshape(-1),
                               t.reshape(-1), noise.reshape(-1, *shape))
    (rows.sum() / k).backward()  # row r's grad_sample = grad of its loss / K
    return {n: p.grad_sample.view(b, k, *p.shape).sum(1)  # = grad of the K-mean loss
            for n, p in bn.net._module.named_parameters()}


def step_opacus(bn: Bench) -> None:
    """DPDM-style: hooks on the K-replicated batch, average over K, clip, sum, noise."""
    x0, labels, t, noise = draw_copies(bn.loss, bn.x, bn.y, bn.k, "none", bn.gen)
    grads = opacus_grads(bn, x0, labels, t, noise)
    summed, _ = clipped_sum(grads, CLIP)
    noisy = gaussian_noise(summed, SIGMA * CLIP, bn.noise_gen)
    for (name, p) in bn.net._module.named_parameters():
        p.grad = (summed[name] + noisy[name]) / bn.b
        p.grad_sample = None
    bn.opt.step()
    bn.opt.zero_grad(set_to_none=True)


STEPS: dict[str, Callable[[Bench], None]] = {
    "nonprivate": step_nonprivate, "ours": step_ours, "opacus": step_opacus,
    "ours-sdpa": step_ours, "bookkeeping": functools.partial(step_ours, engine="bookkeeping")}


def setup(model: str, b: int, seed: int) -> tuple[torch.nn.Module, DenoisingLoss,
                                                   torch.Tensor, torch.Tensor]:
    image_size, model_cfg = model_for(model)
    spec = UNetSpec(image_size=image_size, channels=1, num_classes=NUM_CLASSES, model=model_cfg)
    torch.manual_seed(seed)
    net = build_unet(spec)
    loss = DenoisingLoss.from_config(DiffusionConfig(), spec.null_label)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((b, 1, image_size, image_size), generator=g) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
    return net, loss, x, y


def check_opacus_matches(base: torch.nn.Module, loss: DenoisingLoss, x: torch.Tensor,
                         y: torch.Tensor, k: int) -> float:
    """Max relative difference between Opacus's and our per-example gradients on the
    same draws: both baselines must compute the same quantity to be compared."""
    ours = make_bench("ours", base, loss, x[:4], y[:4], k, 0)
    theirs = make_bench("opacus", base, loss, x[:4], y[:4], k, 0)
    x0, labels, t, noise = draw_copies(loss, ours.x, ours.y, k, "none",
                                       torch.Generator().manual_seed(7))
    a, _ = per_example_grads(ours.net, loss, x0, labels, t, noise)
    o = opacus_grads(theirs, x0, labels, t, noise)
    num = max(float((a[n] - o[n]).abs().max()) for n in a)
    den = max(float(a[n].abs().max()) for n in a)
    return num / den


def time_steps(fn: Callable[[Bench], None], bn: Bench, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn(bn)
    return (time.perf_counter() - t0) / n


def benchmark(methods: tuple[str, ...], model: str, b: int, k: int, rounds: int,
              per_round: int, seed: int = 0) -> tuple[dict[str, list[float]], int, float]:
    """Seconds per step of each method, per round; methods alternate within each round
    (rotating the order) so that all see the same machine load."""
    base, loss, x, y = setup(model, b, seed)
    n_params = sum(p.numel() for p in base.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' full-backward-hook warning
        rel = check_opacus_matches(base, loss, x, y, k)
        if rel > 1e-3:
            raise RuntimeError(f"Opacus and per_example_grads disagree: rel. diff {rel:.2e}")
        benches = {m: make_bench(m, base, loss, x, y, k, seed) for m in methods}
        for m in methods:  # warm-up: allocator, oneDNN kernels, vmap/hook code paths
            time_steps(STEPS[m], benches[m], 2)
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(rounds):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                times[m].append(time_steps(STEPS[m], benches[m], per_round))
    return times, n_params, rel


# -- memory: one fresh subprocess per (method, K) ---------------------------------------

def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def trim_heap() -> None:
    """Give freed heap back to the kernel, so that `before` does not count the
    warm-up step's freed buffers (which the measured step would then reuse unseen)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM; Linux >= 4.0): importing torch
    peaks higher than a small step, so without a reset `ru_maxrss` hides the step."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> int:
    """VmHWM of this process (== ru_maxrss, but honours `reset_peak_rss`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def measure(method: str, model: str, b: int, k: int, seed: int = 0) -> dict:
    """Run in a child: peak RSS growth of one step after a warm-up step, and the bytes
    of the per-example gradient tensors the method holds at its peak."""
    base, loss, x, y = setup(model, b, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bn = make_bench(method, base, loss, x, y, k, seed)
        STEPS[method](bn)  # warm-up: Adam state, kernels, first-touch allocations
        trim_heap()
        before = current_rss_kib()
        reset = reset_peak_rss()
        STEPS[method](bn)
        peak = peak_rss_kib()
    n_params = sum(p.numel() for p in base.parameters())
    # per-example gradient tensors: ours holds one [B, *shape] gradient per parameter
    # (vmap over examples, K averaged inside); Opacus holds [B*K, *shape] grad_samples
    # plus the [B, *shape] K-sums; the non-private step holds none; book-keeping holds
    # per-example gradients of its instantiated layers only (not counted: see the RSS)
    rows = {"ours": b, "ours-sdpa": b, "opacus": b * k + b, "nonprivate": 0,
            "bookkeeping": None}[method]
    return {"peak_delta_kib": max(0, peak - before), "before_kib": before, "peak_kib": peak,
            "hwm_reset": reset,
            "grad_bytes": None if rows is None else rows * n_params * 4}


def measure_in_child(method: str, model: str, b: int, k: int, threads: int | None
                     ) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", method, "--k", str(k),
           "--b", str(b), "--models", model]
    if threads:
        cmd += ["--threads", str(threads)]
    # a fixed mmap threshold: glibc's dynamic one would serve big tensors from the heap
    # after the first free, where they stay resident and hide from the measured step
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {method} K={k} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- report -----------------------------------------------------------------------------

def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    return (max(xs) - min(xs)) / med(xs)


def format_time_table(times: dict[str, list[float]], b: int, k: int) -> str:
    floor = med(times["nonprivate"]) if "nonprivate" in times else None
    head = (f"{'method':<11} {'B':>3} {'K':>3} {'rows':>5} {'ms/step':>8} {'noise':>6} "
            f"{'x floor':>8} {'ours faster by':>15}")
    lines = [head, "-" * len(head)]
    for m, ts in times.items():
        ratio = f"{med(ts) / floor:>7.2f}x" if floor else f"{'-':>8}"
        faster = (f"{med(ts) / med(times['ours']):>14.2f}x"
                  if "ours" in times and m != "ours" else f"{'-':>15}")
        lines.append(f"{m:<11} {b:>3} {k:>3} {b * k:>5} {med(ts) * 1e3:>8.1f} "
                     f"{spread(ts):>6.0%} {ratio} {faster}")
    verdicts = []
    for m in ("ours", "bookkeeping"):
        if floor and m in times:
            r = med(times[m]) / floor
            verdicts.append(f"{m} / floor = {r:.2f}x (target <= {TARGET_OURS_OVER_FLOOR}x): "
                            f"{'ok' if r <= TARGET_OURS_OVER_FLOOR else 'MISSED'}")
    if "opacus" in times and "ours" in times:
        s = med(times["opacus"]) / med(times["ours"])
        verdicts.append(f"opacus / ours = {s:.2f}x (target >= {TARGET_SPEEDUP_OVER_OPACUS}x): "
                        f"{'ok' if s >= TARGET_SPEEDUP_OVER_OPACUS else 'MISSED'}")
    return "\n".join(lines + verdicts)


def format_mem_table(mem: dict[tuple[str, int], dict]) -> str:
    head = (f"{'method':<11} {'K':>3} {'peak RSS delta MiB':>19} {'x nonprivate':>13} "
            f"{'per-ex grads MiB':>17} {'process peak MiB':>17}")
    lines = [head, "-" * len(head)]
    for (m, k), r in mem.items():
        floor = mem.get(("nonprivate", k), {}).get("peak_delta_kib")
        ratio = f"{r['peak_delta_kib'] / floor:>12.2f}x" if floor else f"{'-':>13}"
        grads = f"{r['grad_bytes'] / 2**20:>17.1f}" if r["grad_bytes"] is not None else \
            f"{'-':>17}"
        lines.append(f"{m:<11} {k:>3} {r['peak_delta_kib'] / 1024:>19.1f} {ratio} {grads} "
                     f"{r['peak_kib'] / 1024:>17.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="B=4, 2 rounds, K in (1, 4) for memory: checks the script, not numbers")
    p.add_argument("--models", nargs="+", default=["smoke", "digits"], choices=MODELS,
                   help="smoke, digits: the configs' UNets at 8x8; default8: ModelConfig() "
                        "(1.11M params); unet16: a 0.69M-param UNet at 16x16")
    p.add_argument("--image-size", type=int, default=None, choices=(8, 16),
                   help="the former option: 8 = --models default8, 16 = --models unet16")
    p.add_argument("--b", type=int, default=None, help="examples per logical batch (16)")
    p.add_argument("--k", type=int, default=4, help="augmentation multiplicity K (4)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (median); default 7")
    p.add_argument("--per-round", type=int, default=3, help="steps per method per round")
    p.add_argument("--mem-ks", type=int, nargs="*", default=None,
                   help="K values of the memory table (default 1 4 16; none: skip it)")
    p.add_argument("--methods", nargs="+", default=["nonprivate", "ours", "bookkeeping", "opacus"],
                   choices=METHODS)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for everything (default: torch's choice)")
    p.add_argument("--measure", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    b = args.b or (4 if args.quick else 16)
    models = ([{8: "default8", 16: "unet16"}[args.image_size]] if args.image_size
              else args.models)
    if args.measure:  # child process of the memory table
        print(json.dumps(measure(args.measure, models[0], b, args.k)))
        return 0
    rounds = args.rounds or (2 if args.quick else 7)
    per_round = 1 if args.quick else args.per_round
    mem_ks = args.mem_ks if args.mem_ks is not None else ([1, 4] if args.quick else [1, 4, 16])
    methods = tuple(args.methods)

    for model in models:
        size, model_cfg = model_for(model)
        print(f"\n== {model}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; UNet at "
              f"{size}x{size}x1, {NUM_CLASSES} classes, "
              f"block_out_channels={model_cfg.block_out_channels}; "
              f"B={b}, K={args.k}, sigma={SIGMA}, C={CLIP}; median of {rounds} rounds x "
              f"{per_round} steps", flush=True)
        times, n_params, rel = benchmark(methods, model, b, args.k, rounds, per_round)
        print(f"{n_params / 1e6:.2f}M parameters; Opacus vs per_example_grads per-example "
              f"gradients: max rel. diff {rel:.1e}")
        print(format_time_table(times, b, args.k), flush=True)
        print(f"load average after timing: {os.getloadavg()[0]:.2f}", flush=True)

        if mem_ks:
            mem: dict[tuple[str, int], dict] = {}
            for k in mem_ks:  # the non-private row first: the ratios' reference
                for m in sorted(methods, key=lambda m: m != "nonprivate"):
                    mem[(m, k)] = measure_in_child(m, model, b, k, args.threads)
            print(f"peak memory of one step, B={b}, one fresh process per row "
                  "(VmHWM, reset just before the measured step, - RSS before it):")
            print(format_mem_table(mem), flush=True)
    print("ms/step: median over rounds; noise: (max - min) / median over rounds; x floor: "
          "time / non-private step on the B*K rows. per-ex grads: bytes of the per-example "
          "gradient tensors (ours B x params; opacus B*K x params grad_sample + B x params "
          "K-sums; bookkeeping: only its instantiated layers', not counted). x nonprivate: "
          "peak RSS delta / the non-private step's at the same K. Ratios within the noise "
          "are not measurable on this machine.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
