"""One factory for the simulators the algorithm scripts train and evaluate on (`--env maniskill|libero`).

`make_task_env("maniskill", "PushCube-v1", ...)` or `make_task_env("libero", "libero_object/0", ...)` returns the shared
`BatchedEnv` (see `common.vec_env`). LIBERO tasks are "<suite>/<task ids>": one task ("libero_object/0") or a subset
trained and evaluated together ("libero_object/0-3", "libero_object/0,2,5", or "libero_object" for all ten, as RLinf
trains a suite); their reset ids are those tasks' init states, each env's prompt its own task's instruction.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from common.maniskill_env import REWARD_MODES  # ManiSkill's reward modes; LIBERO has only "sparse"
from common.vec_env import BatchedEnv

ENVS = ("maniskill", "libero")


def check_task(env: str, task: str, exists: bool = False) -> None:
    """Raise ValueError with the expected form for an unknown env or a malformed LIBERO task; with `exists`, also for
    a task that is not there (an unknown suite, a task id out of range, an unknown or not downloaded ManiSkill task),
    so that a script fails on its flags, not after it built a model."""
    if env not in ENVS:
        raise ValueError(f"env must be one of {ENVS}, got {env!r}")
    if env == "libero":
        from common.libero_env import libero_task_ids, suite_reset_table

        suite, task_ids = libero_task_ids(task)
        if exists:
            suite_reset_table(suite, task_ids)
    elif exists:
        from common.maniskill_env import check_task as check_maniskill_task

        check_maniskill_task(task)


def task_names(env: str, task: str) -> list[str]:
    """The single tasks a --task names, as demo datasets record them: ["PushCube-v1"]; ["libero_object/0", ...]."""
    if env != "libero":
        return [task]
    from common.libero_env import libero_task_ids

    suite, task_ids = libero_task_ids(task)
    return [f"{suite}/{t}" for t in task_ids]


def task_instructions(env: str, task: str) -> list[str]:
    """The instructions the envs of a --task prompt with, one per task (LIBERO); [] for a one-task env (ManiSkill),
    whose single prompt cannot collide with another."""
    if env != "libero":
        return []
    from common.libero_env import libero_task_ids, task_instructions as libero_instructions

    suite, task_ids = libero_task_ids(task)
    return libero_instructions(suite, task_ids)


def eval_initial_states(env: str, task: str, eval_episodes: int) -> range:
    """The initial states (ManiSkill seeds, LIBERO init state indices of each task) that `eval_episodes` eval episodes
    start from: demos must come from others."""
    if env != "libero":
        return range(eval_episodes)
    from common.libero_env import EVAL_INIT_STATES

    per_task = -(-eval_episodes // len(task_names(env, task)))
    return EVAL_INIT_STATES[:per_task]


def rlinf_libero_values(suite: str) -> dict:
    """RLinf's per-suite LIBERO PPO values (pirl.md §3.5): libero_10 runs 10-action chunks and clips at 2.0; its 8
    rollout epochs of one episode per env, as the samples of auto-reset rollouts per iteration."""
    from common.libero_env import MAX_EPISODE_STEPS

    chunk = 10 if suite == "libero_10" else 5
    return dict(action_chunk=chunk, max_grad_norm=2.0 if suite == "libero_10" else 1.0,
                num_steps=8 * MAX_EPISODE_STEPS[suite] // chunk)


def rlinf_pi05_values(env: str, suite: str, noise_level: bool) -> dict:
    """Where RLinf's π0.5 PPO configs differ from the π0 ones (pirl.md §3.5): denoising steps, Flow-SDE noise level
    (`noise_level`: for a script that has one), epochs and gradient clip (1.0 on every suite) per LIBERO suite;
    ManiSkill's epochs and chunk-level ratios.
    (libero_10's cosine lr schedule is not reproduced.)"""
    if env != "libero":
        return dict(update_epochs=5, logprob_type="chunk")
    # every π0.5 LIBERO config clips at 1.0 (the π0 libero_10 config's 2.0 is its own)
    values = {"libero_spatial": dict(num_denoise_steps=3, update_epochs=1),
              "libero_object": dict(num_denoise_steps=5, noise_level=0.3, update_epochs=1),
              "libero_goal": dict(num_denoise_steps=5, noise_level=0.3),
              "libero_10": dict(num_denoise_steps=5)}.get(suite, {})
    return {k: v for k, v in {**values, "max_grad_norm": 1.0}.items() if noise_level or k != "noise_level"}


def flags_given(argv: list[str]) -> set[str]:
    """The field names of the `--flag` / `--flag=value` / `--no-flag` options on a tyro command line."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.update({name, name[3:]} if name.startswith("no_") else {name})
    return names


def fill_defaults(args, values: dict, argv: list[str] | None = None) -> list[str]:
    """Set each of `values` on the tyro `args` where the flag was not given on the command line (`argv`, default
    sys.argv) and is at its default; returns the flags given otherwise (kept, as `--name value`), so that a preset
    never overrides what the user asked for, even a value that happens to be the default."""
    given = flags_given(sys.argv[1:] if argv is None else argv)
    kept = []
    for key, value in values.items():
        if key not in given and getattr(args, key) == getattr(type(args), key):
            setattr(args, key, value)
        elif getattr(args, key) != value:
            kept.append(f"--{key.replace('_', '-')} {getattr(args, key)}")
    return kept


def make_task_env(env: str, task: str, num_envs: int, *, obs_mode: str = "state", control_mode: str = "pd_joint_pos",
                  image_size: int = 64, max_episode_steps: int | None = None, eval_mode: bool = False,
                  num_eval_episodes: int | None = None, auto_reset: bool = True, seed: int = 0,
                  reward_mode: str = "sparse") -> BatchedEnv:
    """ManiSkill on CPU workers (or the GPU simulator when CUDA is there) with `obs_mode` / `control_mode`; LIBERO with
    two cameras at `image_size`. `max_episode_steps=None`: 100 for ManiSkill (its registered 50 is shorter than the
    motion-planning demos), the suite's limit for LIBERO. A LIBERO eval (`eval_mode`) walks EVAL_INIT_STATES init state
    by init state over the tasks. `reward_mode`: "sparse" (success), or for ManiSkill one of its shaped levels ("dense",
    "normalized_dense") paid out as its per-step change, so that an episode's rewards sum to its final level (RLinf's
    relative reward: no stream of reward to keep collecting by hovering short of success)."""
    check_task(env, task)
    if reward_mode not in REWARD_MODES:
        raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
    if env == "libero" and reward_mode != "sparse":
        raise ValueError(f"LIBERO has only the sparse success reward, got reward_mode {reward_mode!r}")
    if env == "maniskill":
        from common.maniskill_env import make_maniskill_env

        return make_maniskill_env(task, num_envs=num_envs, obs_mode=obs_mode, control_mode=control_mode,
                                  image_size=image_size, max_episode_steps=max_episode_steps or 100,
                                  eval_mode=eval_mode, num_eval_episodes=num_eval_episodes, auto_reset=auto_reset,
                                  seed=seed, reward_mode=reward_mode, relative_reward=reward_mode != "sparse")
    from common.libero_env import EVAL_INIT_STATES, MAX_EPISODE_STEPS, libero_task_ids, make_libero_env

    suite, task_ids = libero_task_ids(task)  # an eval starts only from the eval init states, spread over the tasks
    return make_libero_env(suite, num_envs=num_envs, task_ids=task_ids, image_size=image_size,
                           init_states=EVAL_INIT_STATES if eval_mode else None,
                           max_episode_steps=max_episode_steps or MAX_EPISODE_STEPS[suite], eval_mode=eval_mode,
                           num_eval_episodes=num_eval_episodes, auto_reset=auto_reset, seed=seed)


def default_eval_envs(env: str, task: str) -> int:
    """Parallel eval envs when not given: 2, or the task count of a LIBERO subset of 3 or 4 tasks (an eval deals its
    episodes to the envs round-robin, so each env then keeps one task instead of rebuilding its simulator at every
    episode: ~1.6 s against ~0.3 s)."""
    if env != "libero":
        return 2
    from common.libero_env import libero_task_ids

    tasks = len(libero_task_ids(task)[1])
    return tasks if 3 <= tasks <= 4 else 2


def run_eval_episodes(env: BatchedEnv, act, video_path=None) -> dict:
    """Run an eval-mode env to completion with `act(obs) -> actions` (N, k, A); closes the env. Returns the mean
    success (success_once), return and length over the finished episodes; `video_path` gets env 0's main camera."""
    successes, returns, lengths, frames = [], [], [], []
    try:
        obs = env.reset()
        while not env.eval_complete:
            actions = act(obs)
            if video_path is not None and "images" in obs and not env.stopped[0]:
                frames.append(obs["images"]["main"][0].cpu().numpy())
            obs, _, _, _, info = env.step(actions.cpu())
            for i in torch.nonzero(info["done"]).flatten().tolist():
                successes.append(float(info["episode"]["success_once"][i]))
                returns.append(float(info["episode"]["return"][i]))
                lengths.append(float(info["episode"]["length"][i]))
    finally:
        env.close()
    if frames:
        import imageio

        imageio.mimsave(video_path, frames, fps=10)
    return {"success_rate": float(np.mean(successes)), "episodic_return": float(np.mean(returns)),
            "episode_length": float(np.mean(lengths)), "episodes": len(successes)}
