"""The generator model logged "from code" (pipeline.serving.GeneratorModel): MLflow runs this file to load it."""

import mlflow.models

from pipeline.serving import GeneratorModel

mlflow.models.set_model(GeneratorModel())
