"""Attribution methods by name (``explain.methods``), all from Captum: no attribution code here.

Every map is one per image: absolute attributions for the image's true class, summed over
channels, so a grey digit and an RGB photo both give an H×W map.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from captum.attr import IntegratedGradients, Saliency
from torch import nn

from kdsec.catalog import Catalog
from kdsec.device import device_of

# method(model, inputs, targets, baseline, ig_steps) -> signed or absolute attributions, inputs' shape
Method = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

ATTRIBUTIONS: Catalog[Method] = Catalog("attribution method", "explain.methods")

# Integrated Gradients runs ig_steps × images forward/backward passes; this many at once keeps a
# ResNet on 32×32 inputs within a few hundred MiB.
_IG_BATCH = 512


@ATTRIBUTIONS.register("integrated_gradients")
def integrated_gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, baseline: torch.Tensor,
                         ig_steps: int) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) from the baseline image to the input."""
    return IntegratedGradients(model).attribute(inputs, baselines=baseline, target=targets, n_steps=ig_steps,
                                                internal_batch_size=_IG_BATCH)


@ATTRIBUTIONS.register("saliency")
def saliency(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, baseline: torch.Tensor,
             ig_steps: int) -> torch.Tensor:
    """The input gradient's magnitude (Simonyan et al. 2014)."""
    return Saliency(model).attribute(inputs, target=targets, abs=True)


def attribution_maps(method: str, model: nn.Module, inputs: np.ndarray, targets: np.ndarray,
                     baseline: np.ndarray, ig_steps: int) -> np.ndarray:
    """|attributions| of ``targets`` for images (N, C, H, W), summed over channels: (N, H, W).
    ``baseline``: one value per channel, the image Integrated Gradients starts from (black)."""
    device = device_of(model)
    model.eval()
    x = torch.as_tensor(inputs, dtype=torch.float32, device=device).requires_grad_()
    reference = torch.as_tensor(baseline, dtype=torch.float32, device=device).reshape(1, -1, 1, 1).expand_as(x)
    with torch.enable_grad():
        attributions = ATTRIBUTIONS.get(method)(model, x, torch.as_tensor(targets, device=device), reference,
                                                ig_steps)
    return attributions.detach().abs().sum(1).float().cpu().numpy()
