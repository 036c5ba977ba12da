"""One robot interface: a gymnasium env around any back-end (dummy, sim, franka, or a remote robot).

`RobotEnv` adds what every real robot needs, the same for all back-ends:
- fixed control-frequency pacing: each step sleeps off the rest of its period (`info["control_hz"]` is the achieved
  rate over the last steps; `control_hz=0` runs unpaced, e.g. a simulator used for fast training);
- a safety box: actions are clipped to `action_low/high`, and with a position box the translation part of a delta
  action is clipped so that the commanded tool position stays inside it (`info["safety_clipped"]`);
- episode caps (`max_episode_steps`, reported as truncation), reset, emergency stop (no motion until the next reset)
  and `hold()` (stop moving, keep the pose: what a robot server does when its learner goes silent);
- an intervention hook: a teleop device may override the action; `info["intervened"]` says so and
  `info["executed_action"]` carries what was actually sent (the transition must store that one);
- a non-finite action (NaN/inf, from the policy or the device) raises `NonFiniteAction` and holds the robot: nothing
  of it reaches the back-end.

Observations are dicts {"state": float32 (D,), "images": {camera: uint8 (H, W, 3)}} ("images" only with cameras).
Spaces travel as a JSON-able spec (`space_spec` / `spaces_from_spec`): the handshake of a robot server carries it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import gymnasium as gym
import numpy as np


class RobotBackend:
    """What a back-end implements. `send_action` commands one control period; `observe` reads the robot afterwards;
    `reward` is the task reward and success of that observation (real robots: 0/False unless a reward model or a
    human says otherwise). `tcp_position` (for the safety box) is optional."""

    name = "robot"
    observation_space: gym.spaces.Dict
    action_space: gym.spaces.Box
    control_hz: float = 10.0
    max_episode_steps: int = 100
    position_scale: float | None = None  # metres per unit of action[:3] for delta-position actions
    task_description: str = ""

    def reset(self, seed: int | None = None) -> dict:
        raise NotImplementedError

    def send_action(self, action: np.ndarray) -> None:
        raise NotImplementedError

    def observe(self) -> dict:
        raise NotImplementedError

    def reward(self, obs: dict) -> tuple[float, bool]:
        return 0.0, False

    def tcp_position(self, obs: dict) -> np.ndarray | None:
        return None

    def hold(self) -> None:
        """Stop moving and keep the current pose."""

    def emergency_stop(self) -> None:
        self.hold()

    def close(self) -> None:
        pass


class RateKeeper:
    """Sleeps to a fixed period on absolute ticks (no drift); `rate` is the achieved frequency over a window."""

    def __init__(self, hz: float, window: int = 20):
        self.period = 1.0 / hz if hz > 0 else 0.0
        self.next_tick: float | None = None
        self.stamps: deque[float] = deque(maxlen=window + 1)
        self.overruns = 0

    def reset(self) -> None:
        """Anchor the period grid now (call at episode start)."""
        self.next_tick = time.perf_counter() + self.period
        self.stamps = deque(maxlen=self.stamps.maxlen)

    def wait(self) -> None:
        """Sleep to the end of the current period. An overrun restarts the grid instead of bursting to catch up."""
        now = time.perf_counter()
        if self.period:
            if self.next_tick is None:
                self.next_tick = now
            if now < self.next_tick:
                time.sleep(self.next_tick - now)
                now = time.perf_counter()
            elif now - self.next_tick > 0.1 * self.period:
                self.overruns += 1
                self.next_tick = now
            self.next_tick += self.period
        self.stamps.append(now)

    @property
    def rate(self) -> float:
        if len(self.stamps) < 2:
            return 0.0
        return (len(self.stamps) - 1) / max(self.stamps[-1] - self.stamps[0], 1e-9)


@dataclass
class SafetyBox:
    """Action limits, and an optional box (metres, robot base frame) for the commanded tool position."""

    action_low: np.ndarray | None = None
    action_high: np.ndarray | None = None
    position_low: np.ndarray | None = None
    position_high: np.ndarray | None = None

    def clip(self, action: np.ndarray, tcp: np.ndarray | None, position_scale: float | None) -> tuple[np.ndarray, bool]:
        out = action.astype(np.float32, copy=True)
        if self.action_low is not None or self.action_high is not None:
            out = np.clip(out, self.action_low, self.action_high).astype(np.float32)
        if self.position_low is not None and tcp is not None and position_scale:
            target = np.clip(tcp + out[:3] * position_scale, self.position_low, self.position_high)
            out[:3] = (target - tcp) / position_scale
            if self.action_low is not None or self.action_high is not None:  # a tool outside the box goes back at
                # no more than the action limits allow, never faster
                out = np.clip(out, self.action_low, self.action_high).astype(np.float32)
        return out, bool(np.any(np.abs(out - action) > 1e-6))


class EmergencyStopped(RuntimeError):
    """Step after an emergency stop; reset() clears it."""


class NonFiniteAction(ValueError):
    """An action with NaN or inf: refused before the back-end sees it (np.clip would pass NaN on to the arm)."""


def check_finite(action: np.ndarray, what: str) -> None:
    """Raise NonFiniteAction naming `what` (who produced the action) and where the bad values are."""
    bad = ~np.isfinite(action)
    if bad.any():
        raise NonFiniteAction(f"{what}: non-finite action refused (NaN/inf at index {np.flatnonzero(bad).tolist()}: "
                              f"{np.asarray(action).tolist()}); nothing was sent to the robot")


class RobotEnv(gym.Env):
    """A gymnasium env around a RobotBackend: pacing, safety box, caps, reset, e-stop, intervention."""

    metadata = {"render_modes": []}

    def __init__(self, backend: RobotBackend, *, control_hz: float | None = None, max_episode_steps: int | None = None,
                 safety: SafetyBox | None = None, intervention=None):
        self.backend = backend
        self.observation_space, self.action_space = backend.observation_space, backend.action_space
        self.control_hz = backend.control_hz if control_hz is None else control_hz
        self.max_episode_steps = max_episode_steps or backend.max_episode_steps
        if not (math.isfinite(self.control_hz) and self.control_hz >= 0):  # (a negative rate would run unpaced)
            raise ValueError(f"{backend.name}: control_hz must be >= 0 (0: unpaced), got {self.control_hz}")
        if not self.max_episode_steps or self.max_episode_steps < 1:
            raise ValueError(f"{backend.name}: max_episode_steps must be >= 1, got {self.max_episode_steps}")
        self.safety = safety or SafetyBox(backend.action_space.low, backend.action_space.high)
        self.intervention = intervention
        self.rate = RateKeeper(self.control_hz)
        self.steps, self.stopped, self.last_obs = 0, False, None
        self.stats = {"steps": 0, "episodes": 0, "interventions": 0, "safety_clips": 0, "emergency_stops": 0,
                      "holds": 0}

    @property
    def name(self) -> str:
        return self.backend.name

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.stopped, self.steps = False, 0
        if getattr(self.intervention, "estop_requested", False):
            self.intervention.estop_requested = False
        self.rate.reset()
        self.last_obs = self.backend.reset(seed)
        self.stats["episodes"] += 1
        return self.last_obs, {"task_description": self.backend.task_description}

    def step(self, action):
        if self.stopped:
            raise EmergencyStopped(f"{self.name}: emergency-stopped; call reset() after checking the robot")
        policy_action = np.asarray(action, dtype=np.float32).reshape(self.action_space.shape)
        intervened = False
        if self.intervention is not None:
            human = self.intervention.poll()
            if getattr(self.intervention, "estop_requested", False):
                self.emergency_stop()
                raise EmergencyStopped(f"{self.name}: emergency stop from {type(self.intervention).__name__}")
            if human is not None:
                policy_action, intervened = np.asarray(human, np.float32).reshape(self.action_space.shape), True
        try:
            source = type(self.intervention).__name__ if intervened else "the policy"
            check_finite(policy_action, f"{self.name}: {source}")
        except NonFiniteAction:
            self.hold()  # the last target may still be moving the arm: stop there
            raise
        executed, clipped = self.safety.clip(policy_action, self.backend.tcp_position(self.last_obs),
                                             self.backend.position_scale)
        self.backend.send_action(executed)
        self.rate.wait()
        obs = self.backend.observe()
        reward, success = self.backend.reward(obs)
        self.steps += 1
        self.last_obs = obs
        self.stats["steps"] += 1
        self.stats["interventions"] += int(intervened)
        self.stats["safety_clips"] += int(clipped)
        truncated = self.steps >= self.max_episode_steps
        info = {"intervened": intervened, "executed_action": executed, "safety_clipped": clipped,
                "success": bool(success), "control_hz": self.rate.rate, "period_overruns": self.rate.overruns}
        return obs, float(reward), bool(success), bool(truncated), info

    def hold(self) -> None:
        self.backend.hold()
        self.stats["holds"] += 1

    def emergency_stop(self) -> None:
        self.backend.emergency_stop()
        self.stopped = True
        self.stats["emergency_stops"] += 1

    def spec(self) -> dict:
        return {"name": self.name, "type": getattr(self.backend, "type_name", type(self.backend).__name__),
                "observation": space_spec(self.observation_space), "action": space_spec(self.action_space),
                "control_hz": self.control_hz, "max_episode_steps": self.max_episode_steps,
                "task_description": self.backend.task_description}

    def close(self) -> None:
        try:
            if self.intervention is not None and hasattr(self.intervention, "close"):
                self.intervention.close()
        finally:  # the arm is held and its cameras closed even when the teleop device fails to close
            self.backend.close()


# ------------------------------------------------------------------------------------------------ spaces <-> spec
def space_spec(space: gym.Space):
    """A JSON-able description of a Box or (nested) Dict space."""
    if isinstance(space, gym.spaces.Dict):
        return {"dict": {key: space_spec(sub) for key, sub in space.spaces.items()}}
    if isinstance(space, gym.spaces.Box):
        low, high = np.broadcast_to(space.low, space.shape), np.broadcast_to(space.high, space.shape)
        uniform = bool(np.all(low == low.flat[0]) and np.all(high == high.flat[0])) if low.size else True
        bounds = (float(low.flat[0]), float(high.flat[0])) if uniform and low.size else (low.tolist(), high.tolist())
        return {"box": list(space.shape), "dtype": str(space.dtype), "low": bounds[0], "high": bounds[1]}
    raise TypeError(f"only Box and Dict spaces travel in a robot spec, got {space}")


def spaces_from_spec(spec) -> gym.Space:
    if "dict" in spec:
        return gym.spaces.Dict({key: spaces_from_spec(sub) for key, sub in spec["dict"].items()})
    dtype = np.dtype(spec["dtype"])
    shape = tuple(spec["box"])
    low = np.broadcast_to(np.asarray(spec["low"], dtype=np.float64), shape).astype(dtype)
    high = np.broadcast_to(np.asarray(spec["high"], dtype=np.float64), shape).astype(dtype)
    return gym.spaces.Box(low, high, shape=shape, dtype=dtype)


def flatten_obs(obs: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{'state': a, 'images': {'main': b}} -> {'state': a, 'images/main': b} (one frame per array on the wire)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in obs.items():
        if isinstance(value, dict):
            flat.update(flatten_obs(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = np.asarray(value)
    return flat


def unflatten_obs(flat: dict) -> dict:
    obs: dict = {}
    for key, value in flat.items():
        node = obs
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return obs


def make_robot_env(text: str, robot_index: int = 0, **env_kwargs) -> RobotEnv:
    """'sim:PickCube' / 'dummy' / 'franka:IP' -> a RobotEnv (env-var autofill, validation unless disabled). Robot
    `robot_index` of the node takes the index-th value of each environment variable that lists one per robot
    (`ROBOT_IP=10.0.0.2,10.0.0.3`)."""
    from robot_io.registry import fill_from_env, parse_robot

    rtype, config = parse_robot(text)
    fill_from_env(config, robot_index)
    rtype.enumerate([config])  # validates (or skips with disable_validate); raises RobotValidationError
    backend = rtype.make(config)
    try:
        return RobotEnv(backend, **env_kwargs)
    except BaseException:  # a bad control_hz / max_episode_steps: the arm and its cameras, just opened, close again
        backend.close()
        raise
