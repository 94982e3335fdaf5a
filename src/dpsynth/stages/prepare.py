"""The `prepare` stage: raw sources -> validated public / private / test shards.

The private source gives the pool (its `"train"` subset, else `"all"`) and, if
it has one, the default test set. `data.test` / `data.public` may supply those
roles from other sources; every role not supplied is carved out of the pool by
a seeded, class-stratified split. Everything is written inside one atomic
folder, so a failure leaves nothing behind. The private split's size is derived
from private data: it stays in the private manifest, never in metrics, the
tracker or logs (PRIVACY.md rule 6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpsynth.config import Config, SourceConfig
from dpsynth.data.roles import ROLES, carved_source
from dpsynth.data.sources import LabeledImages, load_source
from dpsynth.data.splits import stratified_split
from dpsynth.data.transforms import to_format
from dpsynth.errors import InputError
from dpsynth.io.atomic import atomic_dir, atomic_write_json
from dpsynth.io.shards import Manifest, write_dataset
from dpsynth.provenance import write_run_info
from dpsynth.tracking import Tracker

log = logging.getLogger(__name__)
SECTIONS = ("seed", "data")


@dataclass(frozen=True, kw_only=True)
class PrepareResult:
    """What `prepare` wrote: one manifest per split, under `out_dir/<role>/`."""

    public: Manifest
    private: Manifest
    test: Manifest
    out_dir: Path


def summary(result: PrepareResult, cfg: Config) -> str:
    """The CLI's one line about a finished run."""
    return f"wrote public/private/test splits to {result.out_dir}"


def _load(field: str, spec: SourceConfig) -> dict[str, LabeledImages]:
    """Load a source, prefixing errors with the config field that named it."""
    try:
        subsets = load_source(spec)
    except InputError as err:
        raise InputError(f"{field} ({spec.kind}): {err}") from None
    for subset in subsets.values():
        if len(subset) == 0:
            raise InputError(f"{field} ({spec.kind}): {subset.source} holds no images; point "
                             f"{field}.path at a source with data")
    return subsets


def _pick(subsets: dict[str, LabeledImages], preferred: str, field: str) -> LabeledImages:
    """`subsets[preferred]` if present, else `subsets["all"]`."""
    for name in (preferred, "all"):
        if name in subsets:
            return subsets[name]
    raise InputError(f"{field}: the source has subsets {sorted(subsets)}, none of them "
                     f"{preferred!r} or 'all'; point {field}.path at a source that has one")


def gather_splits(cfg: Config) -> dict[str, LabeledImages]:
    """Load the sources and build the three raw (unformatted) splits.

    Args:
        cfg: the resolved config; uses `seed` and `data`.

    Returns:
        role -> split, for the roles public, private, test.

    Raises:
        InputError: a source is bad, or a split would be empty.
    """
    data = cfg.data
    private_subsets = _load("data.private", data.private)
    supplied: dict[str, LabeledImages] = {}
    if "train" in private_subsets:
        pool = private_subsets["train"]
        if "test" in private_subsets:  # the official test set, e.g. cifar10 test_batch
            supplied["test"] = private_subsets["test"]
    else:
        pool = _pick(private_subsets, "all", "data.private")
    if data.test is not None:
        supplied["test"] = _pick(_load("data.test", data.test), "test", "data.test")
    if data.public is not None:
        supplied["public"] = _pick(_load("data.public", data.public), "train", "data.public")

    from_pool = [role for role in ROLES if role not in supplied]
    for role in from_pool:
        if data.fractions[role] <= 0:
            raise InputError(f"the {role} split is empty: data.fractions.{role}="
                             f"{data.fractions[role]} and data.{role} is unset; set "
                             f"data.fractions.{role} > 0 or give data.{role} a source")
    indices = stratified_split(pool.labels, {r: data.fractions[r] for r in from_pool},
                               seed=cfg.seed)
    splits = dict(supplied)
    for role in from_pool:
        splits[role] = pool.take(indices[role], source=carved_source(pool.source, role, cfg.seed))
    return splits


