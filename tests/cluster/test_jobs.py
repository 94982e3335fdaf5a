"""The distributed training jobs (dpsynth.cluster): their manifests checked against
the upstream operators' CRD schemas (tests/data/crds/, SOURCE.md there), the
launcher against a fake Kubernetes API on 127.0.0.1 (the real `kubernetes`
client), and the pipeline's pretrain task run as a job whose command the fake
operator executes here: torchrun with two workers, the config and inputs where
the job finds them, the output copied back, a failure failing the task, a retry
reusing the work folder."""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import torch
import yaml
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model
from kubernetes import client as k8s

import components
from dpsynth.cluster import jobs, launcher
from dpsynth.cluster.stage_job import pod_settings
from fake_kube import FakeKube  # type: ignore[import-not-found]

CRDS = Path(__file__).resolve().parents[1] / "data" / "crds"
SCHEMAS = {"TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
           "PyTorchJob": "kubeflow.org_pytorchjobs.yaml"}


def crd_schema(kind: str) -> dict[str, Any]:
    """The CRD's served version's openAPIV3Schema as a JSON Schema that also refuses
    unknown fields: the API server prunes them silently from a structural schema,
    so a misspelt field would vanish rather than fail."""
    crd = yaml.safe_load((CRDS / SCHEMAS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("served", True))
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    # metadata is the API server's ObjectMeta: the CRD leaves it open
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate(manifest: dict[str, Any]) -> None:
    jsonschema.validate(manifest, crd_schema(manifest["kind"]))


SPEC = jobs.JobSpec(
    name=jobs.job_name("run-1", "finetune"), namespace="team-dp", stage="finetune",
    args=("--model", "/mnt/dpsynth-state/work/x/inputs/model", "--out", "s3://b/w/out"),
    config_yaml="seed: 0\n", image="registry.example.com/ml/dpsynth:0.1.0", nodes=4,
    gpus_per_node=8, cpu="8", memory="32Gi", shm="8Gi", env={"DPSYNTH_PIPELINE_ID": "run-1"},
    secret_env={"AWS_ACCESS_KEY_ID": ("dpsynth-pipeline-s3", "aws-access-key-id")},
    node_selector={"pool": "h200"},
    tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    volume_claim="dpsynth-state", volume_mount="/mnt/dpsynth-state",
    service_account="pipeline-runner")


@pytest.mark.parametrize("operator", ["trainjob", "pytorchjob"])
def test_manifests_validate_against_the_upstream_crds(operator: str) -> None:
    manifest = jobs.manifest(SPEC, operator)
    validate(manifest)
    for spec in (jobs.JobSpec(**{**SPEC.__dict__, "nodes": 1, "gpus_per_node": 1,
                                 "volume_claim": None, "volume_mount": None, "shm": None,
                                 "secret_env": {}, "node_selector": {}, "tolerations": ()}),):
        validate(jobs.manifest(spec, operator))  # the minimal job too


@pytest.mark.parametrize("kind, path, bad", [
    ("TrainJob", ("spec", "trainer"), {"numNodez": 2}),  # misspelt: pruned by the API
    ("TrainJob", ("spec",), {"runtimeRef": {"kind": "ClusterTrainingRuntime"}}),  # no name
    ("PyTorchJob", ("spec", "pytorchReplicaSpecs", "Master"), {"replicas": "one"}),
    ("PyTorchJob", ("spec",), {"runPolicy": {"backoffLimit": "three"}}),
])
def test_the_schema_check_catches_a_broken_manifest(kind: str, path: tuple[str, ...],
                                                    bad: dict[str, Any]) -> None:
    manifest = jobs.manifest(SPEC, "trainjob" if kind == "TrainJob" else "pytorchjob")
    node = manifest
    for key in path:
        node = node[key]
    node.update(copy.deepcopy(bad))
    with pytest.raises(jsonschema.ValidationError):
        validate(manifest)


@pytest.mark.parametrize("operator", ["trainjob", "pytorchjob"])
def test_manifests_round_trip_through_the_operators_sdk_models(operator: str) -> None:
    """Read into the SDK's own models (kubeflow-trainer-api 2.3.0, kubeflow-training
    1.9.4) and written back, a manifest is unchanged: no field the SDK does not know,
    none of a type it reads otherwise."""
    manifest = jobs.manifest(SPEC, operator)
    if operator == "trainjob":
        from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

        back = TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()
    else:
        from kubeflow.training.api_client import ApiClient

        class Response:
            data = json.dumps(manifest)

        api_client = ApiClient()
        back = api_client.sanitize_for_serialization(
            api_client.deserialize(Response(), "KubeflowOrgV1PyTorchJob"))
    assert back == manifest


def test_the_jobs_carry_the_tasks_pod_settings_and_scale() -> None:
    tj, pj = jobs.trainjob_manifest(SPEC), jobs.pytorchjob_manifest(SPEC)
    trainer = tj["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"  # a quantity
    assert tj["spec"]["runtimeRef"]["name"] == "torch-distributed"
    patched = tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]
    assert patched["name"] == "node"  # the torch-distributed runtime's job and container
    pod = patched["template"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["name"] == "node"
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    master = replicas["Master"]["template"]["spec"]
    assert master["containers"][0]["name"] == "pytorch"  # the operator's required name
    for pod_spec, container, env in ((pod, pod["containers"][0], trainer["env"]),
                                     (master, master["containers"][0],
                                      master["containers"][0]["env"])):
        assert pod_spec["nodeSelector"] == {"pool": "h200"}
        assert pod_spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert pod_spec["serviceAccountName"] == "pipeline-runner"
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
        assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "dpsynth-state"
        assert {m["mountPath"] for m in container["volumeMounts"]} == {
            "/dev/shm", "/mnt/dpsynth-state"}
        by_name = {e["name"]: e for e in env}
        assert by_name["DPSYNTH_CONFIG"]["value"] == "seed: 0\n"
        assert by_name["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
            "name": "dpsynth-pipeline-s3", "key": "aws-access-key-id", "optional": True}
        assert not any("value" in e and "s3cr" in e["value"] for e in env)
    command = trainer["command"]
    assert command[:2] == ["/bin/sh", "-c"] and pj["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"]["spec"]["containers"][0]["command"] == command
    assert '--nnodes="${PET_NNODES:-4}"' in command[2]
    assert '--nproc-per-node="${PET_NPROC_PER_NODE:-8}"' in command[2]
    assert "-m dpsynth.cli finetune --config /tmp/dpsynth-config.yaml --model" in command[2]


def test_job_names_are_stable_dns_labels() -> None:
    names = {jobs.job_name(f"run-{i}", "pretrain") for i in range(50)}
    assert len(names) == 50
    assert jobs.job_name("run-1", "pretrain") == jobs.job_name("run-1", "pretrain")
    for name in names:
        assert len(name) <= 40 and name[0].isalpha()
        assert all(c.islower() or c.isdigit() or c == "-" for c in name)
    with pytest.raises(ValueError, match="stage"):
        jobs.job_name("run-1", "Pre_Train")
    for bad, what in (((0, 1, "trainjob"), "train_nodes=0"),
                      ((1, 0, "trainjob"), "train_gpus_per_node=0"),
                      ((2, 1, "mpijob"), "train_operator='mpijob'")):
        with pytest.raises(ValueError, match=what):
            jobs.check_scale(*bad)


# --------------------------------------------------------------------------- launcher


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


def api(fake: FakeKube) -> k8s.ApiClient:
    return k8s.ApiClient(k8s.Configuration(host=fake.url))


@pytest.mark.parametrize("operator", ["trainjob", "pytorchjob"])
def test_launch_reports_transitions_and_succeeds(kube: FakeKube, operator: str) -> None:
    seen: list[str] = []
    outcome = launcher.launch_and_wait(jobs.manifest(SPEC, operator), api=api(kube), poll_s=0,
                                       echo=seen.append)
    assert not outcome.attached and kube.posts() == 1
    kind = "TrainJob" if operator == "trainjob" else "PyTorchJob"
    assert seen[0] == f"created {kind} team-dp/{SPEC.name}"
    states = [s.split(": ", 1)[1] for s in seen[1:]]
    assert states[:2] == ["running (Created)", "running (Running)"]
    assert states[2].startswith("done")


def test_a_failed_job_fails_with_its_reason(kube: FakeKube) -> None:
    kube.final = ("Failed", "BackoffLimitExceeded", "pod node-0 exited with code 1")
    with pytest.raises(launcher.JobFailed, match=r"TrainJob team-dp/dpsynth-finetune-\w+ "
                       r"failed: BackoffLimitExceeded: pod node-0 exited with code 1"):
        launcher.launch_and_wait(jobs.manifest(SPEC, "trainjob"), api=api(kube), poll_s=0,
                                 echo=lambda s: None)


def test_a_retry_attaches_to_a_running_job_and_recreates_a_failed_one(kube: FakeKube) -> None:
    manifest = jobs.manifest(SPEC, "trainjob")
    kube.script = [("Created", "", "")] + [("Running", "", "")] * 3
    kube.jobs[SPEC.name] = kube._create("trainjobs", manifest)  # a first attempt's job
    kube.jobs[SPEC.name].conditions = [{"type": "Running", "status": "True",
                                        "reason": "Running"}]
    outcome = launcher.launch_and_wait(manifest, api=api(kube), poll_s=0, echo=lambda s: None)
    assert outcome.attached and kube.posts() == 0  # never a second run beside the first
    kube.fail(SPEC.name, "NodeLost", "a node went away")
    seen: list[str] = []
    outcome = launcher.launch_and_wait(manifest, api=api(kube), poll_s=0, echo=seen.append)
    assert ("DELETE", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-dp/trainjobs/"
            f"{SPEC.name}") in kube.requests
    assert kube.posts() == 1 and not outcome.attached
    assert "failed before (NodeLost: a node went away); deleting it" in seen[0]


def test_a_job_that_never_ends_times_out_naming_it(kube: FakeKube) -> None:
    kube.script = [("Running", "", "")] * 1000
    with pytest.raises(launcher.JobFailed, match=r"did not finish within 0.05 s.*kubectl -n "
                                                 r"team-dp delete trainjobs"):
        launcher.launch_and_wait(jobs.manifest(SPEC, "trainjob"), api=api(kube), poll_s=0.01,
                                 timeout_s=0.05, echo=lambda s: None)


# --------------------------------------------------------------------------- the task


def public_split(out: Path) -> Path:
    """200 of scikit-learn's digits as a public split."""
    import numpy as np
    from sklearn.datasets import load_digits

    from dpsynth.io.shards import write_dataset

    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    write_dataset(out, images[:200], d.target[:200], [str(k) for k in range(10)], "digits")
    return out


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_the_pretrain_task_runs_as_a_job_and_a_retry_reuses_its_work_folder(
        kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's pretrain component with train_nodes x train_gpus_per_node = 2: the
    fake operator runs the job's own command (torchrun, 2 workers, the config from
    DPSYNTH_CONFIG, the input staged in the work folder); the task's model artifact
    is the job's output. A failed job fails the task; the retry finds the same work
    folder and job name, and the published model is the one a single process makes."""
    from kubernetes import config as k8s_config
    from safetensors.torch import load_file

    from dpsynth import config
    from dpsynth.stages import pretrain as pretrain_stage
    from dpsynth.tracking import NullTracker

    settings = ["tracking.enabled=false", "model.block_out_channels=[8, 16]",
                "model.norm_num_groups=4", "model.attention_levels=[1]",
                "diffusion.num_train_timesteps=100", "finetune.timesteps={kind: uniform}",
                "pretrain.steps=4", "pretrain.batch_size=8", "pretrain.checkpoint_every=2",
                "pretrain.log_every=2"]
    cfg = config.from_dict({}, settings)
    digits_public_dir = public_split(tmp_path / "public")
    (tmp_path / "config").write_text(yaml.safe_dump(cfg.to_dict()))
    conf = Artifact(uri=str(tmp_path / "config"))
    public = Dataset(uri=str(digits_public_dir))
    pod = {"image": "dpsynth:test", "namespace": "team-dp", "cpu": "1", "memory": "1Gi"}
    monkeypatch.setenv("DPSYNTH_JOB_POD", json.dumps(pod))
    monkeypatch.setattr(k8s_config, "load_incluster_config",
                        lambda: k8s.Configuration.set_default(k8s.Configuration(host=kube.url)))
    real_launch = launcher.launch_and_wait  # poll the fake operator often
    monkeypatch.setattr(launcher, "launch_and_wait",
                        lambda m, **kw: real_launch(m, **{**kw, "poll_s": 0.2}))
    assert pod_settings()["image"] == "dpsynth:test"

    def run_task(out: str) -> Model:
        model = Model(uri=str(tmp_path / out))
        components.pretrain.python_func(
            config=conf, public=public, work_root=str(tmp_path / "work"), model=model,
            metrics=Metrics(uri=str(tmp_path / f"{out}-metrics")),
            loss_plot=HTML(uri=str(tmp_path / f"{out}-plot")), train_nodes=1,
            train_gpus_per_node=2, train_operator="trainjob")
        return model

    kube.execute = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PORT": _free_port(),
                    # the image's PATH and package: here, this interpreter's
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "PYTHONPATH": str(Path(config.__file__).resolve().parents[2])}
    kube.final = None
    # a first attempt whose job fails (the pods' command refused: no such stage input)
    real_manifest = jobs.trainjob_manifest

    def broken(spec: jobs.JobSpec, runtime: str = "torch-distributed") -> dict[str, Any]:
        m = real_manifest(spec, runtime)
        m["spec"]["trainer"]["command"] = ["/bin/sh", "-c", "echo 'out of memory' >&2; exit 3"]
        return m

    monkeypatch.setattr(jobs, "trainjob_manifest", broken)
    with pytest.raises(launcher.JobFailed, match="failed: PodFailed: exit code 3"):
        run_task("attempt-1")
    first = sorted(p.name for p in (tmp_path / "work").iterdir())
    monkeypatch.setattr(jobs, "trainjob_manifest", real_manifest)
    model = run_task("attempt-2")  # the retry: same work folder, same job name (recreated)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == first  # reused
    assert kube.posts() == 2 and len(kube.jobs) == 1
    job = next(iter(kube.jobs.values()))
    assert job.manifest["spec"]["trainer"]["numProcPerNode"] == 2
    assert job.process.returncode == 0, job.log[-3000:]

    one = tmp_path / "one"
    pretrain_stage.run(cfg, public_dir=digits_public_dir, out_dir=one, tracker=NullTracker())
    wa, wb = load_file(one / "model.safetensors"), load_file(Path(model.path) /
                                                             "model.safetensors")
    for k in wa:
        if not k.endswith("to_k.bias"):  # see tests/training/test_data_parallel.py
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-5, msg=k)
    assert json.loads((Path(model.path) / "metrics.json").read_text())["steps"] == 4
    work = next((tmp_path / "work").iterdir())
    assert not (work / "inputs").exists()  # the staged input copies are removed
