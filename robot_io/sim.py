"""`sim` robots: ManiSkill tasks behind the robot interface, so an async learner cannot tell them from a real robot.

`sim:PickCube` (or `sim:PickCube-v1`), `sim:PegInsertionSide,obs_mode=rgb`, ... One `physx_cpu` env in this process,
end-effector delta control (`pd_ee_delta_pose`: translation ±0.1 m and rotation ±0.1 rad per unit, gripper +1 open,
-1 closed, the same convention as our Franka driver), sparse success reward, success terminates. Unpaced by default
(`control_hz=0`: as fast as the simulator runs); give `control_hz=10` to rehearse real-time timing.
State observations: ManiSkill's flat state (obs_mode=state) or proprioception + task extras next to camera images
(obs_mode=rgb; cameras `main`, and `wrist` where the task has a hand camera).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from robot_io.env import RobotBackend
from robot_io.registry import MissingDependencyError, RobotInfo, RobotValidationError, register

TESTED_TASKS = ("PickCube-v1", "PegInsertionSide-v1", "PushCube-v1", "StackCube-v1", "PullCube-v1")


@dataclass
class SimConfig:
    task: str = "PickCube-v1"
    """ManiSkill task id (the -v1 suffix may be left out)"""
    name: str | None = None
    """robot name (default sim-<task>)"""
    obs_mode: str = "state"
    """state, or rgb (images + proprioception)"""
    control_mode: str = "pd_ee_delta_pose"
    """ManiSkill controller"""
    image_size: int = 64
    """camera resolution (rgb)"""
    control_hz: float = 0.0
    """real-time pacing (0: unpaced)"""
    max_episode_steps: int = 100
    """truncation"""
    reward_mode: str = "sparse"
    """sparse success reward (ManiSkill's dense modes also work)"""


def _task_id(task: str) -> str:
    return task if task.rsplit("-", 1)[-1].startswith("v") and "-v" in task else f"{task}-v1"


class SimBackend(RobotBackend):
    type_name = "sim"

    def __init__(self, config: SimConfig):
        from common.maniskill_env import ManiSkillSingle

        self.config, self.task = config, _task_id(config.task)
        self.name = config.name or f"sim-{self.task.removesuffix('-v1')}"
        self.sim = ManiSkillSingle(self.task, config.obs_mode, config.control_mode, config.reward_mode,
                                   config.image_size)
        self.task_description = self.sim.description
        self.control_hz, self.max_episode_steps = config.control_hz, config.max_episode_steps
        try:
            first = self.sim.reset(0)
            space = self.sim.env.single_action_space
        except BaseException:  # (a renderer that fails at the first frame): the simulator is not left behind
            with contextlib.suppress(Exception):  # (the reset's error is the one to report)
                self.sim.close()
            raise
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, first["state"].shape, np.float32)}
        if "images" in first:
            spaces["images"] = gym.spaces.Dict({k: gym.spaces.Box(0, 255, v.shape, np.uint8)
                                                for k, v in first["images"].items()})
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32),
                                           space.shape, np.float32)
        self.position_scale = 0.1 if config.control_mode.startswith("pd_ee_delta_pos") else None
        self._obs, self._reward, self._success, self.episode_step = first, 0.0, False, 0

    @property
    def raw_env(self):
        """The ManiSkill env itself (privileged state for scripted controllers and tests)."""
        return self.sim.env

    @staticmethod
    def _strip(obs):
        return {k: v for k, v in obs.items() if k != "task_description"}

    def reset(self, seed=None):
        self._obs = self.sim.reset(0 if seed is None else int(seed))
        self._reward, self._success, self.episode_step = 0.0, False, 0
        return self._strip(self._obs)

    def send_action(self, action):
        self._obs, self._reward, _, self._success = self.sim.step(np.asarray(action, np.float32))
        self.episode_step += 1

    def observe(self):
        return self._strip(self._obs)

    def reward(self, obs):
        return self._reward, self._success

    def tcp_position(self, obs):
        # in the robot's base frame, as a SafetyBox's position box (ManiSkill places the base away from the origin:
        # PickCube at x = -0.615 m)
        agent = self.sim.env.agent
        return (agent.robot.pose.inv() * agent.tcp.pose).p[0].numpy().astype(np.float32)

    def close(self):
        self.sim.close()


