"""`dpsynth rank`: can synthetic data choose hyperparameters? (Ghalebikesabi et
al. 2023, Sec. 5.3, Fig. 4.)

Every configuration of `rank.grid` is trained on a synthetic train split and
scored on a synthetic validation split (stratified, seeded) and on the real
test split. The synthetic validation scores alone choose the champion; the real
test scores only measure whether the synthetic ranking holds (Spearman rho,
Kendall tau, regret), with a bootstrap interval over the test examples that
tells a ranking from test-set noise. The champion classifier and the DP
generator are registered in the tracker's model registry
(`dpsynth-classifier@champion`, `dpsynth-generator@champion`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpsynth.config import Config
from dpsynth.data.splits import stratified_split
from dpsynth.devices import default_device
from dpsynth.diffusion.unet import CONFIG as GENERATOR_CONFIG
from dpsynth.diffusion.unet import EMA_WEIGHTS, WEIGHTS
from dpsynth.errors import InputError
from dpsynth.eval import ranking
from dpsynth.eval.classifier import (accuracy, predict, read_labelled,
                                     save_classifier, train)
from dpsynth.io.atomic import atomic_dir
from dpsynth.io.shards import sha256_file
from dpsynth.plots import plot_rank_scatter
from dpsynth.provenance import write_run_info
from dpsynth.stages.common import write_metrics
from dpsynth.tracking import Tracker

log = logging.getLogger(__name__)
SECTIONS = ("seed", "rank")
CLASSIFIER_NAME = "dpsynth-classifier"
GENERATOR_NAME = "dpsynth-generator"
ALIAS = "champion"
_BOOTSTRAP_STREAM = 0xB007  # the resamples' own seed stream, apart from other uses of cfg.seed


@dataclass(frozen=True, kw_only=True)
class RankResult:
    """What `run` measured and registered.

    Attributes:
        out_dir: the published folder (the champion in `out_dir / "classifier"`).
        synthetic_val_accuracy: per grid config, accuracy on synthetic validation.
        real_test_accuracy: per grid config, accuracy on the real test split.
        spearman_rho, kendall_tau: rank correlations of the two (NaN if one is constant).
        spearman_rho_ci, kendall_tau_ci: their bootstrap intervals (low, high) at
            `rank.confidence` over resamples of the real test examples ((NaN, NaN)
            when the synthetic scores are constant).
        chosen_config: index into `rank.grid`, chosen on synthetic validation only.
        regret: best real test accuracy minus the chosen config's.
        classifier_version, generator_version: registered versions, or None
            where the tracker has no registry.
    """

    out_dir: Path
    synthetic_val_accuracy: tuple[float, ...]
    real_test_accuracy: tuple[float, ...]
    spearman_rho: float
    kendall_tau: float
    spearman_rho_ci: tuple[float, float]
    kendall_tau_ci: tuple[float, float]
    chosen_config: int
    regret: float
    classifier_version: str | None
    generator_version: str | None


def summary(result: RankResult, cfg: Config) -> str:
    """The CLI's one line about a finished run."""
    ci = f"{100 * cfg.rank.confidence:g}% CI"  # bootstrap over the real test examples
    (rho_lo, rho_hi), (tau_lo, tau_hi) = result.spearman_rho_ci, result.kendall_tau_ci
    return (f"Spearman rho {result.spearman_rho:.3f} ({ci} [{rho_lo:.3f}, {rho_hi:.3f}]), "
            f"Kendall tau {result.kendall_tau:.3f} ({ci} [{tau_lo:.3f}, {tau_hi:.3f}]), "
            f"regret {result.regret:.3f}; champion = config {result.chosen_config} "
            f"(registered as dpsynth-classifier@champion)")


