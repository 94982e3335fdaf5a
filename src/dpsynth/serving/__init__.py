"""MLflow pyfunc wrappers so registered models load with
`mlflow.pyfunc.load_model("models:/dpsynth-classifier@champion")`.

Logged as MLflow "models from code" (`classifier_code.py`, `generator_code.py`):
the model is the safetensors weights + config.json plus this code, never a
pickle (DESIGN.md "Models").
"""
