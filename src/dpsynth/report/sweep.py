"""The report's privacy-utility curve (the `sweep` stage's output): accuracy and
Fréchet distance against ε, the table of its points and the samples of each
extra point. Public numbers only: the target ε of each point and its scores."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from dpsynth.report import page
from dpsynth.report.page import Section, figure, table
from dpsynth.report.values import read_json, read_png

TITLE = "Privacy–utility curve"


def _points(sweep_dir: Path) -> list[dict[str, str]]:
    path = sweep_dir / "curve.csv"
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def curve_section(sweep_dir: Path | None) -> Section:
    """The curve and its table: public only (ε = 0), each DP point (the run's own
    model starred), real data; then the samples of the points the sweep trained."""
    metrics = read_json(sweep_dir, "metrics.json")
    if sweep_dir is None or metrics is None or not (sweep_dir / "curve.csv").is_file():
        return Section("curve", TITLE, page.not_run("sweep", "privacy-utility curve"))
    rows_in = _points(sweep_dir)
    public = float(rows_in[0]["real_test_accuracy"])
    real = metrics.get("nonprivate_baseline_real_test_accuracy")
    fd = metrics.get("distance")
    space = fd.split("_", 1)[1] if fd else ""
    num = lambda v: f"{float(v):.4g}" if v not in ("", None) else "–"  # noqa: E731
    rows: list[Sequence[object]] = []
    swept = []
    for r in rows_in:
        acc = float(r["real_test_accuracy"])
        if r["source"] == "public only":
            what, privacy, gain = ("public only (ε = 0): the pre-trained model",
                                   "no private data used", "–")
        else:
            eps = float(r["epsilon"])
            own = r["source"] == "DP: this run"
            what = f"DP fine-tuned at ε = {eps:g}" + (" (this run's model)" if own else "")
            privacy, gain = "covered by (ε, δ) at its ε", f"{100 * (acc - public):+.1f}"
            if not own:
                swept.append(eps)
        rows.append((what, f"{100 * acc:.1f}%", num(r["frechet_distance"]), gain, privacy))
    if real is not None:
        rows.append(("real data (the private split, non-private)", f"{100 * real:.1f}%", "–",
                     f"{100 * (real - public):+.1f}", "NOT covered by (ε, δ): evaluation only"))
    curve = read_png(sweep_dir, "curve.png")
    body = (figure(curve, "Accuracy and Fréchet distance against the target epsilon",
                   "Left: accuracy on the real test split of the classifier trained on each "
                   "model's samples (dashed: public only, dotted: real data, not DP; the star "
                   "is this run's model). Right: Fréchet distance to the real test split "
                   "(lower is closer).") if curve else "")
    body += table(["trained on", "accuracy on the real test split",
                   f"Fréchet distance ({space})" if space else "Fréchet distance",
                   "points over public only", "privacy"], rows, numeric=(1, 2, 3))
    if not swept:
        body += ("<p>Only this run's points: <code>make sweep</code> (or <code>dvc exp run -S "
                 "'sweep.epsilons=[1,2,5,10]'</code>) adds a DP run at each target ε, each "
                 "one more entry in the dataset's privacy ledger.</p>")
        return Section("curve", TITLE, body)
    grids = "".join(figure(png, f"Samples of the model at epsilon {eps:g}", f"ε = {eps:g}",
                           pixels=True)
                    for eps in swept
                    if (png := read_png(sweep_dir / f"eps-{eps:g}", "grid.png")) is not None)
    body += page.paragraphs([
        f"The sweep's points at ε = {', '.join(f'{e:g}' for e in swept)} are DP "
        "fine-tuning runs of their own on the private data, each an (ε, δ)-DP release at "
        "its target ε and an entry in the dataset's privacy ledger (all reserved before "
        "any trained, against the dataset's budget; the run count above includes them). "
        "Releasing several points' models or samples costs their composition.",
        "Tuning on the private data is itself a release: every point here, and every other "
        "run a user makes to choose settings, spends budget in the ledger (docs/privacy.md, "
        "\"Choosing hyperparameters is a release\")."])
    body += f'<h3>Samples at each swept ε</h3><div class="figures">{grids}</div>'
    return Section("curve", TITLE, body)