def _check_generator(dp_model_dir: Path, synthetic_source: str) -> None:
    """Refuse a folder that is not a DP model, or not the one that made the data."""
    weights = dp_model_dir / (EMA_WEIGHTS if (dp_model_dir / EMA_WEIGHTS).is_file() else WEIGHTS)
    if not ((dp_model_dir / GENERATOR_CONFIG).is_file() and weights.is_file()):
        raise InputError(f"{dp_model_dir}: not a model folder ({GENERATOR_CONFIG} and {WEIGHTS} "
                         "expected); pass the output of `dpsynth finetune` (artifacts/finetune)")
    if not (dp_model_dir / "privacy.json").is_file():
        raise InputError(f"{dp_model_dir}: no privacy.json, so not a DP model; "
                         "dpsynth-generator is the DP fine-tuned model (artifacts/finetune)")
    # `sample` names its model in the manifest's source: the weights' sha256 prefix
    prefix = "dpsynth-sample:"
    if synthetic_source.startswith(prefix) and not sha256_file(weights).startswith(
            synthetic_source[len(prefix):]):
        raise InputError(f"{dp_model_dir}: the synthetic set was sampled from another model "
                         f"({synthetic_source}); pass the model that made it, or re-run sample")


def run(cfg: Config, *, synthetic_dir: Path, test_dir: Path, dp_model_dir: Path,
        out_dir: Path, tracker: Tracker) -> RankResult:
    """Train and score the grid, choose on synthetic validation, publish and register.

    Args:
        cfg: resolved config (sections seed, rank).
        synthetic_dir: the synthetic set written by `sample`.
        test_dir: the real test split written by `prepare`; used for reporting only.
        dp_model_dir: the DP model (`finetune` output) that made the synthetic set;
            registered as `dpsynth-generator`.
        out_dir: gets `metrics.json`, `scores.csv`, `scatter.png`, `classifier/`
            (the champion: `model.safetensors` + `config.json`), `params.json`,
            `version.json`.
        tracker: gets params, one child run per config (`config-00`, ...), the
            summary metrics, the plot files and the two registered models.

    Raises:
        InputError: an empty split (also after the train / validation cut),
            classes or image shapes that differ, a generator folder that is not
            the DP model of this synthetic set. Nothing is written then.
    """
    rc = cfg.rank
    synthetic_dir, dp_model_dir = Path(synthetic_dir), Path(dp_model_dir)
    syn_x, syn_y, manifest = read_labelled(synthetic_dir, "synthetic set")
    test_x, test_y, _ = read_labelled(test_dir, "real test split",
                                      like=(manifest, f"synthetic set {synthetic_dir}"))
    _check_generator(dp_model_dir, manifest.source)
    split = stratified_split(syn_y, {"train": 1 - rc.val_fraction, "val": rc.val_fraction},
                             seed=cfg.seed)
    tr, va = split["train"], split["val"]
    if len(tr) < 2 or len(va) < 1:
        raise InputError(f"{synthetic_dir} (synthetic set): {len(syn_x)} images give "
                         f"{len(tr)} to train and {len(va)} to validate with "
                         f"rank.val_fraction={rc.val_fraction}; sample more or change it")
    num_classes = len(manifest.classes)
    device = default_device()
    tracker.log_params(cfg.section(*SECTIONS) | {
        # no test split size: carved from the private pool, it would give the private size
        "num_synthetic_train": len(tr), "num_synthetic_val": len(va),
        "num_configs": len(rc.grid), "device": str(device)})

    val_scores: list[float] = []
    test_scores: list[float] = []
    # per config and real test example: right or wrong, for the bootstrap. Per-example
    # values of the test split: kept in memory only, never written or logged.
    test_correct: list[np.ndarray] = []
    nets: list[torch.nn.Module] = []
    for i, ccfg in enumerate(rc.grid):
        with tracker.child(f"config-{i:02d}") as child:
            child.log_params(dataclasses.asdict(ccfg) | {"config": i})
            t0 = time.perf_counter()
            # the same seed for every config: differences come from the hyperparameters
            net = train(ccfg, syn_x[tr], syn_y[tr], num_classes=num_classes, seed=cfg.seed,
                        device=device, desc=f"rank config {i}")
            seconds = time.perf_counter() - t0
            val_scores.append(accuracy(net, syn_x[va], syn_y[va]))
            test_correct.append(predict(net, test_x) == test_y)
            test_scores.append(float(test_correct[-1].mean()))
            child.log_metrics({"synthetic_val_accuracy": val_scores[-1],
                               "real_test_accuracy": test_scores[-1],
                               "train_seconds": round(seconds, 2)})
        nets.append(net.cpu())
        log.info("config %d: synthetic val %.4f, real test %.4f", i, val_scores[-1],
                 test_scores[-1])

    # the choice sees synthetic validation only; real test scores just report
    chosen = ranking.choose(val_scores)
    rho = ranking.spearman(val_scores, test_scores)
    tau = ranking.kendall(val_scores, test_scores)
    regret = ranking.regret(test_scores, chosen)
    correct = np.stack(test_correct)  # (configs, test examples), bool

    def interval(stat: ranking.Correlation) -> tuple[float, float]:
        # one seed for both statistics: rho and tau are measured on the same resamples;
        # numpy's SeedSequence takes non-negative entropy only
        return ranking.bootstrap_interval(val_scores, correct, stat, draws=rc.bootstrap,
                                          confidence=rc.confidence,
                                          seed=[cfg.seed % 2**32, _BOOTSTRAP_STREAM])

    rho_ci, tau_ci = interval(ranking.spearman), interval(ranking.kendall)

    def finite(x: float) -> float | None:
        return None if math.isnan(x) else x

    metrics = {"spearman_rho": finite(rho), "kendall_tau": finite(tau),
               "spearman_rho_ci_low": finite(rho_ci[0]),
               "spearman_rho_ci_high": finite(rho_ci[1]),
               "kendall_tau_ci_low": finite(tau_ci[0]), "kendall_tau_ci_high": finite(tau_ci[1]),
               "ci_confidence": rc.confidence,
               "regret": regret, "chosen_config": chosen,
               "chosen_synthetic_val_accuracy": val_scores[chosen],
               "chosen_real_test_accuracy": test_scores[chosen],
               "best_real_test_accuracy": max(test_scores), "num_configs": len(rc.grid),
               "num_synthetic_train": len(tr), "num_synthetic_val": len(va)}
    with atomic_dir(out_dir) as tmp:
        save_classifier(nets[chosen], rc.grid[chosen], num_classes=num_classes,
                        channels=manifest.shape[2], image_size=manifest.shape[0],
                        out_dir=tmp / "classifier", classes=manifest.classes, extra={
                            "rank_config": chosen, "trained_on": manifest.content_hash,
                            "synthetic_val_accuracy": val_scores[chosen],
                            "real_test_accuracy": test_scores[chosen]})
        with open(tmp / "scores.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["config", "synthetic_val_accuracy", "real_test_accuracy"])
            writer.writerows(zip(range(len(rc.grid)), val_scores, test_scores))
        plot_rank_scatter(val_scores, test_scores, chosen, tmp / "scatter.png",
                          f"{len(rc.grid)} configs: Spearman {rho:.2f}, Kendall {tau:.2f}")
        write_run_info(tmp, "rank", cfg.section(*SECTIONS))
        write_metrics(tmp, metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
    tracker.log_artifact(out_dir / "scores.csv")
    tracker.log_artifact(out_dir / "scatter.png")
    classifier_version = tracker.log_model(out_dir / "classifier", kind="classifier",
                                           registered_name=CLASSIFIER_NAME, alias=ALIAS)
    generator_version = tracker.log_model(dp_model_dir, kind="generator",
                                          registered_name=GENERATOR_NAME, alias=ALIAS)
    return RankResult(out_dir=out_dir, synthetic_val_accuracy=tuple(val_scores),
                      real_test_accuracy=tuple(test_scores), spearman_rho=rho, kendall_tau=tau,
                      spearman_rho_ci=rho_ci, kendall_tau_ci=tau_ci, chosen_config=chosen,
                      regret=regret, classifier_version=classifier_version,
                      generator_version=generator_version)
