"""Small helpers every stage uses: fingerprints, work folders, metrics files, and
what a training stage's divergence message says about its checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from dpsynth.io import work
from dpsynth.io.atomic import atomic_write_json


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config sections, hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def work_dir_for(out_dir: str | Path) -> Path | str:
    """Where a stage keeps resumable state (checkpoints, finished shards) while it
    runs: `<parent>/.work/<name>`, outside the atomically published output. For
    an `s3://` output the URI `s3://.../.work/<name>`, which `work.publish`
    mirrors to the local work folder the stage actually writes."""
    return work.work_location(out_dir)


def write_metrics(out_dir: str | Path, metrics: Mapping[str, Any]) -> None:
    atomic_write_json(Path(out_dir) / "metrics.json", dict(metrics))


def kept_checkpoint(work_dir: str | Path, last_saved: int | None, checkpoint_every: int,
                    section: str) -> str:
    """The part of a divergence message that says what a re-run resumes from."""
    if last_saved is None:
        return (f"no checkpoint was saved before it (the first is due at step "
                f"{checkpoint_every}: {section}.checkpoint_every), so a re-run starts over")
    return f"the last good checkpoint (step {last_saved}) is kept in {work_dir}"
