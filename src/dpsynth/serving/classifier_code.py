"""MLflow models-from-code entry point for the classifier (see dpsynth.serving)."""

import mlflow.models

from dpsynth.serving.models import ClassifierModel

mlflow.models.set_model(ClassifierModel())
