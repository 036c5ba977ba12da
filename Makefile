# `make run` and `make test` each set everything up first (idempotent), as the README's Quickstart says.
VENV ?= .venv
PY := $(VENV)/bin/python
# What tests and CI need: no W&B network, headless MuJoCo over EGL, no HF downloads, ManiSkill/LIBERO state in temp dirs.
TEST_ENV := WANDB_MODE=disabled MUJOCO_GL=egl PYOPENGL_PLATFORM=egl HF_HUB_OFFLINE=1 MS_SKIP_ASSET_DOWNLOAD_PROMPT=1 \
	MS_ASSET_DIR=$$(mktemp -d) LIBERO_CONFIG_PATH=$$(mktemp -d)

.PHONY: setup run test test-fast bench-env clean

setup:
	bash scripts/setup.sh

# The project's main job. Until algos/flow_sde_pi0.py lands, that is the env throughput benchmark.
run: setup bench-env

bench-env:
	$(TEST_ENV) $(PY) benchmarks/env_throughput.py

test: setup
	$(TEST_ENV) $(PY) -m pytest -q -rs

test-fast: setup
	$(TEST_ENV) $(PY) -m pytest -q -rs -m "not slow"

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
