"""`franka` robots: a Franka (Panda / FR3) through `franky` (libfranka's Python bindings, no ROS), RealSense cameras.

Optional imports: `pip install franky-control` (match your libfranka version, see franky's README) and
`pip install pyrealsense2`. Not runnable without the robot: tests drive this module with a fake `franky`.

Control (SERL's end-effector delta convention, the same as our sim robots): action[:3] is a translation of
`action_scale_pos` metres per unit in the base frame, action[3:6] a rotation vector of `action_scale_rot` rad per unit
(base frame), action[6] the gripper (>= 0 open, < 0 close). Each step commands an absolute Cartesian target (measured
pose + delta, clipped to the position box) asynchronously, so a new step pre-empts the previous target; `hold()` sends
a Cartesian stop motion. The real emergency stop is the hardware button: `emergency_stop()` only stops commanding.
State: tcp position (3), quaternion xyzw (4), tcp twist (6), gripper width (1).

Validation (`enumerate`, RLinf's FrankaHWInfo checks): robot_ip set and reachable, franky importable, the camera SDK
importable and every configured serial connected (unset serials take the cameras found). `disable_validate` skips it.
Fields left unset fill from ROBOT_IP, CAMERA_SERIALS (robots `;`-separated), GRIPPER_TYPE, ...
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from typing import ClassVar

import gymnasium as gym
import numpy as np

from robot_io.cameras import RealSenseCamera, realsense_serials
from robot_io.env import RobotBackend, check_finite
from robot_io.registry import MissingDependencyError, RobotInfo, RobotValidationError, register, require

STATE_DIM = 14


@dataclass
class FrankaConfig:
    ENV_FIELDS: ClassVar[tuple[str, ...]] = ("camera_type", "gripper_type", "image_size", "control_hz",
                                             "max_episode_steps", "action_scale_pos", "action_scale_rot",
                                             "dynamics_factor", "position_low", "position_high", "reset_joints",
                                             "gripper_speed", "gripper_force")
    robot_ip: str | None = None
    """the arm's FCI address (env ROBOT_IP)"""
    name: str | None = None
    """robot name (default franka-<ip>)"""
    camera_serials: list[str] | None = None
    """RealSense serials (env CAMERA_SERIALS; unset: every camera found)"""
    camera_names: list[str] | None = None
    """names of those cameras in observations (default wrist, front, cam2, ...)"""
    camera_type: str = "realsense"
    """realsense (or none)"""
    gripper_type: str = "franka"
    """franka (the Franka Hand through franky)"""
    gripper_connection: str | None = None
    """serial port of an external gripper (unused by the Franka Hand)"""
    controller_host: str | None = None
    """host that runs the arm controller when it is not this one: run `python -m robot_io.serve` there"""
    image_size: int = 128
    """square image side"""
    control_hz: float = 10.0
    """control frequency"""
    max_episode_steps: int = 100
    """truncation"""
    action_scale_pos: float = 0.02
    """metres per unit of action[:3]"""
    action_scale_rot: float = 0.1
    """radians per unit of action[3:6]"""
    dynamics_factor: float = 0.1
    """franky relative dynamics factor (velocity, acceleration, jerk)"""
    position_low: list[float] = field(default_factory=lambda: [0.3, -0.3, 0.02])
    """safety box, lower corner (m, base frame)"""
    position_high: list[float] = field(default_factory=lambda: [0.7, 0.3, 0.5])
    """safety box, upper corner"""
    reset_joints: list[float] = field(default_factory=lambda: [0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])
    """joint positions of the reset pose"""
    gripper_speed: float = 0.05
    """m/s"""
    gripper_force: float = 20.0
    """N, when grasping"""
    disable_validate: bool = False
    """skip every check"""


