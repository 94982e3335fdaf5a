"""`dpsynth.stages.rank` end to end on real digits standing in for synthetic
ones: metrics.json, scores.csv / scatter.png, one tracker child per config, the
champion classifier saved and both models registered; the choice uses
synthetic validation only; the bootstrap interval of rho / tau resamples the
real test examples and only its bounds leave the stage; bad input is refused
with nothing written."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from dpsynth.config import Config
from dpsynth.errors import InputError
from dpsynth.eval import ranking
from dpsynth.eval.classifier import accuracy, build, load_classifier
from dpsynth.io.shards import read_dataset, write_dataset
from dpsynth.stages import rank
from dpsynth.tracking import NullTracker

pytestmark = pytest.mark.usefixtures("torch_one_thread")
GRID = ("rank.grid=["
        "{depth: 10, widen: 1, lr: 0.05, epochs: 6, batch_size: 32, augment: crop},"
        "{depth: 10, widen: 1, lr: 0.002, epochs: 1, batch_size: 32, augment: none},"
        "{depth: 10, widen: 2, lr: 0.05, epochs: 2, batch_size: 32, augment: none}]")
CLASSES = tuple(str(k) for k in range(10))
CI_KEYS = ("spearman_rho_ci_low", "spearman_rho_ci_high", "kendall_tau_ci_low",
           "kendall_tau_ci_high")


@pytest.fixture(scope="module")
def finished(make_cfg: Callable[..., Config], digits_eval_dirs: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[rank.RankResult, NullTracker, Config]:
    cfg = make_cfg(GRID, "rank.val_fraction=0.25")
    tracker = NullTracker()
    result = rank.run(cfg, synthetic_dir=digits_eval_dirs["synthetic"],
                      test_dir=digits_eval_dirs["test"],
                      dp_model_dir=digits_eval_dirs["generator"],
                      out_dir=tmp_path_factory.mktemp("rank") / "rank", tracker=tracker)
    return result, tracker, cfg


def test_metrics_and_scores_agree(finished: tuple[rank.RankResult, NullTracker, Config]
                                  ) -> None:
    result, _, _ = finished
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert set(metrics) == {"spearman_rho", "kendall_tau", *CI_KEYS, "ci_confidence",
                            "regret", "chosen_config",
                            "chosen_synthetic_val_accuracy", "chosen_real_test_accuracy",
                            "best_real_test_accuracy", "num_configs", "num_synthetic_train",
                            "num_synthetic_val"}
    with open(result.out_dir / "scores.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["config", "synthetic_val_accuracy", "real_test_accuracy"]
    assert [int(r[0]) for r in rows[1:]] == [0, 1, 2]
    val = [float(r[1]) for r in rows[1:]]
    real = [float(r[2]) for r in rows[1:]]
    assert (tuple(val), tuple(real)) == (result.synthetic_val_accuracy, result.real_test_accuracy)
    assert metrics["num_configs"] == 3
    # stratified per class (largest remainder), so not exactly 300 / 100
    assert (metrics["num_synthetic_train"], metrics["num_synthetic_val"]) == (301, 99)
    assert metrics["chosen_config"] == result.chosen_config == int(np.argmax(val))
    assert metrics["chosen_real_test_accuracy"] == real[result.chosen_config]
    assert metrics["best_real_test_accuracy"] == max(real)
    assert metrics["regret"] == pytest.approx(max(real) - real[result.chosen_config])
    assert metrics["spearman_rho"] == pytest.approx(stats.spearmanr(val, real).statistic)
    assert metrics["kendall_tau"] == pytest.approx(stats.kendalltau(val, real).statistic)
    assert metrics["ci_confidence"] == 0.95
    assert -1 <= metrics["spearman_rho_ci_low"] <= metrics["spearman_rho_ci_high"] <= 1
    assert -1 <= metrics["kendall_tau_ci_low"] <= metrics["kendall_tau_ci_high"] <= 1
    assert result.spearman_rho_ci == (metrics["spearman_rho_ci_low"],
                                      metrics["spearman_rho_ci_high"])
    assert result.kendall_tau_ci == (metrics["kendall_tau_ci_low"],
                                     metrics["kendall_tau_ci_high"])
    # the grid spans a trained and a barely trained config: the ranking is informative
    assert max(real) > 0.7 and min(real) < 0.5
    with Image.open(result.out_dir / "scatter.png") as img:
        assert img.format == "PNG"
    assert sorted(p.name for p in result.out_dir.iterdir()) == [
        "classifier", "metrics.json", "params.json", "scatter.png", "scores.csv",
        "version.json"]
    assert set(json.loads((result.out_dir / "params.json").read_text())) == {"seed", "rank"}


def test_one_tracker_child_per_config(finished: tuple[rank.RankResult, NullTracker, Config]
                                      ) -> None:
    result, tracker, cfg = finished
    assert list(tracker.children) == ["config-00", "config-01", "config-02"]
    for i, child in enumerate(tracker.children.values()):
        assert child.params["config"] == i
        assert child.params["lr"] == cfg.rank.grid[i].lr
        assert child.params["augment"] == cfg.rank.grid[i].augment
        (metrics, step), = child.metrics
        assert metrics["synthetic_val_accuracy"] == result.synthetic_val_accuracy[i]
        assert metrics["real_test_accuracy"] == result.real_test_accuracy[i]
    assert tracker.params["rank.val_fraction"] == 0.25
    logged = {k: v for m, _ in tracker.metrics for k, v in m.items()}
    assert logged["chosen_config"] == result.chosen_config
    assert (logged["spearman_rho_ci_low"], logged["spearman_rho_ci_high"]) == result.spearman_rho_ci
    assert (logged["kendall_tau_ci_low"], logged["kendall_tau_ci_high"]) == result.kendall_tau_ci
    assert logged["ci_confidence"] == 0.95
    # aggregates only: no per-example value of the test split reaches the tracker
    assert all(isinstance(v, float) for m, _ in tracker.metrics for v in m.values())
    assert tracker.artifacts == [result.out_dir / "scores.csv", result.out_dir / "scatter.png"]


def test_champion_is_saved_and_both_models_registered(
        finished: tuple[rank.RankResult, NullTracker, Config],
        digits_eval_dirs: dict[str, Path]) -> None:
    result, tracker, cfg = finished
    assert tracker.models == [
        {"model_dir": result.out_dir / "classifier", "kind": "classifier",
         "registered_name": "dpsynth-classifier", "alias": "champion"},
        {"model_dir": digits_eval_dirs["generator"], "kind": "generator",
         "registered_name": "dpsynth-generator", "alias": "champion"}]
    folder = result.out_dir / "classifier"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    net, meta = load_classifier(folder)
    chosen = cfg.rank.grid[result.chosen_config]
    assert meta["rank_config"] == result.chosen_config
    assert meta["wrn"] == {"depth": chosen.depth, "widen": chosen.widen,
                           "dropout": chosen.dropout}
    assert (meta["image_size"], meta["channels"], meta["classes"]) == (8, 1, list(CLASSES))
    test_x, test_y, _ = read_dataset(digits_eval_dirs["test"])
    assert accuracy(net, test_x, test_y) == result.real_test_accuracy[result.chosen_config]


def test_the_choice_uses_synthetic_validation_only(
        make_cfg: Callable[..., Config], digits_eval_dirs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores built so that the best config on synthetic validation (1) is not the
    best on the real test split (0): a choice that peeked at real scores fails."""
    cfg = make_cfg(GRID, "rank.val_fraction=0.25")
    val, real = [0.5, 0.9, 0.7], [0.95, 0.6, 0.8]
    _fake_grid(monkeypatch, cfg, digits_eval_dirs, val, _first_right(real, 300))
    result = rank.run(cfg, synthetic_dir=digits_eval_dirs["synthetic"],
                      test_dir=digits_eval_dirs["test"],
                      dp_model_dir=digits_eval_dirs["generator"], out_dir=tmp_path / "rank",
                      tracker=NullTracker())
    metrics = json.loads((tmp_path / "rank" / "metrics.json").read_text())
    assert result.chosen_config == metrics["chosen_config"] == 1
    assert metrics["regret"] == pytest.approx(0.35)
    assert (metrics["chosen_real_test_accuracy"], metrics["best_real_test_accuracy"]) == (0.6, 0.95)
    # ranks: val 1, 3, 2; real 3, 1, 2: sum d^2 = 8, rho = 1 - 6 * 8 / (3 * 8) = -1
    assert metrics["spearman_rho"] == pytest.approx(-1.0)
    assert metrics["kendall_tau"] == pytest.approx(-1.0)
    # 15+ points apart on 300 test examples: no resample reorders them
    assert [metrics[k] for k in CI_KEYS] == pytest.approx([-1.0] * 4)
    meta = json.loads((tmp_path / "rank" / "classifier" / "config.json").read_text())
    assert meta["rank_config"] == 1 and meta["real_test_accuracy"] == 0.6


