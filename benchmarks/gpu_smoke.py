"""GPU smoke check of the paper-scale model: one DP-SGD step and one sampling batch.

Builds the UNet of `configs/cifar10.yaml` (~80M parameters, random weights:
the cost does not depend on the values, and nothing is downloaded) on the GPU,
then times, with the config's K, timestep distribution and augmentation:

1. the real `dpsynth.privacy.dp_sgd.noisy_gradient` (per-example gradients of
   the K-averaged loss via torch.func.vmap, clipping, Gaussian noise) on one
   micro-batch, for growing physical batches until one does not fit: time,
   peak memory (`torch.cuda.max_memory_allocated`), examples/s;
2. a non-private training step on as many rows (forward, backward, AdamW): the
   pre-training step and the floor of the DP step's work;
3. one batch of `dpsynth.diffusion.samplers.sample` with the config's sampler,
   steps and batch size.

Then it extrapolates: seconds per logical DP step at the config's batch size
B (B / b micro-batches of the physical batch b with the best examples/s among
those that fit, plus one noise draw), and hours for the config's fine-tuning,
pre-training and sampling on 1 and 8 GPUs (ideal data parallelism: `dpsynth
finetune` under torchrun adds the noise once, on rank 0). docs/scale.md
explains the model behind these numbers and holds those measured on an H200.

Usage:
    python benchmarks/gpu_smoke.py                      # configs/cifar10.yaml, on CUDA, < 5 min
    python benchmarks/gpu_smoke.py --cpu --quick        # tiny sizes on the CPU: checks the script
    python benchmarks/gpu_smoke.py --physical 8 16 32   # physical batches to try, ascending
    python benchmarks/gpu_smoke.py --json smoke.json    # also write the numbers as JSON
    python benchmarks/gpu_smoke.py --head-dim 64        # what if: 6 heads of 64, not 48 of 8
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/gpu_smoke.py --cpu --config params.yaml \
        --physical 64 --repeats 3                       # the digits model on the CPU

Exit code: 0 if it ran; 2 if CUDA is absent (and --cpu not given); 1 if it took
longer than --limit-s (default 300 s) or the step produced non-finite gradients.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without `pip install`

from dpsynth.config import Config, ModelConfig, load  # noqa: E402
from dpsynth.diffusion.cost import unet_cost  # noqa: E402
from dpsynth.diffusion.loss import DenoisingLoss, make_noise_schedule  # noqa: E402
from dpsynth.diffusion.samplers import make_sampler, sample  # noqa: E402
from dpsynth.diffusion.unet import UNetSpec, build_unet  # noqa: E402
from dpsynth.privacy.dp_sgd import DPStep, gaussian_noise, noisy_gradient  # noqa: E402
from dpsynth.privacy.draws import draw_for_examples, record_keys  # noqa: E402
from dpsynth.privacy.per_example import use_vmap_friendly_attention  # noqa: E402

GIB = 2**30
QUICK_MODEL = ModelConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(1,),
                          norm_num_groups=8)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to build and time (the config's values, or tiny ones with --quick)."""

    spec: UNetSpec
    k: int  # augmentation multiplicity
    physical: tuple[int, ...]  # physical batches to try, ascending
    sample_batch: int
    sample_steps: int
    repeats: int


