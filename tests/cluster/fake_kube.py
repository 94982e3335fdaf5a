"""A fake Kubernetes API server on 127.0.0.1 for the job launcher's tests: the
custom-object endpoints of TrainJobs and PyTorchJobs (create, read, delete), pod
lists by label and pod logs -- what `dpsynth.cluster.launcher` calls, through the
real `kubernetes` client.

A created job goes through scripted conditions, one per status read
(`script`), or, with `execute`, is run: its container command in a subprocess on
this machine, as one node with the operator's torchrun variables (PET_*), Running
while it runs and Succeeded / Failed by its exit code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

DONE = {"trainjobs": "Complete", "pytorchjobs": "Succeeded"}


@dataclass
class Job:
    manifest: dict[str, Any]
    plural: str
    conditions: list[dict[str, Any]] = field(default_factory=list)
    script: list[tuple[str, str, str]] = field(default_factory=list)
    log: str = ""
    process: subprocess.Popen | None = None


class FakeKube:
    """The server's state; `requests` records (method, path) of every call."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.requests: list[tuple[str, str]] = []
        self.script: list[tuple[str, str, str]] = [("Created", "", ""), ("Running", "", "")]
        self.final: tuple[str, str, str] | None = None  # None: the kind's success
        self.execute: dict[str, str] | None = None  # env for running jobs, or None
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeKube":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        for job in self.jobs.values():
            if job.process and job.process.poll() is None:
                job.process.kill()

    def posts(self) -> int:
        return sum(1 for m, p in self.requests if m == "POST")

    def fail(self, name: str, reason: str, message: str) -> None:
        """Mark job `name` failed now (as a crashed pod would)."""
        with self.lock:
            self.jobs[name].conditions = [{"type": "Failed", "status": "True",
                                           "reason": reason, "message": message}]

    # ------------------------------------------------------------------ jobs

    def _create(self, plural: str, manifest: dict[str, Any]) -> Job:
        job = Job(manifest, plural, script=list(self.script))
        final = self.final or (DONE[plural], "JobSucceeded", "done")
        if self.execute is None:
            job.script.append(final)
        else:
            job.script = [("Running", "", "")]
            job.process = self._start(manifest)
        return job

    def _start(self, manifest: dict[str, Any]) -> subprocess.Popen:
        if manifest["kind"] == "TrainJob":
            c = manifest["spec"]["trainer"]
            command, env_list = c["command"], c.get("env", [])
            nproc = c["numProcPerNode"]
        else:
            c = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
                "containers"][0]
            command, env_list, nproc = c["command"], c.get("env", []), 1
        env = dict(os.environ, **self.execute,
                   **{e["name"]: e["value"] for e in env_list if "value" in e},
                   PET_NNODES="1", PET_NPROC_PER_NODE=str(nproc), PET_NODE_RANK="0",
                   PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=self.execute.get(
                       "PORT", "29513"))
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def _status(self, job: Job) -> dict[str, Any]:
        if job.conditions and job.conditions[-1]["type"] in ("Failed", DONE[job.plural]):
            return {"conditions": job.conditions}
        if job.process is not None:
            rc = job.process.poll()
            if rc is None:
                kind = "Running"
            else:
                job.log = job.process.stdout.read() if job.process.stdout else ""
                kind = DONE[job.plural] if rc == 0 else "Failed"
            job.conditions = [{"type": kind, "status": "True",
                               "reason": "PodFailed" if kind == "Failed" else kind,
                               "message": f"exit code {rc}" if kind == "Failed" else ""}]
        elif job.script:
            kind, reason, message = job.script.pop(0)
            job.conditions = [{"type": kind, "status": "True", "reason": reason or kind,
                               "message": message}]
        return {"conditions": job.conditions}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                fake.requests.append((method, url.path))
                m = re.fullmatch(r"/apis/[^/]+/[^/]+/namespaces/([^/]+)/(trainjobs|pytorchjobs)"
                                 r"(?:/([^/]+))?", url.path)
                with fake.lock:
                    if m:
                        return self._jobs(method, m.group(2), m.group(3))
                    m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)/log)?",
                                     url.path)
                    if m and method == "GET":
                        return self._pods(m.group(2), parse_qs(url.query))
                self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

            def _jobs(self, method: str, plural: str, name: str | None) -> None:
                if method == "POST":
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    name = body["metadata"]["name"]
                    if name in fake.jobs:
                        return self._send(409, {"kind": "Status", "code": 409,
                                                "reason": "AlreadyExists"})
                    fake.jobs[name] = fake._create(plural, body)
                    return self._send(201, body)
                job = fake.jobs.get(name or "")
                if job is None:
                    return self._send(404, {"kind": "Status", "code": 404,
                                            "reason": "NotFound"})
                if method == "DELETE":
                    del fake.jobs[name]
                    return self._send(200, {"kind": "Status", "status": "Success"})
                return self._send(200, job.manifest | {"status": fake._status(job)})

            def _pods(self, pod: str | None, query: dict[str, list[str]]) -> None:
                if pod is not None:  # a log: plain text
                    job = fake.jobs.get(pod.rsplit("-rank0", 1)[0])
                    data = (job.log if job else "").encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                selector = query.get("labelSelector", [""])[0]
                names = [n for n in fake.jobs if f"={n}," in selector + ","]
                self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                 "items": [{"metadata": {"name": f"{n}-rank0"}}
                                           for n in names]})

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        return Handler