def test_constant_scores_give_null_correlations(
        make_cfg: Callable[..., Config], digits_eval_dirs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank, "train", lambda ccfg, *a, **kw: build(ccfg, num_classes=10,
                                                                    channels=1))
    monkeypatch.setattr(rank, "accuracy", lambda net, images, labels: 0.1)
    monkeypatch.setattr(rank, "predict", lambda net, images: np.zeros(len(images), np.int64))
    result = rank.run(make_cfg(GRID), synthetic_dir=digits_eval_dirs["synthetic"],
                      test_dir=digits_eval_dirs["test"],
                      dp_model_dir=digits_eval_dirs["generator"], out_dir=tmp_path / "rank",
                      tracker=NullTracker())
    metrics = json.loads((tmp_path / "rank" / "metrics.json").read_text())
    assert metrics["spearman_rho"] is None and metrics["kendall_tau"] is None
    assert all(metrics[k] is None for k in CI_KEYS)
    assert math.isnan(result.spearman_rho) and result.chosen_config == 0
    assert all(math.isnan(x) for x in result.spearman_rho_ci + result.kendall_tau_ci)


def test_the_interval_resamples_the_real_test_examples_with_the_configured_draws(
        make_cfg: Callable[..., Config], digits_eval_dirs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs that are right on their own random 90% of the test examples: the
    synthetic ranking says 0 < 1 < 2, the real test split cannot tell them apart,
    so the interval is wide and covers 0; it is the pure function's, on the stage's
    correctness matrix, with rank.bootstrap, rank.confidence and a seed from cfg.seed."""
    cfg = make_cfg(GRID, "rank.bootstrap=300", "rank.confidence=0.8", "seed=5")
    test_y = read_dataset(digits_eval_dirs["test"])[1]
    rng = np.random.default_rng(1)
    correct = rng.random((3, len(test_y))) < 0.9
    val = [0.5, 0.6, 0.7]
    _fake_grid(monkeypatch, cfg, digits_eval_dirs, val, correct)
    tracker = NullTracker()
    result = rank.run(cfg, synthetic_dir=digits_eval_dirs["synthetic"],
                      test_dir=digits_eval_dirs["test"],
                      dp_model_dir=digits_eval_dirs["generator"], out_dir=tmp_path / "rank",
                      tracker=tracker)
    metrics = json.loads((tmp_path / "rank" / "metrics.json").read_text())
    assert metrics["ci_confidence"] == 0.8
    low, high = metrics["spearman_rho_ci_low"], metrics["spearman_rho_ci_high"]
    assert low < 0 < high and high - low > 1
    for stat, name in ((ranking.spearman, "spearman_rho"), (ranking.kendall, "kendall_tau")):
        expected = ranking.bootstrap_interval(val, correct, stat, draws=300, confidence=0.8,
                                              seed=[5, rank._BOOTSTRAP_STREAM])
        assert (metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]) == expected
    assert tracker.params["rank.bootstrap"] == 300 and tracker.params["rank.confidence"] == 0.8
    # only the bounds leave: the published files are the usual ones, scores.csv has
    # one row per config, and nothing test-sized is in the result
    assert sorted(p.name for p in result.out_dir.iterdir()) == [
        "classifier", "metrics.json", "params.json", "scatter.png", "scores.csv",
        "version.json"]
    assert len((result.out_dir / "scores.csv").read_text().splitlines()) == 1 + 3
    assert all(np.size(getattr(result, f.name)) <= 3 for f in dataclasses.fields(result))


def _first_right(accuracies: list[float], n: int) -> list[np.ndarray]:
    """Per config, whether each of n test examples is right: the first accuracy * n."""
    return [np.arange(n) < round(a * n) for a in accuracies]


def _fake_grid(monkeypatch: pytest.MonkeyPatch, cfg: Config, dirs: dict[str, Path],
               val: list[float], right: Any) -> None:
    """Stand-ins for training and scoring: config i scores val[i] on synthetic
    validation and, on the real test split, predicts right where right[i] is True
    and wrong elsewhere."""
    test_x, test_y, _ = read_dataset(dirs["test"])

    def fake_train(ccfg: Any, images: np.ndarray, labels: np.ndarray, **kw: Any) -> Any:
        net = build(ccfg, num_classes=10, channels=1)
        net.grid_index = cfg.rank.grid.index(ccfg)  # type: ignore[assignment]
        return net

    def fake_accuracy(net: Any, images: np.ndarray, labels: np.ndarray) -> float:
        assert not np.array_equal(images, test_x), "the test split is scored per example"
        return val[net.grid_index]

    def fake_predict(net: Any, images: np.ndarray) -> np.ndarray:
        assert np.array_equal(images, test_x), "only the test split is predicted"
        return np.where(right[net.grid_index], test_y, (test_y + 1) % 10)

    monkeypatch.setattr(rank, "train", fake_train)
    monkeypatch.setattr(rank, "accuracy", fake_accuracy)
    monkeypatch.setattr(rank, "predict", fake_predict)


def _write(root: Path, name: str, n: int, classes: tuple[str, ...] = CLASSES,
           source: str = "test") -> Path:
    write_dataset(root / name, np.zeros((n, 8, 8, 1), np.uint8), np.arange(n) % len(classes),
                  classes, source=source)
    return root / name


@pytest.mark.parametrize(("case", "match"), [
    ("classes", "has classes"),
    ("empty_test", "holds no images"),
    ("empty_val", "give 10 to train and 0 to validate"),
    ("not_a_model", "not a model folder"),
    ("not_dp", "no privacy.json"),
    ("other_generator", "sampled from another model"),
])
def test_bad_input_is_refused_and_nothing_is_written(
        case: str, match: str, make_cfg: Callable[..., Config],
        digits_eval_dirs: dict[str, Path], tmp_path: Path) -> None:
    inputs = {"synthetic_dir": digits_eval_dirs["synthetic"],
              "test_dir": digits_eval_dirs["test"], "dp_model_dir": digits_eval_dirs["generator"]}
    if case == "classes":
        inputs["test_dir"] = _write(tmp_path, "t", 20, classes=("cat", "dog"))
    elif case == "empty_test":
        inputs["test_dir"] = _write(tmp_path, "t", 0)
    elif case == "empty_val":  # one image per class: all go to train
        inputs["synthetic_dir"] = _write(tmp_path, "s", 10)
    elif case in ("not_a_model", "not_dp"):
        inputs["dp_model_dir"] = tmp_path / "g"
        inputs["dp_model_dir"].mkdir()
        names = ["config.json"] + (["model.safetensors"] if case == "not_dp" else [])
        for name in names:
            (inputs["dp_model_dir"] / name).write_text("{}")
    elif case == "other_generator":
        inputs["synthetic_dir"] = _write(tmp_path, "s", 40,
                                         source="dpsynth-sample:0123456789abcdef")
    out = tmp_path / "artifacts" / "rank"
    tracker = NullTracker()
    with pytest.raises(InputError, match=match):
        rank.run(make_cfg(GRID), out_dir=out, tracker=tracker, **inputs)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert tracker.params == {} and tracker.children == {} and tracker.models == []
