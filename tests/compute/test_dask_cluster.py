"""`compute.dask_address`: the audit's reference models, HE batched chunks and sweep members as
tasks on a real Dask cluster (a scheduler and 2 workers started natively on loopback, stopped by
PID): the same bytes and figures as on this machine, no secret key on any worker, a killed
worker's work done elsewhere, and each bad cluster refused in one line before any training."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdsec import compute_probe, roles
from kdsec.audit.run import all_reference_checkpoints, reference_checkpoints, reference_plan
from kdsec.compute import ComputeError, compare_environments
from kdsec.config import HEConfig, load_config
from kdsec.device import torch_threads
from kdsec.errors import ConfigError
from kdsec.preflight import preflight
from tests.dask_cluster import Recorder, recorded, start_cluster

pytestmark = pytest.mark.slow

REFERENCES = ["teacher.train.epochs=3", "student.train.epochs=8", "audit.reference_models=5",
              "audit.teacher_reference_models=2"]


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("dask"))
    yield cluster
    cluster.stop()


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def local_references(config, bundle) -> dict[str, list[str]]:
    """The references as this machine trains them: one torch thread each (2 cores, 2 at once)."""
    with torch_threads(1):
        return {group: [digest(path) for path in reference_checkpoints(config, bundle, group)[0]]
                for group in reference_plan(config, bundle)}


def test_reference_models_trained_on_the_cluster_are_the_bytes_trained_here(dask_cluster, digits, tmp_path):
    here = load_config(None, [*REFERENCES, f"tracking.cache_dir={tmp_path / 'here'}"])
    there = load_config(None, [*REFERENCES, f"tracking.cache_dir={tmp_path / 'there'}",
                               f"compute.dask_address={dask_cluster.address}"])
    preflight(there)  # reachable, workers with our packages and code
    steps = []
    trained = all_reference_checkpoints(there, digits, steps.append)
    # teacher CNNs one model a task; the 5 he_mlps in blocks of 4 and 1 (they train together)
    assert steps == [f"reference models: 4 tasks on 2 Dask worker threads at {dask_cluster.address}"]
    assert {group: hits for group, (_, hits) in trained.items()} == {roles.TEACHER: 0, roles.STUDENTS: 0}
    assert {group: [digest(path) for path in paths] for group, (paths, _) in trained.items()} == \
        local_references(here, digits)
    again = all_reference_checkpoints(there, digits)  # all cached now: nothing sent
    assert {group: hits for group, (_, hits) in again.items()} == {roles.TEACHER: 2, roles.STUDENTS: 5}


def test_he_chunks_on_the_cluster_agree_and_no_worker_ever_holds_the_secret_key(dask_cluster, digits, monkeypatch):
    from distributed import Client

    from kdsec.he import encrypted_input, he_ops
    from kdsec.he.seal import KeyHolder, scratch
    from kdsec.models import ModelSpec, build_model

    holders = []

    class Watched(KeyHolder):  # the run's key holder, to look for its secret key afterwards
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            holders.append(self)

    monkeypatch.setattr(encrypted_input, "KeyHolder", Watched)
    torch.manual_seed(0)
    ops = he_ops(build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]})))
    inputs = np.concatenate([digits.x_test] * 30)[:9000]  # 3 chunks of a 4,096-slot ring
    config = HEConfig(host_workers=1)
    with Client(dask_cluster.address, set_as_default=False) as client:
        client.register_plugin(Recorder())
        local_logits, local = encrypted_input.run_encrypted_input(ops, inputs, config, "batched")
        logits, run = encrypted_input.run_encrypted_input(ops, inputs, config, "batched",
                                                          cluster=(dask_cluster.address, 10.0))
        blobs = recorded(client)
        assert run.samples == 9000 and run.agreement == local.agreement == 1.0
        assert np.array_equal(logits.argmax(1), local_logits.argmax(1))
        assert np.abs(logits - local_logits).max() < 1e-3
        assert not run.host_had_secret_key
        assert sum(map(len, blobs)) > run.ciphertext_bytes_in  # every chunk's ciphertexts were seen
        assert not holders[-1].secret_key_in(*blobs)
        assert set(chunk_states(client).values()) == {0}  # each chunk's state dropped by its finish
        # the recorder would have seen it: scattered, the secret key is found at once
        client.scatter([scratch().dump(holders[-1]._secret_key)], broadcast=True)
        deadline = time.monotonic() + 10
        while not holders[-1].secret_key_in(*recorded(client)):
            assert time.monotonic() < deadline, "a scattered secret key went unrecorded"
            time.sleep(0.1)


def chunk_states(client) -> dict:
    """Each worker's count of HE chunk states held."""
    return client.run(lambda: len(__import__("kdsec.he.cluster", fromlist=["_STREAMS"])._STREAMS))


