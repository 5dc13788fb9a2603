"""The entry the pipeline calls (its ``homomorphic_inference`` stage): ``encrypted_inference`` runs
every configured mode/path on the candidate and writes the host package (public contexts,
encrypted weights, ``he_package.json``: structure, layouts, parameters, file digests; never the
secret key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdsec.config import HEConfig
from kdsec.crypto.he.encrypted_input import GridPlan, run_encrypted_input
from kdsec.crypto.he.encrypted_model import encrypted_model_steps, run_encrypted_model
from kdsec.crypto.he.program import Op, he_program, model_structure
from kdsec.crypto.he.result import HEResult, HERun
from kdsec.fileio import write_atomic


def encrypted_inference(model: nn.Module, inputs: np.ndarray, config: HEConfig,
                        package_dir: Path | None = None) -> HEResult:
    """Run each configured mode on ``inputs`` (the single-sample path on the first
    ``config.latency_samples``), compare with plaintext and with the deployed model itself, and
    write the host packages (public contexts, encrypted weights, ``he_package.json``) to ``package_dir``."""
    preprocess, ops = he_program(model)
    with torch.inference_mode():
        predictions = model.cpu().eval()(torch.as_tensor(inputs)).argmax(1).numpy()
    inputs = preprocess(inputs)  # public preprocessing on the client, before encryption
    runs = []
    for mode in config.modes:
        if mode == "encrypted_input":
            runs.append(run_encrypted_input(ops, inputs, config, "batched", package_dir=package_dir,
                                            model_predictions=predictions)[1])
            if config.latency_samples:
                runs.append(run_encrypted_input(ops, inputs[: config.latency_samples], config, "single",
                                                model_predictions=predictions)[1])
        else:
            runs.append(run_encrypted_model(ops, inputs, config, package_dir=package_dir,
                                            model_predictions=predictions)[1])
    result = HEResult(runs)
    if package_dir is not None:
        _write_package_index(package_dir, ops, runs)
    return result


def _write_package_index(package_dir: Path, ops: list[Op], runs: list[HERun]) -> None:
    """``he_package.json`` beside the ``*.bin`` files the runs wrote: what a host is given, and their digests."""
    files = {path.name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
             for path in sorted(package_dir.glob("*.bin"))}
    write_atomic(package_dir / "he_package.json", json.dumps({
        "structure": model_structure(ops), "grid": asdict(GridPlan.for_ops(ops)),
        "encrypted_model_rotation_steps": list(encrypted_model_steps(ops)),
        "runs": [{k: v for k, v in run.as_dict().items() if k in (
            "mode", "path", "poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits")} for run in runs],
        "files": files,
        "note": "public contexts and ciphertexts only: the secret key stayed with the key holder",
    }, indent=2))
