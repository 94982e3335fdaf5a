"""`dpsynth report` on a small, complete set of stage outputs laid out as `dvc repro`
lays them out: real digits splits (the `digits_eval_dirs` / `digits_public_dir`
fixtures), a DP model's privacy.json and a privacy ledger with a real plan, and
each stage's files with real plots. The page's numbers, its "not run" sections,
and what it must never hold: a private image, the private split's size, q or σ.
"""

from __future__ import annotations

import base64
import doctest
import html as html_lib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from dpsynth import cli
from dpsynth.config import Config
from dpsynth.errors import InputError
from dpsynth.io.shards import read_dataset, read_manifest
from dpsynth.plots import (plot_accuracy_curve, plot_audit_roc, plot_loss, plot_privacy_utility,
                           plot_rank_scatter)
from dpsynth.privacy import accounting
from dpsynth.privacy.ledger import PrivacyLedger, dataset_key
from dpsynth.report import page, statement
from dpsynth.stages import report
from dpsynth.summary import summarize
from dpsynth.tracking import NullTracker

REPO = Path(__file__).resolve().parents[2]
BATCH, STEPS, SIGMA, DELTA = 24, 6, 1.234567, 1e-5
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _stage_files(folder: Path, stage: str, params: dict[str, Any],
                 metrics: dict[str, Any] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "params.json", {"seed": 0} | params)
    _write_json(folder / "version.json", {"stage": stage, "dpsynth": "0.1.0",
                                          "git_commit": "0123abc"})
    if metrics is not None:
        _write_json(folder / "metrics.json", metrics)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, digits_eval_dirs: dict[str, Path],
           digits_public_dir: Path) -> dict[str, Any]:
    """`<root>/artifacts/...` as `dvc repro` writes it, the ledger in `<root>/ledger`.
    Read-only for tests."""
    root = tmp_path_factory.mktemp("report-inputs")
    art = root / "artifacts"
    for split, source in (("public", digits_public_dir), ("test", digits_eval_dirs["test"]),
                          ("private", digits_eval_dirs["private"])):
        shutil.copytree(source, art / "prepare" / split)
    n_private = read_manifest(art / "prepare" / "private").count
    q = BATCH / n_private  # what finetune computes from the private size
    eps = accounting.epsilon([(SIGMA, q, STEPS)], DELTA, "rdp")
    privacy = {"epsilon": eps, "delta": DELTA, "noise_multiplier": SIGMA, "sample_rate": q,
               "steps": STEPS, "aug_multiplicity": 2, "max_grad_norm": 1.0,
               "accountant": "rdp", "sampler": "poisson", "seeded_for_test": False}
    ledger = PrivacyLedger(root / "ledger", _private_key(art))
    ledger.reserve("run-1", [(SIGMA, q, STEPS)], delta=DELTA, accountant="rdp",
                   target_epsilon=10.0, budget_epsilon=30, budget_delta=DELTA)
    ledger.complete("run-1", STEPS)

    pre = art / "pretrain"
    _stage_files(pre, "pretrain", {}, {"steps": 20, "final_loss": 0.4321})
    plot_loss([[5, 1.0], [10, 0.7], [20, 0.43]], pre / "loss.png", "Pre-training loss")
    fine = art / "finetune"
    _stage_files(fine, "finetune", {"finetune": {"epsilon": 10.0, "batch_size": BATCH},
                                    "privacy": {"dataset_budget_epsilon": 30.0,
                                                "dataset_budget_delta": DELTA}},
                 {"epsilon": 10.0, "delta": DELTA, "steps": STEPS, "final_public_loss": 0.4,
                  "dataset_runs": 1})
    _write_json(fine / "privacy.json", privacy)
    plot_loss([[2, 0.5], [4, 0.45], [6, 0.4]], fine / "loss.png", "DP fine-tuning")
    sample = art / "sample"
    shutil.copytree(digits_eval_dirs["synthetic"], sample)  # stands in for the samples
    _stage_files(sample, "sample", {}, {"num_samples": 400})
    _write_json(sample / "privacy.json", privacy)
    fid = art / "fid"
    _stage_files(fid, "fid", {}, {
        "num_synthetic": 400, "fd_digits_cnn": 0.123456, "kid_digits_cnn_mean": 0.0123,
        "kid_digits_cnn_std": 0.0021, "precision_digits_cnn": 0.6543,
        "recall_digits_cnn": 0.7123, "domain_cnn_real_test_accuracy": 0.91})
    _write_json(fid / "extractors.json", [{"name": "digits_cnn"}])
    cls = art / "classify"
    _stage_files(cls, "classify", {}, {
        "real_test_accuracy": 0.8123, "num_synthetic": 400,
        "nonprivate_baseline_real_test_accuracy": 0.9456})
    (cls / "curve.csv").write_text("num_synthetic,real_test_accuracy\n200,0.7012\n400,0.8123\n")
    plot_accuracy_curve([200, 400], [0.7012, 0.8123], cls / "curve.png", baseline=0.9456)
    _stage_files(art / "baseline", "baseline", {}, {
        "epsilon": 0.0, "public_only_real_test_accuracy": 0.6512, "public_only_num_synthetic": 400,
        "public_only_fd_digits_cnn": 2.4681})
    # the sweep: public only, one swept point (epsilon 2, its samples) and this run's
    curve = art / "sweep"
    _stage_files(curve, "sweep", {}, {
        "epsilons": [2.0, 10.0], "this_run_epsilon": 10.0,
        "public_only_real_test_accuracy": 0.6512, "public_only_fd_digits_cnn": 2.4681,
        "nonprivate_baseline_real_test_accuracy": 0.9456, "distance": "fd_digits_cnn",
        "real_test_accuracy_eps-2": 0.7312, "real_test_accuracy_eps-10": 0.8123})
    (curve / "curve.csv").write_text(
        "epsilon,real_test_accuracy,frechet_distance,source\n0,0.6512,2.4681,public only\n"
        "2.0,0.7312,1.3579,DP: sweep\n10.0,0.8123,0.123456,DP: this run\n")
    plot_privacy_utility([2.0, 10.0], [0.7312, 0.8123], [1.3579, 0.123456], curve / "curve.png",
                         public_accuracy=0.6512, public_distance=2.4681, real_accuracy=0.9456,
                         distance_name="digits_cnn", this_run=10.0)
    (curve / "eps-2").mkdir()
    shutil.copy(fine / "loss.png", curve / "eps-2" / "grid.png")  # stands in for its samples
    rank = art / "rank"
    grid = [{"depth": 10, "widen": 1, "lr": lr, "epochs": 2, "augment": "crop"}
            for lr in (0.05, 0.01, 0.005)]
    _stage_files(rank, "rank", {"rank": {"grid": grid}}, {
        "spearman_rho": 0.5, "kendall_tau": 1 / 3, "spearman_rho_ci_low": -0.5,
        "spearman_rho_ci_high": 1.0, "kendall_tau_ci_low": -1 / 3, "kendall_tau_ci_high": 1.0,
        "ci_confidence": 0.95, "regret": 0.0123, "chosen_config": 1,
        "chosen_real_test_accuracy": 0.8, "best_real_test_accuracy": 0.8123, "num_configs": 3})
    (rank / "scores.csv").write_text("config,synthetic_val_accuracy,real_test_accuracy\n"
                                     "0,0.7,0.8123\n1,0.9,0.8\n2,0.6,0.7\n")
    plot_rank_scatter([0.7, 0.9, 0.6], [0.8123, 0.8, 0.7], 1, rank / "scatter.png", "rank")
    audit = art / "audit"
    _stage_files(audit, "audit", {}, {
        # the claim is the public target; the twin's own accounted epsilon is public too
        "claimed_epsilon": 10.0, "delta": DELTA, "audit_epsilon": 9.871, "num_canaries": 32,
        "confidence": 0.95,
        "membership_epsilon_lower_bound": 0.0321, "membership_auc": 0.51,
        "membership_tpr_at_1pct_fpr": 0.0, "membership_tpr_at_5pct_fpr": 0.05,
        # 32 canaries certify at most 2.2 < 10: inconclusive at the claim; the check
        # twin at epsilon 1 passed
        "audit_max_certifiable_epsilon": 2.2, "audit_status": "inconclusive",
        "audit_status_reason": "inconclusive at epsilon = 9.87", "audit_passed": False,
        "check_epsilon": 0.987, "check_epsilon_lower_bound": 0.1234, "check_auc": 0.55,
        "check_tpr_at_1pct_fpr": 0.0, "check_tpr_at_5pct_fpr": 0.06, "check_status": "passed",
        "control_epsilon_lower_bound": 2.3456, "control_auc": 0.99,
        "control_tpr_at_1pct_fpr": 0.6, "control_tpr_at_5pct_fpr": 0.8, "audit_has_power": True,
        "memorized_fraction": 0.0, "heldout_memorized_fraction": 0.0,
        "nn_distance_private_median": 2.9, "nn_distance_heldout_median": 2.95,
        "closer_to_private_fraction": 0.49})
    plot_audit_roc([("DP twin", [0, 0.5, 1], [0, 0.5, 1])], audit / "roc.png", "audit")
    return {"root": root, "art": art, "privacy": privacy, "n_private": n_private,
            "ledger_dir": root / "ledger"}


