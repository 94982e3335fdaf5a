"""components/: one lightweight component per dvc.yaml stage, each a thin wrapper of
the `dpsynth.stages` function the CLI calls; run here in-process (their Python
functions) on the smoke config: the config they resolve, the artifacts they
write, and that retried tasks resume from the durable work folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model
from kfp_support import REPO

import components
from components import images, runtime
from dpsynth.config import load
from dpsynth.errors import ConfigError, InputError
from dpsynth.io.shards import read_dataset
from dpsynth.stages import pretrain as pretrain_stage
from dpsynth.stages import registry
from dpsynth.stages import sample as sample_stage
from dpsynth.submit import base_config_text
from dpsynth.tracking import NullTracker

SMOKE = base_config_text(REPO / "configs" / "smoke.yaml")  # as `dpsynth submit --config`
# dvc.yaml stage -> its components, and the stage function each one calls
STAGE_COMPONENTS = {
    "prepare": {"prepare": "run"}, "pretrain": {"pretrain": "run"},
    "finetune": {"finetune": "run"},
    "sample": {"sample_shard": "make_shards", "merge_shards": "publish"},
    "fid": {"fid": "run"}, "classify": {"classify": "run"},
    "baseline": {"baseline": "run"}, "sweep": {"sweep": "run"}, "rank": {"rank": "run"},
    "audit": {"audit": "run"}, "report": {"report": "run"}}
# the report reads every stage's output by name (stages.report.LAYOUT), not registered inputs
NOT_DRIVEN = {"report"}
GPU_COMPONENTS = {"pretrain", "finetune", "sample_shard", "baseline", "sweep", "audit"}


def _source(component: Any) -> str:
    """The Python program KFP embeds in the component's container command."""
    container = component.component_spec.implementation.container
    return "\n".join([*container.command, *(container.args or [])])


def _resolve(tmp_path: Path, overrides: list[str] | None = None, **params: Any) -> dict:
    """Run resolve_config with the smoke config as base (tracking off) and `params`;
    the resolved config as a dict (also in `tmp_path / "config"`)."""
    out = Artifact(uri=str(tmp_path / "config"))
    components.resolve_config.python_func(
        config=out, base_config=params.pop("base_config", SMOKE),
        ledger_dir=params.pop("ledger_dir", str(tmp_path / "ledger")),
        overrides=["tracking.enabled=false", *(overrides or [])], **params)
    return yaml.safe_load(Path(out.path).read_text())


# --------------------------------------------------------------------------- the wrappers


def test_one_component_per_dvc_stage_calling_the_stage_function() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(STAGE_COMPONENTS) == set(stages)
    for stage, comps in STAGE_COMPONENTS.items():
        for name, function in comps.items():
            source = _source(getattr(components, name))
            if function == "run" and stage not in NOT_DRIVEN:  # the CLI's driver path
                assert f'run_stage("{stage}", cfg, inputs=' in source, name
            else:
                assert f"from dpsynth.stages import {stage} as stage" in source, name
                assert f"stage.{function}(" in source, name
            # wiring only: no model, optimizer or tensor code in a component
            assert not re.search(r"\btorch\b|\bnumpy\b|\.backward\(", source), name


@pytest.mark.parametrize("stage", [n for n in registry.STAGES if n not in NOT_DRIVEN | {"sample"}])
def test_a_driven_components_inputs_are_its_registered_inputs(stage: str) -> None:
    """One vocabulary: the component's artifact inputs are the registry's names (the
    Kubeflow UI shows them), and it requests a GPU exactly when the registry says."""
    spec = getattr(components, stage).component_spec
    artifacts = {k for k, v in spec.inputs.items() if v.type.startswith("system.")} - {"config"}
    assert artifacts == {i.name for i in registry.stage(stage).inputs}
    assert (stage in GPU_COMPONENTS) == registry.stage(stage).gpu


def test_the_sampling_components_are_gpu_as_the_sample_stage() -> None:
    assert registry.stage("sample").gpu and "sample_shard" in GPU_COMPONENTS
    assert "merge_shards" not in GPU_COMPONENTS  # copies and verifies; samples nothing


@pytest.mark.parametrize("name", sorted(components.__all__))
def test_lightweight_component_in_the_dpsynth_image(name: str) -> None:
    component = getattr(components, name)
    container = component.component_spec.implementation.container
    wanted = images.GPU_IMAGE if name in GPU_COMPONENTS else images.CPU_IMAGE
    assert container.image == wanted
    assert "pip install" not in _source(component)  # install_kfp_package=False
    assert "kfp.dsl.executor_main" in _source(component)


