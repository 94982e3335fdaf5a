"""The `baseline` stage: the public-only point, sampled and scored like the DP model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from dpsynth.config import Config
from dpsynth.data.roles import carved_source
from dpsynth.errors import InputError
from dpsynth.io.shards import read_dataset, write_dataset
from dpsynth.report import sections
from dpsynth.stages import baseline, classify, fid, sample
from dpsynth.tracking import NullTracker

@pytest.fixture(scope="module")
def cfg(make_cfg: Callable[..., Config], scoring: tuple[str, ...]) -> Config:
    return make_cfg(*scoring)


def test_the_public_only_point_is_the_dp_recipe_applied_to_the_pretrained_model(
        cfg: Config, pretrained_dir: Path, digits_public_dir: Path,
        digits_eval_dirs: dict[str, Path], tmp_path: Path, torch_one_thread: None) -> None:
    """Labelled metrics, equal to what sample -> classify -> fid give on the
    pre-trained model with the same config."""
    test = digits_eval_dirs["test"]
    tracker = NullTracker()
    result = baseline.run(cfg, model_dir=pretrained_dir, public_dir=digits_public_dir,
                          test_dir=test, out_dir=tmp_path / "baseline", tracker=tracker,
                          work_dir=tmp_path / "work")
    published = json.loads((tmp_path / "baseline" / "metrics.json").read_text())
    assert published == dict(result.metrics)
    assert published["epsilon"] == 0.0
    assert all(k.startswith("public_only_") for k in published if k != "epsilon")
    assert sorted(p.name for p in (tmp_path / "baseline").iterdir()) == [
        "grid.png", "metrics.json", "params.json", "version.json"]
    logged = {k for metrics, _ in tracker.metrics for k in metrics}
    assert logged == set(published)
    assert "public only" in tracker.params["baseline"]
    assert not (tmp_path / "work").exists()  # scratch removed after publishing

    # the same recipe, step by step, by the stages the DP model goes through
    sample.run(cfg, model_dir=pretrained_dir, out_dir=tmp_path / "s", tracker=NullTracker())
    acc = classify.run(cfg, synthetic_dir=tmp_path / "s", test_dir=test, private_dir=None,
                       out_dir=tmp_path / "c", tracker=NullTracker())
    dist = fid.run(cfg, synthetic_dir=tmp_path / "s", test_dir=test,
                   public_dir=digits_public_dir, out_dir=tmp_path / "f", tracker=NullTracker())
    assert published["public_only_real_test_accuracy"] == pytest.approx(acc.real_test_accuracy)
    assert published["public_only_num_synthetic"] == 20
    fd = next(k for k in dist.metrics if k.startswith("fd_"))
    assert published[f"public_only_{fd}"] == pytest.approx(dist.metrics[fd], rel=1e-6)


def test_it_refuses_the_private_split_and_a_dp_model(
        cfg: Config, pretrained_dir: Path, digits_public_dir: Path,
        digits_eval_dirs: dict[str, Path], tmp_path: Path) -> None:
    images, labels, manifest = read_dataset(digits_eval_dirs["private"])
    private = tmp_path / "private"
    write_dataset(private, images, labels, manifest.classes,
                  source=carved_source("sklearn-digits", "private", 0), role="private")
    test = digits_eval_dirs["test"]
    for public_dir, test_dir, name in [(private, test, "public_dir"),
                                       (digits_public_dir, private, "test_dir")]:
        with pytest.raises(InputError, match=name):
            baseline.run(cfg, model_dir=pretrained_dir, public_dir=public_dir,
                         test_dir=test_dir, out_dir=tmp_path / "out", tracker=NullTracker())
    dp_model = tmp_path / "finetune"
    shutil.copytree(pretrained_dir, dp_model)
    (dp_model / "privacy.json").write_text("{}")
    with pytest.raises(InputError, match="pre-trained model: pass artifacts/pretrain"):
        baseline.run(cfg, model_dir=dp_model, public_dir=digits_public_dir, test_dir=test,
                     out_dir=tmp_path / "out", tracker=NullTracker())
    assert not (tmp_path / "out").exists()


def test_the_report_labels_the_three_rows_and_states_the_gain(tmp_path: Path) -> None:
    for name, metrics in [("classify", {"real_test_accuracy": 0.91, "num_synthetic": 2000,
                                        "nonprivate_baseline_real_test_accuracy": 0.99}),
                          ("baseline", {"epsilon": 0.0, "public_only_real_test_accuracy": 0.65,
                                        "public_only_num_synthetic": 2000,
                                        "public_only_fd_printed_digits_cnn": 14.0}),
                          ("fid", {"fd_printed_digits_cnn": 3.5, "num_synthetic": 2000})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    gain = sections.baseline_gain(tmp_path / "classify", tmp_path / "baseline")
    assert gain.startswith("DP fine-tuning: +26.0 points over public-only; 8.0 points from "
                           "real data")
    body = sections.baselines_section(tmp_path / "classify", tmp_path / "baseline",
                                      tmp_path / "fid", 10.0).body
    for text in ("public only (ε = 0)", "DP fine-tuned (ε = 10", "real data", "65.0%", "91.0%",
                 "99.0%", "14", "3.5", "NOT covered by (ε, δ)", "+26.0 points"):
        assert text in body, text
    assert sections.baseline_gain(tmp_path / "classify", None) is None
    assert "not run" in sections.baselines_section(tmp_path / "classify", None,
                                                   tmp_path / "fid", 10.0).body.lower()