def reachable(ip: str, timeout: float = 1.0) -> bool:
    """ICMP ping when the `ping` tool can run, else a TCP probe (a refused connection also proves the host is up)."""
    try:
        code = subprocess.run(["ping", "-c", "2", "-W", str(max(1, int(timeout))), ip], capture_output=True,
                              timeout=3 * timeout + 2).returncode
        if code in (0, 1):  # 1: no reply. Anything else is ping's own failure (no raw-socket permission in a
            return code == 0  # container, ...): the TCP probe decides
    except (FileNotFoundError, PermissionError, subprocess.TimeoutExpired):
        pass
    try:
        with socket.create_connection((ip, 443), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def validate(config: FrankaConfig) -> dict:
    """RLinf's Franka checks; returns details, raises RobotValidationError saying what to fix."""
    if config.disable_validate:
        return {"validated": False}
    if not config.robot_ip:
        raise RobotValidationError("franka: robot_ip is not set. Give franka:<ip> or set ROBOT_IP "
                                   "(comma-separated for several arms on this node)")
    low, high = np.asarray(config.position_low, float), np.asarray(config.position_high, float)
    if low.shape != (3,) or high.shape != (3,) or not np.all(low < high):
        raise RobotValidationError(f"franka: the position box needs 3 values each with position_low < position_high, "
                                   f"got {config.position_low} and {config.position_high}")
    if not reachable(config.robot_ip):
        raise RobotValidationError(
            f"franka: robot {config.robot_ip} is not reachable. Check the cable / network, that the arm is powered "
            f"and FCI is enabled in Desk, and that this machine is on the robot's subnet")
    try:
        require("franky", "franky-control", "the Franka driver")
    except MissingDependencyError as exc:
        raise RobotValidationError(str(exc)) from exc
    if config.gripper_type != "franka":
        raise RobotValidationError(f"franka: gripper_type {config.gripper_type!r} has no driver here; "
                                   f"supported: franka (the Franka Hand)")
    details = {"robot_ip": config.robot_ip}
    if config.camera_type == "realsense":
        try:
            found = realsense_serials()
        except MissingDependencyError as exc:
            raise RobotValidationError(str(exc)) from exc
        if config.camera_serials is None:
            config.camera_serials = found
        missing = [s for s in config.camera_serials if s not in found]
        if missing:
            raise RobotValidationError(
                f"franka {config.robot_ip}: camera serial(s) {missing} not connected; connected RealSense serials: "
                f"{found or 'none'}. Fix CAMERA_SERIALS / camera_serials or plug the camera in (USB 3)")
        details["cameras"] = ",".join(config.camera_serials) or "none"
    elif config.camera_type != "none":
        raise RobotValidationError(f"franka: camera_type {config.camera_type!r} unsupported; use realsense or none")
    if config.gripper_connection and not os.path.exists(config.gripper_connection):
        raise RobotValidationError(f"franka: gripper port {config.gripper_connection} does not exist")
    details["validated"] = True
    return details


class FrankaBackend(RobotBackend):
    type_name = "franka"

    def __init__(self, config: FrankaConfig):
        from scipy.spatial.transform import Rotation

        self.franky = require("franky", "franky-control", "the Franka driver")
        self.Rotation, self.config = Rotation, config
        self.name = config.name or f"franka-{config.robot_ip}"
        self.robot = self.franky.Robot(config.robot_ip)
        self.robot.recover_from_errors()
        self.robot.relative_dynamics_factor = config.dynamics_factor
        self.gripper = self.franky.Gripper(config.robot_ip)
        serials = (config.camera_serials or []) if config.camera_type == "realsense" else []  # camera_type=none
        names = config.camera_names or (["wrist", "front"] + [f"cam{i}" for i in range(2, len(serials))])[:len(serials)]
        self.cameras = {}
        try:  # a camera that fails to start (busy, wrong serial) stops those already streaming
            for n, s in zip(names, serials):
                self.cameras[n] = RealSenseCamera(s, n, config.image_size).start()
        except BaseException:
            for cam in self.cameras.values():
                cam.close()
            raise
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)}
        if self.cameras:
            spaces["images"] = gym.spaces.Dict({n: gym.spaces.Box(0, 255, (config.image_size, config.image_size, 3),
                                                                  np.uint8) for n in self.cameras})
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.control_hz, self.max_episode_steps = config.control_hz, config.max_episode_steps
        self.position_scale = config.action_scale_pos
        self.box_low, self.box_high = np.asarray(config.position_low), np.asarray(config.position_high)
        self.gripper_open: bool | None = None
        self.task_description = "real robot task"

    def _pose(self):
        pose = self.robot.current_cartesian_state.pose.end_effector_pose
        return np.asarray(pose.translation, np.float64), np.asarray(pose.quaternion, np.float64)  # xyzw

    def _command_gripper(self, open_: bool) -> None:
        if open_ == self.gripper_open:  # re-commanding every step would restart the finger motion
            return
        if open_:
            self.gripper.move_async(0.08, self.config.gripper_speed)
        else:
            self.gripper.grasp_async(0.0, self.config.gripper_speed, self.config.gripper_force, epsilon_outer=1.0)
        self.gripper_open = open_

    def reset(self, seed=None):
        self.robot.recover_from_errors()
        self.robot.move(self.franky.JointMotion(list(self.config.reset_joints)))  # blocking
        self.gripper_open = None
        self._command_gripper(True)
        return self.observe()

    def send_action(self, action):
        check_finite(np.asarray(action), f"{self.name} (franka driver)")  # np.clip passes NaN through
        a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        pos, quat = self._pose()
        target_pos = np.clip(pos + a[:3] * self.config.action_scale_pos, self.box_low, self.box_high)
        check_finite(target_pos, f"{self.name} (franka driver, target from the measured pose and position box)")
        rot = self.Rotation.from_rotvec(a[3:6] * self.config.action_scale_rot) * self.Rotation.from_quat(quat)
        target = self.franky.Affine(target_pos.tolist(), rot.as_quat().tolist())
        self.robot.move(self.franky.CartesianMotion(target, self.franky.ReferenceType.Absolute), asynchronous=True)
        self._command_gripper(bool(a[6] >= 0))

    def observe(self):
        pos, quat = self._pose()
        twist = self.robot.current_cartesian_state.velocity.end_effector_twist
        state = np.concatenate([pos, quat, np.asarray(twist.linear), np.asarray(twist.angular),
                                [float(self.gripper.width)]]).astype(np.float32)
        obs = {"state": state}
        if self.cameras:
            obs["images"] = {n: cam.read(max_age=0.5) for n, cam in self.cameras.items()}
        return obs

    def tcp_position(self, obs):
        return None if obs is None else np.asarray(obs["state"][:3], np.float32)

    def hold(self):
        self.robot.move(self.franky.CartesianStopMotion(), asynchronous=True)

    def emergency_stop(self):
        self.robot.move(self.franky.CartesianStopMotion())

    def close(self):
        try:
            self.hold()
        finally:
            for cam in self.cameras.values():
                cam.close()


@register("franka", FrankaConfig, target_field="robot_ip", count_var="ROBOT_IP",
          help="a Franka arm through franky, RealSense cameras")
class Franka:
    @classmethod
    def enumerate(cls, configs):
        return [RobotInfo("franka", c.name or f"franka-{c.robot_ip}", c, validate(c)) for c in configs]

    @classmethod
    def make(cls, config):
        return FrankaBackend(config)
