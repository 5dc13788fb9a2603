"""The MLflow pyfunc wrapper a user loads with ``mlflow.pyfunc.load_model``.

It takes rows of raw pixel values (0–16 for digits, 0–255 for 8-bit images) as a numpy array or
a DataFrame of any integer or float dtype (uint8 images, int64 from JSON, float32 or float64), and
returns class labels. The model checks its input itself (numeric, row width, pixel range): its
MLflow signature declares the output only, since MLflow's input enforcement would refuse every
dtype but the one declared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch


def check_pixel_range(values: np.ndarray, input_scale: float) -> None:
    """Raw pixels lie in [0, 1/input_scale] (0–16 for digits, 0–255 for 8-bit images). Values
    outside, or a batch that looks already scaled to [0, 1] where the range is wider, would give
    silently wrong labels: refused with what was expected."""
    high = 1.0 / input_scale
    low_seen, high_seen = float(np.min(values)), float(np.max(values))
    if not (np.isfinite(low_seen) and np.isfinite(high_seen)) or low_seen < 0 or high_seen > high * (1 + 1e-6):
        raise ValueError(f"pixel values must be raw values in [0, {high:g}]; got values in [{low_seen:g}, {high_seen:g}]")
    if high >= 2 and 0 < high_seen <= 1:
        raise ValueError(f"pixel values look scaled to [0, 1]; send raw values in [0, {high:g}] (the model scales them)")


class StudentModel(mlflow.pyfunc.PythonModel):
    """Loads a float or int8 safetensors checkpoint; predicts class labels."""

    def load_context(self, context) -> None:
        from kdsec.compress.quantize import load_weights

        info = json.loads(Path(context.artifacts["serving"]).read_text())
        checkpoint = Path(context.artifacts["checkpoint"])
        self.model, self.spec, _ = load_weights(checkpoint)  # float, int8 or static int8, as the file says
        self.model.eval()
        self.input_scale = float(info["input_scale"])
        self.class_names = list(info["class_names"])
        normalization = info.get("normalization")
        self.mean, self.std = ((torch.tensor(v, dtype=torch.float32)[None, :, None, None] for v in normalization)
                               if normalization else (None, None))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        values = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        if values.dtype.kind not in "iuf":  # any integer or float width: uint8 images, int64 JSON, float32 arrays
            raise ValueError(f"pixel values must be integers or floats; got {values.dtype} values")
        values = values.astype(np.float64, copy=False)
        features = math.prod(self.spec.input_shape)
        values = values.reshape(len(values), -1)
        if values.shape[1] != features:
            raise ValueError(f"expected {features} pixel values per row, got {values.shape[1]}")
        check_pixel_range(values, self.input_scale)
        inputs = torch.as_tensor(values.astype(np.float32) * self.input_scale).reshape(-1, *self.spec.input_shape)
        if self.mean is not None:
            inputs = (inputs - self.mean) / self.std
        with torch.inference_mode():
            return self.model(inputs).argmax(1).numpy()
