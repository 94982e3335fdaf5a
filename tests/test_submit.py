"""`dpsynth submit` against a fake KFP API server: what kfp.Client sends for a run and a
recurring run, and that bad input is refused before any request."""

# (no `from __future__ import annotations`: kfp reads the test pipeline's annotations)
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from dpsynth import cli
from dpsynth.config import load as load_config
from dpsynth.errors import InputError
from dpsynth.submit import check_host, normalize_cron, submit

API = "/apis/v2beta1"


class FakeKfp:
    """A KFP API server answering just what kfp.Client needs, recording every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.experiments: dict[str, str] = {}            # display_name -> experiment_id
        self.refuse: dict[str, tuple[int, str]] = {}      # path -> (status, message)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests.append({
                    "method": self.command, "path": url.path, "query": parse_qs(url.query),
                    "body": json.loads(raw) if raw else None, "headers": dict(self.headers)})
                status, answer = fake.answer(self.command, url.path, parse_qs(url.query),
                                             json.loads(raw) if raw else None)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, method: str, path: str, query: dict, body: Any) -> tuple[int, dict]:
        if path in self.refuse:
            status, message = self.refuse[path]
            return status, {"error": message, "code": 3, "message": message}
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False}
        if (method, path) == ("GET", f"{API}/experiments"):
            predicate = json.loads(query["filter"][0])["predicates"][0]
            name = predicate["stringValue"]
            if name not in self.experiments:
                return 200, {}
            return 200, {"experiments": [{"experiment_id": self.experiments[name],
                                          "display_name": name}], "total_size": 1}
        if (method, path) == ("POST", f"{API}/experiments"):
            self.experiments[body["display_name"]] = f"exp-{len(self.experiments) + 1}"
            return 200, {"experiment_id": self.experiments[body["display_name"]],
                         "display_name": body["display_name"]}
        if (method, path) == ("POST", f"{API}/runs"):
            return 200, {"run_id": "run-1", "display_name": body["display_name"],
                         "experiment_id": body["experiment_id"]}
        if (method, path) == ("POST", f"{API}/recurringruns"):
            return 200, {"recurring_run_id": "rr-1", "display_name": body["display_name"],
                         "experiment_id": body["experiment_id"]}
        return 404, {"error": "not found", "code": 5, "message": f"{method} {path}"}

    def sent(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if (r["method"], r["path"]) == (method, API + path)]


@pytest.fixture
def kfp_server() -> Iterator[FakeKfp]:
    fake = FakeKfp()
    thread = threading.Thread(target=fake.server.serve_forever, kwargs={"poll_interval": 0.01},
                              daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.fixture(autouse=True)
def no_kfp_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing from this machine's kfp setup (env, ~/.config/kfp, a pod's token) leaks in."""
    import kfp.client.client

    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_SA_TOKEN_PATH",
                "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME", "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
                "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
                "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT",
                        str(tmp_path / "kfp-context.json"))
    monkeypatch.setattr("dpsynth.submit.DEFAULT_TOKEN_PATH", tmp_path / "no-token")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small compiled pipeline with one parameter of each scalar type, one required."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def train(source: str, epsilon: float, steps: int, tag: str, dp: bool) -> str:
        return tag

    @dsl.pipeline(name="tiny-dpsynth")
    def tiny(source: str, epsilon: float = 10.0, steps: int = 100, tag: str = "nightly",
             dp: bool = True) -> None:
        train(source=source, epsilon=epsilon, steps=steps, tag=tag, dp=dp)

    path = tmp_path_factory.mktemp("pipeline") / "tiny.yaml"
    compiler.Compiler().compile(tiny, str(path))
    return path


def _run(server: FakeKfp, package: Path, *args: str) -> int:
    return cli.main(["submit", "--host", server.url, "--package", str(package), *args])