def check_splits(splits: dict[str, LabeledImages]) -> None:
    """Refuse empty splits and private / test splits that miss a class.

    Public data may use its own label set (e.g. ImageNet classes for a CIFAR-10
    private set); test must share the private classes.

    Raises:
        InputError: naming the split, the class and what to change.
    """
    private = splits["private"]
    if splits["test"].classes != private.classes:
        raise InputError(f"data.test: classes {list(splits['test'].classes)} differ from the "
                         f"private classes {list(private.classes)}; the test split must use "
                         "the private label set")
    for role in ROLES:
        if len(splits[role]) == 0:
            raise InputError(f"the {role} split is empty ({splits[role].source}); raise "
                             f"data.fractions.{role} or give data.{role} a source with data")
    for role in ("private", "test"):
        counts = np.bincount(splits[role].labels, minlength=len(private.classes))
        missing = [private.classes[c] for c in np.flatnonzero(counts == 0)]
        if missing:
            raise InputError(
                f"class {missing[0]!r} has no examples in the {role} split "
                f"({splits[role].source}; classes without any: {missing}); add examples of "
                "it to the source, or change data.fractions (each role carved from the pool "
                "needs at least one example of every class)")

def carved_from_private(cfg: Config) -> set[str]:
    """The roles cut out of the private source's pool (rather than given their own
    source or an official split)."""
    if cfg.data.private.kind == "cifar10" and cfg.data.test is None:
        official_test = True  # cifar10's test_batch: its size is public knowledge
    else:
        official_test = cfg.data.private.kind == "camelyon17" and not cfg.data.private.hospitals
    carved = set()
    if cfg.data.public is None:
        carved.add("public")
    if cfg.data.test is None and not official_test:
        carved.add("test")
    return carved


def public_metrics(cfg: Config, splits: dict[str, LabeledImages]) -> dict[str, Any]:
    """Facts about the splits that are safe to publish (PRIVACY.md rule 6).

    The private split's size is never included. Nor is the size of a split
    carved out of the private pool: with the public fractions it would give the
    private size away (count / fraction).
    """
    carved = carved_from_private(cfg)
    metrics: dict[str, Any] = {f"{role}_count": len(splits[role])
                               for role in ("public", "test") if role not in carved}
    metrics["image_shape"] = [cfg.data.image_size, cfg.data.image_size, cfg.data.channels]
    metrics["num_classes"] = len(splits["private"].classes)
    return metrics


def run(cfg: Config, *, out_dir: Path, tracker: Tracker) -> PrepareResult:
    """Load, split, format and write the public / private / test datasets.

    Args:
        cfg: the resolved config; uses `seed` and `data`.
        out_dir: the stage's output folder (replaced atomically on success).
        tracker: receives the `seed`/`data` params and the public metrics only.

    Returns:
        The three manifests and `out_dir`.

    Raises:
        InputError: bad source, empty split or missing class; nothing is written.
    """
    out_dir = Path(out_dir)
    params = cfg.section(*SECTIONS)
    tracker.log_params(params)
    raw = gather_splits(cfg)
    check_splits(raw)
    size, channels = cfg.data.image_size, cfg.data.channels
    splits = {role: LabeledImages(to_format(raw[role].images, size, channels), raw[role].labels,
                                  raw[role].classes, raw[role].source) for role in ROLES}
    metrics = public_metrics(cfg, splits)
    with atomic_dir(out_dir) as tmp:
        manifests = {role: write_dataset(tmp / role, split.images, split.labels, split.classes,
                                         split.source, shard_size=cfg.data.shard_size,
                                         role=role)
                     for role, split in splits.items()}
        write_run_info(tmp, "prepare", params)
        atomic_write_json(tmp / "metrics.json", metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, list)})
    log.info("prepare: wrote the public, private and test splits to %s", out_dir)
    return PrepareResult(public=manifests["public"], private=manifests["private"],
                         test=manifests["test"], out_dir=out_dir)

