"""Auditing a model kdsec did not train: a safetensors checkpoint in a catalog architecture (or an
MLflow model URI holding one) and an index file naming the rows of the configured dataset it
trained on. The same attacks, reference models and gates as the pipeline's audit.

The rows come from ``data.name`` as kdsec loads it (``data.max_samples`` applied), numbered from
0. Members are the listed rows; the rest is split at random (``seed``) into the audited
non-members (half) and the population the reference models learn from (validation and test:
accuracy, calibration and temperature scaling are measured there), so no audited sample ever
trained a reference model. The reference models are the checkpoint's architecture trained with
the config's ``student.train`` recipe: give the recipe the model was trained with.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdsec import cache, roles
from kdsec.config import PipelineConfig
from kdsec.data import DATASETS, DataBundle
from kdsec.data.bundle import _fingerprint, assemble
from kdsec.errors import ConfigError, DataError, IntegrityError, KdsecError
from kdsec.fileio import read_bounded
from kdsec.models import ModelSpec, build_model, load_checkpoint

MAX_INDEX_BYTES = 64 << 20
MAX_CHECKPOINT_BYTES = 4 << 30
MIN_MEMBERS, MIN_OTHERS = 10, 40  # members to audit; rows left for non-members and the population


def read_members(path: Path, rows: int) -> np.ndarray:
    """The row indices ``path`` lists (``.npy`` of integers, read without pickle, or text: integers
    separated by whitespace or commas), checked against a dataset of ``rows`` rows: sorted."""
    data = read_bounded(path, MAX_INDEX_BYTES, "index file", error=DataError)
    what = f"index file '{path}'"
    if path.suffix == ".npy":
        try:
            values = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            raise DataError(f"{what} is not a readable .npy array ({reason})") from None
        if not isinstance(values, np.ndarray):
            raise DataError(f"{what} is an .npz archive, not one .npy array of row indices")
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise DataError(f"{what} must hold one row of integers (row indices), not a {values.dtype} array of "
                            f"shape {values.shape}")
        values = values.astype(np.int64)
    else:
        tokens = [token for token in re.split(r"[\s,]+", data.decode("utf-8", "replace")) if token]
        bad = next((token for token in tokens if not re.fullmatch(r"-?\d{1,18}", token)), None)
        if bad is not None:
            raise DataError(f"{what}: {bad[:20]!r} is not a row index (integers, one per line or comma-separated)")
        values = np.array([int(token) for token in tokens], dtype=np.int64)
    if not len(values):
        raise DataError(f"{what} lists no rows")
    outside = values[(values < 0) | (values >= rows)]
    if len(outside):
        raise DataError(f"{what}: row {int(outside[0])} is outside the dataset's rows 0..{rows - 1} "
                        "(is it the index file of another dataset, or of data.max_samples set differently?)")
    unique, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{what}: row {int(unique[counts > 1][0])} is listed {int(counts.max())} times")
    if len(unique) < MIN_MEMBERS or rows - len(unique) < MIN_OTHERS:
        raise DataError(f"{what} lists {len(unique)} of the dataset's {rows} rows; an audit needs at least "
                        f"{MIN_MEMBERS} members and {MIN_OTHERS} rows the model never saw")
    return unique


def member_bundle(config: PipelineConfig, members_path: Path) -> tuple[DataBundle, np.ndarray]:
    """The configured dataset split around the rows ``members_path`` lists (see the module doc)."""
    raw = DATASETS.get(config.data.name)(config.data)
    members = read_members(members_path, len(raw.labels))
    others = np.setdiff1d(np.arange(len(raw.labels)), members)
    np.random.default_rng(config.seed).shuffle(others)
    holdout, population = others[: len(others) // 2], others[len(others) // 2:]
    val, test = population[: len(population) // 4], population[len(population) // 4:]
    digest = hashlib.sha256(_fingerprint(raw.inputs, raw.labels, config.data).encode())
    digest.update(members.tobytes())
    bundle = assemble(raw, {"train": members, "val": val, "test": test, "holdout": holdout}, config.data,
                      digest.hexdigest()[:16])
    return bundle, members


def checkpoint_in(folder: Path, uri: str) -> Path:
    """The one safetensors file under ``folder`` (what an MLflow URI downloaded to)."""
    found = [path for path in folder.rglob("*.safetensors") if path.is_file() and not path.is_symlink()]
    if len(found) != 1:
        raise KdsecError(f"'{uri}' holds {len(found)} safetensors files; the audit needs exactly one checkpoint")
    return found[0]


def load_audited(path: Path, bundle: DataBundle, arch: str | None = None,
                 options: dict | None = None) -> tuple[nn.Module, ModelSpec]:
    """The audited model from a safetensors file (read once, bounded): a kdsec checkpoint (its
    header names the architecture), or a plain state dict of ``arch`` (``options``). The
    architecture is first built on torch's meta device (no memory) and its tensor names and
    shapes compared with the file's, so a header naming a huge model costs nothing. Anything that
    does not fit the dataset or the file is a one-line error."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    data = read_bounded(path, MAX_CHECKPOINT_BYTES, "checkpoint", error=IntegrityError)
    try:
        state = load_safetensors(data)
        length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as exc:
        raise IntegrityError(f"'{path.name}' is not a safetensors checkpoint ({str(exc)[:120]})") from None
    expected = (tuple(bundle.input_shape), bundle.num_classes)
    if arch is None:
        if "kdsec.spec" not in metadata:
            raise IntegrityError(f"'{path.name}' names no architecture (no kdsec.spec in its header); for a plain "
                                 "state dict give it (--arch)")
        try:
            spec = ModelSpec.from_json(metadata["kdsec.spec"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"'{path.name}' has an unreadable kdsec.spec header ({exc})") from None
        where = "the architecture its header names"
    else:
        spec, where = ModelSpec(arch, expected[0], expected[1], dict(options or {})), f"a {arch} with these options"
    if (tuple(spec.input_shape), spec.num_classes) != expected:
        raise IntegrityError(f"'{path.name}' is a {spec.arch} for inputs {tuple(spec.input_shape)} and "
                             f"{spec.num_classes} classes; data '{bundle.name}' has {expected[0]} and {expected[1]}")
    if "kdsec.int8" in metadata or "kdsec.int8_static" in metadata:  # kdsec's own quantized formats
        from kdsec.compress.quantize import load_weights

        try:
            model, spec, _ = load_weights(path)
        except (KdsecError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"'{path.name}' does not load as {where} ({str(exc).splitlines()[0][:160]})") from None
        return model.eval(), spec
    try:
        with torch.device("meta"):
            skeleton = build_model(spec)
    except (KdsecError, TypeError, ValueError) as exc:
        raise ConfigError(f"{spec.arch} {spec.options}: {str(exc).splitlines()[0][:200]}") from None
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if shapes != found:
        missing, extra = sorted(set(shapes) - set(found)), sorted(set(found) - set(shapes))
        wrong = [name for name in shapes if name in found and shapes[name] != found[name]]
        detail = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}" if extra else
                  f"{wrong[0]!r} is {found[wrong[0]]}, expected {shapes[wrong[0]]}")
        raise IntegrityError(f"'{path.name}' does not load as {where}: {detail}")
    model = build_model(spec)
    model.load_state_dict(state)
    return model.eval(), spec


