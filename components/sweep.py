"""The `sweep` stage: the privacy-utility curve (public only, this run's DP model and
one more DP fine-tuning run per other target in `sweep.epsilons`)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE
from components.runtime import figures_html, load_config, log_metrics_file, work_dir


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, work_dir, log_metrics_file, figures_html])
def sweep(config: Input[Artifact], model: Input[Model], dp_model: Input[Model],
          private: Input[Dataset], public: Input[Dataset], test: Input[Dataset],
          baseline: Input[Artifact], classify: Input[Artifact], fid: Input[Artifact],
          work_root: str, pipeline_run_id: str, results: Output[Artifact],
          metrics: Output[Metrics], curve_plot: Output[HTML]):
    """`dpsynth sweep`: the curve of accuracy and Fréchet distance against epsilon.

    With `sweep.epsilons` empty (the default) it trains nothing and reads no private
    data. Otherwise every extra point is a DP run on the private split: all are
    reserved in the privacy ledger (`privacy.ledger_dir`) before any trains, and the
    sweep is refused whole past the dataset's budget. The work folder is per pipeline
    run, as finetune's: a retry resumes the same points (the ledger counts each once),
    a new pipeline run is a new sweep.
    """
    import os

    from dpsynth.drive import run_stage
    from dpsynth.io import work

    cfg = load_config(config.path)
    with work.work_folder(work_dir(work_root, "sweep", pipeline_run_id)) as folder:
        run_stage("sweep", cfg, inputs={
            "model": model.path, "dp_model": dp_model.path, "private": private.path,
            "public": public.path, "test": test.path, "baseline": baseline.path,
            "classify": classify.path, "fid": fid.path}, out_dir=results.path,
            work_dir=folder.path, sync_work=folder.sync)
    log_metrics_file(os.path.join(results.path, "metrics.json"), metrics)
    figures_html(curve_plot, "Privacy-utility curve: accuracy and Frechet distance vs epsilon",
                 [os.path.join(results.path, "curve.png")])
