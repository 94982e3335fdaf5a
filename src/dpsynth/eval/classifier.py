"""Downstream classifiers: train a WRN (`dpsynth.eval.wrn`) on uint8 images,
predict, score, and save / load it as safetensors + `config.json` (never pickle).

The recipe is the WRN paper's (Zagoruyko & Komodakis 2016, Sec. 3): SGD with
Nesterov momentum, weight decay, a cosine learning rate (Loshchilov & Hutter
2017) without restarts, and pad-and-crop augmentation where the data allows it.
Deterministic for a seed on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dpsynth.config import ClassifierConfig
from dpsynth.diffusion.augment import augment
from dpsynth.diffusion.samplers import from_uint8
from dpsynth.errors import InputError
from dpsynth.eval.wrn import WideResNet
from dpsynth.io.shards import Manifest, read_dataset

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
EVAL_BATCH = 1024  # images per forward pass when predicting: bounds memory only


def read_labelled(data_dir: str | Path, what: str, *, like: tuple[Manifest, str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, Manifest]:
    """Read a split for training or scoring classifiers, refusing what cannot work.

    Args:
        data_dir: a dataset folder (shards + manifest).
        what: how error messages name it ("synthetic set", "real test split").
        like: (manifest, name) of a split this one must match: the same classes
            and image shape (H, W, C).

    Returns:
        (images uint8 (N, H, W, C), labels (N,), manifest).

    Raises:
        InputError: no images, fewer than 8x8 pixels, or a mismatch with `like`.
    """
    images, labels, manifest = read_dataset(data_dir)
    if len(images) == 0:
        raise InputError(f"{data_dir} ({what}) holds no images; re-run the stage that wrote it")
    if like is not None:
        other, other_what = like
        if manifest.classes != other.classes:
            raise InputError(f"{data_dir} ({what}) has classes {list(manifest.classes)}, the "
                             f"{other_what} has {list(other.classes)}; both must come from the "
                             "same dataset (re-run prepare / sample with one data config)")
        if manifest.shape != other.shape:
            raise InputError(f"{data_dir} ({what}) has images of shape (H, W, C)="
                             f"{manifest.shape}, the {other_what} {other.shape}; use one "
                             "data.image_size / data.channels for both")
    _check_images(images, labels, f"{data_dir} ({what})")
    return images, labels, manifest


def build(cfg: ClassifierConfig, *, num_classes: int, channels: int) -> WideResNet:
    """An untrained WRN-`cfg.depth`-`cfg.widen` (initialised from torch's global RNG)."""
    return WideResNet(cfg.depth, cfg.widen, num_classes, channels, cfg.dropout)


def _check_images(images: np.ndarray, labels: np.ndarray | None, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise InputError(f"{where}: images must be uint8 (N, H, W, C) with C in (1, 3), got "
                         f"{images.dtype} {images.shape}")
    if min(images.shape[1:3]) < 8:
        raise InputError(f"{where}: images are {images.shape[1]}x{images.shape[2]}; a WRN "
                         "needs at least 8x8 (set data.image_size >= 8)")
    if labels is not None and labels.shape != (len(images),):
        raise InputError(f"{where}: labels have shape {labels.shape}, expected "
                         f"({len(images)},)")


def train(cfg: ClassifierConfig, images: np.ndarray, labels: np.ndarray, *, num_classes: int,
          seed: int, device: torch.device | str | None = None, desc: str = "classifier",
          progress: bool = True) -> WideResNet:
    """Train a WRN from scratch on `images` with the recipe in `cfg`.

    Every epoch is a seeded permutation cut into ceil(N / batch_size) batches of
    near-equal size (no tiny remainder batch to upset BatchNorm statistics);
    the learning rate follows a cosine from `cfg.lr` to 0 over all steps.

    Args:
        cfg: architecture and training recipe.
        images: uint8, shape (N, H, W, C), N >= 2.
        labels: int, shape (N,), values in [0, num_classes).
        num_classes: outputs of the classifier.
        seed: seeds the initialisation, data order, augmentation and dropout;
            the caller's global torch RNG state is left as it was.
        device: where to train; default `default_device()`.
        desc: the progress bar's label.
        progress: show a per-epoch progress bar with the training loss. Pass
            False when training on private data, whose loss must not be logged
            (PRIVACY.md rule 6).

    Returns:
        The trained network, in eval mode, on `device`.
    """
    _check_images(images, labels, desc)
    if len(images) < 2:
        raise InputError(f"{desc}: {len(images)} training image(s); need at least 2")
    device = torch.device(device) if device is not None else default_device()
    x_all = from_uint8(torch.from_numpy(images))
    y_all = torch.from_numpy(labels).long()
    num_batches = math.ceil(len(x_all) / cfg.batch_size)
    total_steps = cfg.epochs * num_batches
    # fork: dropout draws from the global RNG, which the caller may rely on
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = build(cfg, num_classes=num_classes, channels=images.shape[-1]).to(device).train()
        gen = torch.Generator().manual_seed(seed + 1)  # data order and augmentation
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=True, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
        bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=None if progress else True,
                   leave=False)
        for _ in bar:
            losses = []
            for idx in torch.tensor_split(torch.randperm(len(x_all), generator=gen), num_batches):
                x = augment(x_all[idx], cfg.augment, gen).to(device)
                loss = F.cross_entropy(net(x), y_all[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.detach())
            if progress:
                bar.set_postfix(loss=f"{torch.stack(losses).mean().item():.3f}")
        bar.close()
    return net.eval()


@torch.inference_mode()
def predict(net: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Predicted labels, int64 shape (N,), for uint8 images (N, H, W, C)."""
    _check_images(images, None, "predict")
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = [net(from_uint8(torch.from_numpy(images[lo:lo + EVAL_BATCH])).to(device))
           .argmax(1).cpu() for lo in range(0, len(images), EVAL_BATCH)]
    net.train(was_training)
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def accuracy(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of `net` on uint8 images (N, H, W, C) with labels (N,), N >= 1."""
    if len(images) == 0:
        raise InputError("accuracy: no images to score")
    return float((predict(net, images) == np.asarray(labels)).mean())


def save_classifier(net: WideResNet, cfg: ClassifierConfig, *, num_classes: int,
                    channels: int, image_size: int, out_dir: str | Path,
                    classes: Sequence[str] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Write `model.safetensors` and `config.json` into `out_dir`.

    `config.json`: `{"image_size", "channels", "num_classes", "classes", "wrn":
    {"depth", "widen", "dropout"}, "classifier": <the ClassifierConfig>, **extra}`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
              out_dir / WEIGHTS)
    # the input format at the top level: MLflow's model signature reads it
    meta = {"image_size": image_size, "channels": channels, "num_classes": num_classes,
            "classes": list(classes) if classes is not None else None,
            "wrn": {"depth": cfg.depth, "widen": cfg.widen, "dropout": cfg.dropout},
            "classifier": dataclasses.asdict(cfg), **(extra or {})}
    (out_dir / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load_classifier(model_dir: str | Path) -> tuple[WideResNet, dict[str, Any]]:
    """Load a classifier written by `save_classifier`.

    Returns:
        (network in eval mode on the CPU, the whole config.json).
    """
    model_dir = Path(model_dir)
    path = model_dir / CONFIG
    try:
        meta = json.loads(path.read_text())
        arch = meta["wrn"]
        net = WideResNet(int(arch["depth"]), int(arch["widen"]), int(meta["num_classes"]),
                         int(meta["channels"]), float(arch["dropout"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a classifier config ({err!r}); pass a folder written "
                         "by `dpsynth rank` (e.g. artifacts/rank/classifier)") from None
    try:
        net.load_state_dict(load_file(model_dir / WEIGHTS))
    except Exception as err:  # noqa: BLE001 - missing, truncated or mismatched weights
        raise InputError(f"{model_dir / WEIGHTS}: cannot load weights ({err}); re-run "
                         "`dpsynth rank`") from None
    return net.eval(), meta
