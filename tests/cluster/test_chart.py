"""charts/dpsynth, checked without a cluster.

The chart is linted and rendered with helm_python (Helm's Go SDK through
ctypes, no helm binary, nothing contacted) for the default values,
values-production.yaml and a value set that turns every optional part on; each
rendered manifest is validated with kubernetes-validate in strict mode (unknown
fields are errors) against the chart's oldest supported Kubernetes and the
newest one the package knows. Then the properties a reviewer would check by
hand: locked-down pods, credentials only through secretKeyRef, a NetworkPolicy
that selects the MLflow pods, a CronJob that runs `dpsynth submit` as
configured, and least-privilege RBAC.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dpsynth"
RELEASE, NAMESPACE = "team", "dp-ml"

# Values that look like credentials. They sit only where a careless chart might read
# them (keys the chart does not define), so none may ever reach the rendered output.
CANARY = "CANARY-s3cr3t-wJalrXUtnFEMI-K7MDENG"
PIPELINE_SPEC = "pipelineInfo:\n  name: dpsynth\nroot:\n  dag:\n    tasks: {}\n"


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _production() -> dict:
    return helm.values_from_yaml((CHART / "values-production.yaml").read_text())


def _all_features() -> dict:
    """Production plus every optional branch of the templates."""
    return _merge(_production(), {
        "mlflow": {"image": {"repository": "ghcr.io/example/mlflow", "tag": "v3.17.2"},
                   "s3": {"endpointUrl": "http://minio.minio.svc.cluster.local:9000"},
                   "podLabels": {"team": "dp"}, "podAnnotations": {"a": "b"},
                   "serviceAccountName": "mlflow-irsa"},
        "submit": {"pipeline": {"spec": PIPELINE_SPEC}, "params": {"epsilon": 5, "tag": "007"},
                   "podLabels": {"team": "dp"}, "affinity": {}},
        "serviceAccount": {"annotations": {"example.com/role": "submit"}},
    })


def _sqlite_volume() -> dict:
    return {"mlflow": {"persistence": {"enabled": True, "storageClass": "standard-rwo"}}}


VALUE_SETS = {"default": dict, "production": _production, "all-features": _all_features,
              "sqlite-volume": _sqlite_volume}


def _kube_versions() -> tuple[str, str]:
    """(the chart's minimum Kubernetes, the newest kubernetes-validate has schemas for)."""
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    floor = re.match(r">=\s*v?(\d+\.\d+\.\d+)", meta["kubeVersion"])
    assert floor, f"Chart.yaml kubeVersion {meta['kubeVersion']!r}: expected '>=X.Y.Z-0'"
    return floor.group(1), kubernetes_validate.latest_version()


# ---- rendering --------------------------------------------------------------------

@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict | None = None, *, release: str = RELEASE,
           namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), offline."""
    return chart.render(values or {}, name=release, namespace=namespace, is_install=True)


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def find(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def component(docs: list[dict], name: str) -> list[dict]:
    """The documents of one part of the chart (its app.kubernetes.io/component label)."""
    return [d for d in docs
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == name]


def pod_templates(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    """(kind/name, pod template {metadata, spec}) of every workload."""
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield f"{kind}/{name}", doc["spec"]["template"]
        elif kind == "CronJob":
            yield f"{kind}/{name}", doc["spec"]["jobTemplate"]["spec"]["template"]
        elif kind == "Pod":
            yield f"{kind}/{name}", {"metadata": doc["metadata"], "spec": doc["spec"]}


def containers(spec: dict) -> list[dict]:
    return [c for key in ("initContainers", "containers", "ephemeralContainers")
            for c in spec.get(key) or []]


def command_line(container: dict) -> list[str]:
    return list(container.get("command") or []) + list(container.get("args") or [])


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def value_set(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, dict, list]:
    values = VALUE_SETS[request.param]()
    return request.param, values, documents(render(chart, values))


@pytest.fixture(scope="module")
def default_docs(chart: helm.Chart) -> list[dict]:
    return documents(render(chart))


# ---- chart metadata and lint ---------------------------------------------------------

def test_chart_metadata_matches_the_package(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["appVersion"] == project["version"], \
        "Chart.yaml appVersion differs from pyproject.toml's version (the image tag)"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]), f"chart version {meta['version']!r}"


@pytest.mark.parametrize("name", ["default", "production"])
def test_helm_lint_is_clean(name: str) -> None:
    floor, _ = _kube_versions()
    report = helm.lint(CHART, VALUE_SETS[name](), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{floor}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert report["errors"] == [] and problems == [], f"helm lint ({name}): {report}"


# ---- schema validation ---------------------------------------------------------------

@pytest.mark.parametrize("kube", _kube_versions())
def test_manifests_validate_strictly(value_set: tuple[str, dict, list], kube: str) -> None:
    name, _, docs = value_set
    assert docs, f"{name}: nothing rendered"
    for doc in docs:
        where = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, kube, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{where} is invalid for Kubernetes {kube} at {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:  # e.g. a removed apiVersion
            pytest.fail(f"{where}: {err.message}")


def test_names_fit_kubernetes_limits(chart: helm.Chart) -> None:
    long_release = "r" * 53  # Helm's longest release name
    docs = documents(render(chart, _all_features(), release=long_release))
    for doc in docs:
        name = doc["metadata"]["name"]
        limit = 52 if doc["kind"] == "CronJob" else 63  # Jobs get an 11-character suffix
        assert len(name) <= limit, f"{doc['kind']} name {name!r} is longer than {limit}"
        for key, value in (doc["metadata"].get("labels") or {}).items():
            assert len(str(value)) <= 63, f"label {key}={value!r} is longer than 63"


# ---- pod security ----------------------------------------------------------------------

def test_every_pod_is_locked_down(value_set: tuple[str, dict, list]) -> None:
    name, _, docs = value_set
    pods = list(pod_templates(docs))
    assert len(pods) >= 2, f"{name}: expected the MLflow and CronJob pods, got {pods}"
    for where, template in pods:
        spec = template["spec"]
        pod_sc = spec.get("securityContext") or {}
        assert spec.get("automountServiceAccountToken") is False, \
            f"{where}: mounts a Kubernetes API token it does not need"
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host), f"{where}: {host}"
        assert not any("hostPath" in v for v in spec.get("volumes") or []), f"{where}: hostPath"
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            at = f"{where} container {c['name']}"

            def setting(key: str, sc: dict = sc) -> Any:
                return sc.get(key, pod_sc.get(key))

            assert setting("runAsNonRoot") is True, f"{at}: runAsNonRoot is not true"
            assert isinstance(setting("runAsUser"), int) and setting("runAsUser") > 0, \
                f"{at}: runAsUser {setting('runAsUser')!r} is not a non-root UID"
            assert sc.get("allowPrivilegeEscalation") is False, \
                f"{at}: allowPrivilegeEscalation is not false"
            assert sc.get("readOnlyRootFilesystem") is True, \
                f"{at}: readOnlyRootFilesystem is not true"
            assert not sc.get("privileged"), f"{at}: privileged"
            caps = sc.get("capabilities") or {}
            assert "ALL" in (caps.get("drop") or []), f"{at}: capabilities not dropped (ALL)"
            assert not caps.get("add"), f"{at}: adds capabilities {caps.get('add')}"
            assert (setting("seccompProfile") or {}).get("type") in ("RuntimeDefault",
                                                                     "Localhost"), \
                f"{at}: no seccompProfile RuntimeDefault"
            # a read-only root needs somewhere to write
            mounts = {m["mountPath"] for m in c.get("volumeMounts") or []}
            assert "/tmp" in mounts, f"{at}: no writable /tmp"


def test_every_container_has_resources(value_set: tuple[str, dict, list]) -> None:
    name, _, docs = value_set
    for where, template in pod_templates(docs):
        for c in containers(template["spec"]):
            res = c.get("resources") or {}
            for key in ("cpu", "memory"):
                assert key in (res.get("requests") or {}), \
                    f"{name}: {where}/{c['name']}: no {key} request"
            assert "memory" in (res.get("limits") or {}), \
                f"{name}: {where}/{c['name']}: no memory limit"


def test_chart_runs_the_image_user(default_docs: list[dict]) -> None:
    """runAsUser is the UID the image creates and switches to (USER in docker/Dockerfile)."""
    users = re.findall(r"^USER\s+(\d+)", (REPO / "docker" / "Dockerfile").read_text(), re.M)
    assert users, "docker/Dockerfile has no numeric USER"
    for where, template in pod_templates(default_docs):
        uid = template["spec"]["securityContext"]["runAsUser"]
        assert uid == int(users[-1]), f"{where}: runAsUser {uid} != image USER {users[-1]}"


# ---- credentials -------------------------------------------------------------------------

CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|BACKEND_STORE_URI)")


def test_credentials_only_through_secret_refs(value_set: tuple[str, dict, list]) -> None:
    name, _, docs = value_set
    assert not find(docs, "Secret"), f"{name}: the chart renders a Secret"
    seen = set()
    for where, template in pod_templates(docs):
        for c in containers(template["spec"]):
            assert not c.get("envFrom"), f"{where}/{c['name']}: envFrom imports a whole object"
            for var, entry in env_of(c).items():
                if CREDENTIAL_ENV.search(var) and not var.endswith("_PATH"):
                    seen.add(var)
                    assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), \
                        f"{name}: {where}/{c['name']}: {var} is not read from a Secret"
    if name == "default":
        assert {"MLFLOW_BACKEND_STORE_URI", "AWS_SECRET_ACCESS_KEY"} <= seen


def test_credentials_in_values_are_never_rendered(chart: helm.Chart) -> None:
    leaky = _merge(_all_features(), {
        "mlflow": {"backendStoreUri": f"postgresql://mlflow:{CANARY}@db:5432/mlflow",
                   "password": CANARY, "extraEnv": [{"name": "X", "value": CANARY}],
                   "s3": {"accessKeyId": CANARY, "secretAccessKey": CANARY}},
        "aws": {"accessKeyId": CANARY, "secretAccessKey": CANARY},
        "postgresql": {"auth": {"password": CANARY}},
        "secrets": {"AWS_SECRET_ACCESS_KEY": CANARY, "MLFLOW_BACKEND_STORE_URI": CANARY},
        "submit": {"token": CANARY, "kfpToken": {"token": CANARY}},
        "env": {"AWS_SECRET_ACCESS_KEY": CANARY},
    })
    for path, text in render(chart, leaky).items():
        assert CANARY not in text, f"{path} renders a credential from values"


# Names of things (a Secret's name, its keys, switches), not secret values.
CREDENTIAL_VALUE_NAME = re.compile(r"(password|secret|token|credential|accesskey|storeuri)", re.I)
ALLOWED_VALUE_PATHS = re.compile(
    r"^\.Values\.(imagePullSecrets|mlflow\.existingSecret|mlflow\.secretKeys\.\w+"
    r"|mlflow\.s3\.credentialsFromSecret|submit\.kfpToken\.(enabled|audience|expirationSeconds))$")


def test_templates_never_read_credentials_from_values() -> None:
    for template in sorted((CHART / "templates").iterdir()):
        for ref in re.findall(r"\.Values(?:\.\w+)+", template.read_text()):
            if CREDENTIAL_VALUE_NAME.search(ref.split(".", 2)[-1]):
                assert ALLOWED_VALUE_PATHS.match(ref), \
                    f"{template.name} reads {ref}: credentials come only from secretKeyRef"


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _leaves(value, (*path, str(i)))
    else:
        yield path, tree


@pytest.mark.parametrize("values_file", ["values.yaml", "values-production.yaml"])
def test_values_files_hold_no_credentials(values_file: str) -> None:
    text = (CHART / values_file).read_text()
    values = yaml.safe_load(text)
    for path, value in _leaves(values):
        where = f"{values_file}: {'.'.join(path)}"
        if isinstance(value, str):
            assert not re.search(r"AKIA[0-9A-Z]{16}", value), f"{where}: an AWS access key id"
            assert not re.search(r"://[^/\s:@]+:[^@\s]+@", value), f"{where}: user:password@"
        # a key named like a credential holds nothing, unless it names a Secret's key
        if re.search(r"(password|secretaccesskey|token$|apikey)", path[-1], re.I) \
                and "secretKeys" not in path:
            assert value in ("", None, False), f"{where} has a value"


# ---- MLflow server ------------------------------------------------------------------------

def _mlflow(docs: list[dict]) -> tuple[dict, dict]:
    deployment = one(docs, "Deployment")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "mlflow"]
    return deployment, container


def test_mlflow_server_command_and_configuration(chart: helm.Chart) -> None:
    values = {"mlflow": {"existingSecret": "team-mlflow",
                         "secretKeys": {"backendStoreUri": "db-uri"},
                         "s3": {"endpointUrl": "http://minio.minio:9000"},
                         "image": {"repository": "reg.example.com/dpsynth", "tag": "9.9.9-cpu"}}}
    docs = documents(render(chart, values))
    deployment, c = _mlflow(docs)
    assert c["image"] == "reg.example.com/dpsynth:9.9.9-cpu"
    line = command_line(c)
    assert line[:8] == ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000",
                        "--backend-store-uri", "$(MLFLOW_BACKEND_STORE_URI)"], line
    assert line[8:10] == ["--artifacts-destination", "$(MLFLOW_ARTIFACTS_DESTINATION)"], line
    env = env_of(c)
    for var, key in (("MLFLOW_BACKEND_STORE_URI", "db-uri"),
                     ("MLFLOW_ARTIFACTS_DESTINATION", "artifacts-destination"),
                     ("AWS_ACCESS_KEY_ID", "aws-access-key-id"),
                     ("AWS_SECRET_ACCESS_KEY", "aws-secret-access-key")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "team-mlflow", "key": key}, var
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.minio:9000"
    # in-cluster clients reach it by the Service's DNS names
    service = one(docs, "Service")
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    svc = service["metadata"]["name"]
    assert f"{svc}.{NAMESPACE}:5000" in hosts and f"{svc}:5000" in hosts, hosts
    assert "*" not in hosts
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
        assert c[probe]["httpGet"]["port"] in ("http", 5000), probe
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 5000}
    # the Service selects exactly these pods, on that port
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 5000)
    # /tmp is an emptyDir (the root filesystem is read-only)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


def test_mlflow_s3_endpoint_is_optional(default_docs: list[dict]) -> None:
    _, c = _mlflow(default_docs)
    assert "MLFLOW_S3_ENDPOINT_URL" not in env_of(c)  # AWS S3 by default


def test_sqlite_volume_for_a_single_server(chart: helm.Chart) -> None:
    docs = documents(render(chart, _sqlite_volume()))
    deployment, c = _mlflow(docs)
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "standard-rwo"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/mlflow")
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] \
        == claim["metadata"]["name"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one SQLite writer
    assert not find(documents(render(chart)), "PersistentVolumeClaim")
    with pytest.raises(helm.HelmError, match="one replica"):
        render(chart, _merge(_sqlite_volume(), {"mlflow": {"replicaCount": 2}}))


def test_image_has_the_driver_for_the_production_backend() -> None:
    """values-production.yaml documents a postgresql+psycopg2 backend store."""
    assert "postgresql+psycopg2://" in (CHART / "values-production.yaml").read_text()
    lock = (REPO / "requirements.lock").read_text()
    assert re.search(r"^(psycopg2|psycopg2-binary)==", lock, re.M), \
        "the dpsynth image cannot talk to PostgreSQL"


def test_missing_mlflow_secret_name_fails_clearly(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmError, match="mlflow.existingSecret"):
        render(chart, {"mlflow": {"existingSecret": ""}})


# ---- NetworkPolicy ---------------------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "extend the test for matchExpressions"
    return (selector.get("matchLabels") or {}).items() <= labels.items()


def test_networkpolicy_admits_only_the_configured_clients_to_mlflow(chart: helm.Chart) -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team-a"}},
              "podSelector": {"matchLabels": {"app": "trainer"}}}]
    docs = documents(render(chart, {"networkPolicy": {"from": peers,
                                                      "allowSameRelease": False}}))
    policy = one(docs, "NetworkPolicy")
    deployment, c = _mlflow(docs)
    mlflow_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"], "an empty podSelector selects every pod"
    assert _selects(policy["spec"]["podSelector"], mlflow_labels), \
        "the NetworkPolicy does not select the MLflow pods"
    for where, template in pod_templates(docs):
        if where.startswith("CronJob/"):
            assert not _selects(policy["spec"]["podSelector"], template["metadata"]["labels"]), \
                "the NetworkPolicy also selects the CronJob's pods"
    assert "Ingress" in policy["spec"]["policyTypes"]
    rules = policy["spec"]["ingress"]
    assert rules, "no ingress rule: nobody could reach MLflow"
    for rule in rules:
        assert rule.get("from"), "an ingress rule without `from` admits every source"
        for port in rule.get("ports") or []:
            assert port["port"] in ("http", 5000)
    assert [peer for rule in rules for peer in rule["from"]] == peers


def test_networkpolicy_default_admits_pipeline_pods_and_this_release(
        default_docs: list[dict]) -> None:
    policy = one(default_docs, "NetworkPolicy")
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    kfp_pod = {"pipelines.kubeflow.org/v2_component": "true"}
    assert any(_selects(p.get("podSelector", {}), kfp_pod) for p in peers)
    # the release's own pods, e.g. the CronJob, by the instance label
    for where, template in pod_templates(default_docs):
        assert any(_selects(p["podSelector"], template["metadata"]["labels"])
                   and "namespaceSelector" not in p for p in peers if "podSelector" in p), where


# ---- CronJob ----------------------------------------------------------------------------------

SUBMIT_VALUES = {"submit": {
    "kfpHost": "https://kfp.example.com/pipeline", "experiment": "nightly-eps5",
    "namespace": "team-a", "schedule": "15 1 * * *", "suspend": True,
    "successfulJobsHistoryLimit": 5, "failedJobsHistoryLimit": 7,
    "params": {"epsilon": 5, "num_samples": 1000000, "tag": "007", "grid": [1, 2]},
    "set": ["finetune.epsilon=5", "data.private={kind: cifar10, path: s3://b/c.tar.gz}"]}}


def _submit_container(docs: list[dict]) -> tuple[dict, dict]:
    cron = one(docs, "CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return cron, container


def test_cronjob_runs_dpsynth_submit_as_configured(chart: helm.Chart) -> None:
    docs = documents(render(chart, SUBMIT_VALUES))
    cron, c = _submit_container(docs)
    line = command_line(c)
    assert line[:2] == ["dpsynth", "submit"], line
    flags = {line[i]: line[i + 1] for i in range(2, len(line) - 1) if line[i].startswith("--")}
    assert flags["--host"] == "https://kfp.example.com/pipeline"
    assert flags["--experiment"] == "nightly-eps5"
    assert flags["--namespace"] == "team-a"
    assert flags["--package"] == "/pipelines/dpsynth.yaml"
    params = [line[i + 1] for i in range(len(line) - 1) if line[i] == "--param"]
    # sorted by key; integers stay integers (Helm holds them as float64), lists are JSON
    assert params == ["epsilon=5", "grid=[1,2]", "num_samples=1000000", "tag=007"]
    sets = [line[i + 1] for i in range(len(line) - 1) if line[i] == "--set"]
    assert sets == SUBMIT_VALUES["submit"]["set"]  # in order, each one argument
    spec = cron["spec"]
    assert spec["schedule"] == "15 1 * * *" and spec["suspend"] is True
    assert spec["concurrencyPolicy"] == "Forbid"
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (5, 7)
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # the package is the ConfigMap's key, mounted read-only at /pipelines
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/pipelines")
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "dpsynth-pipeline"
    assert volume["configMap"]["items"] == [{"key": "dpsynth.yaml", "path": "dpsynth.yaml"}]


def test_cronjob_arguments_parse_with_the_dpsynth_cli(chart: helm.Chart) -> None:
    from dpsynth import cli

    parser = cli.build_parser()
    _, c = _submit_container(documents(render(chart, SUBMIT_VALUES)))
    args = parser.parse_args(command_line(c)[1:])  # argparse exits (fails) on unknown flags
    assert args.host == "https://kfp.example.com/pipeline"
    assert args.experiment == "nightly-eps5"
    assert str(args.package) == "/pipelines/dpsynth.yaml"


def test_cronjob_history_and_concurrency_defaults(default_docs: list[dict]) -> None:
    cron, c = _submit_container(default_docs)
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["suspend"] is False
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    assert spec["jobTemplate"]["spec"]["backoffLimit"] <= 2  # each run spends privacy budget
    # the KFP token: audience-bound, where `dpsynth submit` looks for it
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    token = next(v for v in pod["volumes"] if "projected" in v)
    (source,) = token["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    mount = next(m for m in c["volumeMounts"] if m["name"] == token["name"])
    path = env_of(c)["KF_PIPELINES_SA_TOKEN_PATH"]["value"]
    assert path == f"{mount['mountPath']}/{source['serviceAccountToken']['path']}"


def test_pipeline_configmap_from_set_file(chart: helm.Chart) -> None:
    docs = documents(render(chart, {"submit": {"pipeline": {"spec": PIPELINE_SPEC}}}))
    configmap = one(docs, "ConfigMap")
    assert yaml.safe_load(configmap["data"]["dpsynth.yaml"]) == yaml.safe_load(PIPELINE_SPEC)
    cron, _ = _submit_container(docs)
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    with pytest.raises(helm.HelmError, match="submit.pipeline"):
        render(chart, {"submit": {"pipeline": {"existingConfigMap": "", "spec": ""}}})


# ---- RBAC ------------------------------------------------------------------------------------

def test_rbac_is_least_privilege_and_bound_to_the_cronjob(
        value_set: tuple[str, dict, list]) -> None:
    name, _, docs = value_set
    role, binding = (one(component(docs, "submit"), kind) for kind in ("Role", "RoleBinding"))
    account = one(docs, "ServiceAccount")
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"{name}: wildcard in Role {key}: {rule}"
        assert rule["apiGroups"] == ["pipelines.kubeflow.org"], \
            f"{name}: the Role reaches beyond the KFP API: {rule}"
        assert not {"delete", "deletecollection", "update", "patch", "escalate", "bind",
                    "impersonate"} & set(rule["verbs"]), f"{name}: {rule}"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount",
                                    "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert account["automountServiceAccountToken"] is False
    cron, _ = _submit_container(docs)
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


TRAINING_RULES = [
    {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
     "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"],
     "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]


def test_training_rbac_lets_the_pipeline_run_jobs_and_nothing_more(chart: helm.Chart) -> None:
    """The pipeline's pods (the KFP runner's ServiceAccount) may create, watch and delete
    the training operators' jobs and read their pods' logs: no Secrets, no other
    workloads, nothing cluster-wide; one operator's rules alone when one is chosen."""
    docs = component(documents(render(chart)), "training")
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["rules"] == TRAINING_RULES
    assert role["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner",
                                    "namespace": NAMESPACE}]
    only = component(documents(render(chart, {"training": {"rbac": {
        "operators": ["pytorchjob"], "runnerServiceAccount": "default-editor"}}})), "training")
    assert one(only, "Role")["rules"] == TRAINING_RULES[1:]
    assert one(only, "RoleBinding")["subjects"][0]["name"] == "default-editor"
    assert not component(documents(render(chart, {"training": {"rbac": {"create": False}}})),
                         "training")
    with pytest.raises(Exception, match="training.rbac.operators: \"mpijob\" is not"):
        render(chart, {"training": {"rbac": {"operators": ["mpijob"]}}})


# ---- production example and notes ----------------------------------------------------------

def test_production_values(chart: helm.Chart) -> None:
    values = _production()
    docs = documents(render(chart, values))
    deployment, c = _mlflow(docs)
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] >= 2
    assert pod["nodeSelector"] == values["mlflow"]["nodeSelector"]
    assert pod["tolerations"] == values["mlflow"]["tolerations"]
    assert c["resources"] == values["mlflow"]["resources"]
    assert c["image"] == f"{values['image']['repository']}:{values['image']['tag']}"
    budget = one(docs, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(budget["spec"]["selector"], pod_labels)
    hosts = env_of(c)["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert set(values["mlflow"]["allowedHosts"]) <= set(hosts)
    assert env_of(c)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] \
        == values["mlflow"]["existingSecret"]


def test_notes_tell_how_to_finish_the_install(chart: helm.Chart) -> None:
    notes = next(text for path, text in render(chart).items() if path.endswith("NOTES.txt"))
    assert f"kubectl -n {NAMESPACE} create secret generic dpsynth-mlflow" in notes
    assert "port-forward svc/team-dpsynth-mlflow" in notes
    assert "create configmap dpsynth-pipeline" in notes
