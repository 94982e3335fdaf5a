"""`dpsynth.stages.classify` end to end on real digits standing in for synthetic
ones: metrics.json, curve.csv / curve.png, tracker calls, the labelled
non-private baseline (whose private split size never leaves the stage), nested
class-balanced subsets, and refusal of bad input with nothing written."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from dpsynth.config import Config
from dpsynth.errors import InputError
from dpsynth.io.shards import write_dataset
from dpsynth.stages import classify
from dpsynth.tracking import NullTracker

pytestmark = pytest.mark.usefixtures("torch_one_thread")
CLASSIFIER = "classify.classifier={depth: 10, widen: 1, epochs: 8, batch_size: 32, lr: 0.05}"
NUM_PRIVATE = 213  # tests/stages/conftest.py: NUM_EVAL_PRIVATE
CLASSES = tuple(str(k) for k in range(10))


@pytest.fixture(scope="module")
def finished(make_cfg: Callable[..., Config], digits_eval_dirs: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[classify.ClassifyResult, NullTracker, str]:
    """One real classify run (sizes 50 and 400, with the baseline), its tracker and
    everything it logged through `logging`."""
    cfg = make_cfg(CLASSIFIER, "classify.sizes=[50, 400]", "classify.real_baseline=true")
    tracker = NullTracker()
    handler = _Collect()
    logging.getLogger("dpsynth").addHandler(handler)
    logging.getLogger("dpsynth").setLevel(logging.DEBUG)
    try:
        result = classify.run(cfg, synthetic_dir=digits_eval_dirs["synthetic"],
                              test_dir=digits_eval_dirs["test"],
                              private_dir=digits_eval_dirs["private"],
                              out_dir=tmp_path_factory.mktemp("classify") / "classify",
                              tracker=tracker)
    finally:
        logging.getLogger("dpsynth").removeHandler(handler)
    return result, tracker, "\n".join(handler.messages)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_metrics_json_has_the_curve_and_the_labelled_baseline(
        finished: tuple[classify.ClassifyResult, NullTracker, str]) -> None:
    result, _, _ = finished
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert set(metrics) == {"real_test_accuracy", "num_synthetic", "curve",
                            "train_seconds", "nonprivate_baseline_real_test_accuracy",
                            "nonprivate_baseline_note"}
    assert metrics["num_synthetic"] == 400 == result.num_synthetic
    assert list(metrics["curve"]) == ["50", "400"]
    assert [(int(n), a) for n, a in metrics["curve"].items()] == list(result.curve)
    assert metrics["real_test_accuracy"] == metrics["curve"]["400"] == result.real_test_accuracy
    assert "not covered by (epsilon, delta)" in metrics["nonprivate_baseline_note"].replace(
        "NOT", "not")
    assert (metrics["nonprivate_baseline_real_test_accuracy"]
            == result.nonprivate_baseline_real_test_accuracy)
    # WRN-10-1, 8 epochs, on real digits: it learns (chance is 0.1)
    assert result.real_test_accuracy > 0.7
    assert 0 <= result.curve[0][1] < result.real_test_accuracy  # 50 images, 8 steps: barely
    assert result.nonprivate_baseline_real_test_accuracy > 0.6


def test_curve_files_and_run_info(finished: tuple[classify.ClassifyResult, NullTracker, str]
                                  ) -> None:
    result, _, _ = finished
    with open(result.out_dir / "curve.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["num_synthetic", "real_test_accuracy"]
    assert [(int(n), float(a)) for n, a in rows[1:]] == list(result.curve)
    with Image.open(result.out_dir / "curve.png") as img:
        assert img.format == "PNG" and img.size[0] >= 400
    assert sorted(p.name for p in result.out_dir.iterdir()) == [
        "curve.csv", "curve.png", "metrics.json", "params.json", "version.json"]
    assert set(json.loads((result.out_dir / "params.json").read_text())) == {"seed", "classify"}
    assert json.loads((result.out_dir / "version.json").read_text())["stage"] == "classify"


def test_tracker_gets_the_curve_by_step_and_the_baseline(
        finished: tuple[classify.ClassifyResult, NullTracker, str]) -> None:
    result, tracker, _ = finished
    by_step = [(step, m["real_test_accuracy"]) for m, step in tracker.metrics
               if "real_test_accuracy" in m]
    assert by_step == [(50, result.curve[0][1]), (400, result.curve[1][1])]
    logged = {k: v for m, _ in tracker.metrics for k, v in m.items()}
    assert logged["nonprivate_baseline_real_test_accuracy"] == \
        result.nonprivate_baseline_real_test_accuracy
    assert tracker.params["classify.sizes"] == [50, 400]
    assert "not covered by (epsilon, delta)" in tracker.params["nonprivate_baseline_note"] \
        .replace("NOT", "not")
    assert tracker.artifacts == [result.out_dir / "curve.csv", result.out_dir / "curve.png"]


def test_the_private_split_size_never_leaves_the_stage(
        finished: tuple[classify.ClassifyResult, NullTracker, str]) -> None:
    """PRIVACY.md rule 6: the baseline accuracy is the only private-derived number."""
    result, tracker, messages = finished

    def numbers(tree: Any) -> list[float]:
        if isinstance(tree, dict):
            return [x for v in tree.values() for x in numbers(v)]
        if isinstance(tree, list):
            return [x for v in tree for x in numbers(v)]
        return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []

    published = [json.loads((result.out_dir / name).read_text())
                 for name in ("metrics.json", "params.json")]
    logged = [tracker.params] + [m for m, _ in tracker.metrics]
    for value in numbers(published) + numbers(logged):
        assert value != NUM_PRIVATE
    assert not re.search(rf"(?<![\d.]){NUM_PRIVATE}(?![\d.])", messages)


def test_sizes_are_nested_class_balanced_subsets(
        make_cfg: Callable[..., Config], digits_eval_dirs: dict[str, Path],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What each classifier is trained on (training itself replaced by a recorder)."""
    calls: list[dict[str, Any]] = []

    def fake_train(cfg: Any, images: np.ndarray, labels: np.ndarray, **kw: Any) -> object:
        calls.append({"images": images, "labels": labels, **kw})
        return object()

    monkeypatch.setattr(classify, "train", fake_train)
    monkeypatch.setattr(classify, "accuracy", lambda net, images, labels: 0.5)
    cfg = make_cfg(CLASSIFIER, "classify.sizes=[10, 25, 100, 400]",
                   "classify.real_baseline=false")
    result = classify.run(cfg, synthetic_dir=digits_eval_dirs["synthetic"],
                          test_dir=digits_eval_dirs["test"], private_dir=tmp_path / "absent",
                          out_dir=tmp_path / "out", tracker=NullTracker())
    assert [len(c["labels"]) for c in calls] == [10, 25, 100, 400]  # no baseline run
    for small, large in zip(calls, calls[1:]):
        np.testing.assert_array_equal(small["images"], large["images"][:len(small["images"])])
    for c in calls[:-1]:  # the last takes all 400, as unbalanced as the set itself
        counts = np.bincount(c["labels"], minlength=10)
        assert counts.max() - counts.min() <= 1, counts
    assert result.nonprivate_baseline_real_test_accuracy is None
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert not any(k.startswith("nonprivate") for k in metrics)


