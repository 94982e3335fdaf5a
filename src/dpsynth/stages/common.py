"""Small helpers every stage uses: fingerprints, work folders, metrics files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from dpsynth.io import storage
from dpsynth.io.atomic import atomic_write_json


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config sections, hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def work_dir_for(out_dir: str | Path) -> Path | str:
    """Where a stage keeps resumable state (checkpoints, finished shards) while it
    runs: `<parent>/.work/<name>`, outside the atomically published output. For
    an `s3://` output the URI `s3://.../.work/<name>`, which `storage.publish`
    mirrors to the local work folder the stage actually writes."""
    return storage.work_location(out_dir)


def write_metrics(out_dir: str | Path, metrics: Mapping[str, Any]) -> None:
    atomic_write_json(Path(out_dir) / "metrics.json", dict(metrics))
