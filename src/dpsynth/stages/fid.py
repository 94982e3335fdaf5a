"""`dpsynth fid`: distribution metrics between synthetic images and the real test split.

For each extractor in `fid.extractors`: Frechet distance (`fid_inception` in
Inception-v3 space, `fd_<source>_cnn` in the domain CNN's), KID and
precision/recall. Features are streamed, so memory is flat in the number of
images. The reference statistics are cached in the work folder by reference
content hash and extractor identity; the domain CNN, trained on the PUBLIC split
only, by its config and the public data's hash.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from dpsynth.config import Config
from dpsynth.data.roles import refuse_private_split
from dpsynth.errors import InputError
from dpsynth.eval import distances
from dpsynth.eval.domain_cnn import (DomainCnnExtractor, load_domain_cnn, save_domain_cnn,
                                     train_domain_cnn)
from dpsynth.eval.features import (FeatureExtractor, FeatureStats, InceptionExtractor,
                                   extract_stats)
from dpsynth.io.atomic import atomic_dir, atomic_write_bytes, atomic_write_json
from dpsynth.io.shards import MANIFEST, Manifest, read_dataset, read_manifest, verify_dataset
from dpsynth.provenance import write_run_info
from dpsynth.stages.common import fingerprint, work_dir_for, write_metrics
from dpsynth.tracking import Tracker

log = logging.getLogger(__name__)
SECTIONS = ("seed", "data", "fid")  # data: the source names the domain-CNN feature space
EXTRACTOR_DIR = "extractor"  # the domain CNN, in out_dir
ACCURACY = "domain_cnn_real_test_accuracy"
_STATS_FORMAT = 1  # bump when the cached .npz layout or its meaning changes
_REFERENCE, _SYNTHETIC = 0, 1  # independent subsample streams per side


def _np_seed(seed: int) -> int:
    return seed % 2**32  # numpy's RandomState (used by torch-fidelity's KID) needs [0, 2^32)


@dataclass(frozen=True, kw_only=True)
class FidResult:
    """What `run` produced.

    Attributes:
        out_dir: the published folder.
        metrics: the contents of `metrics.json`.
        reference_from_cache: names of the extractors (`digits_cnn`, `inception`)
            whose reference statistics were read from the cache, not recomputed.
        domain_cnn_from_cache: the domain CNN was loaded, not trained.
    """

    out_dir: Path
    metrics: Mapping[str, float]
    reference_from_cache: tuple[str, ...]
    domain_cnn_from_cache: bool


def summary(result: FidResult, cfg: Config) -> str:
    """The CLI's one line about a finished run."""
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()
                      if k.startswith(("fid_", "fd_")))
    return f"{shown} (metrics in {result.out_dir / 'metrics.json'})"


def _input(role: str, data_dir: Path, fix: str) -> Manifest:
    """The manifest of an input folder, or an InputError naming `role` and `fix`."""
    if not (Path(data_dir) / MANIFEST).is_file():
        raise InputError(f"{role}={str(data_dir)!r}: no {MANIFEST} there; pass {fix}")
    manifest = read_manifest(data_dir)
    if manifest.count == 0:
        raise InputError(f"{role}={str(data_dir)!r}: holds no images; pass {fix}")
    return manifest


def _check_inputs(cfg: Config, syn: Manifest, ref: Manifest, pub: Manifest | None,
                  dirs: Mapping[str, Path]) -> None:
    if syn.shape != ref.shape:
        raise InputError(
            f"synthetic_dir={str(dirs['synthetic'])!r} holds images of shape (H, W, C)="
            f"{syn.shape} but test_dir={str(dirs['reference'])!r} holds {ref.shape}; "
            "compare samples with the test split of the same dataset (data.image_size, "
            "data.channels)")
    if pub is not None:
        refuse_private_split("public_dir", dirs["public"], pub,
                             "the domain CNN may only be trained on public data")
    if pub is not None and pub.shape != ref.shape:
        raise InputError(
            f"public_dir={str(dirs['public'])!r} holds images of shape {pub.shape}, the "
            f"reference {ref.shape}; the domain CNN must be trained on images of the "
            "evaluated shape: pass the public split prepared with the same data.image_size")
    # KID needs 2 features per side; precision/recall more than k (prc_neighborhood)
    need = max(2, cfg.fid.prc_neighborhood + 1)
    if cfg.fid.max_features < need:
        raise InputError(f"fid.max_features={cfg.fid.max_features}: must be >= {need} "
                         f"(fid.prc_neighborhood + 1)")
    for role, m in (("synthetic_dir", syn), ("test_dir", ref)):
        if m.count < need:
            raise InputError(f"{role}={str(dirs[role.removesuffix('_dir')])!r} holds {m.count} "
                             f"images; the metrics need at least {need} "
                             "(fid.prc_neighborhood + 1)")


