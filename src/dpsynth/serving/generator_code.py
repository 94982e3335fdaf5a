"""MLflow models-from-code entry point for the generator (see dpsynth.serving)."""

import mlflow.models

from dpsynth.serving.models import GeneratorModel

mlflow.models.set_model(GeneratorModel())
