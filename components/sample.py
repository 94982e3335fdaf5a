"""Sampling, fanned out: one `sample_shard` task per shard, then `merge_shards`.

Each shard is a pure function of (seed, shard index, model, sampling config)
(dpsynth.stages.sample), so the merged artifact is byte-identical to what one
`dpsynth sample` makes. Sampling is post-processing of the DP model: it spends
no privacy budget.
"""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE, GPU_IMAGE
from components.runtime import figures_html, load_config, log_metrics_file, work_dir


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, work_dir])
def sample_shard(config: Input[Artifact], model: Input[Model], shard_index: int,
                 work_root: str, shard: Output[Dataset], metrics: Output[Metrics]):
    """`dpsynth sample --shard-index I`: make one shard of the synthetic set.

    The shard is made in a folder under `work_root` keyed by the config and the
    model artifact; a retried task finds it finished there and only copies it.
    `merge_shards` reads the shard's metadata (index, resumed, seconds).
    """
    import shutil
    import time
    from pathlib import Path

    from dpsynth.io import work
    from dpsynth.stages import sample as stage

    cfg = load_config(config.path)
    location = f"{work_dir(work_root, 'sample', cfg.to_dict(), model.uri)}/{shard_index}"
    with work.work_folder(location) as folder:
        shard_dir = folder.path
        t0 = time.perf_counter()
        made, _ = stage.make_shards(cfg, model_dir=Path(model.path), shard_dir=shard_dir,
                                    indices=[shard_index], sync=folder.sync)
        seconds = time.perf_counter() - t0
        # the shard and its sidecar; not the temporary files of an interrupted attempt
        shutil.copytree(shard_dir, shard.path, ignore=shutil.ignore_patterns(".*"),
                        dirs_exist_ok=True)
    shard.metadata.update({"shard_index": shard_index, "resumed": not made,
                           "sample_seconds": round(seconds, 3)})
    start, stop = stage.shard_bounds(cfg.sample.num_samples, cfg.sample.num_shards, shard_index)
    metrics.log_metric("shard_index", shard_index)
    metrics.log_metric("num_samples", stop - start)
    metrics.log_metric("sample_seconds", round(seconds, 3))
    metrics.log_metric("resumed", float(not made))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, work_dir, log_metrics_file, figures_html])
def merge_shards(config: Input[Artifact], model: Input[Model], shards: Input[List[Dataset]],
                 work_root: str, synthetic: Output[Dataset], metrics: Output[Metrics],
                 grid: Output[HTML]):
    """Collect the shards into the synthetic dataset, as one `dpsynth sample` publishes it:
    verified shards + manifest, a per-class grid, the DP model's privacy.json, metrics.

    Refuses a missing, duplicated or foreign shard (another model or sampling
    config). Then removes the shards' work folder: the result is published.
    """
    import os
    from pathlib import Path

    from dpsynth.io import work
    from dpsynth.stages import sample as stage
    from dpsynth.tracking import open_tracker

    cfg = load_config(config.path)
    made = sorted(int(s.metadata["shard_index"]) for s in shards if not s.metadata["resumed"])
    skipped = sorted(int(s.metadata["shard_index"]) for s in shards if s.metadata["resumed"])
    seconds = sum(float(s.metadata["sample_seconds"]) for s in shards)
    with open_tracker(cfg.tracking, "sample") as tracker:
        tracker.log_params(stage.tracked_params(cfg, model.path))
        stage.publish(cfg, shard_dirs=[Path(s.path) for s in shards],
                      model_dir=Path(model.path), out_dir=Path(synthetic.path), tracker=tracker,
                      made=made, skipped=skipped, seconds=seconds)
    work.remove_work(work_dir(work_root, "sample", cfg.to_dict(), model.uri))
    log_metrics_file(os.path.join(synthetic.path, "metrics.json"), metrics)
    figures_html(grid, "Synthetic samples, one row per class",
                 [os.path.join(synthetic.path, "grid.png")])
