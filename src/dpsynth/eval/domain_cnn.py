"""The domain feature extractor: a small CNN classifier trained on the PUBLIC split.

Inception-v3 features say little about 8x8 digits or pathology patches, so FD
is also measured in the penultimate layer of a CNN trained for the data's own
classes. It is trained on public data only: trained on the private split, its
weights and the metrics computed with them would leak private data with no DP
guarantee. Training is deterministic for a seed (same seed -> bit-identical
weights on the same machine and thread settings), and the model is saved as
safetensors + config.json (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from dpsynth.config import DomainCnnConfig
from dpsynth.errors import InputError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass(frozen=True)
class DomainCnnSpec:
    """What rebuilds the network: data shape, classes and layer sizes."""

    image_size: int
    channels: int
    num_classes: int
    width: int
    feature_dim: int


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm: features of an image do not depend on the rest of the batch
    return nn.GroupNorm(math.gcd(8, channels), channels)


class DomainCnn(nn.Module):
    """conv(w) -> conv/2(2w) -> conv/2(4w) -> global average pool -> linear(feature_dim)
    = the features -> ReLU -> linear head (class logits).

    Input: [N, C, H, W] floats in [-1, 1].
    """

    def __init__(self, spec: DomainCnnSpec) -> None:
        super().__init__()
        w, c = spec.width, spec.channels
        self.spec = spec
        self.body = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), _norm(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _norm(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), _norm(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features = nn.Linear(4 * w, spec.feature_dim)
        self.head = nn.Linear(spec.feature_dim, spec.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, feature_dim] (before the ReLU: no dead, constant dims)."""
        return self.features(self.body(x))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes] from `embed`'s features."""
        return self.head(torch.relu(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.embed(x))


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_domain_cnn(cfg: DomainCnnConfig, images: np.ndarray, labels: np.ndarray, *,
                     num_classes: int, seed: int) -> DomainCnn:
    """Train the CNN on the PUBLIC split (never the private one: see the module doc).

    Args:
        cfg: `fid.domain_cnn`.
        images: [N, H, W, C] uint8 public images.
        labels: [N] int labels in [0, num_classes).
        num_classes: size of the head.
        seed: the only source of randomness (initialisation and batches).

    Returns:
        The trained network, in eval mode, on the CPU.
    """
    if len(images) == 0:
        raise InputError("the domain CNN needs public images to train on; the public split "
                         "is empty")
    n, h, _, c = images.shape
    spec = DomainCnnSpec(image_size=h, channels=c, num_classes=num_classes, width=cfg.width,
                         feature_dim=cfg.feature_dim)
    # CPU, own generators: determinism without touching the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DomainCnn(spec)
    gen = torch.Generator().manual_seed(seed + 1)
    x_all, y_all = to_input(images), torch.as_tensor(labels, dtype=torch.long)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    net.train()
    bar = tqdm(range(cfg.steps), desc="domain cnn", disable=None)
    for _ in bar:
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        loss = nn.functional.cross_entropy(net(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval()


def save_domain_cnn(out_dir: Path, net: DomainCnn, extra: dict | None = None) -> str:
    """Write `model.safetensors` + `config.json` into `out_dir`.

    Returns:
        sha256 of the weights file: the identity of this feature space.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out_dir / WEIGHTS)
    (out_dir / CONFIG).write_text(json.dumps(
        {"domain_cnn": asdict(net.spec), **(extra or {})}, indent=2) + "\n")
    return hashlib.sha256((out_dir / WEIGHTS).read_bytes()).hexdigest()


def load_domain_cnn(model_dir: Path) -> tuple[DomainCnn, dict, str]:
    """Load what `save_domain_cnn` wrote.

    Returns:
        (network in eval mode, the whole config.json, sha256 of the weights).
    """
    model_dir = Path(model_dir)
    try:
        raw = json.loads((model_dir / CONFIG).read_text())
        net = DomainCnn(DomainCnnSpec(**raw["domain_cnn"]))
        net.load_state_dict(load_file(model_dir / WEIGHTS))
    except Exception as err:  # noqa: BLE001 - missing, truncated or mismatched files
        raise InputError(f"{model_dir}: not a domain CNN folder ({err}); delete it and re-run "
                         "`dpsynth fid`") from None
    return net.eval(), raw, hashlib.sha256((model_dir / WEIGHTS).read_bytes()).hexdigest()


class DomainCnnExtractor:
    """`FeatureExtractor` for a trained `DomainCnn`: its `feature_dim` layer."""

    frechet_name = "fd"  # not Inception: never "FID"

    def __init__(self, net: DomainCnn, source: str, weights_sha256: str) -> None:
        self.net = net.eval()
        self.name = f"{source}_cnn"
        self.dim = net.spec.feature_dim
        self.identity = f"domain-cnn:{weights_sha256}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        return self.net.embed(to_input(images))

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted class [N] from features [N, dim] (so one pass gives both)."""
        return self.net.logits(features).argmax(dim=1)
