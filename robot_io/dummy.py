"""`dummy` robots: random observations drawn from the spaces, paced in real time (RLinf's `is_dummy` mode).

No dynamics and no learning signal (reward 0, episodes end by truncation), but the whole pipeline runs with no
hardware: pacing, the robot server, the transport, weight sync, the buffer. Run it first on a new setup.
The default spaces mimic a Franka with two cameras; change them with options: `dummy,state_dim=10,cameras=main`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from robot_io.env import RobotBackend
from robot_io.registry import RobotInfo, register


@dataclass
class DummyConfig:
    name: str | None = None
    """robot name (default dummy0, dummy1, ...)"""
    state_dim: int = 14
    """proprioception size (Franka-like: tcp position 3, quaternion 4, twist 6, gripper 1)"""
    action_dim: int = 7
    """delta position 3, delta rotation 3, gripper 1"""
    cameras: list[str] = field(default_factory=lambda: ["wrist", "front"])
    """camera names (empty: state only)"""
    image_size: int = 128
    """square image side"""
    control_hz: float = 10.0
    """real-time pacing of step()"""
    max_episode_steps: int = 100
    """truncation"""
    seed: int = 0
    """seed of the random observations"""


class DummyBackend(RobotBackend):
    type_name = "dummy"

    def __init__(self, config: DummyConfig):
        self.config, self.name = config, config.name or "dummy0"
        spaces = {"state": gym.spaces.Box(-1.0, 1.0, (config.state_dim,), np.float32)}
        if config.cameras:
            spaces["images"] = gym.spaces.Dict({
                cam: gym.spaces.Box(0, 255, (config.image_size, config.image_size, 3), np.uint8)
                for cam in config.cameras})
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (config.action_dim,), np.float32)
        self.observation_space.seed(config.seed)
        self.control_hz, self.max_episode_steps = config.control_hz, config.max_episode_steps
        self.task_description = "dummy task"

    def reset(self, seed=None):
        if seed is not None:
            self.observation_space.seed(seed)
        return self.observation_space.sample()

    def send_action(self, action):
        pass

    def observe(self):
        return self.observation_space.sample()


@register("dummy", DummyConfig, help="random observations paced in real time (no hardware)")
class Dummy:
    @classmethod
    def enumerate(cls, configs):
        return [RobotInfo("dummy", c.name or f"dummy{i}", c,
                          {"control_hz": c.control_hz, "cameras": ",".join(c.cameras) or "none"})
                for i, c in enumerate(configs)]

    @classmethod
    def make(cls, config):
        return DummyBackend(config)
