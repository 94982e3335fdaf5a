"""Create a distributed training job on the cluster's training operator and wait
for it: the Kubeflow task that launches it succeeds when the job does, and fails
with the job's own reason when it fails.

A retried task finds its job by name (`jobs.job_name`): one still running is
attached to (never a second DP run beside it), one that succeeded is done, one
that failed is deleted and created again, and resumes from the work folder's
checkpoints (the job holds no state of its own).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from dpsynth.cluster import jobs
from dpsynth.errors import DpsynthError

log = logging.getLogger(__name__)

# kind -> (group, version, plural), the rank-0 pod's label selector, terminal conditions
KINDS: dict[str, dict[str, Any]] = {
    "TrainJob": {"api": jobs.TRAINJOB_API, "done": "Complete", "failed": "Failed",
                 # JobSet names its pods' job after the TrainJob; node 0 is rank 0
                 "rank0": "jobset.sigs.k8s.io/jobset-name={name},"
                          "batch.kubernetes.io/job-completion-index=0"},
    "PyTorchJob": {"api": jobs.PYTORCHJOB_API, "done": "Succeeded", "failed": "Failed",
                   "rank0": "training.kubeflow.org/job-name={name},"
                            "training.kubeflow.org/replica-type=master"},
}


class JobFailed(DpsynthError):
    """The training job failed; the message holds its reason and message."""


@dataclass(frozen=True)
class JobOutcome:
    name: str
    kind: str
    attached: bool  # found running (a retried task), not created
    seconds: float
    log_tail: str  # the end of rank 0's log


def api_client() -> k8s.ApiClient:
    """In a pod: its ServiceAccount's in-cluster configuration; else the kubeconfig."""
    from kubernetes import config as k8s_config

    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.ApiClient()


def _condition(status: dict[str, Any], kind: str) -> tuple[str, str, str]:
    """("done" | "failed" | "running", reason, message) from the job's conditions."""
    spec = KINDS[kind]
    for c in status.get("conditions") or []:
        if str(c.get("status")) != "True":
            continue
        if c.get("type") == spec["failed"]:
            return "failed", c.get("reason", ""), c.get("message", "")
        if c.get("type") == spec["done"]:
            return "done", c.get("reason", ""), c.get("message", "")
    conditions = [c.get("type") for c in status.get("conditions") or []
                  if str(c.get("status")) == "True"]
    return "running", ",".join(conditions) or "Pending", ""


def launch_and_wait(manifest: dict[str, Any], *, api: k8s.ApiClient | None = None,
                    poll_s: float = 30.0, timeout_s: float | None = None,
                    echo: Callable[[str], None] = print) -> JobOutcome:
    """Create `manifest` (a TrainJob or PyTorchJob) and wait until it ends.

    Args:
        manifest: from `jobs.manifest`.
        api: the Kubernetes API client (default `api_client()`).
        poll_s: seconds between status reads.
        timeout_s: give up after this long (None: wait as long as it runs; the
            task's own timeout then applies).
        echo: where status changes and rank 0's log go (the task's log).

    Raises:
        JobFailed: the job failed (its reason), was deleted under us, or timed out.
    """
    kind, meta = manifest["kind"], manifest["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    group, version, plural = KINDS[kind]["api"]
    custom = k8s.CustomObjectsApi(api or api_client())
    core = k8s.CoreV1Api(custom.api_client)
    where = f"{kind} {namespace}/{name}"

    def read() -> dict[str, Any] | None:
        try:
            return custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    attached = False
    existing = read()
    if existing is not None:
        state, reason, message = _condition(existing.get("status") or {}, kind)
        if state == "done":
            echo(f"{where} already succeeded ({reason}): nothing to run")
            return JobOutcome(name, kind, True, 0.0, "")
        if state == "failed":  # a retry: start the job again; it resumes from the work folder
            echo(f"{where} failed before ({reason}: {message}); deleting it to run again")
            custom.delete_namespaced_custom_object(group, version, namespace, plural, name,
                                                   body=k8s.V1DeleteOptions(
                                                       propagation_policy="Foreground"))
            while read() is not None:
                time.sleep(min(poll_s, 2.0))
            existing = None
        else:
            attached = True
            echo(f"{where} is already running ({reason}): waiting for it (a retried task "
                 "does not start a second run)")
    if existing is None:
        custom.create_namespaced_custom_object(group, version, namespace, plural, manifest)
        echo(f"created {where}")

    start, last = time.monotonic(), None
    while True:
        job = read()
        if job is None:
            raise JobFailed(f"{where} was deleted while the task waited for it")
        state, reason, message = _condition(job.get("status") or {}, kind)
        if (state, reason) != last:
            echo(f"{where}: {state} ({reason}){': ' + message if message else ''}")
            last = (state, reason)
        if state != "running":
            break
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise JobFailed(f"{where} did not finish within {timeout_s:g} s; it keeps running "
                            f"(delete it with kubectl -n {namespace} delete {plural} {name})")
        time.sleep(poll_s)
    tail = rank0_log(core, namespace, KINDS[kind]["rank0"].format(name=name))
    if tail:
        echo(f"--- rank 0's log ({where}), last lines ---\n{tail}")
    if state == "failed":
        raise JobFailed(f"{where} failed: {reason}: {message or 'no message'} (rank 0's log is "
                        "in this task's log; `kubectl logs` has the others')")
    return JobOutcome(name, kind, attached, time.monotonic() - start, tail)


def rank0_log(core: k8s.CoreV1Api, namespace: str, selector: str, lines: int = 200) -> str:
    """The last `lines` of the log of the pod `selector` picks (rank 0), or "" when it
    is gone (a log is a convenience, never a reason to fail the task)."""
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        if not pods:
            return ""
        return core.read_namespaced_pod_log(pods[0].metadata.name, namespace,
                                            tail_lines=lines) or ""
    except ApiException as err:
        log.warning("could not read rank 0's log (%s): %s", selector, err.reason)
        return ""
