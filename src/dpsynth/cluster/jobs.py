"""The manifests of a distributed training job: a Kubeflow Trainer v2 `TrainJob`
(runtime `torch-distributed`) or, for clusters on the older Training Operator, a
v1 `PyTorchJob`. Both run one command under torchrun on `nodes` pods of
`gpus_per_node` GPUs each, in the image, with the Secrets, node selector,
tolerations, shared memory and volume of the Kubeflow task that launches them.

Checked against the operators' CRD schemas (tests/data/crds/, with their
source); the torchrun rendezvous comes from the operator's environment:
Trainer's torch plugin sets `PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`,
`PET_MASTER_ADDR` and `PET_MASTER_PORT` (torchrun's own variables); the Training
Operator sets `MASTER_ADDR`, `MASTER_PORT` and the pod's `RANK` (0 for the
master). The command reads the former and falls back to the latter.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

Operator = Literal["trainjob", "pytorchjob"]
OPERATORS: dict[str, str] = {
    "trainjob": "Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1), runtime "
                "torch-distributed",
    "pytorchjob": "Training Operator v1 PyTorchJob (kubeflow.org/v1)",
}
TRAINJOB_API = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
PYTORCHJOB_API = ("kubeflow.org", "v1", "pytorchjobs")
CONFIG_ENV = "DPSYNTH_CONFIG"  # the resolved config, written to a file by the command
CONFIG_FILE = "/tmp/dpsynth-config.yaml"
MANAGER = "dpsynth.io/launcher"  # the TrainJob runtime patch's owner
LABEL = "dpsynth.io/stage"


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One distributed run of a dpsynth stage.

    Attributes:
        name: the job's name (`job_name`): a retried task computes the same one.
        namespace: where it runs (the pipeline's namespace).
        stage: the dpsynth stage (`pretrain`, `finetune`).
        args: the stage command's arguments after `dpsynth <stage>`, without
            `--config` (the config travels in `config_yaml`).
        config_yaml: the resolved config, passed in `DPSYNTH_CONFIG`.
        image: the container image (the task's).
        nodes: pods (one per node).
        gpus_per_node: GPUs per pod, one torchrun worker each.
        cpu, memory: requested (and, for memory, limited) per pod.
        shm: size of the memory-backed /dev/shm (NCCL and data loaders use it).
        env: plain environment variables.
        secret_env: environment variables read from Secrets: name -> (Secret, key),
            optional (a missing Secret or key leaves it unset), as the task's.
        node_selector, tolerations: where the pods may run.
        volume_claim, volume_mount: a PersistentVolumeClaim mounted in every pod
            (the state PVC: work folders, ledger), or None (an s3:// work root).
        service_account: the pods' ServiceAccount, or None (the namespace's default).
        labels: on the job (and its pods, through the operator).
    """

    name: str
    namespace: str
    stage: str
    args: tuple[str, ...]
    config_yaml: str
    image: str
    nodes: int
    gpus_per_node: int
    cpu: str = "8"
    memory: str = "32Gi"
    shm: str | None = "8Gi"
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    volume_claim: str | None = None
    volume_mount: str | None = None
    service_account: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"nodes={self.nodes}, gpus_per_node={self.gpus_per_node}: need "
                             "nodes >= 1 and gpus_per_node >= 0")
        if (self.volume_claim is None) != (self.volume_mount is None):
            raise ValueError("volume_claim and volume_mount go together")

    @property
    def workers_per_node(self) -> int:
        """torchrun workers per pod: one per GPU (one on a CPU-only pod)."""
        return max(1, self.gpus_per_node)


def job_name(run_id: str, stage: str) -> str:
    """`dpsynth-<stage>-<hash of run_id>`: a DNS-1035 label under 40 characters (the
    operators add suffixes to name pods and services), the same for every attempt of
    a pipeline run's task.

    >>> job_name("7f3c2a80-5f9e-4c59-9b4e-5b7c0a3b1e2d", "finetune")
    'dpsynth-finetune-c0bf27877497'
    """
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,15}", stage):
        raise ValueError(f"stage {stage!r}: lowercase letters, digits and '-', at most 16")
    return f"dpsynth-{stage}-{hashlib.sha256(run_id.encode()).hexdigest()[:12]}"


def torchrun_command(spec: JobSpec) -> list[str]:
    """The container command: write the config, then torchrun `dpsynth <stage>`.

    Every rendezvous setting comes from the operator's environment (PET_*; else the
    Training Operator's MASTER_ADDR / MASTER_PORT / RANK), with the spec's node and
    worker counts as the fallback.
    """
    stage = " ".join(shlex.quote(a) for a in ["-m", "dpsynth.cli", spec.stage, "--config",
                                              CONFIG_FILE, *spec.args])
    script = (
        f'printf "%s" "${CONFIG_ENV}" > {CONFIG_FILE} && exec torchrun '
        f'--nnodes="${{PET_NNODES:-{spec.nodes}}}" '
        f'--nproc-per-node="${{PET_NPROC_PER_NODE:-{spec.workers_per_node}}}" '
        '--node-rank="${PET_NODE_RANK:-${RANK:-0}}" '
        '--master-addr="${PET_MASTER_ADDR:-${MASTER_ADDR:-127.0.0.1}}" '
        '--master-port="${PET_MASTER_PORT:-${MASTER_PORT:-29500}}" '
        f"{stage}")
    return ["/bin/sh", "-c", script]