def source_name(cfg: Config) -> str:
    """The public data's source kind, which names the domain feature space
    (`printed-digits` -> `printed_digits`: metric names are identifiers)."""
    return (cfg.data.public or cfg.data.private).kind.replace("-", "_")


def _domain_cnn(cfg: Config, public_dir: Path, pub: Manifest, cache: Path,
                out: Path) -> tuple[DomainCnnExtractor, bool]:
    """Train (or load from `cache`) the domain CNN on the PUBLIC split and copy it to `out`."""
    fp = fingerprint(cfg.seed, dataclasses.asdict(cfg.fid.domain_cnn), pub.content_hash,
                     "domain-cnn-v1")
    cached = cache / fp
    from_cache = False
    if cached.is_dir():
        try:
            net, _, sha = load_domain_cnn(cached)
            from_cache = True
            log.info("domain CNN: reusing %s", cached)
        except InputError as err:
            log.warning("domain CNN cache %s unusable (%s); training again", cached, err)
    if not from_cache:
        # PUBLIC split only (PRIVACY.md): trained on private data, the CNN and every
        # metric computed with it would leak it with no DP guarantee
        images, labels, _ = read_dataset(public_dir)
        net = train_domain_cnn(cfg.fid.domain_cnn, images, labels,
                               num_classes=len(pub.classes), seed=cfg.seed)
        with atomic_dir(cached) as tmp:
            sha = save_domain_cnn(tmp, net, extra={
                "trained_on": pub.content_hash, "split": "public", "source": pub.source,
                "classes": list(pub.classes), "seed": cfg.seed, "fingerprint": fp})
    shutil.copytree(cached, out)
    return DomainCnnExtractor(net, source_name(cfg), sha), from_cache


def _reference_stats(cfg: Config, test_dir: Path, ref: Manifest,
                     extractor: FeatureExtractor, cache: Path,
                     classifier: DomainCnnExtractor | None
                     ) -> tuple[FeatureStats, dict[str, float], bool]:
    """Reference statistics (and `classifier`'s accuracy on the same pass), from the
    cache if there."""
    key = fingerprint(ref.content_hash, extractor.identity, cfg.fid.max_features, cfg.seed,
                      classifier is not None, _STATS_FORMAT)
    path = cache / f"{extractor.name}-{key}.npz"
    if path.is_file():
        try:
            stats, extras = FeatureStats.from_npz(path)
            log.info("%s: reusing reference statistics %s", extractor.name, path)
            return stats, extras, True
        except Exception as err:  # noqa: BLE001 - truncated zip, missing key, ...: recompute
            log.warning("ignoring unreadable cache %s (%s)", path, err)
    correct = [0]

    def score(features: torch.Tensor, labels: np.ndarray) -> None:
        assert classifier is not None
        correct[0] += int((classifier.predict(features).numpy() == labels).sum())

    stats = extract_stats(test_dir, extractor, batch_size=cfg.fid.batch_size,
                          max_features=cfg.fid.max_features,
                          seed=[_np_seed(cfg.seed), _REFERENCE],
                          desc=f"reference {extractor.name}",
                          on_batch=score if classifier is not None else None)
    extras = {ACCURACY: correct[0] / stats.count} if classifier is not None else {}
    atomic_write_bytes(path, stats.to_npz(extras))
    return stats, extras, False


def _metrics(cfg: Config, extractor: FeatureExtractor, syn: FeatureStats,
             ref: FeatureStats) -> tuple[dict[str, float], int]:
    fc, name = cfg.fid, extractor.name
    fd = distances.frechet_distance(syn, ref)
    kid = distances.kid(torch.from_numpy(syn.sample), torch.from_numpy(ref.sample),
                        subsets=fc.kid_subsets, subset_size=fc.kid_subset_size,
                        seed=_np_seed(cfg.seed))
    pr = distances.precision_recall(torch.from_numpy(syn.sample), torch.from_numpy(ref.sample),
                                    neighborhood=fc.prc_neighborhood)
    return {f"{extractor.frechet_name}_{name}": fd, f"kid_{name}_mean": kid.mean,
            f"kid_{name}_std": kid.std, f"precision_{name}": pr.precision,
            f"recall_{name}": pr.recall}, kid.subset_size


