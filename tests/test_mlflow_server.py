"""`dpsynth mlflow-server` and shared storage end to end, against real servers on
loopback: moto's S3 server and a real `mlflow server` (SQLite backend, artifacts
proxied to S3), started on free ports and stopped by the fixture.

The server runs as a shared deployment should: with MLflow's basic-auth app.
The smoke pipeline's stages run as separate `dpsynth` processes, as pods would:
every input and output an `s3://` URI, the privacy ledger on S3, tracking
through MLFLOW_TRACKING_URI (+ MLFLOW_TRACKING_USERNAME/PASSWORD). Then, through
the MLflow client and boto3: the grouped runs, their params and metrics,
artifacts in the bucket, the registered models, and the known fake credentials
(S3 and MLflow) nowhere in params, tags, artifacts, outputs or logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from dpsynth.errors import InputError
from dpsynth.mlflow_server import server_command

REPO = Path(__file__).resolve().parents[1]
PIPELINE_ID = "shared-e2e"
MLFLOW_USER, MLFLOW_PASSWORD = "admin", "fake-mlflow-password-dpsynth-31d9"


def test_server_command_binds_loopback_and_keeps_passwords_off_the_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_BACKEND_STORE_URI", raising=False)
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    cmd = server_command(artifacts_destination="s3://b/mlflow", port=5001)
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://b/mlflow"
    assert cmd[cmd.index("--backend-store-uri") + 1] == "sqlite:///mlflow-server.db"
    assert "--serve-artifacts" in cmd and "--app-name" not in cmd
    with pytest.raises(InputError, match="--basic-auth needs MLFLOW_FLASK_SERVER_SECRET_KEY"):
        server_command(artifacts_destination="s3://b/m", basic_auth=True)
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "k" * 32)
    auth = server_command(artifacts_destination="s3://b/m", basic_auth=True)
    assert auth[auth.index("--app-name") + 1] == "basic-auth"
    with pytest.raises(InputError, match="holds a password") as info:
        server_command(artifacts_destination="s3://b/m",
                       backend_store_uri="postgresql://mlflow:hunter2@db:5432/mlflow")
    assert "hunter2" not in str(info.value)
    # the password-free way: mlflow reads the URI from the environment itself
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql://mlflow:hunter2@db/mlflow")
    assert "--backend-store-uri" not in server_command(artifacts_destination="s3://b/m")
    with pytest.raises(InputError, match="--artifacts-destination is required"):
        server_command(artifacts_destination="")


# --------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Shared:
    """The finished run: where everything is, and every log line produced."""

    tracking_uri: str
    bucket: str
    s3: Any  # boto3 client
    env: dict[str, str]
    logs: list[str]
    server_log: Path
    key_id: str
    secret: str
    secrets: tuple[str, ...]  # every credential in play, for the scans

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                  Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _stages(bucket: str) -> list[list[str]]:
    """prepare -> pretrain -> finetune (DP) -> sample -> rank, all through S3 (fid and
    classify add nothing here that rank does not already exercise)."""
    art = f"s3://{bucket}/art"
    return [
        ["prepare", "--out", f"{art}/prepare"],
        ["pretrain", "--public", f"{art}/prepare/public", "--out", f"{art}/pretrain"],
        ["finetune", "--model", f"{art}/pretrain", "--private", f"{art}/prepare/private",
         "--public", f"{art}/prepare/public", "--out", f"{art}/finetune"],
        ["sample", "--model", f"{art}/finetune", "--out", f"{art}/sample"],
        ["rank", "--synthetic", f"{art}/sample", "--test", f"{art}/prepare/test",
         "--dp-model", f"{art}/finetune", "--out", f"{art}/rank"],
    ]


@pytest.fixture(scope="module")
def shared(s3_env_vars: dict[str, str], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Shared]:
    import boto3

    tmp = tmp_path_factory.mktemp("shared")
    bucket = f"shared-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=s3_env_vars["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=s3_env_vars["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=s3_env_vars["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_")) and k != "DPSYNTH_CACHE_DIR"}
    env |= s3_env_vars | {"AWS_CONFIG_FILE": str(tmp / "none"),
                          "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none"),
                          "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = tmp / "mlflow-server.log"
    # the basic-auth app's settings (README "Basic auth"): its user database here, and
    # verified logins cached for a minute (PBKDF2 on every request is slow)
    auth_ini = tmp / "basic_auth.ini"
    auth_ini.write_text(f"""[mlflow]
