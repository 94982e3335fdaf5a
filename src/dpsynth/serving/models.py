"""The pyfunc classes behind the registered models.

`ClassifierModel.predict` takes uint8 images (N, H, W, C) and returns class
indices. `GeneratorModel.predict` takes class labels and returns uint8 images
(N, H, W, C) sampled from the DP model: post-processing, so they carry the
model's (epsilon, delta) (see the model's privacy.json artifact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

MODEL_ARTIFACT = "model"  # key of the model folder in the pyfunc's artifacts


def _as_array(model_input: Any, column: str) -> np.ndarray:
    """ndarray from an ndarray, a dict or a pandas DataFrame (pyfunc's input types)."""
    if isinstance(model_input, np.ndarray):
        return model_input
    if isinstance(model_input, dict):
        return np.asarray(model_input[column])
    if hasattr(model_input, "columns"):  # pandas
        return np.asarray(model_input[column].tolist())
    return np.asarray(model_input)


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """A downstream classifier trained on synthetic data (the `rank` stage's champion)."""

    def load_context(self, context: Any) -> None:
        from dpsynth.eval.classifier import load_classifier

        self.net, self.meta = load_classifier(Path(context.artifacts[MODEL_ARTIFACT]))

    # model_input is left unannotated: MLflow reads a type hint as the input schema;
    # the schema is the signature logged with the model (`signature`).
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """Args: uint8 images (N, H, W, C) (or a dict / DataFrame with column `images`).
        Returns: int64 class indices (N,)."""
        from dpsynth.eval.classifier import predict

        images = _as_array(model_input, "images").astype(np.uint8)
        return predict(self.net, images)


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """The DP diffusion model: labels in, synthetic images out."""

    def load_context(self, context: Any) -> None:
        from dpsynth.diffusion.unet import load_model

        import json

        from dpsynth.config import DiffusionConfig

        model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        self.spec, self.net, _ = load_model(model_dir)
        # the forward process the model was trained with (params.json of its stage)
        raw = json.loads((model_dir / "params.json").read_text())["diffusion"]
        self.diffusion = DiffusionConfig(
            num_train_timesteps=raw["num_train_timesteps"], beta_schedule=raw["beta_schedule"],
            prediction_type=raw["prediction_type"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """Args: class labels (N,) (or a dict / DataFrame with column `labels`); params
        `seed` (default 0), `num_inference_steps` (25), `sampler` ("dpmsolver++"),
        `guidance_scale` (1.0).
        Returns: uint8 images (N, H, W, C)."""
        import torch

        from dpsynth.diffusion.loss import make_noise_schedule
        from dpsynth.diffusion.samplers import make_sampler, sample, to_uint8

        params = params or {}
        labels = torch.as_tensor(_as_array(model_input, "labels").astype(np.int64)).reshape(-1)
        gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
        with torch.no_grad():
            x = sample(self.net, make_sampler(params.get("sampler", "dpmsolver++"),
                                              make_noise_schedule(self.diffusion)),
                       labels, (self.spec.channels, self.spec.image_size, self.spec.image_size),
                       num_inference_steps=int(params.get("num_inference_steps", 25)),
                       guidance_scale=float(params.get("guidance_scale", 1.0)),
                       null_label=self.spec.null_label, generator=gen)
        return to_uint8(x).numpy()
