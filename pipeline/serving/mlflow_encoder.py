"""The encoder model logged "from code" (pipeline.serving.mlflow_models.EncoderModel): MLflow runs this file to load
it."""

import mlflow.models

from pipeline.serving.mlflow_models import EncoderModel

mlflow.models.set_model(EncoderModel())
