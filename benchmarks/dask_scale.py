"""compute.dask_address measured: 16 reference models of the MNIST preset's student, and the HE
batch of the MNIST test split, on a native Dask cluster of 1 worker and then of 2 (one thread
each, on loopback), as wall-clock ratios of the same run; the HE batch twice: as a run does it
(the client encrypting on the same 2 cores as the workers) and with its ciphertexts encrypted
beforehand (the workers' own scaling), with the floor that this machine's cores set; plus what
the N-machine estimate rests on: the bytes shipped per task and the scheduler's overhead per task.

    python benchmarks/dask_scale.py --data-root <folder with MNIST/raw>   # make bench-dask ARGS=...
        --references 16 --epochs 10   (the preset trains 60 epochs with patience 15; fewer keep
                                       the run short and change the ratio little: work per task)
        --config configs/mnist.yaml   --workers 1 2   --he-only (skip the references)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def references(config_path: str, overrides: list[str], address: str, cache: Path) -> tuple[float, list]:
    from kdsec import roles
    from kdsec.audit.run import all_reference_checkpoints
    from kdsec.config import load_config
    from kdsec.data import prepare_data

    config = load_config(config_path, [*overrides, f"tracking.cache_dir={cache}", f"compute.dask_address={address}"])
    bundle = prepare_data(config.data)
    from kdsec.audit.reference import audit_samples

    population = audit_samples(bundle, config.seed)
    print(f"population scattered once per worker: {population.x_population.nbytes + population.y_population.nbytes:,} "
          f"bytes; per task: a mask of {len(population.y_population):,} bytes, the spec and a seed", flush=True)
    started = time.perf_counter()
    paths, hits = all_reference_checkpoints(config, bundle, groups=[roles.STUDENTS])[roles.STUDENTS]
    assert hits == 0, "references came from a cache: the timing would be wrong"
    return time.perf_counter() - started, paths


class _Holders:
    """The HE batch's second measurement: the client's encryption taken out of the timing, as a
    client on its own cores would have its ciphertexts ready. One key holder per parameter set
    for every run, each bundle it encrypts remembered (the first run encrypts, the next ones
    only send): the workers' evaluation scaling, with 2 cores left to the workers."""

    def __init__(self) -> None:
        self.holders: dict = {}

    def __call__(self, params, *args):
        from kdsec.he.seal import KeyHolder

        class Remembering(KeyHolder):
            def __init__(self, *args) -> None:
                super().__init__(*args)
                self.bundles: dict[str, bytes] = {}

            def encrypt_bundle(self, rows) -> bytes:
                import hashlib

                key = hashlib.sha256(b"".join(np.ascontiguousarray(row).tobytes() for row in rows)).hexdigest()
                if key not in self.bundles:
                    self.bundles[key] = super().encrypt_bundle(rows)
                return self.bundles[key]

        if (params, args) not in self.holders:
            self.holders[params, args] = Remembering(params, *args)
        return self.holders[params, args]


def _forget_contexts() -> None:
    from kdsec.he import cluster

    cluster._SERVERS.clear()


def preset_program(config_path: str, overrides: list[str]):
    """The preset's student (weights do not change the cost) as an HE program, and its whole
    test split as the program's inputs: (config, ops, inputs)."""
    import torch

    from kdsec.config import load_config
    from kdsec.data import prepare_data
    from kdsec.he.program import he_program
    from kdsec.models import build_model
    from kdsec.trainers import student_spec

    config = load_config(config_path, overrides)
    bundle = prepare_data(config.data)
    torch.manual_seed(0)
    preprocess, ops = he_program(build_model(student_spec(config, bundle)).eval())
    return config, ops, preprocess(bundle.x_test)


def he_batch(config_path: str, overrides: list[str], address: str | None, holders: _Holders | None = None):
    """The HE batch of ``preset_program``; with ``holders``, ciphertexts encrypted beforehand
    (``_Holders``)."""
    from kdsec.he import encrypted_input
    from kdsec.he.encrypted_input import run_encrypted_input

    config, ops, inputs = preset_program(config_path, overrides)

    plain, encrypted_input.KeyHolder = encrypted_input.KeyHolder, holders or encrypted_input.KeyHolder
    try:
        if holders is not None:  # the first run encrypts
            run_encrypted_input(ops, inputs, config.encrypt.he, "batched",
                                cluster=(address, 30.0) if address else None)
            if address:  # and the workers load the public context again, as in the other run
                from kdsec.compute import cluster

                with cluster(address) as client:
                    client.run(_forget_contexts)
        started = time.perf_counter()
        logits, run = run_encrypted_input(ops, inputs, config.encrypt.he, "batched",
                                          cluster=(address, 30.0) if address else None)
        return time.perf_counter() - started, logits, run
    finally:
        encrypted_input.KeyHolder = plain


