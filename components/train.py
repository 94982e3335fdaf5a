"""Data preparation and the two trainers: `prepare`, `pretrain`, `finetune` (DP)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE, GPU_IMAGE
from components.runtime import figures_html, load_config, log_metrics_file, work_dir


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, log_metrics_file])
def prepare(config: Input[Artifact], public: Output[Dataset], private: Output[Dataset],
            test: Output[Dataset], metrics: Output[Metrics]):
    """`dpsynth prepare`: read the raw sources, write the public / private / test splits.

    Each split is its own artifact (the stage's folder split in three, each with the
    stage's params.json and version.json), so the DAG shows which tasks read the
    private split: `finetune`, and `classify` for its labelled non-private baseline.
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from dpsynth.drive import run_stage

    cfg = load_config(config.path)
    parent = os.path.dirname(public.path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".prepare-", dir=parent)  # same file system: renames
    out = Path(staging) / "prepare"
    run_stage("prepare", cfg, inputs={}, out_dir=out)
    for role, artifact in (("public", public), ("private", private), ("test", test)):
        for name in ("params.json", "version.json"):
            shutil.copyfile(out / name, out / role / name)
        if os.path.isdir(artifact.path):  # an (empty) folder the launcher made
            os.rmdir(artifact.path)
        shutil.move(out / role, artifact.path)
    log_metrics_file(out / "metrics.json", metrics)
    shutil.rmtree(staging)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, work_dir, log_metrics_file, figures_html])
def pretrain(config: Input[Artifact], public: Input[Dataset], work_root: str,
             model: Output[Model], metrics: Output[Metrics], loss_plot: Output[HTML],
             train_nodes: int = 1, train_gpus_per_node: int = 1,
             train_operator: str = "trainjob"):
    """`dpsynth pretrain`: non-private diffusion training on the public split.

    Checkpoints go to a folder under `work_root` keyed by the config and the input
    artifact, so a retried (or re-submitted, uncached) task resumes from them. With
    `train_nodes` x `train_gpus_per_node` > 1 the stage runs as a distributed job on
    the cluster's training operator (`train_operator`), which this task waits for.
    """
    import os

    from dpsynth.cluster.jobs import check_scale
    from dpsynth.drive import run_stage
    from dpsynth.io import work

    check_scale(train_nodes, train_gpus_per_node, train_operator)
    cfg = load_config(config.path)
    keys = (cfg.to_dict(), public.uri)
    if train_nodes * train_gpus_per_node > 1:
        from dpsynth.cluster.stage_job import run_stage_as_job

        location = work_dir(work_root, "pretrain", *keys, "job")
        run_stage_as_job("pretrain", cfg, inputs={"public": public.path}, out_dir=model.path,
                         location=location, nodes=train_nodes,
                         gpus_per_node=train_gpus_per_node, operator=train_operator,
                         run_id=location)
    else:
        with work.work_folder(work_dir(work_root, "pretrain", *keys)) as folder:
            run_stage("pretrain", cfg, inputs={"public": public.path}, out_dir=model.path,
                      work_dir=folder.path, sync_work=folder.sync)
    log_metrics_file(os.path.join(model.path, "metrics.json"), metrics)
    figures_html(loss_plot, "Pre-training loss (public split)",
                 [os.path.join(model.path, "loss.png")])


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, work_dir, log_metrics_file, figures_html])
def finetune(config: Input[Artifact], model: Input[Model], private: Input[Dataset],
             public: Input[Dataset], work_root: str, pipeline_run_id: str,
             dp_model: Output[Model], metrics: Output[Metrics], loss_plot: Output[HTML],
             train_nodes: int = 1, train_gpus_per_node: int = 1,
             train_operator: str = "trainjob"):
    """`dpsynth finetune`: DP-SGD fine-tuning on the private split, the only trainer on it.

    The privacy ledger (`privacy.ledger_dir`, set by `resolve_config`) reserves the
    run's whole plan before training and refuses a run past the dataset's budget.
    The work folder is per pipeline run: a retry resumes the same DP run (the
    ledger counts it once), a new pipeline run is a new DP run. `privacy.json` stays
    in the model artifact; its sample rate gives away the private split's size, so
    it is not copied to the metrics. With `train_nodes` x `train_gpus_per_node` > 1
    the stage runs as a distributed job (as `pretrain`); the job is named after the
    pipeline run, so a retry attaches to it or resumes it: still one DP run.
    """
    import os

    from dpsynth.cluster.jobs import check_scale
    from dpsynth.drive import run_stage
    from dpsynth.io import work

    check_scale(train_nodes, train_gpus_per_node, train_operator)
    cfg = load_config(config.path)
    inputs = {"model": model.path, "private": private.path, "public": public.path}
    if train_nodes * train_gpus_per_node > 1:
        from dpsynth.cluster.stage_job import run_stage_as_job

        location = work_dir(work_root, "finetune", pipeline_run_id, "job")
        run_stage_as_job("finetune", cfg, inputs=inputs, out_dir=dp_model.path,
                         location=location, nodes=train_nodes,
                         gpus_per_node=train_gpus_per_node, operator=train_operator,
                         run_id=location)
    else:
        with work.work_folder(work_dir(work_root, "finetune", pipeline_run_id)) as folder:
            run_stage("finetune", cfg, inputs=inputs, out_dir=dp_model.path,
                      work_dir=folder.path, sync_work=folder.sync)
    log_metrics_file(os.path.join(dp_model.path, "metrics.json"), metrics)
    figures_html(loss_plot, "DP fine-tuning: loss of the DP model on public data",
                 [os.path.join(dp_model.path, "loss.png")])
