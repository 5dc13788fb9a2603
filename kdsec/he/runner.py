"""The entry the pipeline calls (its ``homomorphic_inference`` stage): ``encrypted_inference`` runs
every configured mode/path on the candidate and writes the host package (public contexts,
encrypted weights, ``he_package.json``: structure, layouts, parameters, file digests; never the
secret key). ``check_layouts`` says from shapes alone, before anything is encrypted (and in
preflight, on the untrained student), whether every configured layout fits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdsec.config import HEConfig
from kdsec.he.batched import BatchedServer
from kdsec.he.encrypted_input import GridPlan, run_encrypted_input, single_params, single_plan
from kdsec.he.encrypted_model import (block_size, encrypted_model_ciphertexts, encrypted_model_depth,
                                             encrypted_model_steps, run_encrypted_model)
from kdsec.he.program import Op, he_params, he_program, largest_ring, model_structure
from kdsec.he.result import HEResult, HERun
from kdsec.he.params import MAX_ROTATIONS
from kdsec.errors import ConfigError
from kdsec.fileio import write_atomic

logger = logging.getLogger("kdsec")

MAX_ENCRYPTED_MODEL_BYTES = 8 << 30  # encrypted weights and keys the owner builds and the host holds


def encrypted_inference(model: nn.Module, inputs: np.ndarray, config: HEConfig,
                        package_dir: Path | None = None, labels: np.ndarray | None = None,
                        cluster: tuple[str, float] | None = None) -> HEResult:
    """Run each configured mode on ``inputs`` (the single-sample path on the first
    ``config.latency_samples``), compare with plaintext and with the deployed model itself (and,
    given ``labels``, score the decrypted predictions: accuracy under encryption), and write the
    host packages (public contexts, encrypted weights, ``he_package.json``) to ``package_dir``."""
    preprocess, ops = he_program(model)
    check_layouts(ops, config.model_copy(update={"latency_samples": 0}))
    if config.latency_samples and "encrypted_input" in config.modes:
        try:
            check_single_layout(ops, config)
        except ConfigError as error:
            # Preflight checked the smallest candidate; a larger one (e.g. the dense student, chosen
            # when the smaller variants miss the accuracy gate) may not fit the single-sample path.
            # Skip that path rather than lose the trained run; every other layout fits (checked above).
            logger.warning("HE: single-sample path skipped for this candidate: %s", error)
            config = config.model_copy(update={"latency_samples": 0})
    with torch.inference_mode():
        predictions = model.cpu().eval()(torch.as_tensor(inputs)).argmax(1).numpy()
    inputs = preprocess(inputs)  # public preprocessing on the client, before encryption
    runs = []
    for mode in config.modes:
        if mode == "encrypted_input":
            logits, run = run_encrypted_input(ops, inputs, config, "batched", package_dir=package_dir,
                                              model_predictions=predictions, cluster=cluster)
            if labels is not None:
                run = replace(run, accuracy=float((logits.argmax(1) == labels[: len(logits)]).mean()))
            runs.append(run)
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


def check_layouts(ops: list[Op], config: HEConfig) -> None:
    """Each configured mode's layout fits a secure ring (slots, depth, rotation keys) and the
    encrypted model fits in memory, judged from the ops' shapes: a one-line ``ConfigError`` naming
    the setting to change, before any key is made or anything is encrypted."""
    ring, slots = _ring_slots(config)
    if "encrypted_input" in config.modes:
        BatchedServer.params(ops, config)
        if config.latency_samples:
            check_single_layout(ops, config)
    if "encrypted_model" in config.modes:
        block, steps = block_size(ops), encrypted_model_steps(ops)
        fix = ("remove encrypted_model from encrypt.he.modes (e.g. encrypt.he.modes=[encrypted_input]) or use a "
               "smaller student")
        if block > slots:
            raise ConfigError(f"the encrypted-model layout needs blocks of {block} slots but poly_modulus_degree "
                              f"{ring} has {slots}; {fix}")
        if len(steps) > MAX_ROTATIONS:
            raise ConfigError(f"the encrypted-model layout needs {len(steps)} rotation keys, over the "
                              f"{MAX_ROTATIONS} a public context may carry; {fix}")
        params = he_params(config, encrypted_model_depth(ops), block)
        count = encrypted_model_ciphertexts(ops)
        estimate = count * params.ciphertext_bytes + params.resident_bytes(len(steps))
        if estimate > MAX_ENCRYPTED_MODEL_BYTES:
            raise ConfigError(f"the encrypted model would be {count} weight ciphertexts of "
                              f"{params.ciphertext_bytes / 2**20:.1f} MiB plus its keys, about "
                              f"{estimate / 2**30:.1f} GiB (limit {MAX_ENCRYPTED_MODEL_BYTES / 2**30:.0f} GiB); {fix}")


def check_single_layout(ops: list[Op], config: HEConfig) -> None:
    """The single-sample path's layout (grid or diagonals) fits a ring: slots, rotation keys, depth."""
    ring, slots = _ring_slots(config)
    plan = single_plan(ops, config)
    fix = ("set encrypt.he.latency_samples=0 to skip that path, or use a smaller or pooled student "
           "(student.pool, student.hidden, student.channels)")
    if plan.slots > slots:
        raise ConfigError(f"the single-sample path needs {plan.slots} slots for this student but "
                          f"poly_modulus_degree {ring} has {slots}; {fix}")
    if len(plan.steps) > MAX_ROTATIONS:
        raise ConfigError(f"the single-sample path needs {len(plan.steps)} rotation keys for this student, "
                          f"over the {MAX_ROTATIONS} a public context may carry; {fix}")
    single_params(plan, ops, config)


def _ring_slots(config: HEConfig) -> tuple[int, int]:
    """The largest ring the config allows and its slots."""
    ring = largest_ring(config)
    return ring, ring // 2


def _write_package_index(package_dir: Path, ops: list[Op], runs: list[HERun]) -> None:
    """``he_package.json`` beside the ``*.bin`` files the runs wrote: what a host is given, and their digests."""
    files = {path.name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
             for path in sorted(package_dir.glob("*.bin"))}
    write_atomic(package_dir / "he_package.json", json.dumps({
        "structure": model_structure(ops), "grid": asdict(GridPlan.for_ops(ops)),
        "encrypted_model_rotation_steps": list(encrypted_model_steps(ops)),
        "runs": [{k: v for k, v in run.as_dict().items() if k in (
            "mode", "path", "poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "last_scale_bits",
            "weight_scale_bits")}
                 for run in runs],
        "files": files,
        "note": "public contexts and ciphertexts only: the secret key stayed with the key holder",
    }, indent=2))
