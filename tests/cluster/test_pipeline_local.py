"""The whole Kubeflow pipeline run locally (kfp.local, SubprocessRunner) on the smoke
config, compared with `dvc repro` on the same config (the session fixture `repro`).

What must match, and why it can: the smoke config fixes every seed, including
`finetune.noise_seed` (a test-only setting, flagged `seeded_for_test` in
privacy.json), both runs use one torch thread on the same machine, and each
sampling shard is a pure function of (seed, index, model, sampling config). So
the splits, the pre-trained and DP models, the synthetic set and the evaluation
results are identical byte for byte; only timings differ. In a release run the
DP noise comes from the OS's entropy: the DP model, and everything after it,
would differ between any two runs, and only prepare and pretrain would match.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from kfp_support import KfpLocalRun

from dpsynth.io.shards import read_dataset

pytestmark = [
    pytest.mark.slow,
    # expected locally: GPUs, CPU/memory requests and the image have no local effect
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner"),
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom"),
]
# dvc.yaml stage -> (task, output) of its artifact in the pipeline
OUTPUTS = {"pretrain": ("pretrain", "model"), "finetune": ("finetune", "dp_model"),
           "sample": ("merge-shards", "synthetic"), "fid": ("fid", "results"),
           "classify": ("classify", "results"), "sweep": ("sweep", "results"),
           "rank": ("rank", "results"), "audit": ("audit", "results")}
STAGES = ("prepare", *OUTPUTS)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _stage_dir(run: KfpLocalRun, stage: str) -> Path:
    return run.output(*OUTPUTS[stage])


def _metadata(run: KfpLocalRun, task: str, output: str = "metrics") -> dict:
    out = json.loads((run.run_dir / task / "executor_output.json").read_text())
    return out["artifacts"][output]["artifacts"][0]["metadata"]


def test_every_task_ran_and_sampling_fanned_out(kfp_local_smoke_run: KfpLocalRun) -> None:
    run = kfp_local_smoke_run
    tasks = {p.name for p in run.run_dir.iterdir()}
    assert tasks == {"resolve-config", "prepare", "pretrain", "finetune", "shard-indices",
                     "merge-shards", "fid", "classify", "baseline", "sweep", "rank", "audit",
                     "report",
                     *(f"for-loop-1-iteration-{i}" for i in range(3))}
    for i in range(3):  # one shard per iteration
        shard = run.run_dir / f"for-loop-1-iteration-{i}" / "sample-shard" / "shard"
        assert sorted(p.name for p in shard.iterdir()) == [f"shard-{i:05d}.json",
                                                         f"shard-{i:05d}.npz"]


def test_deterministic_outputs_equal_dvc_repro_byte_for_byte(
        kfp_local_smoke_run: KfpLocalRun, repro: Path) -> None:
    run, art = kfp_local_smoke_run, repro / "artifacts"
    for split in ("public", "private", "test"):  # manifests with every shard's sha256
        dvc, kfp = _files(art / "prepare" / split), _files(run.output("prepare", split))
        assert {k: v for k, v in kfp.items() if k not in ("params.json", "version.json")} == dvc
    for stage in ("pretrain", "finetune", "sample"):
        dvc, kfp = _files(art / stage), _files(_stage_dir(run, stage))
        assert set(kfp) == set(dvc), stage
        for name in dvc:
            if name not in ("metrics.json", "version.json", "params.json"):
                assert kfp[name] == dvc[name], f"{stage}/{name}"
    privacy = json.loads((_stage_dir(run, "finetune") / "privacy.json").read_text())
    assert privacy["seeded_for_test"] and privacy["steps"] == 6
    images, labels, manifest = read_dataset(_stage_dir(run, "sample"))  # verifies hashes
    assert manifest.count == 60 and len(manifest.shards) == 3
    champion = "classifier/model.safetensors"
    assert (_stage_dir(run, "rank") / champion).read_bytes() == (art / "rank" / champion
                                                                 ).read_bytes()
    for name in ("curve.csv",):
        assert (_stage_dir(run, "classify") / name).read_text() == (
            art / "classify" / name).read_text()
    assert (_stage_dir(run, "rank") / "scores.csv").read_text() == (
        art / "rank" / "scores.csv").read_text()


def test_every_stage_ran_with_the_same_config(kfp_local_smoke_run: KfpLocalRun,
                                              repro: Path) -> None:
    run = kfp_local_smoke_run
    for stage in STAGES:
        kfp_dir = run.output("prepare", "public") if stage == "prepare" else _stage_dir(run,
                                                                                      stage)
        kfp = json.loads((kfp_dir / "params.json").read_text())
        dvc = json.loads((repro / "artifacts" / stage / "params.json").read_text())
        if stage in ("finetune", "sweep"):  # the pipeline's durable ledger, not artifacts/ledger
            assert kfp["privacy"].pop("ledger_dir") == str(run.ledger_dir)
            dvc["privacy"].pop("ledger_dir")
        assert kfp == dvc, stage


def test_metrics_match_dvc_repro_but_for_timings(kfp_local_smoke_run: KfpLocalRun,
                                                 repro: Path) -> None:
    for stage in STAGES:
        kfp_dir = (kfp_local_smoke_run.run_dir / "prepare" if stage == "prepare"
                   else _stage_dir(kfp_local_smoke_run, stage))
        if stage == "prepare":  # the split folders carry no metrics.json; the KFP Metrics do
            kfp = _metadata(kfp_local_smoke_run, "prepare")
            dvc = {k: float(v) for k, v in json.loads(
                (repro / "artifacts" / "prepare" / "metrics.json").read_text()).items()
                if isinstance(v, (int, float))}
        else:
            kfp = json.loads((kfp_dir / "metrics.json").read_text())
            dvc = json.loads((repro / "artifacts" / stage / "metrics.json").read_text())
        timing = {k for k in dvc if k.endswith("_seconds") or k == "images_per_second"}
        assert set(kfp) == set(dvc), stage
        assert {k: v for k, v in kfp.items() if k not in timing} == {
            k: v for k, v in dvc.items() if k not in timing}, stage
    fid = json.loads((_stage_dir(kfp_local_smoke_run, "fid") / "metrics.json").read_text())
    assert fid["fd_digits_cnn"] > 0


def test_kfp_metrics_artifacts_hold_each_stages_public_metrics(
        kfp_local_smoke_run: KfpLocalRun) -> None:
    run = kfp_local_smoke_run
    private_count = read_dataset(run.output("prepare", "private"))[2].count
    for stage in STAGES:
        task = OUTPUTS.get(stage, ("prepare",))[0]
        logged = _metadata(run, task)
        assert logged, stage
        if stage != "prepare":
            values = json.loads((_stage_dir(run, stage) / "metrics.json").read_text())
            assert logged == {k: float(v) for k, v in values.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)
                              and math.isfinite(v)}, stage
        # the private split's size is private information (PRIVACY.md rule 6)
        assert float(private_count) not in logged.values(), stage
    assert _metadata(run, "finetune")["epsilon"] <= 10.0


def test_mlflow_holds_one_parent_run_with_a_child_per_stage(
        kfp_local_smoke_run: KfpLocalRun) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=kfp_local_smoke_run.mlflow_uri)
    exp = client.get_experiment_by_name("dpsynth-smoke")
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`dpsynth.pipeline_id` = '{kfp_local_smoke_run.pipeline_id}'"))
    parents = [r for r in runs if r.data.tags["dpsynth.stage"] == "pipeline"]
    children = {r.data.tags["dpsynth.stage"]: r for r in runs
                if r not in parents and "/" not in r.data.tags["dpsynth.stage"]}
    assert len(parents) == 1 and set(children) == {*STAGES, "baseline", "report"}
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
    assert client.get_model_version_by_alias("dpsynth-generator", "champion")


def test_the_report_states_what_dvc_repros_report_states(kfp_local_smoke_run: KfpLocalRun,
                                                         repro: Path) -> None:
    """Not byte for byte: the pipeline's report task is not given the private split,
    so it states the ledger's run count the DP run recorded when it finished, where dvc
    repro's reads the ledger (and counts its runs); and the provenance differs (the
    pipeline's ledger_dir, the split folders' own params.json). The rest is equal."""
    run = kfp_local_smoke_run
    page = run.output("report", "page").read_text()
    assert page == (run.output("report", "results") / "index.html").read_text()
    dvc = (repro / "artifacts" / "report" / "index.html").read_text()
    name = "Dataset budget (privacy ledger)"

    def budget_row(html: str) -> str:
        return html.split(name)[1].split("</tr>")[0]

    def the_rest(html: str) -> tuple[str, str]:
        head, tail = html.split(name)
        return head, tail.split("</tr>", 1)[1].split('<section id="provenance"')[0]

    # the same public statement, no composed epsilon (PRIVACY.md rule 8): the DP run and
    # the sweep's extra point, which the sweep recorded after the fine-tuning
    stated = ('2 runs on record, composed within the budget (ε ≤ 100, δ = '
              '<span class="nowrap">1e-5</span>)')
    assert stated in budget_row(dvc) and stated in budget_row(page)
    assert "so far" in budget_row(dvc)
    assert "when the privacy-utility sweep finished" in budget_row(page)
    assert the_rest(page) == the_rest(dvc)


def test_durable_state_holds_the_ledger_and_no_leftover_work(
        kfp_local_smoke_run: KfpLocalRun) -> None:
    run = kfp_local_smoke_run
    (ledger,) = run.ledger_dir.glob("*.json")
    entries = json.loads(ledger.read_text())["entries"]
    # the DP run and the sweep's one extra point (smoke: sweep.epsilons [2, 10])
    assert [(e["target_epsilon"], e["status"]) for e in entries] == [(10.0, "completed"),
                                                                     (2.0, "completed")]
    # every stage published, then removed its checkpoints / finished shards
    assert not run.work_root.exists() or not list(run.work_root.iterdir())
