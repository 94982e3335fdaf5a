"""DVC with an S3 remote (moto's S3 server on loopback standing in for AWS or
MinIO): the reproduced smoke pipeline is pushed, a fresh clone (the repo's
files with dvc.lock, no artifacts, no cache) pulls it, and `dvc status` is
clean but for the private split, which is never pushed. Credentials come from the environment and never reach DVC's files."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpsynth.io.shards import read_dataset

pytestmark = pytest.mark.slow


def _dvc(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"dvc {' '.join(args)}:\n"
                                  f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def test_push_then_a_fresh_clone_pulls_and_is_up_to_date(repro: Path, repro_env: dict[str, str],
                                                         s3, tmp_path: Path) -> None:
    env = repro_env | s3.env()
    # what the README tells a user to run once (MinIO: the endpointurl line)
    _dvc("remote", "add", "--force", "-d", "storage", s3.uri("dvc"), cwd=repro, env=env)
    _dvc("remote", "modify", "storage", "endpointurl", s3.endpoint, cwd=repro, env=env)
    logs = [_dvc("push", cwd=repro, env=env)]
    assert s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="dvc/")["KeyCount"] > 0

    clone = tmp_path / "clone"  # what `git clone` gives: tracked files only
    clone.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".gitignore"):
        if (repro / name).exists():
            shutil.copy(repro / name, clone / name)
    shutil.copytree(repro / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / ".dvc").mkdir()
    shutil.copy(repro / ".dvc" / "config", clone / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    assert not (clone / "artifacts").exists()

    logs.append(_dvc("pull", "--allow-missing", cwd=clone, env=env))  # as `make pull`
    logs.append(status := _dvc("status", "--json", cwd=clone, env=env))
    # everything but the private split, which `push: false` keeps off the remote: it is
    # the only change DVC sees (an out of prepare, a dep of the stages that read it)
    changes = {(stage, kind, path): what
               for stage, items in json.loads(status.stdout or "{}").items()
               for item in items for kind, paths in item.items() for path, what in paths.items()}
    assert changes and all(path.startswith("artifacts/prepare/private")
                           for _, _, path in changes), changes
    # its readers: fine-tuning, the sweep's extra DP runs, the labelled baseline, the
    # audit, and the report (which depends on the private manifest only, and hashes the
    # images for the ledger's key)
    assert {stage for stage, _, _ in changes} == {"prepare", "finetune", "sweep", "classify",
                                                   "audit", "report"}
    assert not (clone / "artifacts" / "prepare" / "private").exists()
    for split in ("prepare/public", "prepare/test", "sample"):
        pulled, original = (read_dataset(root / "artifacts" / split)[2]
                            for root in (clone, repro))
        assert pulled == original
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="dvc/",
                                                         MaxKeys=1000)["Contents"]]
    for shard in (repro / "artifacts" / "prepare" / "private").glob("shard-*.npz"):
        md5 = hashlib.md5(shard.read_bytes()).hexdigest()
        assert not any(key.endswith(md5[2:]) for key in keys), f"{shard.name} was pushed"
    for shard in (repro / "artifacts" / "sample").glob("shard-*.npz"):
        md5 = hashlib.md5(shard.read_bytes()).hexdigest()
        assert any(key.endswith(md5[2:]) for key in keys), f"{shard.name} was not pushed"
    assert (clone / "artifacts" / "finetune" / "privacy.json").read_bytes() == (
        repro / "artifacts" / "finetune" / "privacy.json").read_bytes()

    # credentials stay in the environment: not in DVC's config, lock file or output
    config = (clone / ".dvc" / "config").read_text()
    assert s3.uri("dvc") in config and "endpointurl" in config
    scanned = [config, (clone / "dvc.lock").read_text(), (clone / "dvc.yaml").read_text(),
               *(p.stdout + p.stderr for p in logs)]
    assert not (repro / ".dvc" / "config.local").exists()
    for text in scanned:
        assert s3.key_id not in text and s3.secret not in text
