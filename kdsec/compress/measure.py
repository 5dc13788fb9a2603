"""What every compression variant is measured on: accuracy, parameters, non-zeros, bytes, latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdsec.compress.quantize import DynamicQuantLinear
from kdsec.models import count_flops


LATENCY_BATCH = 256


@dataclass(frozen=True)
class VariantMetrics:
    name: str
    checkpoint: str
    test_accuracy: float
    params: int
    nonzero_params: int
    size_bytes: int
    latency_ms: float  # one sample
    flops: int = 0  # dense FLOPs of one forward pass (structured pruning lowers it; zeros do not)
    batch_latency_ms: float = 0.0  # a batch of LATENCY_BATCH test samples (where int8 kernels pay off)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "sparsity": self.sparsity}


def _weights(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every learned tensor as float, including the int8 weights of quantized layers."""
    for module in model.modules():
        if isinstance(module, DynamicQuantLinear):
            weight, bias = module._weight_bias()
            yield weight.dequantize()
            if bias is not None:
                yield bias
        else:
            yield from (p.detach() for p in module.parameters(recurse=False))


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, sample: np.ndarray, repeats: int, batch: int = 1) -> float:
    """Median wall time of one forward pass over ``batch`` samples (default: one) on CPU, after a warm-up."""
    model = model.cpu().eval()
    inputs = torch.as_tensor(sample[:batch])
    for _ in range(3):
        model(inputs)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(inputs)
        timings.append((time.perf_counter() - start) * 1e3)
    return statistics.median(timings)


def measure_variant(name: str, model: nn.Module, checkpoint: Path, x_test: np.ndarray, y_test: np.ndarray,
                    repeats: int) -> VariantMetrics:
    model = model.cpu().eval()
    with torch.inference_mode():
        predictions = model(torch.as_tensor(x_test)).argmax(1).numpy()
    weights = list(_weights(model))
    return VariantMetrics(
        name=name,
        checkpoint=str(checkpoint),
        test_accuracy=float((predictions == y_test).mean()),
        params=sum(w.numel() for w in weights),
        nonzero_params=sum(int((w != 0).sum()) for w in weights),
        size_bytes=checkpoint.stat().st_size,
        latency_ms=cpu_latency_ms(model, x_test, repeats),
        batch_latency_ms=cpu_latency_ms(model, x_test, max(3, repeats // 3), batch=LATENCY_BATCH),
        flops=count_flops(model, tuple(x_test.shape[1:])),
    )
