"""The privacy ledger: its key (the private images, whatever their sharding),
reservations before training, refusal past the dataset's budget (ε, δ) with a
message that gives no N-dependent number, composition at the budget's δ,
crashed and resumed runs, isolation per dataset, and two processes racing for
the last of a budget (PRIVACY.md rules 5 and 8)."""

from __future__ import annotations

import functools
import json
import multiprocessing
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dpsynth.errors import InputError
from dpsynth.io.shards import read_dataset, write_dataset
from dpsynth.privacy.accounting import epsilon
from dpsynth.privacy.ledger import (LedgerEntry, LedgerExceeded, PlannedRun, PrivacyLedger,
                                    dataset_key)

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning",
                                        "ignore::RuntimeWarning")

DATASET = "ab" * 32  # a sha256 hex digest
OTHER = "cd" * 32
DELTA = 1e-5
TARGET = 10.0  # finetune.epsilon of the test runs (public)
PLAN = [(1.0, 0.01, 1000)]  # PRV ε ≈ 1.84 alone, ≈ 2.59 twice
PLAN_B = [(2.0, 0.01, 500)]


def reserve(ledger: PrivacyLedger, run_id: str, plan: Any, *, budget: float,
            accountant: str = "rdp", delta: float = DELTA, budget_delta: float = DELTA,
            target: float = TARGET) -> LedgerEntry:
    return ledger.reserve(run_id, plan, delta=delta, accountant=accountant,
                          target_epsilon=target, budget_epsilon=budget,
                          budget_delta=budget_delta)


@functools.cache
def one_run_budget(accountant: str = "prv") -> float:
    """A budget that admits PLAN once but not PLAN twice."""
    once = epsilon(PLAN, DELTA, accountant)
    twice = epsilon(PLAN + PLAN, DELTA, accountant)
    return (once + twice) / 2


# --------------------------------------------------------------------------- the key


