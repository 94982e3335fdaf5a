"""Kubeflow Pipelines components for dpsynth: one per stage of dvc.yaml.

Each component is a lightweight Python component that runs in the dpsynth
image and calls the same `dpsynth.stages` function as the CLI, DVC and the
tests (DESIGN.md "One core, three drivers"): it only builds the config, maps
KFP artifacts to folders and reports metrics. The pipeline that wires them is
`pipelines/dpsynth_pipeline.py`.
"""

from components.audit import audit
from components.config import resolve_config, shard_indices
from components.evaluate import baseline, classify, fid, rank
from components.report import report
from components.sample import merge_shards, sample_shard
from components.sweep import sweep
from components.train import finetune, prepare, pretrain

__all__ = ["resolve_config", "shard_indices", "prepare", "pretrain", "finetune",
           "sample_shard", "merge_shards", "fid", "classify", "baseline", "sweep", "rank", "audit",
           "report"]
