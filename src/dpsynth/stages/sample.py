"""`dpsynth sample`: draw a large synthetic dataset from a (DP) model, in shards.

Every shard is a pure function of (seed, shard index, model, sampling config),
so N machines making one shard each produce exactly what one machine making all
N would. Finished shards are kept in the work folder with a sidecar JSON
(count, sha256, fingerprint) and skipped on re-run, so an interrupted job
resumes. Sampling is post-processing of the model: it spends no privacy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dpsynth.config import Config
from dpsynth.devices import default_device
from dpsynth.diffusion.loss import make_noise_schedule
from dpsynth.diffusion.samplers import make_sampler, sample, to_uint8
from dpsynth.diffusion.unet import WEIGHTS, EMA_WEIGHTS, load_model
from dpsynth.errors import InputError
from dpsynth.io.atomic import atomic_dir, atomic_write_json
from dpsynth.io.shards import (Manifest, ShardInfo, read_dataset, sha256_file, shard_name,
                               write_manifest, write_shard)
from dpsynth.provenance import write_run_info
from dpsynth.stages.common import fingerprint, work_dir_for, write_metrics
from dpsynth.tracking import Tracker

log = logging.getLogger(__name__)
SECTIONS = ("seed", "diffusion", "sample")


@dataclass(frozen=True, kw_only=True)
class SampleResult:
    out_dir: Path
    manifest: Manifest | None  # None when only some shards were made (fan-out)
    shards_made: tuple[int, ...]
    shards_skipped: tuple[int, ...]


def shard_bounds(num_samples: int, num_shards: int, index: int) -> tuple[int, int]:
    """[start, stop) of global sample indices in shard `index` (sizes differ by <= 1)."""
    base, extra = divmod(num_samples, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_labels(start: int, stop: int, num_classes: int) -> torch.Tensor:
    """Class-balanced labels: global sample j has class j mod num_classes."""
    return torch.arange(start, stop) % num_classes


def shard_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"sample:{seed}:{index}".encode()).digest()[:8],
                          "little") & (2**63 - 1)


def _model_hash(model_dir: Path) -> str:
    weights = model_dir / (EMA_WEIGHTS if (model_dir / EMA_WEIGHTS).is_file() else WEIGHTS)
    if not weights.is_file():
        raise InputError(f"{model_dir}: no model weights ({WEIGHTS}); pass the output folder "
                         "of `dpsynth pretrain` (e.g. artifacts/pretrain)")
    return sha256_file(weights)


def _sidecar(shard_dir: Path, index: int) -> Path:
    return shard_dir / shard_name(index).replace(".npz", ".json")


def _is_complete(shard_dir: Path, index: int, run_id: str) -> bool:
    side = _sidecar(shard_dir, index)
    npz = shard_dir / shard_name(index)
    if not (side.is_file() and npz.is_file()):
        return False
    info = json.loads(side.read_text())
    return info.get("run_id") == run_id and sha256_file(npz) == info.get("sha256")


def make_shards(cfg: Config, *, model_dir: Path, shard_dir: Path,
                indices: Iterable[int] | None = None,
                device: str | torch.device | None = None,
                sync: Callable[[], None] | None = None) -> tuple[list[int], list[int]]:
    """Make the given shards (default: all) in `shard_dir`, skipping finished ones.

    Args:
        device: where the net runs; default the GPU when there is one. The noise is
            drawn on the CPU from each shard's seeded generator (`samplers.sample`).
        sync: called after each finished shard: the driver's upload of a mirrored
            `s3://` work folder (`dpsynth.io.work.Staged.sync`), so a retry on
            another machine skips it.

    Returns:
        (made, skipped) shard indices.
    """
    sc = cfg.sample
    model_dir, shard_dir = Path(model_dir), Path(shard_dir)
    spec, net, model_cfg = load_model(model_dir)
    device = torch.device(device) if device is not None else default_device()
    net.to(device)
    run_id = fingerprint(cfg.section(*SECTIONS), _model_hash(model_dir))
    indices = list(range(sc.num_shards)) if indices is None else list(indices)
    for i in indices:
        if not 0 <= i < sc.num_shards:
            raise InputError(f"--shard-index {i}: must be in [0, sample.num_shards="
                             f"{sc.num_shards})")
    schedule = make_noise_schedule(cfg.diffusion)
    made, skipped = [], []
    total = sum(np.diff(shard_bounds(sc.num_samples, sc.num_shards, i))[0] for i in indices)
    bar = tqdm(total=int(total), desc="sample", unit="img", disable=None)
    for i in indices:
        start, stop = shard_bounds(sc.num_samples, sc.num_shards, i)
        if _is_complete(shard_dir, i, run_id):
            skipped.append(i)
            bar.update(stop - start)
            continue
        gen = torch.Generator().manual_seed(shard_seed(cfg.seed, i))
        labels = shard_labels(start, stop, spec.num_classes)
        chunks = []
        for lo in range(0, len(labels), sc.batch_size):
            y = labels[lo:lo + sc.batch_size]
            x = sample(net, make_sampler(sc.sampler, schedule), y.to(device),
                       (spec.channels, spec.image_size, spec.image_size),
                       num_inference_steps=sc.num_inference_steps,
                       guidance_scale=sc.guidance_scale, null_label=spec.null_label,
                       generator=gen, eta=sc.eta)
            chunks.append(to_uint8(x).cpu())
            bar.update(len(y))
        images = torch.cat(chunks).numpy()
        info = write_shard(shard_dir / shard_name(i), images, labels.numpy())
        # the sidecar is written last: its presence marks the shard complete
        atomic_write_json(_sidecar(shard_dir, i), {
            "index": i, "count": info.count, "sha256": info.sha256, "run_id": run_id,
            "classes": model_cfg["classes"], "shape": list(images.shape[1:])})
        if sync is not None:
            sync()
        made.append(i)
    bar.close()
    return made, skipped


def merge_shards(shard_dirs: Sequence[Path], out_dir: Path, *, num_shards: int,
                 source: str) -> Manifest:
    """Collect shards 0..num_shards-1 (each exactly once) from `shard_dirs` into
    `out_dir` (which should be inside an `atomic_dir`), verify them and write the manifest."""
    found: dict[int, Path] = {}
    for d in map(Path, shard_dirs):
        for side in sorted(d.glob("shard-*.json")):
            info = json.loads(side.read_text())
            if info["index"] in found and found[info["index"]] != d:
                raise InputError(f"shard {info['index']} appears in both {found[info['index']]} "
                                 f"and {d}; pass each shard once")
            found[info["index"]] = d
    missing = sorted(set(range(num_shards)) - set(found))
    if missing:
        raise InputError(f"shards {missing} of {num_shards} are missing from "
                         f"{[str(d) for d in shard_dirs]}; run `dpsynth sample --shard-index` "
                         "for them first")
    infos = [json.loads(_sidecar(found[i], i).read_text()) for i in range(num_shards)]
    by_run: dict[str, list[int]] = {}
    for i, info in enumerate(infos):
        by_run.setdefault(str(info.get("run_id")), []).append(i)
    if len(by_run) > 1:  # shards of different models or sampling configs must not mix
        raise InputError(f"shards {list(by_run.values())} were made with different models or "
                         "sample configs; re-run those shards with the same model and config")
    shards, shape, classes = [], None, None
    for i, info in enumerate(infos):
        d = found[i]
        if sha256_file(d / shard_name(i)) != info["sha256"]:
            raise InputError(f"{d / shard_name(i)}: sha256 does not match its sidecar; "
                             "delete it and re-run that shard")
        shutil.copyfile(d / shard_name(i), out_dir / shard_name(i))
        shards.append(ShardInfo(shard_name(i), info["count"], info["sha256"]))
        shape, classes = tuple(info["shape"]), tuple(info["classes"])
    manifest = Manifest(count=sum(s.count for s in shards), shape=shape,  # type: ignore[arg-type]
                        classes=classes, source=source, shards=tuple(shards))
    write_manifest(out_dir, manifest)
    return manifest


def save_grid(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: Path,
              per_class: int = 10, scale: int = 4) -> None:
    """PNG grid: one row per class, `per_class` samples each, upscaled (nearest)."""
    h, w, c = images.shape[1:]
    grid = np.full((len(classes) * (h + 1), per_class * (w + 1), c), 255, np.uint8)
    for k in range(len(classes)):
        for j, idx in enumerate(np.flatnonzero(labels == k)[:per_class]):
            grid[k * (h + 1):k * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = images[idx]
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def tracked_params(cfg: Config, model_dir: Path) -> dict:
    """What a sampling run logs as params: its config sections and the model's hash."""
    return cfg.section(*SECTIONS) | {"model_sha256": _model_hash(Path(model_dir))}


