"""How a generator is scored, identically, wherever a point of the privacy-utility
curve is measured (the public-only baseline, each point of a sweep): sampled
with the `sample` stage's settings, then scored by the `classify` stage's recipe
(at its largest size, on the real test split) and the `fid` stage's distances
in the run's one feature space.

It runs those stages through the registry (`dpsynth.stages.registry`), so the
stages that use it declare them (`Stage.uses`) and their code counts as theirs
(`dvc.yaml` deps), and no stage imports another.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from dpsynth.config import Config
from dpsynth.stages.registry import stage
from dpsynth.tracking import NullTracker


def score_model(cfg: Config, *, model_dir: Path, public_dir: Path, test_dir: Path, work: Path,
                fid_work: Path, sync_work: Callable[[], None] | None = None
                ) -> dict[str, float]:
    """Sample `model_dir` with the `sample` settings and score the samples with the
    `classify` recipe (at its largest size, on `test_dir`) and the `fid` distances
    (the domain CNN cached in `fid_work`, the `fid` stage's own work folder, so
    every model of a run is measured in one feature space). `sync_work` is called
    after each finished sampling shard (the caller's work-folder upload).

    Returns:
        ``real_test_accuracy``, ``num_synthetic`` and the `fid` metrics (``fd_*``,
        ``kid_*``, ...). The samples (and their ``grid.png``) stay in ``work/sample``.
    """
    largest = dataclasses.replace(cfg.classify, sizes=(cfg.classify.sizes[-1],),
                                  real_baseline=False)
    scoring = dataclasses.replace(cfg, classify=largest)
    quiet = NullTracker()  # the caller's MLflow run logs the scores
    stage("sample").run(cfg, model_dir=model_dir, out_dir=work / "sample", tracker=quiet,
                        work_dir=work / "sample-work", sync_work=sync_work)
    acc = stage("classify").run(scoring, synthetic_dir=work / "sample", test_dir=test_dir,
                                private_dir=None, out_dir=work / "classify", tracker=quiet)
    dist = stage("fid").run(cfg, synthetic_dir=work / "sample", test_dir=test_dir,
                            public_dir=public_dir, out_dir=work / "fid", tracker=quiet,
                            work_dir=fid_work)
    scores = {"real_test_accuracy": acc.real_test_accuracy,
              "num_synthetic": acc.num_synthetic}
    return scores | {k: v for k, v in dist.metrics.items()
                     if k != "num_synthetic" and v is not None}