def _private_key(art: Path) -> str:
    """The privacy ledger's key of the layout's private split (its images)."""
    return dataset_key(read_dataset(art / "prepare" / "private")[0])


@pytest.fixture
def cfg(make_cfg: Callable[..., Config], layout: dict[str, Any]) -> Callable[..., Config]:
    def make(*overrides: str) -> Config:
        return make_cfg(f"privacy.ledger_dir={layout['ledger_dir']}",
                        "privacy.dataset_budget_epsilon=30", "report.examples_per_class=3",
                        *overrides)

    return make


def _report(cfg: Config, layout: dict[str, Any], out: Path, *, names: tuple[str, ...] = (),
            private: bool = True, tracker: NullTracker | None = None
            ) -> tuple[report.ReportResult, str]:
    art = layout["art"]
    result = report.run(
        cfg, artifacts=report.artifact_paths(art, names or tuple(report.LAYOUT)),
        private_dir=art / report.PRIVATE if private else None,
        out_dir=out, tracker=tracker or NullTracker())
    return result, result.index.read_text()


def _text(html: str) -> str:
    """What a reader sees: tags and embedded images dropped, entities decoded, white
    space collapsed to single spaces (table cells are space-separated)."""
    inline = re.sub(r"</?(?:span|sup|strong|code)\b[^>]*>", "", DATA_URI.sub("", html))
    return " ".join(html_lib.unescape(re.sub(r"<[^>]+>", " ", inline)).split())


