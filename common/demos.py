"""Demonstration datasets: the project's HDF5 replay-buffer format (`common.replay_buffer`), one segment per episode.

A demo dataset is a buffer directory. Each segment is one expert episode, stored exactly as our env wrappers observe
it, so a policy trained on it sees at eval time the same keys, shapes and conventions:

    obs/state   [T+1, D] float32      the wrapper's `state` observation (row t is seen before action t)
    obs/main    [T+1, H, W, 3] uint8  optional camera images (the wrappers' `images` dict, flattened)
    obs/wrist   [T+1, H, W, 3] uint8  optional
    actions     [T, A] float32        the env action at each step (the env's own action space)
    rewards [T], terminated [T] (True on the success step), truncated [T]

and the segment meta (JSON) holds at least:

    source            "maniskill_motionplanning" | "libero_scripted" | ...
    env               "maniskill" | "libero"
    task              ManiSkill env id, or "<suite>/<task_id>" for LIBERO
    task_description  the language instruction the env reports
    reset_id          the env reset id the episode started from (ManiSkill seed; LIBERO (task, init) index)
    success           whether the expert succeeded (only successful episodes are stored unless asked otherwise)
    control_mode      the controller the actions are for (ManiSkill; LIBERO is always OSC_POSE delta)

Generators: `python -m common.maniskill_demos` (motion planning) and `python -m common.libero_expert` (scripted
expert with privileged state). Reader: `load_demos` below (used by `algos/sft_pi0.py`). A generator marks the
directory with `generating.json` while it fills it (`begin_generation` / `end_generation`): each stored episode is
durable, so a generation killed at any moment goes on from the episodes it stored when run again (`ensure_demos` does
that by itself), and a generator run again on a finished dataset adds no episode it already holds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from common.fsutil import atomic_write
from common.replay_buffer import BufferError, ReplayBuffer

IMAGE_KEYS = ("main", "wrist")
GENERATING = "generating.json"  # present while a generator fills the dataset (an interrupted one goes on from it)


def begin_generation(directory: str | Path, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Mark `directory` as being filled by a generator (until `end_generation`) and return the metas of the episodes
    it already holds, oldest first, for the generator to skip."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metas = []
    if (directory / "segments").is_dir():
        buf = ReplayBuffer.open(directory, readonly=True, cache_transitions=0, eviction="keep")
        metas = [dict(buf.seg_meta.get(seg_id, {})) for seg_id in buf.ids]
    atomic_write(directory / GENERATING, json.dumps(request, default=str))
    return metas


def end_generation(directory: str | Path) -> None:
    """The generation is complete (its report written): `directory` is a finished dataset."""
    (Path(directory) / GENERATING).unlink(missing_ok=True)


def open_demo_writer(directory: str | Path) -> ReplayBuffer:
    """A buffer that keeps every episode (no eviction), appending to an existing dataset if there is one."""
    return ReplayBuffer(directory, eviction="keep", cache_transitions=0, compression="lzf")


def episode_segment(observations: list[dict[str, Any]], actions: list[np.ndarray], success_step: int | None,
                    rewards: list[float] | None = None) -> dict[str, Any]:
    """Build a buffer segment from T+1 wrapper observations (dicts with `state` and optionally `images`) and T
    actions. `success_step` is the index of the action after which the task succeeded (None: never)."""
    T = len(actions)
    if len(observations) != T + 1:
        raise ValueError(f"an episode of {T} actions needs {T + 1} observations, got {len(observations)}")
    obs: dict[str, np.ndarray] = {"state": np.stack([np.asarray(o["state"], np.float32) for o in observations])}
    if "images" in observations[0]:
        for key in observations[0]["images"]:
            obs[key] = np.stack([np.asarray(o["images"][key], np.uint8) for o in observations])
    terminated = np.zeros(T, bool)
    if success_step is not None:
        terminated[success_step] = True
    reward = np.asarray(rewards, np.float32) if rewards is not None else terminated.astype(np.float32)
    return {"obs": obs, "actions": np.stack([np.asarray(a, np.float32) for a in actions]), "rewards": reward,
            "terminated": terminated, "truncated": np.zeros(T, bool)}


def load_demos(directory: str | Path, per_task: int | None = None, only_success: bool = True,
               tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """Read a demo dataset into memory: a list of episodes {obs, actions, meta}, oldest first. `per_task` keeps the
    first N episodes of each task (the few-shot knob); `tasks` filters by the meta's task."""
    if not (Path(directory) / "segments").is_dir():
        raise BufferError(f"{directory} is not a demo dataset (no segments/ folder); generate one with "
                          "`python -m common.maniskill_demos` or `python -m common.libero_expert`")
    buf = ReplayBuffer.open(directory, readonly=True, cache_transitions=0, eviction="keep")
    counts: dict[str, int] = defaultdict(int)
    episodes = []
    for seg_id in buf.ids:
        meta = buf.seg_meta.get(seg_id, {})
        task = meta.get("task", "")
        if (only_success and not meta.get("success", True)) or (tasks is not None and task not in tasks):
            continue
        if per_task is not None and counts[task] >= per_task:
            continue
        counts[task] += 1
        seg = buf.read_segment(seg_id)
        episodes.append({"obs": seg["obs"], "actions": seg["actions"].astype(np.float32), "meta": seg["meta"]})
    if not episodes:
        raise BufferError(f"{directory}: no episodes match (tasks={tasks}, only_success={only_success})")
    return episodes


