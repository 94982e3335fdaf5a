"""`dpsynth sweep`: the privacy-utility curve (the paper's Fig. 2).

One DP fine-tuning run per target ε in ``sweep.epsilons`` (every other setting
is the main run's), each sampled and scored exactly as the public-only
baseline is (`baseline.score_model`: the `classify` recipe at its largest size
and the `fid` distances in the same domain-CNN feature space, on the same real
test split), plotted against ε next to the public-only point (ε = 0, read from
the `baseline` stage) and the non-private real-data baseline (read from
`classify`, evaluation only).

Privacy. Every point is a run on the private data, so every point is an entry
in the dataset's privacy ledger. The sweep calibrates all its plans first and
reserves them in one ledger transaction (`PrivacyLedger.reserve_all`) before
any of them trains: a sweep that would take the dataset past its budget is
refused whole, with the budget it needs (the sum of its targets, public) in the
message, and spends nothing. A re-run of an interrupted sweep resumes: finished
points are kept, a point with a checkpoint resumes under its own ledger entry,
and a point that started but left no checkpoint gets a new entry (its attempt
may have released something, so its id is never reused), checked against the
budget like any run.

What leaves the boundary: the target ε of each point, its accuracy and
distances; never σ, q, N or an accounted ε (each point's `privacy.json` stays
with its model, as `finetune`'s does).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dpsynth.config import Config
from dpsynth.diffusion.unet import weights_file
from dpsynth.errors import InputError
from dpsynth.io.atomic import atomic_dir, atomic_write_json
from dpsynth.io.shards import read_dataset, read_manifest, sha256_file
from dpsynth.plots import plot_privacy_utility
from dpsynth.privacy import accounting
from dpsynth.privacy.ledger import PlannedRun, PrivacyLedger, dataset_key
from dpsynth.provenance import write_run_info
from dpsynth.report.sections import distance_key
from dpsynth.report.sweep import sweep_page
from dpsynth.stages import baseline, finetune
from dpsynth.stages.common import fingerprint, work_dir_for, write_metrics
from dpsynth.stages.prepare import refuse_private_split
from dpsynth.tracking import Tracker
from dpsynth.training.checkpoint import load_latest

log = logging.getLogger(__name__)
SECTIONS = ("seed", "diffusion", "finetune", "privacy", "sample", "classify", "fid", "sweep")
PLAN = "plan.json"  # in the work folder: the points' ledger run ids, for a resumed sweep
CURVE_CSV, CURVE_PNG, INDEX = "curve.csv", "curve.png", "index.html"
STARTED, SCORES = "started", "scores.json"  # per point, in the work folder


@dataclass(frozen=True)
class SweepPoint:
    """One point of the curve: the target ε and what its DP model scored."""

    epsilon: float
    real_test_accuracy: float
    distance: float | None  # the Fréchet distance in the fid stage's first feature space
    run_id: str  # its privacy ledger entry


@dataclass(frozen=True)
class SweepResult:
    """What `run` published in `out_dir`."""

    out_dir: Path
    points: tuple[SweepPoint, ...]
    metrics: Mapping[str, Any]


def point_name(epsilon: float) -> str:
    """The folder of a point: ``eps-1``, ``eps-2.5``."""
    return f"eps-{epsilon:g}"


def run(cfg: Config, *, model_dir: Path, private_dir: Path, public_dir: Path, test_dir: Path,
        baseline_dir: Path, classify_dir: Path | None, out_dir: Path, tracker: Tracker,
        work_dir: Path | None = None) -> SweepResult:
    """Fine-tune, sample and score at every ``sweep.epsilons``; publish the curve.

    Args:
        cfg: resolved config (the main run's settings; ``sweep.epsilons`` the targets).
        model_dir: the pre-trained model (`artifacts/pretrain`) every point starts from.
        private_dir: the private split (`prepare` output).
        public_dir: the public split (fine-tuning's monitoring loss, the domain CNN).
        test_dir: the real test split (scores every point).
        baseline_dir: the `baseline` stage's output: the public-only point (ε = 0).
        classify_dir: the `classify` stage's output, for the non-private real-data
            baseline line (optional).
        out_dir: published atomically: ``curve.csv``, ``curve.png``, ``index.html``,
            ``metrics.json`` and ``eps-<ε>/`` (the DP model, its ``grid.png``).
        work_dir: resumable scratch (default ``artifacts/.work/sweep``).

    Raises:
        LedgerExceeded: the points together would exceed the dataset's budget;
            nothing was reserved or trained.
        InputError: a bad input (named, with the fix), before anything is reserved.
    """
    model_dir, private_dir, public_dir = Path(model_dir), Path(private_dir), Path(public_dir)
    test_dir, out_dir = Path(test_dir), Path(out_dir)
    # every input is checked before the ledger: a bad one must cost nothing
    if (model_dir / "privacy.json").is_file():
        raise InputError(f"model_dir={str(model_dir)!r} is a DP fine-tuned model; every point "
                         "of the sweep fine-tunes the pre-trained model: pass artifacts/pretrain")
    why = "the sweep publishes scores on it"
    refuse_private_split("test_dir", test_dir, read_manifest(test_dir).source, why)
    public = _read_metrics(baseline_dir, "public_only_real_test_accuracy", "baseline_dir",
                           "the baseline stage's output (dpsynth baseline), artifacts/baseline")
    real = (None if classify_dir is None else _read_metrics(
        classify_dir, None, "classify_dir", "the classify stage's output, artifacts/classify"
    ).get("nonprivate_baseline_real_test_accuracy"))
    images, _, manifest = read_dataset(private_dir)
    n = len(images)  # private: a call-time value, never logged (PRIVACY.md rule 6)
    if n == 0:
        raise InputError(f"{private_dir}: the private split holds no images; pass the "
                         "private split of `dpsynth prepare` (e.g. artifacts/prepare/private)")
    accounting.check_delta(cfg.finetune.delta, n)
    accounting.check_delta(cfg.privacy.dataset_budget_delta, n, "privacy.dataset_budget_delta")
    ledger = PrivacyLedger(cfg.privacy.ledger_dir, dataset_key(images),
                           legacy_key=manifest.content_hash)
    del images

    work = Path(work_dir) if work_dir is not None else Path(work_dir_for(out_dir))
    config_id = fingerprint(cfg.section(*SECTIONS), sha256_file(weights_file(model_dir)),
                            manifest.content_hash)
    ids = _resumable_ids(work, config_id)
    runs = []
    for eps in cfg.sweep.epsilons:
        fc = dataclasses.replace(cfg.finetune, epsilon=eps)
        rid = ids.get(point_name(eps))
        if rid is not None and not _may_reuse(work / point_name(eps), rid):
            log.warning("sweep point epsilon=%g started under ledger run %s and left no "
                        "checkpoint: it gets a new ledger entry (the old one still counts)",
                        eps, rid)
            rid = None
        rid = rid or f"sweep-{secrets.token_hex(6)}-{point_name(eps)}"
        runs.append(PlannedRun(rid, tuple(finetune.planned_history(fc, n)), fc.delta, eps))
    # the whole sweep at once, before any of it trains (refused whole, nothing recorded)
    ledger.reserve_all(runs, accountant=cfg.finetune.accountant,
                       budget_epsilon=cfg.privacy.dataset_budget_epsilon,
                       budget_delta=cfg.privacy.dataset_budget_delta, what="This sweep")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / PLAN, {"config_id": config_id,
                                    "run_ids": {point_name(r.target_epsilon): r.run_id
                                                for r in runs}})

    tracker.log_params(cfg.section(*SECTIONS))
    fid_work = Path(work_dir_for(out_dir.parent / "fid"))  # the fid stage's domain CNN
    points: list[SweepPoint] = []
    fd: str | None = None
    for i, planned in enumerate(runs):
        eps = planned.target_epsilon
        log.info("sweep: point %d of %d, target epsilon %g", i + 1, len(runs), eps)
        with tracker.child(f"epsilon={eps:g}") as child:
            scores = _point(dataclasses.replace(cfg, finetune=dataclasses.replace(
                cfg.finetune, epsilon=eps)), planned.run_id, work / point_name(eps),
                model_dir=model_dir, private_dir=private_dir, public_dir=public_dir,
                test_dir=test_dir, fid_work=fid_work, tracker=child)
        fd = distance_key(scores)
        points.append(SweepPoint(eps, float(scores["real_test_accuracy"]),
                                 None if fd is None else float(scores[fd]), planned.run_id))
        tracker.log_metrics({"epsilon": eps, "real_test_accuracy": points[-1].real_test_accuracy}
                            | ({fd: points[-1].distance} if fd else {}), step=i)

    public_fd = public.get(f"public_only_{fd}") if fd else None
    metrics: dict[str, Any] = {
        "epsilons": [p.epsilon for p in points],
        "public_only_real_test_accuracy": public["public_only_real_test_accuracy"],
        **({f"public_only_{fd}": public_fd} if public_fd is not None else {}),
        **({"nonprivate_baseline_real_test_accuracy": real} if real is not None else {})}
    for p in points:
        metrics[f"real_test_accuracy_{point_name(p.epsilon)}"] = p.real_test_accuracy
        if fd and p.distance is not None:
            metrics[f"{fd}_{point_name(p.epsilon)}"] = p.distance
    with atomic_dir(out_dir) as tmp:
        with open(tmp / CURVE_CSV, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epsilon", "real_test_accuracy", fd or "distance", "source"])
            w.writerow([0, public["public_only_real_test_accuracy"],
                        "" if public_fd is None else public_fd, "public only"])
            for p in points:
                w.writerow([p.epsilon, p.real_test_accuracy,
                            "" if p.distance is None else p.distance, "DP"])
        plot_privacy_utility([p.epsilon for p in points], [p.real_test_accuracy for p in points],
                             [p.distance for p in points], tmp / CURVE_PNG,
                             public_accuracy=public["public_only_real_test_accuracy"],
                             public_distance=public_fd, real_accuracy=real,
                             distance_name=(fd or "").split("_", 1)[-1])
        for p in points:
            src, dst = work / point_name(p.epsilon), tmp / point_name(p.epsilon)
            shutil.copytree(src / "model", dst / "model")
            shutil.copy(src / "grid.png", dst / "grid.png")
        write_run_info(tmp, "sweep", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
        (tmp / INDEX).write_text(sweep_page(
            points=[(p.epsilon, p.real_test_accuracy, p.distance) for p in points],
            public_accuracy=public["public_only_real_test_accuracy"], public_distance=public_fd,
            real_accuracy=real, distance_name=fd, curve_png=(tmp / CURVE_PNG).read_bytes(),
            grids={p.epsilon: (tmp / point_name(p.epsilon) / "grid.png").read_bytes()
                   for p in points},
            budget_epsilon=cfg.privacy.dataset_budget_epsilon,
            budget_delta=cfg.privacy.dataset_budget_delta, delta=cfg.finetune.delta,
            runs_on_record=len(ledger.entries())))
    tracker.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, float)})
    tracker.log_artifact(out_dir / CURVE_PNG)
    tracker.log_artifact(out_dir / CURVE_CSV)
    tracker.log_artifact(out_dir / INDEX)
    shutil.rmtree(work, ignore_errors=True)
    return SweepResult(out_dir, tuple(points), metrics)


def _point(cfg: Config, run_id: str, point: Path, *, model_dir: Path, private_dir: Path,
           public_dir: Path, test_dir: Path, fid_work: Path, tracker: Tracker
           ) -> dict[str, Any]:
    """Fine-tune (or resume) one point under its reserved ledger entry, then score it;
    a point already scored by an interrupted sweep is read back."""
    if (point / SCORES).is_file():
        done = json.loads((point / SCORES).read_text())
        if done.get("run_id") == run_id:
            return done
    if not (point / "model" / "privacy.json").is_file():  # else published, not yet scored
        point.mkdir(parents=True, exist_ok=True)
        (point / STARTED).write_text(run_id + "\n")  # from here on, never reused afresh
        finetune.run(cfg, model_dir=model_dir, private_dir=private_dir,
                     public_dir=public_dir, out_dir=point / "model", tracker=tracker,
                     work_dir=point / "finetune-work", run_id=run_id)
    scores = baseline.score_model(cfg, model_dir=point / "model", public_dir=public_dir,
                                  test_dir=test_dir, work=point / "score", fid_work=fid_work)
    shutil.copy(point / "score" / "sample" / "grid.png", point / "grid.png")
    shutil.rmtree(point / "score", ignore_errors=True)
    tracker.log_metrics({k: float(v) for k, v in scores.items()})
    tracker.log_artifact(point / "grid.png")
    atomic_write_json(point / SCORES, {"run_id": run_id, **scores})
    return {"run_id": run_id, **scores}


def _may_reuse(point: Path, run_id: str) -> bool:
    """Whether an interrupted sweep's reserved id may carry this point on: it never
    started, it finished, or it left a checkpoint of that run to resume."""
    if not (point / STARTED).is_file():
        return True
    if (point / SCORES).is_file() or (point / "model" / "privacy.json").is_file():
        return True
    state = load_latest(point / "finetune-work")
    return state is not None and state.meta.get("run_id") == run_id


def _resumable_ids(work: Path, config_id: str) -> dict[str, str]:
    """The points' ledger run ids of an interrupted sweep of this very config, else
    none (a sweep of another config starts afresh, its old work folder removed)."""
    try:
        plan = json.loads((work / PLAN).read_text())
    except (OSError, ValueError):
        plan = None
    if isinstance(plan, dict) and plan.get("config_id") == config_id:
        return dict(plan.get("run_ids") or {})
    if work.exists():
        shutil.rmtree(work)
    return {}


def _read_metrics(folder: Path, required: str | None, name: str, what: str) -> dict[str, Any]:
    path = Path(folder) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{name}={str(folder)!r}: no readable metrics.json ({exc}); pass "
                         f"{what}") from None
    if required is not None and not isinstance(metrics.get(required), (int, float)):
        raise InputError(f"{name}={str(folder)!r}: its metrics.json has no {required}; pass "
                         f"{what}")
    return metrics
