"""An MLflow pyfunc wrapper around our checkpoints, logged as "model from code" (no pickled Python objects).

The logged model carries the checkpoint file as an artifact and loads it with ``torch.load(weights_only=True)``:

* a VQ-VAE / VQ-VAE-2: ``predict(DataFrame{"image": PNG bytes})`` -> one column of codes per level (flat lists);
* a Gaussian VAE: the same input -> ``{"recon": PNG bytes}``;
* a prior: ``predict(DataFrame{"n": [count]}, params={"seed": 0, "temperature": 1.0})`` -> flat code lists
  (unconditional top priors only; the sample step is the full sampler).
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
import torch


class CheckpointModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from steps.artifacts.checkpoints import CheckpointFile

        what, hint = "a checkpoint of this project", "log the model again"
        self.model = CheckpointFile.open(context.artifacts["checkpoint"], None, what, hint).load()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from steps.nn import registry
        from steps.nn.prior import Prior
        from steps.pixels import decode_batch, encode_png, to_uint8

        params = params or {}
        with torch.inference_mode():
            if isinstance(self.model, Prior):
                n = int(model_input["n"].iloc[0])
                gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
                temperature = float(params.get("temperature", 1.0))
                codes = registry.sampler(self.model).sample(n, temperature=temperature, generator=gen)
                return pd.DataFrame({"codes": [c.flatten().tolist() for c in codes]})
            channels = self.model.config.in_channels
            x = torch.from_numpy(decode_batch(list(model_input["image"]), channels))
            if not getattr(self.model, "levels", ()):
                recon = to_uint8(self.model(x).recon)
                return pd.DataFrame({"recon": [encode_png(img) for img in recon]})
            enc = self.model.encode(x)
            return pd.DataFrame(
                {
                    lvl: [c.flatten().tolist() for c in codes]
                    for lvl, codes in zip(self.model.levels, enc.codes, strict=True)
                }
            )


mlflow.models.set_model(CheckpointModel())
