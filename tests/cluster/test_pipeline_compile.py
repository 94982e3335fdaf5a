"""pipelines/dpsynth_pipeline.py compiled, and the YAML checked as Kubeflow will read it:
the committed pipelines/dpsynth.yaml is current, every dvc.yaml stage is a task
with the DAG edges of dvc.yaml, GPU and memory requests, retries, the sampling
fan-out, caching (never for the DP stage), and credentials only as Secret names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_support import REPO, compile_kfp_pipeline, load_kfp_package

from dpsynth.config import from_dict, load

from pipelines import dpsynth_pipeline as pipe

# dvc.yaml stage -> the task(s) of the pipeline that do its work
TASKS = {"prepare": "prepare", "pretrain": "pretrain", "finetune": "finetune",
         "sample": "merge-shards", "fid": "fid", "classify": "classify", "baseline": "baseline",
         "sweep": "sweep", "rank": "rank", "audit": "audit", "report": "report"}
GPU_TASKS = {"pretrain", "finetune", "sample-shard", "baseline", "sweep", "audit"}
LOOP = "for-loop-1"  # the ParallelFor's task (the compiler names it)


@pytest.fixture(scope="module")
def spec(kfp_compiled_pipeline: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return load_kfp_package(kfp_compiled_pipeline)


def _tasks(pipeline_spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, the ParallelFor body's included, by name."""
    tasks = dict(pipeline_spec["root"]["dag"]["tasks"])
    loop = pipeline_spec["components"][tasks[LOOP]["componentRef"]["name"]]
    return tasks | loop["dag"]["tasks"]


def _executor(pipeline_spec: dict, task: dict) -> dict:
    label = pipeline_spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return pipeline_spec["deploymentSpec"]["executors"][label]["container"]


def _platform(pipeline_spec: dict, platform_spec: dict, task: dict) -> dict:
    label = pipeline_spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]


