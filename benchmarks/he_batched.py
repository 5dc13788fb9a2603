"""The batched encrypted-input path of one trained HE student, timed alone: the client encrypts,
host processes evaluate, the client decrypts, on a run's whole test split. For A/B timings on a
shared machine: runs alternate the host-worker counts given, in that order.

    python benchmarks/he_batched.py outputs/<run>/ --workers 2 1 2
        (a run folder holding kd_student.safetensors and splits.npz; --checkpoint picks another)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run's output folder (splits.npz, checkpoints)")
    parser.add_argument("--checkpoint", default="kd_student.safetensors")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 1, 2])
    args = parser.parse_args()

    from kdsec.compress.quantize import load_weights
    from kdsec.config import HEConfig
    from kdsec.he.encrypted_input import run_encrypted_input
    from kdsec.he.program import he_program

    model, _, _ = load_weights(args.run / args.checkpoint)
    with np.load(args.run / "splits.npz") as splits:
        inputs = splits["x_test"]
    preprocess, ops = he_program(model.eval())
    inputs = preprocess(inputs)
    for workers in args.workers:
        started = time.perf_counter()
        _, run = run_encrypted_input(ops, inputs, HEConfig(host_workers=workers), "batched")
        print(f"host_workers {workers}: {run.ms_per_sample:.3f} ms/image (host {run.server_ms_per_sample:.3f}), "
              f"{run.samples:,} images in {time.perf_counter() - started:.1f} s, agreement {run.agreement:.5f}",
              flush=True)


if __name__ == "__main__":
    main()