def make_plan(cfg: Config, args: argparse.Namespace) -> Plan:
    d, fc, sc = cfg.data, cfg.finetune, cfg.sample
    if args.quick:
        return Plan(UNetSpec(d.image_size, d.channels, args.classes, QUICK_MODEL), k=2,
                    physical=tuple(args.physical or (2, 4)), sample_batch=4, sample_steps=2,
                    repeats=1)
    return Plan(UNetSpec(d.image_size, d.channels, args.classes, cfg.model),
                k=fc.aug_multiplicity, physical=tuple(args.physical or (8, 16, 32, 64)),
                sample_batch=sc.batch_size, sample_steps=sc.num_inference_steps,
                repeats=args.repeats)


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_peak_reset() -> int | None:
    """Linux: give freed heap back (malloc_trim), reset the RSS high-water mark;
    returns the RSS (KiB) to measure from. Run with MALLOC_MMAP_THRESHOLD_=131072
    so that large freed buffers leave the process (docs/benchmarks.md)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return None
    return _proc_status_kib("VmRSS")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def dp_step(net: torch.nn.Module, loss: DenoisingLoss, plan: Plan, b: int, cfg: Config,
            device: torch.device) -> dict[str, Any]:
    """Time `noisy_gradient` on one micro-batch of b examples x K copies."""
    spec, fc = plan.spec, cfg.finetune
    g = torch.Generator().manual_seed(b)
    x = torch.rand(b, spec.channels, spec.image_size, spec.image_size, generator=g) * 2 - 1
    y = torch.randint(0, spec.num_classes, (b,), generator=g)
    indices = torch.arange(b)
    keys = record_keys(x, y)
    step = DPStep(noise_multiplier=1.0, max_grad_norm=fc.max_grad_norm,
                  expected_batch_size=float(b), physical_batch_size=b,
                  aug_multiplicity=plan.k, augment=fc.augment)

    def once() -> dict[str, torch.Tensor]:
        return noisy_gradient(net, loss, x, y, indices, step, keys=keys,
                              draw_seed=int(torch.randint(0, 2**62, (1,), generator=g)),
                              noise_generator=torch.Generator().manual_seed(1))

    once()  # warm-up: cuDNN algorithm choice, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:  # CPU: the process's peak RSS during the steps, over its RSS before them
        rss_before = cpu_peak_reset()
        base = 0
    times, grads = [], {}
    for _ in range(plan.repeats):
        seconds, grads = timed(once, device)
        times.append(seconds)
    finite = all(bool(torch.isfinite(v).all()) for v in grads.values())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        hwm = _proc_status_kib("VmHWM")
        peak = (hwm - rss_before) * 1024 if hwm and rss_before else 0
    # the CPU-side parts, timed alone: the per-example draws and the noise
    draw_s, _ = timed(lambda: draw_for_examples(loss, x, y, keys, plan.k, fc.augment, 7),
                      torch.device("cpu"))
    noise_s, _ = timed(lambda: gaussian_noise(grads, 1.0, torch.Generator().manual_seed(2)),
                       device)
    del grads
    seconds = statistics.median(times)
    # a call draws the noise once; a logical step of B examples makes B/b micro-batches
    # and draws it once, so the micro-batch's own cost is the call's minus the noise
    micro = max(seconds - noise_s, 1e-9)
    return {"physical_batch": b, "rows": b * plan.k, "seconds": seconds,
            "micro_batch_seconds": micro, "examples_per_s": b / micro, "peak_gib": peak / GIB,
            "step_extra_gib": (peak - base) / GIB, "draw_seconds": draw_s,
            "noise_seconds": noise_s, "finite": finite}


def plain_step(net: torch.nn.Module, loss: DenoisingLoss, plan: Plan, rows: int,
               device: torch.device) -> float:
    """A non-private AdamW step on `rows` images: the pre-training step."""
    spec = plan.spec
    g = torch.Generator().manual_seed(rows)
    x = (torch.rand(rows, spec.channels, spec.image_size, spec.image_size, generator=g) * 2
         - 1).to(device)
    y = torch.randint(0, spec.num_classes, (rows,), generator=g).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-9)

    def once() -> None:
        opt.zero_grad(set_to_none=True)
        loss(net, x, y, g).mean().backward()
        opt.step()

    once()
    seconds = statistics.median(timed(once, device)[0] for _ in range(plan.repeats))
    opt.zero_grad(set_to_none=True)
    del opt
    return seconds


def sampling_batch(net: torch.nn.Module, plan: Plan, cfg: Config,
                   device: torch.device) -> dict[str, Any]:
    """One batch of `sample` with the config's sampler and steps (after a 2-step warm-up)."""
    schedule = make_noise_schedule(cfg.diffusion)
    labels = (torch.arange(plan.sample_batch) % plan.spec.num_classes).to(device)
    shape = (plan.spec.channels, plan.spec.image_size, plan.spec.image_size)
    net.eval()

    def run(steps: int) -> torch.Tensor:
        return sample(net, make_sampler(cfg.sample.sampler, schedule), labels, shape,
                      num_inference_steps=steps, guidance_scale=cfg.sample.guidance_scale,
                      null_label=plan.spec.null_label, generator=torch.Generator().manual_seed(0),
                      eta=cfg.sample.eta)

    run(2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, images = timed(lambda: run(plan.sample_steps), device)
    net.train()
    return {"batch": plan.sample_batch, "sampler": cfg.sample.sampler,
            "steps": plan.sample_steps, "seconds": seconds,
            "images_per_s": plan.sample_batch / seconds,
            "peak_gib": (torch.cuda.max_memory_allocated(device) / GIB
                         if device.type == "cuda" else 0.0),
            "finite": bool(torch.isfinite(images).all())}


def extrapolate(cfg: Config, plan: Plan, best: dict[str, Any], plain_s: float,
                sampled: dict[str, Any], flops_train: float) -> dict[str, Any]:
    """Seconds per logical DP step at the config's B, and hours on 1 and 8 GPUs."""
    fc, pc, sc = cfg.finetune, cfg.pretrain, cfg.sample
    b = best["physical_batch"]
    logical_s = fc.batch_size / b * best["micro_batch_seconds"] + best["noise_seconds"]
    rows_per_s_plain = best["rows"] / plain_s
    pretrain_s = pc.steps * pc.batch_size / rows_per_s_plain
    finetune_s = fc.steps * logical_s
    sample_s = sc.num_samples / sampled["images_per_s"]
    hours = 1 / 3600
    return {
        "logical_batch": fc.batch_size, "aug_multiplicity": plan.k,
        "seconds_per_logical_step": logical_s,
        "dp_tflops_achieved": flops_train * fc.batch_size * plan.k / logical_s / 1e12,
        "dp_over_nonprivate": best["micro_batch_seconds"] / plain_s,
        "finetune_steps": fc.steps,
        "finetune_hours_1gpu": finetune_s * hours, "finetune_hours_8gpu": finetune_s * hours / 8,
        "pretrain_steps": pc.steps, "pretrain_batch": pc.batch_size,
        "pretrain_hours_1gpu": pretrain_s * hours, "pretrain_hours_8gpu": pretrain_s * hours / 8,
        "num_samples": sc.num_samples,
        "sample_hours_1gpu": sample_s * hours, "sample_hours_8gpu": sample_s * hours / 8,
    }


def set_head_dim(net: torch.nn.Module, head_dim: int) -> None:
    """Re-split every attention layer's channels into heads of `head_dim` (the
    projections, hence the parameters, are unchanged; only the score matrices are:
    one [tokens, tokens] matrix per head and image)."""
    from diffusers.models.attention_processor import Attention

    for m in net.modules():
        if isinstance(m, Attention):
            m.heads, m.scale = max(1, m.inner_dim // head_dim), head_dim ** -0.5


def memory_fit(steps: list[dict[str, Any]], total_gib: float) -> dict[str, Any] | None:
    """Peak memory as a line in the physical batch (least squares over the measured
    batches) and the largest batch that fits in 90% of the GPU: the physical limit."""
    if total_gib <= 0 or len(steps) < 2:
        return None
    xs = [s["physical_batch"] for s in steps]
    ys = [s["peak_gib"] for s in steps]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
             / sum((x - mx) ** 2 for x in xs))
    intercept = my - slope * mx
    return {"gib_per_example": slope, "intercept_gib": intercept,
            "max_physical_batch": int((0.9 * total_gib - intercept) // slope)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar10.yaml"))
    parser.add_argument("--classes", type=int, default=10, help="label count (CIFAR-10: 10)")
    parser.add_argument("--physical", type=int, nargs="+",
                        help="physical batches (examples) to try, ascending; the largest "
                             "that fits is used (default 8 16 32 64; --quick: 2 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per measurement")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and sizes: checks that the script runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--limit-s", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    # what-if knobs (not settings the stages have): they show what a change would buy
    parser.add_argument("--head-dim", type=int,
                        help="what if: attention heads of this width (the stages' UNet uses 8, "
                             "so 48 heads of the 384 channels at 16x16); same parameters")
    parser.add_argument("--tf32", action="store_true",
                        help="what if: TF32 matmuls too (PyTorch's default is TF32 for "
                             "convolutions only)")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    if args.cpu:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (torch.cuda.is_available() is False). Run it on a "
              "machine with an NVIDIA GPU and a CUDA build of PyTorch, or check the script "
              "itself here with --cpu --quick.", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
    cfg = load(args.config)
    plan = make_plan(cfg, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    total_gib = (torch.cuda.get_device_properties(device).total_memory / GIB
                 if device.type == "cuda" else 0.0)
    print(f"gpu_smoke: {args.config} on {name}" + (f" ({total_gib:.0f} GiB)" if total_gib else "")
          + (" [--quick: tiny model]" if args.quick else ""))
    if device.type == "cuda":
        print(f"  torch {torch.__version__}, TF32 convolutions "
              f"{torch.backends.cudnn.allow_tf32}, TF32 matmuls "
              f"{torch.backends.cuda.matmul.allow_tf32} "
              + ("(--tf32: what if)" if args.tf32 else "(PyTorch defaults, as the stages run)"))

    torch.manual_seed(0)
    net = build_unet(plan.spec)  # on the CPU, as the stages build it, then moved
    num_params = sum(p.numel() for p in net.parameters())
    if args.head_dim:
        set_head_dim(net, args.head_dim)
        print(f"  what if: attention heads of width {args.head_dim}")
    net.to(device).train()
    use_vmap_friendly_attention(net)  # as `dpsynth finetune` does
    cost = unet_cost(plan.spec)  # the count `dpsynth plan` uses (meta device)
    flops_fwd, flops_train = cost.forward_flops, cost.train_flops
    print(f"  model: {num_params:,} parameters; {flops_fwd / 1e9:.2f} GFLOP forward, "
          f"{flops_train / 1e9:.2f} GFLOP forward+backward per image "
          f"({plan.spec.image_size}x{plan.spec.image_size}x{plan.spec.channels})")
    print(f"  per-example gradient: {num_params * 4 / GIB:.3f} GiB (float32)")

    loss = DenoisingLoss.from_config(
        dataclasses.replace(cfg.diffusion, timesteps=cfg.finetune.timesteps), plan.spec.null_label)
    steps: list[dict[str, Any]] = []
    oom_at = None
    for b in plan.physical:
        try:
            r = dp_step(net, loss, plan, b, cfg, device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if "out of memory" not in str(err).lower():
                raise
            oom_at = b
            torch.cuda.empty_cache()
            print(f"  DP step, physical batch {b} x K={plan.k}: out of memory")
            break
        steps.append(r)
        memory = (f", peak {r['peak_gib']:.1f} GiB (+{r['step_extra_gib']:.1f} over the model)"
                  if device.type == "cuda" else
                  f", peak RSS +{r['peak_gib'] * 1024:.0f} MiB over the step's start")
        print(f"  DP step, physical batch {b} x K={plan.k} = {r['rows']} rows: "
              f"{r['seconds']:.3f} s = {r['micro_batch_seconds']:.3f} s for the micro-batch "
              f"({r['examples_per_s']:.1f} examples/s; its CPU draws {r['draw_seconds']:.3f} s) "
              f"+ {r['noise_seconds']:.3f} s for the noise (once per logical step){memory}"
              + ("" if r["finite"] else "  NON-FINITE GRADIENTS"))
        if time.perf_counter() - t_start > args.limit_s / 2:
            print("  (stopping the physical-batch search: half the time limit is spent)")
            break
    if not steps:
        print(f"gpu_smoke: FAIL: not even a physical batch of {plan.physical[0]} fits")
        return 1
    best = max(steps, key=lambda r: r["examples_per_s"])  # the largest batch is not always fastest
    plain_s = plain_step(net, loss, plan, best["rows"], device)
    print(f"  non-private step on the same {best['rows']} rows (pre-training's step): "
          f"{plain_s:.3f} s -> the DP micro-batch costs "
          f"{best['micro_batch_seconds'] / plain_s:.2f}x")
    sampled = sampling_batch(net, plan, cfg, device)
    print(f"  sampling: {sampled['batch']} images, {sampled['sampler']} x {sampled['steps']} "
          f"steps: {sampled['seconds']:.2f} s, {sampled['images_per_s']:.1f} images/s"
          + (f", peak {sampled['peak_gib']:.1f} GiB" if device.type == "cuda" else ""))

    ex = extrapolate(cfg, plan, best, plain_s, sampled, flops_train)
    ex["largest_physical_batch"] = steps[-1]["physical_batch"]
    limit = (f"largest physical batch that fit: {steps[-1]['physical_batch']}"
             + (f" ({oom_at} ran out of memory)" if oom_at else " (no larger one tried)"))
    fit = memory_fit(steps, total_gib)
    if fit:
        ex["memory_fit"] = fit
        limit += (f"; peak memory ~ {fit['intercept_gib']:.1f} GiB + {fit['gib_per_example']:.2f} "
                  f"GiB per example (x K={plan.k} rows), so ~{fit['max_physical_batch']} "
                  f"examples fit in 90% of {total_gib:.0f} GiB")
    print(f"  {limit}")
    unit, units = ("GPU", "GPUs") if device.type == "cuda" else ("CPU process", "CPU processes")
    print(f"extrapolated (physical batch {best['physical_batch']}, the fastest per example; "
          f"ideal scaling over {units}):")
    print(f"  DP fine-tuning: {ex['seconds_per_logical_step']:.1f} s per logical step of "
          f"B={ex['logical_batch']} x K={ex['aug_multiplicity']} "
          f"({ex['dp_tflops_achieved']:.3g} TFLOP/s achieved); {ex['finetune_steps']} steps = "
          f"{ex['finetune_hours_1gpu']:.1f} h on 1 {unit}, {ex['finetune_hours_8gpu']:.1f} h on 8")
    print(f"  pre-training: {ex['pretrain_steps']} steps x {ex['pretrain_batch']} = "
          f"{ex['pretrain_hours_1gpu']:.1f} h on 1 {unit} ({ex['pretrain_hours_8gpu']:.1f} h on "
          "8 with data parallelism, which `dpsynth pretrain` does not have)")
    print(f"  sampling {ex['num_samples']:,} images: {ex['sample_hours_1gpu']:.2f} h on 1 {unit}, "
          f"{ex['sample_hours_8gpu']:.2f} h on 8 (shards fan out)")

    wall = time.perf_counter() - t_start
    ok = wall <= args.limit_s and all(s["finite"] for s in steps) and sampled["finite"]
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "device_gib": total_gib, "config": args.config, "quick": args.quick,
            "torch": torch.__version__, "num_params": num_params,
            "gflop_forward": flops_fwd / 1e9, "gflop_train": flops_train / 1e9,
            "dp_steps": steps, "oom_at": oom_at, "nonprivate_seconds": plain_s,
            "sampling": sampled, "extrapolated": ex, "wall_seconds": wall, "ok": ok},
            indent=2) + "\n")
    verdict = "ok" if ok else ("FAIL: over the time limit" if wall > args.limit_s
                               else "FAIL: non-finite values")
    print(f"gpu_smoke: {verdict} ({wall:.0f} s, limit {args.limit_s:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
