"""Helpers of the Kubeflow pipeline tests (tests/cluster/test_components.py,
test_pipeline_compile.py, test_pipeline_local.py and their conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

# compile-time settings of pipelines/dpsynth_pipeline.py and components/images.py
KFP_COMPILE_ENV = ("DPSYNTH_IMAGE", "DPSYNTH_IMAGE_CPU", "DPSYNTH_GPU_NODE_SELECTOR",
                   "DPSYNTH_GPU_TOLERATIONS", "DPSYNTH_CPU_NODE_SELECTOR",
                   "DPSYNTH_CPU_TOLERATIONS", "DPSYNTH_STATE_PVC")


def compile_kfp_pipeline(output: Path, **settings: str) -> subprocess.CompletedProcess:
    """Compile as `make pipeline` does, in a fresh process whose environment holds
    the given compile-time settings and none of the developer's."""
    env = {k: v for k, v in os.environ.items() if k not in KFP_COMPILE_ENV} | settings
    proc = subprocess.run([sys.executable, "-m", "pipelines.dpsynth_pipeline", "--output",
                           str(output)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_kfp_package(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PipelineSpec, PlatformSpec) of a compiled pipeline, as dicts."""
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    return pipeline_spec, platform_spec


@dataclass(frozen=True)
class KfpLocalRun:
    """One run of the pipeline under kfp.local (SubprocessRunner, no containers)."""

    run_dir: Path  # <pipeline root>/dpsynth-<time>/<task>/<output>
    work_root: Path
    ledger_dir: Path
    mlflow_uri: str
    pipeline_id: str

    def output(self, task: str, name: str) -> Path:
        return self.run_dir / task / name