def _embedded(html: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(m)))) for m in
            DATA_URI.findall(html)]


def test_privacy_statement_states_the_numbers_and_the_ledger(cfg, layout, tmp_path) -> None:
    tracker = NullTracker()
    result, html = _report(cfg(), layout, tmp_path / "report", tracker=tracker)
    # the guarantee stated is the configured target (10), which the accounted
    # epsilon (privacy.json, a function of N) never exceeds; the latter is not stated
    text, eps, accounted = _text(html), 10.0, layout["privacy"]["epsilon"]
    assert f"(ε = {eps:.2f}, δ = 1e-5)-differentially private" in text
    assert f"{accounted:.2f}" not in text and f"{accounted:.3g}" not in text
    for expected in (f"Privacy guarantee (ε, δ) ({eps:.2f}, 1e-5)",
                     "the exact accounted ε is not stated",
                     "RDP: Rényi differential privacy",
                     "Poisson sampling, expected batch size B = 24",
                     "Clipping norm C 1 ", "Augmentation multiplicity K 2 ", "Steps 6 ",
                     "1 run on record, composed within the budget (ε ≤ 30, δ = 1e-5); "
                     "crashed runs count in full", "operating system's entropy source",
                     "eε ≈ " + statement.odds_factor_text(eps)):
        assert expected in text, expected
    assert "Test run" not in text and result.epsilon == eps
    assert result.budget == statement.Budget(1, 30.0, DELTA, within=True, read_now=True)
    # what is protected, and what is not, in words
    assert "Each image of the private dataset (digits)" in text
    assert "The real test split" in text and "non-private baseline accuracy" in text
    assert tracker.artifacts == [result.index] and tracker.params["report.examples_per_class"] == 3


