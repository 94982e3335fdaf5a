"""`dpsynth audit`: the canary membership audit has power (the non-private
control is caught) and the DP twin stays below its claim; memorization numbers
are aggregates; bad inputs are refused before anything is written."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from dpsynth.audit import canaries
from dpsynth.config import Config
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.unet import load_model
from dpsynth.errors import InputError
from dpsynth.io.shards import write_dataset
from dpsynth.privacy.dp_sgd import DPStep, noisy_gradient
from dpsynth.privacy.per_example import use_vmap_friendly_attention
from dpsynth.stages import audit, finetune
from dpsynth.tracking import NullTracker, flatten

# Tiny but with power: 64 canaries, q = 16/~32, 80 steps at lr 4e-3 (measured:
# control AUC 0.97, bound 1.9; DP twin AUC 0.47, bound 0). Claimed epsilon 1, so
# the control -- a DP implementation that forgot clipping and noise -- would
# exceed the claim.
AUDIT = ("finetune.epsilon=1.0", "finetune.physical_batch_size=32", "audit.num_canaries=64",
         "audit.steps=80", "audit.batch_size=16", "audit.lr=4e-3", "audit.score_draws=8",
         "audit.memorization_samples=30")


class RecordingTracker(NullTracker):
    def __init__(self) -> None:
        super().__init__()
        self.values: list[Any] = []

    def log_params(self, params: dict) -> None:
        self.values += list(flatten(params).values())
        super().log_params(params)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.values += list(metrics.values())
        super().log_metrics(metrics, step)


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, make_cfg: Callable[..., Config],
            pretrained_dir: Path, private_dir: Path, digits_public_dir: Path,
            sampled_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("audit")
    cfg = make_cfg("finetune.steps=4", "finetune.batch_size=24", "finetune.aug_multiplicity=2",
                   "finetune.accountant=rdp", "finetune.noise_seed=7",
                   "finetune.checkpoint_every=2", "finetune.log_every=2",
                   "finetune.timesteps={kind: piecewise, intervals: [[0, 30], [30, 100]], "
                   "weights: [0.3, 0.7]}", f"privacy.ledger_dir={root / 'ledger'}", *AUDIT)
    images = np.random.default_rng(3).integers(0, 256, (60, 8, 8, 1), dtype=np.uint8)
    heldout = root / "heldout"
    write_dataset(heldout, images, np.arange(60) % 10, tuple(str(k) for k in range(10)),
                  source="held-out stand-in", shard_size=100)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune.run(cfg, model_dir=pretrained_dir, private_dir=private_dir,
                     public_dir=digits_public_dir, out_dir=root / "finetune",
                     tracker=NullTracker())
        tracker = RecordingTracker()
        result = audit.run(cfg, model_dir=pretrained_dir, generator_dir=root / "finetune",
                           synthetic_dir=sampled_dir, private_dir=private_dir,
                           heldout_dir=heldout, out_dir=root / "audit", tracker=tracker)
    finally:
        torch.set_num_threads(before)
    return {"cfg": cfg, "result": result, "tracker": tracker, "root": root,
            "heldout": heldout, "sampled": sampled_dir, "private": private_dir,
            "pretrained": pretrained_dir}


def test_dp_twin_stays_below_its_claim_and_the_control_does_not(audited: dict) -> None:
    r: audit.AuditResult = audited["result"]
    assert r.audit_epsilon <= 1.0 + 1e-9
    assert r.dp.epsilon_lower_bound < r.audit_epsilon
    assert r.metrics["audit_passed"] is True
    assert r.dp.auc < 0.7
    # the audit has power: the non-private control is caught, and would break the claim
    assert r.control is not None
    assert r.control.epsilon_lower_bound >= audit.POWER_EPSILON
    assert r.control.epsilon_lower_bound > r.audit_epsilon
    assert r.control.epsilon_lower_bound > r.dp.epsilon_lower_bound + 0.5
    assert r.control.auc > 0.9 and r.control.tpr_at_5pct_fpr > r.dp.tpr_at_5pct_fpr
    assert r.metrics["audit_has_power"] is True


def test_output_layout_and_metrics(audited: dict) -> None:
    out = audited["root"] / "audit"
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "params.json", "roc.png", "roc_control.csv", "roc_dp.csv",
        "version.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    claimed = json.loads((audited["root"] / "finetune" / "privacy.json").read_text())
    assert metrics["claimed_epsilon"] == claimed["epsilon"]
    assert metrics["membership_guesses"] >= metrics["membership_correct"] >= 0
    assert isinstance(metrics["membership_guesses"], int)
    assert 0 <= metrics["memorized_fraction"] <= 1
    assert "NOT covered" in metrics["memorization_note"]
    rows = (out / "roc_control.csv").read_text().splitlines()
    assert rows[0] == "fpr,tpr" and rows[-1] == "1.0,1.0"


def test_memorization_sees_samples_that_copy_the_private_split(audited: dict,
                                                               tmp_path: Path) -> None:
    from dpsynth.io.shards import read_dataset

    images, labels, manifest = read_dataset(audited["private"])
    copies = tmp_path / "copies"
    write_dataset(copies, images[:30], labels[:30], manifest.classes, source="copies",
                  shard_size=100)
    cfg = dataclasses.replace(audited["cfg"], audit=dataclasses.replace(
        audited["cfg"].audit, steps=1, control=False))
    result = audit.run(cfg, model_dir=audited["pretrained"],
                       generator_dir=audited["root"] / "finetune", synthetic_dir=copies,
                       private_dir=audited["private"], heldout_dir=audited["heldout"],
                       out_dir=tmp_path / "audit", tracker=NullTracker())
    assert result.metrics["memorized_fraction"] == 1.0
    assert result.metrics["closer_to_private_fraction"] == 1.0


def test_tracker_gets_aggregates_only(audited: dict) -> None:
    """No private-derived size reaches MLflow: not the private split's size, not
    the number of samples compared, not a per-canary or per-sample value."""
    from dpsynth.io.shards import read_manifest

    n_private = read_manifest(audited["private"]).count
    values = audited["tracker"].values
    assert n_private not in values and float(n_private) not in values
    assert all(not isinstance(v, (list, tuple, np.ndarray)) or len(v) < 10 for v in values)


def test_control_gradient_is_the_mechanism_without_clipping_or_noise(
        pretrained_dir: Path, torch_one_thread: None) -> None:
    """The control differs from the DP twin only by C = inf and sigma = 0: with a
    clip bound no gradient reaches and no noise, `noisy_gradient` gives the same."""
    spec, net, _ = load_model(pretrained_dir)
    use_vmap_friendly_attention(net)
    loss = DenoisingLoss.from_config(Config().diffusion.__class__(num_train_timesteps=100),
                                     spec.null_label)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    y = torch.arange(6) % 10
    idx = torch.tensor([0, 2, 3, 5])
    step = DPStep(noise_multiplier=0.0, max_grad_norm=1e9, expected_batch_size=3.0,
                  physical_batch_size=3, aug_multiplicity=2)
    ref = noisy_gradient(net, loss, x, y, idx, step, train_generator=torch.Generator().manual_seed(1),
                         noise_generator=torch.Generator().manual_seed(2))
    got = canaries.plain_gradient(net, loss, x, y, idx, step,
                                  train_generator=torch.Generator().manual_seed(1))
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-6, rtol=1e-4), name


def test_canaries_are_seeded_and_half_included() -> None:
    a = canaries.make_canaries(64, (8, 8, 1), 10, np.random.default_rng(5))
    b = canaries.make_canaries(64, (8, 8, 1), 10, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and a[0].dtype == np.uint8 and a[0].shape == (64, 8, 8, 1)
    inc = canaries.include_half(20000, np.random.default_rng(0))
    assert abs(inc.mean() - 0.5) < 4 * math.sqrt(0.25 / 20000)


def test_a_model_without_privacy_json_is_refused(audited: dict, tmp_path: Path) -> None:
    fake = tmp_path / "not-dp"
    shutil.copytree(audited["pretrained"], fake)
    with pytest.raises(InputError, match="no privacy.json"):
        audit.run(audited["cfg"], model_dir=audited["pretrained"], generator_dir=fake,
                  synthetic_dir=audited["sampled"], private_dir=audited["private"],
                  heldout_dir=audited["heldout"], out_dir=tmp_path / "audit",
                  tracker=NullTracker())
    assert not (tmp_path / "audit").exists()


def test_a_model_made_with_other_dp_settings_is_refused(audited: dict, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(audited["root"] / "finetune", other)
    privacy = json.loads((other / "privacy.json").read_text())
    (other / "privacy.json").write_text(json.dumps(privacy | {"max_grad_norm": 5.0}))
    with pytest.raises(InputError, match="max_grad_norm"):
        audit.run(audited["cfg"], model_dir=audited["pretrained"], generator_dir=other,
                  synthetic_dir=audited["sampled"], private_dir=audited["private"],
                  heldout_dir=audited["heldout"], out_dir=tmp_path / "audit",
                  tracker=NullTracker())
    assert not (tmp_path / "audit").exists()
