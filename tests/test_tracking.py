"""`dpsynth.tracking`: the in-memory tracker, `flatten`, and real MLflow runs on
a SQLite store (one parent run per pipeline, one child per stage)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dpsynth.config import TrackingConfig, from_dict
from dpsynth.io.shards import write_dataset
from dpsynth.stages import pretrain, sample
from dpsynth.tracking import (PIPELINE_ID_ENV, PIPELINE_TAG, STAGE_TAG, MlflowTracker,
                              NullTracker, default_pipeline_id, flatten, open_tracker)

URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT = "dpsynth-test"


# --------------------------------------------------------------------------- in memory


def test_null_tracker_records() -> None:
    t = NullTracker()
    t.log_params({"pretrain": {"steps": 12, "lr": 0.002}, "seed": 0})
    t.log_params({"num_params": 7})
    t.log_metrics({"loss": np.float32(0.5)}, step=2)
    t.log_metrics({"final_loss": 1})
    t.log_artifact("out/loss.csv")
    assert t.params == {"pretrain.steps": 12, "pretrain.lr": 0.002, "seed": 0, "num_params": 7}
    assert t.metrics == [({"loss": 0.5}, 2), ({"final_loss": 1.0}, None)]
    assert all(type(v) is float for m, _ in t.metrics for v in m.values())
    assert t.artifacts == [Path("out/loss.csv")]


def test_flatten() -> None:
    tree = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x", "f": {}}
    assert flatten(tree) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}
    assert flatten({"k": None}, prefix="p.") == {"p.k": None}
    assert flatten({}) == {}


def test_default_pipeline_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PIPELINE_ID_ENV, "kfp-run-42")
    assert default_pipeline_id() == "kfp-run-42"
    monkeypatch.delenv(PIPELINE_ID_ENV)
    monkeypatch.chdir(tmp_path)
    first = default_pipeline_id()
    assert first.startswith("local-") and first == default_pipeline_id()
    (tmp_path / "params.yaml").write_text("seed: 1\n")  # a new experiment, a new parent
    assert default_pipeline_id() != first


# --------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite store. Creating one takes ~5 s (alembic
    migrations); each test copies it (~0.05 s)."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          migrated_db: Path) -> Callable[[str], str]:
    """`store("name")`: the URI of a fresh SQLite store in tmp_path. Also unsets
    MLFLOW_TRACKING_URI (restored after the test) and runs the test in tmp_path,
    where MLflow puts artifacts (`./mlruns`)."""
    monkeypatch.setenv(URI_ENV, "unset-by-fixture")  # so monkeypatch restores it afterwards
    monkeypatch.delenv(URI_ENV)
    monkeypatch.chdir(tmp_path)

    def make(name: str) -> str:
        shutil.copyfile(migrated_db, tmp_path / name)
        return f"sqlite:///{tmp_path / name}"

    return make


def tracking_cfg(uri: str) -> TrackingConfig:
    return TrackingConfig(enabled=True, experiment=EXPERIMENT, tracking_uri=uri)


def runs_of(uri: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def split(runs: list[mlflow.entities.Run]
          ) -> tuple[list[mlflow.entities.Run], dict[str, mlflow.entities.Run]]:
    """(parent runs, {stage: child run})."""
    parents = [r for r in runs if r.data.tags.get(STAGE_TAG) == "pipeline"]
    children = {r.data.tags[STAGE_TAG]: r for r in runs
                if r.data.tags.get(STAGE_TAG) != "pipeline"}
    return parents, children


@pytest.fixture
def digits_split(tmp_path: Path) -> Path:
    d = load_digits()
    images = np.round(d.images[:200] * 255 / 16).astype(np.uint8)[..., None]
    out = tmp_path / "public"
    write_dataset(out, images, d.target[:200].astype(np.int64), [str(k) for k in range(10)],
                  source="sklearn-digits")
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; two threads on a busy 2-core box are far slower
    yield
    torch.set_num_threads(before)


def test_two_stages_share_one_parent_run(tmp_path: Path, store: Callable[[str], str],
                                         digits_split: Path, one_thread: None) -> None:
    uri = store("mlflow.db")
    cfg = from_dict({
        "model": {"block_out_channels": [16, 32], "norm_num_groups": 8, "attention_levels": [1]},
        "diffusion": {"num_train_timesteps": 100},
        "finetune": {"timesteps": {"kind": "uniform"}},
        "pretrain": {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "log_every": 2},
        "sample": {"num_samples": 10, "num_shards": 2, "num_inference_steps": 2},
        "tracking": {"experiment": EXPERIMENT, "tracking_uri": uri}})
    with open_tracker(cfg.tracking, "pretrain", pipeline_id="pipe-1") as tracker:
        assert isinstance(tracker, MlflowTracker)
        pretrain.run(cfg, public_dir=digits_split, out_dir=tmp_path / "pretrain",
                     tracker=tracker)
    with open_tracker(cfg.tracking, "sample", pipeline_id="pipe-1") as tracker:
        sample.run(cfg, model_dir=tmp_path / "pretrain", out_dir=tmp_path / "sample",
                   tracker=tracker)

    parents, children = split(runs_of(uri))
    assert len(parents) == 1 and set(children) == {"pretrain", "sample"}
    parent = parents[0]
    assert parent.data.tags[PIPELINE_TAG] == "pipe-1"
    assert parent.info.status == "FINISHED"
    for stage, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags[PIPELINE_TAG] == "pipe-1"
        assert child.info.run_name == stage and child.info.status == "FINISHED"

    # params: the flattened resolved config, values as strings
    params = children["pretrain"].data.params
    expected = {k: str(v) for k, v in flatten(cfg.section("seed", "model", "diffusion",
                                                          "pretrain")).items()}
    assert {k: params[k] for k in expected} == expected
    assert params["pretrain.steps"] == "6" and params["model.block_out_channels"] == "[16, 32]"
    # and the run's shape: the parameter count and the data-parallel workers
    assert set(params) == set(expected) | {"num_params", "pretrain.workers"}
    assert params["pretrain.workers"] == "1"
    assert children["sample"].data.params["sample.num_samples"] == "10"

    # metrics: the loss history with its steps equals loss.csv; summaries are logged too
    client = mlflow.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(children["pretrain"].info.run_id, "loss")
    with open(tmp_path / "pretrain" / "loss.csv", newline="") as f:
        rows = [(int(s), float(v)) for s, v in list(csv.reader(f))[1:]]
    assert sorted((m.step, m.value) for m in history) == rows == [
        (2, rows[0][1]), (4, rows[1][1]), (6, rows[2][1])]
    assert children["pretrain"].data.metrics["final_loss"] == rows[-1][1]
    assert children["sample"].data.metrics["num_samples"] == 10.0

    # artifacts
    listed = {a.path for a in client.list_artifacts(children["pretrain"].info.run_id)}
    assert listed == {"loss.csv", "loss.png"}
    listed = {a.path for a in client.list_artifacts(children["sample"].info.run_id)}
    assert listed == {"grid.png"}
    local = client.download_artifacts(children["pretrain"].info.run_id, "loss.csv",
                                      str(tmp_path / "dl"))
    assert Path(local).read_text() == (tmp_path / "pretrain" / "loss.csv").read_text()


def test_other_pipeline_id_gets_its_own_parent(store: Callable[[str], str]) -> None:
    uri = store("mlflow.db")
    for pipeline_id in ("pipe-a", "pipe-b", "pipe-a"):
        with open_tracker(tracking_cfg(uri), "prepare", pipeline_id=pipeline_id) as tracker:
            tracker.log_metrics({"count": 1.0})
    runs = runs_of(uri)
    parents, _ = split(runs)
    assert sorted(p.data.tags[PIPELINE_TAG] for p in parents) == ["pipe-a", "pipe-b"]
    by_parent = {p.data.tags[PIPELINE_TAG]: sum(
        r.data.tags.get("mlflow.parentRunId") == p.info.run_id for r in runs) for p in parents}
    assert by_parent == {"pipe-a": 2, "pipe-b": 1}


def test_failing_stage_ends_its_run_failed(store: Callable[[str], str]) -> None:
    uri = store("mlflow.db")
    with pytest.raises(RuntimeError, match="boom"):
        with open_tracker(tracking_cfg(uri), "pretrain", pipeline_id="p") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            raise RuntimeError("boom")
    parents, children = split(runs_of(uri))
    assert children["pretrain"].info.status == "FAILED"
    assert parents[0].info.status == "FAILED"  # the pipeline shows its latest state

    with open_tracker(tracking_cfg(uri), "pretrain", pipeline_id="p"):  # the retry
        pass
    parents, _ = split(runs_of(uri))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    statuses = sorted(r.info.status for r in runs_of(uri)
                      if r.data.tags[STAGE_TAG] == "pretrain")
    assert statuses == ["FAILED", "FINISHED"]


def test_env_uri_overrides_config(tmp_path: Path, store: Callable[[str], str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    env_uri = store("env.db")
    monkeypatch.setenv(URI_ENV, env_uri)
    with open_tracker(tracking_cfg(f"sqlite:///{tmp_path / 'config.db'}"), "prepare",
                      pipeline_id="p") as tracker:
        tracker.log_params({"seed": 0})
    assert not (tmp_path / "config.db").exists()
    assert len(runs_of(env_uri)) == 2  # parent + child


def test_config_uri_is_not_sticky(store: Callable[[str], str]) -> None:
    """Opening a tracker must not leave global state (MLflow's own tracking URI
    or MLFLOW_TRACKING_URI) that redirects a later tracker with another URI."""
    first, second = store("first.db"), store("second.db")
    with open_tracker(tracking_cfg(first), "prepare", pipeline_id="p"):
        pass
    assert URI_ENV not in os.environ
    with open_tracker(tracking_cfg(second), "prepare", pipeline_id="p"):
        pass
    assert len(runs_of(first)) == 2 and len(runs_of(second)) == 2


def test_many_params_are_all_logged(store: Callable[[str], str]) -> None:
    uri = store("mlflow.db")
    params = {"section": {f"key{i:03d}": i for i in range(250)}}  # > one log_batch of 100
    with open_tracker(tracking_cfg(uri), "prepare", pipeline_id="p") as tracker:
        tracker.log_params(params)
    _, children = split(runs_of(uri))
    assert children["prepare"].data.params == {
        f"section.key{i:03d}": str(i) for i in range(250)}


def test_disabled_tracking_touches_nothing(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(enabled=False, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with open_tracker(cfg, "pretrain", pipeline_id="p") as tracker:
        assert isinstance(tracker, NullTracker)
        tracker.log_metrics({"loss": 1.0}, step=1)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- nested runs, models


def test_null_tracker_records_children_and_models() -> None:
    t = NullTracker()
    with t.child("config-00") as c:
        c.log_metrics({"acc": 0.5})
    assert t.log_model(Path("m"), kind="generator", registered_name="g", alias="champion") is None
    assert t.children["config-00"].metrics == [({"acc": 0.5}, None)]
    assert t.models == [{"model_dir": Path("m"), "kind": "generator", "registered_name": "g",
                         "alias": "champion"}]


def test_child_runs_nest_under_the_stage_run(store: Callable[[str], str]) -> None:
    uri = store("mlflow.db")
    with open_tracker(tracking_cfg(uri), "rank", pipeline_id="p") as tracker:
        for i in range(2):
            with tracker.child(f"config-{i:02d}") as child:
                child.log_params({"lr": 0.1 * (i + 1)})
                child.log_metrics({"synthetic_val_accuracy": 0.5 + i / 10})
        with pytest.raises(ValueError):
            with tracker.child("config-02"):
                raise ValueError("diverged")
    runs = runs_of(uri)
    by_name = {r.info.run_name: r for r in runs}
    stage_id = by_name["rank"].info.run_id
    for i, status in ((0, "FINISHED"), (1, "FINISHED"), (2, "FAILED")):
        run = by_name[f"config-{i:02d}"]
        assert run.data.tags["mlflow.parentRunId"] == stage_id
        assert run.data.tags[STAGE_TAG] == f"rank/config-{i:02d}"
        assert run.data.tags[PIPELINE_TAG] == "p" and run.info.status == status
    assert by_name["config-01"].data.metrics["synthetic_val_accuracy"] == 0.6
    assert by_name["config-01"].data.params["lr"] == "0.2"
    # direct children of the pipeline: still one per stage
    parents, children = split([r for r in runs if "/" not in r.data.tags[STAGE_TAG]])
    assert len(parents) == 1 and set(children) == {"rank"}


def test_generator_is_registered_loadable_and_keeps_privacy_json_out(
        tmp_path: Path, store: Callable[[str], str], digits_split: Path,
        one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = store("mlflow.db")
    cfg = from_dict({
        "model": {"block_out_channels": [16, 32], "norm_num_groups": 8, "attention_levels": [1]},
        "diffusion": {"num_train_timesteps": 100},
        "finetune": {"timesteps": {"kind": "uniform"}},
        "pretrain": {"steps": 4, "batch_size": 8, "checkpoint_every": 4, "log_every": 2},
        "tracking": {"enabled": False}})
    pretrain.run(cfg, public_dir=digits_split, out_dir=tmp_path / "model", tracker=NullTracker())
    # a DP model folder's privacy.json holds q = B/N: it must not reach MLflow
    (tmp_path / "model" / "privacy.json").write_text('{"sample_rate": 0.123456789}')
    versions = []
    with open_tracker(tracking_cfg(uri), "rank", pipeline_id="p") as tracker:
        for _ in range(2):
            versions.append(tracker.log_model(tmp_path / "model", kind="generator",
                                              registered_name="dpsynth-generator",
                                              alias="champion"))
        run_id = tracker.run_id
    assert versions == ["1", "2"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert str(client.get_model_version_by_alias("dpsynth-generator", "champion").version) == "2"
    local = Path(client.download_artifacts(run_id, "generator", str(tmp_path / "dl")))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert "privacy.json" not in files and "ema.safetensors" in files
    assert not any("0.123456789" in p.read_text(errors="ignore")
                   for p in local.rglob("*.json"))
    assert not list(local.rglob("*.pkl"))  # models from code: no pickle

    monkeypatch.setenv(URI_ENV, uri)
    model = mlflow.pyfunc.load_model("models:/dpsynth-generator@champion")
    labels = np.arange(10)
    a = model.predict(labels, params={"seed": 3, "num_inference_steps": 3})
    b = model.predict(labels, params={"seed": 3, "num_inference_steps": 3})
    c = model.predict(labels, params={"seed": 4, "num_inference_steps": 3})
    assert a.shape == (10, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
