"""ManiSkill3 behind the shared batched API of `common.vec_env` (see its docstring for the step/reset contract).

- `sim_backend="cpu"`: `num_envs` worker processes, each one `physx_cpu` env (ManiSkill's CPU simulator cannot batch).
- `sim_backend="gpu"`: one in-process `physx_cuda` env with `num_envs` parallel scenes; same API, tensors on CUDA.
- `sim_backend="auto"`: gpu when CUDA is available, else cpu.

Observations: `state` is ManiSkill's flat state vector in `obs_mode="state"`; in `obs_mode="rgb"` it is the flattened
proprioception and task extras (`agent` + `extra`), next to `images`. Cameras are named after ManiSkill's sensors,
except that the first sensor is called `main` and a `hand_camera` is called `wrist` (the names LIBERO uses too).
Reset ids are episode seeds: the same id gives the same initial state. A task that draws part of its scene when it
builds it (PegInsertionSide's peg sizes, RotateValve's valves, SO100GraspCube's lighting: `scene_is_randomised`)
rebuilds it at every reset of a one-env simulator (the CPU workers), from the reset's seed, as ManiSkill's own default
for one env does (~0.2 s a reset): otherwise every worker and every episode would keep one scene. Other tasks draw
only poses at reset and skip the rebuild. A GPU simulator's parallel scenes draw theirs once, at construction (also
ManiSkill's default).
`reward_mode` is ManiSkill's (`sparse`, `dense`, `normalized_dense`); with `relative_reward` the per-step reward is the
change of that level, so an episode's rewards add up to its final level (RLinf's convention).
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.subproc import SubprocBackend, WorkerPool
from common.vec_env import BatchedEnv

# Without this, a task whose assets are missing waits on input() for a download prompt.
os.environ.setdefault("MS_SKIP_ASSET_DOWNLOAD_PROMPT", "1")

# Tasks checked to build and step with no download (ManiSkill 3.0.1, empty MS_ASSET_DIR); others may need assets.
OFFLINE_TASKS = (
    "Empty-v1 PickCube-v1 PickCubeSO100-v1 PushCube-v1 PullCube-v1 PullCubeTool-v1 PokeCube-v1 StackCube-v1 "
    "StackPyramid-v1 PlaceSphere-v1 LiftPegUpright-v1 PegInsertionSide-v1 PlugCharger-v1 PushT-v1 RollBall-v1 "
    "FMBAssembly1Easy-v1 DrawTriangle-v1 TableTopFreeDraw-v1 TwoRobotPickCube-v1 TwoRobotStackCube-v1 "
    "SO100GraspCube-v1 RotateValveLevel0-v1 RotateValveLevel1-v1 RotateValveLevel2-v1 RotateValveLevel3-v1 "
    "RotateValveLevel4-v1 RotateSingleObjectInHandLevel0-v1 RotateSingleObjectInHandLevel1-v1 "
    "TriFingerRotateCubeLevel0-v1 TriFingerRotateCubeLevel1-v1 TriFingerRotateCubeLevel2-v1 "
    "TriFingerRotateCubeLevel3-v1 TriFingerRotateCubeLevel4-v1 MS-CartpoleBalance-v1 MS-CartpoleSwingUp-v1 "
    "MS-HopperHop-v1 MS-HopperStand-v1 MS-AntRun-v1 MS-AntWalk-v1 MS-HumanoidRun-v1 MS-HumanoidStand-v1 "
    "MS-HumanoidWalk-v1 UnitreeG1Stand-v1 UnitreeG1PlaceAppleInBowl-v1 UnitreeG1TransportBox-v1"
).split()
OBS_MODES = ("state", "rgb")
REWARD_MODES = ("sparse", "dense", "normalized_dense")
NUM_RESET_IDS = 2**31 - 1  # episode seeds


class MissingAssetError(RuntimeError):
    """The task needs ManiSkill assets that are not on this machine (and the machine cannot download them)."""


def check_task(task: str) -> None:
    """Fail at once, with the reason, for an unknown task or one whose asset groups are not downloaded."""
    import mani_skill.envs  # noqa: F401  (registers the tasks)
    from mani_skill.utils.assets import data
    from mani_skill.utils.registration import REGISTERED_ENVS

    if task not in REGISTERED_ENVS:
        raise ValueError(
            f"unknown ManiSkill task {task!r}. Tasks that run offline here: {', '.join(OFFLINE_TASKS)}. "
            f"All registered tasks: {', '.join(sorted(REGISTERED_ENVS))}"
        )
    missing = []
    for group in REGISTERED_ENVS[task].asset_download_ids or []:
        uids = [group] if group in data.DATA_SOURCES else data.expand_data_group_into_individual_data_source_ids(group)
        if not all(data.is_data_source_downloaded(uid) for uid in uids):
            missing.append(group)
    if missing:
        raise MissingAssetError(
            f"ManiSkill task {task!r} needs the asset group(s) {missing}, which are not under MS_ASSET_DIR="
            f"{data.ASSET_DIR}. This machine cannot download them (no internet). On a connected machine run "
            f"`python -m mani_skill.utils.download_asset {' '.join(missing)}` and copy the folder to MS_ASSET_DIR. "
            f"Tasks that need no download: {', '.join(OFFLINE_TASKS)}"
        )


def task_description(task: str) -> str:
    """ManiSkill tasks have no language instruction; use the task name in words ('PickCube-v1' -> 'pick cube')."""
    name = re.sub(r"^MS-|-v\d+$", "", task)
    return " ".join(w.lower() for w in re.findall(r"[A-Z][a-z]*|\d+", name))


_SCENE_DRAW = re.compile(r"episode_rng|np\.random|torch\.rand|random\.")


def scene_is_randomised(task: str) -> bool:
    """Whether `task` draws randomness while it builds its scene (any of its `_load_*` methods, ManiSkill's base
    ones aside), read from the task's source: such a scene must be rebuilt at each reset to cover the task's
    distribution. A method whose source cannot be read counts as drawing."""
    import mani_skill.envs  # noqa: F401
    from mani_skill.envs.sapien_env import BaseEnv
    from mani_skill.utils.registration import REGISTERED_ENVS

    cls = REGISTERED_ENVS[task].cls
    for name in dir(cls):
        method = getattr(cls, name)
        if not name.startswith("_load_") or getattr(BaseEnv, name, None) is method:
            continue
        try:
            source = inspect.getsource(method)
        except (OSError, TypeError):
            return True
        if _SCENE_DRAW.search("\n".join(line.split("#")[0] for line in source.splitlines())):
            return True
    return False


def _make_raw_env(task, num_envs, sim_backend, obs_mode, control_mode, reward_mode, image_size):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401

    kwargs: dict[str, Any] = dict(
        num_envs=num_envs, obs_mode=obs_mode, sim_backend=sim_backend, reward_mode=reward_mode,
        # one CPU env: rebuild a scene that is drawn at build time at every reset (see the module docstring)
        reconfiguration_freq=1 if num_envs == 1 and "cuda" not in sim_backend and scene_is_randomised(task) else 0,
    )
    if control_mode is not None:
        kwargs["control_mode"] = control_mode
    if obs_mode == "rgb":
        kwargs.update(sensor_configs=dict(width=image_size, height=image_size), render_mode="rgb_array")
    try:
        env = gym.make(task, **kwargs)
    except Exception as exc:
        message = missing_file_message(task, exc)
        if message:
            raise MissingAssetError(message) from exc
        raise
    return env.unwrapped  # our BatchedEnv owns time limits and resets


def missing_file_message(task: str, exc: BaseException) -> str | None:
    """What to tell the user when building `task` failed for want of a file (None: some other failure)."""
    text = str(exc)
    if "physx-precompiled" in text:  # sapien.physx.enable_gpu() fetches this library at first use of physx_cuda
        import sapien.physx

        where = Path.home() / ".sapien" / "physx" / sapien.physx.version()
        url = re.search(r"/sapien-sim/physx-precompiled/\S*?\.zip", text)
        return (f"ManiSkill's GPU simulation (physx_cuda) needs SAPIEN's PhysX GPU library, which SAPIEN downloads "
                f"from GitHub at first use, and this machine could not ({type(exc).__name__}). On a machine with "
                f"internet get https://github.com{url.group(0) if url else '/sapien-sim/physx-precompiled/releases'}"
                f", unzip it into {where} here (it holds libPhysXGpu_64.so), or use sim_backend='cpu'")
    if "download" in text.lower() or isinstance(exc, (FileNotFoundError, OSError)):
        return (f"ManiSkill task {task!r} could not be built because a file it needs is missing ({exc}). It probably "
                f"needs a download, which this offline machine cannot do. Tasks that need no download: "
                f"{', '.join(OFFLINE_TASKS)}")
    return None


def _success(info: dict, num_envs: int):
    """ManiSkill's success flags; tasks without a success condition (Empty, the control suites) never succeed."""
    success = info.get("success")
    return success if success is not None else torch.zeros(num_envs, dtype=torch.bool)


