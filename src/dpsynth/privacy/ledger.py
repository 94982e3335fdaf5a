"""The privacy ledger: every DP-SGD step ever planned on one private dataset,
across attempts and runs, against the dataset's fixed budget (ε, δ)
(PRIVACY.md rules 5 and 8).

One JSON file per dataset, ``<ledger_dir>/<key>.json``, keyed by the private
images themselves (`dataset_key`): sha256 over the sorted sha256 digests of the
images' raw bytes. Sharding, shard order, image order and labels do not enter,
so re-preparing the same images (another ``data.shard_size``, another order,
relabelled) finds the same ledger and the same budget. The budget is
``(privacy.dataset_budget_epsilon, privacy.dataset_budget_delta)``; the ledger
records its δ at the first reservation and composes every run at that δ (never
at a run's own δ, which would let a run at a larger δ spend less ε). A run
reserves its whole plan *before* training; the reservation is refused if the
composition of all runs so far plus this one would exceed the budget. A
reserved run that never completes still counts in full: a crashed attempt may
have spent any part of its plan.

Overlapping splits. The key names one set of images. A private split carved
again with another seed or other fractions is another set, so it gets another
ledger with a full budget. A record in both sets is protected by both ledgers
composed (roughly the sum of their ε), which neither ledger can see: keep the
private set fixed (same source, seed and fractions) for as long as its ledger
matters, and carve new runs from it rather than from a re-split pool. The
ledger cannot detect overlaps, and it must not try: storing a hash per image,
to match records across splits, would itself be a membership oracle (anyone
holding a candidate image could test whether it is in the private data).

What the file holds: run ids, statuses, step counts, each run's public target
ε and its planned accountant history, never data. The history's sample rate
q = B/N reveals the private split's size N, and the composed ε follows N
through the calibration, so the ledger stays with the private data and the
composed ε (`spent_epsilon`) is for use inside that boundary: what leaves it
(the refusal message, the stage's metrics, the report) states the budget, the
runs on record and their public targets only. The key itself is a function of
every private image; it names the file and is not published either.

Writes are atomic and serialised by an exclusive ``flock`` on a sidecar
``<key>.lock``, so two processes cannot both reserve past the budget. On object
storage (``privacy.ledger_dir: s3://...``) there is no lock: each change is a
compare-and-swap, a conditional PUT (``IfMatch`` the ETag read, or
``IfNoneMatch='*'`` for a new ledger) retried on conflict, so concurrent runs
on different machines never lose an entry nor both take the last budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dpsynth.errors import InputError
from dpsynth.privacy.accounting import AccountantKind, Step, epsilon, normalize_history
from dpsynth.privacy.ledger_file import Book, LedgerEntry, LedgerFile, LedgerStatus

_HASH = re.compile(r"[0-9a-f]{8,128}")
_KEY_DOMAIN = b"dpsynth dataset key v1\n"  # versions the key's definition


class LedgerExceeded(InputError):
    """A run would take the dataset past its privacy budget."""


def dataset_key(images: np.ndarray) -> str:
    """The privacy ledger's key of a private dataset: its images, as a set.

    sha256 over the image shape ``(H, W, C)`` and the sorted sha256 digests of
    each image's raw uint8 bytes. Independent of sharding, shard order and image
    order; labels do not enter (the same images relabelled are the same people).
    The key is a deterministic function of every private image: keep it inside
    the private boundary (it names the ledger file, nothing publishes it).

    Args:
        images: the private split, uint8, shape (N, H, W, C).

    Returns:
        64 lowercase hex digits.

    Raises:
        InputError: not a uint8 array of shape (N, H, W, C).

    >>> a = np.arange(3 * 2 * 2 * 1, dtype=np.uint8).reshape(3, 2, 2, 1)
    >>> dataset_key(a) == dataset_key(a[::-1].copy()) != dataset_key(a[:2])
    True
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InputError(f"images: dtype {images.dtype}, shape {images.shape}; the ledger's "
                         "key is computed over uint8 images of shape (N, H, W, C)")
    digests = sorted(hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()
                     for image in images)
    key = hashlib.sha256(_KEY_DOMAIN + json.dumps(list(images.shape[1:])).encode() + b"\n")
    for digest in digests:
        key.update(digest)
    return key.hexdigest()