def _budget_row(html: str) -> str:
    text = _text(html)
    return text[text.index("Dataset budget (privacy ledger)"):text.index("Noise seeded for a test")]


def test_a_second_run_on_the_dataset_is_counted(cfg, layout, tmp_path) -> None:
    ledger_dir = tmp_path / "ledger"
    shutil.copytree(layout["ledger_dir"], ledger_dir)
    q = BATCH / layout["n_private"]
    PrivacyLedger(ledger_dir, _private_key(layout["art"])).reserve(
        "run-2", [(SIGMA, q, STEPS)], delta=DELTA, accountant="rdp", target_epsilon=10.0,
        budget_epsilon=30, budget_delta=DELTA)  # a crashed run: counts in full
    result, html = _report(cfg(f"privacy.ledger_dir={ledger_dir}"), layout, tmp_path / "r")
    assert result.budget == statement.Budget(2, 30.0, DELTA, within=True, read_now=True)
    assert ("2 runs on record, composed within the budget (ε ≤ 30, δ = 1e-5); crashed runs "
            "count in full") in _budget_row(html)


def test_the_budget_row_states_no_n_dependent_number(cfg, layout, tmp_path) -> None:
    """PRIVACY.md rule 8: the composed ε follows N through the calibration, so the
    budget row states the public budget and the run count, never a composed ε.
    Checked on a ledger of two runs (the composed ε differs from the model's)."""
    ledger_dir = tmp_path / "ledger"
    shutil.copytree(layout["ledger_dir"], ledger_dir)
    q = BATCH / layout["n_private"]
    second = [(2 * SIGMA, q, 3 * STEPS)]
    PrivacyLedger(ledger_dir, _private_key(layout["art"])).reserve(
        "run-2", second, delta=1e-6, accountant="rdp", target_epsilon=10.0, budget_epsilon=30,
        budget_delta=DELTA)
    spent = []
    for delta in (DELTA, 1e-6):
        for accountant in ("rdp", "prv"):
            both = accounting.epsilon([(SIGMA, q, STEPS)] + second, delta, accountant)
            alone = accounting.epsilon(second, delta, accountant)
            spent += [both, alone, 30 - both]
    for budget_eps in (30, 2):  # within, and past a budget lowered after the runs
        _, html = _report(cfg(f"privacy.ledger_dir={ledger_dir}",
                              f"privacy.dataset_budget_epsilon={budget_eps}"),
                          layout, tmp_path / f"r{budget_eps}")
        row = _budget_row(html)
        assert f"2 runs on record, composed {'within' if budget_eps == 30 else 'past'}" in row
        for value in spent:
            for digits in range(2, 7):
                assert f"{value:.{digits}f}" not in _text(html), (value, digits)
        assert f"{q:.4g}" not in row and str(layout["n_private"]) not in row


def test_without_the_private_split_the_recorded_count_is_stated(cfg, layout, tmp_path) -> None:
    result, html = _report(cfg(), layout, tmp_path / "r", private=False)
    assert result.budget == statement.Budget(1, 30.0, DELTA, within=True, read_now=False)
    row = _budget_row(html)
    assert "1 run on record, composed within the budget (ε ≤ 30, δ = 1e-5)" in row
    assert "as the ledger stood when this model finished training" in row

    # a sweep that ran DP runs after the fine-tuning recorded the later count: it is stated
    art = tmp_path / "art"
    shutil.copytree(layout["art"], art, ignore=shutil.ignore_patterns("private"))
    metrics = json.loads((art / "sweep" / "metrics.json").read_text())
    (art / "sweep" / "metrics.json").write_text(json.dumps(metrics | {"dataset_runs": 3}))
    result = report.run(cfg(), artifacts=report.artifact_paths(art), out_dir=tmp_path / "s",
                        tracker=NullTracker())
    assert result.budget == statement.Budget(3, 30.0, DELTA, within=True, read_now=False,
                                             recorded_by="sweep")
    row = _budget_row(result.index.read_text())
    assert "3 runs on record" in row and "when the privacy-utility sweep finished" in row


