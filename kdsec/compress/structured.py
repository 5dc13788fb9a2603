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

SUPPORTED = ("he_mlp", "he_cnn", "teacher_cnn", "student_cnn")


def _keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    count = max(1, len(scores) - round(fraction * len(scores)))
    return torch.sort(torch.topk(scores, count).indices).values


def _layers(module: nn.Module, kind: type[nn.Module]) -> list:
    return [layer for layer in module.modules() if isinstance(layer, kind)]


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
        if spec.arch == "he_cnn":
            return _prune_he_cnn(model, spec, fraction)
        return _prune_cnn(model, spec, fraction)


def _prune_mlp(model: nn.Module, spec: ModelSpec, fraction: float) -> tuple[nn.Module, ModelSpec]:
    linears = _layers(model, nn.Linear)
    kept = _kept_neurons(linears, fraction)
    new_spec = ModelSpec(spec.arch, spec.input_shape, spec.num_classes,
                         {**spec.options, "hidden": [len(k) for k in kept]})
    smaller = build_model(new_spec)
    _copy_linears(linears, _layers(smaller, nn.Linear), kept, torch.arange(linears[0].in_features))
    return smaller.eval(), new_spec


def _prune_cnn(model: nn.Module, spec: ModelSpec, fraction: float) -> tuple[nn.Module, ModelSpec]:
    convs = _layers(model.features, nn.Conv2d)
    linears = _layers(model.classifier, nn.Linear)
    kept_channels, (kept_fc,) = _kept_channels(convs, linears[0], fraction), _kept_neurons(linears, fraction)
    new_spec = ModelSpec(spec.arch, spec.input_shape, spec.num_classes,
                         {**spec.options, "channels": [len(k) for k in kept_channels], "fc": len(kept_fc)})
    smaller = build_model(new_spec)
    columns = _copy_convs(convs, _layers(smaller.features, nn.Conv2d), kept_channels, linears[0])
    _copy_linears(linears, _layers(smaller.classifier, nn.Linear), [kept_fc], columns)
    return smaller.eval(), new_spec


def _prune_he_cnn(model: nn.Module, spec: ModelSpec, fraction: float) -> tuple[nn.Module, ModelSpec]:
    """Conv channels (with their BatchNorm) and hidden neurons, ranked as for the other CNNs (by
    conv weights: with BatchNorm on, γ/√var also scales a channel, which the ranking ignores)."""
    convs, norms, linears = (_layers(model, kind) for kind in (nn.Conv2d, nn.BatchNorm2d, nn.Linear))
    kept_channels, kept_neurons = _kept_channels(convs, linears[0], fraction), _kept_neurons(linears, fraction)
    new_spec = ModelSpec(spec.arch, spec.input_shape, spec.num_classes,
                         {**spec.options, "channels": [len(k) for k in kept_channels],
                          "hidden": [len(k) for k in kept_neurons]})
    smaller = build_model(new_spec)
    columns = _copy_convs(convs, _layers(smaller, nn.Conv2d), kept_channels, linears[0])
    for norm, target, kept in zip(norms, _layers(smaller, nn.BatchNorm2d), kept_channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(target, name).copy_(getattr(norm, name)[kept])
        target.num_batches_tracked.copy_(norm.num_batches_tracked)
    _copy_linears(linears, _layers(smaller, nn.Linear), kept_neurons, columns)
    return smaller.eval(), new_spec


def _kept_neurons(linears: list[nn.Linear], fraction: float) -> list[torch.Tensor]:
    """Per hidden layer (every Linear but the last): the neurons kept, by produced × read norms."""
    return [_keep(linears[i].weight.norm(dim=1) * linears[i + 1].weight.norm(dim=0), fraction)
            for i in range(len(linears) - 1)]


def _kept_channels(convs: list[nn.Conv2d], reader: nn.Linear, fraction: float) -> list[torch.Tensor]:
    """Per conv layer: the channels kept, by produced × read weight magnitudes."""
    kept = []
    for index, conv in enumerate(convs):
        produced = conv.weight.abs().sum(dim=(1, 2, 3))
        if index + 1 < len(convs):
            read = convs[index + 1].weight.abs().sum(dim=(0, 2, 3))
        else:  # the first Linear layer reads each channel's whole map
            read = reader.weight.abs().reshape(reader.out_features, conv.out_channels, -1).sum(dim=(0, 2))
        kept.append(_keep(produced * read, fraction))
    return kept


def _copy_convs(convs: list[nn.Conv2d], targets: list[nn.Conv2d], kept_channels: list[torch.Tensor],
                reader: nn.Linear) -> torch.Tensor:
    """Copy the kept channels' kernels; returns the columns of ``reader`` (the first Linear) that
    read the last conv's kept channels."""
    previous = torch.arange(convs[0].in_channels)
    for conv, target, kept in zip(convs, targets, kept_channels):
        target.weight.copy_(conv.weight[kept][:, previous])
        target.bias.copy_(conv.bias[kept])
        previous = kept
    spatial = reader.in_features // convs[-1].out_channels
    return (previous[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)  # channel-major flatten


def _copy_linears(linears: list[nn.Linear], targets: list[nn.Linear], kept_neurons: list[torch.Tensor],
                  columns: torch.Tensor) -> None:
    """Copy the kept neurons' rows; the first layer reads ``columns`` of its input."""
    for index, (source, target) in enumerate(zip(linears, targets)):
        rows = kept_neurons[index] if index < len(kept_neurons) else torch.arange(source.out_features)
        cols = kept_neurons[index - 1] if index > 0 else columns
        target.weight.copy_(source.weight[rows][:, cols])
        target.bias.copy_(source.bias[rows])
