"""The audit stage: an empirical check of the DP guarantee and of memorization."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE
from components.runtime import figures_html, load_config, log_metrics_file


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, log_metrics_file, figures_html])
def audit(config: Input[Artifact], model: Input[Model], dp_model: Input[Model],
          synthetic: Input[Dataset], private: Input[Dataset], test: Input[Dataset],
          results: Output[Artifact], metrics: Output[Metrics], roc: Output[HTML]):
    """`dpsynth audit`: a one-run canary membership audit of a twin of the fine-tuning
    run and of a check twin at `audit.check_epsilon` (public canaries only: no private
    budget spent), with a non-private control,
    and memorization of `private` by the samples (aggregates only). `model` is the
    pre-trained model the twin starts from, `dp_model` carries the claim."""
    import os

    from dpsynth.drive import run_stage

    cfg = load_config(config.path)
    run_stage("audit", cfg, inputs={"model": model.path, "dp_model": dp_model.path,
                                    "synthetic": synthetic.path, "private": private.path,
                                    "test": test.path}, out_dir=results.path)
    log_metrics_file(os.path.join(results.path, "metrics.json"), metrics)
    figures_html(roc, "Canary membership audit: DP twins vs non-private control",
                 [os.path.join(results.path, "roc.png")])