def test_a_failed_he_run_leaves_no_chunk_state_on_the_workers(dask_cluster, digits, monkeypatch):
    from distributed import Client

    from kdsec.he import encrypted_input, he_ops
    from kdsec.he.seal import KeyHolder
    from kdsec.models import ModelSpec, build_model

    bundles = []

    class Failing(KeyHolder):  # the client fails after 5 groups: chunks 0 and 1 begun on the workers
        def encrypt_bundle(self, rows) -> bytes:
            bundles.append(len(rows))
            if len(bundles) == 6:
                raise RuntimeError("the client failed mid-chunk")
            return super().encrypt_bundle(rows)

    monkeypatch.setattr(encrypted_input, "KeyHolder", Failing)
    torch.manual_seed(0)
    ops = he_ops(build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]})))
    inputs = np.concatenate([digits.x_test] * 30)[:9000]
    with pytest.raises(RuntimeError, match="mid-chunk"):
        encrypted_input.run_encrypted_input(ops, inputs, HEConfig(host_workers=1), "batched",
                                            cluster=(dask_cluster.address, 10.0))
    with Client(dask_cluster.address, set_as_default=False) as client:
        time.sleep(1.0)  # a group task already queued runs, and begins nothing: its run ended
        assert set(chunk_states(client).values()) == {0}


def test_sweep_members_run_on_the_cluster_from_scattered_data(dask_cluster, digits, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import run_sweep
    from kdsec import trainers
    from kdsec.distill import signals_key
    from kdsec.sweep import sweep_grid

    monkeypatch.chdir(tmp_path)
    overrides = ["teacher.train.epochs=4", "student.train.epochs=4", "sweep.temperature=[2,6]"]
    here = load_config(None, overrides)
    there = load_config(None, [*overrides, f"compute.dask_address={dask_cluster.address}"])
    teacher = trainers.train_teacher(here, digits, tmp_path / "teacher.safetensors")
    kind = signals_key(here.distill)
    signals = {kind: trainers.store_teacher_signals(here, digits, teacher, tmp_path / f"{kind}.safetensors")}
    with prefect_test_harness(server_startup_timeout=120):
        results = run_sweep(there, digits, signals, tmp_path / "there")
    for member, (trained, result) in zip(sweep_grid(here), results, strict=True):
        assert result.member == member and trained.checkpoint == result.checkpoint
        assert Path(result.checkpoint) == tmp_path / "there" / "sweep" / f"{member.name}.safetensors"
        with torch_threads(1):
            alone, _ = trainers.distill_member(here, digits, member, signals[kind], tmp_path / f"{member.name}.st", 1)
        assert digest(result.checkpoint) == digest(alone.checkpoint)  # the member trained here, same bytes


def test_a_killed_worker_s_reference_models_are_trained_again_elsewhere(digits, tmp_path):
    cluster = start_cluster(tmp_path / "dask")
    try:
        overrides = ["teacher.train.epochs=6", "audit.reference_models=4", "audit.teacher_reference_models=4",
                     "student.train.epochs=8"]
        there = load_config(None, [*overrides, f"tracking.cache_dir={tmp_path / 'there'}",
                                   f"compute.dask_address={cluster.address}"])
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(all_reference_checkpoints(there, digits)))
        runner.start()
        from distributed import Client

        with Client(cluster.address, set_as_default=False) as client:
            victim = next(address for address, info in client.scheduler_info()["workers"].items()
                          if info["name"] == "worker-0")
            deadline = time.monotonic() + 120
            while not client.processing().get(victim):  # a reference task is running on worker-0
                assert time.monotonic() < deadline and runner.is_alive(), "no task reached worker-0"
                time.sleep(0.05)
            cluster.kill("worker-0")
            runner.join(timeout=300)
            assert not runner.is_alive()
            assert list(client.scheduler_info()["workers"]) != [victim] and len(client.scheduler_info()["workers"]) == 1
        here = load_config(None, [*overrides, f"tracking.cache_dir={tmp_path / 'here'}"])
        assert {group: [digest(path) for path in paths] for group, (paths, _) in outcome.items()} == \
            local_references(here, digits)
    finally:
        cluster.stop()


