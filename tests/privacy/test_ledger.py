"""The privacy ledger: reservations before training, refusal past the dataset's
budget, crashed and resumed runs, isolation per dataset, and two processes
racing for the last of a budget (PRIVACY.md rule 5)."""

from __future__ import annotations

import functools
import json
import multiprocessing
from pathlib import Path

import pytest

from dpsynth.errors import InputError
from dpsynth.privacy.accounting import epsilon
from dpsynth.privacy.ledger import LedgerEntry, LedgerExceeded, PrivacyLedger

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning",
                                        "ignore::RuntimeWarning")

DATASET = "ab" * 32  # a sha256 hex digest
OTHER = "cd" * 32
DELTA = 1e-5
PLAN = [(1.0, 0.01, 1000)]  # PRV ε ≈ 1.84 alone, ≈ 2.6 twice
PLAN_B = [(2.0, 0.01, 500)]


@functools.cache
def one_run_budget(accountant: str = "prv") -> float:
    """A budget that admits PLAN once but not PLAN twice."""
    once = epsilon(PLAN, DELTA, accountant)
    twice = epsilon(PLAN + PLAN, DELTA, accountant)
    return (once + twice) / 2


def test_reserve_under_budget_writes_an_entry(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    assert ledger.entries() == [] and not ledger.path.exists()
    entry = ledger.reserve("run-1", PLAN, delta=DELTA, accountant="prv", budget_epsilon=10.0)
    assert isinstance(entry, LedgerEntry)
    assert (entry.run_id, entry.status, entry.steps_done) == ("run-1", "reserved", 0)
    assert entry.history == ((1.0, 0.01, 1000),) and entry.accountant == "prv"
    assert ledger.path == tmp_path / f"{DATASET}.json"
    assert ledger.entries() == [entry]
    # a fresh object reads the same from disk
    assert PrivacyLedger(tmp_path, DATASET).entries() == [entry]


def test_ledger_json_holds_only_the_schema_fields(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    ledger.reserve("run-1", PLAN + PLAN_B, delta=DELTA, accountant="prv", budget_epsilon=10.0)
    ledger.record_progress("run-1", 700)
    raw = json.loads(ledger.path.read_text())
    assert set(raw) == {"schema", "dataset", "entries"}
    assert raw["schema"] == 1 and raw["dataset"] == DATASET and len(raw["entries"]) == 1
    entry = raw["entries"][0]
    assert set(entry) == {"run_id", "status", "accountant", "delta", "history", "steps_done",
                          "started", "updated"}
    # the only list is the plan: one [σ, q, steps] per segment, no data
    assert entry["history"] == [[1.0, 0.01, 1000], [2.0, 0.01, 500]]
    assert all(not isinstance(v, (list, dict)) for k, v in entry.items() if k != "history")
    assert entry["steps_done"] == 700


def test_run_past_the_budget_is_refused_and_the_file_is_unchanged(tmp_path: Path) -> None:
    budget = one_run_budget()
    ledger = PrivacyLedger(tmp_path, DATASET)
    ledger.reserve("first-run", PLAN, delta=DELTA, accountant="prv", budget_epsilon=budget)
    ledger.complete("first-run", 1000)
    before = ledger.path.read_bytes()
    with pytest.raises(LedgerExceeded) as info:
        ledger.reserve("second-run", PLAN, delta=DELTA, accountant="prv", budget_epsilon=budget)
    assert isinstance(info.value, InputError)  # the CLI shows it as a user error
    message = str(info.value)
    spent = epsilon(PLAN, DELTA, "prv")
    total = epsilon(PLAN + PLAN, DELTA, "prv")
    assert "first-run (completed, 1000/1000 steps)" in message
    assert f"{spent:.4f}" in message and f"{total - spent:.4f}" in message
    assert f"{budget}" in message
    assert "privacy.dataset_budget_epsilon" in message and "finetune.epsilon" in message
    assert ledger.path.read_bytes() == before
    # a smaller run still fits
    small = [(1.0, 0.01, 10)]
    assert epsilon(PLAN + small, DELTA, "prv") <= budget
    ledger.reserve("small-run", small, delta=DELTA, accountant="prv", budget_epsilon=budget)
    assert [e.run_id for e in ledger.entries()] == ["first-run", "small-run"]


def test_crashed_run_still_counts_in_full(tmp_path: Path) -> None:
    budget = one_run_budget("rdp")
    ledger = PrivacyLedger(tmp_path, DATASET)
    ledger.reserve("crashed", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=budget)
    ledger.record_progress("crashed", 100)  # then the process died
    assert ledger.spent_epsilon(DELTA, "rdp") == epsilon(PLAN, DELTA, "rdp")
    with pytest.raises(LedgerExceeded, match=r"crashed \(reserved, 100/1000 steps\)"):
        ledger.reserve("next", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=budget)


def test_resume_with_the_same_run_id_is_not_counted_twice(tmp_path: Path) -> None:
    budget = one_run_budget("rdp")
    ledger = PrivacyLedger(tmp_path, DATASET)
    first = ledger.reserve("run-1", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=budget)
    ledger.record_progress("run-1", 400)
    before = ledger.path.read_bytes()
    again = ledger.reserve("run-1", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=budget)
    assert again.run_id == "run-1" and again.steps_done == 400 and again.started == first.started
    assert ledger.path.read_bytes() == before
    assert len(ledger.entries()) == 1
    assert ledger.spent_epsilon(DELTA, "rdp") == epsilon(PLAN, DELTA, "rdp")
    ledger.record_progress("run-1", 300)  # resumed from an earlier checkpoint
    assert ledger.entries()[0].steps_done == 400  # steps taken are never forgotten
    ledger.complete("run-1", 1000)
    assert ledger.entries()[0].status == "completed"
    # the same id with another plan is not a resume
    with pytest.raises(InputError, match="run-1.*another plan"):
        ledger.reserve("run-1", [(1.1, 0.01, 1000)], delta=DELTA, accountant="rdp",
                       budget_epsilon=budget)
    with pytest.raises(InputError, match="another plan"):
        ledger.reserve("run-1", PLAN, delta=DELTA, accountant="prv", budget_epsilon=budget)


def test_datasets_have_independent_ledgers(tmp_path: Path) -> None:
    budget = one_run_budget("rdp")
    a, b = PrivacyLedger(tmp_path, DATASET), PrivacyLedger(tmp_path, OTHER)
    a.reserve("run-a", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=budget)
    b.reserve("run-b", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=budget)
    assert [e.run_id for e in a.entries()] == ["run-a"]
    assert [e.run_id for e in b.entries()] == ["run-b"]
    assert a.path != b.path


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_spent_epsilon_composes_all_plans(tmp_path: Path, accountant: str) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    assert ledger.spent_epsilon(DELTA, accountant) == 0.0
    ledger.reserve("r1", PLAN, delta=DELTA, accountant=accountant, budget_epsilon=100.0)
    ledger.reserve("r2", PLAN_B, delta=DELTA, accountant=accountant, budget_epsilon=100.0)
    ledger.complete("r1", 1000)
    extra = [(3.0, 0.02, 50)]
    assert ledger.spent_epsilon(DELTA, accountant) == epsilon(PLAN + PLAN_B, DELTA, accountant)
    assert (ledger.spent_epsilon(DELTA, accountant, extra)
            == epsilon(PLAN + PLAN_B + extra, DELTA, accountant))
    if accountant == "rdp":  # the δ argument is used (PRV: same code path, slower)
        assert ledger.spent_epsilon(1e-6, "rdp") == epsilon(PLAN + PLAN_B, 1e-6, "rdp")


def _reserve_in_child(ledger_dir: str, run_id: str, budget: float, barrier, results) -> None:
    ledger = PrivacyLedger(Path(ledger_dir), DATASET)
    barrier.wait()  # both processes reserve at the same moment
    try:
        ledger.reserve(run_id, PLAN, delta=DELTA, accountant="prv", budget_epsilon=budget)
        results.put((run_id, "reserved"))
    except LedgerExceeded:
        results.put((run_id, "refused"))


def test_two_processes_cannot_both_reserve_the_last_budget(tmp_path: Path) -> None:
    budget = one_run_budget()
    # fork: the children start at once (spawn would re-import torch); they use
    # only numpy/scipy, so no thread pool crosses the fork
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_reserve_in_child, args=(str(tmp_path), f"p{i}", budget,
                                                         barrier, results))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    outcome = dict(results.get(timeout=5) for _ in procs)
    assert sorted(outcome.values()) == ["refused", "reserved"]
    winner = next(run for run, status in outcome.items() if status == "reserved")
    assert [e.run_id for e in PrivacyLedger(tmp_path, DATASET).entries()] == [winner]


@pytest.mark.parametrize("content", [
    b"{not json",
    b"",
    b'{"schema": 2, "dataset": "' + DATASET.encode() + b'", "entries": []}',
    b'{"schema": 1, "dataset": "' + OTHER.encode() + b'", "entries": []}',
    b'{"schema": 1, "dataset": "' + DATASET.encode() + b'", "entries": [{"run_id": "x"}]}',
])
def test_corrupt_ledger_is_an_input_error_never_a_reset(tmp_path: Path, content: bytes) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    ledger.path.write_bytes(content)
    for call in (ledger.entries, lambda: ledger.spent_epsilon(DELTA, "rdp"),
                 lambda: ledger.reserve("r", PLAN, delta=DELTA, accountant="rdp",
                                        budget_epsilon=100.0)):
        with pytest.raises(InputError, match=str(ledger.path)):
            call()
    assert ledger.path.read_bytes() == content


def test_progress_needs_a_reservation_and_a_plausible_step(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    with pytest.raises(InputError, match="no reservation"):
        ledger.record_progress("ghost", 1)
    ledger.reserve("r", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=100.0)
    with pytest.raises(InputError, match="steps_done"):
        ledger.complete("r", 1001)
    with pytest.raises(InputError, match="steps_done"):
        ledger.record_progress("r", -1)


@pytest.mark.parametrize("bad", ["../etc", "ABCDEF0123", "", "abc"])
def test_dataset_hash_must_be_hex(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InputError, match="dataset_hash"):
        PrivacyLedger(tmp_path, bad)


def test_reserve_rejects_bad_arguments(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    with pytest.raises(InputError, match="dataset_budget_epsilon"):
        ledger.reserve("r", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=0.0)
    with pytest.raises(InputError, match="empty"):
        ledger.reserve("r", [], delta=DELTA, accountant="rdp", budget_epsilon=1.0)
    with pytest.raises(InputError, match="noise_multiplier"):
        ledger.reserve("r", [(0.0, 0.01, 10)], delta=DELTA, accountant="rdp",
                       budget_epsilon=1.0)
    assert not ledger.path.exists()


# --------------------------------------------------------------------------- on S3


def test_ledger_on_s3_reserves_refuses_and_completes(s3) -> None:
    ledger_dir = s3.uri("ledgers")
    ledger = PrivacyLedger(ledger_dir, DATASET)
    assert ledger.path == f"{ledger_dir}/{DATASET}.json" and ledger.entries() == []
    budget = one_run_budget("rdp")
    ledger.reserve("run-1", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=budget)
    ledger.record_progress("run-1", 400)
    with pytest.raises(LedgerExceeded, match="Already spent"):
        PrivacyLedger(ledger_dir, DATASET).reserve("run-2", PLAN, delta=DELTA,
                                                   accountant="rdp", budget_epsilon=budget)
    ledger.complete("run-1", 1000)
    [entry] = PrivacyLedger(ledger_dir, DATASET).entries()
    assert (entry.run_id, entry.status, entry.steps_done) == ("run-1", "completed", 1000)
    raw = json.loads(s3.client.get_object(Bucket=s3.bucket,
                                          Key=f"ledgers/{DATASET}.json")["Body"].read())
    assert raw["schema"] == 1 and [e["run_id"] for e in raw["entries"]] == ["run-1"]


@pytest.mark.parametrize("budget", [100.0, None], ids=["room-for-both", "room-for-one"])
def test_ledger_on_s3_loses_no_entry_to_a_concurrent_writer(s3, monkeypatch, budget) -> None:
    """Run A reads the ledger, run B (another machine) reserves, then A writes: A's
    conditional write must fail, and A must re-read and re-check against B's entry."""
    from dpsynth.io import storage

    budget = budget or one_run_budget("rdp")
    ledger_dir = s3.uri("ledgers")
    real_read = storage.read_versioned
    reads = []

    def read_then_b_reserves(uri: str):
        got = real_read(uri)
        reads.append(uri)
        if len(reads) == 1:  # between A's read and A's write
            PrivacyLedger(ledger_dir, DATASET).reserve("run-b", PLAN, delta=DELTA,
                                                       accountant="rdp", budget_epsilon=budget)
        return got

    monkeypatch.setattr(storage, "read_versioned", read_then_b_reserves)
    ledger_a = PrivacyLedger(ledger_dir, DATASET)
    if budget == 100.0:
        ledger_a.reserve("run-a", PLAN, delta=DELTA, accountant="rdp", budget_epsilon=budget)
        assert [e.run_id for e in ledger_a.entries()] == ["run-b", "run-a"]
    else:
        with pytest.raises(LedgerExceeded):
            ledger_a.reserve("run-a", PLAN, delta=DELTA, accountant="rdp",
                             budget_epsilon=budget)
        assert [e.run_id for e in ledger_a.entries()] == ["run-b"]


def test_ledger_on_s3_keeps_every_entry_of_concurrent_runs(s3) -> None:
    # Four runs reserve at the same moment; each must land (conditional writes
    # retried). moto serialises little, so losing an entry here means a real bug.
    import threading

    ledger_dir = s3.uri("ledgers")
    barrier, errors = threading.Barrier(4), []

    def reserve(i: int) -> None:
        barrier.wait()
        try:
            PrivacyLedger(ledger_dir, DATASET).reserve(f"run-{i}", PLAN, delta=DELTA,
                                                       accountant="rdp", budget_epsilon=1e6)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(e.run_id for e in PrivacyLedger(ledger_dir, DATASET).entries()) == [
        f"run-{i}" for i in range(4)]


def test_a_killed_writers_temporary_file_goes_with_the_next_write(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    ledger.reserve("run-1", PLAN, delta=DELTA, accountant="prv", budget_epsilon=10.0)
    stale = tmp_path / f".{DATASET}.json.tmp-deadbeef"  # SIGKILLed mid-write
    stale.write_bytes(b'{"schema": 1, "entr')
    ledger.record_progress("run-1", 10)
    assert not stale.exists()
    assert ledger.entries()[0].steps_done == 10
