"""Submit the compiled Kubeflow pipeline (`make pipeline` -> pipelines/dpsynth.yaml) to a
KFP API server as a one-off run or a recurring (cron) run. Everything the user gives is
checked here, before the first request, so a typo never reaches the cluster."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence
from urllib.parse import urlsplit

import yaml

from dpsynth.config import yaml_load
from dpsynth.errors import DpsynthError, InputError

if TYPE_CHECKING:
    from kfp.client.token_credentials_base import TokenCredentialsBase

DEFAULT_PACKAGE = Path("pipelines/dpsynth.yaml")
DEFAULT_EXPERIMENT = "dpsynth"
# kfp's own names: the token file a pod gets (audience-bound service-account token) and
# the variable that points elsewhere; see kfp.client.set_volume_credentials.
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("/var/run/secrets/kubeflow/pipelines/token")
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"  # as in kfp.Client: UI links go there if set


class SubmitError(DpsynthError):
    """The KFP API could not be reached or refused the request (exit code 1)."""


@dataclass(frozen=True)
class PipelinePackage:
    """What submit needs from a compiled pipeline: its name and root parameters.

    `parameters` maps each root input parameter to its `inputDefinitions` entry
    (`parameterType`, and `defaultValue`/`isOptional` when it has a default).
    """

    path: Path
    name: str
    parameters: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class SubmitResult:
    """What was created on the server."""

    kind: Literal["run", "recurring_run"]
    id: str                      # run_id or recurring_run_id
    name: str                    # display name in the UI
    experiment: str
    experiment_id: str
    url: str                     # the run's / recurring run's page in the KFP UI
    params: Mapping[str, Any]    # the pipeline arguments as sent (typed)
    schedule: str | None = None  # 6-field cron (with seconds) of a recurring run


def check_host(host: str) -> str:
    """Check that `host` is the http(s) URL of the KFP API and return it without a trailing /.

    A path is allowed (e.g. `https://kubeflow.example.com/pipeline` behind a gateway).

    Raises:
        InputError: not an http(s) URL with a host name, or it carries credentials.
    """
    parts = urlsplit(host.strip())
    if parts.username or parts.password:
        # never echo it: the URL holds a secret
        raise InputError("--host must not contain credentials (user:password@); put a "
                         f"token file in ${TOKEN_PATH_ENV} instead")
    try:
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise InputError(f"--host {host!r}: bad port number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--host {host!r}: expected an http(s) URL of the KFP API, "
                         "e.g. http://localhost:8080 (after kubectl port-forward "
                         "svc/ml-pipeline-ui 8080:80)")
    if parts.query or parts.fragment:
        raise InputError(f"--host {host!r}: expected a base URL without ?query or #fragment")
    return host.strip().rstrip("/")


# Fields of KFP's cron (robfig/cron, seconds first): name, lowest, highest, names allowed.
_CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23),
                ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 6))
_CRON_NAMES = {
    "month": {m: i for i, m in enumerate(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL",
                                          "AUG", "SEP", "OCT", "NOV", "DEC"], start=1)},
    "day-of-week": {d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI",
                                                "SAT"])},
}
_CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                     "@hourly")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # an RFC 1123 label
_CRON_PART = re.compile(r"^(?:(?P<any>[*?])|(?P<lo>\w+)(?:-(?P<hi>\w+))?)(?:/(?P<step>\d+))?$")


def normalize_cron(expr: str) -> str:
    """Return `expr` as the 6-field cron (seconds first) that KFP's scheduler expects.

    KFP parses cron with a leading seconds field (robfig/cron): `0 0 3 * * *` is 03:00
    every day. A standard 5-field expression (`0 3 * * *`) gets `0 ` prepended; passed
    through unchanged, KFP would read it as "second 0, minute 3, every hour". The
    descriptors `@daily`, `@hourly`, ... pass through. Times are in the KFP scheduler's
    time zone (UTC unless the deployment sets CRON_SCHEDULE_TIMEZONE).

    >>> normalize_cron("0 3 * * *")
    '0 0 3 * * *'
    >>> normalize_cron("0 */30 9-17 * * MON-FRI")
    '0 */30 9-17 * * MON-FRI'

    Raises:
        InputError: not 5 or 6 fields, or a field out of range.
    """
    fields = expr.split()
    if len(fields) == 1 and fields[0].lower() in _CRON_DESCRIPTORS:
        return fields[0].lower()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise InputError(f"--schedule {expr!r}: expected a cron expression with 5 fields "
                         "(minute hour day-of-month month day-of-week, e.g. '0 3 * * *') "
                         "or 6 with seconds first (e.g. '0 0 3 * * *')")
    for field, (name, lowest, highest) in zip(fields, _CRON_FIELDS):
        for part in field.split(","):
            _check_cron_part(expr, part, name, lowest, highest)
    return " ".join(fields)


def _check_cron_part(expr: str, part: str, name: str, lowest: int, highest: int) -> None:
    bad = f"--schedule {expr!r}: bad {name} field {part!r} (allowed {lowest}-{highest}"
    bad += ", names)" if name in _CRON_NAMES else ")"
    match = _CRON_PART.match(part)
    if match is None:
        raise InputError(bad)
    if match["any"] == "?" and name not in ("day-of-month", "day-of-week"):
        raise InputError(bad + ": '?' only in day-of-month or day-of-week")
    if match["step"] is not None and int(match["step"]) == 0:
        raise InputError(bad + ": step must be > 0")
    values = []
    for token in (match["lo"], match["hi"]):
        if token is None:
            continue
        value = _CRON_NAMES.get(name, {}).get(token.upper()) if not token.isdigit() else int(token)
        if value is None or not lowest <= value <= highest:
            raise InputError(bad)
        values.append(value)
    if len(values) == 2 and values[0] > values[1]:
        raise InputError(bad + ": range start after its end")


def base_config_text(path: str | Path) -> str:
    """The config file `path`, resolved (every field explicit), as one line of YAML: the
    pipeline's `base_config` (the compiled default is params.yaml's).

    One line because the KFP compiler copies defaults into the comment header of
    the compiled file unescaped: a multi-line default would turn its lines into
    YAML keys there. Resolved because the pipeline's pods have no repository to
    read a config's own base file from.

    Raises:
        ConfigError: the file is missing or invalid (the message names it).
    """
    from dpsynth import config

    resolved = config.load(path).to_dict()
    return yaml.safe_dump(resolved, default_flow_style=True, sort_keys=False,
                          width=float("inf")).strip()


def parse_param_args(items: Sequence[str]) -> dict[str, str]:
    """Split `--param KEY=VALUE` arguments into {KEY: VALUE} (values still text).

    Raises:
        InputError: an item without `=`, an empty key, or a key given twice.
    """
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--param {item!r}: expected KEY=VALUE, e.g. --param epsilon=5")
        if key in params:
            raise InputError(f"--param {key} given twice ({params[key]!r} and {value!r})")
        params[key] = value
    return params


def read_package(path: Path) -> PipelinePackage:
    """Read a compiled pipeline YAML and its root input parameters.

    Raises:
        InputError: the file is missing (run `make pipeline`), is not YAML, or is not a
            KFP pipeline spec.
    """
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    if not path.is_file():
        raise InputError(f"pipeline package {path} not found: run `make pipeline` to compile "
                         "it (or pass --package PATH)")
    if path.suffix not in (".yaml", ".yml"):
        raise InputError(f"pipeline package {path}: expected a compiled pipeline .yaml "
                         "(what `make pipeline` writes)")
    try:
        # first document: the PipelineSpec; a second one (kfp-kubernetes) is the PlatformSpec
        docs = list(yaml.safe_load_all(path.read_text()))
        spec = docs[0] if docs else None
        json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    except (yaml.YAMLError, json_format.ParseError, AttributeError, TypeError) as err:
        raise InputError(f"pipeline package {path} is not a compiled KFP pipeline: "
                         f"{str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise InputError(f"pipeline package {path} is not a compiled KFP pipeline "
                         "(no pipelineInfo/root): run `make pipeline`")
    parameters = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    return PipelinePackage(path=path, name=spec["pipelineInfo"]["name"], parameters=parameters)


def check_params(package: PipelinePackage, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check `params` against the package's root parameters and convert them to their types.

    A text value for a non-STRING parameter is parsed as YAML (`5` -> 5, `0.5` -> 0.5,
    `true` -> True, `[1, 2]` -> a list); a STRING parameter keeps the text as given
    (`--param tag=007` stays "007"). NUMBER_DOUBLE accepts integers (as floats).

    Returns:
        The pipeline arguments to send, typed as the pipeline declares them.

    Raises:
        InputError: an unknown name (the message lists the known ones), a value of the
            wrong type, or a required parameter (no default) left out.
    """
    known = package.parameters
    unknown = sorted(set(params) - set(known))
    if unknown:
        listing = ", ".join(f"{k} ({v.get('parameterType', '?')})"
                            for k, v in sorted(known.items()))
        raise InputError(f"unknown pipeline parameter(s) {unknown} for {package.path}; "
                         f"known: {listing or 'none'}")
    missing = sorted(k for k, v in known.items()
                     if k not in params and not v.get("isOptional") and "defaultValue" not in v)
    if missing:
        raise InputError(f"pipeline {package.name} needs parameter(s) {missing}: "
                         f"give --param {missing[0]}=VALUE")
    return {k: _typed(k, v, known[k].get("parameterType", "STRING")) for k, v in params.items()}