def test_the_older_private_manifest_argument_still_finds_the_ledger(cfg, layout,
                                                                   tmp_path) -> None:
    art = layout["art"]
    result = report.run(cfg(), artifacts=report.artifact_paths(art),
                        private_manifest=art / report.PRIVATE_MANIFEST, out_dir=tmp_path / "r",
                        tracker=NullTracker())
    assert result.budget == statement.Budget(1, 30.0, DELTA, within=True, read_now=True)


def test_the_page_shows_every_stage_and_real_beside_synthetic(cfg, layout, tmp_path) -> None:
    result, html = _report(cfg(), layout, tmp_path / "r")
    text = _text(html)
    assert result.not_run == () and "Not run" not in text
    # 10 classes x 3 synthetic + 3 real, the five plots of the stages, and the sweep's
    # curve and the samples of its one swept point
    assert result.images == html.count("<img ") == 10 * 3 * 2 + 5 + 2
    assert all(re.search(r'alt="[^"]{10,}"', tag) for tag in re.findall(r"<img [^>]*>", html))
    for expected in ("81.2%", "94.6%", "NOT covered by (ε, δ): for comparison only",
                     "Spearman ρ = +0.50 (95% CI -0.50 to +1.00)",
                     "Kendall τ = +0.33 (95% CI -0.33 to +1.00)",
                     "The ρ interval covers 0: on this test split the agreement cannot be told "
                     "from noise", "Ranking agreement ρ = +0.50 95% CI -0.50 to +1.00; τ = +0.33",
                     "configuration 1",
                     "1.2 points below", "0.1235", "0.654", "0.712", "0.0123 ± 0.0021",
                     "is 0.03", "gives 2.35", "passed", "final loss 0.4321",
                     read_manifest(layout["art"] / "prepare" / "test").content_hash,
                     read_manifest(layout["art"] / "sample").content_hash,
                     "commit", "0123abc",
                     # the baselines of the same run, labelled, and the headline's gain
                     "DP fine-tuning: +16.1 points over public-only; 13.3 points from real data",
                     "public only (ε = 0)", "65.1%", "2.468",
                     # the privacy-utility curve: each point, this run's marked, its gain
                     "Privacy–utility curve", "DP fine-tuned at ε = 2", "73.1%", "1.358",
                     "+8.0", "DP fine-tuned at ε = 10 (this run's model)",
                     "The sweep's points at ε = 2 are DP fine-tuning runs of their own"):
        assert expected in text, expected
    assert text.count("DP fine-tuning: +16.1 points") >= 2  # the lede and the section
    # the real examples are the first of each class in the test split, byte for byte
    test_x, test_y, _ = read_dataset(layout["art"] / "prepare" / "test")
    shown = {a.tobytes() for a in _embedded(html) if a.shape == (8, 8)}
    assert test_x[np.flatnonzero(test_y == 7)[2]][..., 0].tobytes() in shown
    # the config is there, collapsed
    config = html_lib.unescape(html.split("<details>")[1].split("<pre>")[1].split("</pre>")[0])
    assert yaml.safe_load(config)["report"]["examples_per_class"] == 3


def test_no_private_image_size_sample_rate_or_sigma_in_the_page(cfg, layout,
                                                                 tmp_path) -> None:
    _, html = _report(cfg(), layout, tmp_path / "r")
    private_x, _, _ = read_dataset(layout["art"] / "prepare" / "private")
    private = {x[..., 0].tobytes() for x in private_x}
    images = [a for a in _embedded(html) if a.shape == (8, 8)]
    assert len(images) == 60 and not [a for a in images if a.tobytes() in private]
    text = _text(html)
    numbers = set(re.findall(r"\d[\d,.]*\d|\d", re.sub(r"[0-9a-f]{12,}", "", text)))
    assert str(layout["n_private"]) not in numbers  # 213: distinctive
    privacy = layout["privacy"]
    for value in (f"{privacy['sample_rate']:.4g}", f"{SIGMA:.4g}", f"{SIGMA:.3g}",
                  f"{privacy['epsilon']:.2f}", f"{privacy['epsilon']:.3g}"):
        assert value not in text, value  # q, sigma, the accounted epsilon: they give N
    assert read_manifest(layout["art"] / "prepare" / "private").content_hash not in html
    assert _private_key(layout["art"]) not in html  # the ledger's key: of the images too
    assert "withheld" in text

    # the same check has power: the data owner may disclose sigma and q
    _, shown = _report(cfg("report.disclose_private_size=true"), layout, tmp_path / "d")
    assert f"{SIGMA:.4g}" in _text(shown) and f"{privacy['sample_rate']:.4g}" in _text(shown)
    assert f"the accounted ε is {privacy['epsilon']:.2f}" in _text(shown)


