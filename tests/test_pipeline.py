"""End to end: `dvc repro` with the smoke config in a temporary copy of the repo
(the session fixture `repro`, tests/conftest.py).

Checks what a user gets: every stage's artifacts exist and verify, the sample
grid exists, and MLflow holds one parent run with a child run per stage and
the logged params.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpsynth.io.shards import read_dataset

STAGES = ("prepare", "pretrain", "finetune", "sample", "fid", "classify", "baseline", "sweep",
          "rank", "audit")
pytestmark = pytest.mark.slow


def test_every_stage_publishes_verified_artifacts(repro: Path) -> None:
    art = repro / "artifacts"
    for split in ("public", "private", "test"):
        images, labels, manifest = read_dataset(art / "prepare" / split)
        assert images.shape[1:] == (8, 8, 1) and len(manifest.classes) == 10
    assert (art / "pretrain" / "ema.safetensors").is_file()
    assert json.loads((art / "pretrain" / "config.json").read_text())["unet"]["image_size"] == 8
    images, labels, manifest = read_dataset(art / "sample")
    assert manifest.count == 60 and len(manifest.shards) == 3
    assert sorted(set(labels.tolist())) == list(range(10))
    assert (art / "sample" / "grid.png").stat().st_size > 0
    privacy = json.loads((art / "finetune" / "privacy.json").read_text())
    assert privacy["epsilon"] <= 10.0 and privacy["steps"] == 6
    # the samples come from the DP model and carry its guarantee
    assert json.loads((art / "sample" / "privacy.json").read_text()) == privacy
    ledger = list((art / "ledger").glob("*.json"))
    entries = json.loads(ledger[0].read_text())["entries"] if len(ledger) == 1 else None
    # the run's DP fine-tuning, then the sweep's one extra point (smoke: epsilons [2, 10],
    # 10 is the run's own model)
    assert [(e["target_epsilon"], e["status"]) for e in entries] == [(10.0, "completed"),
                                                                     (2.0, "completed")]
    with open(art / "sweep" / "curve.csv", newline="") as f:
        curve = [(float(r["epsilon"]), r["source"]) for r in csv.DictReader(f)]
    assert curve == [(0.0, "public only"), (2.0, "DP: sweep"), (10.0, "DP: this run")]
    assert (json.loads((art / "sweep" / "eps-2" / "model" / "privacy.json").read_text())
            ["epsilon"] <= 2.0)
    for stage in STAGES:
        assert json.loads((art / stage / "metrics.json").read_text())
        params = json.loads((art / stage / "params.json").read_text())
        assert params["seed"] == 0
    audit = json.loads((art / "audit" / "metrics.json").read_text())
    # the claim is the public target (the accounted epsilon gives N); 32 canaries
    # cannot test epsilon = 10, the check twin at epsilon = 1 they can
    assert audit["claimed_epsilon"] == 10.0 and audit["audit_status"] == "inconclusive"
    assert audit["audit_passed"] is False and audit["check_status"] == "passed"
    assert audit["membership_epsilon_lower_bound"] <= audit["audit_epsilon"]
    assert 0 <= audit["memorized_fraction"] <= 1 and (art / "audit" / "roc.png").is_file()
    # nothing half-written left next to the outputs
    assert not [p for p in art.iterdir() if ".tmp-" in p.name]


def test_dvc_sees_pipeline_up_to_date(repro: Path, repro_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repro,
                          env=repro_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout or "{}") == {}


def _changed(repro: Path, env: dict[str, str]) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repro,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout or "{}"))


def test_editing_the_loss_or_the_checkpoints_reruns_dp_finetuning(
        repro: Path, repro_env: dict[str, str]) -> None:
    """dvc.yaml's code deps are every module a stage imports (tests/test_registry.py):
    the loss and the checkpoint code were once missing from finetune's."""
    for module in ("diffusion/loss.py", "training/checkpoint.py"):
        path = repro / "src" / "dpsynth" / module
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"\n# an edit\n")
            changed = _changed(repro, repro_env)
        finally:
            path.write_bytes(original)
        assert "finetune" in changed, (module, changed)
        assert not changed & {"prepare", "classify", "rank", "report"}, (module, changed)
    assert _changed(repro, repro_env) == set()


