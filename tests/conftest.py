"""Shared fixtures. Every test runs with Prefect and MLflow state kept out of the user's home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports Prefect: private home (result storage, cache), no telemetry.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="kdsec-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["MLFLOW_ENABLE_TELEMETRY"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("KDSEC_MODEL_KEY", None)
os.environ.pop("KDSEC_SIGNING_KEY", None)
os.environ.pop("KDSEC_VERDICT_PUBLIC_KEY", None)
os.environ.pop("KDSEC_DASK_ADDRESS", None)  # compute.dask_address's default: tests start their own clusters

from kdsec.config import DataConfig, load_config  # noqa: E402
from kdsec.data import prepare_data  # noqa: E402

# The smallest real config: every stage runs for real, just with fewer epochs.
SMALL_OVERRIDES = [
    "teacher.train.epochs=12", "teacher.train.patience=12",
    "student.train.epochs=40", "student.train.patience=40",
    "compress.finetune_epochs=5", "compress.structured_finetune_epochs=5", "compress.latency_repeats=3",
    "encrypt.he.max_samples=128", "encrypt.he.latency_samples=4",
    "audit.reference_models=2", "audit.bootstrap=20",
    "gates.min_accuracy=0.85", "gates.max_drop=0.1",
    # So few epochs leave the students under-confident (ECE 0.11-0.27, benchmarks/gate_defaults.py).
    "gates.max_ece=0.4",
]


@pytest.fixture(scope="session")
def digits():
    return prepare_data(DataConfig())


@pytest.fixture(scope="session")
def small_config():
    return load_config(None, SMALL_OVERRIDES)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory: ./mlflow.db, ./outputs and the key file land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