def test_a_killed_worker_s_he_chunk_is_sent_again_elsewhere(digits, tmp_path, caplog):
    from distributed import Client

    from kdsec.he import encrypted_input, he_ops
    from kdsec.models import ModelSpec, build_model

    torch.manual_seed(0)
    ops = he_ops(build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]})))
    inputs = np.concatenate([digits.x_test] * 60)[:20000]  # 5 chunks of a 4,096-slot ring
    config = HEConfig(host_workers=1)
    local_logits, _ = encrypted_input.run_encrypted_input(ops, inputs, config, "batched")
    cluster = start_cluster(tmp_path / "dask")
    try:
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["logits"], outcome["run"] = encrypted_input.run_encrypted_input(
                    ops, inputs, config, "batched", cluster=(cluster.address, 10.0))
            except Exception as error:  # shown by the test, not lost in the thread
                outcome["error"] = error

        runner = threading.Thread(target=run)
        runner.start()
        with Client(cluster.address, set_as_default=False) as client:
            victim = next(address for address, info in client.scheduler_info()["workers"].items()
                          if info["name"] == "worker-0")
            deadline = time.monotonic() + 120
            while not any(str(key).startswith("kdsec-he-chunk") for key in client.processing().get(victim, ())):
                assert time.monotonic() < deadline and runner.is_alive(), "no HE chunk reached worker-0"
                time.sleep(0.02)
            cluster.kill("worker-0")  # mid-chunk: its ciphertexts and the chunk's state go with it
            runner.join(timeout=300)
            assert not runner.is_alive()
            assert list(client.scheduler_info()["workers"]) != [victim] and len(client.scheduler_info()["workers"]) == 1
        assert "error" not in outcome, outcome.get("error")
        assert any("sent again" in record.getMessage() for record in caplog.records if record.name == "kdsec")
        assert outcome["run"].samples == 20000 and outcome["run"].agreement == 1.0
        assert np.array_equal(outcome["logits"].argmax(1), local_logits.argmax(1))
        assert np.abs(outcome["logits"] - local_logits).max() < 1e-3
    finally:
        cluster.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_scheduler_is_one_line_before_any_training():
    config = load_config(None, [f"compute.dask_address=tcp://127.0.0.1:{free_port()}", "compute.connect_timeout=2"])
    started = time.monotonic()
    with pytest.raises(ComputeError) as error:
        preflight(config)
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert "\n" not in message and "no Dask scheduler answered within 2 s" in message
    assert "compute.dask_address=''" in message


@pytest.mark.parametrize("address", ["127.0.0.1:8786", "http://host:8786", "tcp://host", "tcp://a b:1"])
def test_a_malformed_address_is_a_config_error(address):
    with pytest.raises(ConfigError, match="compute.dask_address"):
        load_config(None, [f"compute.dask_address={address}"])


def test_the_old_sweep_address_key_says_where_it_moved():
    with pytest.raises(ConfigError, match="moved to compute.dask_address"):
        load_config(None, ["sweep.dask_address=tcp://127.0.0.1:8786"])


def test_a_scheduler_without_workers_is_one_line(tmp_path):
    cluster = start_cluster(tmp_path / "dask", workers=0)
    try:
        config = load_config(None, [f"compute.dask_address={cluster.address}", "compute.connect_timeout=1"])
        with pytest.raises(ComputeError, match=r"has no workers \(waited 1 s\); start some with `dask worker"):
            preflight(config)
    finally:
        cluster.stop()


def test_workers_with_another_package_version_or_other_code_are_named(tmp_path):
    shadow = tmp_path / "shadow"  # a worker environment: tenseal 0.0.1's metadata, and a changed kdsec
    (shadow / "tenseal-0.0.1.dist-info").mkdir(parents=True)
    (shadow / "tenseal-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tenseal\nVersion: 0.0.1\n")
    cluster = start_cluster(tmp_path / "dask", workers=0)
    try:
        cluster.start_worker("old-tenseal", {"PYTHONPATH": f"{shadow}:{Path.cwd()}"})
        cluster.wait_for_workers(1)
        config = load_config(None, [f"compute.dask_address={cluster.address}"])
        with pytest.raises(ComputeError) as error:
            preflight(config)
        assert str(error.value).startswith("Dask worker tcp://127.0.0.1:")
        assert "has tenseal version 0.0.1 where this machine has 0.3." in str(error.value)
    finally:
        cluster.stop()


def test_a_worker_lacking_a_package_or_running_other_code_is_named():
    ours = compute_probe.environment()
    assert ours["kdsec"] and ours["tasks"] and ours["tenseal"]
    with pytest.raises(ComputeError, match=r"^Dask worker w1 at 'tcp://h:1' lacks tenseal \(this machine has 0\.3"):
        compare_environments("w1", {**ours, "tenseal": None}, ours, "tcp://h:1")
    with pytest.raises(ComputeError, match=r"has kdsec code 0123 where this machine has [0-9a-f]{16}; run the same"):
        compare_environments("w1", {**ours, "kdsec": "0123"}, ours, "tcp://h:1")
    compare_environments("w1", dict(ours), ours, "tcp://h:1")  # the same: no error
