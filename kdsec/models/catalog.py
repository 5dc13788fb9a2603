"""Architectures by name: ``MODELS`` maps ``teacher.arch`` / ``student.arch`` to a builder."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdsec.catalog import Catalog
from kdsec.models.spec import ModelSpec

MODELS: Catalog[Callable[..., nn.Module]] = Catalog("model architecture", "teacher.arch / student.arch")


def build_model(spec: ModelSpec) -> nn.Module:
    return MODELS.get(spec.arch)(input_shape=spec.input_shape, num_classes=spec.num_classes, **spec.options)
