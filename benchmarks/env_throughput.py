"""Env throughput: the physical limit that later performance goals are measured against.

Raw steps/s of ManiSkill3 (PickCube-v1, state and RGB 128x128) and LIBERO (libero_spatial task 0: physics only, and two
128x128 cameras with and without shadows) on this machine. For each setting: the bare simulator in this process (the
raw limit, no wrapper), then our batched wrapper (`common.maniskill_env` / `common.libero_env`) with 1 and N worker
processes, counted as total env-steps/s. Random actions, no episode resets during the timed steps.

    python benchmarks/env_throughput.py                      # writes benchmarks/results/env_throughput.{md,json,png}
    python benchmarks/env_throughput.py --steps-scale 0.2    # a quick look
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
os.environ.setdefault("MS_SKIP_ASSET_DOWNLOAD_PROMPT", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import tyro
from tqdm import tqdm

from benchmarks.report import RESULTS_DIR, pyplot, write_results


@dataclass
class Args:
    workers: list[int] = field(default_factory=lambda: [1, os.cpu_count() or 2])
    """worker-process counts to measure the wrapper with"""
    steps_scale: float = 1.0
    """multiplies every setting's number of timed steps (lower for a quick look)"""
    seed: int = 0
    """seed of the random actions and of the reset ids"""
    only: list[str] = field(default_factory=list)
    """measure only the settings whose name contains one of these strings (default: all)"""
    out_dir: Path = RESULTS_DIR
    """where env_throughput.{md,json,png} go"""


# name, simulator, config, timed steps per env
SETTINGS = [
    ("ManiSkill PickCube state", "maniskill", dict(task="PickCube-v1", obs_mode="state"), 600),
    # A chunk of actions goes to a worker in one message (`Backend.step_chunk`), not k lock-step round trips.
    ("ManiSkill PickCube state, chunks of 8", "maniskill", dict(task="PickCube-v1", obs_mode="state", chunk=8), 600),
    ("ManiSkill PickCube RGB 128", "maniskill", dict(task="PickCube-v1", obs_mode="rgb", image_size=128), 60),
    ("LIBERO spatial physics only", "libero", dict(cameras=False), 300),
    ("LIBERO spatial 2 cams 128, shadows", "libero", dict(cameras=True, shadows=True, image_size=128), 30),
    ("LIBERO spatial 2 cams 128, no shadows", "libero", dict(cameras=True, shadows=False, image_size=128), 30),
    # A policy call returns a chunk of actions; the frames inside a chunk are never looked at, so they are not rendered.
    ("LIBERO spatial 2 cams 128, no shadows, chunks of 5", "libero",
     dict(cameras=True, shadows=False, image_size=128, chunk=5), 60),
]
CONTROL_MODE = "pd_ee_delta_pose"  # the VLA action space (delta end-effector pose + gripper)
WARMUP = 10  # untimed steps first: lazy allocations, first renders


def timed_steps(step, actions) -> float:
    """Calls `step` on each action after the first WARMUP; returns timed calls per second."""
    for a in actions[:WARMUP]:
        step(a)
    start = time.perf_counter()
    for a in actions[WARMUP:]:
        step(a)
    return (len(actions) - WARMUP) / (time.perf_counter() - start)


def raw_maniskill(cfg: dict, steps: int, rng) -> float:
    """The bare ManiSkill env, no wrapper: gym.make + step in this process."""
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401

    kwargs = dict(num_envs=1, obs_mode=cfg["obs_mode"], sim_backend="physx_cpu", control_mode=CONTROL_MODE)
    if cfg["obs_mode"] == "rgb":
        kwargs.update(sensor_configs=dict(width=cfg["image_size"], height=cfg["image_size"]), render_mode="rgb_array")
    env = gym.make(cfg["task"], **kwargs).unwrapped
    env.reset(seed=0)
    actions = torch.as_tensor(rng.uniform(-1, 1, (steps + WARMUP, 1, 7)), dtype=torch.float32)
    sps = timed_steps(env.step, actions)
    env.close()
    return sps


def raw_libero(cfg: dict, steps: int, rng) -> float:
    """The bare LIBERO env (OffScreenRenderEnv / ControlEnv from the task's BDDL file), no wrapper."""
    import mujoco
    from libero.libero import benchmark
    from libero.libero.envs import OffScreenRenderEnv
    from libero.libero.envs.env_wrapper import ControlEnv

    suite = benchmark.get_benchmark_dict()["libero_spatial"]()
    kwargs = dict(bddl_file_name=suite.get_task_bddl_file_path(0), horizon=10**9, ignore_done=True)
    if cfg["cameras"]:
        env = OffScreenRenderEnv(camera_heights=cfg["image_size"], camera_widths=cfg["image_size"], **kwargs)
    else:
        env = ControlEnv(has_offscreen_renderer=False, use_camera_obs=False, **kwargs)
    env.reset()
    if cfg["cameras"] and not cfg["shadows"]:
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            env.sim._render_context_offscreen.scn.flags[flag] = 0
    env.set_init_state(suite.get_task_init_states(0)[0])
    sps = timed_steps(env.step, rng.uniform(-1, 1, (steps + WARMUP, 7)))
    env.close()
    return sps