def run(cfg: Config, *, synthetic_dir: Path, test_dir: Path, public_dir: Path,
        out_dir: Path, tracker: Tracker, work_dir: Path | None = None) -> FidResult:
    """Measure how far the synthetic images are from the real test split.

    Args:
        cfg: resolved config (sections seed, fid; data for the source name).
        synthetic_dir: output of `dpsynth sample`.
        test_dir: the real test split (output of `dpsynth prepare`).
        public_dir: the PUBLIC split, the only data the domain CNN is trained on.
            Never pass the private split here (the split `dpsynth prepare` marks
            private is refused).
        out_dir: published atomically: `metrics.json`, `extractors.json`,
            `extractor/` (the domain CNN), `params.json`, `version.json`.
        tracker: receives the params (seed, fid) and the metrics.
        work_dir: caches (reference statistics, domain CNN); default
            `<out_dir parent>/.work/<out_dir name>`.

    Raises:
        InputError: a missing, empty or mismatched input; nothing is written.
    """
    fc = cfg.fid
    dirs = {"synthetic": Path(synthetic_dir), "reference": Path(test_dir),
            "public": Path(public_dir)}
    syn = _input("synthetic_dir", dirs["synthetic"],
                 "the output folder of `dpsynth sample` (e.g. artifacts/sample)")
    ref = _input("test_dir", dirs["reference"],
                 "the real test split of `dpsynth prepare` (e.g. artifacts/prepare/test)")
    use_cnn = "domain-cnn" in fc.extractors
    pub = _input("public_dir", dirs["public"], "the PUBLIC split of `dpsynth prepare` "
                 "(e.g. artifacts/prepare/public), never the private one") if use_cnn else None
    _check_inputs(cfg, syn, ref, pub, dirs)
    inception = None
    if "inception-v3-compat" in fc.extractors:  # before any work: a missing file fails fast
        device = "cuda" if torch.cuda.is_available() else "cpu"
        inception = InceptionExtractor.from_file(str(fc.inception_weights), device=device)
    # every shard's hash and content, before anything goes into the work folder's
    # caches or the output (the features are read again, shard by shard, below)
    for role, m in (("synthetic", syn), ("reference", ref), ("public", pub)):
        if m is not None:
            verify_dataset(dirs[role])

    work_dir = Path(work_dir) if work_dir else work_dir_for(out_dir)
    tracker.log_params(cfg.section(*SECTIONS))
    # not the reference (test split) size: carved out of the private pool, it would
    # give the private split's size with the public fractions (PRIVACY.md rule 6)
    metrics: dict[str, float] = {"num_synthetic": syn.count}
    reused: list[str] = []
    described = []
    cnn_from_cache = False
    with atomic_dir(out_dir) as tmp:
        extractors: list[FeatureExtractor] = []
        if use_cnn:
            assert pub is not None
            cnn, cnn_from_cache = _domain_cnn(cfg, dirs["public"], pub,
                                              work_dir / "domain-cnn", tmp / EXTRACTOR_DIR)
            extractors.append(cnn)
        if inception is not None:
            extractors.append(inception)
        for ext in extractors:
            # the CNN's test accuracy is a sanity check; only meaningful for the same classes
            scorer = ext if (isinstance(ext, DomainCnnExtractor) and pub is not None
                             and pub.classes == ref.classes) else None
            ref_stats, extras, cached = _reference_stats(cfg, dirs["reference"], ref, ext,
                                                         work_dir / "reference", scorer)
            if cached:
                reused.append(ext.name)
            syn_stats = extract_stats(dirs["synthetic"], ext, batch_size=fc.batch_size,
                                      max_features=fc.max_features,
                                      seed=[_np_seed(cfg.seed), _SYNTHETIC],
                                      desc=f"synthetic {ext.name}")
            values, kid_size = _metrics(cfg, ext, syn_stats, ref_stats)
            metrics |= values | extras
            described.append({"name": ext.name, "identity": ext.identity, "dim": ext.dim,
                              "metrics": sorted(values | extras), "kid_subset_size": kid_size,
                              "features_kept": {"synthetic": len(syn_stats.sample),
                                                "reference": len(ref_stats.sample)}})
        atomic_write_json(tmp / "extractors.json", described)
        write_run_info(tmp, "fid", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    log.info("fid metrics: %s", json.dumps(metrics))
    return FidResult(out_dir=Path(out_dir), metrics=metrics, reference_from_cache=tuple(reused),
                     domain_cnn_from_cache=cnn_from_cache)
