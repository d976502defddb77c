"""The generator model logged "from code" (pipeline.serving.mlflow_models.GeneratorModel): MLflow runs this file to load
it."""

import mlflow.models

from pipeline.serving.mlflow_models import GeneratorModel

mlflow.models.set_model(GeneratorModel())
