"""The S3 client and its errors: the one place dpsynth talks to object storage
(boto3). `s3://bucket/key` URIs, reads, compare-and-swap writes, listings,
uploads and downloads, each failure explained in one line naming the URI and
the fix. Endpoint: AWS_ENDPOINT_URL(_S3) when set, else `storage.endpoint_url`.
Credentials: boto3's standard chain only, never the config or a flag.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dpsynth.config import StorageConfig
from dpsynth.errors import DpsynthError, InputError

log = logging.getLogger(__name__)

SCHEME = "s3://"
_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "AllAccessDisabled", "ExpiredToken", "InvalidToken", "AccountProblem"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
# what boto3 reads from the environment: a change means a new client
_CLIENT_ENV = (*_ENDPOINT_ENVS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")
_settings = StorageConfig()
_clients: dict[bytes, Any] = {}


class StorageError(DpsynthError):
    """A storage operation failed after botocore's retries (not the user's input)."""


def configure(settings: StorageConfig) -> None:
    """Use `settings` (the config's `storage` section) for every later call."""
    global _settings
    _settings = settings


def settings() -> StorageConfig:
    """The `storage` settings in use (`configure`)."""
    return _settings


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


def endpoint(c: Any) -> str:
    return re.sub(r"//[^/@]*@", "//", c.meta.endpoint_url)  # never show user:password@


def error_code(err: BaseException) -> str | None:
    """The S3 error code of `err` or of the ClientError it wraps (boto3's transfers)."""
    from botocore.exceptions import ClientError

    while err is not None:
        if isinstance(err, ClientError):
            return str(err.response.get("Error", {}).get("Code") or
                       err.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return None


def explain(err: BaseException, c: Any, uri: S3Uri, action: str) -> DpsynthError:
    """A dpsynth error naming `uri`, what failed and what to check. Never echoes
    credentials: botocore's messages name at most the key id's existence."""
    from botocore.exceptions import (ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, PartialCredentialsError)

    where = f"{uri} ({action}, endpoint {endpoint(c)})"
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return InputError(f"{where}: no usable S3 credentials. Set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials, or "
                          "give the pod a role; dpsynth never takes credentials from "
                          "params.yaml or command-line flags")
    if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
        return InputError(f"{where}: cannot connect to the S3 endpoint; check "
                          "AWS_ENDPOINT_URL (or storage.endpoint_url) and the network")
    code = error_code(err)
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
def s3_errors(c: Any, uri: S3Uri, action: str) -> Iterator[None]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error) as err:
        raise explain(err, c, uri, action) from None


def read_bytes(location: str | Path) -> bytes:
    """The bytes of a local file or an `s3://bucket/key` object."""
    if not is_s3(location):
        path = Path(location).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        return path.read_bytes()
    uri, c = S3Uri.parse(str(location)), client()
    with s3_errors(c, uri, "read"):
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
        if error_code(err) in ("NoSuchKey", "404"):
            return None, None
        raise explain(err, c, u, "read") from None


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
        if error_code(err) in _CONFLICT:
            return False
        raise explain(err, c, u, "conditional write") from None


def list_objects(c: Any, uri: S3Uri) -> dict[str, dict[str, Any]]:
    """Every object under `uri/` by key (folder placeholders ending in '/' skipped)."""
    found: dict[str, dict[str, Any]] = {}
    with s3_errors(c, uri, "list"):
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket,
                                                                Prefix=uri.prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    found[obj["Key"]] = obj
    return found


def delete_keys(c: Any, uri: S3Uri, keys: list[str]) -> None:
    """Delete `keys`; ones S3 refuses are logged (leftovers no reader trusts)."""
    with s3_errors(c, uri, "delete"):
        for i in range(0, len(keys), 1000):  # the API's batch limit
            refused = c.delete_objects(Bucket=uri.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}).get("Errors")
            for e in refused or []:
                log.warning("could not delete s3://%s/%s (%s)", uri.bucket, e.get("Key"),
                            e.get("Code"))


def upload_file(c: Any, path: Path, uri: S3Uri) -> None:
    with s3_errors(c, uri, "upload"):
        c.upload_file(str(path), uri.bucket, uri.key, Config=transfer_config())


def download_file(c: Any, uri: S3Uri, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with s3_errors(c, uri, "download"):
        c.download_file(uri.bucket, uri.key, str(path), Config=transfer_config())
