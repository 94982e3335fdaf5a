"""Fixtures of the Kubeflow pipeline tests (test_components.py, test_pipeline_compile.py,
test_pipeline_local.py): the repository root on sys.path (`components` and
`pipelines` are top-level packages there), the pipeline compiled as `make
pipeline` compiles it, and one local run of it on the smoke config.
"""

from __future__ import annotations

import builtins
import sys
import types
from pathlib import Path
from typing import Iterator

import pytest
from kfp_support import REPO, KfpLocalRun, compile_kfp_pipeline

if str(REPO) not in sys.path:  # `components` and `pipelines` are packages at the root
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def kfp_compiled_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pipelines/dpsynth_pipeline.py compiled with the default settings."""
    out = tmp_path_factory.mktemp("kfp-compile") / "dpsynth.yaml"
    compile_kfp_pipeline(out)
    return out


@pytest.fixture(scope="session")
def kfp_local_smoke_run(tmp_path_factory: pytest.TempPathFactory,
                        repro_env: dict[str, str]) -> Iterator[KfpLocalRun]:
    """The whole pipeline run locally on configs/smoke.yaml as base config.

    Tasks are subprocesses of this process with its environment: the torch thread
    count of `dvc repro`'s (tests/conftest.py), so that the outputs compare bit for
    bit; MLflow in a temporary SQLite store; the working folder a temporary one.
    Platform settings (GPUs, secrets, volumes) have no local effect.
    """
    from kfp import local
    from kfp.local.orchestrator import task_executor

    from dpsynth.submit import base_config_text
    from pipelines.dpsynth_pipeline import dpsynth_pipeline

    tmp = tmp_path_factory.mktemp("kfp-local")
    run = KfpLocalRun(run_dir=tmp / "root", work_root=tmp / "work", ledger_dir=tmp / "ledger",
                      mlflow_uri=f"sqlite:///{tmp / 'mlflow.db'}", pipeline_id="kfp-local-test")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TQDM_DISABLE"):
            mp.setenv(name, repro_env[name])
        mp.setenv("DPSYNTH_PIPELINE_ID", run.pipeline_id)
        mp.setenv("MLFLOW_TRACKING_URI", run.mlflow_uri)
        mp.chdir(tmp)
        # Retries keep their policy; only the wait between attempts (60 s, doubling:
        # right for a preempted node) is skipped, so a failing task fails fast here.
        mp.setattr(task_executor, "time", types.SimpleNamespace(sleep=lambda seconds: None))
        # kfp.local indents task logs by swapping builtins.print for the task's run;
        # two ParallelFor tasks in threads can restore each other's swap and leave
        # every later print() in this process prefixed with 4 spaces (kfp 2.17.3).
        # monkeypatch restores the real one when the block ends.
        mp.setattr(builtins, "print", builtins.print)
        local.init(runner=local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(run.run_dir), workspace_root=str(tmp / "workspace"))
        dpsynth_pipeline(base_config=base_config_text(REPO / "configs" / "smoke.yaml"),
                         work_root=str(run.work_root), ledger_dir=str(run.ledger_dir))
    (run_dir,) = run.run_dir.iterdir()
    yield KfpLocalRun(run_dir, run.work_root, run.ledger_dir, run.mlflow_uri, run.pipeline_id)
