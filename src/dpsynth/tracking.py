"""Experiment tracking behind a small `Tracker` protocol.

`MlflowTracker` groups the stage runs of one pipeline execution under one parent
run (tag `dpsynth.pipeline_id`), so `mlflow ui` shows them together. What is
logged is public by construction: resolved config, aggregate metrics, plots.
Private images and per-example values are never passed to a tracker
(PRIVACY.md rule 6).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, ContextManager, Iterator, Literal, Mapping, Protocol

from dpsynth.config import TrackingConfig

ModelKind = Literal["classifier", "generator"]
# What of a model folder goes to MLflow: weights and public config only. A DP
# model's privacy.json stays out: its sample_rate q = B/N would give the private
# dataset's size (PRIVACY.md rule 6).
MODEL_FILES = ("config.json", "model.safetensors", "ema.safetensors", "params.json",
               "version.json")
PIPELINE_ID_ENV = "DPSYNTH_PIPELINE_ID"
PIPELINE_TAG = "dpsynth.pipeline_id"
STAGE_TAG = "dpsynth.stage"


class Tracker(Protocol):
    """Where a stage reports params, metrics and files."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def child(self, name: str) -> ContextManager["Tracker"]:
        """A nested run (e.g. one per hyperparameter configuration)."""
        ...

    def log_model(self, model_dir: Path, *, kind: ModelKind, registered_name: str | None = None,
                  alias: str | None = None) -> str | None:
        """Log a model folder as a loadable MLflow pyfunc model; optionally register it
        under `registered_name` and point `alias` at the new version.

        Returns:
            The registered version, or None when nothing was registered.
        """
        ...


class NullTracker:
    """Records calls in memory (useful in tests) and sends nothing anywhere."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.artifacts: list[Path] = []
        self.children: dict[str, NullTracker] = {}
        self.models: list[dict[str, Any]] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append(({k: float(v) for k, v in metrics.items()}, step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path))

    @contextlib.contextmanager
    def child(self, name: str) -> Iterator["NullTracker"]:
        self.children[name] = NullTracker()
        yield self.children[name]

    def log_model(self, model_dir: Path, *, kind: ModelKind, registered_name: str | None = None,
                  alias: str | None = None) -> str | None:
        self.models.append({"model_dir": Path(model_dir), "kind": kind,
                            "registered_name": registered_name, "alias": alias})
        return None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class MlflowTracker:
    """Logs to one MLflow (child) run through `client`."""

    def __init__(self, run_id: str, client: Any = None) -> None:
        import mlflow

        self._client = client if client is not None else mlflow.MlflowClient()
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow.entities

        flat = flatten(params)
        batch = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(batch), 100):
            self._client.log_batch(self.run_id, params=batch[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        import mlflow.entities

        ts = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    @contextlib.contextmanager
    def child(self, name: str) -> Iterator["MlflowTracker"]:
        run = self._client.get_run(self.run_id)
        tags = run.data.tags
        # stage tag "rank/config-03": direct children stay one per stage
        nested = self._client.create_run(run.info.experiment_id, run_name=name, tags={
            PIPELINE_TAG: tags.get(PIPELINE_TAG, ""),
            STAGE_TAG: f"{tags.get(STAGE_TAG, 'run')}/{name}", "mlflow.parentRunId": self.run_id})
        status = "FAILED"
        try:
            yield MlflowTracker(nested.info.run_id, self._client)
            status = "FINISHED"
        finally:
            self._client.set_terminated(nested.info.run_id, status=status)

    def log_model(self, model_dir: Path, *, kind: ModelKind, registered_name: str | None = None,
                  alias: str | None = None) -> str | None:
        import tempfile

        import mlflow.pyfunc
        import torch

        import dpsynth.serving
        from dpsynth.serving.signatures import signature

        model_dir = Path(model_dir)
        serving = Path(dpsynth.serving.__file__).parent
        with tempfile.TemporaryDirectory() as tmp:
            public = Path(tmp) / "files"
            public.mkdir()
            for name in MODEL_FILES:
                if (model_dir / name).is_file():
                    shutil.copy2(model_dir / name, public / name)
            saved = Path(tmp) / kind
            # "Models from code": the pyfunc is our code plus the safetensors folder,
            # no pickle. code_paths ships the dpsynth package so the model loads
            # where dpsynth is not installed.
            with warnings.catch_warnings():
                # MLflow suggests type hints / an input example; the signature we pass
                # already states the schema, and an example would run the model here
                warnings.simplefilter("ignore", UserWarning)
                mlflow.pyfunc.save_model(
                    str(saved), python_model=str(serving / f"{kind}_code.py"),
                    artifacts={"model": str(public)},
                    code_paths=[str(serving.parent)], signature=signature(kind, model_dir),
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                      "safetensors", "numpy", "diffusers", "kornia"])
            self._client.log_artifacts(self.run_id, str(saved), kind)
        if registered_name is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(registered_name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self._client.get_run(self.run_id).info.artifact_uri}/{kind}"
        version = self._client.create_model_version(registered_name, source, self.run_id)
        if alias is not None:
            self._client.set_registered_model_alias(registered_name, alias, version.version)
        return str(version.version)


def default_pipeline_id() -> str:
    """The id grouping this process's stage run with its siblings.

    `DPSYNTH_PIPELINE_ID` when set (the Makefile and the Kubeflow pipeline set
    it); otherwise a hash of the working folder and `params.yaml`, so the stages
    of one `dvc repro` share a parent run.
    """
    if os.environ.get(PIPELINE_ID_ENV):
        return os.environ[PIPELINE_ID_ENV]
    h = hashlib.sha256(str(Path.cwd()).encode())
    params = Path("params.yaml")
    if params.is_file():
        h.update(params.read_bytes())
    return "local-" + h.hexdigest()[:12]


@contextlib.contextmanager
def open_tracker(cfg: TrackingConfig, stage: str,
                 pipeline_id: str | None = None) -> Iterator[Tracker]:
    """A tracker for one stage run: MLflow child run, or `NullTracker` if disabled.

    The tracking URI is `MLFLOW_TRACKING_URI` when set, else `cfg.tracking_uri`.
    """
    if not cfg.enabled:
        yield NullTracker()
        return
    import mlflow

    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A client bound to the URI, not `mlflow.set_tracking_uri`: that also exports
    # MLFLOW_TRACKING_URI, which would then override every later stage's config.
    client = mlflow.MlflowClient(
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(cfg.experiment))
    pipeline_id = pipeline_id or default_pipeline_id()
    parents = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline_id}' "
        f"and tags.`{STAGE_TAG}` = 'pipeline'", max_results=1)
    if parents:
        parent_id = parents[0].info.run_id
    else:
        parent = client.create_run(experiment_id, run_name=f"pipeline {pipeline_id}",
                                   tags={PIPELINE_TAG: pipeline_id, STAGE_TAG: "pipeline"})
        parent_id = parent.info.run_id
    child = client.create_run(experiment_id, run_name=stage, tags={
        PIPELINE_TAG: pipeline_id, STAGE_TAG: stage, "mlflow.parentRunId": parent_id})
    status = "FAILED"
    try:
        yield MlflowTracker(child.info.run_id, client)
        status = "FINISHED"
    finally:
        client.set_terminated(child.info.run_id, status=status)
        # The parent stays open while stages run; each finished stage marks it
        # finished too, so the UI shows the pipeline's latest state.
        client.set_terminated(parent_id, status=status)
