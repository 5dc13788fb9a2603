"""The team stack's Dask cluster: a scheduler on loopback and ``KDSEC_DASK_WORKERS`` workers, each
a process of the project's environment (its code and locked packages, which the pipeline's
preflight compares), under a nanny that restarts it if it dies. The Prefect worker's flow runs get
its address as ``KDSEC_DASK_ADDRESS`` (``compute.dask_address``): their reference models and HE
chunks run there. Dask's TCP has no authentication, hence loopback. Imported by ``stack.py`` (and
imports it back lazily: one stack, one set of helpers).
"""

from __future__ import annotations

import time


def dask_address(config: dict[str, str]) -> str:
    return f"tcp://127.0.0.1:{config['KDSEC_DASK_PORT']}"


def dask_workers(config: dict[str, str]) -> list[str]:
    return [f"dask-worker-{index}" for index in range(int(config["KDSEC_DASK_WORKERS"]))]


def dask_up(config: dict[str, str], secret: dict[str, str]) -> None:
    """A Dask scheduler on loopback and ``KDSEC_DASK_WORKERS`` workers (each under a nanny that
    restarts it if it dies), all of this environment, so they run the project's code and locked
    packages; up once the scheduler counts them all."""
    import stack

    address, env = dask_address(config), {**stack.base_env(), "PYTHONPATH": str(stack.ROOT)}
    if stack.running("dask-scheduler") is None:
        stack.spawn("dask-scheduler", [str(stack.BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                       config["KDSEC_DASK_PORT"], "--no-dashboard"], env, "dask scheduler")
    for name in dask_workers(config):
        if stack.running(name) is None:
            folder = stack.state_dir() / "dask" / name
            folder.mkdir(parents=True, exist_ok=True)
            stack.spawn(name, [str(stack.BIN / "dask"), "worker", address, "--name", name, "--nthreads",
                               config["KDSEC_DASK_THREADS"], "--host", "127.0.0.1", "--no-dashboard", "--memory-limit",
                               config["KDSEC_DASK_MEMORY"], "--local-directory", str(folder)], env, f"--name {name}")
    from distributed import Client

    deadline = time.monotonic() + 90
    while True:
        for name in ("dask-scheduler", *dask_workers(config)):
            if stack.running(name) is None:
                raise stack.StackError(f"{name} exited during start-up; see {stack._log(name)}: "
                                       f"{stack._tail(name)}")
        try:
            with Client(address, timeout=10, set_as_default=False) as client:
                client.wait_for_workers(len(dask_workers(config)), timeout=max(1.0, deadline - time.monotonic()))
            return
        except (OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise stack.StackError(f"the Dask cluster at {address} did not count {len(dask_workers(config))} "
                                       f"workers within 90 s ({exc}); see {stack._log('dask-scheduler')}") from None
            time.sleep(0.5)