def test_run_sends_the_package_and_typed_params(kfp_server: FakeKfp, package: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    code = _run(kfp_server, package, "--param", "source=s3://bucket/raw", "--param",
                "epsilon=5", "--param", "steps=200", "--param", "tag=007", "--param", "dp=false",
                "--run-name", "first")
    out = capsys.readouterr().out
    assert code == 0
    # kfp.Client: healthz (multi-user?), experiment by name, create it, create the run
    assert [(r["method"], r["path"]) for r in kfp_server.requests] == [
        ("GET", f"{API}/healthz"), ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"), ("POST", f"{API}/runs")]
    lookup = json.loads(kfp_server.sent("GET", "/experiments")[0]["query"]["filter"][0])
    assert lookup["predicates"][0]["key"] == "display_name"
    assert lookup["predicates"][0]["stringValue"] == "dpsynth"
    assert kfp_server.sent("POST", "/experiments")[0]["body"]["display_name"] == "dpsynth"
    run = kfp_server.sent("POST", "/runs")[0]
    body = run["body"]
    assert body["pipeline_spec"] == yaml.safe_load(package.read_text())
    parameters = body["runtime_config"]["parameters"]
    assert parameters == {"source": "s3://bucket/raw", "epsilon": 5.0, "steps": 200,
                          "tag": "007", "dp": False}
    assert {k: type(v) for k, v in parameters.items()} == {
        "source": str, "epsilon": float, "steps": int, "tag": str, "dp": bool}
    assert body["experiment_id"] == "exp-1" and body["display_name"] == "first"
    assert "Authorization" not in run["headers"] and "authorization" not in run["headers"]
    assert "run run-1 (first) in experiment dpsynth" in out
    assert f"{kfp_server.url}/#/runs/details/run-1" in out
    assert "Run details:" not in out  # kfp's own print is not repeated


def test_exponent_without_a_dot_is_a_float(kfp_server: FakeKfp, package: Path) -> None:
    # plain YAML 1.1 reads `1e-5` as a string; submit reads values as --set does
    assert _run(kfp_server, package, "--param", "source=x", "--param", "epsilon=1e-5") == 0
    parameters = kfp_server.sent("POST", "/runs")[0]["body"]["runtime_config"]["parameters"]
    assert parameters["epsilon"] == 1e-5


def test_existing_experiment_is_reused_and_defaults_apply(kfp_server: FakeKfp,
                                                          package: Path) -> None:
    kfp_server.experiments["nightly"] = "exp-7"
    assert _run(kfp_server, package, "--experiment", "nightly", "--param", "source=x") == 0
    assert kfp_server.sent("POST", "/experiments") == []
    body = kfp_server.sent("POST", "/runs")[0]["body"]
    assert body["experiment_id"] == "exp-7"
    assert body["runtime_config"]["parameters"] == {"source": "x"}  # the rest: defaults
    assert body["display_name"].startswith("tiny-dpsynth ")


@pytest.mark.parametrize("schedule", ["0 3 * * *", "0 0 3 * * *"])
def test_schedule_creates_a_recurring_run_with_six_field_cron(
        kfp_server: FakeKfp, package: Path, schedule: str,
        capsys: pytest.CaptureFixture) -> None:
    code = _run(kfp_server, package, "--schedule", schedule, "--param", "source=x",
                "--param", "epsilon=2.5")
    out = capsys.readouterr().out
    assert code == 0
    assert kfp_server.sent("POST", "/runs") == []
    body = kfp_server.sent("POST", "/recurringruns")[0]["body"]
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True
    assert str(body["max_concurrency"]) == "1"
    assert body["experiment_id"] == "exp-1"
    assert body["pipeline_spec"] == yaml.safe_load(package.read_text())
    assert body["runtime_config"]["parameters"] == {"source": "x", "epsilon": 2.5}
    assert "recurring run rr-1" in out and "cron '0 0 3 * * *'" in out
    assert f"{kfp_server.url}/#/recurringrun/details/rr-1" in out


def test_submit_function_returns_the_result(kfp_server: FakeKfp, package: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KF_PIPELINES_UI_ENDPOINT", "https://kubeflow.example.com/pipeline")
    result = submit(package, host=kfp_server.url + "/", experiment="team", params={"source": "x",
                    "steps": 3}, schedule="@daily", run_name=None, namespace="team-a")
    assert (result.kind, result.id, result.experiment_id) == ("recurring_run", "rr-1", "exp-1")
    assert result.schedule == "@daily" and result.name == "tiny-dpsynth @daily"
    assert result.url == "https://kubeflow.example.com/pipeline/#/recurringrun/details/rr-1"
    # a namespace skips kfp's healthz probe and goes with the experiment
    assert kfp_server.sent("GET", "/healthz") == []
    assert kfp_server.sent("GET", "/experiments")[0]["query"]["namespace"] == ["team-a"]
    assert kfp_server.sent("POST", "/experiments")[0]["body"]["namespace"] == "team-a"


def test_platform_spec_document_travels_with_the_pipeline(kfp_server: FakeKfp, package: Path,
                                                          tmp_path: Path) -> None:
    platform = {"platforms": {"kubernetes": {"deploymentSpec": {"executors": {
        "exec-train": {"secretAsEnv": [{"secretName": "mlflow", "keyToEnv": [
            {"secretKey": "uri", "envVar": "MLFLOW_TRACKING_URI"}]}]}}}}}}
    two_docs = tmp_path / "with-platform.yaml"
    two_docs.write_text(package.read_text() + "---\n" + yaml.safe_dump(platform))
    assert _run(kfp_server, two_docs, "--param", "source=x") == 0
    spec = kfp_server.sent("POST", "/runs")[0]["body"]["pipeline_spec"]
    assert spec == {"pipeline_spec": yaml.safe_load(package.read_text()),
                    "platform_spec": platform}


def test_token_comes_from_the_environment_and_is_never_printed(
        kfp_server: FakeKfp, package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t-t0ken\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    assert _run(kfp_server, package, "--param", "source=x") == 0
    assert kfp_server.requests
    for request in kfp_server.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers["authorization"] == "Bearer s3cr3t-t0ken"
    captured = capsys.readouterr()
    assert "s3cr3t" not in captured.out + captured.err


BAD = [
    (["--param", "source=x", "--param", "epsilom=5"],
     "unknown pipeline parameter(s) ['epsilom']"),
    (["--param", "source=x", "--param", "steps=1.5"], "declares steps as NUMBER_INTEGER"),
    (["--param", "source=x", "--param", "steps=true"], "declares steps as NUMBER_INTEGER"),
    (["--param", "source=x", "--param", "dp=maybe"], "declares dp as BOOLEAN"),
    (["--param", "source=x", "--param", "epsilon=[1"], "not a YAML value"),
    (["--param", "epsilon=5"], "needs parameter(s) ['source']"),
    (["--param", "source"], "expected KEY=VALUE"),
    (["--param", "source=x", "--param", "source=y"], "--param source given twice"),
    (["--param", "source=x", "--package", "{tmp}/nope.yaml"], "run `make pipeline`"),
    (["--param", "source=x", "--package", "{tmp}/notes.txt"], "expected a compiled pipeline"),
    (["--param", "source=x", "--package", "{tmp}/garbage.yaml"], "not a compiled KFP pipeline"),
    (["--param", "source=x", "--host", "ftp://kfp.example.com"], "expected an http(s) URL"),
    (["--param", "source=x", "--host", "localhost:8080"], "expected an http(s) URL"),
    (["--param", "source=x", "--host", "http://"], "expected an http(s) URL"),
    (["--param", "source=x", "--host", "http://kfp:99999"], "bad port number"),
    (["--param", "source=x", "--host", "https://me:hunter2@kfp.example.com"],
     "must not contain credentials"),
    (["--param", "source=x", "--schedule", "0 3 * *"], "expected a cron expression with 5"),
    (["--param", "source=x", "--schedule", "0 25 * * *"], "bad hour field '25'"),
    (["--param", "source=x", "--schedule", "0 0 3 * * * *"], "expected a cron expression"),
    (["--param", "source=x", "--schedule", "0 3 * * FUNDAY"], "bad day-of-week field"),
    (["--param", "source=x", "--schedule", "*/0 3 * * *"], "step must be > 0"),
    (["--param", "source=x", "--namespace", "Team_A"], "expected a Kubernetes namespace"),
    (["--param", "source=x", "--experiment", " "], "--experiment must not be empty"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_exits_2_before_any_request(kfp_server: FakeKfp, package: Path,
                                              tmp_path: Path, extra: list[str], message: str,
                                              capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("not a pipeline")
    (tmp_path / "garbage.yaml").write_text("pipelineInfo: {name: x}\nroot: {dagg: {}}\n")
    code = _run(kfp_server, package, *[a.format(tmp=tmp_path) for a in extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("dpsynth submit: error: ") and message in captured.err
    assert captured.out == "" and "hunter2" not in captured.err
    assert kfp_server.requests == []


def test_unknown_parameter_message_lists_the_known_ones(kfp_server: FakeKfp, package: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    assert _run(kfp_server, package, "--param", "source=x", "--param", "noise=1") == 2
    assert ("known: dp (BOOLEAN), epsilon (NUMBER_DOUBLE), source (STRING), steps "
            "(NUMBER_INTEGER), tag (STRING)") in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]
DPSYNTH_PACKAGE = REPO / "pipelines" / "dpsynth.yaml"  # the compiled pipeline, kept current


def test_set_appends_config_settings_to_the_overrides(kfp_server: FakeKfp) -> None:
    code = _run(kfp_server, DPSYNTH_PACKAGE, "--param", "overrides=[seed=3]",
                "--set", "finetune.epsilon=5", "--set", "data.test=null")
    assert code == 0
    parameters = kfp_server.sent("POST", "/runs")[0]["body"]["runtime_config"]["parameters"]
    # after the ones given with --param, in order; everything else: the package's defaults
    assert parameters == {"overrides": ["seed=3", "finetune.epsilon=5", "data.test=null"]}


def test_config_file_becomes_the_base_config(kfp_server: FakeKfp) -> None:
    from dpsynth.config import from_dict
    from dpsynth.submit import base_config_text

    smoke = REPO / "configs" / "smoke.yaml"
    assert _run(kfp_server, DPSYNTH_PACKAGE, "--config", str(smoke),
                "--set", "sample.num_shards=2") == 0
    parameters = kfp_server.sent("POST", "/runs")[0]["body"]["runtime_config"]["parameters"]
    assert parameters["base_config"] == base_config_text(smoke)
    assert from_dict(yaml.safe_load(parameters["base_config"])) == load_config(smoke)
    assert parameters["overrides"] == ["sample.num_shards=2"]


@pytest.mark.parametrize("extra, message", [
    (["--set", "finetune.epsilonn=5"], "--set: finetune: unknown key(s) ['epsilonn']"),
    (["--set", "finetune.epsilon=-1"], "finetune.epsilon=-1"),
    (["--set", "sample.num_shards"], "sample.num_shards"),
    (["--config", "configs/smoke.yaml", "--param", "base_config=seed: 1"],
     "give the base config once"),
])
def test_bad_settings_exit_2_before_any_request(kfp_server: FakeKfp, extra: list[str],
                                                message: str,
                                                capsys: pytest.CaptureFixture) -> None:
    assert _run(kfp_server, DPSYNTH_PACKAGE, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpsynth submit: error: ") and message in err, err
    assert kfp_server.requests == []


def test_set_needs_a_pipeline_with_overrides(kfp_server: FakeKfp, package: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    assert _run(kfp_server, package, "--param", "source=x", "--set", "seed=1") == 2
    assert "--set needs a pipeline with an `overrides` parameter" in capsys.readouterr().err
    assert kfp_server.requests == []


def test_missing_token_file_and_missing_host_exit_2(kfp_server: FakeKfp, package: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "absent"))
    assert _run(kfp_server, package, "--param", "source=x") == 2
    assert "KF_PIPELINES_SA_TOKEN_PATH" in capsys.readouterr().err
    assert cli.main(["submit", "--package", str(package), "--param", "source=x"]) == 2
    assert "--host URL of the KFP API is required" in capsys.readouterr().err
    assert kfp_server.requests == []


def test_host_from_environment(kfp_server: FakeKfp, package: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", kfp_server.url)
    assert cli.main(["submit", "--package", str(package), "--param", "source=x"]) == 0
    assert len(kfp_server.sent("POST", "/runs")) == 1


def test_server_refusal_exits_1_with_its_message(kfp_server: FakeKfp, package: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    kfp_server.refuse[f"{API}/runs"] = (400, "Invalid input error: pipeline spec is invalid")
    assert _run(kfp_server, package, "--param", "source=x") == 1
    err = capsys.readouterr().err
    assert "answered 400" in err and "pipeline spec is invalid" in err


def test_unreachable_server_exits_1(package: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = cli.main(["submit", "--host", f"http://127.0.0.1:{port}", "--package", str(package),
                     "--param", "source=x"])
    assert code == 1
    assert f"cannot reach the KFP API at http://127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "sent"), [
    ("0 3 * * *", "0 0 3 * * *"),
    ("30 0 3 * * *", "30 0 3 * * *"),
    ("*/15 9-17 * * mon-fri", "0 */15 9-17 * * mon-fri"),
    ("0 0 1 JAN,JUL ?", "0 0 0 1 JAN,JUL ?"),
    ("@Daily", "@daily"),
])
def test_normalize_cron(given: str, sent: str) -> None:
    assert normalize_cron(given) == sent


@pytest.mark.parametrize("bad", ["", "@every", "0 3 * * 7", "0 3 32 * *", "0 3 * 0 *",
                                 "0 5-3 * * *", "? 3 * * *", "0 3 * * * extra x"])
def test_normalize_cron_refuses(bad: str) -> None:
    with pytest.raises(InputError, match="--schedule"):
        normalize_cron(bad)


def test_check_host_keeps_a_path_and_drops_the_trailing_slash() -> None:
    assert check_host("https://kubeflow.example.com/pipeline/") == \
        "https://kubeflow.example.com/pipeline"
    assert check_host("http://localhost:8080") == "http://localhost:8080"


def test_submit_help_has_an_example_and_no_out(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["submit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "dpsynth submit --host" in out and "--out" not in out