def ensure_demos(env: str, task: str, num_demos: int, directory: str | Path | None = None, *,
                 obs_mode: str = "state", image_size: int = 64) -> Path:
    """The demo dataset of `task` (default `data/demos/<task>`), generated first when missing (or finished when an
    earlier generation was interrupted): motion planning on ManiSkill, the scripted expert on LIBERO, from seeds /
    init states disjoint from the eval ones. A ManiSkill dataset with fewer than `num_demos` successful demos of
    `task`, made with the same observations, is topped up (with the demos a fresh generation of `num_demos` would
    hold: the seeds go on in order)."""
    path = Path(directory or f"data/demos/{task.replace('/', '_')}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"demos: {path} is a file, not a demo directory")
    interrupted = (path / GENERATING).exists()
    if (path / "segments").is_dir() and not interrupted:
        report = json.loads((path / "report.json").read_text()) if (path / "report.json").exists() else {}
        if env != "maniskill" or report.get("task") != task or report.get("obs_mode") != obs_mode or (
                obs_mode != "state" and report.get("image_size") != image_size):
            return path  # not ours to extend (the caller's checks say what does not fit)
        buf = ReplayBuffer.open(path, readonly=True, cache_transitions=0, eviction="keep")
        have = sum(1 for i in buf.ids if buf.seg_meta.get(i, {}).get("task") == task
                   and buf.seg_meta.get(i, {}).get("success", True))
        if have >= num_demos:
            return path
        print(f"{path} holds {have} demos of {task}: adding {num_demos - have}")
    else:
        print(f"{'an interrupted generation at' if interrupted else 'no demos at'} {path}: "
              f"{'going on with it' if interrupted else 'generating them'} (at least {num_demos} per task, disjoint "
              f"from the eval initial states; on LIBERO one from each of init states 25..49 of each task)")
    if env == "maniskill":
        from common.maniskill_demos import generate_demos

        generate_demos(task, num_demos, path, obs_mode=obs_mode, image_size=image_size)
    else:
        from common.libero_env import DEMO_INIT_STATES, libero_task_ids
        from common.libero_expert import generate_libero_demos

        suite, task_ids = libero_task_ids(task)  # eval uses EVAL_INIT_STATES, disjoint from these
        generate_libero_demos(suite, task_ids, list(DEMO_INIT_STATES), path, cameras=True, image_size=image_size)
    return path


def check_demos(episodes: list[dict[str, Any]], directory, *, env: str, obs_mode: str, control_mode: str,
                image_size: int, eval_states: range) -> tuple[str, ...]:
    """Refuse demos that would make a training run's eval wrong: an eval initial state (`eval_states`, from
    `common.envs.eval_initial_states`) among the demos', demos without their initial state, another control mode,
    other cameras or image size than the env will give. Returns the camera keys the demos hold, in slot order."""
    ids = {e["meta"].get("init_index", e["meta"].get("reset_id")) for e in episodes}
    if None in ids:
        raise ValueError(f"{directory}: some demos do not record their initial state; cannot check eval disjointness")
    overlap = {int(i) for i in ids} & set(eval_states)
    if overlap:
        raise ValueError(f"eval initial states {eval_states.start}..{eval_states.stop - 1} (of each task) include demo "
                         f"initial states {sorted(overlap)[:10]}: regenerate the demos from other seeds / init states")
    modes = {e["meta"].get("control_mode") for e in episodes}
    if env == "maniskill" and modes != {control_mode}:
        raise ValueError(f"{directory}: demos recorded with control mode {modes}, --control-mode is {control_mode}")
    camera_keys = tuple(k for k in IMAGE_KEYS if k in episodes[0]["obs"])
    if (env == "libero" or obs_mode == "rgb") != bool(camera_keys):
        raise ValueError(f"{directory}: demos have cameras {camera_keys or 'none'}, the eval env would "
                         f"{'not ' if not camera_keys else ''}give images; use a demo set of the same obs mode")
    sizes = {e["obs"][k].shape[1] for e in episodes for k in camera_keys}
    if camera_keys and sizes != {image_size}:  # the eval env renders --image-size: train on what it will see
        raise ValueError(f"{directory}: demo images are {sorted(sizes)} px, --image-size is {image_size}: pass "
                         f"--image-size {max(sizes)}, or make demos at {image_size} px in another --demos dir")
    return camera_keys


def demo_chunks(episodes: list[dict[str, Any]], horizon: int, camera_keys=()):
    """Per-step samples of the episodes: (states [N, D], action chunks [N, horizon, A] = actions[t : t+horizon] with
    the last action repeated past the end (openpi), images {key: [N, H, W, 3]}, task descriptions [N]) as tensors."""
    import torch

    states, chunks, images, texts = [], [], {k: [] for k in camera_keys}, []
    for ep in episodes:
        acts = ep["actions"]
        T = len(acts)
        idx = np.minimum(np.arange(T)[:, None] + np.arange(horizon)[None], T - 1)
        chunks.append(acts[idx])
        states.append(ep["obs"]["state"][:T])
        for k in camera_keys:
            images[k].append(ep["obs"][k][:T])
        texts += [ep["meta"]["task_description"]] * T
    return (torch.from_numpy(np.concatenate(states)), torch.from_numpy(np.concatenate(chunks)),
            {k: torch.from_numpy(np.concatenate(v)) for k, v in images.items()}, texts)
