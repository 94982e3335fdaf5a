"""Checkpoints that resume exactly: safetensors for every tensor (model, EMA,
optimizer moments, RNG state), JSON for the rest. Never pickle.

A checkpoint is a folder `ckpt-<step>` written under a temporary name and
renamed into place; `latest.json` points at the newest complete one and is
replaced atomically, so a kill during a write never leaves a corrupt "latest".
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dpsynth.errors import InputError
from dpsynth.io.atomic import atomic_write_json

LATEST = "latest.json"


@dataclass
class TrainState:
    """What a training loop needs to continue bit-for-bit."""

    step: int
    net: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    generator: torch.Tensor | None  # the training generator's get_state(); None: none public
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able: history, fingerprint...
    # torch.get_rng_state(): what dropout draws from on the CPU. On a GPU dropout
    # draws from the CUDA generator, which is not saved: bit-identical resumes are a
    # CPU property (cuDNN's convolution kernels are not deterministic either).
    torch_rng: torch.Tensor | None = None
    # DP randomness (Poisson sampling, Gaussian noise, the draws' step seeds:
    # `SecretRandomness.get_state()`). Only test-seeded runs keep
    # it: whoever holds it could subtract the noise (PRIVACY.md rule 7).
    secret_rng: torch.Tensor | None = None


def restore(state: TrainState, *, net: torch.nn.Module, ema: Any, optimizer: torch.optim.Optimizer,
            generator: torch.Generator | None) -> None:
    """Put a training loop back where `state` was: weights, EMA (with its update
    count in `meta["ema_num_updates"]`), optimizer moments, the training
    generator and torch's global generator (dropout). The secret DP generator
    is the caller's business: only test-seeded runs store it."""
    net.load_state_dict(state.net)
    ema.shadow.load_state_dict(state.ema)
    ema.num_updates = state.meta["ema_num_updates"]
    optimizer.load_state_dict(state.optimizer)
    if generator is not None and state.generator is not None:
        generator.set_state(state.generator)
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)


def _optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {f"{idx}.{name}": value.detach().cpu().clone().contiguous()
               for idx, per_param in state["state"].items()
               for name, value in per_param.items()}
    return tensors, state["param_groups"]


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(ckpt_dir: str | Path, state: TrainState, keep: int = 2, *,
                    on_saved: Callable[[], None] | None = None) -> Path:
    """Write `ckpt_dir/ckpt-<step>` atomically, point `latest.json` at it, prune old ones.

    `on_saved` runs once the checkpoint is complete: the driver's `sync` of a
    mirrored `s3://` work folder (`dpsynth.io.work.Staged`), which uploads it so a
    retry on another machine resumes from it.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"ckpt-{state.step:08d}"
    tmp = ckpt_dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # CPU tensors whatever the training device: a checkpoint resumes on any device
        # (load_state_dict copies them to the parameters' device)
        save_file(_cpu(state.net), tmp / "model.safetensors")
        save_file(_cpu(state.ema), tmp / "ema.safetensors")
        opt_tensors, groups = _optimizer_to_tensors(state.optimizer)
        rng = {} if state.generator is None else {"__generator__": state.generator.contiguous()}
        if state.torch_rng is not None:
            rng["__torch_rng__"] = state.torch_rng.contiguous()
        if state.secret_rng is not None:
            rng["__secret_rng__"] = state.secret_rng.contiguous()
        save_file(opt_tensors | rng, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(
            {"step": state.step, "param_groups": groups, "meta": state.meta}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        # Re-saving a step: move the old folder aside first (atomic), so every
        # folder named ckpt-* is always complete; load_latest falls back to them.
        if final.exists():
            os.replace(final, ckpt_dir / f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(ckpt_dir / LATEST, {"checkpoint": final.name, "step": state.step})
    done = sorted(p for p in ckpt_dir.glob("ckpt-*") if p.is_dir() and p != final)
    for old in done[:max(0, len(done) - (keep - 1))]:
        # moved out of the ckpt-* names first: a kill in the middle of deleting
        # must not leave a partial folder that load_latest could fall back to
        os.replace(old, ckpt_dir / f".{old.name}.old-{uuid.uuid4().hex[:8]}")
    for old in ckpt_dir.glob(".ckpt-*"):  # those, and what crashed writes left
        if old.is_dir() and old != tmp:
            shutil.rmtree(old, ignore_errors=True)
    if on_saved is not None:
        on_saved()
    return final


def load_latest(ckpt_dir: str | Path) -> TrainState | None:
    """The newest complete checkpoint in `ckpt_dir`, or None if there is none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        path = ckpt_dir / json.loads(pointer.read_text())["checkpoint"]
        if not path.is_dir():  # killed between moving a re-saved step aside and renaming
            complete = sorted(p for p in ckpt_dir.glob("ckpt-*") if p.is_dir())
            path = complete[-1] if complete else path  # none left: unreadable, below
        info = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "state.safetensors")
        generator = tensors.pop("__generator__", None)
        torch_rng = tensors.pop("__torch_rng__", None)
        secret_rng = tensors.pop("__secret_rng__", None)
        return TrainState(step=int(info["step"]), net=load_file(path / "model.safetensors"),
                          ema=load_file(path / "ema.safetensors"),
                          optimizer=_optimizer_from_tensors(tensors, info["param_groups"]),
                          generator=generator, meta=info["meta"], torch_rng=torch_rng,
                          secret_rng=secret_rng)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise InputError(f"{ckpt_dir}: latest checkpoint is unreadable ({err}); delete the "
                         "folder to start over") from None
