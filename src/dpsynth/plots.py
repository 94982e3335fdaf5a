"""Plots people would rather see than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def plot_loss(history: Sequence[Sequence[float]], path: str | Path, title: str) -> None:
    """Training loss against step, from `[[step, loss], ...]`, saved as PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [row[0] for row in history]
    ax.plot(steps, [row[1] for row in history], lw=1.5)
    ax.set(xlabel="step", ylabel="loss (mean over logging window)", title=title, yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_curve(sizes: Sequence[int], accuracies: Sequence[float], path: str | Path,
                        baseline: float | None = None) -> None:
    """Real test accuracy against the number of synthetic training images (the
    paper's Fig. 3), with the non-private baseline as a labelled dashed line."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(sizes, accuracies, "o-", lw=1.5, label="trained on synthetic data (DP)")
    if baseline is not None:
        ax.axhline(baseline, color="C3", ls="--", lw=1.5,
                   label="trained on real private data (non-private baseline, not DP)")
    ax.set(xlabel="number of synthetic training images", ylabel="accuracy on real test split",
           title="Downstream accuracy vs synthetic set size", xscale="log")
    ax.set_xticks(list(sizes), [str(n) for n in sizes])
    ax.minorticks_off()
    top = max([*accuracies, baseline if baseline is not None else 0.0])
    ax.set_ylim(top=min(1.0, top + 0.05) if top < 1 else 1.02)  # keep the baseline off the frame
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_rank_scatter(synthetic_val: Sequence[float], real_test: Sequence[float],
                      chosen: int, path: str | Path, title: str) -> None:
    """One point per classifier configuration: accuracy on synthetic validation
    against accuracy on the real test split (the paper's Fig. 4); the config
    chosen on synthetic validation is ringed, each point labelled by its index."""
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ax.scatter(synthetic_val, real_test, s=30, zorder=3)
    ax.scatter([synthetic_val[chosen]], [real_test[chosen]], s=160, facecolors="none",
               edgecolors="C3", lw=1.5, zorder=4, label=f"chosen (config {chosen})")
    for i, (x, y) in enumerate(zip(synthetic_val, real_test)):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    lo = min(min(synthetic_val), min(real_test))
    hi = max(max(synthetic_val), max(real_test))
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls=":", label="y = x")
    ax.set(xlabel="accuracy on synthetic validation", ylabel="accuracy on real test split",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_audit_roc(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]],
                   path: str | Path, title: str) -> None:
    """Membership-audit ROC curves, `(label, fpr, tpr)` each, on log-log axes so
    the low-FPR region (where an attack matters) is visible; chance is dotted."""
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    floor = 1e-3
    for label, fpr, tpr in curves:
        ax.plot([max(f, floor) for f in fpr], [max(t, floor) for t in tpr], lw=1.5, label=label)
    ax.plot([floor, 1], [floor, 1], color="0.6", lw=0.8, ls=":", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_privacy_utility(epsilons: Sequence[float], accuracies: Sequence[float],
                         distances: Sequence[float | None], path: str | Path, *,
                         public_accuracy: float | None, public_distance: float | None,
                         real_accuracy: float | None, distance_name: str,
                         this_run: float | None = None) -> None:
    """The privacy-utility curve (the paper's Fig. 2): downstream accuracy and the
    Fréchet distance against the target ε, with the public-only point (ε = 0,
    dashed) and the non-private real-data baseline (dotted) as reference lines;
    the point at ε = `this_run` (the run's own DP model) is starred."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    ticks = [f"{e:g}" for e in epsilons]
    left.plot(epsilons, accuracies, "o-", lw=1.5, label="DP fine-tuned, at each ε")
    if public_accuracy is not None:
        left.axhline(public_accuracy, color="C2", ls="--", lw=1.5,
                     label="public only (ε = 0, no private data)")
    if real_accuracy is not None:
        left.axhline(real_accuracy, color="C3", ls=":", lw=1.5,
                     label="real private data (non-private, not DP)")
    left.set(xlabel="target ε", ylabel="accuracy on real test split",
             title="Downstream accuracy vs ε", xscale="log")
    left.legend(fontsize=8, loc="lower right")
    points = [(e, d) for e, d in zip(epsilons, distances) if d is not None]
    right.plot([e for e, _ in points], [d for _, d in points], "o-", lw=1.5,
               label="DP fine-tuned, at each ε")
    if public_distance is not None:
        right.axhline(public_distance, color="C2", ls="--", lw=1.5,
                      label="public only (ε = 0, no private data)")
    if this_run in epsilons:
        i = list(epsilons).index(this_run)
        left.plot([this_run], [accuracies[i]], "*", color="C1", ms=12, label="this run's model")
        if distances[i] is not None:
            right.plot([this_run], [distances[i]], "*", color="C1", ms=12,
                       label="this run's model")
        left.legend(fontsize=8, loc="lower right")
    right.set(xlabel="target ε", ylabel=f"Fréchet distance ({distance_name})",
              title="Fréchet distance vs ε (lower is closer)", xscale="log")
    right.legend(fontsize=8, loc="center right")
    for ax in (left, right):
        ax.set_xticks(list(epsilons), ticks)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
