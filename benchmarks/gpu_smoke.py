"""GPU smoke check of the paper-scale model: one DP-SGD step and one sampling batch.

Builds the UNet of `configs/cifar10.yaml` (~80M parameters, random weights:
the cost does not depend on the values, and nothing is downloaded) on the GPU,
then times, with the config's K, timestep distribution and augmentation:

1. the real `dpsynth.privacy.dp_sgd.noisy_gradient` (per-example gradients of
   the K-averaged loss, clipping, Gaussian noise) on one micro-batch, with the
   config's per-example engine (`finetune.per_example`: vmap, or book-keeping
   with fused SDPA attention) and precision (`finetune.precision`), or those of
   --engine / --precision, for growing physical batches until one does not fit:
   time, peak memory (`torch.cuda.max_memory_allocated`), examples/s;
2. a non-private training step on as many rows (forward, backward, AdamW) in
   the same precision: the pre-training step and the floor of the DP step's work;
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
    python benchmarks/gpu_smoke.py --engine bookkeeping --precision bf16 --physical 16 32 48
    python benchmarks/gpu_smoke.py --set model.attention_head_dim=64   # 6 heads of 64, not 48 of 8
    python benchmarks/gpu_smoke.py --check              # also: the engines agree on this model
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/gpu_smoke.py --cpu --config params.yaml \
        --physical 64 --repeats 3                       # the digits model on the CPU

Exit code: 0 if it ran; 2 if CUDA is absent (and --cpu not given); 1 if it took
longer than --limit-s (default 300 s), the step produced non-finite gradients,
or (--check) the book-keeping engine's norms and clipped sum are off the vmap
reference's on this model (float32: 1e-2 relative, allowing for TF32
convolutions; bf16: 5e-2).
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
from dpsynth.privacy import bookkeeping  # noqa: E402
from dpsynth.privacy.draws import draw_copies  # noqa: E402
from dpsynth.privacy.per_example import clipped_sum, per_example_grads  # noqa: E402
from dpsynth.training.precision import autocast  # noqa: E402
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
    engine: str  # finetune.per_example
    precision: str  # finetune.precision


def make_plan(cfg: Config, args: argparse.Namespace) -> Plan:
    d, fc, sc = cfg.data, cfg.finetune, cfg.sample
    engine, precision = args.engine or fc.per_example, args.precision or fc.precision
    if args.quick:
        return Plan(UNetSpec(d.image_size, d.channels, args.classes, QUICK_MODEL), k=2,
                    physical=tuple(args.physical or (2, 4)), sample_batch=4, sample_steps=2,
                    repeats=1, engine=engine, precision=precision)
    return Plan(UNetSpec(d.image_size, d.channels, args.classes, cfg.model),
                k=fc.aug_multiplicity, physical=tuple(args.physical or (8, 16, 32, 64)),
                sample_batch=sc.batch_size, sample_steps=sc.num_inference_steps,
                repeats=args.repeats, engine=engine, precision=precision)


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
                  aug_multiplicity=plan.k, augment=fc.augment, per_example=plan.engine,
                  precision=plan.precision)

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
               device: torch.device) -> tuple[float, float]:
    """A non-private AdamW step on `rows` images in the plan's precision: the
    pre-training step (`training.gradients.MeanLossGradient`'s autocast).

    Returns:
        (median seconds, peak GiB on a GPU (0.0 on the CPU)).
    """
    spec = plan.spec
    g = torch.Generator().manual_seed(rows)
    x = (torch.rand(rows, spec.channels, spec.image_size, spec.image_size, generator=g) * 2
         - 1).to(device)
    y = torch.randint(0, spec.num_classes, (rows,), generator=g).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-9)

    def once() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(plan.precision, device):
            value = loss(net, x, y, g).mean()
        value.backward()
        opt.step()

    once()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = statistics.median(timed(once, device)[0] for _ in range(plan.repeats))
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    opt.zero_grad(set_to_none=True)
    del opt
    return seconds, peak


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
                sampled: dict[str, Any] | None, flops_train: float) -> dict[str, Any]:
    """Seconds per logical DP step at the config's B, and hours on 1 and 8 GPUs."""
    fc, pc, sc = cfg.finetune, cfg.pretrain, cfg.sample
    b = best["physical_batch"]
    logical_s = fc.batch_size / b * best["micro_batch_seconds"] + best["noise_seconds"]
    rows_per_s_plain = best["rows"] / plain_s
    pretrain_s = pc.steps * pc.batch_size / rows_per_s_plain
    finetune_s = fc.steps * logical_s
    hours = 1 / 3600
    sampling = {} if sampled is None else {
        "num_samples": sc.num_samples,
        "sample_hours_1gpu": sc.num_samples / sampled["images_per_s"] * hours,
        "sample_hours_8gpu": sc.num_samples / sampled["images_per_s"] * hours / 8}
    return {**sampling,
        "logical_batch": fc.batch_size, "aug_multiplicity": plan.k,
        "seconds_per_logical_step": logical_s,
        "dp_tflops_achieved": flops_train * fc.batch_size * plan.k / logical_s / 1e12,
        "dp_over_nonprivate": best["micro_batch_seconds"] / plain_s,
        "finetune_steps": fc.steps,
        "finetune_hours_1gpu": finetune_s * hours, "finetune_hours_8gpu": finetune_s * hours / 8,
        "pretrain_steps": pc.steps, "pretrain_batch": pc.batch_size,
        "pretrain_hours_1gpu": pretrain_s * hours, "pretrain_hours_8gpu": pretrain_s * hours / 8,
    }


def check_engines(net: torch.nn.Module, loss: DenoisingLoss, plan: Plan, cfg: Config,
                  device: torch.device) -> dict[str, Any]:
    """The book-keeping engine against the vmap reference on this model and device:
    per-example norms and the clipped sum (as one vector) of 2 examples x K=4, at
    a C that clips one and not the other; float32 and bf16. In eval mode: dropout
    (the paper model has 0.1) draws other masks in each engine."""
    import copy

    was_training = net.training
    net.eval()
    spec = plan.spec
    g = torch.Generator().manual_seed(11)
    x = torch.rand(2, spec.channels, spec.image_size, spec.image_size, generator=g) * 2 - 1
    y = torch.randint(0, spec.num_classes, (2,), generator=g)
    draws = [d.to(device) for d in draw_copies(loss, x, y, 4, cfg.finetune.augment, g)]
    ref_net = copy.deepcopy(net)
    use_vmap_friendly_attention(ref_net)
    grads, _ = per_example_grads(ref_net, loss, *draws)
    _, norms = clipped_sum(grads, 1.0)
    c = float(norms.mean())  # between the two norms
    ref, norms = clipped_sum(grads, c)
    del grads, ref_net
    flat_ref = torch.cat([v.reshape(-1).double() for v in ref.values()])
    out: dict[str, Any] = {"norms_vmap": norms.tolist(), "clip": c}
    for precision in ("fp32", "bf16"):
        got, got_norms = bookkeeping.clipped_sum(net, loss, *draws, c, precision=precision)
        flat = torch.cat([got[n].reshape(-1).double() for n in ref])
        out[precision] = {
            "norms": got_norms.tolist(),
            "norm_rel_err": float(((got_norms - norms).abs() / norms).max()),
            "sum_rel_err": float((flat - flat_ref).norm() / flat_ref.norm())}
    out["ok"] = (max(out["fp32"]["norm_rel_err"], out["fp32"]["sum_rel_err"]) <= 1e-2
                 and max(out["bf16"]["norm_rel_err"], out["bf16"]["sum_rel_err"]) <= 5e-2)
    net.train(was_training)
    return out


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


def profile_step(net: torch.nn.Module, loss: DenoisingLoss, plan: Plan, b: int, cfg: Config,
                 device: torch.device, rows: int) -> None:
    """The kernels of one DP micro-batch of b examples, by device time."""
    from torch.profiler import ProfilerActivity, profile

    once_plan = dataclasses.replace(plan, repeats=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        dp_step(net, loss, once_plan, b, cfg, device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"  profile of dp_step(b={b}) (warm-up and one timed call), top {rows} by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def loss_for(cfg: Config, plan: Plan) -> DenoisingLoss:
    """Fine-tuning's loss (its timestep distribution)."""
    return DenoisingLoss.from_config(
        dataclasses.replace(cfg.diffusion, timesteps=cfg.finetune.timesteps), plan.spec.null_label)


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
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field, as `dpsynth "
                        "--set` (e.g. model.attention_head_dim=64)")
    parser.add_argument("--engine", choices=("vmap", "bookkeeping"),
                        help="per-example engine (default: the config's finetune.per_example)")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="DP and non-private step precision (default: finetune.precision)")
    parser.add_argument("--no-sampling", action="store_true", help="skip the sampling batch")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N kernels that take the most device time in one "
                             "DP micro-batch (torch.profiler)")
    parser.add_argument("--check", action="store_true",
                        help="also compare the book-keeping engine with vmap on this model")
    # what-if knobs (not settings the stages have): they show what a change would buy
    parser.add_argument("--channels-last", action="store_true",
                        help="what if: channels-last (NHWC) weights, hence activations")
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
    cfg = load(args.config, args.overrides)
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
    net.to(device).train()
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
        print("  what if: channels-last weights and activations")
    check = check_engines(net, loss_for(cfg, plan), plan, cfg, device) if args.check else None
    if plan.engine == "vmap":
        use_vmap_friendly_attention(net)  # as `dpsynth finetune` does: no vmap rule for SDPA
    print(f"  DP step: per-example engine {plan.engine}, precision {plan.precision}, "
          f"attention heads of {cfg.model.attention_head_dim} channels"
          + (" (fused SDPA)" if plan.engine == "bookkeeping" else " (classic attention)"))
    if check:
        print(f"  engines on this model (2 examples x K=4, C between their norms): "
              f"book-keeping vs vmap, relative error of the norms / the clipped sum: "
              f"float32 {check['fp32']['norm_rel_err']:.1e} / {check['fp32']['sum_rel_err']:.1e}, "
              f"bf16 {check['bf16']['norm_rel_err']:.1e} / {check['bf16']['sum_rel_err']:.1e}"
              + ("" if check["ok"] else "  OFF THE REFERENCE"))
    cost = unet_cost(plan.spec)  # the count `dpsynth plan` uses (meta device)
    flops_fwd, flops_train = cost.forward_flops, cost.train_flops
    print(f"  model: {num_params:,} parameters; {flops_fwd / 1e9:.2f} GFLOP forward, "
          f"{flops_train / 1e9:.2f} GFLOP forward+backward per image "
          f"({plan.spec.image_size}x{plan.spec.image_size}x{plan.spec.channels})")
    print(f"  per-example gradient: {num_params * 4 / GIB:.3f} GiB (float32)")

    loss = loss_for(cfg, plan)
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
    plain_s, plain_gib = plain_step(net, loss, plan, best["rows"], device)
    print(f"  non-private step on the same {best['rows']} rows (pre-training's step): "
          f"{plain_s:.3f} s -> the DP micro-batch costs "
          f"{best['micro_batch_seconds'] / plain_s:.2f}x"
          + (f"; peak {plain_gib:.1f} GiB -> the DP step's peak is "
             f"{best['peak_gib'] / plain_gib:.2f}x" if plain_gib else ""))
    if args.profile:
        profile_step(net, loss, plan, best["physical_batch"], cfg, device, args.profile)
    sampled = None if args.no_sampling else sampling_batch(net, plan, cfg, device)
    if sampled:
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
          f"{ex['pretrain_hours_1gpu']:.1f} h on 1 {unit}, {ex['pretrain_hours_8gpu']:.1f} h on "
          "8 (data parallel under torchrun)")
    if sampled:
        print(f"  sampling {ex['num_samples']:,} images: {ex['sample_hours_1gpu']:.2f} h on 1 "
              f"{unit}, {ex['sample_hours_8gpu']:.2f} h on 8 (shards fan out)")

    wall = time.perf_counter() - t_start
    ok = (wall <= args.limit_s and all(s["finite"] for s in steps)
          and (sampled is None or sampled["finite"])
          and (check is None or check["ok"]))
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "device_gib": total_gib, "config": args.config, "quick": args.quick,
            "torch": torch.__version__, "num_params": num_params, "engine": plan.engine,
            "precision": plan.precision, "attention_head_dim": cfg.model.attention_head_dim,
            "channels_last": args.channels_last,
            "engine_check": check,
            "gflop_forward": flops_fwd / 1e9, "gflop_train": flops_train / 1e9,
            "dp_steps": steps, "oom_at": oom_at, "nonprivate_seconds": plain_s,
            "nonprivate_peak_gib": plain_gib,
            "sampling": sampled, "extrapolated": ex, "wall_seconds": wall, "ok": ok},
            indent=2) + "\n")
    verdict = "ok" if ok else ("FAIL: over the time limit" if wall > args.limit_s
                               else "FAIL: the engines disagree" if check and not check["ok"]
                               else "FAIL: non-finite values")
    print(f"gpu_smoke: {verdict} ({wall:.0f} s, limit {args.limit_s:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