def _extract_obs(raw, obs_mode: str) -> dict[str, Any]:
    """ManiSkill's observation -> {state [B, D] float32, images {cam: [B, H, W, 3] uint8}} (torch, batched)."""
    from mani_skill.utils.common import flatten_state_dict

    if obs_mode == "state":
        return {"state": raw.float()}
    state = flatten_state_dict({"agent": raw["agent"], "extra": raw["extra"]}, use_torch=True).float()
    images = {}
    for j, (name, sensor) in enumerate(raw["sensor_data"].items()):
        key = "main" if j == 0 else ("wrist" if name == "hand_camera" else name)
        images[key] = sensor["rgb"][..., :3]
    return {"state": state, "images": images}


class ManiSkillSingle:
    """One `physx_cpu` env with numpy in and out; lives in a worker process."""

    def __init__(self, task, obs_mode, control_mode, reward_mode, image_size):
        torch.set_num_threads(1)  # one core per simulator process; the learner needs the rest
        self.env = _make_raw_env(task, 1, "physx_cpu", obs_mode, control_mode, reward_mode, image_size)
        self.obs_mode, self.description = obs_mode, task_description(task)

    def _numpy(self, raw) -> dict[str, Any]:
        obs = _extract_obs(raw, self.obs_mode)
        out = {"state": obs["state"][0].numpy(), "task_description": self.description}
        if "images" in obs:
            out["images"] = {k: v[0].numpy() for k, v in obs["images"].items()}
        return out

    def reset(self, reset_id: int):
        raw, _ = self.env.reset(seed=int(reset_id))
        return self._numpy(raw)

    def step(self, action: np.ndarray, observe: bool = True):  # ManiSkill always renders its sensors in step
        raw, reward, terminated, _, info = self.env.step(torch.as_tensor(action, dtype=torch.float32)[None])
        return self._numpy(raw), float(reward[0]), bool(terminated[0]), bool(_success(info, 1)[0])

    def spec(self) -> dict[str, Any]:
        space = self.env.single_action_space
        return {"action_dim": int(space.shape[0]), "low": space.low, "high": space.high}

    def close(self):
        self.env.close()


