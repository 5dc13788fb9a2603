"""Intermediate features through forward hooks on named modules.

A ``Tap`` names a module and whether its input or its output is read. ``auto`` resolves per
loss: for spatial (attention) losses, the last module whose output is a feature map larger than
1×1 (the deepest conv stage); for any-shape (hint) losses, the input of the last Linear layer
(the penultimate representation), which every architecture in the registry has.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdsec.device import device_of
from kdsec.errors import ConfigError


@dataclass(frozen=True)
class Tap:
    module: str
    read: str = "output"  # "output" or "input"

    def describe(self) -> str:
        return f"{self.read} of '{self.module}'"


def _probe(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """(name, module, input, output) of every leaf module, in call order, for one forward pass."""
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def hook(mod, inputs, output, name=name):
                if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                    calls.append((name, mod, inputs[0].detach(), output.detach()))
            handles.append(module.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(sample)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def resolve_tap(model: nn.Module, layer: str, kind: str, sample: torch.Tensor, role: str) -> Tap:
    """The tap for ``layer`` (a module name from ``named_modules()``, or ``auto``) on ``model``."""
    if layer != "auto":
        names = dict(model.named_modules())
        if layer not in names or not layer:
            known = ", ".join(name for name in names if name)
            raise ConfigError(f"distill.{role}_layer: the {role} has no module named '{layer}' (known: {known})")
        tap = Tap(layer)
    else:
        calls = _probe(model, sample)
        if kind == "spatial":
            maps = [name for name, _, _, out in calls if out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1]
            if not maps:
                raise ConfigError(f"distill.loss needs spatial feature maps, but the {role} "
                                  f"({type(model).__name__}) has none; use fitnets or hinton_kd")
            tap = Tap(maps[-1])
        else:
            linears = [name for name, module, _, _ in calls if isinstance(module, nn.Linear)]
            if not linears:
                raise ConfigError(f"distill.{role}_layer: no Linear layer in the {role} to take a hint from; "
                                  "name a module")
            tap = Tap(linears[-1], "input")
    feature = read_feature(model, tap, sample)
    if kind == "spatial" and feature.dim() != 4:
        raise ConfigError(f"distill.loss needs spatial feature maps, but the {tap.describe()} of the {role} "
                          f"has shape {tuple(feature.shape[1:])}")
    return tap


@contextmanager
def capture(model: nn.Module, tap: Tap) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``store['feature']`` holds the tapped tensor of the latest forward pass
    (with its autograd graph, so a loss on it trains the model)."""
    store: dict[str, torch.Tensor] = {}
    module = model.get_submodule(tap.module)

    def hook(mod, inputs, output):
        store["feature"] = inputs[0] if tap.read == "input" else output

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def read_feature(model: nn.Module, tap: Tap, inputs: torch.Tensor) -> torch.Tensor:
    with capture(model, tap) as store, torch.no_grad():
        was_training = model.training
        model.eval()
        model(inputs)
        model.train(was_training)
    return store["feature"].detach()


@torch.no_grad()
def teacher_signals(teacher: nn.Module, inputs: np.ndarray, tap: Tap | None = None, target=None,
                    batch_size: int = 512) -> dict[str, torch.Tensor]:
    """The teacher's logits (and, given a tap, ``target(feature)``) on every input, computed once."""
    teacher.eval()
    device = device_of(teacher)
    logits, features = [], []
    for start in range(0, len(inputs), batch_size):
        batch = torch.as_tensor(inputs[start:start + batch_size], device=device)
        if tap is None:
            logits.append(teacher(batch).float().cpu())
            continue
        with capture(teacher, tap) as store:
            logits.append(teacher(batch).float().cpu())
        feature = store["feature"].detach()
        features.append((target(feature) if target is not None else feature).float().cpu())
    signals = {"logits": torch.cat(logits) if logits else torch.empty(0)}
    if features:
        signals["feature"] = torch.cat(features)
    return signals
