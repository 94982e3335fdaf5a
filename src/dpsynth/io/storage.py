"""Object storage: wherever dpsynth takes a path it also takes `s3://bucket/key`.

The one module that talks to S3 (boto3). Drivers stage I/O around an unchanged
stage: `local_input` gives a verified local copy of a published s3:// output,
`publish` gives a local folder and uploads it atomically when the stage is done,
mirroring the stage's work folder (checkpoints, finished shards) so a retry on
another machine resumes. S3 has no rename, so a published prefix is complete
only when its marker `_SUCCESS.json` (every file's size and sha256) exists; it is
written last and deleted first on a re-publish, and readers refuse a prefix
without it (docs/design.md "Object storage").

Endpoint: AWS_ENDPOINT_URL(_S3) when set, else `storage.endpoint_url`. Credentials:
boto3's standard chain only, never the config or a flag.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from dpsynth.config import StorageConfig
from dpsynth.errors import DpsynthError, InputError
from dpsynth.io.shards import sha256_file

log = logging.getLogger(__name__)

SCHEME = "s3://"
MARKER = "_SUCCESS.json"  # a published prefix's completion marker and file manifest
MARKER_SCHEMA = 1
CACHE_ENV = "DPSYNTH_CACHE_DIR"
_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "AllAccessDisabled", "ExpiredToken", "InvalidToken", "AccountProblem"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_CHECKPOINT = re.compile(r"ckpt-\d+")
_LATEST = "latest.json"  # training.checkpoint's pointer to the newest complete checkpoint

# what boto3 reads from the environment: a change means a new client
_CLIENT_ENV = (*_ENDPOINT_ENVS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")

_settings = StorageConfig()
_clients: dict[bytes, Any] = {}
_mirrors: list[WorkMirror] = []


class StorageError(DpsynthError):
    """A storage operation failed after botocore's retries (not the user's input)."""


def configure(settings: StorageConfig) -> None:
    """Use `settings` (the config's `storage` section) for every later call."""
    global _settings
    _settings = settings


# --------------------------------------------------------------------------- URIs


def is_s3(location: str | Path | None) -> bool:
    """Whether `location` is an `s3://` URI (a `Path` never is: it would mangle `//`)."""
    return isinstance(location, str) and location.startswith(SCHEME)


@dataclass(frozen=True)
class S3Uri:
    """`s3://bucket/key`, the key without a trailing slash ('' for the bucket)."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not is_s3(uri):
            raise InputError(f"{uri!r}: not an s3://bucket/key URI")
        bucket, _, key = uri[len(SCHEME):].partition("/")
        key = key.rstrip("/")
        if not _BUCKET.fullmatch(bucket) or key.startswith("/") or "//" in key:
            raise InputError(f"{uri!r}: expected s3://<bucket>/<key> with a valid bucket name "
                             "(3-63 characters: lowercase letters, digits, '.', '-')")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    @property
    def prefix(self) -> str:
        """The key prefix of the objects "inside" this URI."""
        return f"{self.key}/" if self.key else ""

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def child(self, rel: str) -> S3Uri:
        return S3Uri(self.bucket, self.prefix + rel)


def work_location(out: str | Path) -> str | Path:
    """Where the stage writing `out` keeps resumable state: `<parent>/.work/<name>`
    beside a local output, the same keys beside an `s3://` one."""
    if is_s3(out):
        uri = S3Uri.parse(str(out))
        parent, _, name = uri.key.rpartition("/")
        if not name:
            raise InputError(f"{out}: an output needs a key under the bucket, e.g. "
                             f"s3://{uri.bucket}/artifacts/<stage>")
        return str(S3Uri(uri.bucket, f"{parent}/.work/{name}" if parent else f".work/{name}"))
    out = Path(out)
    return out.parent / ".work" / out.name


# --------------------------------------------------------------------------- the client


def client() -> Any:
    """A boto3 S3 client for the current settings and environment (endpoint,
    credentials, profile, region): a new one whenever they change."""
    key = hashlib.sha256(repr((_settings, [os.environ.get(n) for n in _CLIENT_ENV])).encode())
    if key.digest() not in _clients:
        _clients.clear()
        _clients[key.digest()] = new_client()
    return _clients[key.digest()]


def new_client() -> Any:
    """A new boto3 S3 client (a new session: the environment is read now)."""
    import boto3
    from botocore.config import Config as BotoConfig

    botocore_log = logging.getLogger("botocore")
    if botocore_log.level == logging.NOTSET:  # its INFO lines ("Found credentials...") are noise
        botocore_log.setLevel(logging.WARNING)

    s = _settings
    env_endpoint = any(os.environ.get(name) for name in _ENDPOINT_ENVS)
    endpoint = None if env_endpoint else s.endpoint_url  # None: boto3 reads the env itself
    style = s.addressing_style
    if style == "auto" and (env_endpoint or endpoint):
        style = "path"  # MinIO and most S3-compatible stores serve path-style only
    config = BotoConfig(retries={"mode": s.retry_mode, "total_max_attempts": s.max_attempts},
                        s3={"addressing_style": style}, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def transfer_config() -> Any:
    """boto3's multipart settings: files from `multipart_threshold_mb` go in parts."""
    from boto3.s3.transfer import TransferConfig

    mb = 1024 * 1024
    return TransferConfig(multipart_threshold=_settings.multipart_threshold_mb * mb,
                          multipart_chunksize=_settings.multipart_chunksize_mb * mb,
                          max_concurrency=_settings.max_concurrency)


def _endpoint(c: Any) -> str:
    return re.sub(r"//[^/@]*@", "//", c.meta.endpoint_url)  # never show user:password@


def _error_code(err: BaseException) -> str | None:
    """The S3 error code of `err` or of the ClientError it wraps (boto3's transfers)."""
    from botocore.exceptions import ClientError

    while err is not None:
        if isinstance(err, ClientError):
            return str(err.response.get("Error", {}).get("Code") or
                       err.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return None


def _explain(err: BaseException, c: Any, uri: S3Uri, action: str) -> DpsynthError:
    """A dpsynth error naming `uri`, what failed and what to check. Never echoes
    credentials: botocore's messages name at most the key id's existence."""
    from botocore.exceptions import (ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, PartialCredentialsError)

    where = f"{uri} ({action}, endpoint {_endpoint(c)})"
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return InputError(f"{where}: no usable S3 credentials. Set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials, or "
                          "give the pod a role; dpsynth never takes credentials from "
                          "params.yaml or command-line flags")
    if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
        return InputError(f"{where}: cannot connect to the S3 endpoint; check "
                          "AWS_ENDPOINT_URL (or storage.endpoint_url) and the network")
    code = _error_code(err)
    if code == "NoSuchBucket":
        return InputError(f"{where}: bucket {uri.bucket!r} does not exist; check the bucket "
                          "name and that the endpoint is the store that holds it")
    if code in _DENIED:
        return InputError(f"{where}: access denied ({code}); check the credentials boto3 "
                          "found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                          "~/.aws, the pod's role) and that they may read/write "
                          f"s3://{uri.bucket}/{uri.prefix}*")
    if code in _MISSING:
        return InputError(f"{where}: no such object; check the path")
    return StorageError(f"{where}: failed after {_settings.max_attempts} attempts "
                        f"({code or type(err).__name__}: {str(err)[:300]})")


@contextlib.contextmanager
def _s3_errors(c: Any, uri: S3Uri, action: str) -> Iterator[None]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error) as err:
        raise _explain(err, c, uri, action) from None


# --------------------------------------------------------------------------- objects


def read_bytes(location: str | Path) -> bytes:
    """The bytes of a local file or an `s3://bucket/key` object."""
    if not is_s3(location):
        path = Path(location).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        return path.read_bytes()
    uri, c = S3Uri.parse(str(location)), client()
    with _s3_errors(c, uri, "read"):
        return c.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """`(content, etag)` of an object, `(None, None)` if it does not exist: the read
    half of a compare-and-swap with `write_if`."""
    u, c = S3Uri.parse(uri), client()
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        obj = c.get_object(Bucket=u.bucket, Key=u.key)
        return obj["Body"].read(), obj["ETag"]
    except (ClientError, BotoCoreError) as err:
        if _error_code(err) in ("NoSuchKey", "404"):
            return None, None
        raise _explain(err, c, u, "read") from None


def write_if(uri: str, data: bytes, etag: str | None) -> bool:
    """Put `data` only if the object still has `etag` (or, with `etag=None`, does
    not exist yet): S3 conditional writes (`IfMatch` / `IfNoneMatch='*'`).

    Returns:
        False when another writer got there first; re-read and try again.
    """
    u, c = S3Uri.parse(uri), client()
    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
    from botocore.exceptions import ClientError

    try:
        c.put_object(Bucket=u.bucket, Key=u.key, Body=data, **condition)
        return True
    except ClientError as err:
        if _error_code(err) in _CONFLICT:
            return False
        raise _explain(err, c, u, "conditional write") from None


def _list(c: Any, uri: S3Uri) -> dict[str, dict[str, Any]]:
    """Every object under `uri/` by key (folder placeholders ending in '/' skipped)."""
    found: dict[str, dict[str, Any]] = {}
    with _s3_errors(c, uri, "list"):
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket,
                                                                Prefix=uri.prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    found[obj["Key"]] = obj
    return found


def _delete(c: Any, uri: S3Uri, keys: list[str]) -> None:
    """Delete `keys`; ones S3 refuses are logged (leftovers no reader trusts)."""
    with _s3_errors(c, uri, "delete"):
        for i in range(0, len(keys), 1000):  # the API's batch limit
            refused = c.delete_objects(Bucket=uri.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}).get("Errors")
            for e in refused or []:
                log.warning("could not delete s3://%s/%s (%s)", uri.bucket, e.get("Key"),
                            e.get("Code"))