def publish(cfg: Config, *, shard_dirs: Sequence[Path], model_dir: Path, out_dir: Path,
            tracker: Tracker, made: Sequence[int], skipped: Sequence[int],
            seconds: float | None) -> SampleResult:
    """Publish the finished shards 0..num_shards-1 found in `shard_dirs` into `out_dir`,
    atomically: the shards with their manifest, a per-class sample grid, the model's
    `privacy.json` (the samples carry its guarantee) and the metrics.

    This is the second half of `run`; a fan-out driver (the Kubeflow pipeline's merge
    step) calls it with the folders its shard tasks filled, so that the result is
    byte-identical to one `run`.

    Args:
        made, skipped: indices of the shards made and of those found finished (resumed).
        seconds: time spent making `made` (in a fan-out: summed over the workers, so
            `images_per_second` is the throughput of one worker); None when unknown
            (`dpsynth sample --merge` of shards made elsewhere).
    """
    model_dir = Path(model_dir)
    with atomic_dir(out_dir) as tmp:
        manifest = merge_shards(shard_dirs, tmp, num_shards=cfg.sample.num_shards,
                                source=f"dpsynth-sample:{_model_hash(model_dir)[:16]}")
        images, labels, _ = read_dataset(tmp)
        save_grid(images, labels, manifest.classes, tmp / "grid.png")
        n_made = sum(np.diff(shard_bounds(cfg.sample.num_samples, cfg.sample.num_shards, i))[0]
                     for i in made)
        metrics = {"num_samples": manifest.count, "shards_made": len(made),
                   "shards_skipped": len(skipped),
                   "sample_seconds": None if seconds is None else round(seconds, 2),
                   "images_per_second": (round(float(n_made) / seconds, 2)
                                         if made and seconds else None)}
        if (model_dir / "privacy.json").is_file():
            # samples are post-processing of the DP model: they carry its guarantee
            shutil.copyfile(model_dir / "privacy.json", tmp / "privacy.json")
        write_run_info(tmp, "sample", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
    tracker.log_artifact(Path(out_dir) / "grid.png")
    return SampleResult(out_dir=Path(out_dir), manifest=manifest, shards_made=tuple(made),
                        shards_skipped=tuple(skipped))


def run(cfg: Config, *, model_dir: Path, out_dir: Path, tracker: Tracker,
        work_dir: Path | None = None, device: str | torch.device | None = None,
        sync_work: Callable[[], None] | None = None) -> SampleResult:
    """Make every shard (resuming finished ones) and publish them with a manifest,
    a per-class sample grid and metrics into `out_dir`, atomically. `device`: as
    for `make_shards`; `sync_work`: its `sync`."""
    model_dir = Path(model_dir)
    work_dir = Path(work_dir) if work_dir else work_dir_for(out_dir)
    tracker.log_params(tracked_params(cfg, model_dir))
    t0 = time.perf_counter()
    made, skipped = make_shards(cfg, model_dir=model_dir, shard_dir=work_dir, device=device,
                                sync=sync_work)
    result = publish(cfg, shard_dirs=[work_dir], model_dir=model_dir, out_dir=out_dir,
                     tracker=tracker, made=made, skipped=skipped,
                     seconds=time.perf_counter() - t0)
    shutil.rmtree(work_dir, ignore_errors=True)
    return result
