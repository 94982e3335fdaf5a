"""The dpsynth Kubeflow pipeline (KFP v2): prepare -> pretrain -> finetune (DP) ->
sample (fanned out over shards) -> fid, classify, rank, audit, with pretrain ->
baseline (the public-only point) beside them, then sweep (the privacy-utility
curve) -> report; the DAG of dvc.yaml.

Compile it with `make pipeline` (-> pipelines/dpsynth.yaml), or
`python -m pipelines.dpsynth_pipeline --output PATH`. What the cluster must
provide (images, Secrets, the state PVC) and the parameters are in
pipelines/README.md; the scheduling and resources tables below are where to
adapt it to a cluster. Compile-time settings come from environment variables
(all optional): DPSYNTH_IMAGE / DPSYNTH_IMAGE_CPU (components/images.py),
DPSYNTH_GPU_NODE_SELECTOR, DPSYNTH_GPU_TOLERATIONS, DPSYNTH_CPU_NODE_SELECTOR,
DPSYNTH_CPU_TOLERATIONS (JSON), DPSYNTH_STATE_PVC.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kfp import compiler, dsl, kubernetes

from components import (audit, baseline, classify, fid, finetune, merge_shards, prepare,
                        pretrain, rank, report, resolve_config, sample_shard, shard_indices,
                        sweep)
from components.images import GPU_IMAGE
from dpsynth.submit import base_config_text

REPO = Path(__file__).resolve().parents[1]
PIPELINE_NAME = "dpsynth"
DEFAULT_OUTPUT = REPO / "pipelines" / "dpsynth.yaml"


# The default base config: the embedded default experiment (params.yaml), as `make run`
# uses it.
DEFAULT_BASE_CONFIG = base_config_text(REPO / "params.yaml")


@dataclass(frozen=True)
class Resources:
    """What one task of a stage requests. Memory is also the limit: a pod that
    outgrows it is killed (and retried, for the retried stages) rather than
    starving its node. `shm` sizes a memory-backed /dev/shm (counted in memory):
    PyTorch data loader workers and NCCL pass tensors through it, and the default
    64 MiB of a container is far too small."""

    cpu: str
    memory: str
    gpus: int = 0
    shm: str | None = None


# Sized for the paper-scale configs (CIFAR-10 at 32x32, Camelyon17 patches at
# 96x96); edit and recompile for other data. The keys are the components' names.
RESOURCES: dict[str, Resources] = {
    "resolve-config": Resources(cpu="250m", memory="1Gi"),
    "shard-indices": Resources(cpu="250m", memory="1Gi"),
    "prepare": Resources(cpu="2", memory="16Gi"),  # holds a whole source in memory
    "pretrain": Resources(cpu="8", memory="32Gi", gpus=1, shm="8Gi"),
    "finetune": Resources(cpu="8", memory="32Gi", gpus=1, shm="8Gi"),
    "sample-shard": Resources(cpu="4", memory="16Gi", gpus=1, shm="4Gi"),
    "merge-shards": Resources(cpu="2", memory="8Gi"),
    "fid": Resources(cpu="4", memory="16Gi"),
    "classify": Resources(cpu="4", memory="16Gi"),
    # samples the pre-trained model (as many images as sample.num_samples), then scores
    "baseline": Resources(cpu="8", memory="32Gi", gpus=1, shm="4Gi"),
    # this run's points from the stages above; fine-tunes, samples and scores once per
    # extra target in sweep.epsilons (none by default)
    "sweep": Resources(cpu="8", memory="32Gi", gpus=1, shm="8Gi"),
    "rank": Resources(cpu="4", memory="16Gi"),
    # trains two short twins of the fine-tuning run (DP and control) on canaries
    "audit": Resources(cpu="8", memory="32Gi", gpus=1, shm="8Gi"),
    # reads a few images per class and the other stages' small files
    "report": Resources(cpu="1", memory="4Gi"),
}
# Retried stages: those that can lose hours to a preempted node, and resume from
# their work folder under `work_root` (checkpoints, finished shards).
RETRIED = ("pretrain", "finetune", "sample-shard", "sweep")
DP_STAGES = ("finetune", "sweep")  # they train on the private split: never cached
RETRY_POLICY = {"num_retries": 3, "backoff_duration": "60s", "backoff_factor": 2.0,
                "backoff_max_duration": "1800s"}


def _json_env(name: str, default: object) -> object:
    value = os.environ.get(name)
    return json.loads(value) if value else default


# Where tasks may run. GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule
# (GKE, EKS, AKS); tolerating a taint that is absent changes nothing.
GPU_NODE_SELECTOR: dict[str, str] = _json_env("DPSYNTH_GPU_NODE_SELECTOR", {})
GPU_TOLERATIONS: list[dict] = _json_env(
    "DPSYNTH_GPU_TOLERATIONS", [{"key": "nvidia.com/gpu", "operator": "Exists",
                                 "effect": "NoSchedule"}])
CPU_NODE_SELECTOR: dict[str, str] = _json_env("DPSYNTH_CPU_NODE_SELECTOR", {})
CPU_TOLERATIONS: list[dict] = _json_env("DPSYNTH_CPU_TOLERATIONS", [])

# Durable state: the stages' work folders (resume after a retry) and the privacy
# ledger live on this PVC, mounted by the tasks that use them. It must outlive
# every run (the ledger is the record of the budget spent) and be ReadWriteMany
# when shard tasks can land on different nodes. Empty: mount nothing, and point
# work_root and ledger_dir at s3:// prefixes instead (the work folders are then
# mirrored to S3 at every checkpoint and finished shard, and the ledger is
# updated by compare-and-swap; credentials from the dpsynth-pipeline-s3 Secret).
STATE_PVC = os.environ.get("DPSYNTH_STATE_PVC", "dpsynth-state")
STATE_MOUNT = "/mnt/dpsynth-state"
STATEFUL = ("pretrain", "finetune", "sample-shard", "merge-shards", "sweep")

# Credentials come from Kubernetes Secrets, by name; never parameters, never in the
# compiled YAML. Optional: a missing Secret or key leaves the variable unset
# (resolve_config then stops a run that would track to a pod's ephemeral disk).
SECRETS: dict[str, dict[str, str]] = {
    "dpsynth-pipeline-mlflow": {"tracking-uri": "MLFLOW_TRACKING_URI",
                                "username": "MLFLOW_TRACKING_USERNAME",
                                "password": "MLFLOW_TRACKING_PASSWORD",
                                "token": "MLFLOW_TRACKING_TOKEN"},
    "dpsynth-pipeline-s3": {"aws-access-key-id": "AWS_ACCESS_KEY_ID",
                            "aws-secret-access-key": "AWS_SECRET_ACCESS_KEY",
                            "endpoint-url": "AWS_ENDPOINT_URL",  # MinIO etc.
                            "region": "AWS_DEFAULT_REGION"},
}
# The image runs as a non-root user (UID 10001), which cannot create the root folders
# where KFP's launcher puts a task's artifacts (/minio, /s3 or /gcs, after the
# pipeline root's scheme; kubeflow/pipelines#10397, #5673): give each task writable,
# empty ones.
ARTIFACT_SCRATCH = ("/minio", "/s3", "/gcs")
# The MLflow parent run groups a pipeline run's stages (dpsynth.tracking). The id
# comes from the pod's KFP run-id label, not a task input: an input would enter
# the cache key, and no task would ever be cached.
PIPELINE_ID_ENV = "DPSYNTH_PIPELINE_ID"
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"


# The stages that may run as a distributed job (train_nodes x train_gpus_per_node > 1):
# the job's pods get what the task's pod has (dpsynth.cluster.stage_job reads this).
DISTRIBUTED = ("pretrain", "finetune")


def job_pod(name: str) -> str:
    """The pod settings of `name`'s distributed job, as JSON: its image, per-node
    resources and shared memory, the GPU pool's node selector and tolerations, the
    Secrets' variables and the state PVC, as `configure` gives the task."""
    res = RESOURCES[name]
    return json.dumps({
        "image": GPU_IMAGE, "cpu": res.cpu, "memory": res.memory, "shm": res.shm,
        "node_selector": GPU_NODE_SELECTOR, "tolerations": GPU_TOLERATIONS,
        "secret_env": {env: [secret, key] for secret, keys in SECRETS.items()
                       for key, env in keys.items()},
        "volume_claim": STATE_PVC or None, "volume_mount": STATE_MOUNT if STATE_PVC else None,
    }, sort_keys=True)