def he_chunk_costs(config_path: str, overrides: list[str]) -> tuple[int, float, float]:
    """One full chunk of the test split, on one core here: (chunks in the split, the client's
    seconds to encrypt a chunk, a host's seconds to load and evaluate it). The floor below which
    no worker count goes on this machine rests on these."""
    from threadpoolctl import threadpool_limits

    from kdsec.he.batched import BatchedServer, feature_groups
    from kdsec.he.seal import KeyHolder, PublicContext

    config, ops, inputs = preset_program(config_path, overrides)
    params = BatchedServer.params(ops, config.encrypt.he)
    required = BatchedServer.required_inputs(ops)
    holder = KeyHolder(params)
    server = BatchedServer(PublicContext.deserialize(holder.public_context()), ops)
    features = inputs[:params.slots].reshape(min(params.slots, len(inputs)), -1).astype(np.float64)
    with threadpool_limits(1):
        started = time.perf_counter()
        payloads = [holder.encrypt_bundle([features[:, i] for i in group])
                    for group in feature_groups(required)]
        encrypt = time.perf_counter() - started
        started = time.perf_counter()
        stream = server.stream()
        for payload in payloads:
            stream.feed(server.public.load_ciphertexts(payload))
        stream.finish()
        host = time.perf_counter() - started
    return -(-len(inputs) // params.slots), encrypt, host


def task_overhead(address: str, count: int = 400) -> float:
    """Milliseconds of scheduling per task: ``count`` no-op tasks submitted and gathered."""
    from kdsec.compute import cluster

    with cluster(address) as client:
        client.gather(client.map(abs, range(-20, 0), pure=False))  # warm
        started = time.perf_counter()
        client.gather(client.map(abs, range(-count, 0), pure=False))
        return 1e3 * (time.perf_counter() - started) / count


def worker_peak_rss(address: str) -> dict[str, float]:
    from kdsec.compute import cluster

    def peak() -> float:
        import resource as worker_resource

        return worker_resource.getrusage(worker_resource.RUSAGE_SELF).ru_maxrss / 2**20

    with cluster(address) as client:
        return {info["name"]: rss for address_, rss in client.run(peak).items()
                for info in [client.scheduler_info()["workers"][address_]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--data-root", required=True, help="a folder holding MNIST/raw (fetch_mnist.py)")
    parser.add_argument("--references", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--he-only", action="store_true", help="skip the reference models")
    args = parser.parse_args()

    from tests.dask_cluster import start_cluster

    base = [f"data.root={args.data_root}"]
    reference_overrides = [*base, f"audit.reference_models={args.references}", f"student.train.epochs={args.epochs}"]
    rows, digests = [], []
    local_seconds, local_logits, local_run = he_batch(args.config, base, None)
    print(f"HE batch here (host processes, encrypt.he.host_workers default): {local_seconds:.1f} s, "
          f"{local_run.samples:,} images, {local_run.ms_per_sample:.2f} ms/image", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdsec-bench-dask-") as scratch:
        for workers in args.workers:
            cluster = start_cluster(Path(scratch) / f"cluster-{workers}", workers=workers)
            try:
                seconds, paths = float("nan"), []
                if not args.he_only:
                    seconds, paths = references(args.config, reference_overrides, cluster.address,
                                                Path(scratch) / f"cache-{workers}")
                    print(f"{workers} worker(s): {args.references} references in {seconds:.1f} s", flush=True)
                digests.append([Path(path).read_bytes() for path in paths])
                he_seconds, logits, run = he_batch(args.config, base, cluster.address)
                print(f"{workers} worker(s): HE batch {he_seconds:.1f} s ({run.ms_per_sample:.2f} ms/image, "
                      f"agreement {run.agreement:.5f})", flush=True)
                assert np.array_equal(logits.argmax(1), local_logits.argmax(1))
                ready_seconds, ready_logits, _ = he_batch(args.config, base, cluster.address, _Holders())
                print(f"{workers} worker(s): HE batch, ciphertexts encrypted beforehand, {ready_seconds:.1f} s",
                      flush=True)
                assert np.array_equal(ready_logits.argmax(1), local_logits.argmax(1))
                overhead = task_overhead(cluster.address)
                rows.append((workers, seconds, he_seconds, run, overhead, worker_peak_rss(cluster.address),
                             ready_seconds))
            finally:
                cluster.stop()
    same = all(d == digests[0] for d in digests)
    base_refs, base_he, base_ready = rows[0][1], rows[0][2], rows[0][6]
    print(f"\n| workers | {args.references} references (s) | × 1 worker | HE batch, {local_run.samples:,} images (s) | "
          f"× 1 worker | ms/image | HE, encrypted beforehand (s) | × 1 worker | scheduling ms/task | "
          f"worker peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workers, seconds, he_seconds, run, overhead, rss, ready in rows:
        print(f"| {workers} | {seconds:.1f} | {seconds / base_refs:.2f} | {he_seconds:.1f} | {he_seconds / base_he:.2f} | "
              f"{run.ms_per_sample:.2f} | {ready:.1f} | {ready / base_ready:.2f} | {overhead:.2f} | "
              f"{max(rss.values()):.2f} |")
    print(f"| here (host processes) | | | {local_seconds:.1f} | {local_seconds / base_he:.2f} | "
          f"{local_run.ms_per_sample:.2f} | | | | |")
    chunks, encrypt, host = he_chunk_costs(args.config, base)
    cores = len(os.sched_getaffinity(0))
    print(f"\nHE floor on this machine ({cores} cores shared by the client and the workers): a chunk takes the "
          f"client {encrypt:.2f} s to encrypt and a host {host:.2f} s to load and evaluate (one core each, "
          f"alone); {chunks} chunks:")
    print(f"  1 worker  >= {chunks} x {host:.2f} = {chunks * host:.1f} s (it evaluates every chunk)")
    floor = chunks * (encrypt + host) / cores
    print(f"  {max(args.workers)} workers >= ({chunks} x {encrypt:.2f} + {chunks} x {host:.2f}) / {cores} cores = "
          f"{floor:.1f} s "
          f"(all the work on {cores} cores): {floor / (chunks * host):.2f} x the 1-worker floor")
    if not args.he_only:
        print(f"\nreference checkpoints identical across worker counts: {same}")
    print(f"HE: ciphertext bytes in per chunk {rows[-1][3].ciphertext_bytes_in / chunks:,.0f}, "
          f"out {rows[-1][3].ciphertext_bytes_out:,}; public context {rows[-1][3].public_context_bytes:,} (once per worker)")
    print(f"client peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
