"""The page of `dpsynth sweep` (``artifacts/sweep/index.html``): the privacy-utility
curve in the report's style, self-contained like the report. Public numbers
only: the target ε of each point, its scores, the budget and the run count."""

from __future__ import annotations

from typing import Mapping, Sequence

import dpsynth
from dpsynth.report import page
from dpsynth.report.page import Section, esc, figure, table
from dpsynth.report.statement import delta_text

Point = tuple[float, float, float | None]  # (target ε, accuracy, Fréchet distance)


def sweep_section(points: Sequence[Point], *, public_accuracy: float,
                  public_distance: float | None, real_accuracy: float | None,
                  distance_name: str | None, curve_png: bytes) -> Section:
    """The curve and its table: public only (ε = 0), each DP point, real data."""
    num = lambda v: f"{v:.4g}" if v is not None else "–"  # noqa: E731
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    rows: list[Sequence[object]] = [
        ("public only (ε = 0): the pre-trained model", pct(public_accuracy),
         num(public_distance), "–", "no private data used")]
    rows += [(f"DP fine-tuned at ε = {eps:g}", pct(acc), num(fd),
              f"{100 * (acc - public_accuracy):+.1f}", "covered by (ε, δ)")
             for eps, acc, fd in points]
    if real_accuracy is not None:
        rows.append(("real data (the private split, non-private)", pct(real_accuracy), "–",
                     f"{100 * (real_accuracy - public_accuracy):+.1f}",
                     "NOT covered by (ε, δ): evaluation only"))
    space = distance_name.split("_", 1)[1] if distance_name else ""
    body = (figure(curve_png, "Accuracy and Fréchet distance against the target epsilon",
                   "Left: accuracy on the real test split of the classifier trained on each "
                   "model's samples (dashed: public only, dotted: real data, not DP). Right: "
                   "Fréchet distance to the real test split (lower is closer).")
            + table(["trained on", "accuracy on the real test split",
                     f"Fréchet distance ({space})" if space else "Fréchet distance",
                     "points over public only", "privacy"], rows, numeric=(1, 2, 3)))
    return Section("curve", "Privacy–utility curve", body)


def sweep_page(*, points: Sequence[Point], public_accuracy: float,
               public_distance: float | None, real_accuracy: float | None,
               distance_name: str | None, curve_png: bytes, grids: Mapping[float, bytes],
               budget_epsilon: float, budget_delta: float, delta: float,
               runs_on_record: int) -> str:
    """The whole page."""
    best = max(points, key=lambda p: p[1])
    lede = (f"DP fine-tuning at ε = {best[0]:g} (δ = {delta_text(delta)}) scores "
            f"{100 * best[1]:.1f}% on the real test split, {100 * (best[1] - public_accuracy):+.1f}"
            " points over the public-only model"
            + (f" and {100 * (real_accuracy - best[1]):.1f} points from real data"
               if real_accuracy is not None else "") + ".")
    samples = "".join(figure(grids[eps], f"Samples of the model at epsilon {eps:g}",
                             f"ε = {eps:g}", pixels=True) for eps, _, _ in points)
    privacy = page.paragraphs([
        f"Each point is its own DP fine-tuning run on the private data, an (ε, δ = "
        f"{delta_text(delta)})-DP release at its target ε. Together they are one more "
        "use of the data: the sweep reserved all of them in the dataset's privacy ledger "
        "before any trained, against the dataset's budget (ε ≤ "
        f"{budget_epsilon:g}, δ = {delta_text(budget_delta)}), which now holds "
        f"{runs_on_record} run(s). Release a point's model or samples as that point's "
        "(ε, δ) guarantee; releasing several points costs their composition.",
        "Tuning on the private data is itself a release: every point here, and every "
        "other run a user makes to choose settings, spends budget in the ledger "
        "(docs/privacy.md, \"Choosing hyperparameters is a release\")."])
    sections = [sweep_section(points, public_accuracy=public_accuracy,
                              public_distance=public_distance, real_accuracy=real_accuracy,
                              distance_name=distance_name, curve_png=curve_png),
                Section("samples", "Samples at each ε", f'<div class="figures">{samples}</div>'),
                Section("privacy", "What the sweep spent", privacy)]
    glance = [("Public only (ε = 0)", f"{100 * public_accuracy:.1f}%", "no private data")]
    glance += [(f"DP at ε = {eps:g}", f"{100 * acc:.1f}%", "accuracy, real test split")
               for eps, acc, _ in points]
    if real_accuracy is not None:
        glance.append(("Real data", f"{100 * real_accuracy:.1f}%", "non-private, not DP"))
    return page.render(
        title="Differentially private synthetic data: privacy–utility curve", lede=lede,
        warnings=[], glance=glance, sections=sections,
        footer=f"Made by dpsynth {esc(dpsynth.__version__)} (<code>dpsynth sweep</code>). "
               "Self-contained: every image is embedded and nothing is fetched from the "
               "network.")