def _dvc_upstream() -> dict[str, set[str]]:
    """dvc.yaml's DAG: stage -> the stages whose outputs it reads."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: {dep.split("/")[1] for dep in stage.get("deps", [])
                   if dep.startswith("artifacts/")} for name, stage in stages.items()}


def test_committed_yaml_is_a_fresh_compile(kfp_compiled_pipeline: Path) -> None:
    committed = REPO / "pipelines" / "dpsynth.yaml"
    assert committed.is_file(), "pipelines/dpsynth.yaml is missing: run `make pipeline`"
    assert committed.read_text() == kfp_compiled_pipeline.read_text(), (
        "pipelines/dpsynth.yaml is out of date with the code: run `make pipeline` (without "
        "DPSYNTH_* settings in the environment) and commit it")


def test_compiling_is_deterministic(kfp_compiled_pipeline: Path, tmp_path: Path) -> None:
    compile_kfp_pipeline(tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_bytes() == kfp_compiled_pipeline.read_bytes()


def test_yaml_is_a_valid_pipeline_and_platform_spec(spec) -> None:
    pipeline_spec, platform_spec = spec
    # strict: an unknown field (e.g. a broken header comment turned into keys) fails
    json_format.ParseDict(pipeline_spec, pipeline_spec_pb2.PipelineSpec())
    json_format.ParseDict(platform_spec, pipeline_spec_pb2.PlatformSpec())
    assert pipeline_spec["pipelineInfo"]["name"] == "dpsynth"


def test_every_dvc_stage_is_a_task_with_the_dvc_dag(spec) -> None:
    tasks = _tasks(spec[0])
    upstream = _dvc_upstream()
    assert set(upstream) == set(TASKS), "a dvc.yaml stage has no Kubeflow task (or vice versa)"
    for stage, task in TASKS.items():
        assert task in tasks, stage
        # every task reads the resolved config; sampling also goes through the fan-out
        expected = {TASKS[u] for u in upstream[stage]} | {"resolve-config"}
        if stage == "sample":
            expected |= {LOOP}
        assert set(tasks[task].get("dependentTasks", [])) == expected, stage
    assert set(tasks[LOOP]["dependentTasks"]) == {"finetune", "shard-indices", "resolve-config"}


def test_artifacts_flow_as_designed(spec) -> None:
    tasks = _tasks(spec[0])

    def source(task: str, name: str) -> tuple[str, str]:
        art = tasks[task]["inputs"]["artifacts"][name]["taskOutputArtifact"]
        return art["producerTask"], art["outputArtifactKey"]

    assert source("pretrain", "public") == ("prepare", "public")
    assert source("finetune", "model") == ("pretrain", "model")
    assert source("finetune", "private") == ("prepare", "private")
    assert source("finetune", "public") == ("prepare", "public")
    assert source("merge-shards", "model") == ("finetune", "dp_model")
    assert source("merge-shards", "shards") == (LOOP, "pipelinechannel--sample-shard-shard")
    for task in ("fid", "classify", "rank"):
        assert source(task, "synthetic") == ("merge-shards", "synthetic")
    assert source("fid", "test") == ("prepare", "test")
    assert source("fid", "public") == ("prepare", "public")
    assert source("rank", "dp_model") == ("finetune", "dp_model")
    assert source("audit", "model") == ("pretrain", "model")
    assert source("audit", "dp_model") == ("finetune", "dp_model")
    assert source("audit", "synthetic") == ("merge-shards", "synthetic")
    assert source("audit", "test") == ("prepare", "test")
    # the public-only baseline: the pre-trained model, never the DP one or the private split
    assert {name: source("baseline", name) for name in tasks["baseline"]["inputs"]["artifacts"]
            if name != "config"} == {"model": ("pretrain", "model"),
                                     "public": ("prepare", "public"), "test": ("prepare", "test")}
    # the report: every stage's output (the DAG test checks it runs after them all)
    assert {name: source("report", name) for name in tasks["report"]["inputs"]["artifacts"]
            if name != "config"} == {
        "public": ("prepare", "public"), "test": ("prepare", "test"),
        "model": ("pretrain", "model"), "dp_model": ("finetune", "dp_model"),
        "synthetic": ("merge-shards", "synthetic"), "fid": ("fid", "results"),
        "classify": ("classify", "results"), "baseline": ("baseline", "results"),
        "sweep": ("sweep", "results"), "rank": ("rank", "results"),
        "audit": ("audit", "results")}
    # the sweep: this run's points from the stages above, its own DP runs from the
    # pre-trained model
    assert {name: source("sweep", name) for name in tasks["sweep"]["inputs"]["artifacts"]
            if name != "config"} == {
        "model": ("pretrain", "model"), "dp_model": ("finetune", "dp_model"),
        "private": ("prepare", "private"), "public": ("prepare", "public"),
        "test": ("prepare", "test"), "baseline": ("baseline", "results"),
        "classify": ("classify", "results"), "fid": ("fid", "results")}
    # the private split reaches only the DP trainers, the labelled non-private baseline
    # and the audit's memorization aggregates
    readers = {t for t, spec_ in tasks.items()
               for art in spec_.get("inputs", {}).get("artifacts", {}).values()
               if art.get("taskOutputArtifact", {}).get("outputArtifactKey") == "private"}
    assert readers == {"finetune", "sweep", "classify", "audit"}


def test_sampling_fans_out_over_shard_indices(spec) -> None:
    pipeline_spec = spec[0]
    loop = pipeline_spec["root"]["dag"]["tasks"][LOOP]
    iterator = loop["parameterIterator"]
    assert iterator["items"]["inputParameter"] == "pipelinechannel--shard-indices-Output"
    assert loop["inputs"]["parameters"]["pipelinechannel--shard-indices-Output"][
        "taskOutputParameter"]["producerTask"] == "shard-indices"
    body = pipeline_spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"sample-shard"}
    assert body["sample-shard"]["inputs"]["parameters"]["shard_index"][
        "componentInputParameter"] == iterator["itemInput"]
    # the merge step takes the shards of every iteration (dsl.Collected)
    outputs = pipeline_spec["components"][loop["componentRef"]["name"]]["outputDefinitions"]
    assert outputs["artifacts"]["pipelinechannel--sample-shard-shard"]["isArtifactList"]


def test_gpu_stages_request_gpus_and_every_stage_cpu_and_memory(spec) -> None:
    pipeline_spec, platform_spec = spec
    for name, task in _tasks(pipeline_spec).items():
        if name == LOOP:
            continue
        resources = _executor(pipeline_spec, task)["resources"]
        wanted = pipe.RESOURCES[name]
        assert resources["resourceCpuRequest"] == wanted.cpu, name
        assert resources["resourceMemoryRequest"] == wanted.memory, name
        assert resources["resourceMemoryLimit"] == wanted.memory, name
        platform = _platform(pipeline_spec, platform_spec, task)
        if name in GPU_TASKS:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            assert int(resources["accelerator"]["resourceCount"]) >= 1, name
            assert {"key": "nvidia.com/gpu", "operator": "Exists",
                    "effect": "NoSchedule"} in platform["tolerations"], name
            shm = [m for m in platform["emptyDirMounts"] if m["mountPath"] == "/dev/shm"]
            assert [m["medium"] for m in shm] == ["Memory"], name
        else:
            assert "accelerator" not in resources, name
            assert "tolerations" not in platform, name
        # the non-root image needs writable folders for the launcher's artifact copies
        scratch = {m["mountPath"] for m in platform["emptyDirMounts"]}
        assert scratch >= {"/minio", "/s3", "/gcs"}, name


def test_training_and_sampling_retry_with_backoff(spec) -> None:
    for name, task in _tasks(spec[0]).items():
        policy = task.get("retryPolicy")
        if name in ("pretrain", "finetune", "sample-shard", "sweep"):
            assert policy["maxRetryCount"] >= 1, name
            assert policy["backoffDuration"] and policy["backoffFactor"] > 1, name
        else:
            assert policy is None, name


def test_caching_is_on_except_for_the_dp_stages(spec) -> None:
    for name, task in _tasks(spec[0]).items():
        if name == LOOP:
            continue
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (name not in ("finetune", "sweep")), name


def test_durable_state_is_mounted_where_it_is_used(spec) -> None:
    pipeline_spec, platform_spec = spec
    for name, task in _tasks(pipeline_spec).items():
        if name == LOOP:
            continue
        mounts = _platform(pipeline_spec, platform_spec, task).get("pvcMount", [])
        if name in ("pretrain", "finetune", "sample-shard", "merge-shards", "sweep"):
            assert [(m["constant"], m["mountPath"]) for m in mounts] == [
                ("dpsynth-state", pipe.STATE_MOUNT)], name
        else:
            assert mounts == [], name
    defaults = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    for param in ("work_root", "ledger_dir"):
        assert defaults[param]["defaultValue"].startswith(pipe.STATE_MOUNT + "/")


def test_credentials_come_from_secrets_by_name_only(spec, kfp_compiled_pipeline: Path) -> None:
    pipeline_spec, platform_spec = spec
    for name, task in _tasks(pipeline_spec).items():
        if name == LOOP:
            continue
        platform = _platform(pipeline_spec, platform_spec, task)
        secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]}
                   for s in platform["secretAsEnv"]}
        assert secrets["dpsynth-pipeline-mlflow"] >= {"MLFLOW_TRACKING_URI",
                                                      "MLFLOW_TRACKING_PASSWORD"}, name
        assert secrets["dpsynth-pipeline-s3"] >= {"AWS_ACCESS_KEY_ID",
                                                  "AWS_SECRET_ACCESS_KEY"}, name
        assert [e["name"] for e in platform["fieldPathAsEnv"]] == ["DPSYNTH_PIPELINE_ID"]
        # no credential is set as a plain environment variable of a container
        env = {e["name"] for e in _executor(pipeline_spec, task).get("env", [])}
        assert not {v for s in secrets.values() for v in s} & env, name
    # nor is one a pipeline parameter
    params = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in params if any(w in p for w in ("password", "secret", "token", "key"))]


def test_compiling_with_credentials_set_bakes_none_in(tmp_path: Path) -> None:
    canaries = {"AWS_ACCESS_KEY_ID": "CANARY-key-id-5w9x", "AWS_SECRET_ACCESS_KEY":
                "CANARY-secret-7q2z", "MLFLOW_TRACKING_PASSWORD": "CANARY-password-3k8v",
                "MLFLOW_TRACKING_URI": "http://CANARY-tracking-host:5000"}
    proc = compile_kfp_pipeline(tmp_path / "p.yaml", **canaries)
    text = (tmp_path / "p.yaml").read_text() + proc.stdout + proc.stderr
    assert "CANARY" not in text


def test_parameters_and_their_defaults(spec) -> None:
    params = spec[0]["root"]["inputDefinitions"]["parameters"]
    types = {name: p["parameterType"] for name, p in params.items()}
    # one list of settings (the config's own keys), not one parameter per field
    assert types == {"base_config": "STRING", "overrides": "LIST", "work_root": "STRING",
                     "ledger_dir": "STRING", "train_nodes": "NUMBER_INTEGER",
                     "train_gpus_per_node": "NUMBER_INTEGER", "train_operator": "STRING"}
    # one pod per task unless asked: the pipeline behaves as before by default
    assert {k: params[k]["defaultValue"] for k in ("train_nodes", "train_gpus_per_node",
                                                   "train_operator")} == {
        "train_nodes": 1, "train_gpus_per_node": 1, "train_operator": "trainjob"}
    assert all(p.get("description") for p in params.values())  # from the docstring
    # the default base config is params.yaml, resolved
    default = params["base_config"]["defaultValue"]
    assert "\n" not in default
    assert from_dict(yaml.safe_load(default)) == load(REPO / "params.yaml")


def test_the_long_stages_take_the_scale_and_their_jobs_the_tasks_pod(spec) -> None:
    """pretrain and finetune get the three scale parameters from the pipeline's, and
    the pod settings their distributed jobs copy: the task's image, resources,
    shared memory, GPU scheduling, Secrets (by name) and state PVC."""
    pipeline_spec, _ = spec
    tasks = _tasks(pipeline_spec)
    for name in ("pretrain", "finetune"):
        params = tasks[name]["inputs"]["parameters"]
        for key in ("train_nodes", "train_gpus_per_node", "train_operator"):
            assert params[key]["componentInputParameter"] == key, (name, key)
        env = {e["name"]: e["value"] for e in _executor(pipeline_spec, tasks[name]).get("env", [])}
        pod = json.loads(env["DPSYNTH_JOB_POD"])
        res = pipe.RESOURCES[name]
        assert (pod["cpu"], pod["memory"], pod["shm"]) == (res.cpu, res.memory, res.shm)
        assert pod["image"] == _executor(pipeline_spec, tasks[name])["image"]
        assert pod["tolerations"] == pipe.GPU_TOLERATIONS and pod["volume_claim"] == pipe.STATE_PVC
        assert pod["secret_env"]["AWS_SECRET_ACCESS_KEY"] == [
            "dpsynth-pipeline-s3", "aws-secret-access-key"]
    assert not any("DPSYNTH_JOB_POD" in str(_executor(pipeline_spec, task).get("env"))
                   for n, task in tasks.items() if n not in ("pretrain", "finetune", LOOP))


def test_compile_time_settings_reach_the_yaml(tmp_path: Path) -> None:
    compile_kfp_pipeline(
        tmp_path / "p.yaml", DPSYNTH_IMAGE="registry.example.com/dpsynth:abc",
        DPSYNTH_GPU_NODE_SELECTOR=json.dumps({"pool": "a100"}),
        DPSYNTH_GPU_TOLERATIONS=json.dumps([{"key": "gpu", "operator": "Exists"}]),
        DPSYNTH_CPU_NODE_SELECTOR=json.dumps({"pool": "cpu"}), DPSYNTH_STATE_PVC="")
    pipeline_spec, platform_spec = load_kfp_package(tmp_path / "p.yaml")
    for name, task in _tasks(pipeline_spec).items():
        if name == LOOP:
            continue
        image = _executor(pipeline_spec, task)["image"]
        platform = _platform(pipeline_spec, platform_spec, task)
        gpu = name in GPU_TASKS
        assert image == "registry.example.com/dpsynth:abc" + ("" if gpu else "-cpu"), name
        assert platform["nodeSelector"]["labels"] == {"pool": "a100" if gpu else "cpu"}, name
        assert platform.get("tolerations", []) == (
            [{"key": "gpu", "operator": "Exists"}] if gpu else []), name
        assert "pvcMount" not in platform, name


def test_the_resources_table_requests_gpus_as_the_registry_says() -> None:
    from dpsynth.stages import registry
    from pipelines.dpsynth_pipeline import RESOURCES

    for name, row in registry.STAGES.items():
        task = "sample-shard" if name == "sample" else name
        assert (RESOURCES[task].gpus > 0) == row.gpu, name
