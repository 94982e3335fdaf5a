"""Kill harness (issue 7, "Faults"): `dpsynth pretrain`, `finetune` and `sample` run
as real processes through the CLI and are SIGKILLed several times at seeded-random
points -- between steps, in the middle of checkpoint, ledger and shard writes, and
while publishing -- then resumed, until they finish.

After every kill: `load_latest` reads a complete checkpoint or none (never a corrupt
one), durable progress never goes backwards, no half-written output is visible, the
privacy ledger is readable, holds the one resumed run and already charges its whole
plan. At the end: the same weights, privacy.json, ε and step counts as an
uninterrupted run, one completed ledger entry, every sample shard exactly once with
verified hashes, and no temporary folder left behind. Last, a reader racing an S3
re-publish gets one whole version or an error, never a mix.

How a kill lands where it should: each attempt is a child forked from a "zygote"
process that has imported dpsynth once (the imports take ~5 s, the stages under
one) and runs `dpsynth.cli.main`. The child wraps a few functions *in itself*
(`EMA.update`, `checkpoint.save_file`, `os.replace`, `os.unlink`, the sampler) so
that at the chosen point it writes a marker file and waits; the test then SIGKILLs
it. Nothing in `src/` knows about this. `DPSYNTH_KILL_SEED=<n>` draws other points.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpsynth.config import Config
from dpsynth.diffusion.unet import EMA_WEIGHTS, WEIGHTS
from dpsynth.errors import InputError
from dpsynth.io import cache, published, s3 as s3_io, work as work_io
from dpsynth.io.shards import MANIFEST, read_dataset, read_manifest, sha256_file, shard_name
from dpsynth.privacy.ledger import PrivacyLedger, dataset_key
from dpsynth.stages import finetune
from dpsynth.stages.common import work_dir_for
from dpsynth.tracking import NullTracker
from dpsynth.training.checkpoint import LATEST, TrainState, load_latest

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Seeds 0-39 all pass; 20 kills pretrain while a checkpoint is renamed into place,
# while an old one is deleted, and while publishing (see the -rP output).
SEED = int(os.environ.get("DPSYNTH_KILL_SEED", "20"))
KILLS = 3  # per stage; a fourth attempt runs to the end
CKPT_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors")  # save_checkpoint's
ATTEMPT_TIMEOUT = 180  # s; an attempt takes a few seconds even on a busy machine

# --------------------------------------------------------------------------- the child side

ZYGOTE = r'''
import fnmatch, json, os, sys, time, traceback
from pathlib import Path

import torch

from dpsynth import cli
from dpsynth.diffusion.ema import EMA
from dpsynth.stages import finetune, pretrain, sample as sample_stage  # imported once, here
from dpsynth.training import checkpoint

HANG_SECONDS = 300  # the parent kills long before; bounded in case the parent died


def json_has(obj, expect):
    """Whether `obj` or a dict nested in it holds all of `expect`'s items."""
    if isinstance(obj, dict):
        if all(obj.get(k) == v for k, v in expect.items()):
            return True
        obj = list(obj.values())
    return isinstance(obj, list) and any(json_has(o, expect) for o in obj)


