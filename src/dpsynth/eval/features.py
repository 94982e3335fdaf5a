"""Feature extractors for distribution metrics, and streamed feature statistics.

A `FeatureExtractor` maps a uint8 NHWC batch to float features. Statistics are
accumulated batch by batch (float64 mean and covariance, plus a seeded uniform
subsample of the features for KID and precision/recall), so memory stays flat
in the number of images. `InceptionExtractor` is torch-fidelity's Inception-v3
with weights read from a local file without unpickling it.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dpsynth.errors import DpsynthError, InputError
from dpsynth.io import s3
from dpsynth.io.shards import iter_shards, read_manifest

log = logging.getLogger(__name__)

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
_HOW_TO_GET_WEIGHTS = (
    f"download torch-fidelity's Inception-v3 weights ({INCEPTION_URL}) on a machine with "
    "internet and set fid.inception_weights to the local file")


class FeatureExtractor(Protocol):
    """A feature space for distribution metrics.

    Attributes:
        name: the feature space in metric names (`inception`, `digits_cnn`).
        frechet_name: `fid` for Inception-v3 only; `fd` otherwise -- a Frechet
            distance in another feature space is not "FID".
        dim: feature dimension d.
        identity: changes whenever the features could change (a weights hash);
            cached reference statistics are keyed by it.
    """

    name: str
    frechet_name: str
    dim: int
    identity: str

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """[N, H, W, C] uint8 images -> [N, dim] float32 features on the CPU."""
        ...


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class FeatureStats:
    """Summary of the features of one image set.

    Attributes:
        count: number of images.
        mu: [d] float64 mean.
        sigma: [d, d] float64 covariance (unbiased, N - 1).
        sample: [k, d] float32 features of a seeded uniform subsample,
            k = min(count, max_features), for KID and precision/recall.
    """

    count: int
    mu: np.ndarray
    sigma: np.ndarray
    sample: np.ndarray

    def to_npz(self, extras: dict[str, float] | None = None) -> bytes:
        """The bytes of an `.npz` file (no pickle) holding these statistics."""
        buf = io.BytesIO()
        np.savez(buf, count=np.int64(self.count), mu=self.mu, sigma=self.sigma,
                 sample=self.sample,
                 **{f"extra_{k}": np.float64(v) for k, v in (extras or {}).items()})
        return buf.getvalue()

    @staticmethod
    def from_npz(path: Path) -> tuple["FeatureStats", dict[str, float]]:
        """Read what `to_npz` wrote: (statistics, extras)."""
        with np.load(path, allow_pickle=False) as z:
            extras = {k[len("extra_"):]: float(z[k]) for k in z.files if k.startswith("extra_")}
            return FeatureStats(int(z["count"]), z["mu"], z["sigma"], z["sample"]), extras


def subsample_indices(total: int, max_features: int, seed: int | Sequence[int]) -> np.ndarray:
    """Sorted indices of a uniform random subset of min(total, max_features) items."""
    if total <= max_features:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=max_features, replace=False))


class StreamingStats:
    """Mean, covariance and a subsample of features that arrive in batches.

    The covariance merges per-batch centred sums (Chan, Golub & LeVeque 1979), in
    float64: unlike sum(x x^T) - N mu mu^T it loses no precision when the mean is
    large next to the spread. The subsample indices are drawn up front from the
    known total, so the subsample does not depend on the batch size.
    """

    def __init__(self, dim: int, total: int, max_features: int,
                 seed: int | Sequence[int]) -> None:
        self.dim, self.total = dim, total
        self.count = 0
        self._mean = np.zeros(dim)
        self._m2 = np.zeros((dim, dim))  # sum of outer products of deviations from the mean
        self._keep = subsample_indices(total, max_features, seed)
        self._sample = np.zeros((len(self._keep), dim), np.float32)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features [n, dim] (in dataset order)."""
        x = np.asarray(features, dtype=np.float64)
        n = len(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features have shape {x.shape}, expected (n, {self.dim})")
        if self.count + n > self.total:
            raise ValueError(f"more features ({self.count + n}) than announced ({self.total})")
        if n == 0:
            return
        # which of the kept indices fall in [count, count + n)
        lo, hi = np.searchsorted(self._keep, [self.count, self.count + n])
        self._sample[lo:hi] = x[self._keep[lo:hi] - self.count]
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        delta = mean_b - self._mean
        total = self.count + n
        self._m2 += xc.T @ xc + np.outer(delta, delta) * (self.count * n / total)
        self._mean += delta * (n / total)
        self.count = total

    def result(self) -> FeatureStats:
        if self.count != self.total:
            raise ValueError(f"got {self.count} features, announced {self.total}")
        if self.count < 2:
            raise ValueError(f"a covariance needs >= 2 features, got {self.count}")
        return FeatureStats(self.count, self._mean.copy(), self._m2 / (self.count - 1),
                            self._sample.copy())


def extract_stats(data_dir: Path, extractor: FeatureExtractor, *, batch_size: int,
                  max_features: int, seed: int | Sequence[int], desc: str = "features",
                  on_batch: Callable[[torch.Tensor, np.ndarray], None] | None = None
                  ) -> FeatureStats:
    """Stream a dataset shard by shard through `extractor` and summarise the features.

    Args:
        data_dir: a dataset folder (shards + manifest; hashes are verified).
        extractor: the feature space.
        batch_size: images per extractor call.
        max_features: size bound of the kept subsample.
        seed: seeds the subsample.
        desc: progress bar label.
        on_batch: called with (features [n, dim], labels [n]) of every batch, e.g.
            to score a classifier on the same pass.

    Returns:
        The statistics of all images in `data_dir`.
    """
    manifest = read_manifest(data_dir)
    stats = StreamingStats(extractor.dim, manifest.count, max_features, seed)
    with tqdm(total=manifest.count, desc=desc, unit="img", disable=None) as bar:
        for images, labels in iter_shards(data_dir):
            for lo in range(0, len(images), batch_size):
                feats = extractor(images[lo:lo + batch_size])
                stats.update(feats)
                if on_batch is not None:
                    on_batch(feats, labels[lo:lo + batch_size])
                bar.update(len(feats))
    return stats.result()


# --------------------------------------------------------------------------- Inception-v3


def read_weights_bytes(uri: str) -> bytes:
    """The bytes of a local file or `s3://bucket/key` object (`dpsynth.io.s3`)."""
    if s3.is_s3(uri):
        try:
            return s3.read_bytes(uri)
        except DpsynthError as err:  # missing object or bucket, no credentials, ...
            raise InputError(f"fid.inception_weights={uri!r}: cannot read it ({err}); "
                             f"or {_HOW_TO_GET_WEIGHTS}") from None
    path = Path(uri).expanduser()
    if not path.is_file():
        raise InputError(f"fid.inception_weights={uri!r}: file not found; {_HOW_TO_GET_WEIGHTS}")
    return path.read_bytes()


def load_state_dict_safely(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Decode weights without running code: safetensors if `where` ends in
    `.safetensors`, else `torch.load(weights_only=True)`; insist on a flat dict
    of tensors.

    Raises:
        InputError: the file holds anything else (e.g. a pickle that would run code).
    """
    try:
        if where.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            # weights_only: the unpickler refuses every global but tensor types, so a
            # malicious __reduce__ never runs (DESIGN.md "Artifacts": never pickle)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - refused pickle, corrupt file, ...
        raise InputError(f"{where}: not a plain weights file, refused ({type(err).__name__}: "
                         f"{str(err)[:200]}); {_HOW_TO_GET_WEIGHTS}") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{where}: expected a flat dict of name -> tensor (a state dict), "
                         f"got {type(state).__name__}; {_HOW_TO_GET_WEIGHTS}")
    return dict(state)


class InceptionExtractor:
    """torch-fidelity's `FeatureExtractorInceptionV3`: 2048-d pool3 features of the
    TF-compatible Inception-v3 that FID is defined with (Heusel et al. 2017).

    torch-fidelity resizes inputs to 299x299 itself (TF1-compatible bilinear);
    grayscale images are repeated to 3 channels. It unpickles its weights file
    with `weights_only=False`, so it never sees the user's file: it gets our own
    re-serialisation of the validated state dict, from memory.
    """

    name = "inception"
    frechet_name = "fid"
    dim = 2048

    def __init__(self, state_dict: dict[str, torch.Tensor], identity: str,
                 device: torch.device | str = "cpu") -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        buf = io.BytesIO()
        torch.save(state_dict, buf)  # only tensors: checked by load_state_dict_safely
        buf.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
        except RuntimeError as err:  # load_state_dict: missing / unexpected / mis-shaped keys
            detail = " ".join(str(err).split())[:300]  # one line: the first key names
            raise InputError(f"fid.inception_weights: not Inception-v3 FID weights "
                             f"({detail}...); {_HOW_TO_GET_WEIGHTS}") from None
        self.net.to(device)
        self.device = torch.device(device)
        self.identity = identity

    @classmethod
    def from_file(cls, uri: str, device: torch.device | str = "cpu") -> "InceptionExtractor":
        """Load weights from `cfg.fid.inception_weights` (a local path or s3:// URI)."""
        data = read_weights_bytes(uri)
        state = load_state_dict_safely(data, uri)
        return cls(state, identity=f"inception:{hashlib.sha256(data).hexdigest()}",
                   device=device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB, as torch-fidelity's loaders do
        return self.net(x.contiguous().to(self.device))[0].float().cpu()