default_permission = READ
database_uri = sqlite:///{tmp / 'basic_auth.db'}
admin_username = {MLFLOW_USER}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
""")
    with open(server_log, "w") as log:
        # `dpsynth mlflow-server` execs `mlflow server`, which runs uvicorn in a child:
        # a new session, so the whole group can be stopped
        server = subprocess.Popen(
            [sys.executable, "-m", "dpsynth.cli", "mlflow-server", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{bucket}/mlflow", "--basic-auth"],
            cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=env | {"MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                       "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD,
                       "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex})
    try:
        _wait_healthy(server, url, server_log)
        stage_env = env | {"MLFLOW_TRACKING_URI": url, "DPSYNTH_PIPELINE_ID": PIPELINE_ID,
                           "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
                           "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
                           "DPSYNTH_CACHE_DIR": str(tmp / "cache"), "TQDM_DISABLE": "1",
                           "OMP_NUM_THREADS": "1"}
        logs = []
        for args in _stages(bucket):
            proc = subprocess.run(
                [sys.executable, "-m", "dpsynth.cli", args[0], "--config",
                 str(REPO / "configs" / "smoke.yaml"), "--set",
                 f"privacy.ledger_dir=s3://{bucket}/ledger", *args[1:]],
                cwd=tmp, env=stage_env, capture_output=True, text=True, timeout=300)
            logs.append(proc.stdout + proc.stderr)
            assert proc.returncode == 0, f"dpsynth {args[0]}:\n{logs[-1][-4000:]}"
        yield Shared(url, bucket, s3, stage_env, logs, server_log,
                     s3_env_vars["AWS_ACCESS_KEY_ID"], s3_env_vars["AWS_SECRET_ACCESS_KEY"],
                     (s3_env_vars["AWS_ACCESS_KEY_ID"], s3_env_vars["AWS_SECRET_ACCESS_KEY"],
                      MLFLOW_PASSWORD))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def _runs(shared: Shared, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[Any, Any, dict[str, Any]]:
    """The MLflow client (logged in), the experiment, and the runs by stage tag."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    client = mlflow.MlflowClient(tracking_uri=shared.tracking_uri)
    exp = client.get_experiment_by_name("dpsynth-smoke")
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`dpsynth.pipeline_id` = '{PIPELINE_ID}'")
    return client, exp, {r.data.tags["dpsynth.stage"]: r for r in runs}


@pytest.mark.slow
def test_stage_runs_are_grouped_with_params_and_metrics(
        shared: Shared, monkeypatch: pytest.MonkeyPatch) -> None:
    _, exp, runs = _runs(shared, monkeypatch)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    stages = [args[0] for args in _stages(shared.bucket)]
    assert sorted(k for k in runs if "/" not in k) == sorted(["pipeline", *stages])
    parent = runs["pipeline"].info.run_id
    for stage in stages:
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent
        assert runs[stage].info.status == "FINISHED"
    assert sorted(k for k in runs if k.startswith("rank/")) == [
        f"rank/config-{i:02d}" for i in range(3)]
    assert runs["pretrain"].data.params["pretrain.steps"] == "20"
    assert runs["finetune"].data.params["finetune.aug_multiplicity"] == "2"
    assert runs["finetune"].data.metrics["epsilon"] <= 10.0
    assert "final_loss" in runs["pretrain"].data.metrics