def test_the_baseline_trains_without_a_progress_bar(
        make_cfg: Callable[..., Config], digits_eval_dirs: dict[str, Path],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, bool]] = []
    monkeypatch.setattr(classify, "train", lambda cfg, images, labels, **kw: calls.append(
        (len(images), kw.get("progress", True))))
    monkeypatch.setattr(classify, "accuracy", lambda net, images, labels: 0.5)
    classify.run(make_cfg(CLASSIFIER, "classify.sizes=[10]"),
                 synthetic_dir=digits_eval_dirs["synthetic"], test_dir=digits_eval_dirs["test"],
                 private_dir=digits_eval_dirs["private"], out_dir=tmp_path / "out",
                 tracker=NullTracker())
    assert calls == [(10, True), (NUM_PRIVATE, False)]


def _write(root: Path, name: str, n: int, shape: tuple[int, int, int] = (8, 8, 1),
           classes: tuple[str, ...] = CLASSES) -> Path:
    write_dataset(root / name, np.zeros((n, *shape), np.uint8), np.arange(n) % len(classes),
                  classes, source="test")
    return root / name


@pytest.mark.parametrize(("case", "match"), [
    ("too_few_synthetic", r"has 400 images but classify.sizes=\[50, 500\]"),
    ("classes", "has classes"),
    ("shape", r"shape \(H, W, C\)"),
    ("empty_test", "holds no images"),
    ("no_private", "classify.real_baseline is on"),
    ("private_classes", r"\(private split\) has classes"),
])
def test_bad_input_is_refused_and_nothing_is_written(
        case: str, match: str, make_cfg: Callable[..., Config],
        digits_eval_dirs: dict[str, Path], tmp_path: Path) -> None:
    inputs: dict[str, Path | None] = {"synthetic_dir": digits_eval_dirs["synthetic"],
                                      "test_dir": digits_eval_dirs["test"],
                                      "private_dir": digits_eval_dirs["private"]}
    sizes = "classify.sizes=[50, 500]" if case == "too_few_synthetic" else "classify.sizes=[50]"
    if case == "classes":
        inputs["test_dir"] = _write(tmp_path, "t", 20, classes=("cat", "dog"))
    elif case == "shape":
        inputs["test_dir"] = _write(tmp_path, "t", 20, shape=(16, 16, 1))
    elif case == "empty_test":
        inputs["test_dir"] = _write(tmp_path, "t", 0)
    elif case == "no_private":
        inputs["private_dir"] = None
    elif case == "private_classes":
        inputs["private_dir"] = _write(tmp_path, "p", 20, classes=CLASSES[:5])
    out = tmp_path / "artifacts" / "classify"
    tracker = NullTracker()
    with pytest.raises(InputError, match=match):
        classify.run(make_cfg(CLASSIFIER, sizes), out_dir=out, tracker=tracker,
                     **inputs)  # type: ignore[arg-type]
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert tracker.params == {} and tracker.metrics == [] and tracker.artifacts == []