def wrapped(sim: str, cfg: dict, workers: int, steps: int, rng, seed: int) -> tuple[float, float]:
    """Our batched wrapper over `workers` processes; returns (total env-steps/s, make + reset seconds)."""
    start = time.perf_counter()
    if sim == "maniskill":
        from common.maniskill_env import make_maniskill_env

        env = make_maniskill_env(cfg["task"], workers, obs_mode=cfg["obs_mode"], image_size=cfg.get("image_size", 128),
                                 control_mode=CONTROL_MODE, sim_backend="cpu", max_episode_steps=10**9, seed=seed)
    else:
        from common.libero_env import make_libero_env

        env = make_libero_env("libero_spatial", workers, task_ids=[0], cameras=cfg["cameras"],
                              shadows=cfg.get("shadows", True), image_size=cfg.get("image_size", 128),
                              max_episode_steps=10**9, seed=seed)
    env.reset(seed=seed)
    make_s = time.perf_counter() - start
    k = cfg.get("chunk", 1)
    shape = (steps // k + WARMUP, workers, k, env.action_dim) if k > 1 else (steps + WARMUP, workers, env.action_dim)
    sps = timed_steps(env.step, torch.as_tensor(rng.uniform(-1, 1, shape), dtype=torch.float32)) * workers * k
    env.close()
    return sps, make_s


def main(args: Args) -> None:
    rng = np.random.default_rng(args.seed)
    settings = [s for s in SETTINGS if not args.only or any(o.lower() in s[0].lower() for o in args.only)]
    if not settings:
        raise SystemExit(f"nothing to run: --only {args.only} matches none of {[s[0] for s in SETTINGS]}")
    if not args.workers or min(args.workers) < 1:
        raise SystemExit(f"--workers takes counts >= 1, got {args.workers}")
    rows = []
    jobs = [(s, None) for s in settings] + [(s, w) for s in settings for w in args.workers]
    jobs.sort(key=lambda j: settings.index(j[0]))
    for (name, sim, cfg, steps), workers in tqdm(jobs, desc="env throughput", unit="run"):
        n = max(5, int(steps * args.steps_scale))
        if workers is None:
            sps = (raw_maniskill if sim == "maniskill" else raw_libero)(cfg, n, rng)
            rows.append({"setting": name, "runner": "bare simulator, in process", "workers": 1,
                         "steps_per_s": round(sps, 1), "vs_bare": 1.0, "make_reset_s": None})
            bare = sps
        else:
            sps, make_s = wrapped(sim, cfg, workers, n, rng, args.seed)
            rows.append({"setting": name, "runner": "our wrapper", "workers": workers, "steps_per_s": round(sps, 1),
                         "vs_bare": round(sps / bare, 2), "make_reset_s": round(make_s, 1)})
        tqdm.write(f"{name:40s} {rows[-1]['runner']:28s} workers={rows[-1]['workers']}: {rows[-1]['steps_per_s']:8.1f} steps/s")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{r['setting']}\n{'bare' if r['runner'].startswith('bare') else str(r['workers']) + ' worker(s)'}"
              for r in rows]
    ax.barh(range(len(rows)), [r["steps_per_s"] for r in rows],
            color=["tab:gray" if r["runner"].startswith("bare") else "tab:blue" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("env steps / s (total over workers, log scale)")
    ax.set_title("Env throughput on this machine (gray: bare simulator; blue: our wrapper)")
    notes = (
        "Steps/s are total env steps per second over all workers, random actions in [-1, 1], "
        f"ManiSkill control mode `{CONTROL_MODE}` on `physx_cpu`; LIBERO libero_spatial task 0, init state 0, "
        "`OffScreenRenderEnv` rendering through EGL (Mesa llvmpipe on a CPU machine). No resets inside the timed "
        "steps; `make_reset_s` is the wrapper's construction + first reset. `vs_bare` is our wrapper's total over the "
        "bare single simulator in the same run: with 2 cores, 2 workers can at best double it, except with action "
        "chunks, where only the last step of each chunk is rendered (the bare row renders every step). A chunk goes "
        "to a worker as one message, so the worker steps it without waiting on the parent between steps."
    )
    path = write_results("env_throughput", "Env throughput (steps/s)",
                         ["setting", "runner", "workers", "steps_per_s", "vs_bare", "make_reset_s"], rows,
                         seeds=[args.seed], notes=notes, out_dir=args.out_dir, figure=fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
