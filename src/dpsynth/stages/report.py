"""`dpsynth report`: the last stage. One self-contained HTML page a data owner can
hand on: the privacy guarantee in plain words and numbers, samples next to real
test images, fidelity, downstream accuracy against the public-only baseline, the
privacy-utility curve, the ranking check, training curves, the audit, and where
everything came from.

The page is made from the other stages' published outputs only. The private
split, when given, is read for one thing: the hash of its images keys the
privacy ledger (`privacy.ledger.dataset_key`), whose run count the page states;
nothing of it reaches the page. The page never states the private split's size,
nor σ, q or a composed ε, which give it away (`dpsynth.report.statement`). It
holds no timestamp: the same inputs give the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import dpsynth
from dpsynth.config import Config
from dpsynth.data.roles import is_private
from dpsynth.errors import InputError
from dpsynth.io.atomic import atomic_dir
from dpsynth.io.shards import Manifest, read_dataset, read_manifest
from dpsynth.privacy.ledger import PrivacyLedger, dataset_key
from dpsynth.provenance import write_run_info
from dpsynth.report import page, sections
from dpsynth.report.audit import audit_section, audit_warning
from dpsynth.report.page import esc
from dpsynth.report.values import read_json
from dpsynth.report.statement import Budget, epsilon_text, privacy_statement
from dpsynth.report.sweep import curve_section
from dpsynth.stages import registry
from dpsynth.tracking import Tracker

log = logging.getLogger(__name__)
SECTIONS = ("data", "privacy", "report")
INDEX = "index.html"
# What the report reads, by name, and where `dvc repro` puts it under artifacts/.
# what it reads: the public and test splits, and every other stage's output (from the
# registry: a new stage's output is the report's to show)
LAYOUT = {"public": "prepare/public", "test": "prepare/test"} | {
    name: name for name in registry.STAGES if name not in ("prepare", "report")}
REQUIRED = ("finetune", "sample")  # the DP claim and the data it is about
PRIVATE = "prepare/private"  # the private split: read only to key the ledger
PRIVATE_MANIFEST = f"{PRIVATE}/manifest.json"  # what DVC depends on (it pins the shards)


@dataclass(frozen=True, kw_only=True)
class ReportResult:
    """What `run` wrote.

    Attributes:
        out_dir: the published folder.
        index: the page, `out_dir / "index.html"`.
        epsilon: the ε the page states: the configured target `finetune.epsilon`.
        budget: the privacy ledger's account of the private dataset, if known.
        not_run: the optional inputs that were missing (their sections say "not run").
        images: the number of `<img>` elements on the page.
    """

    out_dir: Path
    index: Path
    epsilon: float
    budget: Budget | None
    not_run: tuple[str, ...]
    images: int


def _budget(cfg: Config, privacy: Mapping[str, Any], finetune_metrics: Mapping[str, Any],
            finetune_params: Mapping[str, Any], sweep_metrics: Mapping[str, Any],
            private_dir: Path | None) -> Budget | None:
    """The ledger's account of the private dataset, in public terms (runs on record,
    the budget): read now when the private split (its images key the ledger) is
    given and the ledger has the dataset, else the run count the fine-tuning (or,
    when it ran DP runs after it, the sweep) recorded when it finished, against
    the budget the fine-tuning ran under."""
    if private_dir is not None:
        images, _, manifest = read_dataset(private_dir)  # hash-verified; only hashed here
        ledger = PrivacyLedger(cfg.privacy.ledger_dir, dataset_key(images),
                               legacy_key=manifest.content_hash)
        entries, budget_delta = ledger.entries(), ledger.budget_delta()
        if entries and budget_delta is not None:
            # the composed ε is a function of N: only whether it is within the budget
            # leaves (the ledger enforced it at every reservation)
            spent = ledger.spent_epsilon(budget_delta, privacy["accountant"])
            return Budget(len(entries), cfg.privacy.dataset_budget_epsilon, budget_delta,
                          within=spent <= cfg.privacy.dataset_budget_epsilon, read_now=True)
        log.warning("the privacy ledger in %s has no runs on this private dataset; the "
                    "report states the count recorded when the model was trained",
                    cfg.privacy.ledger_dir)
    runs, recorded_by = finetune_metrics.get("dataset_runs"), "finetune"
    if runs is None:
        return None
    swept = sweep_metrics.get("dataset_runs")  # the sweep's extra DP runs came later
    if isinstance(swept, int) and swept > runs:
        runs, recorded_by = swept, "sweep"
    ran_under = finetune_params.get("privacy", {})  # the budget the run was admitted under
    return Budget(int(runs),
                  float(ran_under.get("dataset_budget_epsilon",
                                      cfg.privacy.dataset_budget_epsilon)),
                  float(ran_under.get("dataset_budget_delta", cfg.privacy.dataset_budget_delta)),
                  within=True, read_now=False, recorded_by=recorded_by)


def _check_inputs(dirs: Mapping[str, Path], privacy: Mapping[str, Any] | None,
                  private_dir: Path | None) -> tuple[Manifest, Manifest | None]:
    if privacy is None:
        raise InputError(f"{dirs['finetune']}: no privacy.json, so not a DP model; pass the "
                         "output of `dpsynth finetune` (artifacts/finetune)")
    synthetic = read_manifest(dirs["sample"])
    if read_json(dirs["sample"], "privacy.json") != privacy:
        raise InputError(f"{dirs['sample']}: its privacy.json differs from {dirs['finetune']}'s"
                         ", so the synthetic set was not sampled from this DP model; pass the "
                         "model that made it, or re-run sample")
    test = read_manifest(dirs["test"]) if "test" in dirs else None
    if test is not None:
        private_hash = (read_manifest(private_dir).content_hash
                        if private_dir is not None else None)
        if is_private(test) or test.content_hash == private_hash:
            raise InputError(f"{dirs['test']}: this is the private split; the report shows "
                             "real images of the test split only (artifacts/prepare/test)")
        if test.classes != synthetic.classes or test.shape != synthetic.shape:
            raise InputError(f"{dirs['test']}: classes {list(test.classes)} and shape "
                             f"{test.shape} differ from the synthetic set's "
                             f"({list(synthetic.classes)}, {synthetic.shape}); both must come "
                             "from one data config")
    return synthetic, test


def run(cfg: Config, *, artifacts: Mapping[str, Path], out_dir: Path, tracker: Tracker,
        private_dir: Path | None = None, private_manifest: Path | None = None
        ) -> ReportResult:
    """Build the report from the stages' outputs and publish it into `out_dir`.

    Args:
        cfg: resolved config (sections data, privacy, report).
        artifacts: stage output folders by name (keys of `LAYOUT`): `finetune` (the DP
            model with its privacy.json) and `sample` are required; `public`, `test`,
            `pretrain`, `fid`, `classify`, `baseline`, `sweep`, `rank` and `audit` are
            optional, and a missing one gets a "not run" section.
        out_dir: gets `index.html` (self-contained: images embedded), `params.json`,
            `version.json`; published atomically.
        tracker: gets the report section of the config and `index.html`.
        private_dir: the private split (`prepare` output), read only to compute the
            privacy ledger's key from its images (`dataset_key`); without it the
            report states the run count the fine-tuning recorded when it finished.
        private_manifest: the private split's `manifest.json`, the older way to
            name it: its folder is `private_dir`.

    Raises:
        InputError: a required input missing, a fine-tuning output without
            privacy.json, a synthetic set from another model, a "test" folder that
            is the private split. Nothing is written then.
    """
    unknown = sorted(set(artifacts) - set(LAYOUT))
    if unknown:
        raise ValueError(f"artifacts: unknown name(s) {unknown}; known: {sorted(LAYOUT)}")
    dirs = {name: Path(artifacts[name]) for name in LAYOUT if artifacts.get(name) is not None}
    for name in REQUIRED:
        if name not in dirs or not dirs[name].is_dir():
            raise InputError(f"report: the {name} output is required (e.g. artifacts/"
                             f"{LAYOUT[name]}); run `dpsynth {name}` first")
    missing = [name for name, d in dirs.items() if not d.is_dir()]
    if missing:
        raise InputError(f"report: {', '.join(str(dirs[n]) for n in missing)}: not a folder; "
                         "pass the stages' output folders, or leave out those not run")
    if private_dir is None and private_manifest is not None:
        private_dir = Path(private_manifest).parent
    private_dir = Path(private_dir) if private_dir is not None else None
    privacy = read_json(dirs["finetune"], "privacy.json")
    synthetic, test = _check_inputs(dirs, privacy, private_dir)
    fine_params = read_json(dirs["finetune"], "params.json") or {}
    target = fine_params.get("finetune", {}).get("epsilon")
    if target is None:
        raise InputError(f"{dirs['finetune']}: no params.json with finetune.epsilon, the "
                         "guarantee the report states; pass the folder `dpsynth finetune` "
                         "wrote (artifacts/finetune), or re-run finetune")
    budget = _budget(cfg, privacy, read_json(dirs["finetune"], "metrics.json") or {},
                     fine_params, read_json(dirs.get("sweep"), "metrics.json") or {},
                     private_dir)
    classify = read_json(dirs.get("classify"), "metrics.json") or {}
    audit = read_json(dirs.get("audit"), "metrics.json") or {}
    statement = privacy_statement(
        privacy, expected_batch_size=fine_params.get("finetune", {}).get("batch_size"),
        target_epsilon=target, budget=budget,
        dataset=cfg.data.private.kind, disclose_private_size=cfg.report.disclose_private_size,
        nonprivate_baseline="nonprivate_baseline_real_test_accuracy" in classify,
        memorization="memorized_fraction" in audit)
    tracker.log_params(cfg.section("report"))

    body = [sections.privacy_section(statement),
            sections.samples_section(cfg.report, dirs, synthetic, test),
            sections.fidelity_section(dirs.get("fid")),
            sections.utility_section(dirs.get("classify")),
            sections.baselines_section(dirs.get("classify"), dirs.get("baseline"),
                                       dirs.get("fid"), target),
            curve_section(dirs.get("sweep")),
            sections.ranking_section(dirs.get("rank")),
            sections.training_section(dirs.get("pretrain"), dirs["finetune"]),
            audit_section(dirs.get("audit")),
            sections.provenance_section(cfg, dirs, synthetic, test, private_dir is not None,
                                        cfg.section(*SECTIONS))]
    text = page.render(
        title="Differentially private synthetic data: report",
        lede=" ".join(t for t in (statement.headline,
                                   sections.baseline_gain(dirs.get("classify"),
                                                          dirs.get("baseline"))) if t),
        warnings=[w for w in (statement.warning, audit_warning(dirs.get("audit")))
                  if w],
        glance=sections.glance(privacy, target, synthetic, dirs),
        sections=body,
        footer=f"Made by dpsynth {esc(dpsynth.__version__)} (<code>dpsynth report</code>) from "
               "the published outputs of the stages above. Self-contained: every image is "
               "embedded and nothing is fetched from the network.")
    not_run = tuple(n for n in LAYOUT if n not in dirs)
    with atomic_dir(out_dir) as tmp:
        (tmp / INDEX).write_text(text, encoding="utf-8")
        write_run_info(tmp, "report", cfg.section(*SECTIONS))
    tracker.log_artifact(Path(out_dir) / INDEX)
    log.info("report: %s (ε = %s; not run: %s)", Path(out_dir) / INDEX,
             epsilon_text(target), ", ".join(not_run) or "none")
    return ReportResult(out_dir=Path(out_dir), index=Path(out_dir) / INDEX, epsilon=float(target),
                        budget=budget, not_run=not_run, images=text.count("<img "))


def artifact_paths(root: Path, names: Sequence[str] = tuple(LAYOUT)) -> dict[str, Path]:
    """The folders of `names` that exist under a `dvc repro` artifacts root."""
    return {n: root / LAYOUT[n] for n in names if (root / LAYOUT[n]).is_dir()}
