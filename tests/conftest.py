"""Test environment: no W&B network, headless MuJoCo over EGL, no HF downloads, simulator state in temp dirs.
`make test` sets the same variables; these defaults make a bare `pytest` behave the same way."""

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MS_SKIP_ASSET_DOWNLOAD_PROMPT", "1")
os.environ.setdefault("MS_ASSET_DIR", tempfile.mkdtemp(prefix="ms_assets_"))
os.environ.setdefault("LIBERO_CONFIG_PATH", tempfile.mkdtemp(prefix="libero_cfg_"))


def pytest_unconfigure(config):
    """A run whose tests are over but whose process hangs on exit (a thread or a ZMQ context left waiting) would stall
    CI until the job's deadline: after EXIT_DEADLINE_S, print every thread's stack and exit with status 1."""
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(EXIT_DEADLINE_S, exit=True, file=sys.__stderr__)


EXIT_DEADLINE_S = 120
