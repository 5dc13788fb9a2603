# Two commands for a new user: `make run` (the pipeline on digits) and `make test`.
# Each bootstraps what it needs: uv (from PyPI if missing) and the locked environment.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
ARGS ?=

# No telemetry calls from a machine that may have no internet.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_ENABLE_TELEMETRY := false
# A first start of the temporary Prefect server (database migrations) can pass the 20 s default.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: run prefect-stop prefect-status test bench bench-gates bench-he bench-audit bench-dp-audit bench-compress bench-explain bench-full bench-he-conv bench-dask sync uv clean mlflow-ui prefect-ui \
	stack-up stack-down stack-status stack-test screenshots chromium

uv:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv

# Bytecode compiled once at sync: the first `kdsec run` does not pay for it on import.
sync: uv
	@$(UV) sync --frozen --quiet --compile-bytecode

# Runs attach to a local Prefect server that the first `make run` starts in the background
# (no server start per run; history in its UI); `make prefect-stop` stops it.
run: sync
	KDSEC_LOCAL_SERVER=1 $(UV) run --frozen kdsec run $(ARGS)

prefect-stop:
	@$(UV) run --frozen python -m flows.local_server stop

prefect-status:
	@$(UV) run --frozen python -m flows.local_server status

# The report's layout tests run in Debian's Chromium: installed here where it is missing (as root,
# or with passwordless sudo), so a fresh machine runs them instead of skipping them.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
		[ "$$SUDO" != none ] && $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	} || { echo "error: Chromium is missing and could not be installed: apt-get install chromium (as root)"; exit 1; }

test: sync chromium
	$(UV) run --frozen pytest $(ARGS)

bench: sync
	$(UV) run --frozen python benchmarks/run_pipeline.py

bench-gates: sync
	$(UV) run --frozen python benchmarks/gate_defaults.py

bench-he: sync
	$(UV) run --frozen python benchmarks/he_inference.py

bench-compress: sync
	$(UV) run --frozen python benchmarks/distill_compress.py

bench-explain: sync
	$(UV) run --frozen python benchmarks/explain_seeds.py

# configs/mnist.yaml on 70,000 synthetic images in the official idx format, timed per stage
# against the config's budget (20 min; measured ~7). ARGS="--dataset cifar10", "--max-samples 3000".
bench-full: sync
	$(UV) run --frozen python benchmarks/full_size.py $(ARGS)

# HE-friendly students (he_mlp, he_cnn) on MNIST-sized data: KD gain over 3 seeds in errors per
# 10,000, encrypted accuracy, ms/image and sizes beside CryptoNets / LoLa / nGraph-HE2 / Concrete ML.
# ARGS="--dataset fashion_mnist --data-root <folder with FashionMNIST/raw>" for the real files.
bench-he-conv: sync
	$(UV) run --frozen python benchmarks/he_conv.py $(ARGS)

# The one-run DP audit (canaries in a DP-SGD and a plain copy of the student): ε lower bounds.
bench-dp-audit: sync
	$(UV) run --frozen python benchmarks/dp_audit.py $(ARGS)

# compute.dask_address: 16 MNIST reference models and the HE batch of the test split on a native
# Dask cluster of 1 worker, then 2, as ratios. ARGS="--data-root <folder with MNIST/raw>".
bench-dask: sync
	$(UV) run --frozen python benchmarks/dask_scale.py $(ARGS)

bench-audit: sync
	$(UV) sync --frozen --quiet --group bench
	$(UV) run --frozen --group bench python benchmarks/audit_toolkits.py $(ARGS)

# The team stack on loopback: PostgreSQL, Prefect server, MLflow server (basic-auth), a worker.
stack-up: sync
	$(UV) run --frozen python deployments/stack.py up

stack-down: sync
	$(UV) run --frozen python deployments/stack.py down

stack-status: sync
	$(UV) run --frozen python deployments/stack.py status

# A team's day on its own stack (own folder and ports), stopped at the end even on failure.
stack-test: sync
	$(UV) run --frozen pytest -m stack tests/stack -p no:cacheprovider -s $(ARGS)

# What a reviewer sees, in a real headless Chromium (Debian's, installed here if missing):
# the latest run's report and the MLflow UI on the local store, into docs/screenshots/.
screenshots: sync chromium
	$(UV) run --frozen python docs/screenshots.py $(ARGS)

mlflow-ui: sync
	$(UV) run --frozen mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

prefect-ui: sync
	@$(UV) run --frozen python -m flows.local_server start

clean:
	rm -rf outputs mlruns mlartifacts mlflow.db .kdsec/cache