class ManiSkillBatchedBackend:
    """`num_envs` scenes in one batched simulator (physx_cuda; physx_cpu works with num_envs=1, used by the tests)."""

    def __init__(self, task, num_envs, sim_backend, obs_mode, control_mode, reward_mode, image_size):
        self.env = _make_raw_env(task, num_envs, sim_backend, obs_mode, control_mode, reward_mode, image_size)
        self.num_envs, self.obs_mode = num_envs, obs_mode
        self.device = self.env.device
        space = self.env.single_action_space
        self.action_dim, self.low, self.high = int(space.shape[0]), space.low, space.high
        self.description = task_description(task)
        self._obs: dict[str, Any] | None = None

    def reset(self, env_ids, reset_ids) -> None:
        # One call per env: a batched ManiSkill reset seeds its scenes' draw with the first seed only, so an id would
        # give another state next to other ids (GRPO groups would not share a state, evals would not repeat).
        for env_id, reset_id in zip(env_ids, reset_ids):
            idx = torch.as_tensor([int(env_id)], device=self.device, dtype=torch.long)
            raw, _ = self.env.reset(seed=[int(reset_id)], options=dict(env_idx=idx))
            self._obs = _extract_obs(raw, self.obs_mode)

    def step(self, actions, active, observe=None):
        raw, reward, terminated, _, info = self.env.step(actions.to(self.device))
        self._obs = _extract_obs(raw, self.obs_mode)
        return reward, terminated, _success(info, self.num_envs)

    def observation(self) -> dict[str, Any]:
        if self._obs is None:
            raise RuntimeError("call reset() before step() or observation()")
        return {**self._obs, "task_description": [self.description] * self.num_envs}

    def close(self) -> None:
        self.env.close()


