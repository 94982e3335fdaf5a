"""Work folders: a stage's resumable state (checkpoints, finished shards) beside
its output, and the local folder a driver hands a stage for an `s3://` output,
published when the stage succeeds (`publish`). An `s3://` work folder is
mirrored to a local one: pulled before the stage, pushed at each checkpoint and
finished shard and at the end, so a retry on another machine resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dpsynth.errors import DpsynthError, InputError
from dpsynth.io import cache, published, s3

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"ckpt-\d+")
_LATEST = "latest.json"  # training.checkpoint's pointer to the newest complete checkpoint


def work_location(out: str | Path) -> str | Path:
    """Where the stage writing `out` keeps resumable state: `<parent>/.work/<name>`
    beside a local output, the same keys beside an `s3://` one."""
    if s3.is_s3(out):
        uri = s3.S3Uri.parse(str(out))
        parent, _, name = uri.key.rpartition("/")
        if not name:
            raise InputError(f"{out}: an output needs a key under the bucket, e.g. "
                             f"s3://{uri.bucket}/artifacts/<stage>")
        return str(s3.S3Uri(uri.bucket, f"{parent}/.work/{name}" if parent else f".work/{name}"))
    out = Path(out)
    return out.parent / ".work" / out.name


def _skipped(rel: str) -> bool:
    # half-written files and folders of atomic writes, and moved-aside old versions
    return any(".tmp-" in part or ".old-" in part for part in rel.split("/"))


class WorkMirror:
    """Keeps an `s3://` work folder (checkpoints, finished shards) in step with a
    local one, so a stage retried on another machine resumes.

    Files go up in an order that keeps the remote copy consistent for a reader
    of it: data first, then JSON sidecars, then `latest.json` (the checkpoint
    pointer) last; files deleted locally (pruned checkpoints) are deleted after.
    """

    def __init__(self, location: str, local: Path) -> None:
        self.uri = s3.S3Uri.parse(location)
        self.local = Path(local)
        self._seen: dict[str, tuple[int, int]] = {}

    def _scan(self) -> dict[str, tuple[int, int]]:
        if not self.local.is_dir():
            return {}
        out = {}
        for p in self.local.rglob("*"):
            rel = p.relative_to(self.local).as_posix()
            if p.is_file() and not _skipped(rel):
                st = p.stat()
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def pull(self) -> int:
        """Download the remote state; of the checkpoints only the one `latest.json`
        names (a crash mid-upload can leave a partial newer one)."""
        c = s3.client()
        keys = {k[len(self.uri.prefix):]: k for k in s3.list_objects(c, self.uri)}
        latest: dict[str, str] = {}
        for rel, key in keys.items():
            if rel.rsplit("/", 1)[-1] == _LATEST:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    latest[rel.rpartition("/")[0]] = json.loads(
                        s3.read_bytes(f"{s3.SCHEME}{self.uri.bucket}/{key}"))["checkpoint"]
        got = 0
        for rel, key in sorted(keys.items()):
            parts = rel.split("/")
            in_ckpt = [i for i, part in enumerate(parts[:-1]) if _CHECKPOINT.fullmatch(part)]
            if _skipped(rel) or any(latest.get("/".join(parts[:i])) != parts[i]
                                    for i in in_ckpt):
                continue
            s3.download_file(c, s3.S3Uri(self.uri.bucket, key), self.local / rel)
            got += 1
        self._seen = self._scan()
        if got:
            log.info("resumable state: %d files from %s", got, self.uri)
        return got

    def push(self) -> int:
        """Upload what changed locally since the last pull/push; delete what went."""
        now = self._scan()
        changed = sorted((rel for rel, st in now.items() if self._seen.get(rel) != st),
                         key=lambda r: (r.rsplit("/", 1)[-1] == _LATEST, r.endswith(".json"), r))
        gone = [self.uri.child(rel).key for rel in self._seen if rel not in now]
        if not (changed or gone):
            return 0
        c = s3.client()
        for rel in changed:
            s3.upload_file(c, self.local / rel, self.uri.child(rel))
        s3.delete_keys(c, self.uri, gone)
        self._seen = now
        return len(changed)

    def clear(self) -> None:
        """Delete the remote state (the stage finished and removed its own)."""
        c = s3.client()
        s3.delete_keys(c, self.uri, list(s3.list_objects(c, self.uri)))


def no_sync() -> None:
    """The `sync` of a local work folder: it is already where a retry looks."""


@dataclass(frozen=True)
class Staged:
    """A local folder a driver hands a stage, and how to save its resumable state.

    Attributes:
        path: the local folder (the output to write, or the work folder itself).
        sync: uploads the work folder's changes now (a mirrored `s3://` work
            folder), else does nothing; the driver passes it to the stage, which
            calls it after each checkpoint and finished shard, so a retry on
            another machine resumes from there.
    """

    path: Path
    sync: Callable[[], None] = no_sync


def staging_dir(prefix: str) -> Path:
    """A fresh local folder under the cache, for a stage's copy of S3 state."""
    staging = cache.cache_root() / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=staging))


