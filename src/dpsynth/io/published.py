"""Published outputs on S3 and their completion marker. S3 has no rename, so a
published prefix is complete only when its marker `_SUCCESS.json` (every file's
size and sha256) exists: it is written last and deleted first on a re-publish,
and readers refuse a prefix without it (docs/design.md "Object storage").
`local_input` gives a verified local copy of one, for a driver to hand a stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from dpsynth.errors import InputError
from dpsynth.io import cache, s3
from dpsynth.io.shards import sha256_file

log = logging.getLogger(__name__)

MARKER = "_SUCCESS.json"  # a published prefix's completion marker and file manifest
MARKER_SCHEMA = 1


def _marker(files: list[dict[str, Any]]) -> bytes:
    return (json.dumps({"schema": MARKER_SCHEMA, "published": datetime.now(
        timezone.utc).isoformat(timespec="seconds"), "files": files}, indent=1) + "\n").encode()


def _marker_files(data: bytes, uri: s3.S3Uri) -> list[dict[str, Any]]:
    try:
        raw = json.loads(data)
        if raw.get("schema") != MARKER_SCHEMA:
            raise ValueError(f"schema {raw.get('schema')!r}, expected {MARKER_SCHEMA}")
        files = [{"path": str(f["path"]), "size": int(f["size"]), "sha256": str(f["sha256"])}
                 for f in raw["files"]]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{uri.child(MARKER)}: not a valid completion marker ({err}); "
                         "re-run the stage that wrote it") from None
    for f in files:  # the marker names files relative to the prefix, nothing else
        parts = f["path"].split("/")
        if f["path"].startswith("/") or ".." in parts or "" in parts or "\\" in f["path"]:
            raise InputError(f"{uri.child(MARKER)}: bad file path {f['path']!r}")
    return files


def upload_published(local_dir: Path, location: str) -> int:
    """Publish `local_dir` at `location/` atomically for readers.

    Order: delete the old marker (readers now refuse the prefix), upload every
    file to its final key (multipart when large), delete keys the new version
    lacks, then write the marker with each file's size and sha256. A crash at
    any point leaves a prefix without a marker, which no reader takes.

    Returns:
        The number of files published.
    """
    uri, c = s3.S3Uri.parse(location), s3.client()
    if not uri.key:
        raise InputError(f"{location}: an output needs a key under the bucket")
    paths = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    files = [{"path": p.relative_to(local_dir).as_posix(), "size": p.stat().st_size,
              "sha256": sha256_file(p)} for p in paths]
    marker = uri.child(MARKER)
    with s3.s3_errors(c, marker, "unpublish"):
        c.delete_object(Bucket=uri.bucket, Key=marker.key)
    for path, f in zip(paths, files):
        s3.upload_file(c, path, uri.child(f["path"]))
    keep = {uri.child(f["path"]).key for f in files}
    s3.delete_keys(c, uri, [k for k in s3.list_objects(c, uri)
                           if k not in keep and k != marker.key])
    with s3.s3_errors(c, marker, "publish"):
        c.put_object(Bucket=uri.bucket, Key=marker.key, Body=_marker(files),
                     ContentType="application/json")
    log.info("published %s (%d files, %.1f MB)", uri, len(files),
             sum(f["size"] for f in files) / 1e6)
    return len(files)


def _cached(target: Path, files: list[dict[str, Any]]) -> bool:
    return target.is_dir() and all((target / f["path"]).is_file() and
                                   (target / f["path"]).stat().st_size == f["size"]
                                   for f in files)


def _find_marker(uri: s3.S3Uri) -> tuple[s3.S3Uri, str, bytes] | None:
    """`(published root, sub-folder, marker bytes)` for `uri` or the nearest
    published output above it (`.../prepare/public` is inside `.../prepare`)."""
    parts = uri.key.split("/") if uri.key else []
    for i in range(len(parts), 0, -1):
        root = s3.S3Uri(uri.bucket, "/".join(parts[:i]))
        data, _ = s3.read_versioned(str(root.child(MARKER)))
        if data is not None:
            return root, "/".join(parts[i:]), data
    return None


def is_published(location: str) -> bool:
    """Whether the `s3://` prefix `location` is itself a completely published folder."""
    found = _find_marker(s3.S3Uri.parse(location))
    return found is not None and found[1] == ""


def download_published(location: str) -> Path:
    """A verified local copy of a published output (or of a folder inside one),
    cached by its marker's content hash.

    Raises:
        InputError: no marker (never published, being written, or a crashed
            write), a file whose sha256 differs from the marker, or S3 refusing.
    """
    uri, c = s3.S3Uri.parse(location), s3.client()
    for attempt in range(2):  # a second try if it was re-published while we read
        found = _find_marker(uri)
        if found is None:
            if not s3.list_objects(c, uri):  # (also names a missing bucket)
                raise InputError(f"{uri}: nothing there; check the path, or run the stage "
                                 "that writes it")
            raise InputError(f"{uri}: no {MARKER}, so not a complete output (still being "
                             "written, or its writer crashed); re-run the stage that writes it")
        root, sub, data = found
        files = _marker_files(data, root)
        if sub:
            files = [f | {"path": f["path"][len(sub) + 1:]} for f in files
                     if f["path"].startswith(sub + "/")]
            if not files:
                raise InputError(f"{uri}: the published output {root} has no folder {sub!r}; "
                                 "check the path")
        base = cache.cache_root() / "inputs"
        digest = hashlib.sha256(data + sub.encode()).hexdigest()[:24]
        target = base / f"{uri.name or uri.bucket}-{digest}"
        if _cached(target, files):
            return target
        shutil.rmtree(target, ignore_errors=True)  # incomplete or tampered copy
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            bad = None
            for f in files:
                try:
                    s3.download_file(c, uri.child(f["path"]), tmp / f["path"])
                except InputError as err:
                    bad = f"{uri.child(f['path'])}: listed in {MARKER} but unreadable ({err})"
                    break
                if sha256_file(tmp / f["path"]) != f["sha256"]:
                    bad = (f"{uri.child(f['path'])}: sha256 differs from {MARKER} (changed "
                           "or truncated after publishing); re-run the stage that wrote it")
                    break
            if bad is None:
                return cache.into_cache(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if attempt == 0 and s3.read_versioned(str(root.child(MARKER)))[0] != data:
            log.info("%s was re-published while it was read; reading it again", root)
            continue
        raise InputError(bad)
    raise InputError(f"{uri}: re-published twice while being read; try again")


@contextlib.contextmanager
def local_input(location: str | Path) -> Iterator[Path]:
    """A local folder with the contents of `location`: the path itself when local,
    else the verified cached copy of a published `s3://` prefix."""
    if not s3.is_s3(location):
        yield Path(location)
        return
    yield download_published(str(location))