def test_components_pass_typed_artifacts() -> None:
    def io(name: str) -> tuple[dict[str, str], dict[str, str]]:
        spec = getattr(components, name).component_spec
        inputs = {k: f"List[{v.type}]" if v.is_artifact_list else v.type
                  for k, v in spec.inputs.items()}
        return inputs, {k: v.type for k, v in (spec.outputs or {}).items()}

    dataset, model = "system.Dataset@0.0.1", "system.Model@0.0.1"
    metrics, html = "system.Metrics@0.0.1", "system.HTML@0.0.1"
    config = {"config": "system.Artifact@0.0.1"}
    assert io("prepare") == (config, {"public": dataset, "private": dataset, "test": dataset,
                                      "metrics": metrics})
    scale = {"train_nodes": "Integer", "train_gpus_per_node": "Integer",
             "train_operator": "String"}  # a distributed job when nodes x GPUs > 1
    assert io("pretrain") == (config | {"public": dataset, "work_root": "String"} | scale,
                              {"model": model, "metrics": metrics, "loss_plot": html})
    assert io("finetune")[1] == {"dp_model": model, "metrics": metrics, "loss_plot": html}
    assert scale.items() <= io("finetune")[0].items()
    assert io("finetune")[0]["model"] == model and io("finetune")[0]["private"] == dataset
    assert io("sample_shard") == (config | {"model": model, "shard_index": "Integer",
                                            "work_root": "String"},
                                  {"shard": dataset, "metrics": metrics})
    assert io("merge_shards")[0]["shards"] == "List[system.Dataset@0.0.1]"
    assert io("merge_shards")[1] == {"synthetic": dataset, "metrics": metrics, "grid": html}
    for name in ("fid", "classify", "rank"):
        assert io(name)[0]["synthetic"] == dataset
        assert io(name)[1]["metrics"] == metrics
    assert io("rank")[0]["dp_model"] == model
    # the public-only baseline: the pre-trained model, public and test splits; no private
    assert io("baseline") == (config | {"model": model, "public": dataset, "test": dataset},
                              {"results": "system.Artifact@0.0.1", "metrics": metrics})
    assert io("audit") == (config | {"model": model, "dp_model": model, "synthetic": dataset,
                                     "private": dataset, "test": dataset},
                           {"results": "system.Artifact@0.0.1", "metrics": metrics, "roc": html})
    artifact = "system.Artifact@0.0.1"
    # the sweep: this run's points and, for its own DP runs, the pre-trained model and
    # the private split
    assert io("sweep") == (config | {"model": model, "dp_model": model, "private": dataset,
                                     "public": dataset, "test": dataset, "baseline": artifact,
                                     "classify": artifact, "fid": artifact,
                                     "work_root": "String", "pipeline_run_id": "String"},
                           {"results": artifact, "metrics": metrics, "curve_plot": html})
    # the report reads every stage's output but the private split; the page is an HTML
    # artifact (shown by the KFP UI), the folder a plain one
    assert io("report") == (config | {"public": dataset, "test": dataset, "model": model,
                                      "dp_model": model, "synthetic": dataset,
                                      "fid": artifact, "classify": artifact,
                                      "baseline": artifact, "sweep": artifact, "rank": artifact,
                                      "audit": artifact},
                            {"results": artifact, "page": html})


# --------------------------------------------------------------------------- the config


def test_resolve_config_keeps_the_base_config_by_default(tmp_path: Path) -> None:
    resolved = _resolve(tmp_path)
    base = load(REPO / "configs" / "smoke.yaml").to_dict()
    assert resolved["finetune"]["epsilon"] == base["finetune"]["epsilon"]
    assert resolved["sample"]["num_shards"] == base["sample"]["num_shards"]
    assert resolved["seed"] == 0 and resolved["data"]["private"]["kind"] == "digits"
    assert resolved["privacy"]["ledger_dir"] == str(tmp_path / "ledger")