def reference_models(config: PipelineConfig, bundle: DataBundle, spec: ModelSpec,
                     step: Callable[[str], None]) -> list[nn.Module]:
    """``audit.reference_models`` models of ``spec`` on seeded halves of the population, cached."""
    from kdsec.audit.reference import audit_samples, reference_masks, train_references

    count, train = config.audit.reference_models, config.student.train
    paths = [cache.reference_checkpoint(bundle.fingerprint, spec, train, index, config.seed,
                                        config.tracking.cache_dir) for index in range(count)]
    missing = [index for index, path in enumerate(paths) if not path.is_file()]
    step(f"reference models: {count - len(missing)}/{count} cached, {len(missing)} to train")
    if missing:
        samples = audit_samples(bundle, config.seed)
        masks = reference_masks(count, len(samples.y_population), config.seed)
        train_references(spec, train, samples.x_population, samples.y_population, masks[missing],
                         [config.seed * 1000 + index for index in missing], [paths[i] for i in missing])
    return [load_checkpoint(path)[0] for path in paths]


def audit_external(config: PipelineConfig, model: nn.Module, spec: ModelSpec, bundle: DataBundle,
                   step: Callable[[str], None] = lambda message: None) -> tuple:
    """Audit ``model`` (trained on ``bundle``'s train split) as the pipeline audits a candidate:
    membership (LOSS, RMIA, LiRA), calibration, per-class accuracy, FGSM, extraction. Returns
    (``ModelAudit``, extraction results, the audited non-members' count)."""
    from kdsec.audit.reference import audit_samples, signals
    from kdsec.audit.run import audit_model, extraction_audit
    from kdsec.compress.quantize import DynamicQuantLinear, dequantized_copy

    torch.manual_seed(config.seed)
    references = reference_models(config, bundle, spec, step) if config.audit.reference_models else []
    samples = audit_samples(bundle, config.seed)
    int8 = any(isinstance(module, DynamicQuantLinear) for module in model.modules())
    surrogate = dequantized_copy(model, spec) if int8 else None
    step("membership attacks (" + ("LOSS, RMIA, LiRA" if references else "LOSS") + "), calibration, robustness")
    audit = audit_model(roles.CANDIDATE, model, bundle, config, samples,
                        signals(references, samples) if references else None, surrogate)
    step(f"knockoff extraction ({config.audit.extraction_queries} queries)")
    return audit, extraction_audit(config, bundle, model), len(samples.y_non_members)
