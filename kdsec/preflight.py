"""Checks that fail a run in seconds, before any training, on what a config names but cannot have."""

from __future__ import annotations

from kdsec.config import PipelineConfig
from kdsec.errors import ConfigError


def preflight(config: PipelineConfig) -> None:
    """Unknown catalog names, a loss or a stage the student cannot take (spatial features,
    structured pruning, homomorphic inference), a malformed or exposed encryption key: each is a
    one-line ``KdsecError`` now, not after training."""
    from kdsec.compress.structured import SUPPORTED as STRUCTURED_ARCHS
    from kdsec.crypto.he import HE_FRIENDLY_ARCHS
    from kdsec.crypto.keys import load_or_create_signer, local_key_provider
    from kdsec.data import DATASETS
    from kdsec.distill import LOSSES
    from kdsec.models import MODELS

    DATASETS.get(config.data.name)
    MODELS.get(config.teacher.arch)
    MODELS.get(config.student.arch)
    if LOSSES.get(config.distill.loss).feature == "spatial" and config.student.arch == "he_mlp":
        raise ConfigError(f"distill.loss '{config.distill.loss}' needs spatial feature maps, but the he_mlp "
                          "student has none; use fitnets or hinton_kd, or a conv student")
    if config.compress.structured > 0 and config.student.arch not in STRUCTURED_ARCHS:
        raise ConfigError(f"compress.structured: structured pruning supports {', '.join(STRUCTURED_ARCHS)}, "
                          f"not the '{config.student.arch}' student; set compress.structured=0")
    if config.encrypt.he.enabled and config.student.arch not in HE_FRIENDLY_ARCHS:
        raise ConfigError(f"student.arch '{config.student.arch}' has no homomorphic form (ReLU, max-pool); "
                          f"use an HE-friendly student ({', '.join(HE_FRIENDLY_ARCHS)}) or set "
                          "encrypt.he.enabled=false to ship it without encrypted inference")
    local_key_provider(config.encrypt.key_env, config.encrypt.key_file)
    load_or_create_signer(config.encrypt.signing_key_env, config.encrypt.signing_key_file)

