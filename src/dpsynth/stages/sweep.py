"""`dpsynth sweep`: the privacy-utility curve (the paper's Fig. 2).

The curve's points: the public-only model (ε = 0, the `baseline` stage), the
run's own DP model at ``finetune.epsilon`` (scored by the `classify` and `fid`
stages), and one more DP fine-tuning run per other target ε in
``sweep.epsilons`` (every other setting is the run's), each sampled and scored
exactly as the public-only baseline is (`dpsynth.scoring.score_model`: the `classify`
recipe at its largest size and the `fid` distances in the same domain-CNN
feature space, on the same real test split); the non-private real-data
baseline (read from `classify`, evaluation only) is the reference line. With
``sweep.epsilons`` empty (the default of `make run`) the stage trains nothing
and reads no private data: the curve is the run's two points. `make sweep`
sets it (`dvc exp run -S sweep.epsilons=[1,2,5,10]`).

Privacy. Every extra point is a run on the private data, so every point is an
entry in the dataset's privacy ledger. The sweep calibrates all its plans first
and reserves them in one ledger transaction (`PrivacyLedger.reserve_all`)
before any of them trains: a sweep that would take the dataset past its budget
is refused whole, with the budget it needs (the sum of its targets, public) in
the message, and spends nothing. The run's own point is its `finetune` entry,
never trained twice. A re-run of an interrupted sweep resumes: finished points
are kept, a point with a checkpoint resumes under its own ledger entry, and a
point that started but left no checkpoint gets a new entry (its attempt may
have released something, so its id is never reused), checked against the
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
from typing import Any, Callable, Mapping

from dpsynth.config import Config
from dpsynth.data.roles import refuse_private_split
from dpsynth.diffusion.unet import weights_file
from dpsynth.errors import InputError
from dpsynth.eval.names import distance_key
from dpsynth.io.atomic import atomic_dir, atomic_write_json
from dpsynth.io.shards import read_dataset, read_manifest, sha256_file
from dpsynth.io.work import no_sync
from dpsynth.plots import plot_privacy_utility
from dpsynth.privacy import accounting
from dpsynth.privacy.history import planned_history
from dpsynth.privacy.ledger import PlannedRun, PrivacyLedger, dataset_key
from dpsynth.provenance import write_run_info
from dpsynth.scoring import score_model
from dpsynth.stages.common import fingerprint, work_dir_for, write_metrics
from dpsynth.stages.registry import stage
from dpsynth.tracking import Tracker
from dpsynth.training.checkpoint import load_latest

log = logging.getLogger(__name__)
SECTIONS = ("seed", "data", "diffusion", "finetune", "privacy", "sample", "classify", "fid",
            "sweep")
PLAN = "plan.json"  # in the work folder: the points' ledger run ids, for a resumed sweep
CURVE_CSV, CURVE_PNG = "curve.csv", "curve.png"
STARTED, SCORES = "started", "scores.json"  # per point, in the work folder
# the curve.csv `source` column: where a point comes from
PUBLIC, THIS_RUN, SWEPT = "public only", "DP: this run", "DP: sweep"


@dataclass(frozen=True)
class SweepPoint:
    """One DP point of the curve: the target ε and what its model scored."""

    epsilon: float
    real_test_accuracy: float
    distance: float | None  # the Fréchet distance in the fid stage's first feature space
    run_id: str | None  # its privacy ledger entry (None: the run's own, `finetune`'s)
    source: str  # THIS_RUN or SWEPT


@dataclass(frozen=True, kw_only=True)
class SweepResult:
    """What `run` published in `out_dir`."""

    out_dir: Path
    points: tuple[SweepPoint, ...]
    metrics: Mapping[str, Any]


def summary(result: SweepResult, cfg: Config) -> str:
    """The CLI's one line about a finished run."""
    points = ", ".join(f"epsilon {p.epsilon:g}: {p.real_test_accuracy:.3f}"
                       for p in result.points)
    return (f"real test accuracy {points} (public only: "
            f"{result.metrics['public_only_real_test_accuracy']:.3f}); curve in "
            f"{result.out_dir / CURVE_PNG}")


def point_name(epsilon: float) -> str:
    """The folder of a point: ``eps-1``, ``eps-2.5``."""
    return f"eps-{epsilon:g}"