@dataclass(frozen=True)
class PlannedRun:
    """A run to reserve: its id, planned ``(noise_multiplier, sample_rate,
    num_steps)`` history, its own δ and its public target ε."""

    run_id: str
    history: tuple[Step, ...]
    delta: float
    target_epsilon: float


class PrivacyLedger:
    """The privacy ledger of one private dataset.

    Args:
        ledger_dir: folder of the ledgers (``privacy.ledger_dir``), local or ``s3://``.
        dataset: the dataset's key, ``dataset_key(images)`` (lowercase hex).
        legacy_key: the private split's manifest content hash, the key of a
            schema-1 ledger (older dpsynth). When this dataset has no ledger yet
            but that one exists, every call refuses with how to convert it:
            its runs still count.
    """

    def __init__(self, ledger_dir: str | Path, dataset: str, *,
                 legacy_key: str | None = None) -> None:
        for name, value in (("dataset", dataset), ("legacy_key", legacy_key)):
            if value is not None and not (isinstance(value, str) and _HASH.fullmatch(value)):
                raise InputError(f"{name}={value!r} must be a lowercase hex content hash")
        self.dataset = dataset
        self.ledger_dir = ledger_dir
        self.file = LedgerFile(ledger_dir, dataset, legacy_key=legacy_key)
        self.path = self.file.path

    def entries(self) -> list[LedgerEntry]:
        """All runs recorded on this dataset, oldest first."""
        return list(self.file.read().entries)

    def budget_delta(self) -> float | None:
        """The budget δ the ledger was opened with (at its first reservation);
        None while it has none."""
        return self.file.read().budget_delta

    def spent_epsilon(self, delta: float, accountant: AccountantKind,
                      extra: Sequence[Step] = ()) -> float:
        """The composed ε of every recorded plan (reserved ones in full) plus `extra`,
        at `delta` (the budget's δ: `budget_delta()`).

        For use inside the private boundary only: the value is a function of the
        private split's size N through the calibration (PRIVACY.md rule 8).
        """
        return _composed(self.file.read().entries, delta, accountant, extra)

    def reserve(self, run_id: str, history: Sequence[Step], *, delta: float,
                accountant: AccountantKind, target_epsilon: float, budget_epsilon: float,
                budget_delta: float) -> LedgerEntry:
        """Record a run's plan before it trains, or refuse it.

        A run id already in the ledger is a resume of that run: its entry is
        returned unchanged (counted once), provided the plan is the same.

        Args:
            run_id: the run; the same id on resume.
            history: the run's planned ``(noise_multiplier, sample_rate, num_steps)``.
            delta: the run's own δ (``finetune.delta``); at most `budget_delta`.
            accountant: ``finetune.accountant``; the composition uses it too.
            target_epsilon: the run's public target ε (``finetune.epsilon``).
            budget_epsilon: the dataset's budget ε (``privacy.dataset_budget_epsilon``).
            budget_delta: the dataset's budget δ (``privacy.dataset_budget_delta``):
                recorded at the first reservation, and every later call must pass
                the same value. All runs are composed at it.

        Returns:
            The run's entry.

        Raises:
            LedgerExceeded: all plans so far plus this one, composed at the budget
                δ, would exceed the budget ε.
            InputError: `delta` above the budget δ, a budget δ other than the
                ledger's, a resume with a different plan, bad arguments, or a
                corrupt ledger.
        """
        return self.reserve_all([PlannedRun(run_id, tuple(history), delta, target_epsilon)],
                                accountant=accountant, budget_epsilon=budget_epsilon,
                                budget_delta=budget_delta)[0]

    def reserve_all(self, runs: Sequence[PlannedRun], *, accountant: AccountantKind,
                    budget_epsilon: float, budget_delta: float,
                    what: str = "This run") -> list[LedgerEntry]:
        """Record several runs' plans in one transaction, before any of them
        trains, or refuse them all (a privacy-utility sweep: `dpsynth sweep`).

        The check is the composition of every run on record plus all of `runs`
        against the budget, so a sweep that would run out of budget half-way is
        refused whole, before it spends anything. Run ids already in the ledger
        are resumes (counted once, same plan required), as in `reserve`.

        Args:
            runs: the planned runs, in order.
            what: how the refusal names them ("This run", "This sweep").
            accountant, budget_epsilon, budget_delta: as in `reserve`.

        Returns:
            The runs' entries, in the order of `runs`.

        Raises:
            LedgerExceeded: the composition of all runs so far plus `runs`, at the
                budget δ, would exceed the budget ε. Nothing is recorded.
            InputError: as in `reserve`, for any of `runs`.
        """
        if not (isinstance(budget_epsilon, (int, float)) and budget_epsilon > 0):
            raise InputError(f"privacy.dataset_budget_epsilon={budget_epsilon!r} must be > 0")
        if not (isinstance(budget_delta, (int, float)) and 0 < budget_delta < 1):
            raise InputError(f"privacy.dataset_budget_delta={budget_delta!r} must be in (0, 1)")
        if not runs:
            raise InputError("no runs to reserve")
        if len({r.run_id for r in runs}) != len(runs):
            raise InputError(f"run ids {[r.run_id for r in runs]} repeat; each run needs its own")
        plans = [self._checked(r, budget_delta) for r in runs]

        def change(book: Book) -> tuple[Book | None, list[LedgerEntry]]:
            if book.budget_delta is not None and not _close(book.budget_delta, budget_delta):
                raise InputError(
                    f"privacy.dataset_budget_delta={budget_delta!r}, but this private "
                    f"dataset's privacy ledger (in {self.ledger_dir}) was opened with budget "
                    f"delta {book.budget_delta!r}: the budget delta of a dataset never "
                    "changes, since every run on it is composed at that delta. Set "
                    f"privacy.dataset_budget_delta={book.budget_delta!r}")
            known = {e.run_id: e for e in book.entries}
            fresh: list[tuple[PlannedRun, tuple[Step, ...]]] = []
            for run, plan in zip(runs, plans):
                entry = known.get(run.run_id)
                if entry is None:
                    fresh.append((run, plan))
                elif not _same_plan(entry, plan, run.delta, accountant):
                    raise InputError(
                        f"run {run.run_id} is in the privacy ledger {self.path} with another "
                        "plan (noise multiplier, sample rate, steps, delta or accountant); "
                        "a resumed run must keep its settings: start a new run instead")
            if not fresh:
                return None, [known[r.run_id] for r in runs]
            extra = [step for _, plan in fresh for step in plan]
            if _composed(book.entries, budget_delta, accountant, extra) > budget_epsilon:
                raise LedgerExceeded(self._refusal(book.entries, [r for r, _ in fresh],
                                                   accountant, budget_epsilon, budget_delta,
                                                   what))
            now = _now()
            new = {run.run_id: LedgerEntry(run.run_id, "reserved", accountant,
                                           float(run.delta), float(run.target_epsilon), plan,
                                           0, now, now) for run, plan in fresh}
            entries = [known.get(r.run_id) or new[r.run_id] for r in runs]
            return Book(float(budget_delta), book.entries + tuple(new.values())), entries

        return self.file.transact(change)

    @staticmethod
    def _checked(run: PlannedRun, budget_delta: float) -> tuple[Step, ...]:
        """`run`'s normalized plan, after checking its fields."""
        if not (isinstance(run.run_id, str) and run.run_id):
            raise InputError(f"run_id={run.run_id!r} must be a non-empty string")
        if not (isinstance(run.target_epsilon, (int, float)) and run.target_epsilon > 0):
            raise InputError(f"finetune.epsilon={run.target_epsilon!r} must be > 0")
        if not (isinstance(run.delta, (int, float)) and 0 < run.delta < 1):
            raise InputError(f"finetune.delta={run.delta!r} must be in (0, 1)")
        if run.delta > budget_delta:
            raise InputError(
                f"finetune.delta={run.delta!r} exceeds the dataset's budget "
                f"privacy.dataset_budget_delta={budget_delta!r}: every run on a dataset is "
                "composed at the budget's delta, so a run's own guarantee may not hold at a "
                f"larger one. Lower finetune.delta to at most {budget_delta!r}")
        plan = normalize_history(run.history)
        if not plan:
            raise InputError(f"run {run.run_id}: the planned history is empty")
        return plan

    def record_progress(self, run_id: str, steps_done: int) -> None:
        """Note that `run_id` has taken `steps_done` steps (called at checkpoints)."""
        self._update(run_id, steps_done, None)

    def complete(self, run_id: str, steps_done: int) -> None:
        """Mark `run_id` completed after `steps_done` steps."""
        self._update(run_id, steps_done, "completed")

    def _update(self, run_id: str, steps_done: int, status: LedgerStatus | None) -> None:
        def change(book: Book) -> tuple[Book, None]:
            for i, entry in enumerate(book.entries):
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
            entries = list(book.entries)
            entries[i] = replace(entry, steps_done=max(entry.steps_done, steps_done),
                                 status=status or entry.status, updated=_now())
            return replace(book, entries=tuple(entries)), None

        self.file.transact(change)

    def _refusal(self, entries: Sequence[LedgerEntry], runs: Sequence[PlannedRun],
                 accountant: AccountantKind, budget_epsilon: float, budget_delta: float,
                 what: str) -> str:
        # Public settings only (PRIVACY.md rule 8): the budget, the runs with their
        # steps and public targets. No composed, per-run or remaining ε, no σ, no q:
        # each is a function of N through the calibration. The sum of the targets is
        # public, and bounds the composition from above (basic composition).
        on_record = "; ".join(
            f"{e.run_id} ({e.status}, {e.steps_done}/{e.planned_steps} steps, "
            f"target ε = {e.target_epsilon:g})" for e in entries) or "none"
        steps = sum(n for r in runs for _, _, n in r.history)
        targets = [r.target_epsilon for r in runs]
        if len(runs) == 1:
            this = f"{what} (target ε = {targets[0]:g}, {steps} steps)"
        else:
            this = (f"{what} ({len(runs)} runs at target ε = "
                    f"{', '.join(f'{t:g}' for t in targets)}, {steps} steps in all; it "
                    f"needs up to ε = {sum(targets):g} of the budget, the sum of its targets, "
                    "which bounds their composition from above)")
        return (f"privacy budget exceeded for this private dataset: its budget is "
                f"(ε ≤ {budget_epsilon:g}, δ = {budget_delta:g}) "
                "(privacy.dataset_budget_epsilon, privacy.dataset_budget_delta), and every "
                f"run on record counts in full, composed at that δ ({accountant.upper()} "
                f"accountant). {len(entries)} run(s) on record: {on_record}. {this} would "
                "take the composition past the budget, so nothing was reserved or trained. "
                "To proceed: lower finetune.epsilon"
                + (" or drop points from sweep.epsilons" if len(runs) > 1 else "")
                + ", raise privacy.dataset_budget_epsilon only if the data owner agrees, or "
                "fine-tune on new data. The composed ε is not stated: it depends on the "
                f"private dataset's size; the ledger in {self.ledger_dir} records the plans it "
                "is computed from")

def _composed(entries: Sequence[LedgerEntry], delta: float, accountant: AccountantKind,
              extra: Sequence[Step]) -> float:
    history = [step for e in entries for step in e.history] + list(extra)
    return epsilon(history, delta, accountant)


def _close(a: float, b: float) -> bool:
    # relative tolerance: σ is recomputed by calibration on resume, possibly on
    # another machine whose floating point differs in the last bits
    return math.isclose(a, b, rel_tol=1e-9)


def _same_plan(entry: LedgerEntry, plan: tuple[Step, ...], delta: float,
               accountant: str) -> bool:
    return (entry.accountant == accountant and _close(entry.delta, delta)
            and len(entry.history) == len(plan)
            and all(_close(s1, s2) and _close(q1, q2) and n1 == n2
                    for (s1, q1, n1), (s2, q2, n2) in zip(entry.history, plan)))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
