"""The pipeline's homomorphic stage: encrypted inference of the candidate on the test split."""

from __future__ import annotations

from pathlib import Path

from kdsec.compress.candidates import load_variant
from kdsec.compress.measure import VariantMetrics
from kdsec.config import PipelineConfig
from kdsec.data import DataBundle
from kdsec.he import HEResult, encrypted_inference


def homomorphic_inference(config: PipelineConfig, bundle: DataBundle, candidate: VariantMetrics,
                          package_dir: Path | None = None) -> HEResult:
    """Encrypted inference of the candidate on the test split (``encrypt.he.max_samples`` of it)
    in every mode the config enables (the batched chunks on the Dask cluster at
    ``compute.dask_address`` where one is set); empty when HE is switched off."""
    if not config.encrypt.he.enabled:
        return HEResult(runs=[])
    inputs = bundle.x_test
    if config.encrypt.he.max_samples:
        inputs = inputs[: config.encrypt.he.max_samples]
    # accuracy under encryption only over the whole split: a capped sample would gate on its noise
    labels = bundle.y_test if len(inputs) == len(bundle.y_test) else None
    cluster = (config.compute.dask_address, config.compute.connect_timeout) if config.compute.dask_address else None
    return encrypted_inference(load_variant(candidate), inputs, config.encrypt.he,
                               package_dir if config.encrypt.he.log_packages else None, labels, cluster)