def test_resolve_config_applies_the_overrides_in_order(tmp_path: Path) -> None:
    resolved = _resolve(tmp_path, overrides=[
        "data.private={kind: cifar10, path: s3://bucket/cifar-10-python.tar.gz}",
        "data.public.path=/data/imagenet32", "data.image_size=32", "seed=7",
        "finetune.epsilon=5", "finetune.delta=1e-6", "sample.sampler=ddim",
        "sample.num_shards=5", "tracking.experiment=cifar", "finetune.epsilon=3"])
    assert resolved["data"]["private"] == {"kind": "cifar10", "hospitals": None,
                                           "path": "s3://bucket/cifar-10-python.tar.gz",
                                           "size": None, "seed": 0}
    assert resolved["data"]["public"]["path"] == "/data/imagenet32"
    assert resolved["data"]["image_size"] == 32 and resolved["seed"] == 7
    assert resolved["finetune"]["delta"] == 1e-6
    assert resolved["finetune"]["epsilon"] == 3.0  # a later setting of a key wins
    assert resolved["sample"] == resolved["sample"] | {"num_shards": 5, "sampler": "ddim"}
    assert resolved["tracking"]["experiment"] == "cifar"


def test_resolve_config_unsets_a_source_with_null(tmp_path: Path) -> None:
    public = "data.public={kind: npz, path: /data/public.npz}"
    assert _resolve(tmp_path, overrides=[public])["data"]["public"]["kind"] == "npz"
    assert _resolve(tmp_path, overrides=[public, "data.public=null"])["data"]["public"] is None


def test_resolve_config_puts_the_ledger_where_the_pipeline_says(tmp_path: Path) -> None:
    # the ledger_dir parameter wins even over a free override
    resolved = _resolve(tmp_path, overrides=["privacy.ledger_dir=artifacts/ledger"])
    assert resolved["privacy"]["ledger_dir"] == str(tmp_path / "ledger")
    with pytest.raises(ValueError, match="ledger_dir=.ledger.: must be durable storage"):
        _resolve(tmp_path, ledger_dir="ledger")


def test_resolve_config_fails_fast_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finetune.epsilon=-1.0: must be > 0"):
        _resolve(tmp_path, overrides=["finetune.epsilon=-1"])
    with pytest.raises(ConfigError, match="unknown key"):
        _resolve(tmp_path, overrides=["sample.shards=3"])


