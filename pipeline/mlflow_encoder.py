"""The encoder model logged "from code" (pipeline.serving.EncoderModel): MLflow runs this file to load it."""

import mlflow.models

from pipeline.serving import EncoderModel

mlflow.models.set_model(EncoderModel())
