"""The `tracking` (MLflow) and `storage` (S3) sections: the services around the
stages, not what they compute."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from dpsynth.config.checks import check
from dpsynth.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """MLflow tracking. The URI comes from `MLFLOW_TRACKING_URI` when set."""

    enabled: bool = True
    experiment: str = "dpsynth"
    tracking_uri: str = "sqlite:///mlflow.db"


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Object storage for `s3://` paths (AWS S3, MinIO, ...), used by `dpsynth.io.s3`.

    Credentials are never configured here: boto3's standard chain finds them
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, a pod's role).

    Attributes:
        endpoint_url: S3 endpoint, e.g. `http://minio:9000`; the environment's
            AWS_ENDPOINT_URL(_S3) wins when set; unset means AWS.
        cache_dir: local copies of s3:// inputs and staging of outputs;
            DPSYNTH_CACHE_DIR wins; default `~/.cache/dpsynth`.
        retry_mode: botocore's retry mode for transient errors (throttling, 5xx).
        max_attempts: attempts per request, the first included.
        multipart_threshold_mb: files at least this large are sent and fetched in parts.
        multipart_chunksize_mb: part size (S3's minimum is 5 MiB).
        max_concurrency: parallel part transfers per file.
        addressing_style: `auto` is path-style with a custom endpoint (what MinIO
            wants), botocore's choice otherwise.
    """

    endpoint_url: str | None = None
    cache_dir: str | None = None
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: int = 5
    multipart_threshold_mb: int = 64
    multipart_chunksize_mb: int = 16
    max_concurrency: int = 4
    addressing_style: Literal["auto", "path", "virtual"] = "auto"

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            if "@" in self.endpoint_url.split("/")[2 if "//" in self.endpoint_url else 0]:
                # not echoed: the part before "@" would be a credential
                raise ConfigError("storage.endpoint_url: holds user:password@; remove it. "
                                  "Credentials come from boto3's standard chain "
                                  "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                                  "~/.aws, a pod's role), never from the config")
            check(re.fullmatch(r"https?://[^/@\s]+(/\S*)?", self.endpoint_url) is not None,
                   "storage.endpoint_url", self.endpoint_url,
                   "must be an http(s)://host[:port] URL")
        check(1 <= self.max_attempts <= 20, "storage.max_attempts", self.max_attempts,
               "must be in [1, 20]")
        check(self.multipart_chunksize_mb >= 5, "storage.multipart_chunksize_mb",
               self.multipart_chunksize_mb, "must be >= 5 (S3's minimum part size)")
        check(self.multipart_threshold_mb >= 5, "storage.multipart_threshold_mb",
               self.multipart_threshold_mb, "must be >= 5 (S3's minimum part size)")
        check(1 <= self.max_concurrency <= 64, "storage.max_concurrency",
               self.max_concurrency, "must be in [1, 64]")