def test_resolve_config_refuses_tracking_to_a_pods_disk(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # as in a pod
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = Artifact(uri=str(tmp_path / "config"))
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI is not set"):
        components.resolve_config.python_func(config=out, base_config=SMOKE,
                                              ledger_dir="/state/ledger", overrides=[])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # from the Secret
    components.resolve_config.python_func(config=out, base_config=SMOKE,
                                          ledger_dir="/state/ledger", overrides=[])


def test_shard_indices_follow_the_resolved_config(tmp_path: Path) -> None:
    _resolve(tmp_path, overrides=["sample.num_shards=5"])
    config = Artifact(uri=str(tmp_path / "config"))
    assert components.shard_indices.python_func(config=config) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- helpers


def test_log_metrics_file_copies_finite_scalars_only(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({
        "epsilon": 9.99, "steps": 6, "image_shape": [8, 8, 1], "images_per_second": None,
        "fd": float("nan"), "real_baseline": True}))
    metrics = Metrics(uri=str(tmp_path / "m"))
    runtime.log_metrics_file(str(tmp_path / "metrics.json"), metrics)
    assert metrics.metadata == {"epsilon": 9.99, "steps": 6.0}


def test_figures_html_embeds_the_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG fake")
    page = HTML(uri=str(tmp_path / "out" / "page"))
    runtime.figures_html(page, "Loss <public>", [str(tmp_path / "a.png")])
    text = Path(page.path).read_text()
    assert "Loss &lt;public&gt;" in text and "data:image/png;base64,iVBORyBmYWtl" in text


def test_work_dirs_are_keyed_by_what_makes_a_resume_valid(tmp_path: Path) -> None:
    root = str(tmp_path)
    a = runtime.work_dir(root, "pretrain", {"seed": 0}, "s3://root/prepare/public")
    assert a == runtime.work_dir(root, "pretrain", {"seed": 0}, "s3://root/prepare/public")
    assert a.startswith(f"{root}/pretrain-") and "/" not in a[len(root) + 1:]
    assert a != runtime.work_dir(root, "pretrain", {"seed": 1}, "s3://root/prepare/public")
    assert a != runtime.work_dir(root, "pretrain", {"seed": 0}, "s3://root/other/public")
    # the DP stage: one folder per pipeline run (a retry resumes, a new run starts over)
    assert (runtime.work_dir(root, "finetune", "run-1")
            != runtime.work_dir(root, "finetune", "run-2"))
    # an s3:// work root stays a URI (pathlib would turn s3:// into s3:/)
    assert runtime.work_dir("s3://b/work/", "finetune", "run-1").startswith(
        "s3://b/work/finetune-")


# --------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; two threads on a busy 2-core box are slower
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    """resolve_config, prepare and pretrain components on the smoke config."""
    tmp = tmp_path_factory.mktemp("components")
    config = Artifact(uri=str(tmp / "config"))
    components.resolve_config.python_func(config=config, base_config=SMOKE,
                                          ledger_dir=str(tmp / "ledger"),
                                          overrides=["tracking.enabled=false"])
    splits = {role: Dataset(uri=str(tmp / "prepare" / role))
              for role in ("public", "private", "test")}
    prepare_metrics = Metrics(uri=str(tmp / "prepare" / "metrics"))
    components.prepare.python_func(config=config, metrics=prepare_metrics, **splits)
    model = Model(uri=str(tmp / "pretrain" / "model"))
    components.pretrain.python_func(
        config=config, public=splits["public"], work_root=str(tmp / "work"), model=model,
        metrics=Metrics(uri=str(tmp / "pretrain" / "metrics")),
        loss_plot=HTML(uri=str(tmp / "pretrain" / "loss")))
    return {"tmp": tmp, "config": config, "splits": splits, "model": model,
            "prepare_metrics": prepare_metrics}


def test_prepare_writes_each_split_as_its_own_dataset(prepared: dict[str, Any]) -> None:
    for role, split in prepared["splits"].items():
        images, labels, manifest = read_dataset(split.path)
        assert images.shape[1:] == (8, 8, 1) and len(manifest.classes) == 10, role
        assert json.loads((Path(split.path) / "params.json").read_text())["seed"] == 0
    # public facts only: the private split's size is never a metric (PRIVACY.md rule 6)
    private_count = read_dataset(prepared["splits"]["private"].path)[2].count
    assert prepared["prepare_metrics"].metadata["num_classes"] == 10
    assert float(private_count) not in prepared["prepare_metrics"].metadata.values()


def test_pretrain_component_resumes_from_its_work_folder(prepared: dict[str, Any]) -> None:
    tmp, config, public = prepared["tmp"], prepared["config"], prepared["splits"]["public"]
    cfg = runtime.load_config(config.path)
    work_root = tmp / "work-resume"
    # a killed attempt: 10 of the 20 steps checkpointed in the folder a retry will use
    pretrain_stage.run(cfg, public_dir=Path(public.path), out_dir=tmp / "killed",
                       tracker=NullTracker(), stop_after=10,
                       work_dir=runtime.work_dir(str(work_root), "pretrain", cfg.to_dict(),
                                                 public.uri))
    model = Model(uri=str(tmp / "resumed" / "model"))
    metrics = Metrics(uri=str(tmp / "resumed" / "metrics"))
    components.pretrain.python_func(config=config, public=public, work_root=str(work_root),
                                    model=model, metrics=metrics,
                                    loss_plot=HTML(uri=str(tmp / "resumed" / "loss")))
    assert metrics.metadata["resumed_from_step"] == 10.0
    for name in ("model.safetensors", "ema.safetensors"):  # as if never interrupted
        assert ((Path(model.path) / name).read_bytes()
                == (Path(prepared["model"].path) / name).read_bytes())
    assert not list(work_root.iterdir())  # published: the checkpoints are gone


def test_shards_then_merge_equal_one_sample_run(prepared: dict[str, Any]) -> None:
    tmp, config, model = prepared["tmp"], prepared["config"], prepared["model"]
    work_root = str(tmp / "work-sample")
    shards = []
    for index in range(3):
        shard = Dataset(uri=str(tmp / "shards" / str(index)))
        shard_metrics = Metrics(uri=str(tmp / "shards" / f"{index}-metrics"))
        components.sample_shard.python_func(config=config, model=model, shard_index=index,
                                            work_root=work_root, shard=shard,
                                            metrics=shard_metrics)
        assert sorted(p.name for p in Path(shard.path).iterdir()) == [
            f"shard-{index:05d}.json", f"shard-{index:05d}.npz"]
        assert shard.metadata["shard_index"] == index and not shard.metadata["resumed"]
        assert shard_metrics.metadata["num_samples"] == 20.0  # 60 samples in 3 shards
        shards.append(shard)
    # a retried shard task finds its shard finished in the work folder
    again = Dataset(uri=str(tmp / "shards" / "1-retry"))
    retry_metrics = Metrics(uri=str(tmp / "shards" / "1-retry-metrics"))
    components.sample_shard.python_func(config=config, model=model, shard_index=1,
                                        work_root=work_root, shard=again, metrics=retry_metrics)
    assert again.metadata["resumed"] and retry_metrics.metadata["resumed"] == 1.0
    assert ((Path(again.path) / "shard-00001.npz").read_bytes()
            == (Path(shards[1].path) / "shard-00001.npz").read_bytes())

    merged = Dataset(uri=str(tmp / "merged"))
    metrics = Metrics(uri=str(tmp / "merge-metrics"))
    components.merge_shards.python_func(config=config, model=model, shards=shards,
                                        work_root=work_root, synthetic=merged, metrics=metrics,
                                        grid=HTML(uri=str(tmp / "grid")))
    one = sample_stage.run(runtime.load_config(config.path), model_dir=Path(model.path),
                           out_dir=tmp / "one-run", tracker=NullTracker())
    for name in ("manifest.json", "grid.png", "params.json",
                 *(f"shard-{i:05d}.npz" for i in range(3))):
        assert (Path(merged.path) / name).read_bytes() == (one.out_dir / name).read_bytes()
    assert metrics.metadata["num_samples"] == 60 and metrics.metadata["shards_made"] == 3
    assert not Path(work_root).exists() or not list(Path(work_root).iterdir())


def test_merge_refuses_a_missing_shard(prepared: dict[str, Any]) -> None:
    tmp, config, model = prepared["tmp"], prepared["config"], prepared["model"]
    shard = Dataset(uri=str(tmp / "lonely"))
    components.sample_shard.python_func(config=config, model=model, shard_index=0,
                                        work_root=str(tmp / "work-lonely"), shard=shard,
                                        metrics=Metrics(uri=str(tmp / "lonely-metrics")))
    with pytest.raises(InputError, match=r"shards \[1, 2\] of 3 are missing"):
        components.merge_shards.python_func(
            config=config, model=model, shards=[shard], work_root=str(tmp / "work-lonely"),
            synthetic=Dataset(uri=str(tmp / "never")), metrics=Metrics(uri=str(tmp / "m")),
            grid=HTML(uri=str(tmp / "g")))
    assert not (tmp / "never").exists()


def test_retried_tasks_resume_from_an_s3_work_root_on_a_fresh_machine(
        prepared: dict[str, Any], s3: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dpsynth.io import cache, work as work_io

    tmp, config, public = prepared["tmp"], prepared["config"], prepared["splits"]["public"]
    model = prepared["model"]
    cfg = runtime.load_config(config.path)
    work_root = f"s3://{s3.bucket}/work"
    # a killed attempt on machine A: 10 of 20 steps, checkpoints mirrored to S3
    with work_io.work_folder(runtime.work_dir(work_root, "pretrain", cfg.to_dict(),
                                              public.uri)) as work:
        pretrain_stage.run(cfg, public_dir=Path(public.path), out_dir=tmp_path / "killed",
                           tracker=NullTracker(), stop_after=10, work_dir=work.path,
                           sync_work=work.sync)
    # machine B, with nothing local: resumes from S3 and ends as if never interrupted
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "machine-b"))
    resumed = Model(uri=str(tmp_path / "resumed"))
    metrics = Metrics(uri=str(tmp_path / "resumed-metrics"))
    components.pretrain.python_func(config=config, public=public, work_root=work_root,
                                    model=resumed, metrics=metrics,
                                    loss_plot=HTML(uri=str(tmp_path / "loss")))
    assert metrics.metadata["resumed_from_step"] == 10.0
    assert ((Path(resumed.path) / "ema.safetensors").read_bytes()
            == (Path(model.path) / "ema.safetensors").read_bytes())
    keys = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="work/pretrain-")
    assert keys.get("KeyCount", 0) == 0  # published: the checkpoints are gone from S3

    # a sample shard made on one machine is found finished by a retry on another
    shard = Dataset(uri=str(tmp_path / "shard"))
    components.sample_shard.python_func(config=config, model=model, shard_index=0,
                                        work_root=work_root, shard=shard,
                                        metrics=Metrics(uri=str(tmp_path / "m0")))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "machine-c"))
    again = Dataset(uri=str(tmp_path / "again"))
    components.sample_shard.python_func(config=config, model=model, shard_index=0,
                                        work_root=work_root, shard=again,
                                        metrics=Metrics(uri=str(tmp_path / "m1")))
    assert again.metadata["resumed"]
    assert ((Path(again.path) / "shard-00000.npz").read_bytes()
            == (Path(shard.path) / "shard-00000.npz").read_bytes())