def _typed(name: str, value: Any, parameter_type: str) -> Any:
    text = value
    if isinstance(value, str) and parameter_type != "STRING":
        try:
            value = yaml_load(value)  # as --set reads values: 1e-5 is a float
        except yaml.YAMLError:
            raise InputError(f"--param {name}={text!r}: not a YAML value") from None
    expected = {"STRING": (str,), "NUMBER_INTEGER": (int,), "NUMBER_DOUBLE": (int, float),
                "BOOLEAN": (bool,), "LIST": (list,), "STRUCT": (dict,)}.get(parameter_type)
    if expected is None:
        return value  # a type this code does not know: pass through, KFP checks it
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        raise InputError(f"--param {name}={text!r}: the pipeline declares {name} as "
                         f"{parameter_type}, got {type(value).__name__}")
    return float(value) if parameter_type == "NUMBER_DOUBLE" else value


def with_overrides(package: PipelinePackage, arguments: Mapping[str, Any],
                   sets: Sequence[str]) -> dict[str, Any]:
    """Append `--set KEY=VALUE` settings to the pipeline's `overrides` argument, after
    any it already has, and check the result against the run's base config.

    The check is the one the pipeline's first task makes (`config.load` of
    `base_config` with the overrides), made here so that a misspelt field or a bad
    value fails on the user's machine, before anything is sent.

    Raises:
        InputError: the package has no `overrides` parameter, or a setting is bad (the
            message names it, and the fix).
    """
    if not sets:
        return dict(arguments)
    if "overrides" not in package.parameters:
        raise InputError(f"--set needs a pipeline with an `overrides` parameter; "
                         f"{package.path} has {sorted(package.parameters) or 'none'}")
    given = arguments.get("overrides")
    if given is None:
        given = package.parameters["overrides"].get("defaultValue") or []
    out = dict(arguments) | {"overrides": [*given, *sets]}
    base = out.get("base_config", package.parameters.get("base_config", {}).get("defaultValue"))
    if isinstance(base, str):
        import tempfile

        from dpsynth import config

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "base_config.yaml"
            path.write_text(base)
            try:
                config.load(path, out["overrides"])
            except InputError as err:
                raise InputError(f"--set: {err}") from None
    return out


