"""`dpsynth baseline`: the public-only point, measured in the same run.

What would the synthetic data be worth without the private data? The
pre-trained model (public data only: epsilon = 0, no private budget spent) is
sampled with the `sample` stage's settings and scored with the very recipes
that score the DP model: the `classify` stage's classifier (at its largest
size, on the real test split) and the `fid` stage's distances (the same domain
CNN, trained on the public split with the same seed and config). The report's
headline is the difference: what DP fine-tuning adds over public-only, and what
it leaves to the real-data baseline.

This stage never reads the private split: its inputs are the pre-trained model,
the public split and the test split, and it refuses a folder `prepare` marked
private in either role.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from dpsynth.config import Config
from dpsynth.data.roles import refuse_private_split
from dpsynth.errors import InputError
from dpsynth.io.atomic import atomic_dir
from dpsynth.io.shards import read_manifest
from dpsynth.provenance import write_run_info
from dpsynth.scoring import score_model
from dpsynth.stages.common import work_dir_for, write_metrics
from dpsynth.tracking import Tracker

log = logging.getLogger(__name__)
SECTIONS = ("seed", "data", "diffusion", "sample", "classify", "fid")
PREFIX = "public_only_"  # every metric of this stage: labelled where it appears
LABEL = "public only (epsilon = 0: the pre-trained model, no private data)"


@dataclass(frozen=True, kw_only=True)
class BaselineResult:
    """What `run` measured: `metrics` as published (keys start with `public_only_`)."""

    out_dir: Path
    metrics: Mapping[str, float]

    @property
    def real_test_accuracy(self) -> float:
        return float(self.metrics[f"{PREFIX}real_test_accuracy"])


def summary(result: BaselineResult, cfg: Config) -> str:
    """The CLI's one line about a finished run."""
    return (f"public only (epsilon 0) real test accuracy {result.real_test_accuracy:.3f} "
            f"(metrics in {result.out_dir / 'metrics.json'})")


def run(cfg: Config, *, model_dir: Path, public_dir: Path, test_dir: Path, out_dir: Path,
        tracker: Tracker, work_dir: Path | None = None) -> BaselineResult:
    """Sample `model_dir` (the pre-trained model) and score it like the DP model.

    Args:
        model_dir: the pre-trained model (`artifacts/pretrain`); a DP model is
            refused (its samples are not the public-only point).
        public_dir: the public split (trains the domain CNN, as in `fid`).
        test_dir: the real test split (scores both).
        out_dir: where `metrics.json`, `grid.png`, `params.json` and
            `version.json` are published, atomically.
        work_dir: resumable scratch (default `artifacts/.work/baseline`).

    Raises:
        InputError: a private split passed as `public_dir` or `test_dir`, or a
            fine-tuned model passed as `model_dir`.
    """
    public_dir, test_dir, model_dir = Path(public_dir), Path(test_dir), Path(model_dir)
    why = "the public-only baseline must not read the private data"
    refuse_private_split("public_dir", public_dir, read_manifest(public_dir), why)
    refuse_private_split("test_dir", test_dir, read_manifest(test_dir), why)
    if (model_dir / "privacy.json").is_file():
        raise InputError(f"model_dir={str(model_dir)!r} is a DP fine-tuned model; the "
                         "public-only baseline samples the pre-trained model: pass "
                         "artifacts/pretrain")
    work = Path(work_dir) if work_dir is not None else Path(work_dir_for(out_dir))
    if work.exists():
        shutil.rmtree(work)
    scores = score_model(cfg, model_dir=model_dir, public_dir=public_dir, test_dir=test_dir,
                         work=work, fid_work=Path(work_dir_for(Path(out_dir).parent / "fid")))
    metrics: dict[str, float] = {"epsilon": 0.0}
    metrics |= {f"{PREFIX}{k}": v for k, v in scores.items()}
    with atomic_dir(out_dir) as tmp:
        shutil.copy(work / "sample" / "grid.png", tmp / "grid.png")
        write_run_info(tmp, "baseline", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_params(cfg.section(*SECTIONS) | {"baseline": LABEL})
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    tracker.log_artifact(out_dir / "grid.png")
    shutil.rmtree(work, ignore_errors=True)
    log.info("public-only baseline: real test accuracy %.3f", scores["real_test_accuracy"])
    return BaselineResult(out_dir=Path(out_dir), metrics=metrics)
