# `make run` and `make test` each set everything up first (idempotent), as the README's Quickstart says.
VENV ?= .venv
PY := $(VENV)/bin/python
# What tests and CI need: no W&B network, headless MuJoCo over EGL, no HF downloads, ManiSkill/LIBERO state in temp dirs.
TEST_ENV := WANDB_MODE=disabled MUJOCO_GL=egl PYOPENGL_PLATFORM=egl HF_HUB_OFFLINE=1 MS_SKIP_ASSET_DOWNLOAD_PROMPT=1 \
	MS_ASSET_DIR=$$(mktemp -d) LIBERO_CONFIG_PATH=$$(mktemp -d)

.PHONY: setup run test test-fast bench-env pirl-quickstart clean

setup:
	bash scripts/setup.sh

# The project's main job: the πRL pipeline at CPU scale, end to end (PushCube-v1 motion-planning demos -> few-shot SFT
# of the tiny π0 with the MLP action expert -> Flow-SDE PPO for 8 minutes with the script's CPU recipe for that
# expert -> eval table), about 16 minutes on 2 cores.
run: setup pirl-quickstart

pirl-quickstart:
	$(TEST_ENV) $(PY) benchmarks/pirl.py --seeds 1 --algorithms flow_sde --minutes 8 --eval-every 40 \
		--sft-flags="--expert mlp --expert-width 256" --run-dir runs/quickstart --out-dir runs/quickstart

bench-env:
	$(TEST_ENV) $(PY) benchmarks/env_throughput.py

test: setup
	$(TEST_ENV) $(PY) -m pytest -q -rs

test-fast: setup
	$(TEST_ENV) $(PY) -m pytest -q -rs -m "not slow"

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
