"""The report stage: one self-contained HTML page about the run, for the data owner."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from components.images import CPU_IMAGE
from components.runtime import load_config


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, additional_funcs=[load_config])
def report(config: Input[Artifact], public: Input[Dataset], test: Input[Dataset],
           model: Input[Model], dp_model: Input[Model], synthetic: Input[Dataset],
           fid: Input[Artifact], classify: Input[Artifact], baseline: Input[Artifact],
           sweep: Input[Artifact], rank: Input[Artifact], audit: Input[Artifact],
           results: Output[Artifact], page: Output[HTML]):
    """`dpsynth report`: the privacy statement, samples next to real test images,
    fidelity, downstream accuracy, the privacy-utility curve, the ranking check,
    training curves, the audit and the provenance, on one page (`page`, shown in the
    KFP UI; also `results/index.html` and in MLflow). The task is not given the private split: the page states the
    privacy ledger's total as the DP run recorded it when it finished."""
    import os
    import shutil
    from pathlib import Path

    from dpsynth.stages import report as stage
    from dpsynth.tracking import open_tracker

    cfg = load_config(config.path)
    folders = {"public": public, "test": test, "pretrain": model, "finetune": dp_model,
               "sample": synthetic, "fid": fid, "classify": classify,
               "baseline": baseline, "sweep": sweep, "rank": rank, "audit": audit}
    with open_tracker(cfg.tracking, "report") as tracker:
        result = stage.run(cfg, artifacts={k: Path(a.path) for k, a in folders.items()},
                           out_dir=Path(results.path), tracker=tracker)
    os.makedirs(os.path.dirname(page.path), exist_ok=True)
    shutil.copyfile(result.index, page.path)
