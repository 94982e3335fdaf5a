"""The short summary `make run` prints: what ran, where the outputs are, and
how to look at them in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from dpsynth.stages.registry import STAGES as _REGISTRY

# the stages whose outputs it lists, in pipeline order (the report has its own line)
STAGES = tuple(name for name in _REGISTRY if name != "report")
WHAT = {name: _REGISTRY[name].produces for name in STAGES}


def summarize(artifacts: Path, seconds: float | None = None) -> str:
    """Human-readable summary of the stage outputs under `artifacts`."""
    lines = ["", "dpsynth pipeline" + (f" finished in {seconds:.0f} s" if seconds else "")]
    for stage in STAGES:
        out = artifacts / stage
        metrics_file = out / "metrics.json"
        if not metrics_file.is_file():
            lines.append(f"  {stage:<9} not run")
            continue
        metrics = json.loads(metrics_file.read_text())
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in metrics.items()
                          if isinstance(v, (int, float)))  # notes and curves: see the file
        lines.append(f"  {stage:<9} {out}/  ({WHAT[stage]})")
        lines.append(f"  {'':<9} {shown}")
    grid = artifacts / "sample" / "grid.png"
    if grid.is_file():
        lines.append(f"\n  samples per class: {grid}")
    report = artifacts / "report" / "index.html"
    lines.append(f"  report:  {report}  (open in a browser: the privacy statement, samples, "
                 "metrics, plots and provenance on one self-contained page to hand on)"
                 if report.is_file() else "  report:  not made (dpsynth report)")
    lines += [
        "",
        "  MLflow:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000",
        "           then open http://127.0.0.1:5000 (experiment 'dpsynth', one parent run per",
        "           pipeline run, one child run per stage); Models tab: dpsynth-classifier@champion,",
        "           dpsynth-generator",
        "  Plots:   .venv/bin/dvc plots show   (writes dvc_plots/index.html)",
        "  Metrics: .venv/bin/dvc metrics show",
        "",
    ]
    return "\n".join(lines)