def _upload(c: Any, path: Path, uri: S3Uri) -> None:
    with _s3_errors(c, uri, "upload"):
        c.upload_file(str(path), uri.bucket, uri.key, Config=transfer_config())


def _download(c: Any, uri: S3Uri, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _s3_errors(c, uri, "download"):
        c.download_file(uri.bucket, uri.key, str(path), Config=transfer_config())


# --------------------------------------------------------------------------- the cache


def cache_root() -> Path:
    """DPSYNTH_CACHE_DIR, else `storage.cache_dir`, else `~/.cache/dpsynth`. It holds
    copies of inputs, the private split included: keep it on a private disk."""
    chosen = os.environ.get(CACHE_ENV) or _settings.cache_dir
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dpsynth"




def _into_cache(tmp: Path, target: Path) -> Path:
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
    if not is_s3(location):
        return Path(location).expanduser()
    from botocore.exceptions import BotoCoreError, ClientError

    uri, c = S3Uri.parse(str(location)), client()
    entries: list[tuple[str, str, int]] = []  # (relative path, key, size)
    listing: list[Any] = []
    if uri.key:
        try:
            head = c.head_object(Bucket=uri.bucket, Key=uri.key)
            entries = [(uri.name, uri.key, head["ContentLength"])]
            listing = [uri.key, head["ContentLength"], head["ETag"]]
        except (ClientError, BotoCoreError) as err:
            if _error_code(err) not in ("404", "NoSuchKey", "NotFound"):
                raise _explain(err, c, uri, "read") from None
    if not entries:  # a prefix: a folder source (imagefolder, imagenet32, ...)
        objects = _list(c, uri)
        if not objects:
            raise InputError(f"{uri}: no object or prefix with that name in bucket "
                             f"{uri.bucket!r} (endpoint {_endpoint(c)}); check the path")
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
                _download(c, S3Uri(uri.bucket, key), tmp / rel)
                if (tmp / rel).stat().st_size != size:
                    raise InputError(f"s3://{uri.bucket}/{key}: downloaded "
                                     f"{(tmp / rel).stat().st_size} bytes, expected {size}")
            _into_cache(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: using the local copy %s", uri, target)
    return target / entries[0][0].split("/")[0]


# --------------------------------------------------------------------------- published outputs


def _marker(files: list[dict[str, Any]]) -> bytes:
    return (json.dumps({"schema": MARKER_SCHEMA, "published": datetime.now(
        timezone.utc).isoformat(timespec="seconds"), "files": files}, indent=1) + "\n").encode()


def _marker_files(data: bytes, uri: S3Uri) -> list[dict[str, Any]]:
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
    uri, c = S3Uri.parse(location), client()
    if not uri.key:
        raise InputError(f"{location}: an output needs a key under the bucket")
    paths = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    files = [{"path": p.relative_to(local_dir).as_posix(), "size": p.stat().st_size,
              "sha256": sha256_file(p)} for p in paths]
    marker = uri.child(MARKER)
    with _s3_errors(c, marker, "unpublish"):
        c.delete_object(Bucket=uri.bucket, Key=marker.key)
    for path, f in zip(paths, files):
        _upload(c, path, uri.child(f["path"]))
    keep = {uri.child(f["path"]).key for f in files}
    _delete(c, uri, [k for k in _list(c, uri) if k not in keep and k != marker.key])
    with _s3_errors(c, marker, "publish"):
        c.put_object(Bucket=uri.bucket, Key=marker.key, Body=_marker(files),
                     ContentType="application/json")
    log.info("published %s (%d files, %.1f MB)", uri, len(files),
             sum(f["size"] for f in files) / 1e6)
    return len(files)


def _cached(target: Path, files: list[dict[str, Any]]) -> bool:
    return target.is_dir() and all((target / f["path"]).is_file() and
                                   (target / f["path"]).stat().st_size == f["size"]
                                   for f in files)


def _find_marker(uri: S3Uri) -> tuple[S3Uri, str, bytes] | None:
    """`(published root, sub-folder, marker bytes)` for `uri` or the nearest
    published output above it (`.../prepare/public` is inside `.../prepare`)."""
    parts = uri.key.split("/") if uri.key else []
    for i in range(len(parts), 0, -1):
        root = S3Uri(uri.bucket, "/".join(parts[:i]))
        data, _ = read_versioned(str(root.child(MARKER)))
        if data is not None:
            return root, "/".join(parts[i:]), data
    return None


def download_published(location: str) -> Path:
    """A verified local copy of a published output (or of a folder inside one),
    cached by its marker's content hash.

    Raises:
        InputError: no marker (never published, being written, or a crashed
            write), a file whose sha256 differs from the marker, or S3 refusing.
    """
    uri, c = S3Uri.parse(location), client()
    for attempt in range(2):  # a second try if it was re-published while we read
        found = _find_marker(uri)
        if found is None:
            if not _list(c, uri):  # (also names a missing bucket)
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
        base = cache_root() / "inputs"
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
                    _download(c, uri.child(f["path"]), tmp / f["path"])
                except InputError as err:
                    bad = f"{uri.child(f['path'])}: listed in {MARKER} but unreadable ({err})"
                    break
                if sha256_file(tmp / f["path"]) != f["sha256"]:
                    bad = (f"{uri.child(f['path'])}: sha256 differs from {MARKER} (changed "
                           "or truncated after publishing); re-run the stage that wrote it")
                    break
            if bad is None:
                return _into_cache(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if attempt == 0 and read_versioned(str(root.child(MARKER)))[0] != data:
            log.info("%s was re-published while it was read; reading it again", root)
            continue
        raise InputError(bad)
    raise InputError(f"{uri}: re-published twice while being read; try again")


@contextlib.contextmanager
def local_input(location: str | Path) -> Iterator[Path]:
    """A local folder with the contents of `location`: the path itself when local,
    else the verified cached copy of a published `s3://` prefix."""
    if not is_s3(location):
        yield Path(location)
        return
    yield download_published(str(location))


# --------------------------------------------------------------------------- work folders


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
        self.uri = S3Uri.parse(location)
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
        c = client()
        keys = {k[len(self.uri.prefix):]: k for k in _list(c, self.uri)}
        latest: dict[str, str] = {}
        for rel, key in keys.items():
            if rel.rsplit("/", 1)[-1] == _LATEST:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    latest[rel.rpartition("/")[0]] = json.loads(
                        read_bytes(f"{SCHEME}{self.uri.bucket}/{key}"))["checkpoint"]
        got = 0
        for rel, key in sorted(keys.items()):
            parts = rel.split("/")
            in_ckpt = [i for i, part in enumerate(parts[:-1]) if _CHECKPOINT.fullmatch(part)]
            if _skipped(rel) or any(latest.get("/".join(parts[:i])) != parts[i]
                                    for i in in_ckpt):
                continue
            _download(c, S3Uri(self.uri.bucket, key), self.local / rel)
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
        c = client()
        for rel in changed:
            _upload(c, self.local / rel, self.uri.child(rel))
        _delete(c, self.uri, gone)
        self._seen = now
        return len(changed)

    def clear(self) -> None:
        """Delete the remote state (the stage finished and removed its own)."""
        c = client()
        _delete(c, self.uri, list(_list(c, self.uri)))


def checkpoint_saved(ckpt_dir: str | Path) -> None:
    """Hook for `training.checkpoint.save_checkpoint`: upload a new checkpoint when
    its folder is a mirrored work folder (or inside one)."""
    path = Path(ckpt_dir).resolve()
    for mirror in _mirrors:
        if path == mirror.local.resolve() or mirror.local.resolve() in path.parents:
            mirror.push()


def _staging_dir(prefix: str) -> Path:
    """A fresh local folder under the cache, for a stage's copy of S3 state."""
    staging = cache_root() / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=staging))


@contextlib.contextmanager
def work_folder(location: str | Path) -> Iterator[Path]:
    """A resumable work folder (checkpoints, finished shards) at `location`, as a
    local folder: for drivers that choose the work folder themselves (the Kubeflow
    components' `work_root`).

    Local: the path itself. `s3://`: a local copy, pulled before; pushed at every
    checkpoint (`checkpoint_saved`) and when the block ends, error or not, so a
    retry on another machine resumes; deleted remotely when the stage removed its
    local copy (it finished and published).
    """
    if not is_s3(location):
        yield Path(location)
        return
    uri = S3Uri.parse(str(location))
    root = _staging_dir("work-")
    mirror = WorkMirror(str(uri), root / uri.name)
    mirror.pull()
    _mirrors.append(mirror)
    try:
        yield mirror.local
    finally:
        _mirrors.remove(mirror)
        try:
            if mirror.local.exists():
                mirror.push()
            else:
                mirror.clear()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def remove_work(location: str | Path) -> None:
    """Delete a work folder, local or `s3://` (its output is published)."""
    if is_s3(location):
        WorkMirror(str(location), Path(tempfile.gettempdir())).clear()
    else:
        shutil.rmtree(location, ignore_errors=True)


@contextlib.contextmanager
def publish(location: str | Path, *, mirror_work: bool = True) -> Iterator[Path]:
    """The local folder a stage writes `location` into.

    Local: the path itself (the stage renames its output into place, `atomic_dir`).
    `s3://`: a fresh staging folder; when the block ends without an error and
    the stage wrote the folder, it is published with `upload_published`. With
    `mirror_work`, the work folder `work_location(location)` is pulled before,
    kept up to date at each checkpoint (`checkpoint_saved`) and at the end, and
    deleted once the output is published if the stage removed its local copy.
    """
    if not is_s3(location):
        yield Path(location)
        return
    uri = S3Uri.parse(str(location))
    work_uri = str(work_location(str(uri)))  # also refuses a bucket-root output
    root = _staging_dir("publish-")
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
            _mirrors.append(mirror)
        try:
            yield out
        finally:
            if mirror in _mirrors:
                _mirrors.remove(mirror)
        published = out.is_dir()  # no folder: nothing to publish (e.g. a non-zero rank)
        if published:
            upload_published(out, str(uri))
        if mirror is not None:
            if published and not mirror.local.exists():
                mirror.clear()
            else:
                mirror.push()
    except BaseException:
        save_work()
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
