"""The denoiser: diffusers' class-conditional `UNet2DModel` with GroupNorm.

GroupNorm, never BatchNorm: DP-SGD needs per-example gradients, and BatchNorm
mixes examples within a batch. Label `num_classes` is the null label used for
classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from dpsynth.config import ModelConfig
from dpsynth.errors import InputError

WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
CONFIG = "config.json"


@dataclass(frozen=True)
class UNetSpec:
    """Everything needed to rebuild the network: model config plus data shape."""

    image_size: int
    channels: int
    num_classes: int
    model: ModelConfig

    @property
    def null_label(self) -> int:
        return self.num_classes

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @staticmethod
    def from_json(raw: dict) -> "UNetSpec":
        from dpsynth.config import from_dict

        model = from_dict({"model": raw["model"]}).model
        return UNetSpec(int(raw["image_size"]), int(raw["channels"]), int(raw["num_classes"]),
                        model)


def build_unet(spec: UNetSpec) -> UNet2DModel:
    """A class-conditional UNet; `attention_levels` get self-attention blocks."""
    m = spec.model
    levels = range(len(m.block_out_channels))
    down = tuple("AttnDownBlock2D" if i in m.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in m.attention_levels else "UpBlock2D"
               for i in reversed(levels))
    if spec.image_size % 2 ** (len(m.block_out_channels) - 1):
        raise InputError(f"data.image_size={spec.image_size} must be divisible by "
                         f"2**(len(model.block_out_channels)-1)="
                         f"{2 ** (len(m.block_out_channels) - 1)}")
    return UNet2DModel(
        sample_size=spec.image_size, in_channels=spec.channels, out_channels=spec.channels,
        block_out_channels=m.block_out_channels, layers_per_block=m.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=m.norm_num_groups,
        dropout=m.dropout, attention_head_dim=m.attention_head_dim,
        num_class_embeds=spec.num_classes + 1)  # +1: the null label for guidance


def with_classes(spec: UNetSpec, net: UNet2DModel, num_classes: int, seed: int
                 ) -> tuple[UNetSpec, UNet2DModel]:
    """The same network for another label set: every weight kept but the class
    embedding, which starts afresh (seeded), with `num_classes` + the null label.

    For pre-training on one label set and fine-tuning on another (ImageNet32's
    1000 classes, then CIFAR-10's 10): the embedding of a pre-training class says
    nothing about a private one.
    """
    new_spec = replace(spec, num_classes=num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = build_unet(new_spec)
    kept = {k: v for k, v in net.state_dict().items() if not k.startswith("class_embedding.")}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith("class_embedding.") for k in missing), missing
    return new_spec, new.eval()


def save_model(out_dir: str | Path, spec: UNetSpec, net: torch.nn.Module,
               ema: torch.nn.Module | None = None, extra: dict | None = None) -> None:
    """Write `config.json` + safetensors weights (never pickle)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # CPU tensors whatever the device trained on: `load_model` returns a CPU net
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
              out_dir / WEIGHTS)
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  out_dir / EMA_WEIGHTS)
    (out_dir / CONFIG).write_text(json.dumps({"unet": spec.to_json(), **(extra or {})},
                                             indent=2) + "\n")


def load_model(model_dir: str | Path, use_ema: bool = True) -> tuple[UNetSpec, UNet2DModel, dict]:
    """Load a model written by `save_model`; EMA weights when present and asked for.

    Returns:
        (spec, network in eval mode on the CPU, the whole config.json); the caller
        moves it to its device.
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / CONFIG
    if not cfg_path.is_file():
        raise InputError(f"{cfg_path}: no model config; pass the output folder of "
                         "`dpsynth pretrain` (e.g. artifacts/pretrain)")
    try:
        raw = json.loads(cfg_path.read_text())
        spec = UNetSpec.from_json(raw["unet"])
    except (ValueError, KeyError, TypeError) as err:  # bad JSON, missing keys, bad values
        raise InputError(f"{cfg_path}: not a valid model config ({err}); re-run the stage "
                         "that wrote it") from None
    net = build_unet(spec)
    path = weights_file(model_dir, use_ema)
    try:
        net.load_state_dict(load_file(path))
    except Exception as err:  # noqa: BLE001 - a pickle, truncated or mismatched weights
        if looks_like_pickle(path):
            raise InputError(f"{path}: not a safetensors file but a pickle (torch.save); "
                             "pickles can run code and are never unpickled here: re-run "
                             "`dpsynth pretrain`, or convert weights you trust with "
                             "safetensors.torch.save_file") from None
        detail = " ".join(str(err).split())[:300]
        raise InputError(f"{path}: cannot load weights ({detail}); re-run the stage that "
                         "wrote them") from None
    return spec, net.eval(), raw


def weights_file(model_dir: str | Path, use_ema: bool = True) -> Path:
    """The weights `load_model` reads: the EMA weights when present and asked for.

    Raises:
        InputError: the folder has neither weights file.
    """
    model_dir = Path(model_dir)
    if use_ema and (model_dir / EMA_WEIGHTS).is_file():
        return model_dir / EMA_WEIGHTS
    if (model_dir / WEIGHTS).is_file():
        return model_dir / WEIGHTS
    others = sorted(p.name for p in model_dir.iterdir() if p.is_file()
                    and p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    found = (f"; it has {others}, which are pickles and are never unpickled here (they can "
             "run code)" if others else "")
    raise InputError(f"{model_dir}: no {WEIGHTS} (safetensors weights){found}; pass the "
                     "output folder of `dpsynth pretrain` or re-run `dpsynth pretrain`")


def looks_like_pickle(path: Path) -> bool:
    """Whether a file that safetensors could not read starts like a pickle (protocol
    2+) or a `torch.save` zip archive. Only read, never unpickled."""
    with open(path, "rb") as f:
        head = f.read(4)
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
            or head == b"PK\x03\x04")


def read_privacy(model_dir: Path) -> dict | None:
    """`privacy.json` of a model folder, or None for a non-private model."""
    path = Path(model_dir) / "privacy.json"
    return json.loads(path.read_text()) if path.is_file() else None
