"""`dpsynth mlflow-server`: a shared MLflow tracking server, for a team or a
cluster, that users reach with `MLFLOW_TRACKING_URI=http://host:port`.

Runs, params, metrics and the model registry go to a database (SQLite by
default; Postgres when `--backend-store-uri postgresql://...`); artifacts go
through the server (`--serve-artifacts`) to `--artifacts-destination`, usually
`s3://bucket/prefix`, so clients need no S3 credentials of their own. The
server reads its own S3 credentials from boto3's standard chain.

It binds to 127.0.0.1 and has no authentication unless `--basic-auth` (MLflow's
`basic-auth` app): anyone who can reach the port can read and change every run
and model. Expose it beyond the machine only with `--basic-auth` (or behind an
authenticating proxy) and `--allowed-hosts`.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

from dpsynth.errors import InputError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_BACKEND = "sqlite:///mlflow-server.db"
BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"  # mlflow server reads it when the flag is absent
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # the basic-auth app refuses to start without


def server_command(*, artifacts_destination: str, backend_store_uri: str | None = None,
                   host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, workers: int = 1,
                   basic_auth: bool = False, allowed_hosts: str | None = None) -> list[str]:
    """The `mlflow server` command line.

    Args:
        artifacts_destination: where the server stores artifacts, e.g. `s3://bucket/mlflow`.
        backend_store_uri: runs and registry database; None: `$MLFLOW_BACKEND_STORE_URI`
            if set (the way to pass a URI holding a password), else a local SQLite file.
        host: interface to bind; the default serves this machine only.
        port: TCP port.
        workers: server worker processes.
        basic_auth: MLflow's `basic-auth` app (users and permissions; see the README).
        allowed_hosts: `Host` headers to accept when served beyond localhost.

    Raises:
        InputError: a backend URI with a password on the command line (where `ps`
            and shell history would show it), a missing artifact destination, or
            basic auth without its secret key.
    """
    if not artifacts_destination:
        raise InputError("--artifacts-destination is required, e.g. s3://my-bucket/mlflow "
                         "(make mlflow-server MLFLOW_ARTIFACTS=s3://my-bucket/mlflow)")
    if backend_store_uri and urlsplit(backend_store_uri).password:
        # not echoed: the URI holds the password
        raise InputError(f"--backend-store-uri holds a password; keep it off the command line: "
                         f"export {BACKEND_ENV}=... (or use PGPASSWORD / ~/.pgpass for "
                         "Postgres) and omit --backend-store-uri")
    if basic_auth and not os.environ.get(SECRET_KEY_ENV):
        raise InputError(f"--basic-auth needs {SECRET_KEY_ENV} (a long random string; it signs "
                         "the CSRF tokens) and, on first start, MLFLOW_AUTH_ADMIN_PASSWORD (the "
                         "admin user's password): export both first")
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port}: must be in [1, 65535]")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--workers", str(workers), "--serve-artifacts",
           "--artifacts-destination", artifacts_destination]
    if backend_store_uri or not os.environ.get(BACKEND_ENV):
        cmd += ["--backend-store-uri", backend_store_uri or DEFAULT_BACKEND]
    if basic_auth:
        cmd += ["--app-name", "basic-auth"]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def serve(cmd: list[str]) -> None:
    """Replace this process with the server (signals reach it directly)."""
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