def test_mlflow_groups_stage_runs_under_one_parent(repro: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repro / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dpsynth-smoke")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id],
                              filter_string="tags.`dpsynth.pipeline_id` = 'e2e-test'")
    parents = [r for r in runs if r.data.tags["dpsynth.stage"] == "pipeline"]
    children = {r.data.tags["dpsynth.stage"]: r for r in runs if r not in parents}
    assert len(parents) == 1
    nested = {k: r for k, r in children.items() if "/" in k}  # rank's one run per config
    children = {k: r for k, r in children.items() if "/" not in k}
    assert set(children) == {*STAGES, "report"}
    # the report page is logged with its run (the browser test renders it)
    assert [a.path for a in client.list_artifacts(children["report"].info.run_id)] == [
        "index.html"]
    assert sorted(nested) == [*(f"rank/config-{i:02d}" for i in range(3)), "sweep/epsilon=2"]
    for name, run in nested.items():
        parent = children[name.split("/")[0]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
    assert children["pretrain"].data.params["pretrain.steps"] == "20"
    assert children["sample"].data.params["sample.sampler"] == "dpmsolver++"
    assert "final_loss" in children["pretrain"].data.metrics
    assert children["finetune"].data.metrics["epsilon"] <= 10.0
    assert children["finetune"].data.params["finetune.aug_multiplicity"] == "2"
    history = client.get_metric_history(children["pretrain"].info.run_id, "loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    # the private split's size is derived from private data: never logged
    private_count = read_dataset(repro / "artifacts" / "prepare" / "private")[2].count
    # nor the test split's: carved out of the private pool, it would give the private size
    test_count = read_dataset(repro / "artifacts" / "prepare" / "test")[2].count
    for child in [*children.values(), *nested.values()]:
        values = list(child.data.params.values()) + list(child.data.metrics.values())
        for count in (private_count, test_count):
            assert not any(str(v) in (str(count), f"{count}.0") for v in values)
        assert not any("private_count" in k for k in [*child.data.params, *child.data.metrics])


def test_evaluation_stages_measure_the_synthetic_data(repro: Path) -> None:
    art = repro / "artifacts"
    fid = json.loads((art / "fid" / "metrics.json").read_text())
    assert fid["fd_digits_cnn"] > 0 and 0 <= fid["precision_digits_cnn"] <= 1
    assert not [k for k in fid if k.startswith("fid")]  # no Inception here: no "FID"
    classify = json.loads((art / "classify" / "metrics.json").read_text())
    with open(art / "classify" / "curve.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["num_synthetic"]) for r in curve] == [30, 60]
    assert float(curve[-1]["real_test_accuracy"]) == classify["real_test_accuracy"]
    rank = json.loads((art / "rank" / "metrics.json").read_text())
    # the smoke run's classifiers are barely trained: their synthetic validation
    # scores may all tie, and the correlation is then undefined (JSON null)
    rho = rank["spearman_rho"]
    assert rank["num_configs"] == 3 and (rho is None or -1 <= rho <= 1)
    with open(art / "rank" / "scores.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert rank["regret"] == pytest.approx(
        rank["best_real_test_accuracy"] - rank["chosen_real_test_accuracy"])
    assert (art / "rank" / "scatter.png").stat().st_size > 0


def test_mlflow_serves_the_champion_classifier(repro: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import numpy as np

    uri = f"sqlite:///{repro / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    champion = client.get_model_version_by_alias("dpsynth-classifier", "champion")
    assert client.get_model_version_by_alias("dpsynth-generator", "champion")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(repro)  # the sqlite store keeps artifact paths relative to it
    model = mlflow.pyfunc.load_model(f"models:/dpsynth-classifier/{champion.version}")
    images, labels, _ = read_dataset(repro / "artifacts" / "prepare" / "test")
    accuracy = float(np.mean(model.predict(images) == labels))
    rank = json.loads((repro / "artifacts" / "rank" / "metrics.json").read_text())
    assert accuracy == pytest.approx(rank["chosen_real_test_accuracy"], abs=1e-9)


def test_cli_reports_bad_config_with_exit_code_2(tmp_path: Path,
                                                repro_env: dict[str, str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: {steps: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "dpsynth.cli", "prepare", "--config", str(bad),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=repro_env, timeout=120)
    assert proc.returncode == 2
    assert "pretrain.steps=0: must be >= 1" in proc.stderr
    assert not (tmp_path / "out").exists()
