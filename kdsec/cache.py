"""Cache keys and cached paths: same inputs + same code → same key → the stored file is reused.

Prefect's task cache and the files under ``tracking.cache_dir`` are both named by these keys,
so a code change (hashed into the key) retrains instead of reusing a stale model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from kdsec.config import PipelineConfig, TeacherConfig, TrainConfig
from kdsec.data import DataBundle
from kdsec.distill import signals_key
from kdsec.models import ModelSpec

CODE_DIR = Path(__file__).resolve().parent


def code_version(*relative: str) -> str:
    """Hash of the named source files/folders of kdsec: part of cache keys, so code changes retrain."""
    digest = hashlib.sha256()
    for name in relative:
        path = CODE_DIR / name
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _key(prefix: str, payload: str) -> str:
    return f"{prefix}-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


def teacher_key(fingerprint: str, config: TeacherConfig, seed: int) -> str:
    """Same data + same teacher config + same training code -> same teacher."""
    code = code_version("models", "train.py", "data")
    return _key("teacher", f"{fingerprint}|{config.model_dump_json()}|{seed}|{code}")


def teacher_checkpoint(config: PipelineConfig, bundle: DataBundle) -> Path:
    key = teacher_key(bundle.fingerprint, config.teacher, config.seed)
    return Path(config.tracking.cache_dir) / "teachers" / key / "teacher.safetensors"


def signals_cache_key(config: PipelineConfig, bundle: DataBundle, teacher_checkpoint: str | Path) -> str:
    """Same teacher weights + same transfer inputs + same tapped layer/target + same code → same signals."""
    digest = hashlib.sha256(Path(teacher_checkpoint).read_bytes()).hexdigest()
    return _key("signals", f"{digest}|{bundle.fingerprint}|{config.distill.transfer_set}|"
                           f"{signals_key(config.distill)}|{code_version('distill', 'models')}")


def signals_path(config: PipelineConfig, bundle: DataBundle, teacher_checkpoint: str | Path) -> Path:
    """Where the teacher's signals for ``config.distill`` are stored (named by their cache key)."""
    key = signals_cache_key(config, bundle, teacher_checkpoint)
    return Path(config.tracking.cache_dir) / "signals" / f"{key}.safetensors"


def reference_key(fingerprint: str, spec: ModelSpec, train: TrainConfig, index: int, seed: int) -> str:
    code = code_version("models", "train.py", "data", "audit/reference.py")
    return _key("reference", f"{fingerprint}|{spec.to_json()}|{train.model_dump_json()}|{index}|{seed}|{code}")


def reference_checkpoint(fingerprint: str, spec: ModelSpec, train: TrainConfig, index: int, seed: int,
                         cache_dir: str | Path) -> Path:
    """Where reference model ``index`` of an architecture is cached (``reference_key``)."""
    return Path(cache_dir) / "references" / reference_key(fingerprint, spec, train, index, seed) / "model.safetensors"
