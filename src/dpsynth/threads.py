"""How many CPU threads torch may use, chosen from the cores actually free.

On a shared machine torch's default is a bad fit: it starts one OpenMP thread
per core and, with the GNU OpenMP runtime torch ships with, each thread
spin-waits between parallel regions. When another process is using one of the
two cores, the spinning threads fight it for the core and every step waits on
the slowest thread: `make run` went from 609 s quiet to 3,562 s next to one
CPU-bound process (issue 14). So every stage starts with `configure()`:

- the OpenMP wait policy is PASSIVE (threads sleep instead of spinning), set
  before torch is imported, unless the user set OMP_WAIT_POLICY;
- the thread count is the cores this process may use (CPU affinity and the
  cgroup CPU quota, as in a container) minus the cores other processes keep
  busy (/proc/stat sampled for 0.3 s at the stage's start), at least 1;
- DPSYNTH_THREADS=<n> fixes the count; a user's OMP_NUM_THREADS is respected.

The stages' models are small (8x8 digits by default), so the gain of a second
thread is modest while the cost of a contended one is large: the rule errs
towards fewer threads.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, MutableMapping

from dpsynth.errors import ConfigError

log = logging.getLogger(__name__)
ENV = "DPSYNTH_THREADS"


@dataclass(frozen=True)
class Choice:
    """The thread count and why (one line for the log)."""

    threads: int
    why: str


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this cgroup in cores (v2 `cpu.max`, v1 `cpu.cfs_*`), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores(affinity: int | None = None, quota: float | None = None) -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup quota."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    cores = affinity if quota is None else min(affinity, max(1, math.floor(quota)))
    return max(1, cores)


def _cpu_times(stat: str) -> tuple[int, int]:
    """(busy, total) jiffies of the aggregate `cpu` line of /proc/stat."""
    fields = [int(v) for v in stat.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user..steal; guest time is already in user
    return total - idle, total


def busy_cores(interval: float = 0.3, proc: Path = Path("/proc/stat")) -> float:
    """Cores other processes keep busy right now: /proc/stat sampled over `interval`
    seconds while this process waits (not the load average, which still counts
    the previous stage of the pipeline for a minute after it ended)."""
    import time

    try:
        busy0, total0 = _cpu_times(proc.read_text())
        time.sleep(interval)
        busy1, total1 = _cpu_times(proc.read_text())
    except (OSError, ValueError, IndexError):
        return 0.0
    if total1 <= total0:
        return 0.0
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


def choose(env: Mapping[str, str], cores: int, busy: float) -> Choice:
    """The thread count for `cores` available cores of which `busy` are in use.

    Raises:
        ConfigError: DPSYNTH_THREADS is not a positive integer.
    """
    if ENV in env:
        try:
            n = int(env[ENV])
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"{ENV}={env[ENV]!r}: must be a positive integer (the CPU "
                              f"threads torch may use); unset it to choose from the free cores")
        return Choice(n, f"{ENV}={n}")
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) >= 1:
        n = int(env["OMP_NUM_THREADS"])
        return Choice(n, f"OMP_NUM_THREADS={n}")
    free = max(1, min(cores, math.floor(cores - busy + 0.5)))
    return Choice(free, f"{cores} core(s) available, {busy:.1f} busy")


def set_wait_policy(env: MutableMapping[str, str]) -> None:
    """Sleeping, not spinning, OpenMP threads, unless the user chose (call before
    torch is imported: the OpenMP runtime reads it once)."""
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure() -> Choice:
    """Set the wait policy and torch's thread count for this process; returns the
    choice (logged at INFO)."""
    set_wait_policy(os.environ)
    choice = choose(os.environ, available_cores(quota=cgroup_cpus()), busy_cores())
    import torch

    torch.set_num_threads(choice.threads)
    log.info("threads: %d (%s; OMP_WAIT_POLICY=%s)", choice.threads, choice.why,
             os.environ["OMP_WAIT_POLICY"])
    return choice
