"""The MLflow signatures of the registered models, read from a model folder's
config.json (no dpsynth model code: logging a model must not import it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def signature(kind: str, model_dir: Path) -> Any:
    """The MLflow signature of a model folder: tensor shapes from its config.json,
    and the generator's sampling params (so `predict(..., params=...)` accepts them)."""
    import json

    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    shape = raw["unet"] if kind == "generator" else raw
    image = (-1, shape["image_size"], shape["image_size"], shape["channels"])
    if kind == "classifier":
        return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), image)]),
                              outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), image)]),
        params=ParamSchema([ParamSpec("seed", "long", 0),
                            ParamSpec("num_inference_steps", "long", 25),
                            ParamSpec("sampler", "string", "dpmsolver++"),
                            ParamSpec("guidance_scale", "double", 1.0)]))