def _images(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_dataset_key_is_the_set_of_images() -> None:
    images = _images()
    key = dataset_key(images)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert dataset_key(images[::-1]) == key  # image order does not enter
    assert dataset_key(images[np.random.default_rng(1).permutation(40)]) == key
    changed = images.copy()
    changed[17, 3, 4, 0] ^= 1  # one pixel of one image
    others = {dataset_key(changed), dataset_key(images[1:]),  # a record removed
              dataset_key(np.concatenate([images, images[:1]])),  # a record added twice
              dataset_key(images.reshape(40, 4, 16, 1))}  # the same bytes, other images
    assert key not in others and len(others) == 4
    with pytest.raises(InputError, match="uint8"):
        dataset_key(images.astype(np.float32))


def test_re_sharding_the_same_images_keeps_the_ledger(tmp_path: Path) -> None:
    """The same private images written with another shard size, in another order and
    relabelled (another `prepare`) are the same people: the same ledger, the spent
    budget stays spent. The manifests' content hashes (the old key) differ."""
    images = _images(60)
    labels = np.arange(60) % 3
    a = write_dataset(tmp_path / "a", images, labels, ("x", "y", "z"), "pool private",
                      shard_size=25)
    order = np.random.default_rng(2).permutation(60)
    b = write_dataset(tmp_path / "b", images[order], (labels[order] + 1) % 3, ("x", "y", "z"),
                      "pool private (another prepare)", shard_size=7)
    assert a.content_hash != b.content_hash  # a ledger keyed by it would start afresh
    key_a, key_b = (dataset_key(read_dataset(tmp_path / d)[0]) for d in "ab")
    assert key_a == key_b
    budget = one_run_budget("rdp")
    reserve(PrivacyLedger(tmp_path / "ledger", key_a), "first", PLAN, budget=budget)
    with pytest.raises(LedgerExceeded):
        reserve(PrivacyLedger(tmp_path / "ledger", key_b), "after-re-preparing", PLAN,
                budget=budget)


# --------------------------------------------------------------------------- reservations


def test_reserve_under_budget_writes_an_entry(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    assert ledger.entries() == [] and not ledger.path.exists()
    assert ledger.budget_delta() is None
    entry = reserve(ledger, "run-1", PLAN, accountant="prv", budget=10.0, target=9.5)
    assert isinstance(entry, LedgerEntry)
    assert (entry.run_id, entry.status, entry.steps_done) == ("run-1", "reserved", 0)
    assert entry.history == ((1.0, 0.01, 1000),) and entry.accountant == "prv"
    assert entry.target_epsilon == 9.5 and entry.delta == DELTA
    assert ledger.path == tmp_path / f"{DATASET}.json"
    assert ledger.entries() == [entry] and ledger.budget_delta() == DELTA
    # a fresh object reads the same from disk
    assert PrivacyLedger(tmp_path, DATASET).entries() == [entry]


def test_ledger_json_holds_only_the_schema_fields(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    reserve(ledger, "run-1", PLAN + PLAN_B, delta=1e-6, budget=10.0)
    ledger.record_progress("run-1", 700)
    raw = json.loads(ledger.path.read_text())
    assert set(raw) == {"schema", "dataset", "budget_delta", "entries"}
    assert raw["schema"] == 2 and raw["dataset"] == DATASET and len(raw["entries"]) == 1
    assert raw["budget_delta"] == DELTA  # the budget's δ, not the run's
    entry = raw["entries"][0]
    assert set(entry) == {"run_id", "status", "accountant", "delta", "target_epsilon",
                          "history", "steps_done", "started", "updated"}
    # the only list is the plan: one [σ, q, steps] per segment, no data
    assert entry["history"] == [[1.0, 0.01, 1000], [2.0, 0.01, 500]]
    assert all(not isinstance(v, (list, dict)) for k, v in entry.items() if k != "history")
    assert (entry["steps_done"], entry["delta"], entry["target_epsilon"]) == (700, 1e-6, TARGET)


def test_run_past_the_budget_is_refused_and_the_file_is_unchanged(tmp_path: Path) -> None:
    budget = one_run_budget()
    ledger = PrivacyLedger(tmp_path, DATASET)
    reserve(ledger, "first-run", PLAN, accountant="prv", budget=budget)
    ledger.complete("first-run", 1000)
    before = ledger.path.read_bytes()
    with pytest.raises(LedgerExceeded) as info:
        reserve(ledger, "second-run", PLAN, accountant="prv", budget=budget, target=4.0)
    assert isinstance(info.value, InputError)  # the CLI shows it as a user error
    message = str(info.value)
    assert "first-run (completed, 1000/1000 steps, target ε = 10)" in message
    assert "This run (target ε = 4, 1000 steps)" in message
    assert f"(ε ≤ {budget:g}, δ = 1e-05)" in message
    assert "privacy.dataset_budget_epsilon" in message and "finetune.epsilon" in message
    assert "\n" not in message
    assert ledger.path.read_bytes() == before
    # a smaller run still fits
    small = [(1.0, 0.01, 10)]
    assert epsilon(PLAN + small, DELTA, "prv") <= budget
    reserve(ledger, "small-run", small, accountant="prv", budget=budget)
    assert [e.run_id for e in ledger.entries()] == ["first-run", "small-run"]


def _n_dependent_values(plans: list[Any], run: Any, deltas: tuple[float, ...],
                        budget: float) -> list[float]:
    """Every ε a refusal could give away: composed, per run, of this run, remaining."""
    values = []
    for delta in deltas:
        for accountant in ("prv", "rdp"):
            spent = epsilon([s for p in plans for s in p], delta, accountant)
            total = epsilon([s for p in plans for s in p] + run, delta, accountant)
            values += [spent, total, total - spent, budget - spent, budget - total,
                       epsilon(run, delta, accountant)]
            values += [epsilon(p, delta, accountant) for p in plans]
    return values


def test_the_refusal_states_no_n_dependent_number(tmp_path: Path) -> None:
    """PRIVACY.md rule 8: the composed ε follows N through the calibration, so the
    message (stderr, a log) states the public budget, runs and targets only."""
    n = 1234  # a private split's size: q = B/N, σ calibrated to the target for it
    q = 32 / n
    plans = [[(1.5, q, 300)], [(2.0, q, 400)]]
    run = [(1.2, q, 300)]
    budget = 2.5
    ledger = PrivacyLedger(tmp_path, DATASET)
    for i, plan in enumerate(plans):
        reserve(ledger, f"run-{i}", plan, accountant="prv", budget=budget, target=1.25)
    ledger.record_progress("run-1", 150)  # crashed
    assert epsilon([s for p in plans for s in p] + run, DELTA, "prv") > budget
    with pytest.raises(LedgerExceeded) as info:
        reserve(ledger, "run-2", run, accountant="prv", budget=budget, delta=1e-6, target=1.0)
    message = str(info.value)
    for value in _n_dependent_values(plans, run, (DELTA, 1e-6), budget) + [q, 1.2]:
        for digits in range(2, 7):
            shown = f"{value:.{digits}f}"
            assert shown not in message, (shown, message)
    for number in (str(n), f"{q:g}", f"{q:.3g}"):
        assert number not in message
    # what it does state: the budget, the runs on record, this run's target, the fix
    for part in ("(ε ≤ 2.5, δ = 1e-05)", "2 run(s) on record",
                 "run-0 (reserved, 0/300 steps, target ε = 1.25)",
                 "run-1 (reserved, 150/400 steps, target ε = 1.25)",
                 "This run (target ε = 1, 300 steps)", "lower finetune.epsilon",
                 "privacy.dataset_budget_epsilon", "privacy.dataset_budget_delta",
                 "counts in full"):
        assert part in message, part


def test_delta_above_the_budget_delta_is_refused_before_anything(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    with pytest.raises(InputError) as info:
        reserve(ledger, "r", PLAN, budget=100.0, delta=1e-4, budget_delta=1e-5)
    message = str(info.value)
    assert "finetune.delta=0.0001" in message and "privacy.dataset_budget_delta=1e-05" in message
    assert "Lower finetune.delta to at most 1e-05" in message
    assert not ledger.path.exists()
    reserve(ledger, "r", PLAN, budget=100.0, delta=1e-5, budget_delta=1e-5)  # equal: fine


def test_the_budget_delta_of_a_dataset_never_changes(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    reserve(ledger, "first", PLAN, budget=100.0, delta=1e-6, budget_delta=1e-5)
    before = ledger.path.read_bytes()
    for changed in (1e-4, 1e-6):  # larger (less protection) or smaller: both refused
        with pytest.raises(InputError) as info:
            reserve(ledger, "second", PLAN, budget=100.0, delta=1e-6, budget_delta=changed)
        message = str(info.value)
        assert f"privacy.dataset_budget_delta={changed!r}" in message
        assert "never changes" in message and "Set privacy.dataset_budget_delta=1e-05" in message
        with pytest.raises(InputError, match="never changes"):  # a resume neither
            reserve(ledger, "first", PLAN, budget=100.0, delta=1e-6, budget_delta=changed)
    assert ledger.path.read_bytes() == before
    assert ledger.budget_delta() == 1e-5


def test_every_run_is_composed_at_the_budget_delta(tmp_path: Path) -> None:
    """Runs at δ = 1e-7 on a budget of δ = 1e-5: the ledger composes them at 1e-5.
    Composed at their own δ they would not fit (so this fails if it did that)."""
    at_budget = epsilon(PLAN + PLAN, 1e-5, "rdp")
    at_run = epsilon(PLAN + PLAN, 1e-7, "rdp")
    budget = 3.0
    assert at_budget < budget < at_run
    ledger = PrivacyLedger(tmp_path, DATASET)
    reserve(ledger, "a", PLAN, budget=budget, delta=1e-7, budget_delta=1e-5)
    reserve(ledger, "b", PLAN, budget=budget, delta=1e-7, budget_delta=1e-5)
    assert [e.delta for e in ledger.entries()] == [1e-7, 1e-7]
    assert ledger.spent_epsilon(ledger.budget_delta(), "rdp") == at_budget
    # and the budget δ binds for every later run: a third does not fit at 1e-5
    assert epsilon(PLAN * 3, 1e-5, "rdp") > budget
    with pytest.raises(LedgerExceeded, match=r"δ = 1e-05"):
        reserve(ledger, "c", PLAN, budget=budget, delta=1e-7, budget_delta=1e-5)


def test_a_tighter_budget_delta_binds_a_run_at_that_delta(tmp_path: Path) -> None:
    """The converse: with the budget at δ = 1e-7, runs are composed at 1e-7 (a
    composition at a larger δ would admit the second run)."""
    budget = 3.0
    assert epsilon(PLAN + PLAN, 1e-5, "rdp") < budget < epsilon(PLAN + PLAN, 1e-7, "rdp")
    ledger = PrivacyLedger(tmp_path, DATASET)
    reserve(ledger, "a", PLAN, budget=budget, delta=1e-7, budget_delta=1e-7)
    with pytest.raises(LedgerExceeded):
        reserve(ledger, "b", PLAN, budget=budget, delta=1e-7, budget_delta=1e-7)


def test_crashed_run_still_counts_in_full(tmp_path: Path) -> None:
    budget = one_run_budget("rdp")
    ledger = PrivacyLedger(tmp_path, DATASET)
    reserve(ledger, "crashed", PLAN, budget=budget)
    ledger.record_progress("crashed", 100)  # then the process died
    assert ledger.spent_epsilon(DELTA, "rdp") == epsilon(PLAN, DELTA, "rdp")
    with pytest.raises(LedgerExceeded, match=r"crashed \(reserved, 100/1000 steps"):
        reserve(ledger, "next", PLAN, budget=budget)


def test_resume_with_the_same_run_id_is_not_counted_twice(tmp_path: Path) -> None:
    budget = one_run_budget("rdp")
    ledger = PrivacyLedger(tmp_path, DATASET)
    first = reserve(ledger, "run-1", PLAN, budget=budget)
    ledger.record_progress("run-1", 400)
    before = ledger.path.read_bytes()
    again = reserve(ledger, "run-1", PLAN, budget=budget)
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
        reserve(ledger, "run-1", [(1.1, 0.01, 1000)], budget=budget)
    with pytest.raises(InputError, match="another plan"):
        reserve(ledger, "run-1", PLAN, accountant="prv", budget=budget)
    with pytest.raises(InputError, match="another plan"):
        reserve(ledger, "run-1", PLAN, delta=1e-6, budget=budget)


def test_datasets_have_independent_ledgers(tmp_path: Path) -> None:
    budget = one_run_budget("rdp")
    a, b = PrivacyLedger(tmp_path, DATASET), PrivacyLedger(tmp_path, OTHER)
    reserve(a, "run-a", PLAN, budget=budget)
    reserve(b, "run-b", PLAN, budget=budget, budget_delta=1e-6, delta=1e-6)
    assert [e.run_id for e in a.entries()] == ["run-a"]
    assert [e.run_id for e in b.entries()] == ["run-b"]
    assert (a.budget_delta(), b.budget_delta()) == (1e-5, 1e-6)
    assert a.path != b.path


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_spent_epsilon_composes_all_plans(tmp_path: Path, accountant: str) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    assert ledger.spent_epsilon(DELTA, accountant) == 0.0
    reserve(ledger, "r1", PLAN, accountant=accountant, budget=100.0)
    reserve(ledger, "r2", PLAN_B, accountant=accountant, budget=100.0)
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
        reserve(ledger, run_id, PLAN, accountant="prv", budget=budget)
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


ENTRY = {"run_id": "x", "status": "completed", "accountant": "rdp", "delta": 1e-5,
         "target_epsilon": 10.0, "history": [[1.0, 0.01, 10]], "steps_done": 10,
         "started": "2024-01-01T00:00:00+00:00", "updated": "2024-01-01T00:00:00+00:00"}


def _ledger_bytes(**fields: Any) -> bytes:
    return json.dumps({"schema": 2, "dataset": DATASET, "budget_delta": 1e-5,
                       "entries": [ENTRY]} | fields).encode()


@pytest.mark.parametrize("content", [
    b"{not json",
    b"",
    b"[]",
    _ledger_bytes(schema=3),
    _ledger_bytes(dataset=OTHER),
    _ledger_bytes(budget_delta=None),
    _ledger_bytes(budget_delta=1.5),
    _ledger_bytes(entries=[{"run_id": "x"}]),
    _ledger_bytes(entries=[{k: v for k, v in ENTRY.items() if k != "target_epsilon"}]),
    _ledger_bytes(extra="field"),
], ids=["not-json", "empty", "a-list", "schema-3", "other-dataset", "no-budget-delta",
        "budget-delta-out-of-range", "bad-entry", "entry-without-target", "unknown-field"])
def test_corrupt_ledger_is_an_input_error_never_a_reset(tmp_path: Path, content: bytes) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    ledger.path.write_bytes(content)
    for call in (ledger.entries, ledger.budget_delta,
                 lambda: ledger.spent_epsilon(DELTA, "rdp"),
                 lambda: reserve(ledger, "r", PLAN, budget=100.0)):
        with pytest.raises(InputError, match=re.escape(str(ledger.path))):
            call()
    assert ledger.path.read_bytes() == content


def test_the_valid_control_of_the_corrupt_ledgers_is_read(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    ledger.path.write_bytes(_ledger_bytes())
    assert [e.run_id for e in ledger.entries()] == ["x"] and ledger.budget_delta() == 1e-5


SCHEMA_1 = {"schema": 1, "dataset": OTHER, "entries": [
    {k: v for k, v in ENTRY.items() if k != "target_epsilon"}]}


def test_a_schema_1_ledger_is_refused_with_how_to_convert_it(tmp_path: Path) -> None:
    """A ledger of an older dpsynth (keyed by the manifest, composed at each run's δ)
    is neither read as empty nor converted silently: its runs still count."""
    for path, ledger in ((tmp_path / f"{DATASET}.json", PrivacyLedger(tmp_path, DATASET)),
                         # found under the manifest's hash, the old key, while the images'
                         # key has no ledger yet
                         (tmp_path / f"{OTHER}.json",
                          PrivacyLedger(tmp_path, DATASET, legacy_key=OTHER))):
        for f in tmp_path.glob("*.json"):
            f.unlink()
        path.write_text(json.dumps(SCHEMA_1 | {"dataset": path.stem}))
        before = path.read_bytes()
        for call in (ledger.entries, lambda: reserve(ledger, "r", PLAN, budget=100.0)):
            with pytest.raises(InputError) as info:
                call()
            message = str(info.value)
            assert message.startswith(f"{path}: a privacy ledger of schema 1"), message
            assert "still count" in message and "Convert it by hand" in message
            assert str(ledger.path) in message and "budget_delta" in message
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.glob("*.json")) == [path.name]
    # once converted (the images' ledger exists), the old file is not read
    converted = PrivacyLedger(tmp_path, DATASET, legacy_key=OTHER)
    converted.path.write_bytes(_ledger_bytes())
    assert [e.run_id for e in converted.entries()] == ["x"]
    # a legacy key without a ledger there changes nothing
    assert PrivacyLedger(tmp_path / "fresh", DATASET, legacy_key=OTHER).entries() == []


def test_progress_needs_a_reservation_and_a_plausible_step(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    with pytest.raises(InputError, match="no reservation"):
        ledger.record_progress("ghost", 1)
    reserve(ledger, "r", PLAN, budget=100.0)
    with pytest.raises(InputError, match="steps_done"):
        ledger.complete("r", 1001)
    with pytest.raises(InputError, match="steps_done"):
        ledger.record_progress("r", -1)


@pytest.mark.parametrize("bad", ["../etc", "ABCDEF0123", "", "abc"])
def test_dataset_key_must_be_hex(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InputError, match="dataset"):
        PrivacyLedger(tmp_path, bad)
    with pytest.raises(InputError, match="legacy_key"):
        PrivacyLedger(tmp_path, DATASET, legacy_key=bad)


def test_reserve_rejects_bad_arguments(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    with pytest.raises(InputError, match="dataset_budget_epsilon"):
        reserve(ledger, "r", PLAN, budget=0.0)
    for bad in (0.0, 1.0, None):
        with pytest.raises(InputError, match="dataset_budget_delta"):
            reserve(ledger, "r", PLAN, budget=1.0, budget_delta=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="finetune.epsilon"):
        reserve(ledger, "r", PLAN, budget=1.0, target=0.0)
    with pytest.raises(InputError, match="finetune.delta"):
        reserve(ledger, "r", PLAN, budget=1.0, delta=0.0)
    with pytest.raises(InputError, match="empty"):
        reserve(ledger, "r", [], budget=1.0)
    with pytest.raises(InputError, match="noise_multiplier"):
        reserve(ledger, "r", [(0.0, 0.01, 10)], budget=1.0)
    assert not ledger.path.exists()


# --------------------------------------------------------------------------- on S3


def test_ledger_on_s3_reserves_refuses_and_completes(s3) -> None:
    ledger_dir = s3.uri("ledgers")
    ledger = PrivacyLedger(ledger_dir, DATASET)
    assert ledger.path == f"{ledger_dir}/{DATASET}.json" and ledger.entries() == []
    budget = one_run_budget("rdp")
    reserve(ledger, "run-1", PLAN, budget=budget)
    ledger.record_progress("run-1", 400)
    with pytest.raises(LedgerExceeded, match=r"1 run\(s\) on record: run-1 \(reserved"):
        reserve(PrivacyLedger(ledger_dir, DATASET), "run-2", PLAN, budget=budget)
    with pytest.raises(InputError, match="never changes"):
        reserve(PrivacyLedger(ledger_dir, DATASET), "run-2", PLAN, budget=100.0,
                budget_delta=1e-4)
    ledger.complete("run-1", 1000)
    [entry] = PrivacyLedger(ledger_dir, DATASET).entries()
    assert (entry.run_id, entry.status, entry.steps_done) == ("run-1", "completed", 1000)
    raw = json.loads(s3.client.get_object(Bucket=s3.bucket,
                                          Key=f"ledgers/{DATASET}.json")["Body"].read())
    assert raw["schema"] == 2 and raw["budget_delta"] == DELTA
    assert [e["run_id"] for e in raw["entries"]] == ["run-1"]


def test_a_schema_1_ledger_on_s3_is_refused(s3) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key=f"ledgers/{OTHER}.json",
                         Body=json.dumps(SCHEMA_1).encode())
    ledger = PrivacyLedger(s3.uri("ledgers"), DATASET, legacy_key=OTHER)
    with pytest.raises(InputError, match="schema 1"):
        reserve(ledger, "r", PLAN, budget=100.0)
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert keys == [f"ledgers/{OTHER}.json"]


@pytest.mark.parametrize("budget", [100.0, None], ids=["room-for-both", "room-for-one"])
def test_ledger_on_s3_loses_no_entry_to_a_concurrent_writer(s3, monkeypatch, budget) -> None:
    """Run A reads the ledger, run B (another machine) reserves, then A writes: A's
    conditional write must fail, and A must re-read and re-check against B's entry."""
    from dpsynth.io import s3 as s3_io

    budget = budget or one_run_budget("rdp")
    ledger_dir = s3.uri("ledgers")
    real_read = s3_io.read_versioned
    reads = []

    def read_then_b_reserves(uri: str):
        got = real_read(uri)
        reads.append(uri)
        if len(reads) == 1:  # between A's read and A's write
            reserve(PrivacyLedger(ledger_dir, DATASET), "run-b", PLAN, budget=budget)
        return got

    monkeypatch.setattr(s3_io, "read_versioned", read_then_b_reserves)
    ledger_a = PrivacyLedger(ledger_dir, DATASET)
    if budget == 100.0:
        reserve(ledger_a, "run-a", PLAN, budget=budget)
        assert [e.run_id for e in ledger_a.entries()] == ["run-b", "run-a"]
    else:
        with pytest.raises(LedgerExceeded):
            reserve(ledger_a, "run-a", PLAN, budget=budget)
        assert [e.run_id for e in ledger_a.entries()] == ["run-b"]


def test_ledger_on_s3_keeps_every_entry_of_concurrent_runs(s3) -> None:
    # Four runs reserve at the same moment; each must land (conditional writes
    # retried). moto serialises little, so losing an entry here means a real bug.
    import threading

    ledger_dir = s3.uri("ledgers")
    barrier, errors = threading.Barrier(4), []

    def run(i: int) -> None:
        barrier.wait()
        try:
            reserve(PrivacyLedger(ledger_dir, DATASET), f"run-{i}", PLAN, budget=1e6)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(e.run_id for e in PrivacyLedger(ledger_dir, DATASET).entries()) == [
        f"run-{i}" for i in range(4)]


def test_a_killed_writers_temporary_file_goes_with_the_next_write(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    reserve(ledger, "run-1", PLAN, accountant="prv", budget=10.0)
    stale = tmp_path / f".{DATASET}.json.tmp-deadbeef"  # SIGKILLed mid-write
    stale.write_bytes(b'{"schema": 2, "entr')
    ledger.record_progress("run-1", 10)
    assert not stale.exists()
    assert ledger.entries()[0].steps_done == 10


def test_module_doctests() -> None:
    import doctest

    from dpsynth.privacy import ledger

    assert doctest.testmod(ledger).failed == 0


# --------------------------------------------------------------------------- several runs at once


def _all(ledger: PrivacyLedger, ids: list[str], *, budget: float) -> list[LedgerEntry]:
    runs = [PlannedRun(i, tuple(PLAN), DELTA, t) for i, t in zip(ids, (1.0, 2.0, 5.0))]
    return ledger.reserve_all(runs, accountant="prv", budget_epsilon=budget,
                              budget_delta=DELTA, what="This sweep")


def test_reserve_all_is_one_check_of_every_run_and_refuses_them_whole(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DATASET)
    # one PLAN fits one_run_budget, two do not: a two-run sweep is refused whole
    with pytest.raises(LedgerExceeded) as refusal:
        _all(ledger, ["s-1", "s-2"], budget=one_run_budget())
    assert ledger.entries() == [] and not (tmp_path / f"{DATASET}.json").exists()
    message = str(refusal.value)
    assert "This sweep (2 runs at target ε = 1, 2, 2000 steps in all" in message
    assert "needs up to ε = 3 of the budget" in message
    assert "drop points from sweep.epsilons" in message
    # within the budget: all reserved, in order; reserving them again counts them once
    entries = _all(ledger, ["s-1", "s-2"], budget=100)
    assert [e.run_id for e in entries] == ["s-1", "s-2"]
    assert _all(ledger, ["s-1", "s-2"], budget=100) == entries == ledger.entries()
    # a resumed id in a new set: only the new run is checked and added
    assert [e.run_id for e in _all(ledger, ["s-2", "s-3"], budget=100)] == ["s-2", "s-3"]
    assert len(ledger.entries()) == 3
    assert ledger.spent_epsilon(DELTA, "prv") == pytest.approx(epsilon(PLAN * 3, DELTA, "prv"))
    with pytest.raises(InputError, match="repeat"):
        _all(ledger, ["s-4", "s-4"], budget=100)
