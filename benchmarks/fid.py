"""Cost of `dpsynth fid`: feature extraction, streamed statistics and the Frechet distance.

Three measurements, each against a baseline timed in the same run:

1. Features per second of each extractor through its `FeatureExtractor` call
   (uint8 NHWC in, float features out), against the bare network forward on an
   already-converted batch: the ratio is our wrapper's overhead. The domain CNN
   (default `DomainCnnConfig`) runs at 8x8x1 and 32x32x3; Inception-v3 at 299x299
   (torch-fidelity resizes the 32x32 inputs), with RANDOM weights -- the cost
   does not depend on the values, and nothing is downloaded.
2. `StreamingStats.update` (float64 running mean and covariance) at d=2048, in
   images per second, to compare with the extractors: it must not be the
   bottleneck.
3. The Frechet distance at d=2048 on two covariances with a decaying spectrum:
   ours (torch-fidelity's sum of sqrt(eigvals(sigma1 sigma2))) against
   pytorch-fid's `calculate_frechet_distance` (scipy `sqrtm`), with the absolute
   and relative difference of the two values.

Usage:
    .venv/bin/python benchmarks/fid.py --threads 1     # ~2 min on one idle core
    .venv/bin/python benchmarks/fid.py --quick         # smoke run

Exit code 0 unless something fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
import torchvision
from pytorch_fid.fid_score import calculate_frechet_distance
from threadpoolctl import threadpool_limits

from dpsynth.config import DomainCnnConfig, FidConfig
from dpsynth.eval.distances import Moments, frechet_distance
from dpsynth.eval.domain_cnn import DomainCnn, DomainCnnExtractor, DomainCnnSpec, to_input
from dpsynth.eval.features import InceptionExtractor, StreamingStats


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median seconds, (max - min) / median) of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med


def extractor_rows(batch: int, inception_batch: int, repeats: int) -> list[str]:
    rng = np.random.default_rng(0)
    rows = []
    cfg = DomainCnnConfig()
    for h, c in ((8, 1), (32, 3)):
        torch.manual_seed(0)
        net = DomainCnn(DomainCnnSpec(h, c, 10, cfg.width, cfg.feature_dim)).eval()
        ext = DomainCnnExtractor(net, "bench", "random")
        images = rng.integers(0, 256, (batch, h, h, c), dtype=np.uint8)
        x = to_input(images)
        with torch.no_grad():
            ours, noise = median_time(lambda: ext(images), repeats)
            bare, _ = median_time(lambda: net.embed(x), repeats)
        rows.append(f"{'domain-cnn':<20} {f'{h}x{h}x{c}':>9} {batch:>5} {batch / ours:>10.0f} "
                    f"{batch / bare:>10.0f} {ours / bare:>6.2f} {noise:>6.0%}")
    torch.manual_seed(0)
    state = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                            num_classes=1008).state_dict()
    inc = InceptionExtractor(state, identity="random")
    images = rng.integers(0, 256, (inception_batch, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        ours, noise = median_time(lambda: inc(images), repeats)
        bare, _ = median_time(lambda: inc.net(x), repeats)
    rows.append(f"{'inception (random w)':<20} {'32->299':>9} {inception_batch:>5} "
                f"{inception_batch / ours:>10.1f} {inception_batch / bare:>10.1f} "
                f"{ours / bare:>6.2f} {noise:>6.0%}")
    return rows


def stats_row(d: int, batch: int, repeats: int) -> str:
    feats = torch.randn(batch, d)
    # one accumulator for every call, as in a real run: time the updates alone
    acc = StreamingStats(d, batch * (repeats + 1), FidConfig().max_features, 0)
    t, noise = median_time(lambda: acc.update(feats), repeats)
    return f"StreamingStats.update d={d} batch={batch}: {batch / t:.0f} img/s (noise {noise:.0%})"


def covariance(d: int, seed: int) -> Moments:
    """A mean and a full-rank covariance whose eigenvalues decay like 1/i (Inception
    pool features have a similar long tail)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) * (np.arange(1, d + 1) ** -0.5)
    return Moments(rng.normal(size=d) * 0.1, a @ a.T / d)


def distance_rows(d: int, repeats: int) -> list[str]:
    s1, s2 = covariance(d, 1), covariance(d, 2)
    ours_v = frechet_distance(s1, s2)
    scipy_v = calculate_frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    ours_t, ours_n = median_time(lambda: frechet_distance(s1, s2), repeats, warmup=0)
    scipy_t, scipy_n = median_time(
        lambda: calculate_frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma), repeats, warmup=0)
    return [f"Frechet distance at d={d}: ours (eigvals) {ours_t:.2f} s (noise {ours_n:.0%}), "
            f"pytorch-fid (scipy sqrtm) {scipy_t:.2f} s (noise {scipy_n:.0%}): ours "
            f"{scipy_t / ours_t:.2f}x faster",
            f"  values: ours {ours_v:.10g}, scipy {scipy_v:.10g}, |diff| "
            f"{abs(ours_v - scipy_v):.3g} (relative {abs(ours_v - scipy_v) / scipy_v:.2g})"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script runs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads and BLAS threads (default: the libraries' choice)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (median); default 5")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    batch = 64 if args.quick else FidConfig().batch_size
    inception_batch = 2 if args.quick else 8
    d = 256 if args.quick else 2048
    if args.threads:
        torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):  # None leaves BLAS as it is
        print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; CPU only; "
              f"median of {repeats}", flush=True)
        head = (f"{'extractor':<20} {'input':>9} {'batch':>5} {'ours im/s':>10} "
                f"{'bare im/s':>10} {'ratio':>6} {'noise':>6}")
        print("\n".join([head, "-" * len(head), *extractor_rows(batch, inception_batch,
                                                                 repeats)]), flush=True)
        print(stats_row(d, batch, repeats), flush=True)
        print("\n".join(distance_rows(d, repeats)))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("ours: the FeatureExtractor call on uint8 NHWC; bare: the network forward on a "
          "prepared tensor; ratio = ours time / bare time; noise = (max - min) / median.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
