"""How a privacy ledger is stored: one JSON file per dataset (schema 2), read and
replaced atomically under an exclusive ``flock`` on a sidecar ``<key>.lock``
locally, or by compare-and-swap on S3 (a conditional PUT, ``IfMatch`` the ETag
read or ``IfNoneMatch='*'`` for a new ledger, retried on conflict). The rules
(budgets, reservations, composition) are `dpsynth.privacy.ledger`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from dpsynth.errors import DpsynthError, InputError
from dpsynth.io import s3
from dpsynth.io.atomic import atomic_write_bytes
from dpsynth.privacy.accounting import Step, normalize_history

SCHEMA = 2  # 1: keyed by the manifest's content hash, each run composed at its own δ
LedgerStatus = Literal["reserved", "completed"]
_ENTRY_FIELDS = ("run_id", "status", "accountant", "delta", "target_epsilon", "history",
                 "steps_done", "started", "updated")
CAS_ATTEMPTS = 50  # conditional-write retries on S3 before giving up (heavy contention)
T = TypeVar("T")


@dataclass(frozen=True)
class LedgerEntry:
    """One run's reservation on the dataset.

    Attributes:
        run_id: the run (a resumed run keeps its id, so it is counted once).
        status: "reserved" before and during training, "completed" after.
        accountant: the accountant the run was calibrated with.
        delta: the run's own δ (``finetune.delta``); the ledger composes at the
            budget's δ, never at this one.
        target_epsilon: the run's public target ε (``finetune.epsilon``), what
            messages and reports may state about it.
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
    target_epsilon: float
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


@dataclass(frozen=True)
class Book:
    """The ledger file's content: the budget δ (None until the first reservation)
    and the entries, oldest first."""

    budget_delta: float | None
    entries: tuple[LedgerEntry, ...]


class LedgerFile:
    """The file of one dataset's ledger, ``<ledger_dir>/<dataset>.json``, local or
    ``s3://``; `legacy_key` names a schema-1 ledger (older dpsynth) whose runs
    must not be forgotten (see `read`)."""

    def __init__(self, ledger_dir: str | Path, dataset: str, *,
                 legacy_key: str | None = None) -> None:
        self.dataset = dataset
        self.s3 = s3.is_s3(ledger_dir)
        self.legacy_path: Path | str | None = None
        if self.s3:
            root = s3.S3Uri.parse(str(ledger_dir))
            self.path: Path | str = str(root.child(f"{dataset}.json"))
            if legacy_key is not None:
                self.legacy_path = str(root.child(f"{legacy_key}.json"))
        else:
            self.path = Path(ledger_dir) / f"{dataset}.json"
            self.lock_path = Path(ledger_dir) / f"{dataset}.lock"
            if legacy_key is not None:
                self.legacy_path = Path(ledger_dir) / f"{legacy_key}.json"

    def transact(self, change: Callable[[Book], tuple[Book | None, T]]) -> T:
        """Read the book, apply `change` (a new book or None for no write, and a
        result), write: under the file lock locally, as a compare-and-swap on S3."""
        if not self.s3:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                new, result = change(self.read())
                if new is not None:
                    self._write(new)
                return result
        for attempt in range(CAS_ATTEMPTS):
            data, etag = s3.read_versioned(str(self.path))
            new, result = change(self._parse(data))
            if new is None or s3.write_if(str(self.path), self._encode(new), etag):
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

    def read(self) -> Book:
        return self._parse(self._read_bytes(self.path))

    def _read_bytes(self, path: Path | str) -> bytes | None:
        if self.s3:
            return s3.read_versioned(str(path))[0]
        path = Path(path)
        try:
            return path.read_bytes() if path.exists() else None
        except OSError as exc:
            raise InputError(f"{path}: the privacy ledger is unreadable ({exc})") from exc

    def _parse(self, data: bytes | None) -> Book:
        if data is None:
            self._check_no_legacy_ledger()
            return Book(None, ())
        try:
            raw = json.loads(data)
            if isinstance(raw, dict) and raw.get("schema") == 1:
                raise InputError(self._schema1(self.path))
            if not (isinstance(raw, dict) and raw.get("schema") == SCHEMA
                    and raw.get("dataset") == self.dataset
                    and set(raw) == {"schema", "dataset", "budget_delta", "entries"}
                    and isinstance(raw["entries"], list)):
                raise ValueError(f"expected schema {SCHEMA}, dataset {self.dataset}, a budget "
                                 "delta and a list of entries")
            budget_delta = raw["budget_delta"]
            if not (isinstance(budget_delta, float) and 0 < budget_delta < 1):
                raise ValueError(f"budget_delta={budget_delta!r} must be in (0, 1)")
            return Book(budget_delta, tuple(_entry_from_json(e) for e in raw["entries"]))
        except InputError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise InputError(
                f"{self.path}: the privacy ledger is unreadable or corrupt ({exc}). It records "
                "the privacy already spent on this dataset, so it is never reset "
                "automatically: restore it from a backup or repair it by hand") from exc

    def _check_no_legacy_ledger(self) -> None:
        """Refuse to start a fresh ledger while an older dpsynth's one (schema 1,
        keyed by the manifest) records runs on this split: they still count."""
        if self.legacy_path is None:
            return
        data = self._read_bytes(self.legacy_path)
        if data is None:
            return
        try:
            schema = json.loads(data).get("schema")
        except (ValueError, AttributeError):
            schema = None  # not a ledger of ours: leave it alone
        if schema == 1:
            raise InputError(self._schema1(self.legacy_path))

    def _schema1(self, path: Path | str) -> str:
        return (f"{path}: a privacy ledger of schema 1, from an older dpsynth that keyed "
                "ledgers by the private split's manifest (so re-preparing the same images "
                "started a fresh one) and composed each run at its own delta. Its runs were "
                "spent on this data and still count, so it is neither ignored nor converted "
                f"silently. Convert it by hand into {self.path} (docs/privacy.md, \"Ledgers "
                "of schema 1\"): schema 2, dataset set to that file's name, budget_delta "
                "set to privacy.dataset_budget_delta (at least every entry's delta), and "
                "each entry given its run's target_epsilon (finetune.epsilon); the old file "
                "is then no longer read")

    def _encode(self, book: Book) -> bytes:
        return (json.dumps({"schema": SCHEMA, "dataset": self.dataset,
                            "budget_delta": book.budget_delta,
                            "entries": [e.to_json() for e in book.entries]}, indent=2)
                + "\n").encode()

    def _write(self, book: Book) -> None:
        """Replace the ledger file (local; the caller holds the lock)."""
        path = Path(self.path)
        atomic_write_bytes(path, self._encode(book))
        # Every writer holds the lock while it writes, so a temporary file of the
        # ledger seen now is a killed writer's (a SIGKILL runs no cleanup).
        for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
            stale.unlink(missing_ok=True)


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
                       delta=float(d["delta"]), target_epsilon=float(d["target_epsilon"]),
                       history=history, steps_done=d["steps_done"], started=str(d["started"]),
                       updated=str(d["updated"]))