def run(cfg: Config, *, model_dir: Path, dp_model_dir: Path, private_dir: Path,
        public_dir: Path, test_dir: Path, baseline_dir: Path, classify_dir: Path,
        fid_dir: Path, out_dir: Path, tracker: Tracker, work_dir: Path | None = None,
        sync_work: Callable[[], None] | None = None) -> SweepResult:
    """Score the run's points, fine-tune, sample and score at every other
    ``sweep.epsilons``; publish the curve.

    Args:
        cfg: resolved config (the run's settings; ``sweep.epsilons`` the extra targets).
        model_dir: the pre-trained model (`artifacts/pretrain`) every point starts from.
        dp_model_dir: the run's DP model (`artifacts/finetune`), the point at its target.
        private_dir: the private split (`prepare` output); read only when there are
            points to train.
        public_dir: the public split (fine-tuning's monitoring loss, the domain CNN).
        test_dir: the real test split (scores every point).
        baseline_dir: the `baseline` stage's output: the public-only point (ε = 0).
        classify_dir: the `classify` stage's output: the run's point, and the
            non-private real-data baseline line.
        fid_dir: the `fid` stage's output: the run's point's Fréchet distance.
        out_dir: published atomically: ``curve.csv``, ``curve.png``, ``metrics.json``
            and ``eps-<ε>/`` per trained point (its DP model and ``grid.png``).
        work_dir: resumable scratch (default ``artifacts/.work/sweep``).
        sync_work: uploads the work folder's changes (a mirrored ``s3://`` one; the
            driver's `dpsynth.io.work.Staged.sync`): called when a point starts,
            after each of its checkpoints and shards, and when it is scored.

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
    refuse_private_split("test_dir", test_dir, read_manifest(test_dir), why)
    public = _read_metrics(baseline_dir, "public_only_real_test_accuracy", "baseline_dir",
                           "the baseline stage's output (dpsynth baseline), artifacts/baseline")
    scored = _read_metrics(classify_dir, "real_test_accuracy", "classify_dir",
                           "the classify stage's output (dpsynth classify), artifacts/classify")
    real = scored.get("nonprivate_baseline_real_test_accuracy")
    distances = _read_metrics(fid_dir, None, "fid_dir",
                              "the fid stage's output (dpsynth fid), artifacts/fid")
    fd = distance_key(distances)
    own = _run_point(Path(dp_model_dir), scored, distances, fd)
    targets = [e for e in cfg.sweep.epsilons if e != own.epsilon]

    work = Path(work_dir) if work_dir is not None else Path(work_dir_for(out_dir))
    runs, ledger = _reserve(cfg, targets, work, model_dir=model_dir, private_dir=private_dir)
    tracker.log_params(cfg.section(*SECTIONS))
    fid_work = Path(work_dir_for(out_dir.parent / "fid"))  # the fid stage's domain CNN
    trained: list[SweepPoint] = []
    for i, planned in enumerate(runs):
        eps = planned.target_epsilon
        log.info("sweep: point %d of %d, target epsilon %g", i + 1, len(runs), eps)
        with tracker.child(f"epsilon={eps:g}") as child:
            scores = _point(dataclasses.replace(cfg, finetune=dataclasses.replace(
                cfg.finetune, epsilon=eps)), planned.run_id, work / point_name(eps),
                model_dir=model_dir, private_dir=private_dir, public_dir=public_dir,
                test_dir=test_dir, fid_work=fid_work, tracker=child,
                sync_work=sync_work or no_sync)
        trained.append(SweepPoint(eps, float(scores["real_test_accuracy"]),
                                  None if fd is None or fd not in scores else float(scores[fd]),
                                  planned.run_id, SWEPT))
    points = sorted([own, *trained], key=lambda p: p.epsilon)

    public_acc = float(public["public_only_real_test_accuracy"])
    public_fd = public.get(f"public_only_{fd}") if fd else None
    metrics: dict[str, Any] = {
        "epsilons": [p.epsilon for p in points], "this_run_epsilon": own.epsilon,
        "public_only_real_test_accuracy": public_acc,
        **({f"public_only_{fd}": public_fd} if public_fd is not None else {}),
        **({"nonprivate_baseline_real_test_accuracy": real} if real is not None else {}),
        **({"distance": fd} if fd else {}),
        # public: how often the dataset was run on, as finetune records it (the report
        # states it where it cannot read the ledger)
        **({"dataset_runs": len(ledger.entries())} if ledger is not None else {})}
    for p in points:
        metrics[f"real_test_accuracy_{point_name(p.epsilon)}"] = p.real_test_accuracy
        if fd and p.distance is not None:
            metrics[f"{fd}_{point_name(p.epsilon)}"] = p.distance
    with atomic_dir(out_dir) as tmp:
        with open(tmp / CURVE_CSV, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epsilon", "real_test_accuracy", "frechet_distance", "source"])
            w.writerow([0, public_acc, "" if public_fd is None else public_fd, PUBLIC])
            for p in points:
                w.writerow([p.epsilon, p.real_test_accuracy,
                            "" if p.distance is None else p.distance, p.source])
        plot_privacy_utility([p.epsilon for p in points], [p.real_test_accuracy for p in points],
                             [p.distance for p in points], tmp / CURVE_PNG,
                             public_accuracy=public_acc, public_distance=public_fd,
                             real_accuracy=real, distance_name=(fd or "").split("_", 1)[-1],
                             this_run=own.epsilon)
        for p in trained:
            src, dst = work / point_name(p.epsilon), tmp / point_name(p.epsilon)
            shutil.copytree(src / "model", dst / "model")
            shutil.copy(src / "grid.png", dst / "grid.png")
        write_run_info(tmp, "sweep", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, float)})
    tracker.log_artifact(out_dir / CURVE_PNG)
    tracker.log_artifact(out_dir / CURVE_CSV)
    shutil.rmtree(work, ignore_errors=True)
    return SweepResult(out_dir=out_dir, points=tuple(points), metrics=metrics)


def _run_point(dp_model_dir: Path, scored: Mapping[str, Any], distances: Mapping[str, Any],
               fd: str | None) -> SweepPoint:
    """The run's own DP model as a point: its target ε, the classify and fid scores."""
    if not (dp_model_dir / "privacy.json").is_file():
        raise InputError(f"dp_model_dir={str(dp_model_dir)!r}: no privacy.json, so not a DP "
                         "model; pass the output of `dpsynth finetune` (artifacts/finetune)")
    params = _read_json(dp_model_dir / "params.json")
    target = params.get("finetune", {}).get("epsilon") if isinstance(params, dict) else None
    if not isinstance(target, (int, float)):
        raise InputError(f"dp_model_dir={str(dp_model_dir)!r}: no params.json with "
                         "finetune.epsilon; pass the folder `dpsynth finetune` wrote "
                         "(artifacts/finetune), or re-run finetune")
    return SweepPoint(float(target), float(scored["real_test_accuracy"]),
                      None if fd is None else float(distances[fd]), None, THIS_RUN)


