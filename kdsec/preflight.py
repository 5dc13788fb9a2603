"""Checks that fail a run in seconds, before any training, on what a config names but cannot have."""

from __future__ import annotations

from kdsec.config import PipelineConfig
from kdsec.errors import ConfigError


def preflight(config: PipelineConfig) -> None:
    """Unknown catalog names, a loss or a stage the student cannot take (spatial features,
    structured pruning, homomorphic inference, an HE layout that does not fit), a malformed or
    exposed encryption key, a Dask cluster (``compute.dask_address``) that does not answer or
    whose workers lack our packages: each is a one-line ``KdsecError`` now, not after training."""
    from kdsec.compress.structured import SUPPORTED as STRUCTURED_ARCHS
    from kdsec.he import HE_FRIENDLY_ARCHS
    from kdsec.crypto.keys import load_or_create_signer, local_key_provider
    from kdsec.data import DATASETS, DECLARED_SHAPES
    from kdsec.distill import LOSSES
    from kdsec.models import MODELS

    DATASETS.get(config.data.name)
    MODELS.get(config.teacher.arch)
    MODELS.get(config.student.arch)
    if LOSSES.get(config.distill.loss).feature == "spatial" and config.student.arch == "he_mlp":
        raise ConfigError(f"distill.loss '{config.distill.loss}' needs spatial feature maps, but the he_mlp "
                          "student has none; use fitnets or hinton_kd, or a conv student (e.g. he_cnn)")
    if config.compress.structured > 0 and config.student.arch not in STRUCTURED_ARCHS:
        raise ConfigError(f"compress.structured: structured pruning supports {', '.join(STRUCTURED_ARCHS)}, "
                          f"not the '{config.student.arch}' student; set compress.structured=0")
    if config.encrypt.he.enabled and config.student.arch not in HE_FRIENDLY_ARCHS:
        raise ConfigError(f"student.arch '{config.student.arch}' has no homomorphic form (ReLU, max-pool); "
                          f"use an HE-friendly student ({', '.join(HE_FRIENDLY_ARCHS)}) or set "
                          "encrypt.he.enabled=false to ship it without encrypted inference")
    if config.encrypt.he.enabled and config.data.name in DECLARED_SHAPES:
        _check_he_layouts(config, *DECLARED_SHAPES[config.data.name])
    local_key_provider(config.encrypt.key_env, config.encrypt.key_file)
    load_or_create_signer(config.encrypt.signing_key_env, config.encrypt.signing_key_file)
    if config.compute.dask_address:  # reachable, with workers that run our code and packages
        from kdsec.compute import preflight_cluster

        preflight_cluster(config.compute.dask_address, config.compute.connect_timeout)


def _check_he_layouts(config: PipelineConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
    """The HE layouts (which depend on shapes, not weights) of the smallest candidate each sweep
    member can ship — structurally pruned when ``compress.structured`` is on — built untrained on
    the dataset's declared shape: if even that one does not fit, the run would fail after training.
    The HE stage checks the chosen candidate again, before anything is encrypted."""
    import torch

    from kdsec.compress.structured import structured_prune
    from kdsec.he import check_layouts, he_program
    from kdsec.models import ModelSpec, build_model
    from kdsec.sweep import scaled_student

    for width in config.sweep.width or [1.0]:
        student = scaled_student(config.student, width)
        spec = ModelSpec(student.arch, input_shape, num_classes, student.model_options())
        with torch.random.fork_rng(devices=[]):  # initial weights are drawn: leave the run's RNG alone
            model = build_model(spec)
            if config.compress.structured > 0:
                model, _ = structured_prune(model, spec, config.compress.structured)
        check_layouts(he_program(model)[1], config.encrypt.he)