def configure(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """Apply the resources, scheduling, state, secrets, retry and caching settings
    of the tables above to the task of component `name`."""
    res = RESOURCES[name]
    task.set_cpu_request(res.cpu).set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(res.gpus)
    node_selector, tolerations = ((GPU_NODE_SELECTOR, GPU_TOLERATIONS) if res.gpus
                                  else (CPU_NODE_SELECTOR, CPU_TOLERATIONS))
    for key, value in sorted(node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in tolerations:
        kubernetes.add_toleration(task, **toleration)
    if res.shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit=res.shm)
    for path in ARTIFACT_SCRATCH:
        kubernetes.empty_dir_mount(task, volume_name=f"kfp-artifacts-{path[1:]}",
                                   mount_path=path)
    if name in STATEFUL and STATE_PVC:
        kubernetes.mount_pvc(task, pvc_name=STATE_PVC, mount_path=STATE_MOUNT)
    for secret, key_to_env in SECRETS.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=key_to_env,
                                     optional=True)
    kubernetes.use_field_path_as_env(task, env_name=PIPELINE_ID_ENV, field_path=RUN_ID_FIELD)
    if name in DISTRIBUTED:
        task.set_env_variable("DPSYNTH_JOB_POD", job_pod(name))
    if name in RETRIED:
        task.set_retry(**RETRY_POLICY)
    # Deterministic stages are cached (same inputs and config: same outputs). The
    # DP stages never are: a cached DP model must not pass for a new DP run, and each
    # DP run is recorded in the privacy ledger.
    task.set_caching_options(enable_caching=name not in DP_STAGES)
    return task


