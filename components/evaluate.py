"""The evaluation stages: `fid`, `classify`, `rank` (each reads the merged synthetic
set) and `baseline` (the public-only point: samples the pre-trained model itself).

Each publishes the stage's folder (as in `artifacts/<stage>/`) as `results` and
its scalar metrics as a KFP Metrics artifact; metrics that touch the real test
split say so in their names, as in MLflow.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE, GPU_IMAGE
from components.runtime import figures_html, load_config, log_metrics_file


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, log_metrics_file])
def fid(config: Input[Artifact], synthetic: Input[Dataset], test: Input[Dataset],
        public: Input[Dataset], results: Output[Artifact], metrics: Output[Metrics]):
    """`dpsynth fid`: Frechet distance, KID, precision/recall between the synthetic
    set and the real test split; the domain CNN is trained on `public`."""
    import os

    from dpsynth.drive import run_stage

    cfg = load_config(config.path)
    run_stage("fid", cfg, inputs={"synthetic": synthetic.path, "test": test.path,
                                  "public": public.path}, out_dir=results.path)
    log_metrics_file(os.path.join(results.path, "metrics.json"), metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, log_metrics_file, figures_html])
def classify(config: Input[Artifact], synthetic: Input[Dataset], test: Input[Dataset],
             private: Input[Dataset], results: Output[Artifact], metrics: Output[Metrics],
             curve: Output[HTML]):
    """`dpsynth classify`: accuracy on the real test split of classifiers trained on
    synthetic data, against the number of synthetic images. `private` is read only
    for the labelled non-private baseline (`classify.real_baseline`)."""
    import os

    from dpsynth.drive import run_stage

    cfg = load_config(config.path)
    run_stage("classify", cfg, inputs={
        "synthetic": synthetic.path, "test": test.path,
        "private": private.path if cfg.classify.real_baseline else None},
        out_dir=results.path)
    log_metrics_file(os.path.join(results.path, "metrics.json"), metrics)
    figures_html(curve, "Real test accuracy vs number of synthetic training images",
                 [os.path.join(results.path, "curve.png")])


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, log_metrics_file])
def baseline(config: Input[Artifact], model: Input[Model], public: Input[Dataset],
             test: Input[Dataset], results: Output[Artifact], metrics: Output[Metrics]):
    """`dpsynth baseline`: the pre-trained model (epsilon 0) sampled like the DP model and
    scored with the classify and fid recipes; never given the private split."""
    import os

    from dpsynth.drive import run_stage

    cfg = load_config(config.path)
    run_stage("baseline", cfg, inputs={"model": model.path, "public": public.path,
                                       "test": test.path}, out_dir=results.path)
    log_metrics_file(os.path.join(results.path, "metrics.json"), metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False,
               additional_funcs=[load_config, log_metrics_file, figures_html])
def rank(config: Input[Artifact], synthetic: Input[Dataset], test: Input[Dataset],
         dp_model: Input[Model], results: Output[Artifact], metrics: Output[Metrics],
         scatter: Output[HTML]):
    """`dpsynth rank`: train the classifier grid on synthetic data, choose on synthetic
    validation, measure the ranking on the real test split; registers the champion
    classifier and the DP generator in MLflow. `results/classifier` is the champion."""
    import os

    from dpsynth.drive import run_stage

    cfg = load_config(config.path)
    run_stage("rank", cfg, inputs={"synthetic": synthetic.path, "test": test.path,
                                   "dp_model": dp_model.path}, out_dir=results.path)
    log_metrics_file(os.path.join(results.path, "metrics.json"), metrics)
    figures_html(scatter, "Classifier configurations: synthetic validation vs real test "
                 "accuracy", [os.path.join(results.path, "scatter.png")])