def test_missing_optional_stages_get_not_run_sections(cfg, layout, tmp_path) -> None:
    result, html = _report(cfg(), layout, tmp_path / "r", names=("finetune", "sample"),
                           private=False)
    text = _text(html)
    assert set(result.not_run) == {"public", "test", "pretrain", "fid", "classify", "baseline",
                                   "sweep", "rank", "audit"}
    for stage in ("fid", "classify", "rank", "audit", "pretrain", "sweep"):
        assert f"Not run: no output of the {stage} stage" in text, stage
    assert "No real images: no test split was given" in text
    assert result.images == 10 * 3 + 1  # synthetic examples and the fine-tuning loss
    assert "non-private baseline accuracy" not in text  # no classify: not mentioned


def test_real_examples_can_be_left_out(cfg, layout, tmp_path) -> None:
    result, html = _report(cfg("report.real_examples=false"), layout, tmp_path / "r")
    assert result.images == 10 * 3 + 5 + 2 and "report.real_examples is off" in _text(html)


def test_a_failed_audit_is_a_banner_at_the_top(cfg, layout, tmp_path) -> None:
    audit = tmp_path / "audit"
    shutil.copytree(layout["art"] / "audit", audit)
    metrics = json.loads((audit / "metrics.json").read_text())
    _write_json(audit / "metrics.json", metrics | {"audit_passed": False,
                                                   "audit_status": "failed",
                                                   "membership_epsilon_lower_bound": 12.5})
    result = report.run(cfg(), artifacts=report.artifact_paths(layout["art"]) | {"audit": audit},
                        out_dir=tmp_path / "r", tracker=NullTracker())
    head = result.index.read_text().split("<nav")[0]  # above the contents
    assert "The privacy audit FAILED: an attack proved ε ≥ 12.50" in _text(head)
    assert 'role="alert"' in head
    _, passed = _report(cfg(), layout, tmp_path / "p")
    assert "FAILED" not in passed
    # a failed check twin is a banner too, though the claim's audit is inconclusive
    _write_json(audit / "metrics.json", metrics | {"check_status": "failed",
                                                   "check_epsilon_lower_bound": 1.9})
    result = report.run(cfg(), artifacts=report.artifact_paths(layout["art"]) | {"audit": audit},
                        out_dir=tmp_path / "c", tracker=NullTracker())
    head = result.index.read_text().split("<nav")[0]
    assert "an attack proved ε ≥ 1.90 for the check twin accounted at ε = 0.99" in _text(head)


def test_an_audit_that_cannot_test_the_claim_says_inconclusive(cfg, layout, tmp_path) -> None:
    _, html = _report(cfg(), layout, tmp_path / "r")
    text = _text(html)
    assert "Privacy audit inconclusive at ε = 10.00" in text  # the glance row
    assert "passed" not in text.split("Privacy audit")[1][:40]
    assert ("proven ε ≥ 0.03: 32 canaries at 95% and δ = 1e-5 certify at most ε = 2.20; "
            "check twin passed at ε = 0.99") in text
    assert ("32 canaries at 95% confidence and δ = 1e-5 can certify at most ε = 2.20, so no "
            "attack could refute this claim") in text
    assert "check twin (ε = 0.99) 0.12" in text and "gives 0.12: passed" in text
    # "passed" only where the canaries could have refuted the claim
    audit = tmp_path / "audit"
    shutil.copytree(layout["art"] / "audit", audit)
    metrics = json.loads((audit / "metrics.json").read_text())
    _write_json(audit / "metrics.json", metrics | {
        "audit_status": "passed", "audit_passed": True, "audit_max_certifiable_epsilon": 12.0})
    result = report.run(cfg(), artifacts=report.artifact_paths(layout["art"]) | {"audit": audit},
                        out_dir=tmp_path / "p", tracker=NullTracker())
    text = _text(result.index.read_text())
    assert "Privacy audit passed proven ε ≥ 0.03; check twin passed" in text
    assert "inconclusive" not in text