def _resources(spec: JobSpec) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": spec.cpu, "memory": spec.memory}
    limits: dict[str, Any] = {"memory": spec.memory}
    if spec.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    return {"requests": requests, "limits": limits}


def _env(spec: JobSpec) -> list[dict[str, Any]]:
    return ([{"name": CONFIG_ENV, "value": spec.config_yaml}]
            + [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
            + [{"name": k, "valueFrom": {"secretKeyRef": {"name": s, "key": key,
                                                          "optional": True}}}
               for k, (s, key) in sorted(spec.secret_env.items())])


def _volumes(spec: JobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts): /dev/shm in memory, and the state PVC."""
    volumes, mounts = [], []
    if spec.shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if spec.volume_claim:
        volumes.append({"name": "state",
                        "persistentVolumeClaim": {"claimName": spec.volume_claim}})
        mounts.append({"name": "state", "mountPath": spec.volume_mount})
    return volumes, mounts


def _labels(spec: JobSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dpsynth", "app.kubernetes.io/component": spec.stage,
            LABEL: spec.stage, **spec.labels}


def _pod_settings(spec: JobSpec) -> dict[str, Any]:
    pod: dict[str, Any] = {}
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    return pod


def trainjob_manifest(spec: JobSpec, runtime: str = "torch-distributed") -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob on the ClusterTrainingRuntime `runtime`.

    The trainer (image, command, nodes, processes and resources per node, env)
    goes in `spec.trainer`; what the runtime's pod template lacks (Secrets, volumes
    and mounts, node selector, tolerations, ServiceAccount) in a runtime patch of
    its replicated job `node`, container `node` (the torch-distributed runtime's
    names), owned by this launcher. The Secrets' variables are in the trainer's
    env (`valueFrom`), as in the task.
    """
    group, version, _ = TRAINJOB_API
    volumes, mounts = _volumes(spec)
    container: dict[str, Any] = {"name": "node"}
    if mounts:
        container["volumeMounts"] = mounts
    pod = _pod_settings(spec) | {"containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    return {
        "apiVersion": f"{group}/{version}", "kind": "TrainJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": group,
                           "kind": "ClusterTrainingRuntime"},
            "trainer": {"image": spec.image, "command": torchrun_command(spec),
                        "numNodes": spec.nodes, "numProcPerNode": spec.workers_per_node,
                        "resourcesPerNode": _resources(spec), "env": _env(spec)},
            "runtimePatches": [{"manager": MANAGER, "trainingRuntimeSpec": {"template": {
                "spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {
                    "template": {"spec": pod}}}}]}}}}],
        },
    }


def pytorchjob_manifest(spec: JobSpec) -> dict[str, Any]:
    """A Training Operator v1 PyTorchJob: one Master and `nodes - 1` Workers (the
    container must be named `pytorch`), restarted on failure by the operator, its
    pods deleted when it ends (the task keeps rank 0's log)."""
    group, version, _ = PYTORCHJOB_API
    volumes, mounts = _volumes(spec)
    container: dict[str, Any] = {"name": "pytorch", "image": spec.image,
                                 "command": torchrun_command(spec), "env": _env(spec),
                                 "resources": _resources(spec)}
    if mounts:
        container["volumeMounts"] = mounts
    pod = _pod_settings(spec) | {"containers": [container]}
    if volumes:
        pod["volumes"] = volumes

    def replicas(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": _labels(spec)}, "spec": pod}}

    replica_specs = {"Master": replicas(1)}
    if spec.nodes > 1:
        replica_specs["Worker"] = replicas(spec.nodes - 1)
    return {
        "apiVersion": f"{group}/{version}", "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
        "spec": {"pytorchReplicaSpecs": replica_specs,
                 "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3}},
    }


def manifest(spec: JobSpec, operator: str) -> dict[str, Any]:
    """The job for `operator` (`trainjob` or `pytorchjob`)."""
    if operator == "trainjob":
        return trainjob_manifest(spec)
    if operator == "pytorchjob":
        return pytorchjob_manifest(spec)
    raise ValueError(f"train_operator={operator!r}: must be one of {sorted(OPERATORS)} "
                     f"({'; '.join(f'{k}: {v}' for k, v in OPERATORS.items())})")


def check_scale(nodes: int, gpus_per_node: int, operator: str) -> None:
    """Refuse pipeline parameters that cannot make a job, naming them and the fix."""
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"train_nodes={nodes!r}: must be an integer >= 1")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ValueError(f"train_gpus_per_node={gpus_per_node!r}: must be an integer >= 1")
    if operator not in OPERATORS:
        raise ValueError(f"train_operator={operator!r}: must be one of {sorted(OPERATORS)} "
                         f"({'; '.join(f'{k}: {v}' for k, v in OPERATORS.items())})")
