"""Pre-training and DP fine-tuning under torchrun on a GPU: NCCL, one worker.

The check issue 17 asks of a lent GPU: `dpsynth pretrain` and `dpsynth
finetune`, as a cluster job's worker runs them (`torchrun`, one process per
GPU), here with one worker, so that the process group of one runs its
collectives through NCCL (the gradient all-reduce, the noise added once). It
compares the result with the same stages in one plain process on the same GPU:
the same privacy.json (epsilon, sigma, q, steps) and the same weights up to
the GPU's non-deterministic kernels. Small model and data (the embedded
digits), a few hundred steps: under a minute on an H200.

Usage:
    python benchmarks/gpu_torchrun.py                 # on CUDA; exit 2 without it
    python benchmarks/gpu_torchrun.py --cpu           # the same with gloo: checks the script
    python benchmarks/gpu_torchrun.py --set finetune.per_example=vmap --set finetune.precision=fp32

Prints the wall time of each run, the process group's backend and what was
compared; exit 1 if the runs differ.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without `pip install`

SETTINGS = [  # the default digits model; short runs
    "pretrain.steps=100", "pretrain.batch_size=128", "pretrain.warmup_steps=20",
    "pretrain.checkpoint_every=50", "pretrain.log_every=50", "pretrain.precision=bf16",
    "finetune.steps=4", "finetune.batch_size=128", "finetune.physical_batch_size=64",
    "finetune.aug_multiplicity=4", "finetune.noise_seed=11", "finetune.checkpoint_every=4",
    "finetune.log_every=4", "finetune.per_example=bookkeeping", "finetune.precision=bf16",
    "tracking.enabled=false"]


def worker(cfg_path: str, data: str, out: str, device: str) -> None:
    """One process's pretrain + finetune (in torchrun, or alone)."""
    import torch.distributed as dist

    from dpsynth import config
    from dpsynth.stages import finetune, pretrain
    from dpsynth.tracking import NullTracker

    cfg, data_dir, out_dir = config.load(cfg_path), Path(data), Path(out)
    print(f"worker: pre-training on {device}", flush=True)
    t0 = time.perf_counter()
    pretrain.run(cfg, public_dir=data_dir / "public", out_dir=out_dir / "pre",
                 tracker=NullTracker(), device=device)
    t1 = time.perf_counter()
    print("worker: DP fine-tuning", flush=True)
    finetune.run(cfg, model_dir=out_dir / "pre", private_dir=data_dir / "private",
                 public_dir=data_dir / "public", out_dir=out_dir / "dp", tracker=NullTracker(),
                 device=device)
    t2 = time.perf_counter()
    backend = dist.get_backend() if dist.is_initialized() else None
    (out_dir / "run.json").write_text(json.dumps(
        {"backend": backend, "pretrain_s": t1 - t0, "finetune_s": t2 - t1}))


def max_difference(a: Path, b: Path) -> tuple[float, float]:
    """(largest absolute weight difference, largest weight) of two model folders."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    return diff, max(float(v.abs().max()) for v in wa.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting of the runs")
    parser.add_argument("--timeout-s", type=float, default=100.0, help="per run")
    parser.add_argument("--worker", nargs=4, metavar=("CONFIG", "DATA", "OUT", "DEVICE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    import numpy as np
    import torch
    import yaml
    from sklearn.datasets import load_digits

    from dpsynth import config
    from dpsynth.io.shards import write_dataset

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_torchrun: no CUDA device; run it where there is one, or check the "
              "script here with --cpu", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    with TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        d = load_digits()
        images = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
        classes = [str(k) for k in range(10)]
        write_dataset(tmp / "data" / "public", images[:800], d.target[:800], classes, "digits")
        write_dataset(tmp / "data" / "private", images[800:], d.target[800:], classes, "digits")
        env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        env.pop("MLFLOW_TRACKING_URI", None)
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # one machine: loopback
            env.setdefault(name, "lo")
        runs = {}
        for name, launcher in (("one process", []),
                               ("torchrun, 1 worker", [
                                   "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node", "1"])):
            out = tmp / name.split(",")[0].replace(" ", "-")
            cfg = config.from_dict({}, [*SETTINGS, *args.overrides,
                                        f"privacy.ledger_dir={out / 'ledger'}"])
            cfg_path = tmp / f"{out.name}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
            command = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker",
                       str(cfg_path), str(tmp / "data"), str(out), device]
            t0 = time.perf_counter()
            log = tmp / f"{out.name}.log"
            with open(log, "w") as f:  # its own process group: a timeout ends its workers too
                proc = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                try:
                    rc: int | str = proc.wait(timeout=args.timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = f"timed out after {args.timeout_s:.0f} s"
            if rc:
                print(f"gpu_torchrun: {name} failed ({rc}); its output's end:\n"
                      f"{log.read_text()[-4000:]}")
                return 1
            runs[name] = {**json.loads((out / "run.json").read_text()),
                          "wall_s": time.perf_counter() - t0, "out": out}
            r = runs[name]
            print(f"  {name}: process group {r['backend']}; pre-training {r['pretrain_s']:.1f} s, "
                  f"DP fine-tuning {r['finetune_s']:.1f} s ({r['wall_s']:.1f} s in all)")
        one, tr = runs["one process"], runs["torchrun, 1 worker"]
        privacy = [json.loads((r["out"] / "dp" / "privacy.json").read_text()) for r in (one, tr)]
        same_privacy = privacy[0] == privacy[1]
        diffs = {stage: max_difference(one["out"] / stage, tr["out"] / stage)
                 for stage in ("pre", "dp")}
        expected = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        ok = (same_privacy and tr["backend"] == expected and one["backend"] is None
              and all(diff <= 1e-2 * max(1.0, top) for diff, top in diffs.values()))
        print(f"  privacy.json the same: {same_privacy} (epsilon "
              f"{privacy[1].get('epsilon')}); largest weight difference, torchrun vs one "
              f"process: pre-trained {diffs['pre'][0]:.2e}, DP {diffs['dp'][0]:.2e} "
              f"(largest weight {diffs['dp'][1]:.2f})")
        print(f"gpu_torchrun: {'ok' if ok else 'FAIL'}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
