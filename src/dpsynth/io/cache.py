"""The local cache of `s3://` inputs: raw sources fetched from S3 (cached by
their listing, so a changed source is fetched again) and verified copies of
published outputs, under DPSYNTH_CACHE_DIR, `storage.cache_dir` or
`~/.cache/dpsynth`. It holds copies of private data: keep it on a private disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from dpsynth.errors import InputError
from dpsynth.io import s3

log = logging.getLogger(__name__)

CACHE_ENV = "DPSYNTH_CACHE_DIR"


def cache_root() -> Path:
    """DPSYNTH_CACHE_DIR, else `storage.cache_dir`, else `~/.cache/dpsynth`. It holds
    copies of inputs, the private split included: keep it on a private disk."""
    chosen = os.environ.get(CACHE_ENV) or s3.settings().cache_dir
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dpsynth"


def into_cache(tmp: Path, target: Path) -> Path:
    """Rename a finished download into place; a concurrent twin may have won."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch(location: str | Path) -> Path:
    """A local copy of a raw source: an object (file) or everything under a prefix
    (folder). Cached by the listing (keys, sizes, ETags), so a changed source is
    fetched again. Local paths are returned as they are.

    Raises:
        InputError: no such object or prefix, a missing bucket, or no access.
    """
    if not s3.is_s3(location):
        return Path(location).expanduser()
    from botocore.exceptions import BotoCoreError, ClientError

    uri, c = s3.S3Uri.parse(str(location)), s3.client()
    entries: list[tuple[str, str, int]] = []  # (relative path, key, size)
    listing: list[Any] = []
    if uri.key:
        try:
            head = c.head_object(Bucket=uri.bucket, Key=uri.key)
            entries = [(uri.name, uri.key, head["ContentLength"])]
            listing = [uri.key, head["ContentLength"], head["ETag"]]
        except (ClientError, BotoCoreError) as err:
            if s3.error_code(err) not in ("404", "NoSuchKey", "NotFound"):
                raise s3.explain(err, c, uri, "read") from None
    if not entries:  # a prefix: a folder source (imagefolder, imagenet32, ...)
        objects = s3.list_objects(c, uri)
        if not objects:
            raise InputError(f"{uri}: no object or prefix with that name in bucket "
                             f"{uri.bucket!r} (s3.endpoint {s3.endpoint(c)}); check the path")
        entries = [(f"{uri.name or uri.bucket}/{k[len(uri.prefix):]}", k, o["Size"])
                   for k, o in sorted(objects.items())]
        for rel, key, _ in entries:  # a key is any string; a local path must stay inside
            if {"..", "", "."} & set(rel.split("/")):
                raise InputError(f"s3://{uri.bucket}/{key}: a key with an empty, '.' or '..' "
                                 "part cannot be copied to a local folder; rename it")
        listing = [[k, o["Size"], o["ETag"]] for k, o in sorted(objects.items())]
    digest = hashlib.sha256(json.dumps([str(uri), listing]).encode()).hexdigest()[:24]
    base = cache_root() / "sources"
    target = base / digest
    if not target.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".{digest}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for rel, key, size in entries:
                s3.download_file(c, s3.S3Uri(uri.bucket, key), tmp / rel)
                if (tmp / rel).stat().st_size != size:
                    raise InputError(f"s3://{uri.bucket}/{key}: downloaded "
                                     f"{(tmp / rel).stat().st_size} bytes, expected {size}")
            into_cache(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: using the local copy %s", uri, target)
    return target / entries[0][0].split("/")[0]
