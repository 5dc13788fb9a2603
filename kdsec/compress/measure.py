"""What every compression variant is measured on: accuracy (validation: what the candidate is chosen
by; test: what the accuracy gate reads), parameters, non-zeros, bytes, latency."""

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
from kdsec.data import DataBundle
from kdsec.models import count_flops


LATENCY_BATCH = 256


@dataclass(frozen=True)
class VariantMetrics:
    name: str
    checkpoint: str
    test_accuracy: float
    val_accuracy: float  # the candidate is chosen on it, so the gate's test accuracy is unseen data
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


def _accuracy(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.as_tensor(inputs)).argmax(1).numpy() == labels).mean())


def measure_variant(name: str, model: nn.Module, checkpoint: Path, bundle: DataBundle, repeats: int) -> VariantMetrics:
    """Accuracy on the validation and test splits; size, latency (on test samples) and FLOPs."""
    model = model.cpu().eval()
    weights = list(_weights(model))
    x_test = bundle.x_test
    return VariantMetrics(
        name=name,
        checkpoint=str(checkpoint),
        test_accuracy=_accuracy(model, x_test, bundle.y_test),
        val_accuracy=_accuracy(model, bundle.x_val, bundle.y_val),
        params=sum(w.numel() for w in weights),
        nonzero_params=sum(int((w != 0).sum()) for w in weights),
        size_bytes=checkpoint.stat().st_size,
        latency_ms=cpu_latency_ms(model, x_test, repeats),
        batch_latency_ms=cpu_latency_ms(model, x_test, max(3, repeats // 3), batch=LATENCY_BATCH),
        flops=count_flops(model, tuple(x_test.shape[1:])),
    )
