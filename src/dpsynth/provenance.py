"""What made an artifact: package version, git commit, resolved config."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Mapping

import dpsynth
from dpsynth.io.atomic import atomic_write_json


def git_commit() -> str | None:
    """The current git commit (with `-dirty` if the tree has changes), if any."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(out_dir: str | Path, stage: str, config: Mapping[str, Any]) -> None:
    """Write `params.json` (the resolved config the stage ran with) and `version.json`.

    (`config.json` is reserved for model folders, as in diffusers.)
    """
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "params.json", dict(config))
    atomic_write_json(out_dir / "version.json", {
        "stage": stage, "dpsynth": dpsynth.__version__, "git_commit": git_commit()})
