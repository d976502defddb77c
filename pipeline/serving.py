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
        from steps.nn.checkpoint import load_model

        self.model, self.payload = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from steps.images import decode_batch, encode_png, to_uint8
        from steps.nn.prior import PixelCNNPrior
        from steps.nn.sampler import sample

        params = params or {}
        with torch.inference_mode():
            if isinstance(self.model, PixelCNNPrior):
                n = int(model_input["n"].iloc[0])
                gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
                codes = sample(self.model, n, temperature=float(params.get("temperature", 1.0)), generator=gen)
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