@contextlib.contextmanager
def work_folder(location: str | Path) -> Iterator[Staged]:
    """A resumable work folder (checkpoints, finished shards) at `location`, as a
    local folder: for drivers that choose the work folder themselves (the Kubeflow
    components' `work_root`).

    Local: the path itself. `s3://`: a local copy, pulled before; pushed by the
    `sync` it comes with (which the stage calls at every checkpoint) and when the
    block ends, error or not, so a retry on another machine resumes; deleted
    remotely when the stage removed its local copy (it finished and published).
    """
    if not s3.is_s3(location):
        yield Staged(Path(location))
        return
    uri = s3.S3Uri.parse(str(location))
    root = staging_dir("work-")
    mirror = WorkMirror(str(uri), root / uri.name)
    mirror.pull()
    try:
        yield Staged(mirror.local, mirror.push)
    finally:
        try:
            if mirror.local.exists():
                mirror.push()
            else:
                mirror.clear()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def remove_work(location: str | Path) -> None:
    """Delete a work folder, local or `s3://` (its output is published)."""
    if s3.is_s3(location):
        WorkMirror(str(location), Path(tempfile.gettempdir())).clear()
    else:
        shutil.rmtree(location, ignore_errors=True)


@contextlib.contextmanager
def publish(location: str | Path, *, mirror_work: bool = True,
            main: bool = True) -> Iterator[Staged]:
    """The local folder a stage writes `location` into, and the `sync` of its work
    folder.

    Local: the path itself (the stage renames its output into place, `atomic_dir`).
    `s3://`: a fresh staging folder; when the block ends without an error and
    the stage wrote the folder, it is published with `published.upload_published`. With
    `mirror_work`, the work folder `work_location(location)` is pulled before,
    pushed by `sync` (at each checkpoint: the driver hands it to the stage) and at
    the end, and
    deleted once the output is published if the stage removed its local copy.

    `main=False` (a torchrun worker but rank 0, on any node): the work folder is
    pulled, so the worker resumes from the same checkpoint, but nothing is ever
    sent: rank 0 alone checkpoints and publishes, and another node's stale copy
    must not overwrite or delete what it wrote.
    """
    if not s3.is_s3(location):
        yield Staged(Path(location))
        return
    uri = s3.S3Uri.parse(str(location))
    work_uri = str(work_location(str(uri)))  # also refuses a bucket-root output
    root = staging_dir("publish-")
    out = root / uri.name
    mirror = WorkMirror(work_uri, Path(work_location(out))) if mirror_work else None

    def save_work() -> None:  # on failure: keep what a retry can resume from
        if mirror is not None:
            try:
                mirror.push()
            except DpsynthError as err:
                log.warning("could not save the work folder to %s: %s", mirror.uri, err)

    try:
        if mirror is not None:
            mirror.pull()
        if not main:
            yield Staged(out, no_sync)
            return
        yield Staged(out, mirror.push if mirror is not None else no_sync)
        wrote = out.is_dir()  # no folder: nothing to publish
        if wrote:
            published.upload_published(out, str(uri))
        if mirror is not None:
            if wrote and not mirror.local.exists():
                mirror.clear()
            else:
                mirror.push()
    except BaseException:
        if main:
            save_work()
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
