"""Structured pruning rebuilds smaller layers that compute exactly what the kept units computed."""

import copy

import pytest
import torch
from torch import nn

from kdsec.compress import structured_prune
from kdsec.errors import ConfigError
from kdsec.models import ModelSpec, build_model, count_flops, count_parameters, load_checkpoint, save_checkpoint


def _masked(model: nn.Module, smaller_spec: ModelSpec, spec: ModelSpec, kept_by_layer) -> nn.Module:
    """The original with every removed unit silenced (its weights and bias zero)."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        layers = kept_by_layer(masked)
        # a BatchNorm after a conv (he_cnn's come first) silences the same channels: γ = β = 0
        norms = [(norm, kept) for norm, (_, kept) in
                 zip([m for m in masked.modules() if isinstance(m, nn.BatchNorm2d)], layers)]
        for layer, kept in [*layers, *norms]:
            drop = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            drop[kept] = False
            layer.weight[drop] = 0
            layer.bias[drop] = 0
    return masked


def _kept(original: nn.Linear | nn.Conv2d, smaller: nn.Linear | nn.Conv2d) -> torch.Tensor:
    """Which of the original's output units survive: match their bias values."""
    return torch.tensor([int(torch.nonzero(original.bias == value)[0]) for value in smaller.bias])


@pytest.mark.parametrize("spec", [ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [32, 16]}),
                                  ModelSpec("student_cnn", (3, 16, 16), 10, {"channels": [8, 16], "fc": 32}),
                                  ModelSpec("teacher_cnn", (1, 8, 8), 10, {"channels": [32, 64], "fc": 128}),
                                  ModelSpec("he_cnn", (1, 8, 8), 10, {"channels": [8, 4], "kernel": 3, "stride": 1,
                                                                     "conv_pool": 2, "hidden": [16]}),
                                  ModelSpec("he_cnn", (1, 8, 8), 10, {"channels": [8, 4], "kernel": 3, "stride": 1,
                                                                     "conv_pool": 2, "hidden": [16],
                                                                     "batchnorm": True})])
def test_smaller_model_equals_the_original_with_removed_units_silenced(spec, tmp_path):
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # distinct biases make units identifiable
            parameter.add_(torch.randn_like(parameter) * 0.05)
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics must be copied too
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    smaller, smaller_spec = structured_prune(model, spec, 0.5)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    new_layers = [m for m in smaller.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    for old, new in zip(layers, new_layers):
        assert new.weight.shape[0] == old.weight.shape[0] // 2
    masked = _masked(model, smaller_spec, spec, lambda m: [
        (layer, _kept(old, new)) for layer, old, new in
        zip([x for x in m.modules() if isinstance(x, (nn.Linear, nn.Conv2d))][:-1], layers, new_layers)])
    inputs = torch.rand(16, *spec.input_shape)
    with torch.no_grad():
        assert torch.allclose(smaller(inputs), masked(inputs), atol=1e-5)
    params, smaller_params = count_parameters(model)[0], count_parameters(smaller)[0]
    assert smaller_params < 0.6 * params
    assert count_flops(smaller, spec.input_shape) < 0.6 * count_flops(model, spec.input_shape)
    # the spec names the new widths, so the checkpoint rebuilds the smaller model
    reloaded, reloaded_spec = load_checkpoint(save_checkpoint(smaller, smaller_spec, tmp_path / "s.safetensors"))
    assert reloaded_spec == smaller_spec
    with torch.no_grad():
        assert torch.equal(reloaded(inputs), smaller(inputs))


def test_unsupported_architecture_is_a_config_error():
    spec = ModelSpec("resnet18", (3, 32, 32), 10, {"width": 8})
    with pytest.raises(ConfigError, match="compress.structured"):
        structured_prune(build_model(spec), spec, 0.5)
