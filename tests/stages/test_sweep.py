"""The `sweep` stage: the privacy-utility curve, each point a ledger entry reserved
before any trains, refused whole past the budget, resumed without spending twice."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Callable

import pytest

from dpsynth import scoring
from dpsynth.config import Config
from dpsynth.data.roles import carved_source
from dpsynth.errors import InputError
from dpsynth.io.shards import read_dataset, write_dataset
from dpsynth.privacy.ledger import LedgerExceeded, PrivacyLedger, dataset_key
from dpsynth.report.sweep import curve_section
from dpsynth.stages import baseline, finetune, sweep
from dpsynth.tracking import NullTracker


@pytest.fixture
def cfg(dp_cfg: Callable[..., Config], scoring: tuple[str, ...]) -> Callable[..., Config]:
    return lambda *o: dp_cfg(*scoring, "sweep.epsilons=[1, 4, 8]", *o)


@pytest.fixture
def public_point(tmp_path: Path) -> Path:
    """A baseline output, written by hand (the sweep reads its metrics only)."""
    out = tmp_path / "baseline"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps(
        {"epsilon": 0.0, "public_only_real_test_accuracy": 0.25,
         "public_only_fd_sklearn_digits_cnn": 40.0}))
    return out


@pytest.fixture
def this_run(tmp_path: Path) -> dict[str, Path]:
    """This run's point at epsilon 8: the DP model's privacy.json and params.json, the
    classify and fid metrics, written by hand (the sweep reads only those)."""
    folders = {name: tmp_path / "run" / name for name in ("dp_model", "classify", "fid")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    (folders["dp_model"] / "privacy.json").write_text(json.dumps({"epsilon": 7.9}))
    (folders["dp_model"] / "params.json").write_text(json.dumps({"finetune": {"epsilon": 8}}))
    (folders["classify"] / "metrics.json").write_text(json.dumps(
        {"real_test_accuracy": 0.5, "nonprivate_baseline_real_test_accuracy": 0.9}))
    (folders["fid"] / "metrics.json").write_text(json.dumps({"fd_sklearn_digits_cnn": 30.0}))
    return folders


def _ledger(cfg: Config, private_dir: Path) -> PrivacyLedger:
    return PrivacyLedger(cfg.privacy.ledger_dir, dataset_key(read_dataset(private_dir)[0]))


def _sweep(cfg: Config, dirs: dict, out: Path, baseline_dir: Path, run: dict[str, Path],
           **kw) -> sweep.SweepResult:
    return sweep.run(cfg, model_dir=dirs["model"], dp_model_dir=run["dp_model"],
                     private_dir=dirs["private"], public_dir=dirs["public"],
                     test_dir=dirs["test"], baseline_dir=baseline_dir,
                     classify_dir=run["classify"], fid_dir=run["fid"], out_dir=out,
                     tracker=kw.pop("tracker", NullTracker()), work_dir=out.parent / "work",
                     **kw)


@pytest.fixture
def dirs(pretrained_dir: Path, private_dir: Path, digits_public_dir: Path,
         digits_eval_dirs: dict[str, Path]) -> dict[str, Path]:
    return {"model": pretrained_dir, "private": private_dir, "public": digits_public_dir,
            "test": digits_eval_dirs["test"]}


def test_each_new_point_is_scored_like_the_baseline_and_is_one_ledger_run(
        cfg: Callable[..., Config], dirs: dict[str, Path], this_run: dict[str, Path],
        tmp_path: Path, num_private: int, torch_one_thread: None) -> None:
    c = cfg()
    base = baseline.run(c, model_dir=dirs["model"], public_dir=dirs["public"],
                        test_dir=dirs["test"], out_dir=tmp_path / "baseline",
                        tracker=NullTracker(), work_dir=tmp_path / "bwork")
    fd = next(k for k in base.metrics if k.startswith("public_only_fd_"))[len("public_only_"):]
    (this_run["fid"] / "metrics.json").write_text(json.dumps({fd: 30.0}))
    tracker = NullTracker()
    result = _sweep(c, dirs, tmp_path / "sweep", tmp_path / "baseline", this_run,
                    tracker=tracker)
    out = tmp_path / "sweep"
    # ε = 8 is this run's model (read, not trained again); 1 and 4 are new DP runs
    assert [(p.epsilon, p.source) for p in result.points] == [
        (1.0, sweep.SWEPT), (4.0, sweep.SWEPT), (8.0, sweep.THIS_RUN)]
    assert sorted(p.name for p in out.iterdir()) == [
        "curve.csv", "curve.png", "eps-1", "eps-4", "metrics.json", "params.json",
        "version.json"]
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [(r["epsilon"], r["source"]) for r in rows] == [
        ("0", "public only"), ("1.0", "DP: sweep"), ("4.0", "DP: sweep"),
        ("8.0", "DP: this run")]
    assert float(rows[0]["real_test_accuracy"]) == pytest.approx(base.real_test_accuracy)
    assert float(rows[3]["real_test_accuracy"]) == 0.5 and float(rows[3]["frechet_distance"]) == 30

    # one ledger entry per new point, at its target, completed: nothing else spent
    entries = _ledger(c, dirs["private"]).entries()
    assert [(e.target_epsilon, e.status, e.steps_done) for e in entries] == [
        (1.0, "completed", 6), (4.0, "completed", 6)]
    assert [e.run_id for e in entries] == [p.run_id for p in result.points[:2]]
    # each point's model is the DP release at its target, its noise calibrated to it
    for p in result.points[:2]:
        privacy = json.loads((out / sweep.point_name(p.epsilon) / "model" /
                              "privacy.json").read_text())
        assert privacy["epsilon"] <= p.epsilon
    sigmas = [e.history[0][0] for e in entries]
    assert sigmas[0] > sigmas[1]  # less budget, more noise

    # the point's score is the baseline's recipe applied to its model
    again = scoring.score_model(c, model_dir=out / "eps-4" / "model", public_dir=dirs["public"],
                                test_dir=dirs["test"], work=tmp_path / "again",
                                fid_work=tmp_path / "fidwork")
    assert result.points[1].real_test_accuracy == pytest.approx(again["real_test_accuracy"])
    assert result.points[1].distance == pytest.approx(again[fd])

    # public numbers only: targets and scores, never N, sigma, q or an accounted epsilon
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epsilons"] == [1.0, 4.0, 8.0] and metrics["this_run_epsilon"] == 8.0
    assert metrics["dataset_runs"] == 2  # public, as finetune's: the runs on record
    assert set(metrics) >= {"real_test_accuracy_eps-1", "real_test_accuracy_eps-8",
                            "public_only_real_test_accuracy", f"{fd}_eps-4"}
    logged = [v for m, _ in tracker.metrics for v in m.values()]
    for values in (logged, [v for v in metrics.values() if not isinstance(v, (list, str))]):
        assert num_private not in values and not set(sigmas) & set(values)
    # the report's section: the curve, a row per point, the swept points' samples
    section = curve_section(out)
    text = re.sub(r'src="data:[^"]*"', "", section.body)  # text only
    assert "ε = 4" in text and "this run's model" in text and "public only" in text
    assert text.count("<img ") == 3 and str(num_private) not in text  # curve + 2 grids
    assert not (tmp_path / "work").exists()


def test_without_extra_targets_the_curve_is_this_runs_points_and_reads_nothing_private(
        cfg: Callable[..., Config], dirs: dict[str, Path], this_run: dict[str, Path],
        public_point: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finetune, "run", lambda *a, **k: pytest.fail("trained"))
    for targets in ("[]", "[8]"):  # a target equal to this run's is this run's model
        c = cfg(f"sweep.epsilons={targets}")
        result = _sweep(c, dirs | {"private": tmp_path / "no-such-folder"},
                        tmp_path / f"sweep{len(targets)}", public_point, this_run)
        assert [(p.epsilon, p.source, p.run_id) for p in result.points] == [
            (8.0, sweep.THIS_RUN, None)]
        rows = list(csv.DictReader((tmp_path / f"sweep{len(targets)}" / "curve.csv").open()))
        assert [(r["epsilon"], r["real_test_accuracy"], r["frechet_distance"]) for r in rows] == [
            ("0", "0.25", "40.0"), ("8.0", "0.5", "30.0")]
        assert "make sweep" in curve_section(tmp_path / f"sweep{len(targets)}").body
    assert not (tmp_path / "ledger").exists()


def test_a_sweep_past_the_budget_is_refused_whole_before_anything_trains(
        cfg: Callable[..., Config], dirs: dict[str, Path], public_point: Path,
        this_run: dict[str, Path], tmp_path: Path, num_private: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the ε = 4 point alone fits a budget of 4.05; the two together compose to 4.1 (RDP)
    c = cfg("sweep.epsilons=[2, 4]", "privacy.dataset_budget_epsilon=4.05")
    trained = []
    monkeypatch.setattr(finetune, "run", lambda *a, **k: trained.append(k))
    with pytest.raises(LedgerExceeded) as refusal:
        _sweep(c, dirs, tmp_path / "sweep", public_point, this_run)
    message = str(refusal.value)
    assert "This sweep (2 runs at target ε = 2, 4, 12 steps in all" in message
    assert "needs up to ε = 6 of the budget" in message
    assert "budget is (ε ≤ 4.05" in message and "nothing was reserved or trained" in message
    assert str(num_private) not in message
    assert trained == [] and _ledger(c, dirs["private"]).entries() == []
    assert not (tmp_path / "sweep").exists()


def test_an_interrupted_sweep_resumes_and_never_reuses_a_started_runs_entry(
        cfg: Callable[..., Config], dirs: dict[str, Path], public_point: Path,
        this_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        torch_one_thread: None) -> None:
    c = cfg("sweep.epsilons=[1, 2, 4]")
    real_run, calls = finetune.run, []

    def crash_on_second(*args, **kwargs):  # dies before its first checkpoint
        calls.append(kwargs["run_id"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(finetune, "run", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _sweep(c, dirs, tmp_path / "sweep", public_point, this_run)
    ledger = _ledger(c, dirs["private"])
    first = ledger.entries()
    assert [e.target_epsilon for e in first] == [1.0, 2.0, 4.0]  # all reserved up front
    monkeypatch.setattr(finetune, "run", real_run)
    trained = []
    monkeypatch.setattr(finetune, "run", lambda *a, **k: trained.append(k["run_id"])
                        or real_run(*a, **k))
    result = _sweep(c, dirs, tmp_path / "sweep", public_point, this_run)
    entries = ledger.entries()
    # point 1 is kept (not retrained), point 2 started and left no checkpoint, so it
    # runs under a new entry (the old one still counts), point 3 uses its reservation
    assert trained == [entries[3].run_id, first[2].run_id]
    assert [e.target_epsilon for e in entries] == [1.0, 2.0, 4.0, 2.0]
    assert [p.run_id for p in result.points] == [first[0].run_id, entries[3].run_id,
                                                 first[2].run_id, None]  # None: this run
    assert first[1].run_id not in {p.run_id for p in result.points}


def test_bad_inputs_are_named_before_the_ledger(
        cfg: Callable[..., Config], dirs: dict[str, Path], public_point: Path,
        this_run: dict[str, Path], tmp_path: Path) -> None:
    c = cfg()
    out = tmp_path / "sweep"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="baseline_dir=.*metrics.json.*artifacts/baseline"):
        _sweep(c, dirs, out, tmp_path / "empty", this_run)
    for role, fix in (("classify", "artifacts/classify"), ("fid", "artifacts/fid")):
        with pytest.raises(InputError, match=f"{role}_dir=.*metrics.json.*{fix}"):
            _sweep(c, dirs, out, public_point, this_run | {role: tmp_path / "empty"})
    with pytest.raises(InputError, match="dp_model_dir=.*no privacy.json.*artifacts/finetune"):
        _sweep(c, dirs, out, public_point, this_run | {"dp_model": tmp_path / "empty"})
    (tmp_path / "nameless").mkdir()
    (tmp_path / "nameless" / "privacy.json").write_text("{}")
    with pytest.raises(InputError, match="dp_model_dir=.*finetune.epsilon"):
        _sweep(c, dirs, out, public_point, this_run | {"dp_model": tmp_path / "nameless"})
    with pytest.raises(InputError, match="pass artifacts/pretrain"):
        _sweep(c, dirs | {"model": this_run["dp_model"]}, out, public_point, this_run)
    images, labels, manifest = read_dataset(dirs["private"])
    carved = tmp_path / "carved"
    write_dataset(carved, images, labels, manifest.classes,
                  source=carved_source("sklearn-digits", "private", 0), role="private")
    with pytest.raises(InputError, match="test_dir"):
        _sweep(c, dirs | {"test": carved}, out, public_point, this_run)
    assert _ledger(c, dirs["private"]).entries() == [] and not out.exists()