def install(fault, attempt_dir):
    """Wrap the functions a fault can stop in, and trace steps and renames."""
    real_replace = os.replace
    trace = os.open(attempt_dir / "trace.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line):
        os.write(trace, (line + "\n").encode())  # unbuffered: survives the SIGKILL

    def hang(where):
        tmp = attempt_dir / "hung.tmp"
        tmp.write_text(where)
        real_replace(tmp, attempt_dir / "hung")  # the parent sees the whole marker or none
        time.sleep(HANG_SECONDS)
        os._exit(3)

    def is_(kind):
        return fault is not None and fault["kind"] == kind

    real_update = EMA.update

    def update(self, net):  # once per optimizer step, in pretrain and finetune alike
        real_update(self, net)
        note(f"step {self.num_updates}")
        if is_("step") and self.num_updates == fault["count"]:
            hang(f"after step {self.num_updates}")

    EMA.update = update

    real_save = checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata)
        path = Path(filename)
        ckpt, name = fault["target"].split("/") if is_("file") else (None, None)
        if path.name == name and path.parent.name.startswith(f".{ckpt}.tmp-"):
            if fault["truncate"]:  # what a kill in the middle of writing it leaves
                os.truncate(path, path.stat().st_size // 2)
            hang(f"writing {ckpt}/{name}")

    checkpoint.save_file = save_file

    def replace(src, dst, **kw):
        name = Path(dst).name
        hit = is_("replace") and fnmatch.fnmatch(name, fault["target"])
        if hit and fault["json"] is not None:
            hit = json_has(json.loads(Path(src).read_text()), fault["json"])
        if hit and fault["when"] == "before":
            if fault["truncate"]:
                os.truncate(src, os.path.getsize(src) // 2)
            hang(f"before renaming {Path(src).name} to {name}")
        real_replace(src, dst, **kw)
        note(f"replace {name}")
        if hit:
            hang(f"after renaming to {name}")

    os.replace = replace

    real_unlink = os.unlink

    def unlink(path, *, dir_fd=None):  # shutil.rmtree deletes file by file through this
        real_unlink(path, dir_fd=dir_fd)
        folder = Path(os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None
                      else os.path.dirname(os.path.abspath(path))).name
        if is_("remove") and (folder == fault["target"]
                              or folder.startswith(f".{fault['target']}.old-")):
            hang(f"deleting {folder}")

    os.unlink = unlink

    real_sample = sample_stage.sample
    calls = [0]

    def sample(*args, **kwargs):  # one batch of images
        calls[0] += 1
        note(f"chunk {calls[0]}")
        if is_("chunk") and calls[0] == fault["count"]:
            hang(f"sampling chunk {calls[0]}")
        return real_sample(*args, **kwargs)

    sample_stage.sample = sample


print("ready", flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            torch.set_num_threads(1)  # as the in-process reference runs: same bits
            install(job["fault"], Path(job["dir"]))
            code = cli.main(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 64
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
'''


@dataclass(frozen=True)
class Fault:
    """Where the child stops, to be killed.

    kind: "step" (after the EMA update of optimizer step `count`), "file" (after
        `save_checkpoint` wrote `target` = "ckpt-<step>/<file>" into its temporary
        folder), "replace" (before or after an `os.replace` onto a name matching
        the glob `target`, whose source JSON holds `json`'s items), "remove" (after
        the first file of checkpoint folder `target` is deleted, under that name or
        moved aside), "chunk" (before the `count`-th batch of images of the attempt).
    truncate: cut the file in half first: what a kill in the middle of writing it leaves.
    category: the phase, for the plan ("step", "checkpoint", "ledger", "sample",
        "shard", "publish").
    """

    kind: Literal["step", "file", "replace", "remove", "chunk"]
    target: str = ""
    count: int = 0
    when: Literal["before", "after"] = "after"
    json: dict[str, Any] | None = None
    truncate: bool = False
    category: str = "step"

    @property
    def torn(self) -> bool:
        """Whether the kill interrupts a write: a file or a rename not yet done."""
        return self.kind in ("file", "remove") or (self.kind == "replace"
                                                   and self.when == "before")

    def __str__(self) -> str:
        what = {"step": f"after step {self.count}", "chunk": f"before image batch {self.count}",
                "file": f"writing {self.target}", "remove": f"deleting {self.target}",
                "replace": f"{self.when} renaming to "
                f"{self.target}" + (f" {self.json}" if self.json else "")}[self.kind]
        return what + (" (truncated)" if self.truncate else "")


Forced = tuple[str | None, bool | None]  # (category, torn) a kill must have; None: any
ANY: Forced = (None, None)


@dataclass
class Attempt:
    """One run of a stage: the fault it was killed at (None: ran to the end) and
    the stage's durable state when it started."""

    index: int
    fault: Fault | None
    dir: Path
    before: Any

    def trace(self, kind: str) -> list[str]:
        """The child's trace lines of one kind ("step", "replace", "chunk"), in order."""
        path = self.dir / "trace.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == kind]

    def log(self) -> str:
        return (self.dir / "child.log").read_text()[-4000:]


class Zygote:
    """A process that has imported dpsynth and forks one child per attempt."""

    def __init__(self, root: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        # one thread everywhere: faster on a busy two-core machine, and the same
        # bits as the in-process reference runs
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
        self.stderr = open(root / "zygote.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.child: int | None = None
        self._buffer = b""
        self._ready = False

    def _line(self, timeout: float) -> str | None:
        """The zygote's next line, or None if none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                self.stderr.seek(0)
                pytest.fail(f"the zygote died: {self.stderr.read()[-3000:]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def run(self, argv: list[str], fault: Fault | None, attempt_dir: Path) -> tuple[int, str]:
        """Run `dpsynth <argv>` in a new child; SIGKILL it once it stops at `fault`.

        Returns:
            (exit code, where it stopped): -9 and the marker's text if killed.
        """
        if not self._ready:
            assert self._line(ATTEMPT_TIMEOUT) == "ready", "the zygote did not start"
            self._ready = True
        attempt_dir.mkdir(parents=True)
        job = {"argv": argv, "dir": str(attempt_dir), "log": str(attempt_dir / "child.log"),
               "fault": dataclasses.asdict(fault) if fault else None}
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        started = self._line(30)
        assert started is not None, "the zygote did not fork"
        self.child = json.loads(started)["pid"]
        marker, deadline = attempt_dir / "hung", time.monotonic() + ATTEMPT_TIMEOUT
        while True:
            line = self._line(0.01)
            if line is not None:  # the child ended on its own
                self.child = None
                return json.loads(line)["exit"], ""
            if marker.exists():
                return self.kill(), marker.read_text()
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"attempt {attempt_dir.name} neither stopped nor ended in "
                            f"{ATTEMPT_TIMEOUT} s")

    def kill(self) -> int:
        """SIGKILL the running child (a crash: no cleanup code runs); its exit code."""
        assert self.child is not None
        os.kill(self.child, signal.SIGKILL)  # not reaped yet: the pid is still the child's
        line = self._line(30)
        assert line is not None, "a SIGKILLed child did not end"
        self.child = None
        return json.loads(line)["exit"]

    def close(self) -> None:
        if self.child is not None:  # a failed test left one waiting
            self.kill()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    try:
        yield z
    finally:
        z.close()


def kill_and_resume(zygote: Zygote, root: Path, argv: list[str], *,
                    snapshot: Callable[[], Any], faults: Callable[[Any], list[Fault]],
                    check: Callable[[Attempt], None], forced: tuple[Forced, ...],
                    rng: random.Random) -> list[Attempt]:
    """KILLS killed attempts, each at a fault drawn from those the attempt will
    reach (of the category and tornness `forced[i]` asks for, None: any), then
    one attempt that must finish.

    Args:
        snapshot: the stage's durable state now (e.g. the latest checkpoint's step).
        faults: the points an attempt starting from that state passes, in order.
        check: the invariants after a kill.
    """
    attempts: list[Attempt] = []
    for i in range(KILLS + 1):
        before = snapshot()
        fault = None
        if i < KILLS:
            category, torn = forced[i]
            options = [f for f in faults(before) if category in (None, f.category)
                       and torn in (None, f.torn)]
            assert options, f"attempt {i} from {before}: no {forced[i]} fault to stop at"
            fault = rng.choice(options)
        attempt = Attempt(i, fault, root / f"attempt-{i}", before)
        code, where = zygote.run(argv, fault, attempt.dir)
        expected = 0 if fault is None else -signal.SIGKILL
        assert code == expected, (f"attempt {i} exited {code}, expected {expected} "
                                  f"[{plan_of(attempts + [attempt])}]\n{attempt.log()}")
        attempts.append(attempt)
        if fault is not None:
            assert where, f"attempt {i} was killed without stopping at {fault}"
            check(attempt)
    return attempts


def plan_of(attempts: list[Attempt]) -> str:
    """Where each attempt started and was killed, for messages (DPSYNTH_KILL_SEED
    reruns a plan)."""
    return f"seed {SEED}: " + "; ".join(
        f"{a.index}: from {sorted(a.before) if isinstance(a.before, frozenset) else a.before}, "
        + (f"killed {a.fault}" if a.fault else "to the end")
        for a in attempts)


# --------------------------------------------------------------------------- fault points


def checkpoint_faults(step: int, orphan: bool, pruned: int | None) -> list[Fault]:
    """The points inside `save_checkpoint` for `step`, in order; `pruned`: the
    older checkpoint it deletes (it keeps two)."""
    name = f"ckpt-{step:08d}"
    faults = [Fault("file", f"{name}/{f}", truncate=t, category="checkpoint")
              for f in CKPT_FILES for t in (False, True)]
    if orphan:  # complete but never pointed at (killed before latest.json): moved aside
        faults.append(Fault("replace", f".{name}.old-*", category="checkpoint"))
    faults += [Fault("replace", name, when=w, category="checkpoint") for w in ("before", "after")]
    faults += [Fault("replace", LATEST, when="before", json={"step": step}, truncate=t,
                     category="checkpoint") for t in (False, True)]
    faults.append(Fault("replace", LATEST, json={"step": step}, category="checkpoint"))
    if pruned is not None:
        faults.append(Fault("remove", f"ckpt-{pruned:08d}", category="checkpoint"))
    return faults


def ledger_faults(ledger_file: str, entry: dict[str, Any]) -> list[Fault]:
    """Before (maybe half-written) and after the ledger write that makes `entry`."""
    return [Fault("replace", ledger_file, when="before", json=entry, truncate=t,
                  category="ledger") for t in (False, True)] + [
        Fault("replace", ledger_file, json=entry, category="ledger")]


def publish_faults(out: Path, *, inside: tuple[str, ...] = ()) -> list[Fault]:
    """The points of `atomic_dir(out)`: atomic writes `inside` the temporary
    folder, moving an existing output aside, renaming the new one into place."""
    faults = [Fault("replace", name, when="before", category="publish") for name in inside]
    if out.exists():
        faults.append(Fault("replace", f".{out.name}.old-*", category="publish"))
    return faults + [Fault("replace", out.name, when=w, category="publish")
                     for w in ("before", "after")]


def training_faults(*, start: int, steps: int, checkpoints: set[int], work: Path, out: Path,
                    ledger_file: str | None = None) -> list[Fault]:
    """Every point a training attempt resuming at `start` passes, in order."""
    faults, order = [], sorted(checkpoints)
    for k in range(start + 1, steps + 1):
        faults.append(Fault("step", count=k))
        if k in checkpoints:
            # saving the third checkpoint deletes the first, if this attempt made it
            # or finds it (save_checkpoint keeps two)
            j = order.index(k)
            old = order[j - 2] if j >= 2 else None
            pruned = old if old is not None and (
                old > start or (work / f"ckpt-{old:08d}").is_dir()) else None
            faults += checkpoint_faults(k, orphan=(work / f"ckpt-{k:08d}").is_dir(),
                                        pruned=pruned)
            if ledger_file:  # the run's progress, noted after each checkpoint
                faults += ledger_faults(ledger_file, {"steps_done": k, "status": "reserved"})
    if ledger_file:
        faults += ledger_faults(ledger_file, {"status": "completed"})
    return faults + publish_faults(out)


def latest_step(work: Path) -> int:
    state = load_latest(work)
    return 0 if state is None else state.step


def leftovers(*folders: Path) -> list[str]:
    """Temporary or moved-aside files and folders of atomic writes in `folders`."""
    return sorted(str(p) for d in folders if d.is_dir() for p in d.iterdir()
                  if ".tmp-" in p.name or ".old-" in p.name)


def write_config(cfg: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def check_checkpoint(work: Path, state: TrainState | None,
                     reference: dict[str, torch.Tensor], checkpoints: set[int]) -> None:
    """The checkpoint `load_latest` returned is whole (every tensor, every shape),
    and so is every folder named ckpt-*: load_latest falls back to them."""
    for folder in work.glob("ckpt-*"):
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [*CKPT_FILES, "state.json"]), f"{folder.name} is incomplete"
        for name in CKPT_FILES:
            load_file(folder / name)  # raises on a truncated file
        json.loads((folder / "state.json").read_text())
    if state is None:
        return
    assert state.step in checkpoints
    for tensors in (state.net, state.ema):
        assert tensors.keys() == reference.keys()
        assert all(tensors[k].shape == reference[k].shape for k in reference)
        assert all(bool(torch.isfinite(v).all()) for v in tensors.values())
    assert state.optimizer["state"], "optimizer moments missing"
    assert {"run_id", "history", "ema_num_updates"} <= set(state.meta)


def assert_weights(out: Path, reference: Path, exact: bool) -> None:
    for name in (WEIGHTS, EMA_WEIGHTS):
        got, want = load_file(out / name), load_file(reference / name)
        assert got.keys() == want.keys(), name
        for k in want:
            if exact:
                assert torch.equal(got[k], want[k]), f"{name}: {k} differs"
            else:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- pretrain


def test_pretrain_killed_three_times_ends_like_an_uninterrupted_run(
        zygote: Zygote, tmp_path: Path, tiny_cfg: Config, digits_public_dir: Path,
        pretrained_dir: Path) -> None:
    out = tmp_path / "art" / "pretrain"
    work = Path(work_dir_for(out))
    pc = tiny_cfg.pretrain
    checkpoints = {k for k in range(1, pc.steps + 1)
                   if k % pc.checkpoint_every == 0 or k == pc.steps}
    reference = load_file(pretrained_dir / WEIGHTS)
    argv = ["pretrain", "--config", str(write_config(tiny_cfg, tmp_path / "config.yaml")),
            "--public", str(digits_public_dir), "--out", str(out)]
    durable: list[int] = []

    def check(attempt: Attempt) -> None:
        state = load_latest(work)  # raises if a corrupt "latest" were readable
        check_checkpoint(work, state, reference, checkpoints)
        step = 0 if state is None else state.step
        assert step >= attempt.before, "the latest checkpoint went backwards"
        durable.append(step)
        steps = [int(s) for s in attempt.trace("step")]
        assert not steps or steps[0] == attempt.before + 1, "did not resume from latest"
        if out.exists():  # only once the stage renamed its finished output into place
            assert attempt.fault is not None and attempt.fault.category == "publish"
            assert_weights(out, pretrained_dir, exact=True)

    attempts = kill_and_resume(
        zygote, tmp_path / "attempts", argv, snapshot=lambda: latest_step(work),
        faults=lambda start: training_faults(start=start, steps=pc.steps,
                                             checkpoints=checkpoints, work=work, out=out),
        check=check, forced=(("checkpoint", True), ANY, ANY),
        rng=random.Random(f"{SEED}-pretrain"))

    plan = plan_of(attempts)
    print(plan)  # shown with -rP: where this seed killed
    assert_weights(out, pretrained_dir, exact=True)  # bit for bit, EMA included
    assert (out / "loss.csv").read_text() == (pretrained_dir / "loss.csv").read_text(), plan
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == pc.steps
    assert metrics["resumed_from_step"] == attempts[-1].before, plan
    assert not work.exists(), plan
    assert leftovers(out.parent, work.parent) == [], plan


# --------------------------------------------------------------------------- finetune


def test_finetune_killed_three_times_keeps_weights_epsilon_and_ledger(
        zygote: Zygote, tmp_path: Path, dp_cfg: Callable[..., Config], pretrained_dir: Path,
        private_dir: Path, digits_public_dir: Path) -> None:
    cfg = dp_cfg()  # noise_seed set: the secret generator is checkpointed (test runs only)
    fc = cfg.finetune
    ledger_dir = Path(cfg.privacy.ledger_dir)
    dataset = dataset_key(read_dataset(private_dir)[0])  # the ledger's key
    straight = tmp_path / "straight"
    finetune.run(dp_cfg(f"privacy.ledger_dir={tmp_path / 'straight-ledger'}"),
                 model_dir=pretrained_dir, private_dir=private_dir,
                 public_dir=digits_public_dir, out_dir=straight, tracker=NullTracker())
    reference_privacy = json.loads((straight / "privacy.json").read_text())
    assert reference_privacy["seeded_for_test"] is True

    out = tmp_path / "art" / "finetune"
    work = Path(work_dir_for(out))
    checkpoints = {k for k in range(1, fc.steps + 1) if k % fc.checkpoint_every == 0
                   or k % fc.log_every == 0 or k == fc.steps}
    first = min(checkpoints)
    reference = load_file(pretrained_dir / WEIGHTS)
    argv = ["finetune", "--config", str(write_config(cfg, tmp_path / "config.yaml")),
            "--model", str(pretrained_dir), "--private", str(private_dir),
            "--public", str(digits_public_dir), "--out", str(out)]
    progress: list[int] = []

    def faults(start: int) -> list[Fault]:
        found = training_faults(start=start, steps=fc.steps, checkpoints=checkpoints, work=work,
                                out=out, ledger_file=f"{dataset}.json")
        if start == 0:
            # Before its first checkpoint a run cannot be resumed: a retry is a new
            # run with a new ledger entry (the abandoned one counts in full). Kill
            # only from the moment latest.json names the first checkpoint.
            committed = Fault("replace", LATEST, json={"step": first}, category="checkpoint")
            found = found[found.index(committed):]
        return found

    def check(attempt: Attempt) -> None:
        state = load_latest(work)
        check_checkpoint(work, state, reference, checkpoints)
        assert state is not None and state.step >= max(attempt.before, first)
        assert state.secret_rng is not None  # seeded_for_test: the noise resumes exactly
        steps = [int(s) for s in attempt.trace("step")]
        assert not steps or steps[0] == attempt.before + 1, "did not resume from latest"
        entries = PrivacyLedger(ledger_dir, dataset).entries()  # always readable
        assert [e.run_id for e in entries] == [state.meta["run_id"]], "one run, one entry"
        entry = entries[0]
        assert entry.planned_steps == fc.steps
        assert entry.status == "reserved" or (
            entry.status == "completed" and attempt.fault is not None
            and attempt.fault.category in ("ledger", "publish"))
        # the whole plan is charged from the reservation on, whatever was done
        assert (PrivacyLedger(ledger_dir, dataset).spent_epsilon(fc.delta, fc.accountant)
                == pytest.approx(reference_privacy["epsilon"], rel=1e-9))
        assert entry.steps_done <= state.step  # noted only for a saved checkpoint
        assert not progress or entry.steps_done >= progress[-1], "ledger progress went back"
        progress.append(entry.steps_done)
        if out.exists():
            assert attempt.fault is not None and attempt.fault.category == "publish"

    attempts = kill_and_resume(
        zygote, tmp_path / "attempts", argv, snapshot=lambda: latest_step(work),
        faults=faults, check=check, forced=(("checkpoint", True), ("ledger", True), ANY),
        rng=random.Random(f"{SEED}-finetune"))

    plan = plan_of(attempts)
    print(plan)  # shown with -rP: where this seed killed
    assert_weights(out, straight, exact=False)
    assert json.loads((out / "privacy.json").read_text()) == reference_privacy, plan
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, straight))
    assert (got["epsilon"], got["steps"]) == (want["epsilon"], want["steps"])
    assert got["resumed_from_step"] == attempts[-1].before, plan
    assert got["final_public_loss"] == pytest.approx(want["final_public_loss"], rel=1e-5)
    entries = PrivacyLedger(ledger_dir, dataset).entries()
    assert len(entries) == 1, f"a resumed run must be counted once: {entries} [{plan}]"
    assert (entries[0].status, entries[0].steps_done) == ("completed", fc.steps)
    assert (PrivacyLedger(ledger_dir, dataset).spent_epsilon(fc.delta, fc.accountant)
            == pytest.approx(reference_privacy["epsilon"], rel=1e-9))
    assert progress == sorted(progress) and progress[-1] <= fc.steps
    assert not work.exists(), plan
    assert leftovers(out.parent, work.parent, ledger_dir) == [], plan
    assert sorted(p.name for p in ledger_dir.iterdir()) == [f"{dataset}.json", f"{dataset}.lock"]


# --------------------------------------------------------------------------- sample


def test_sample_killed_three_times_has_every_shard_once(
        zygote: Zygote, tmp_path: Path, tiny_cfg: Config, pretrained_dir: Path,
        sampled_dir: Path) -> None:
    sc = tiny_cfg.sample
    out = tmp_path / "art" / "sample"
    work = Path(work_dir_for(out))
    sizes = [10] * sc.num_shards  # 30 samples in 3 shards
    reference = {i: (sampled_dir / shard_name(i)).read_bytes() for i in range(sc.num_shards)}
    argv = ["sample", "--config", str(write_config(tiny_cfg, tmp_path / "config.yaml")),
            "--model", str(pretrained_dir), "--out", str(out)]

    def sidecar(i: int) -> str:
        return shard_name(i).replace(".npz", ".json")  # sample.py's finished-shard mark

    def finished() -> frozenset[int]:
        return frozenset(i for i in range(sc.num_shards) if (work / sidecar(i)).is_file())

    def faults(done: frozenset[int]) -> list[Fault]:
        found, batches = [], 0
        for i in sorted(set(range(sc.num_shards)) - done):
            for _ in range(math.ceil(sizes[i] / sc.batch_size)):
                batches += 1
                found.append(Fault("chunk", count=batches, category="sample"))
            for name in (shard_name(i), sidecar(i)):  # the data, then the mark
                found += [Fault("replace", name, when="before", truncate=t, category="shard")
                          for t in (False, True)]
                found.append(Fault("replace", name, category="shard"))
        return found + publish_faults(out, inside=(MANIFEST,))

    def check(attempt: Attempt) -> None:
        done = finished()
        assert done >= attempt.before, "a finished shard was lost"
        for i in done:  # a shard marked finished is whole and is the right one
            info = json.loads((work / sidecar(i)).read_text())
            assert sha256_file(work / shard_name(i)) == info["sha256"]
            assert (work / shard_name(i)).read_bytes() == reference[i], i
        remade = {name for name in attempt.trace("replace")} & {
            shard_name(i) for i in attempt.before}
        assert not remade, f"finished shards made again: {remade}"
        if out.exists():
            assert attempt.fault is not None and attempt.fault.category == "publish"

    attempts = kill_and_resume(
        zygote, tmp_path / "attempts", argv, snapshot=finished, faults=faults, check=check,
        # the last kill interrupts the publish: its temporary folder must not outlive it
        forced=(("shard", True), ANY, ("publish", True)), rng=random.Random(f"{SEED}-sample"))

    plan = plan_of(attempts)
    print(plan)  # shown with -rP: where this seed killed
    manifest = read_manifest(out)
    assert [s.file for s in manifest.shards] == [shard_name(i) for i in range(sc.num_shards)]
    assert sorted(p.name for p in out.glob("shard-*")) == [s.file for s in manifest.shards]
    images, labels, _ = read_dataset(out)  # verifies every hash against the manifest
    ref_images, ref_labels, _ = read_dataset(sampled_dir)
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels), plan
    assert manifest == read_manifest(sampled_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    skipped = len(attempts[-1].before)
    assert (metrics["shards_skipped"], metrics["shards_made"]) == (
        skipped, sc.num_shards - skipped), plan
    assert not work.exists(), plan
    assert leftovers(out.parent, work.parent) == [], plan


# --------------------------------------------------------------------------- S3 readers


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


V1 = {"manifest.json": b'{"v": 1}', "shard-00000.npz": b"a" * 100, "shard-00001.npz": b"b" * 100}
V2 = {"manifest.json": b'{"v": 2}', "shard-00000.npz": b"c" * 100, "shard-00001.npz": b"d" * 100}


@pytest.mark.parametrize("writer", ["finishes", "dies"])
def test_a_reader_racing_a_republish_never_gets_a_mix(
        s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    """The reader has fetched V1's marker and first file when a writer re-publishes
    V2 (and finishes, or dies after one file): it must return all of V2, or refuse
    -- never V1's first file with V2's others."""
    uri = s3.uri("art/sample")
    with work_io.publish(uri) as staged:
        out = staged.path
        _write(out, V1)
    new = _write(tmp_path / "v2", V2)
    real_download = s3_io.download_file
    raced: list[str] = []

    def download_then_race(c: Any, src: s3_io.S3Uri, path: Path) -> None:
        real_download(c, src, path)
        if raced:
            return
        raced.append(src.name)
        if writer == "finishes":
            published.upload_published(new, uri)
        else:  # upload_published's first steps, then a crash: no marker, one new file
            s3.client.delete_object(Bucket=s3.bucket, Key=f"art/sample/{published.MARKER}")
            s3.client.put_object(Bucket=s3.bucket, Key="art/sample/shard-00001.npz",
                                 Body=V2["shard-00001.npz"])

    monkeypatch.setattr(s3_io, "download_file", download_then_race)
    if writer == "finishes":
        with published.local_input(uri) as local:
            assert _tree(local) == V2
    else:
        with pytest.raises(InputError, match="no _SUCCESS.json, so not a complete output"):
            published.download_published(uri)
    assert raced == ["manifest.json"]  # the race did happen after the first file
    cached = cache.cache_root() / "inputs"
    assert all(_tree(d) == V2 for d in cached.iterdir()), "a mixed or partial copy is cached"