@dsl.pipeline(name=PIPELINE_NAME, description=(
    "Differentially private synthetic images: public pre-training, DP-SGD fine-tuning on "
    "the private split, sharded sampling, and evaluation (FID, downstream accuracy, "
    "hyperparameter ranking), an empirical privacy audit, and an HTML report. Every stage "
    "calls the dpsynth library, as `dvc repro` does."))
def dpsynth_pipeline(
    base_config: str = DEFAULT_BASE_CONFIG,
    overrides: list = [],  # noqa: B006 -- KFP reads the default; it is never mutated
    work_root: str = f"{STATE_MOUNT}/work",
    ledger_dir: str = f"{STATE_MOUNT}/ledger",
    train_nodes: int = 1,
    train_gpus_per_node: int = 1,
    train_operator: str = "trainjob",
):
    """Run dpsynth end to end.

    Args:
        base_config: a whole config file's YAML text (default: params.yaml).
        overrides: `key=value` settings over base_config, the same strings as
            `dpsynth --set` and `dvc exp run -S`, applied in order, e.g.
            ["finetune.epsilon=5", "data.private={kind: cifar10, path: s3://b/c.tar.gz}",
            "data.test=null"]; `dpsynth submit --set KEY=VALUE` adds one.
        work_root: durable location of the stages' resumable state: a folder on the
            state PVC or an s3:// prefix.
        ledger_dir: durable location of the privacy ledger: an absolute folder on the
            state PVC or an s3:// prefix.
        train_nodes: nodes for pre-training and DP fine-tuning; with
            train_gpus_per_node > 1 in all, each runs as a distributed job on the
            cluster's training operator, every GPU a torchrun worker.
        train_gpus_per_node: GPUs per node of those jobs.
        train_operator: `trainjob` (Kubeflow Trainer v2, runtime torch-distributed) or
            `pytorchjob` (Training Operator v1).
    """
    resolved = configure(resolve_config(base_config=base_config, ledger_dir=ledger_dir,
                                        overrides=overrides), "resolve-config")
    config = resolved.outputs["config"]

    data = configure(prepare(config=config), "prepare")
    public, private, test = (data.outputs[k] for k in ("public", "private", "test"))
    scale = {"train_nodes": train_nodes, "train_gpus_per_node": train_gpus_per_node,
             "train_operator": train_operator}
    pre = configure(pretrain(config=config, public=public, work_root=work_root, **scale),
                    "pretrain")
    dp = configure(finetune(config=config, model=pre.outputs["model"], private=private,
                            public=public, work_root=work_root,
                            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, **scale),
                   "finetune")
    dp_model = dp.outputs["dp_model"]

    shards = configure(shard_indices(config=config), "shard-indices")
    with dsl.ParallelFor(shards.output, name="sample-shards") as index:
        shard = configure(sample_shard(config=config, model=dp_model, shard_index=index,
                                       work_root=work_root), "sample-shard")
    merged = configure(merge_shards(config=config, model=dp_model,
                                    shards=dsl.Collected(shard.outputs["shard"]),
                                    work_root=work_root), "merge-shards")
    synthetic = merged.outputs["synthetic"]

    fidelity = configure(fid(config=config, synthetic=synthetic, test=test, public=public),
                         "fid")
    utility = configure(classify(config=config, synthetic=synthetic, test=test,
                                 private=private), "classify")
    public_only = configure(baseline(config=config, model=pre.outputs["model"], public=public,
                                     test=test), "baseline")
    curve = configure(sweep(config=config, model=pre.outputs["model"], dp_model=dp_model,
                            private=private, public=public, test=test,
                            baseline=public_only.outputs["results"],
                            classify=utility.outputs["results"], fid=fidelity.outputs["results"],
                            work_root=work_root, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                      "sweep")
    ranking = configure(rank(config=config, synthetic=synthetic, test=test, dp_model=dp_model),
                        "rank")
    checked = configure(audit(config=config, model=pre.outputs["model"], dp_model=dp_model,
                              synthetic=synthetic, private=private, test=test), "audit")
    # the last task: the report reads every stage's output, but not the private split
    configure(report(config=config, public=public, test=test, model=pre.outputs["model"],
                     dp_model=dp_model, synthetic=synthetic, fid=fidelity.outputs["results"],
                     classify=utility.outputs["results"],
                     baseline=public_only.outputs["results"], sweep=curve.outputs["results"],
                     rank=ranking.outputs["results"],
                     audit=checked.outputs["results"]), "report")


def compile_pipeline(output: str | Path = DEFAULT_OUTPUT) -> Path:
    """Compile the pipeline to `output` (YAML). Deterministic: the same code, params.yaml
    and compile-time settings give the same bytes."""
    output = Path(output)
    compiler.Compiler().compile(dpsynth_pipeline, str(output))
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the compiled pipeline (default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"compiled pipeline {PIPELINE_NAME!r} to {compile_pipeline(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