def make_maniskill_env(
    task: str = "PickCube-v1",
    num_envs: int = 1,
    *,
    obs_mode: str = "state",
    control_mode: str | None = "pd_ee_delta_pose",
    reward_mode: str = "sparse",
    relative_reward: bool = False,
    image_size: int = 128,
    sim_backend: str = "auto",
    max_episode_steps: int | None = None,
    auto_reset: bool = True,
    ignore_terminations: bool = False,
    eval_mode: bool = False,
    num_eval_episodes: int | None = None,
    seed: int = 0,
    start_method: str = "forkserver",
) -> BatchedEnv:
    """Build a batched ManiSkill env. `control_mode=None` keeps the task's default controller;
    `max_episode_steps=None` keeps the task's registered limit."""
    if obs_mode not in OBS_MODES:
        raise ValueError(f"unknown obs_mode {obs_mode!r}; choose one of {OBS_MODES}")
    if reward_mode not in REWARD_MODES:
        raise ValueError(f"unknown reward_mode {reward_mode!r}; choose one of {REWARD_MODES}")
    if sim_backend not in ("auto", "cpu", "gpu"):
        raise ValueError(f"unknown sim_backend {sim_backend!r}; choose one of ('auto', 'cpu', 'gpu')")
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    check_task(task)
    from mani_skill.utils.registration import REGISTERED_ENVS

    supported = getattr(REGISTERED_ENVS[task].cls, "SUPPORTED_REWARD_MODES", None)
    if supported is not None and reward_mode not in supported:
        raise ValueError(f"{task} has no {reward_mode!r} reward; it supports {[m for m in supported if m != 'none']}")

    if max_episode_steps is None:
        max_episode_steps = REGISTERED_ENVS[task].max_episode_steps or 1000
    if sim_backend == "auto":
        sim_backend = "gpu" if torch.cuda.is_available() else "cpu"
    if sim_backend == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("sim_backend='gpu' needs a CUDA build of torch and a GPU; use sim_backend='cpu'")
        backend = ManiSkillBatchedBackend(task, num_envs, "physx_cuda", obs_mode, control_mode, reward_mode, image_size)
        low, high = backend.low, backend.high
    else:
        kwargs = dict(task=task, obs_mode=obs_mode, control_mode=control_mode, reward_mode=reward_mode,
                      image_size=image_size)
        pool = WorkerPool(ManiSkillSingle, [kwargs] * num_envs, start_method=start_method, name=task)
        try:
            spec = pool.call([0], "spec")[0]
        except BaseException:
            pool.close()
            raise
        backend = SubprocBackend(pool, spec["action_dim"])
        low, high = spec["low"], spec["high"]
    try:
        return BatchedEnv(
            backend, max_episode_steps=max_episode_steps, num_reset_ids=NUM_RESET_IDS, auto_reset=auto_reset,
            ignore_terminations=ignore_terminations, relative_reward=relative_reward, eval_mode=eval_mode,
            num_eval_episodes=num_eval_episodes, seed=seed, action_low=low, action_high=high,
        )
    except BaseException:  # a bad argument: the workers (or the GPU simulator) just started go too
        backend.close()
        raise
