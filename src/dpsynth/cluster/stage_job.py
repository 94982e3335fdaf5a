"""A stage run as a distributed job from a Kubeflow task: its inputs put where
every node can read them (the task's work folder: the state PVC or `s3://`), the
job created and watched (`launcher`), its output copied back into the task's
output artifact.

Everything the job needs lives under the task's work folder `location`:
`inputs/<name>` (each input folder, staged once per location), `out` (the
stage's output, and beside it `.work/out`, its checkpoints, which a retried job
resumes from). The job's pods mount the state PVC at the task's mount path, so a
local `location` (and the privacy ledger) has the same path in both.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from dpsynth.cluster import jobs, launcher
from dpsynth.config import Config
from dpsynth.io import published, s3
from dpsynth.io.atomic import atomic_dir
from dpsynth.stages import registry

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
POD_ENV = "DPSYNTH_JOB_POD"  # the pipeline's pod settings for the jobs (JSON)


def pod_settings(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job pods' settings the pipeline compiled in (image, resources, Secrets,
    node selector, tolerations, shared memory, the state PVC): `DPSYNTH_JOB_POD`."""
    env = os.environ if env is None else env
    if not env.get(POD_ENV):
        raise launcher.JobFailed(f"{POD_ENV} is not set: this task was not compiled to "
                                 "launch distributed jobs; recompile the pipeline (make "
                                 "pipeline) or run with train_nodes=1 train_gpus_per_node=1")
    return json.loads(env[POD_ENV])


def _namespace(pod: Mapping[str, Any]) -> str:
    if pod.get("namespace"):
        return str(pod["namespace"])
    try:
        return Path(NAMESPACE_FILE).read_text().strip()
    except OSError:
        return "default"


# the task's own variables the job's workers need: the MLflow parent run's id
PASSED_ON = ("DPSYNTH_PIPELINE_ID",)


def _passed_on() -> dict[str, str]:
    return {k: os.environ[k] for k in PASSED_ON if os.environ.get(k)}


def _join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


def stage_input(local: Path, location: str) -> None:
    """Put the input folder `local` at `location` (once: a retry finds it there)."""
    if s3.is_s3(location):
        if not published.is_published(location):
            published.upload_published(Path(local), location)
    elif not Path(location).is_dir():
        with atomic_dir(location) as tmp:
            shutil.copytree(local, tmp, dirs_exist_ok=True)


def fetch_output(location: str, out_dir: Path) -> None:
    """Copy the job's published output into the task's output folder."""
    with published.local_input(location) as local:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, out_dir, dirs_exist_ok=True)


def run_stage_as_job(stage: str, cfg: Config, *, inputs: Mapping[str, str | Path | None],
                     out_dir: str | Path, location: str, nodes: int, gpus_per_node: int,
                     operator: str, run_id: str, pod: Mapping[str, Any] | None = None,
                     api: Any = None, poll_s: float = 30.0,
                     echo: Callable[[str], None] = print) -> launcher.JobOutcome:
    """Run `stage` on `nodes` x `gpus_per_node` workers as an `operator` job.

    Args:
        stage: a registered stage that runs under torchrun (pretrain, finetune).
        cfg: the resolved config (the job gets it whole).
        inputs: input folders by registered name (local: the task's artifacts).
        out_dir: the task's output folder, filled from the job's output.
        location: the task's durable work folder (PVC path or s3:// prefix).
        run_id: the pipeline run's id: the job's name (`jobs.job_name`).
        pod: the pods' settings (default `pod_settings()`).
        api, poll_s, echo: as `launcher.launch_and_wait`.

    Raises:
        JobFailed: the job failed (with its reason) or could not be watched.
    """
    s3.configure(cfg.storage)
    pod = dict(pod_settings() if pod is None else pod)
    row = registry.stage(stage)
    args: list[str] = []
    for i in row.inputs:
        if inputs.get(i.name) is None:
            continue
        there = _join(location, "inputs", i.name)
        stage_input(Path(inputs[i.name]), there)
        args += [i.flag, there]
    out = _join(location, "out")
    args += ["--out", out, "-q"]
    spec = jobs.JobSpec(
        name=jobs.job_name(run_id, stage), namespace=_namespace(pod), stage=stage,
        args=tuple(args), config_yaml=yaml.safe_dump(cfg.to_dict(), sort_keys=False),
        image=pod["image"], nodes=nodes, gpus_per_node=gpus_per_node,
        env={k: str(v) for k, v in (pod.get("env") or {}).items()} | _passed_on(),
        secret_env={k: (s, key) for k, (s, key) in (pod.get("secret_env") or {}).items()},
        node_selector=dict(pod.get("node_selector") or {}),
        tolerations=tuple(pod.get("tolerations") or ()),
        volume_claim=pod.get("volume_claim"), volume_mount=pod.get("volume_mount"),
        service_account=pod.get("service_account"),
        labels={"dpsynth.io/pipeline-run": run_id[:63]})
    for key in ("cpu", "memory", "shm"):
        if pod.get(key):
            spec = replace(spec, **{key: pod[key]})
    echo(f"{stage}: {nodes} node(s) x {gpus_per_node} GPU(s) as a {operator} "
         f"({jobs.OPERATORS.get(operator, operator)}); work folder {location}")
    outcome = launcher.launch_and_wait(jobs.manifest(spec, operator), api=api, poll_s=poll_s,
                                       echo=echo)
    fetch_output(out, Path(out_dir))
    remove(_join(location, "inputs"))  # the staged copies (the private split among them)
    return outcome


def remove(location: str) -> None:
    """Delete a folder or an `s3://` prefix and everything under it."""
    if s3.is_s3(location):
        uri = s3.S3Uri.parse(location.rstrip("/"))
        c = s3.client()
        keys = list(s3.list_objects(c, uri))
        if keys:
            s3.delete_keys(c, uri, keys)
    else:
        shutil.rmtree(location, ignore_errors=True)
