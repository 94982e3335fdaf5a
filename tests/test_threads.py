"""The thread policy: torch's thread count from the free cores, sleeping OpenMP threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpsynth import threads
from dpsynth.errors import ConfigError


@pytest.mark.parametrize("cores, busy, expected", [
    (2, 0.0, 2),    # quiet: both cores
    (2, 0.3, 2),    # a little background noise does not cost a thread
    (2, 1.0, 1),    # one CPU-bound neighbour: one thread, not two fighting it
    (2, 2.5, 1),    # overloaded: still at least one
    (16, 3.0, 13),
    (1, 0.0, 1),
])
def test_the_count_is_the_free_cores(cores: int, busy: float, expected: int) -> None:
    assert threads.choose({}, cores, busy).threads == expected


def test_overrides_win_and_a_bad_one_is_refused() -> None:
    assert threads.choose({"DPSYNTH_THREADS": "3"}, 2, 2.0) == threads.Choice(3, "DPSYNTH_THREADS=3")
    assert threads.choose({"OMP_NUM_THREADS": "1"}, 16, 0.0).threads == 1
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(ConfigError, match=r"DPSYNTH_THREADS=.*positive integer.*unset it"):
            threads.choose({"DPSYNTH_THREADS": bad}, 2, 0.0)


def test_cores_come_from_affinity_and_the_cgroup_quota(tmp_path: Path) -> None:
    assert threads.available_cores(affinity=8, quota=None) == 8
    assert threads.available_cores(affinity=8, quota=2.5) == 2
    assert threads.available_cores(affinity=8, quota=0.5) == 1
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpus(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpus(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads.cgroup_cpus(v1) == 3.0
    assert threads.cgroup_cpus(tmp_path / "none") is None


def test_busy_cores_reads_proc_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stat = tmp_path / "stat"
    samples = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  150 0 150 900 0 0 0 0 0 0\n"])

    def read_text(self: Path) -> str:
        return next(samples)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # 100 busy of 200 jiffies on 2 CPUs: one core busy
    assert threads.busy_cores(interval=0.0, proc=stat) == pytest.approx(1.0)


def run_cli(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """Run `dpsynth prepare` with a sitecustomize that records the OpenMP settings the
    moment torch is first imported, and torch's thread count at exit."""
    probe = tmp_path / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "seen.json"
    (probe / "sitecustomize.py").write_text(f'''
import atexit, builtins, json, os, sys
_real = builtins.__import__
seen = {{}}
def _imp(name, *a, **k):
    if name == "torch" and "torch" not in sys.modules and "wait" not in seen:
        seen["wait"] = os.environ.get("OMP_WAIT_POLICY")
    return _real(name, *a, **k)
builtins.__import__ = _imp
def _dump():
    if "torch" in sys.modules:
        seen["threads"] = sys.modules["torch"].get_num_threads()
    open({str(out)!r}, "w").write(json.dumps(seen))
atexit.register(_dump)
''')
    config = tmp_path / "config.yaml"
    config.write_text("tracking: {enabled: false}\n")
    full = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "DPSYNTH_THREADS")}
    full.update(env, PYTHONPATH=os.pathsep.join([str(probe), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "dpsynth.cli", "prepare", "-q", "--config", str(config),
                    "--out", str(tmp_path / "prep")], env=full, check=True, cwd=tmp_path,
                   capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_the_cli_sets_passive_waiting_before_torch_and_keeps_a_users_choice(
        tmp_path: Path) -> None:
    seen = run_cli(tmp_path / "a", {"DPSYNTH_THREADS": "1"})
    assert seen == {"wait": "PASSIVE", "threads": 1}
    seen = run_cli(tmp_path / "b", {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"})
    assert seen == {"wait": "ACTIVE", "threads": 1}
