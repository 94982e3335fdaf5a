"""`dpsynth classify`: how useful is the synthetic set for training classifiers?

A WRN is trained on synthetic data only and scored on the real test split, for
growing class-balanced, nested subsets of the synthetic set (Ghalebikesabi et
al. 2023, Sec. 5.2 and Fig. 3: accuracy vs number of synthetic samples). The
synthetic-data numbers are post-processing of the DP model, so they carry its
(epsilon, delta). Optionally the same classifier is trained on the real private
split: the non-private upper bound, for evaluation only, labelled as not
covered by (epsilon, delta) wherever it appears.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dpsynth.config import Config
from dpsynth.data.splits import nested_balanced_order
from dpsynth.devices import default_device
from dpsynth.errors import InputError
from dpsynth.eval.classifier import accuracy, read_labelled, train
from dpsynth.io.atomic import atomic_dir
from dpsynth.plots import plot_accuracy_curve
from dpsynth.provenance import write_run_info
from dpsynth.stages.common import write_metrics
from dpsynth.tracking import Tracker

log = logging.getLogger(__name__)
SECTIONS = ("seed", "classify")
BASELINE = "nonprivate_baseline_real_test_accuracy"
BASELINE_NOTE = ("nonprivate_baseline_real_test_accuracy: the same classifier trained on the "
                 "real private split, a non-private upper bound for evaluation only; it is NOT "
                 "covered by (epsilon, delta) and must not be released as a DP result")


@dataclass(frozen=True, kw_only=True)
class ClassifyResult:
    """What `run` measured.

    Attributes:
        out_dir: the published folder.
        real_test_accuracy: top-1 accuracy on the real test split of the
            classifier trained on the largest synthetic subset.
        num_synthetic: that subset's size (`classify.sizes[-1]`).
        curve: (num_synthetic, real_test_accuracy) per size, increasing sizes.
        nonprivate_baseline_real_test_accuracy: the baseline trained on the real
            private split (not DP), or None when `classify.real_baseline` is off.
    """

    out_dir: Path
    real_test_accuracy: float
    num_synthetic: int
    curve: tuple[tuple[int, float], ...]
    nonprivate_baseline_real_test_accuracy: float | None


def summary(result: ClassifyResult, cfg: Config) -> str:
    """The CLI's one line about a finished run."""
    return (f"real test accuracy {result.real_test_accuracy:.3f} trained on "
            f"{result.num_synthetic} synthetic images (curve in {result.out_dir / 'curve.png'})")


def run(cfg: Config, *, synthetic_dir: Path, test_dir: Path, private_dir: Path | None,
        out_dir: Path, tracker: Tracker) -> ClassifyResult:
    """Train one classifier per `classify.sizes` on synthetic data, score each on
    the real test split, and publish the curve into `out_dir`, atomically.

    Args:
        cfg: resolved config (sections seed, classify).
        synthetic_dir: the synthetic set written by `sample`.
        test_dir: the real test split written by `prepare`.
        private_dir: the real private split, read only for the non-private
            baseline when `classify.real_baseline` is on (else ignored). Its size
            and its training loss are never logged (PRIVACY.md rule 6).
        out_dir: gets `metrics.json`, `curve.csv`, `curve.png`, `params.json`,
            `version.json`.
        tracker: gets params, `real_test_accuracy` with step = number of
            synthetic images, the labelled baseline, and the curve files.

    Raises:
        InputError: an empty split, classes or image shapes that differ between
            the splits, fewer synthetic images than the largest size, or no
            `private_dir` while the baseline is on. Nothing is written then.
    """
    cc = cfg.classify
    syn_x, syn_y, manifest = read_labelled(synthetic_dir, "synthetic set")
    test_x, test_y, _ = read_labelled(test_dir, "real test split",
                                      like=(manifest, f"synthetic set {synthetic_dir}"))
    if len(syn_x) < cc.sizes[-1]:
        raise InputError(f"{synthetic_dir} (synthetic set) has {len(syn_x)} images but "
                         f"classify.sizes={list(cc.sizes)} asks for up to {cc.sizes[-1]}; "
                         f"sample more (sample.num_samples >= {cc.sizes[-1]}) or lower "
                         "classify.sizes")
    private = None
    if cc.real_baseline:
        if private_dir is None:
            raise InputError("classify.real_baseline is on but no private split was given; "
                             "pass it (--private artifacts/prepare/private) or set "
                             "classify.real_baseline=false")
        private = read_labelled(private_dir, "private split",
                                like=(manifest, f"synthetic set {synthetic_dir}"))
    num_classes = len(manifest.classes)
    device = default_device()
    tracker.log_params(cfg.section(*SECTIONS) | {
        # no test split size: carved from the private pool, it would give the private size
        "num_synthetic_available": len(syn_x), "device": str(device)})

    # one seeded order; each size takes a prefix, so the subsets are nested and balanced
    order = nested_balanced_order(syn_y, cfg.seed)
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    for n in cc.sizes:
        idx = order[:n]
        net = train(cc.classifier, syn_x[idx], syn_y[idx], num_classes=num_classes,
                    seed=cfg.seed, device=device, desc=f"classify n={n}")
        acc = accuracy(net, test_x, test_y)
        curve.append((n, acc))
        tracker.log_metrics({"real_test_accuracy": acc}, step=n)
        log.info("%d synthetic images: real test accuracy %.4f", n, acc)
    train_seconds = time.perf_counter() - t0

    baseline = None
    if private is not None:
        # no progress bar: its loss and steps per epoch would tell about private data
        net = train(cc.classifier, private[0], private[1], num_classes=num_classes,
                    seed=cfg.seed, device=device, progress=False)
        baseline = accuracy(net, test_x, test_y)

    metrics: dict[str, object] = {
        "real_test_accuracy": curve[-1][1], "num_synthetic": curve[-1][0],
        "curve": {str(n): acc for n, acc in curve},
        "train_seconds": round(train_seconds, 2)}
    if baseline is not None:
        metrics |= {BASELINE: baseline, "nonprivate_baseline_note": BASELINE_NOTE}
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "curve.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["num_synthetic", "real_test_accuracy"])
            writer.writerows(curve)
        plot_accuracy_curve([n for n, _ in curve], [a for _, a in curve], tmp / "curve.png",
                            baseline=baseline)
        write_run_info(tmp, "classify", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_metrics({"num_synthetic": float(curve[-1][0]),
                         "train_seconds": round(train_seconds, 2)})
    if baseline is not None:
        tracker.log_metrics({BASELINE: baseline})
        tracker.log_params({"nonprivate_baseline_note": BASELINE_NOTE})
    tracker.log_artifact(out_dir / "curve.csv")
    tracker.log_artifact(out_dir / "curve.png")
    return ClassifyResult(out_dir=out_dir, real_test_accuracy=curve[-1][1],
                          num_synthetic=curve[-1][0], curve=tuple(curve),
                          nonprivate_baseline_real_test_accuracy=baseline)