def test_a_constant_ranking_has_no_correlation(cfg, layout, tmp_path) -> None:
    rank = tmp_path / "rank"
    shutil.copytree(layout["art"] / "rank", rank)
    metrics = json.loads((rank / "metrics.json").read_text())
    # all synthetic validation scores tie: rank writes NaN correlations as JSON null
    _write_json(rank / "metrics.json", metrics | dict.fromkeys(
        ["spearman_rho", "kendall_tau", "spearman_rho_ci_low", "spearman_rho_ci_high",
         "kendall_tau_ci_low", "kendall_tau_ci_high"]))
    result = report.run(cfg(), artifacts=report.artifact_paths(layout["art"]) | {"rank": rank},
                        out_dir=tmp_path / "r", tracker=NullTracker())
    text = _text(result.index.read_text())
    assert "Spearman ρ = undefined (a constant ranking) and Kendall τ = undefined" in text
    ranking = text.split("Can synthetic data choose hyperparameters?")[1].split("Sec. 5.3")[0]
    assert "CI" not in ranking and "interval" not in ranking


@pytest.mark.parametrize(("low", "high", "verdict"), [
    (0.62, 0.97, "The ρ interval lies above 0: the agreement is more than the sampling noise "
                 "of the test split."),
    (-0.9, -0.1, "The ρ interval lies below 0: the synthetic ranking reverses the real one"),
    (0.0, 0.9, "The ρ interval covers 0"),
])
def test_the_ranking_interval_says_whether_the_ranking_beats_noise(
        cfg, layout, tmp_path, low: float, high: float, verdict: str) -> None:
    rank = tmp_path / "rank"
    shutil.copytree(layout["art"] / "rank", rank)
    metrics = json.loads((rank / "metrics.json").read_text())
    _write_json(rank / "metrics.json", metrics | {
        "spearman_rho_ci_low": low, "spearman_rho_ci_high": high, "ci_confidence": 0.9})
    result = report.run(cfg(), artifacts=report.artifact_paths(layout["art"]) | {"rank": rank},
                        out_dir=tmp_path / "r", tracker=NullTracker())
    text = _text(result.index.read_text())
    assert f"Spearman ρ = +0.50 (90% CI {low:+.2f} to {high:+.2f})" in text
    assert verdict in text


def test_rank_metrics_without_an_interval_still_render(cfg, layout, tmp_path) -> None:
    """Outputs of a rank stage that predates the interval."""
    rank = tmp_path / "rank"
    shutil.copytree(layout["art"] / "rank", rank)
    metrics = json.loads((rank / "metrics.json").read_text())
    _write_json(rank / "metrics.json", {k: v for k, v in metrics.items()
                                        if "_ci_" not in k and k != "ci_confidence"})
    result = report.run(cfg(), artifacts=report.artifact_paths(layout["art"]) | {"rank": rank},
                        out_dir=tmp_path / "r", tracker=NullTracker())
    text = _text(result.index.read_text())
    assert "Spearman ρ = +0.50 and Kendall τ = +0.33 against the synthetic ranking" in text
    assert "Ranking agreement ρ = +0.50 τ = +0.33" in text


def test_same_inputs_give_the_same_page(cfg, layout, tmp_path) -> None:
    a = _report(cfg(), layout, tmp_path / "a")[1]
    b = _report(cfg(), layout, tmp_path / "b")[1]
    assert a == b


def test_refuses_bad_inputs_and_writes_nothing(cfg, layout, tmp_path) -> None:
    art, out = layout["art"], tmp_path / "out"
    dirs = report.artifact_paths(art)
    with pytest.raises(InputError, match="the finetune output is required"):
        report.run(cfg(), artifacts={"sample": dirs["sample"]}, out_dir=out,
                   tracker=NullTracker())
    with pytest.raises(InputError, match="the private split"):  # "test" = the private split
        report.run(cfg(), artifacts=dirs | {"test": art / "prepare" / "private"},
                   private_manifest=art / report.PRIVATE_MANIFEST, out_dir=out,
                   tracker=NullTracker())
    fake = tmp_path / "fake-finetune"
    shutil.copytree(dirs["finetune"], fake)
    (fake / "privacy.json").unlink()
    with pytest.raises(InputError, match="no privacy.json"):
        report.run(cfg(), artifacts=dirs | {"finetune": fake}, out_dir=out,
                   tracker=NullTracker())
    _write_json(fake / "privacy.json", layout["privacy"] | {"steps": 7})
    with pytest.raises(InputError, match="not sampled from this DP model"):
        report.run(cfg(), artifacts=dirs | {"finetune": fake}, out_dir=out,
                   tracker=NullTracker())
    assert not out.exists()


