"""The dpsynth Kubeflow pipeline (dpsynth_pipeline.py), compiled to dpsynth.yaml."""
