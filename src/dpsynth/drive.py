"""One way to run a stage, for every driver: the CLI's stage commands (so `dvc
repro`), the Kubeflow components and the tests.

`run_stage` takes the stage's inputs by their registered names
(`dpsynth.stages.registry`), each a local folder or an ``s3://`` URI: an S3
input becomes its verified local copy, an S3 output a local folder published
when the stage succeeds (with the stage's work folder mirrored for
resumption). Under torchrun only the main process opens the MLflow run; the
others get a tracker that records nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping

from dpsynth.config import Config
from dpsynth.stages import registry
from dpsynth.tracking import NullTracker, Tracker, open_tracker


def is_main_process() -> bool:
    """False on every torchrun worker but rank 0 (which alone reports)."""
    from dpsynth.devices import torchrun_process

    return torchrun_process().is_main


def run_stage(name: str, cfg: Config, *, inputs: Mapping[str, str | Path | None],
              out_dir: str | Path, tracker: Tracker | None = None, **options: Any) -> Any:
    """Run stage `name` on `inputs` into `out_dir`; its `run`'s result.

    Args:
        name: a registered stage.
        cfg: the resolved config.
        inputs: input folders (or ``s3://`` URIs) by registered name; an optional
            input may be left out or None.
        out_dir: the output folder or ``s3://`` URI, published atomically.
        tracker: where to report (default: the stage's MLflow run, on the main
            process only).
        options: the stage's other keywords (``resume``, ``work_dir``,
            ``sync_work``...). A resumable stage (the registry's ``resumable``) gets
            ``sync_work``, the upload of its output's mirrored work folder, unless
            given here (a driver that chose the work folder itself).

    Raises:
        ValueError: an input the stage does not take, or a required one missing.
    """
    from dpsynth.io import published, s3, work

    row = registry.stage(name)
    known = {i.name for i in row.inputs}
    if unknown := sorted(set(inputs) - known):
        raise ValueError(f"{name}: unknown input(s) {unknown}; it takes {sorted(known)}")
    if missing := [i.name for i in row.inputs if i.required and inputs.get(i.name) is None]:
        raise ValueError(f"{name}: input(s) {missing} are required")
    s3.configure(cfg.storage)
    main = is_main_process()
    with contextlib.ExitStack() as stack:
        kwargs = {i.kwarg: (None if inputs.get(i.name) is None else
                            stack.enter_context(published.local_input(inputs[i.name])))
                  for i in row.inputs}
        staged = stack.enter_context(work.publish(out_dir, main=main))
        if row.resumable:  # a driver that chose the work folder passes its own sync
            options = {"sync_work": staged.sync} | dict(options)
        if tracker is None:
            tracker = stack.enter_context(open_tracker(cfg.tracking, name) if main
                                          else contextlib.nullcontext(NullTracker()))
        return row.load().run(cfg, **kwargs, out_dir=staged.path, tracker=tracker, **options)
