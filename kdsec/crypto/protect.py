"""The candidate protected for shipping: a signed, envelope-encrypted package at rest (its
encrypted inference is ``kdsec.he.stage``)."""

from __future__ import annotations

import json
from pathlib import Path

from kdsec.compress.candidates import variant_format
from kdsec.compress.measure import VariantMetrics
from kdsec.config import PipelineConfig
from kdsec.crypto.keys import load_or_create_signer, local_key_provider
from kdsec.crypto.package import AtRestResult, protect_and_verify
from kdsec.data import DataBundle


def protect_at_rest(config: PipelineConfig, candidate: VariantMetrics, destination: Path, version: str,
                    metadata: dict) -> AtRestResult:
    """The candidate as a signed, envelope-encrypted package (weights sealed, metadata signed)."""
    encrypt = config.encrypt
    provider = local_key_provider(encrypt.key_env, encrypt.key_file)
    signer = load_or_create_signer(encrypt.signing_key_env, encrypt.signing_key_file)
    model_card = {**metadata, "variant": candidate.name, "format": variant_format(candidate)}
    return protect_and_verify(destination, {"weights.safetensors": Path(candidate.checkpoint).read_bytes()},
                              {"model.json": json.dumps(model_card, indent=2, sort_keys=True).encode()},
                              name=config.tracking.registered_model, version=version, provider=provider,
                              signer=signer, key_source=provider.key.source)


def package_metadata(bundle: DataBundle, candidate: VariantMetrics) -> dict:
    """What a package's signed model card says about the data the candidate expects."""
    return {"input_scale": bundle.input_scale, "normalization": bundle.normalization,
            "class_names": list(bundle.class_names), "data_fingerprint": bundle.fingerprint,
            "test_accuracy": candidate.test_accuracy}