def _token_credentials() -> TokenCredentialsBase | None:
    """kfp credentials reading the token file named by $KF_PIPELINES_SA_TOKEN_PATH (or
    the in-pod default path), re-read before each request; None when there is none.

    kfp.Client only looks for this file when it has no host; dpsynth always passes a host,
    so it wires the file in itself. The token is never an argument and never printed.
    """
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    named = os.environ.get(TOKEN_PATH_ENV)
    if named:
        if not Path(named).is_file():
            raise InputError(f"${TOKEN_PATH_ENV}={named}: no such token file")
        return ServiceAccountTokenVolumeCredentials(named)
    if DEFAULT_TOKEN_PATH.is_file():
        return ServiceAccountTokenVolumeCredentials(str(DEFAULT_TOKEN_PATH))
    return None  # port-forward or an open endpoint; kfp's other env mechanisms still apply


@contextlib.contextmanager
def _api_errors(host: str) -> Iterator[None]:
    """Turn the KFP client's transport and API errors into a SubmitError naming the host."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as err:
        raise SubmitError(f"KFP API at {host} answered {err.status} {err.reason}: "
                          f"{(err.body or '').strip()[:500]}") from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as err:
        raise SubmitError(f"cannot reach the KFP API at {host}: {err}") from None
    except ValueError as err:  # e.g. two experiments with the same name
        raise SubmitError(f"KFP API at {host}: {err}") from None


def submit(package: Path, *, host: str, experiment: str, params: Mapping[str, Any],
           schedule: str | None, run_name: str | None, namespace: str | None,
           sets: Sequence[str] = ()) -> SubmitResult:
    """Create a run (or, with `schedule`, a recurring run) of a compiled pipeline package.

    All inputs are checked before the first request. The experiment is looked up by name
    and created if missing. A recurring run starts enabled, runs one at a time and does
    not catch up on missed times: each dpsynth run spends privacy budget on its ledger,
    so a paused schedule must not fire a burst of backfills.

    Args:
        package: compiled pipeline YAML (`make pipeline` writes pipelines/dpsynth.yaml).
        host: base http(s) URL of the KFP API.
        experiment: KFP experiment name.
        params: pipeline arguments by root parameter name; text values are converted to
            the declared types (see `check_params`).
        schedule: cron expression, 5 fields or 6 with seconds; None for a one-off run.
        run_name: display name; defaults to the pipeline name and the UTC time (or the
            schedule, for a recurring run).
        namespace: Kubernetes namespace of a multi-user deployment, else None.
        sets: `KEY=VALUE` config settings (`dpsynth submit --set`), appended to the
            pipeline's `overrides` argument and checked against its base config.

    Returns:
        The created run or recurring run, with its UI link.

    Raises:
        InputError: a bad host, schedule, package, parameter or token path (nothing sent).
        SubmitError: the server could not be reached or refused the request.
    """
    host = check_host(host)
    cron = normalize_cron(schedule) if schedule is not None else None
    pipeline = read_package(package)
    arguments = with_overrides(pipeline, check_params(pipeline, params), sets)
    if not experiment.strip():
        raise InputError("--experiment must not be empty")
    if namespace is not None and not _NAMESPACE.match(namespace):
        raise InputError(f"--namespace {namespace!r}: expected a Kubernetes namespace "
                         "(lowercase letters, digits and '-', at most 63)")
    credentials = _token_credentials()
    if run_name is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        run_name = f"{pipeline.name} {cron}" if cron else f"{pipeline.name} {stamp}"
    ui = (os.environ.get(UI_ENDPOINT_ENV) or host).rstrip("/")

    import kfp

    # kfp prints its own "... details: <link>" lines and warns about server versions; the
    # caller gets the link in the result instead.
    with _api_errors(host), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client = kfp.Client(host=host, namespace=namespace or "kubeflow",
                            credentials=credentials)
        found = client.create_experiment(name=experiment, namespace=namespace)  # get or create
        if cron is None:
            run = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name,
                experiment_id=found.experiment_id)
            return SubmitResult(kind="run", id=run.run_id, name=run_name,
                                experiment=experiment, experiment_id=found.experiment_id,
                                url=f"{ui}/#/runs/details/{run.run_id}", params=arguments)
        recurring = client.create_recurring_run(
            experiment_id=found.experiment_id, job_name=run_name, cron_expression=cron,
            params=arguments, pipeline_package_path=str(package), max_concurrency=1,
            no_catchup=True, enabled=True)
    rid = recurring.recurring_run_id
    return SubmitResult(kind="recurring_run", id=rid, name=run_name, experiment=experiment,
                        experiment_id=found.experiment_id,
                        url=f"{ui}/#/recurringrun/details/{rid}", params=arguments,
                        schedule=cron)
