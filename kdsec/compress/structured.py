"""Structured pruning: remove whole neurons / channels and rebuild smaller layers.

Unlike magnitude pruning (zeros in dense tensors), the result is a smaller architecture — its
``ModelSpec`` names the new widths — with fewer parameters, bytes and FLOPs, and it runs faster
on any hardware. Units are ranked by the norm of the weights that produce them times the norm of
the weights that read them (a unit nobody reads, or that produces nothing, goes first).
"""

from __future__ import annotations

import torch
from torch import nn

from kdsec.errors import ConfigError
from kdsec.models import ModelSpec, build_model

SUPPORTED = ("he_mlp", "teacher_cnn", "student_cnn")


def _keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    count = max(1, len(scores) - round(fraction * len(scores)))
    return torch.sort(torch.topk(scores, count).indices).values


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [layer for layer in module.modules() if isinstance(layer, nn.Linear)]


def structured_prune(model: nn.Module, spec: ModelSpec, fraction: float) -> tuple[nn.Module, ModelSpec]:
    """A new, smaller model with ``fraction`` of the hidden neurons (MLP) or of the channels of
    every conv layer and hidden fc neurons (CNN) removed, carrying the kept weights exactly."""
    if spec.arch not in SUPPORTED:
        raise ConfigError(f"compress.structured: structured pruning supports {', '.join(SUPPORTED)}, "
                          f"not '{spec.arch}'")
    if not 0 < fraction < 1:
        raise ConfigError(f"compress.structured must be in (0, 1), got {fraction}")
    with torch.no_grad():
        if spec.arch == "he_mlp":
            return _prune_mlp(model, spec, fraction)
        return _prune_cnn(model, spec, fraction)


def _prune_mlp(model: nn.Module, spec: ModelSpec, fraction: float) -> tuple[nn.Module, ModelSpec]:
    layers = _linears(model)
    kept = [_keep(layers[i].weight.norm(dim=1) * layers[i + 1].weight.norm(dim=0), fraction)
            for i in range(len(layers) - 1)]
    new_spec = ModelSpec(spec.arch, spec.input_shape, spec.num_classes,
                         {**spec.options, "hidden": [len(k) for k in kept]})
    smaller = build_model(new_spec)
    for index, (source, target) in enumerate(zip(layers, _linears(smaller))):
        rows = kept[index] if index < len(kept) else torch.arange(source.out_features)
        cols = kept[index - 1] if index > 0 else torch.arange(source.in_features)
        target.weight.copy_(source.weight[rows][:, cols])
        target.bias.copy_(source.bias[rows])
    return smaller.eval(), new_spec


def _prune_cnn(model: nn.Module, spec: ModelSpec, fraction: float) -> tuple[nn.Module, ModelSpec]:
    convs = [layer for layer in model.features if isinstance(layer, nn.Conv2d)]
    fc1, fc2 = _linears(model.classifier)
    kept_channels = []
    for index, conv in enumerate(convs):
        produced = conv.weight.abs().sum(dim=(1, 2, 3))
        if index + 1 < len(convs):
            read = convs[index + 1].weight.abs().sum(dim=(0, 2, 3))
        else:  # the first fc reads each channel's whole map
            read = fc1.weight.abs().reshape(fc1.out_features, conv.out_channels, -1).sum(dim=(0, 2))
        kept_channels.append(_keep(produced * read, fraction))
    kept_fc = _keep(fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0), fraction)
    new_spec = ModelSpec(spec.arch, spec.input_shape, spec.num_classes,
                         {**spec.options, "channels": [len(k) for k in kept_channels], "fc": len(kept_fc)})
    smaller = build_model(new_spec)
    new_convs = [layer for layer in smaller.features if isinstance(layer, nn.Conv2d)]
    previous = torch.arange(convs[0].in_channels)
    for conv, target, kept in zip(convs, new_convs, kept_channels):
        target.weight.copy_(conv.weight[kept][:, previous])
        target.bias.copy_(conv.bias[kept])
        previous = kept
    spatial = fc1.in_features // convs[-1].out_channels
    columns = (previous[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)  # channel-major flatten
    new_fc1, new_fc2 = _linears(smaller.classifier)
    new_fc1.weight.copy_(fc1.weight[kept_fc][:, columns])
    new_fc1.bias.copy_(fc1.bias[kept_fc])
    new_fc2.weight.copy_(fc2.weight[:, kept_fc])
    new_fc2.bias.copy_(fc2.bias)
    return smaller.eval(), new_spec
