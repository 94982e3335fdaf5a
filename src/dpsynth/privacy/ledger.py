"""The privacy ledger: every DP-SGD step ever planned on one private dataset,
across attempts and runs (PRIVACY.md rule 5).

One JSON file per dataset, ``<ledger_dir>/<dataset_hash>.json``, keyed by the
content hash of the dataset's manifest. A run reserves its whole plan *before*
training; the reservation is refused if the composed ε of all runs so far plus
this one would exceed the dataset's budget. A reserved run that never completes
still counts in full: a crashed attempt may have spent any part of its plan.

The file holds run ids, statuses, step counts and the planned accountant
history, never data. The history's sample rate q = B/N reveals the private
split's size N, so the ledger stays with the private data (not published).
Writes are atomic and serialised by an exclusive ``flock`` on a sidecar
``<dataset_hash>.lock``, so two processes cannot both reserve past the budget.
On object storage (``privacy.ledger_dir: s3://...``) there is no lock: each
change is a compare-and-swap, a conditional PUT (``IfMatch`` the ETag read, or
``IfNoneMatch='*'`` for a new ledger) retried on conflict, so concurrent runs
on different machines never lose an entry nor both take the last budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from dpsynth.errors import DpsynthError, InputError
from dpsynth.io import storage
from dpsynth.io.atomic import atomic_write_bytes
from dpsynth.privacy.accounting import AccountantKind, Step, epsilon, normalize_history

SCHEMA = 1
LedgerStatus = Literal["reserved", "completed"]
_HASH = re.compile(r"[0-9a-f]{8,128}")
_ENTRY_FIELDS = ("run_id", "status", "accountant", "delta", "history", "steps_done",
                 "started", "updated")
CAS_ATTEMPTS = 50  # conditional-write retries on S3 before giving up (heavy contention)
T = TypeVar("T")


class LedgerExceeded(InputError):
    """A run would take the dataset past its privacy budget."""


@dataclass(frozen=True)
class LedgerEntry:
    """One run's reservation on the dataset.

    Attributes:
        run_id: the run (a resumed run keeps its id, so it is counted once).
        status: "reserved" before and during training, "completed" after.
        accountant: the accountant the run was calibrated with.
        delta: the run's δ.
        history: the planned ``(noise_multiplier, sample_rate, num_steps)`` of the run.
        steps_done: the most steps the run is known to have taken (informational:
            the whole plan counts whatever its value).
        started: ISO time of the reservation (UTC).
        updated: ISO time of the last change (UTC).
    """

    run_id: str
    status: LedgerStatus
    accountant: str
    delta: float
    history: tuple[Step, ...]
    steps_done: int
    started: str
    updated: str

    @property
    def planned_steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def to_json(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _ENTRY_FIELDS}
        d["history"] = [list(step) for step in self.history]
        return d


class PrivacyLedger:
    """The privacy ledger of one private dataset.

    Args:
        ledger_dir: folder of the ledgers (``privacy.ledger_dir``), local or ``s3://``.
        dataset_hash: the dataset manifest's content hash (lowercase hex).
    """

    def __init__(self, ledger_dir: str | Path, dataset_hash: str) -> None:
        if not (isinstance(dataset_hash, str) and _HASH.fullmatch(dataset_hash)):
            raise InputError(f"{dataset_hash=} must be a lowercase hex content hash")
        self.dataset_hash = dataset_hash
        self.s3 = storage.is_s3(ledger_dir)
        if self.s3:
            self.path: Path | str = str(storage.S3Uri.parse(str(ledger_dir)).child(
                f"{dataset_hash}.json"))
        else:
            self.path = Path(ledger_dir) / f"{dataset_hash}.json"
            self.lock_path = Path(ledger_dir) / f"{dataset_hash}.lock"

    def entries(self) -> list[LedgerEntry]:
        """All runs recorded on this dataset, oldest first."""
        return self._read()

    def spent_epsilon(self, delta: float, accountant: AccountantKind,
                      extra: Sequence[Step] = ()) -> float:
        """The composed ε of every recorded plan (reserved ones in full) plus `extra`."""
        return _composed(self._read(), delta, accountant, extra)

    def reserve(self, run_id: str, history: Sequence[Step], *, delta: float,
                accountant: AccountantKind, budget_epsilon: float) -> LedgerEntry:
        """Record a run's plan before it trains, or refuse it.

        A run id already in the ledger is a resume of that run: its entry is
        returned unchanged (counted once), provided the plan is the same.

        Args:
            run_id: the run; the same id on resume.
            history: the run's planned ``(noise_multiplier, sample_rate, num_steps)``.
            delta: δ at which the dataset's ε is composed (``finetune.delta``).
            accountant: ``finetune.accountant``.
            budget_epsilon: the dataset's budget (``privacy.dataset_budget_epsilon``).

        Returns:
            The run's entry.

        Raises:
            LedgerExceeded: all plans so far plus this one would exceed the budget.
            InputError: a resume with a different plan, bad arguments, or a corrupt ledger.
        """
        if not (isinstance(run_id, str) and run_id):
            raise InputError(f"{run_id=} must be a non-empty string")
        if not (isinstance(budget_epsilon, (int, float)) and budget_epsilon > 0):
            raise InputError(f"privacy.dataset_budget_epsilon={budget_epsilon!r} must be > 0")
        plan = normalize_history(history)
        if not plan:
            raise InputError(f"run {run_id}: the planned history is empty")

        def change(entries: list[LedgerEntry]) -> tuple[list[LedgerEntry] | None, LedgerEntry]:
            for entry in entries:
                if entry.run_id == run_id:
                    if not _same_plan(entry, plan, delta, accountant):
                        raise InputError(
                            f"run {run_id} is in the privacy ledger {self.path} with another "
                            "plan (noise multiplier, sample rate, steps, delta or accountant); "
                            "a resumed run must keep its settings: start a new run instead")
                    return None, entry
            total = _composed(entries, delta, accountant, plan)
            if total > budget_epsilon:
                raise LedgerExceeded(self._refusal(entries, plan, total, delta, accountant,
                                                   budget_epsilon))
            now = _now()
            entry = LedgerEntry(run_id, "reserved", accountant, float(delta), plan, 0, now, now)
            return entries + [entry], entry

        return self._transact(change)

    def record_progress(self, run_id: str, steps_done: int) -> None:
        """Note that `run_id` has taken `steps_done` steps (called at checkpoints)."""
        self._update(run_id, steps_done, None)

    def complete(self, run_id: str, steps_done: int) -> None:
        """Mark `run_id` completed after `steps_done` steps."""
        self._update(run_id, steps_done, "completed")

    def _update(self, run_id: str, steps_done: int, status: LedgerStatus | None) -> None:
        def change(entries: list[LedgerEntry]) -> tuple[list[LedgerEntry], None]:
            for i, entry in enumerate(entries):
                if entry.run_id == run_id:
                    break
            else:
                raise InputError(f"run {run_id} has no reservation in the privacy ledger "
                                 f"{self.path}; reserve() must come before training")
            if not (isinstance(steps_done, int) and not isinstance(steps_done, bool)
                    and 0 <= steps_done <= entry.planned_steps):
                raise InputError(f"{steps_done=} must be in [0, {entry.planned_steps}], the "
                                 f"steps planned for run {run_id}")
            # a resume from an earlier checkpoint does not undo steps already taken
            entries[i] = replace(entry, steps_done=max(entry.steps_done, steps_done),
                                 status=status or entry.status, updated=_now())
            return entries, None

        self._transact(change)

    def _refusal(self, entries: list[LedgerEntry], plan: tuple[Step, ...], total: float,
                 delta: float, accountant: AccountantKind, budget: float) -> str:
        spent = _composed(entries, delta, accountant, ())
        alone = epsilon(plan, delta, accountant)
        runs = ", ".join(f"{e.run_id} ({e.status}, {e.steps_done}/{e.planned_steps} steps)"
                         for e in entries) or "none"
        return (f"privacy budget exceeded for dataset {self.dataset_hash[:12]}: "
                f"privacy.dataset_budget_epsilon={budget} at delta={delta} "
                f"({accountant.upper()} accountant). Already spent: epsilon={spent:.4f} by "
                f"{len(entries)} run(s): {runs}. This run (epsilon={alone:.4f} on its own) "
                f"would add {total - spent:.4f}, for a total of {total:.4f}. To proceed: "
                "raise privacy.dataset_budget_epsilon only if the data owner agrees, lower "
                "finetune.epsilon, or fine-tune on new data. Ledger: "
                f"{self.path}")

    def _transact(self, change: Callable[[list[LedgerEntry]],
                                         tuple[list[LedgerEntry] | None, T]]) -> T:
        """Read the entries, apply `change` (new entries or None for no write, and
        a result), write: under the file lock locally, as a compare-and-swap on S3."""
        if not self.s3:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                new, result = change(self._read())
                if new is not None:
                    self._write(new)
                return result
        for attempt in range(CAS_ATTEMPTS):
            data, etag = storage.read_versioned(str(self.path))
            new, result = change(self._parse(data))
            if new is None or storage.write_if(str(self.path), self._encode(new), etag):
                return result
            # another run changed the ledger between our read and write: re-read,
            # re-check the budget against its entry too, and try again
            time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** attempt)))
        raise DpsynthError(f"{self.path}: the privacy ledger kept changing under "
                           f"{CAS_ATTEMPTS} attempts to update it; try again")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive lock of this dataset's ledger (blocking)."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        # the lock file is never removed: deleting it would let two processes
        # lock two different inodes
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> list[LedgerEntry]:
        if self.s3:
            return self._parse(storage.read_versioned(str(self.path))[0])
        path = Path(self.path)
        try:
            data = path.read_bytes() if path.exists() else None
        except OSError as exc:
            raise InputError(f"{path}: the privacy ledger is unreadable ({exc})") from exc
        return self._parse(data)

    def _parse(self, data: bytes | None) -> list[LedgerEntry]:
        if data is None:
            return []
        try:
            raw = json.loads(data)
            if not (isinstance(raw, dict) and raw.get("schema") == SCHEMA
                    and raw.get("dataset") == self.dataset_hash
                    and isinstance(raw.get("entries"), list)):
                raise ValueError(f"expected schema {SCHEMA}, dataset {self.dataset_hash} "
                                 "and a list of entries")
            return [_entry_from_json(e) for e in raw["entries"]]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise InputError(
                f"{self.path}: the privacy ledger is unreadable or corrupt ({exc}). It records "
                "the privacy already spent on this dataset, so it is never reset "
                "automatically: restore it from a backup or repair it by hand") from exc

    def _encode(self, entries: list[LedgerEntry]) -> bytes:
        return (json.dumps({"schema": SCHEMA, "dataset": self.dataset_hash,
                            "entries": [e.to_json() for e in entries]}, indent=2) + "\n").encode()

    def _write(self, entries: list[LedgerEntry]) -> None:
        """Replace the ledger file (local; the caller holds the lock)."""
        path = Path(self.path)
        atomic_write_bytes(path, self._encode(entries))
        # Every writer holds the lock while it writes, so a temporary file of the
        # ledger seen now is a killed writer's (a SIGKILL runs no cleanup).
        for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
            stale.unlink(missing_ok=True)


def _composed(entries: Sequence[LedgerEntry], delta: float, accountant: AccountantKind,
              extra: Sequence[Step]) -> float:
    history = [step for e in entries for step in e.history] + list(extra)
    return epsilon(history, delta, accountant)


def _same_plan(entry: LedgerEntry, plan: tuple[Step, ...], delta: float,
               accountant: str) -> bool:
    # relative tolerance: σ is recomputed by calibration on resume, possibly on
    # another machine whose floating point differs in the last bits
    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=1e-9)

    return (entry.accountant == accountant and close(entry.delta, delta)
            and len(entry.history) == len(plan)
            and all(close(s1, s2) and close(q1, q2) and n1 == n2
                    for (s1, q1, n1), (s2, q2, n2) in zip(entry.history, plan)))


def _entry_from_json(d: Any) -> LedgerEntry:
    if not (isinstance(d, dict) and set(d) == set(_ENTRY_FIELDS)):
        raise ValueError(f"an entry must have exactly the fields {list(_ENTRY_FIELDS)}")
    if d["status"] not in ("reserved", "completed"):
        raise ValueError(f"bad status {d['status']!r} in run {d['run_id']!r}")
    try:
        history = normalize_history(d["history"])
    except InputError as exc:
        raise ValueError(f"run {d['run_id']!r}: {exc}") from None
    if not (isinstance(d["steps_done"], int) and isinstance(d["run_id"], str) and history):
        raise ValueError(f"bad run_id, steps_done or history in run {d['run_id']!r}")
    return LedgerEntry(run_id=d["run_id"], status=d["status"], accountant=str(d["accountant"]),
                       delta=float(d["delta"]), history=history, steps_done=d["steps_done"],
                       started=str(d["started"]), updated=str(d["updated"]))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