@pytest.mark.slow
def test_artifacts_and_registered_models_are_in_the_bucket(
        shared: Shared, monkeypatch: pytest.MonkeyPatch) -> None:
    client, exp, runs = _runs(shared, monkeypatch)
    keys = shared.keys("mlflow/")
    for stage, name in (("pretrain", "loss.png"), ("sample", "grid.png")):
        run_id = runs[stage].info.run_id
        assert f"mlflow/{exp.experiment_id}/{run_id}/artifacts/{name}" in keys
    champion = client.get_model_version_by_alias("dpsynth-classifier", "champion")
    generator = client.get_latest_versions("dpsynth-generator")
    assert champion.run_id == runs["rank"].info.run_id and generator
    for version in (champion, *generator):
        # the model's files (MLmodel, weights) are objects in the bucket
        run_prefix = f"mlflow/{exp.experiment_id}/{version.run_id}/artifacts/"
        logged = [k for k in keys if k.startswith(run_prefix) and k.endswith("/MLmodel")]
        assert logged, f"no MLmodel under {run_prefix}"
        assert any(k.endswith(".safetensors") and k.startswith(run_prefix) for k in keys)


@pytest.mark.slow
def test_stage_outputs_and_ledger_live_on_s3(shared: Shared) -> None:
    keys = shared.keys("art/")
    for stage in ("prepare", "pretrain", "finetune", "sample", "rank"):
        assert f"art/{stage}/_SUCCESS.json" in keys
    assert "art/prepare/private/manifest.json" in keys and "art/finetune/privacy.json" in keys
    assert not [k for k in keys if "/.work/" in k]  # finished stages leave no work state
    [ledger] = shared.keys("ledger/")
    entries = json.loads(shared.s3.get_object(Bucket=shared.bucket, Key=ledger)["Body"].read())
    assert [e["status"] for e in entries["entries"]] == ["completed"]
    assert any("published s3://" in log for log in shared.logs)


@pytest.mark.slow
def test_credentials_appear_nowhere(shared: Shared, monkeypatch: pytest.MonkeyPatch) -> None:
    client, exp, runs = _runs(shared, monkeypatch)
    texts = [*shared.logs, shared.server_log.read_text()]
    for run in runs.values():
        texts.append(json.dumps([run.data.params, run.data.tags, run.data.metrics]))
    for model in client.search_registered_models():
        texts.append(str(model))
        texts.extend(str(v) for v in client.search_model_versions(f"name='{model.name}'"))
    for key in shared.keys():  # artifacts, stage outputs, ledger, markers
        texts.append(shared.s3.get_object(Bucket=shared.bucket, Key=key)["Body"].read().decode(
            "latin-1"))
    assert len(texts) > 50
    for text in texts:
        for secret in shared.secrets:
            assert secret not in text


@pytest.mark.slow
def test_server_refuses_requests_without_a_login(shared: Shared) -> None:
    request = urllib.request.Request(f"{shared.tracking_uri}/api/2.0/mlflow/experiments/search",
                                     data=b'{"max_results": 1}', method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401


def test_compiled_pipeline_holds_no_credentials(s3_env_vars: dict[str, str],
                                                tmp_path: Path) -> None:
    # compiled where credentials are set, as on a developer's machine: none may be
    # baked in (the pipeline takes them from Kubernetes Secrets at run time)
    password = "fake-mlflow-password-dpsynth"
    env = os.environ | s3_env_vars | {"MLFLOW_TRACKING_PASSWORD": password,
                                      "MLFLOW_TRACKING_USERNAME": "fake-user-dpsynth"}
    out = tmp_path / "pipeline.yaml"
    proc = subprocess.run([sys.executable, "-m", "pipelines.dpsynth_pipeline", "--output",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    compiled = out.read_text()
    assert "AWS_SECRET_ACCESS_KEY" in compiled  # wired by name, from a Secret
    for value in (s3_env_vars["AWS_ACCESS_KEY_ID"], s3_env_vars["AWS_SECRET_ACCESS_KEY"],
                  password):
        assert value not in compiled and value not in proc.stdout + proc.stderr