def test_cli_builds_the_report_from_an_artifacts_folder(cfg, layout, tmp_path,
                                                        capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(cfg("tracking.enabled=false").to_dict()))
    out = layout["root"] / "artifacts" / "report"
    try:
        assert cli.main(["report", "--config", str(config), "--artifacts", str(layout["art"]),
                         "--out", str(out), "-q"]) == 0
        assert f"report: {out / 'index.html'} (epsilon=" in capsys.readouterr().out
        assert {p.name for p in out.iterdir()} == {"index.html", "params.json", "version.json"}
        text = _text((out / "index.html").read_text())  # the ledger, read now
        assert "1 run on record" in text and "as the ledger stood" not in text
        assert json.loads((out / "version.json").read_text())["stage"] == "report"
        assert f"report:  {out / 'index.html'}" in summarize(layout["art"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert "report:  not made" in summarize(layout["art"])


def test_cli_reads_the_stage_outputs_from_s3(cfg, layout, tmp_path, s3) -> None:
    """`--artifacts s3://...`: each published stage output is read through its verified
    local copy, the private split only into a temporary folder to key the ledger (never
    the shared cache); a stage never published is "not run"; --out publishes the report."""
    from dpsynth.io import cache, published

    for stage in ("prepare", "finetune", "sample", "classify"):
        published.upload_published(layout["art"] / stage, s3.uri(f"run/{stage}"))
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(cfg("tracking.enabled=false").to_dict()))
    assert cli.main(["report", "--config", str(config), "--artifacts", s3.uri("run"),
                     "--out", s3.uri("run/report"), "-q"]) == 0
    local = published.download_published(s3.uri("run/report"))
    text = _text((local / "index.html").read_text())
    # read now (found by the images' key), not the count the fine-tuning recorded
    assert "1 run on record" in text and "as the ledger stood" not in text
    assert "81.2%" in text and "Not run: no output of the fid stage" in text
    copies = {p.parent.name.split("-")[0] for p in cache.cache_root().rglob("*.npz")}
    assert copies == {"public", "test", "sample"}  # never the private shards


def test_dvc_runs_the_report_last_on_every_output_but_the_private_images() -> None:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stage = dvc["stages"]["report"]
    read = {d.split("/")[1] for d in stage["deps"] if d.startswith("artifacts/")}
    assert read == set(dvc["stages"]) - {"report"}  # after every other stage
    assert "artifacts/prepare/private/manifest.json" in stage["deps"]
    assert "artifacts/prepare/private" not in stage["deps"]
    assert stage["outs"] == ["artifacts/report"]
    # every curve the page shows from a stage is also a DVC plot of that stage's data
    plotted = {next(iter(p)) for p in dvc["plots"]} | {
        f for p in dvc["plots"] for v in p.values() if isinstance(v.get("y"), dict)
        for f in v["y"]}
    for curve in ("pretrain/loss.csv", "finetune/loss.csv", "classify/curve.csv",
                  "sweep/curve.csv", "rank/scores.csv", "audit/roc_dp.csv"):
        assert f"artifacts/{curve}" in plotted, curve


def test_report_config_is_validated(make_cfg: Callable[..., Config]) -> None:
    from dpsynth.errors import ConfigError

    with pytest.raises(ConfigError, match="report.examples_per_class=0: must be in"):
        make_cfg("report.examples_per_class=0")
    assert make_cfg().report.disclose_private_size is False  # withheld unless asked


def test_module_doctests() -> None:
    for module in (statement, page):
        assert doctest.testmod(module).failed == 0, module.__name__