class SimExpert:
    """A scripted teleoperator for sim robots (privileged simulator state), PickCube and PushCube: the stand-in for a
    human with a SpaceMouse. As an intervention device (`RobotEnv(..., intervention=SimExpert(backend))`) it takes over
    whole episodes with probability `takeover` (decided at each reset), so its segments are demonstrations."""

    TASKS = ("PickCube-v1", "PushCube-v1")

    def __init__(self, backend: SimBackend, takeover: float = 1.0, seed: int = 0):
        if backend.task not in self.TASKS or not backend.config.control_mode.startswith("pd_ee_delta_pos"):
            raise ValueError(f"the scripted expert knows {self.TASKS} with pd_ee_delta_pos(e) control, not "
                             f"{backend.task} / {backend.config.control_mode}")
        self.backend, self.takeover = backend, takeover
        self.rng = np.random.default_rng(seed)
        self.estop_requested, self.active, self.phase, self.closing, self.episode_step = False, True, 0, 0, -1

    def action(self) -> np.ndarray:
        raw = self.backend.raw_env
        cube_actor = raw.obj if self.backend.task == "PushCube-v1" else raw.cube
        tcp, cube = raw.agent.tcp.pose.p[0].numpy(), cube_actor.pose.p[0].numpy()
        action = np.zeros(self.backend.action_space.shape, np.float32)
        action[-1] = 1.0  # gripper open
        if self.backend.task == "PushCube-v1":  # behind the cube, low, then push through it to the goal
            goal = raw.goal_region.pose.p[0].numpy()
            direction = (goal - cube)[:2] / max(np.linalg.norm((goal - cube)[:2]), 1e-6)
            behind = np.array([*(cube[:2] - direction * 0.05), 0.02])
            if self.phase == 0 and np.linalg.norm(behind[:2] - tcp[:2]) < 0.01:
                self.phase = 1
            target = np.array([*behind[:2], 0.08]) if self.phase == 0 and tcp[2] > 0.05 and \
                np.linalg.norm(behind[:2] - tcp[:2]) > 0.02 else behind
            if self.phase == 1:
                target = np.array([*(goal[:2] + direction * 0.02), 0.02])
            action[-1] = -1.0
        else:  # PickCube: above the cube, down, close, carry to the goal
            goal = raw.goal_site.pose.p[0].numpy()
            if self.phase == 0:
                target = cube + [0, 0, 0.05]
                self.phase = 1 if np.linalg.norm(target - tcp) < 0.01 else 0
            if self.phase == 1:
                target = cube
                self.phase = 2 if np.linalg.norm(target - tcp) < 0.005 else 1
            if self.phase >= 2:
                self.closing += 1
                target, action[-1] = (cube if self.closing <= 5 else goal), -1.0
        action[:3] = np.clip((target - tcp) * 20, -1, 1)
        return action

    def poll(self) -> np.ndarray | None:
        step = self.backend.episode_step
        if step == 0 or step < self.episode_step:  # a new episode: reset the script, decide whether to take over
            self.phase, self.closing = 0, 0
            self.active = bool(self.rng.random() < self.takeover)
        self.episode_step = step
        return self.action() if self.active else None


@register("sim", SimConfig, target_field="task", help="a ManiSkill task behind the robot interface")
class Sim:
    @classmethod
    def enumerate(cls, configs):
        try:
            from common.maniskill_env import check_task
        except ImportError as exc:
            raise MissingDependencyError(f"sim robots need ManiSkill ({exc}); pip install mani-skill==3.0.1") from exc
        found = []
        for c in configs:
            if c.obs_mode not in ("state", "rgb"):
                raise RobotValidationError(f"sim:{c.task}: obs_mode must be state or rgb, got {c.obs_mode!r}")
            try:
                check_task(_task_id(c.task))
            except ImportError as exc:  # ManiSkill itself is imported here, lazily
                raise MissingDependencyError(f"sim robots need ManiSkill ({exc}); pip install mani-skill==3.0.1") \
                    from exc
            except Exception as exc:
                raise RobotValidationError(f"sim:{c.task}: {exc}") from exc
            found.append(RobotInfo("sim", c.name or f"sim-{_task_id(c.task).removesuffix('-v1')}", c,
                                   {"task": _task_id(c.task), "obs_mode": c.obs_mode, "control_mode": c.control_mode}))
        return found

    @classmethod
    def make(cls, config):
        return SimBackend(config)