def _reserve(cfg: Config, targets: list[float], work: Path, *, model_dir: Path,
             private_dir: Path) -> tuple[list[PlannedRun], PrivacyLedger | None]:
    """Plan one DP run per target and reserve them all in one ledger transaction
    (none: nothing is read or reserved). Resumes an interrupted sweep's ids."""
    if not targets:
        return [], None
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
    config_id = fingerprint(cfg.section(*SECTIONS), sha256_file(weights_file(model_dir)),
                            manifest.content_hash)
    ids = _resumable_ids(work, config_id)
    runs = []
    for eps in targets:
        fc = dataclasses.replace(cfg.finetune, epsilon=eps)
        rid = ids.get(point_name(eps))
        if rid is not None and not _may_reuse(work / point_name(eps), rid):
            log.warning("sweep point epsilon=%g started under ledger run %s and left no "
                        "checkpoint: it gets a new ledger entry (the old one still counts)",
                        eps, rid)
            rid = None
        rid = rid or f"sweep-{secrets.token_hex(6)}-{point_name(eps)}"
        runs.append(PlannedRun(rid, tuple(planned_history(fc, n)), fc.delta, eps))
    # the whole sweep at once, before any of it trains (refused whole, nothing recorded)
    ledger.reserve_all(runs, accountant=cfg.finetune.accountant,
                       budget_epsilon=cfg.privacy.dataset_budget_epsilon,
                       budget_delta=cfg.privacy.dataset_budget_delta, what="This sweep")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / PLAN, {"config_id": config_id,
                                    "run_ids": {point_name(r.target_epsilon): r.run_id
                                                for r in runs}})
    return runs, ledger


def _point(cfg: Config, run_id: str, point: Path, *, model_dir: Path, private_dir: Path,
           public_dir: Path, test_dir: Path, fid_work: Path, tracker: Tracker,
           sync_work: Callable[[], None]) -> dict[str, Any]:
    """Fine-tune (or resume) one point under its reserved ledger entry, then score it;
    a point already scored by an interrupted sweep is read back."""
    if (point / SCORES).is_file():
        done = json.loads((point / SCORES).read_text())
        if done.get("run_id") == run_id:
            return done
    if not (point / "model" / "privacy.json").is_file():  # else published, not yet scored
        point.mkdir(parents=True, exist_ok=True)
        (point / STARTED).write_text(run_id + "\n")  # from here on, never reused afresh
        sync_work()  # a retry elsewhere must see it too, before any step is taken
        stage("finetune").run(cfg, model_dir=model_dir, private_dir=private_dir,
                              public_dir=public_dir, out_dir=point / "model", tracker=tracker,
                              work_dir=point / "finetune-work", run_id=run_id,
                              sync_work=sync_work)
    scores = score_model(cfg, model_dir=point / "model", public_dir=public_dir,
                         test_dir=test_dir, work=point / "score", fid_work=fid_work,
                         sync_work=sync_work)
    shutil.copy(point / "score" / "sample" / "grid.png", point / "grid.png")
    shutil.rmtree(point / "score", ignore_errors=True)
    tracker.log_metrics({k: float(v) for k, v in scores.items()})
    tracker.log_artifact(point / "grid.png")
    atomic_write_json(point / SCORES, {"run_id": run_id, **scores})
    sync_work()
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
