"""Helpers that run inside the component containers, shipped with each component.

KFP embeds a lightweight component's source in the compiled pipeline; these
functions travel with it through `additional_funcs`. So each one imports what
it needs inside its body and annotates only with built-in types. They move
files and numbers between KFP artifacts and the folders `dpsynth.stages`
reads and writes; no ML happens here.
"""


def load_config(path: str):  # -> dpsynth.config.Config (not importable at definition time)
    """The validated `Config` from the resolved YAML file that `resolve_config` writes."""
    import yaml

    from dpsynth import config

    with open(path) as f:
        return config.from_dict(yaml.safe_load(f))


def work_dir(work_root: str, stage: str, *keys: object) -> str:
    """Where a stage keeps its resumable state (checkpoints, finished shards) on the
    durable `work_root` (a PVC path or an `s3://` prefix):
    `<work_root>/<stage>-<fingerprint of keys>`. A retried task computes the same
    location from the same keys and resumes from it (open it with
    `dpsynth.io.work.work_folder`)."""
    from dpsynth.stages.common import fingerprint

    return f"{work_root.rstrip('/')}/{stage}-{fingerprint(*keys)}"


def log_metrics_file(metrics_json: str, metrics) -> None:  # metrics: Output[Metrics]
    """Copy the finite scalar values of a stage's `metrics.json` to a KFP Metrics
    artifact (what the KFP UI shows). The file holds only public numbers by
    construction (PRIVACY.md rule 6), the same ones MLflow gets."""
    import json
    import math

    with open(metrics_json) as f:
        values = json.load(f)
    for key, value in sorted(values.items()):
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value)):
            metrics.log_metric(key, float(value))


def figures_html(artifact, title: str, pngs: list) -> None:  # artifact: Output[HTML]
    """Write PNG figures, embedded, into a KFP HTML artifact (shown inline in the UI)."""
    import base64
    import html
    import os

    body = [f"<h3>{html.escape(title)}</h3>"]
    for png in pngs:
        with open(png, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        body.append(f'<p><img alt="{html.escape(os.path.basename(png))}" '
                    f'src="data:image/png;base64,{data}" style="max-width:100%"></p>')
    os.makedirs(os.path.dirname(artifact.path), exist_ok=True)
    with open(artifact.path, "w") as f:
        f.write("<!doctype html><html><body>" + "".join(body) + "</body></html>\n")
