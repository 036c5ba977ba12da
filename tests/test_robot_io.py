"""robot_io: registry and env-var autofill, validation messages, pacing, safety box, intervention, the Franka driver
against a fake franky, a sim robot under a scripted controller, and robot servers over loopback (round trip, outage
and reconnect, hold on learner silence, spec refusal, bad frames, discovery)."""

import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import zmq

from common.transport import HandshakeError
from robot_io import registry
from robot_io.dummy import DummyBackend, DummyConfig
from robot_io.env import RobotBackend, RobotEnv, SafetyBox, make_robot_env
from robot_io.franka import FrankaConfig
from robot_io.remote import RemoteRobotEnv, RobotHub, RobotNoReply, RobotServer, RobotUnavailable, listen_beacons
from robot_io.teleop import KeyboardIntervention
from tests.helpers.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ registry
def test_registry_and_env_var_autofill():
    assert all(registry.get_type(n).name == n for n in ("dummy", "sim", "franka"))
    environ = {"ROBOT_IP": "10.0.0.2, 10.0.0.3", "CAMERA_SERIALS": "111,222;333", "GRIPPER_TYPE": "franka",
               "CONTROL_HZ": "20"}
    configs = registry.configs_from_env("franka", environ)
    assert [c.robot_ip for c in configs] == ["10.0.0.2", "10.0.0.3"]
    assert [c.camera_serials for c in configs] == [["111", "222"], ["333"]]
    assert configs[0].control_hz == 20.0 and configs[1].gripper_type == "franka"  # any field left at its default
    explicit = registry.fill_from_env(FrankaConfig(robot_ip="1.2.3.4"), 0, environ)
    assert explicit.robot_ip == "1.2.3.4" and explicit.camera_serials == ["111", "222"]
    with pytest.raises(registry.RobotValidationError, match="ROBOT_IP=.*2 robots"):
        registry.fill_from_env(FrankaConfig(), 2, environ)
    rtype, config = registry.parse_robot("sim:PegInsertionSide,obs_mode=rgb,image_size=32")
    assert rtype.name == "sim" and config.task == "PegInsertionSide" and config.image_size == 32
    _, dummy = registry.parse_robot("dummy,cameras=main;wrist,control_hz=50")
    assert dummy.cameras == ["main", "wrist"] and dummy.control_hz == 50.0
    with pytest.raises(ValueError, match="options:.*control_hz"):
        registry.parse_robot("dummy,bogus=1")
    with pytest.raises(KeyError, match="registered"):
        registry.parse_robot("ufo:1")
    with pytest.raises(registry.RobotValidationError, match="not a valid float"):
        registry.parse_robot("dummy,control_hz=fast")


def test_a_robot_takes_its_own_value_of_each_per_robot_variable_and_never_its_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "franky", make_fake_franky())
    monkeypatch.setenv("ROBOT_IP", "10.0.0.2,10.0.0.3")
    monkeypatch.setenv("CAMERA_SERIALS", "111;222")  # ignored: camera_type=none
    monkeypatch.setenv("NAME", "my-laptop")  # set by some shells (WSL): no robot's name
    envs = [make_robot_env("franka,camera_type=none,disable_validate=true", i, control_hz=0) for i in range(2)]
    try:
        assert [e.name for e in envs] == ["franka-10.0.0.2", "franka-10.0.0.3"]
        assert all("images" not in e.observation_space.spaces for e in envs)
    finally:
        for e in envs:
            e.close()
    with pytest.raises(registry.RobotValidationError, match="empty value"):
        registry.fill_from_env(FrankaConfig(), 1, {"ROBOT_IP": "10.0.0.2,,10.0.0.3"})
    # one IP names one arm: robot #1 must not be given robot #0's (both would drive it); shared settings may be one
    assert registry.fill_from_env(FrankaConfig(), 0, {"ROBOT_IP": "10.0.0.2"}).robot_ip == "10.0.0.2"
    with pytest.raises(registry.RobotValidationError, match="names one robot.*robot #1"):
        registry.fill_from_env(FrankaConfig(), 1, {"ROBOT_IP": "10.0.0.2"})
    assert registry.fill_from_env(registry.parse_robot("sim")[1], 0, {"NAME": "x"}).name is None
    closed = []
    monkeypatch.setattr(DummyBackend, "close", lambda self: closed.append(True))
    with pytest.raises(ValueError, match="control_hz must be >= 0"):
        make_robot_env("dummy,control_hz=-5")
    assert closed == [True]  # the robot just opened is closed again


def test_reachable_falls_back_to_tcp_when_ping_itself_fails(monkeypatch):
    from robot_io import franka

    monkeypatch.setattr(franka.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 2))  # no CAP_NET_RAW

    def refused(*a, **k):
        raise ConnectionRefusedError  # the host answered: it is up

    monkeypatch.setattr(franka.socket, "create_connection", refused)
    assert franka.reachable("127.0.0.1")
    monkeypatch.setattr(franka.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))  # no reply
    assert not franka.reachable("127.0.0.1")


def test_list_options_take_their_element_type_and_env_fills_what_the_string_leaves(monkeypatch):
    _, config = registry.parse_robot("franka:127.0.0.1,camera_type=none,position_low=0.3;-0.3;0.05,control_hz=10")
    assert config.position_low == [0.3, -0.3, 0.05] and all(type(v) is float for v in config.position_low)
    environ = {"POSITION_HIGH": "0.6,0.25,0.4", "RESET_JOINTS": "0,-0.7,0,-2.3,0,1.5,0.7", "GRIPPER_TYPE": "robotiq",
               "CONTROL_HZ": "20", "ROBOT_IP": "10.9.9.9", "DISABLE_VALIDATE": "yes"}
    registry.fill_from_env(config, 0, environ)
    assert config.position_high == [0.6, 0.25, 0.4] and config.reset_joints[1] == -0.7
    assert config.gripper_type == "robotiq"  # a real robot's ENV_FIELDS fill at their default too
    assert config.disable_validate is False  # not a validation bypass, though
    sim = registry.fill_from_env(registry.parse_robot("sim")[1], 0, {"TASK": "StackCube", "OBS_MODE": "rgb"})
    assert (sim.task, sim.obs_mode) == ("PickCube-v1", "state")  # stray shell variables change no sim robot
    assert config.control_hz == 10.0 and config.robot_ip == "127.0.0.1"  # the robot string wins, even at the default
    with pytest.raises(registry.RobotValidationError, match=r"position_low='0.3;x;0.05': item 'x' is not a valid"):
        registry.parse_robot("franka:1.2.3.4,position_low=0.3;x;0.05")
    with pytest.raises(registry.RobotValidationError, match="environment variable RESET_JOINTS=.*'a' is not a valid"):
        registry.fill_from_env(FrankaConfig(), 0, {"RESET_JOINTS": "1,a"})
    fake = make_fake_franky()  # the parsed box reaches np.clip as floats: the first step used to crash there
    monkeypatch.setitem(sys.modules, "franky", fake)
    config.gripper_type = "franka"
    env = RobotEnv(registry.get_type("franka").make(config), control_hz=0)
    env.reset()
    for _ in range(10):  # down into the table: the parsed box stops it at z = 0.05
        obs, *_ = env.step(np.array([0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0], np.float32))
    assert np.allclose(obs["state"][:3], [0.5, 0.0, 0.05])


def test_validation_errors_say_what_to_fix(monkeypatch):
    franka = registry.get_type("franka")
    with pytest.raises(registry.RobotValidationError, match="ROBOT_IP"):
        franka.enumerate([FrankaConfig()])
    monkeypatch.setattr("robot_io.franka.reachable", lambda ip, timeout=1.0: ip == "127.0.0.1")
    with pytest.raises(registry.RobotValidationError, match="192.0.2.1 is not reachable.*FCI"):
        franka.enumerate([FrankaConfig(robot_ip="192.0.2.1")])
    monkeypatch.setitem(sys.modules, "franky", None)  # import franky -> ImportError
    with pytest.raises(registry.RobotValidationError, match="pip install franky-control"):
        franka.enumerate([FrankaConfig(robot_ip="127.0.0.1")])
    monkeypatch.setitem(sys.modules, "franky", make_fake_franky())
    monkeypatch.setitem(sys.modules, "pyrealsense2", make_fake_realsense(["111", "222"]))
    with pytest.raises(registry.RobotValidationError, match=r"\['999'\] not connected.*\['111', '222'\]"):
        franka.enumerate([FrankaConfig(robot_ip="127.0.0.1", camera_serials=["111", "999"])])
    (info,) = franka.enumerate([FrankaConfig(robot_ip="127.0.0.1")])  # unset serials take what is connected
    assert info.config.camera_serials == ["111", "222"] and info.details["validated"]
    with pytest.raises(registry.RobotValidationError, match="position_low < position_high"):
        franka.enumerate([FrankaConfig(robot_ip="127.0.0.1", position_low=[0.7, -0.3, 0.02])])
    (skipped,) = franka.enumerate([FrankaConfig(robot_ip="192.0.2.1", disable_validate=True)])
    assert skipped.details == {"validated": False}
    with pytest.raises(registry.RobotValidationError, match="obs_mode"):
        registry.get_type("sim").enumerate([registry.get_type("sim").config_cls(obs_mode="depth")])


def test_missing_optional_package_names_the_install(monkeypatch):
    from robot_io.teleop import SpaceMouseIntervention

    monkeypatch.setitem(sys.modules, "pyspacemouse", None)
    with pytest.raises(registry.MissingDependencyError, match="pip install pyspacemouse"):
        SpaceMouseIntervention()
    # a sim robot without ManiSkill (imported lazily, when the task is checked): the install, not a validation error
    import common.maniskill_env

    def no_maniskill(task):
        raise ModuleNotFoundError("No module named 'mani_skill'")

    monkeypatch.setattr(common.maniskill_env, "check_task", no_maniskill)
    sim = registry.get_type("sim")
    with pytest.raises(registry.MissingDependencyError, match="pip install mani-skill"):
        sim.enumerate([sim.config_cls(task="PickCube")])


# ------------------------------------------------------------------------------------------------ the env
def test_rate_keeper_on_a_fake_clock(monkeypatch):
    """Deterministic pacing (the wall-clock tests below stay as smoke checks): steps that take less than the period
    run exactly at the rate on absolute ticks (no drift from the work's jitter); an overrun is counted and restarts
    the grid instead of bursting to catch up."""
    import robot_io.env as robot_env

    clock = [100.0]
    monkeypatch.setattr(robot_env.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(robot_env.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + max(s, 0.0)))
    keeper = robot_env.RateKeeper(50.0, window=20)
    keeper.reset()
    rng = np.random.default_rng(0)
    ticks = []
    for _ in range(40):
        clock[0] += rng.uniform(0.0, 0.015)  # the step's work, under the 20 ms period
        keeper.wait()
        ticks.append(clock[0])
    assert np.allclose(np.diff(ticks), 0.02) and keeper.rate == pytest.approx(50.0) and keeper.overruns == 0
    clock[0] += 0.1  # one step takes five periods
    keeper.wait()
    after = clock[0]
    for _ in range(3):
        clock[0] += 0.001
        keeper.wait()
    assert keeper.overruns == 1 and clock[0] - after == pytest.approx(3 * 0.02)  # paced again, no burst
    unpaced = robot_env.RateKeeper(0.0)
    before = clock[0]
    unpaced.wait()
    assert clock[0] == before  # 0 Hz: never sleeps


@pytest.mark.parametrize("hz", [10, 50])
def test_dummy_pacing_within_5_percent(hz):
    env = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=hz)))
    env.reset(seed=0)
    steps = hz  # one second
    start = time.perf_counter()
    for _ in range(steps):
        _, reward, terminated, _, info = env.step(env.action_space.sample())
    achieved = steps / (time.perf_counter() - start)
    assert abs(achieved - hz) / hz < 0.05, achieved
    assert abs(info["control_hz"] - hz) / hz < 0.05, info["control_hz"]
    assert reward == 0.0 and not terminated


class PointBackend(RobotBackend):
    """A tool point that moves by action[:3] * 0.1 m (a stand-in for a real arm in the safety tests)."""

    def __init__(self):
        import gymnasium as gym

        self.observation_space = gym.spaces.Dict({"state": gym.spaces.Box(-5, 5, (3,), np.float32)})
        self.action_space = gym.spaces.Box(-1, 1, (4,), np.float32)
        self.position_scale, self.control_hz, self.pos, self.sent = 0.1, 0, np.zeros(3, np.float32), []

    def reset(self, seed=None):
        self.pos = np.array([0.45, 0.0, 0.05], np.float32)
        return self.observe()

    def send_action(self, action):
        self.sent.append(action.copy())
        self.pos = self.pos + action[:3] * self.position_scale

    def observe(self):
        return {"state": self.pos.copy()}

    def tcp_position(self, obs):
        return obs["state"]


def test_safety_box_clips_actions_and_poses():
    backend = PointBackend()
    box = SafetyBox(np.array([-0.5] * 4, np.float32), np.array([0.5] * 4, np.float32),
                    np.array([0.3, -0.2, 0.02]), np.array([0.6, 0.2, 0.4]))
    env = RobotEnv(backend, safety=box, max_episode_steps=50)
    env.reset()
    _, _, _, _, info = env.step(np.array([1.0, 0.0, 0.0, 1.0], np.float32))
    assert info["safety_clipped"] and np.allclose(info["executed_action"], [0.5, 0, 0, 0.5])
    for _ in range(20):  # push down into the table and out along x: the box holds
        _, _, _, truncated, info = env.step(np.array([0.5, 0.0, -0.5, 0.0], np.float32))
    assert np.all(backend.pos <= [0.6 + 1e-5, 0.2, 0.4]) and np.all(backend.pos >= [0.3, -0.2, 0.02 - 1e-5])
    assert np.allclose(backend.pos[[0, 2]], [0.6, 0.02], atol=1e-5) and info["safety_clipped"]
    assert env.stats["safety_clips"] == 21
    for _ in range(29):
        _, _, _, truncated, _ = env.step(np.zeros(4, np.float32))
    assert truncated  # episode cap
    backend.reset = lambda seed=None: {"state": np.array([0.45, 0.0, -0.2], np.float32)}  # the tool below the box
    env.reset()  # (moved there by hand): it goes back no faster than the action limits allow
    _, _, _, _, info = env.step(np.zeros(4, np.float32))
    assert info["safety_clipped"] and np.allclose(info["executed_action"], [0, 0, 0.5, 0])
    assert env.action_space.contains(info["executed_action"])


def test_intervention_flag_executed_action_and_estop():
    keys = iter(["", "w", "", "i", " ", "x"])
    device = KeyboardIntervention(action_dim=7, read_keys=lambda: next(keys, ""))
    env = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0)), intervention=device)
    env.reset()
    policy = np.full(7, 0.3, np.float32)
    _, _, _, _, info = env.step(policy)
    assert not info["intervened"] and np.allclose(info["executed_action"], policy)
    _, _, _, _, info = env.step(policy)  # 'w': the human takes over, +x, gripper open
    assert info["intervened"] and np.allclose(info["executed_action"], [1, 0, 0, 0, 0, 0, 1])
    _, _, _, _, info = env.step(policy)  # still intervening (no key: hold still)
    assert info["intervened"] and np.allclose(info["executed_action"], [0, 0, 0, 0, 0, 0, 1])
    _, _, _, _, info = env.step(policy)  # 'i' toggles the human off
    assert not info["intervened"]
    _, _, _, _, info = env.step(policy)  # space: close the gripper (and take over)
    assert info["intervened"] and info["executed_action"][-1] == -1
    from robot_io.env import EmergencyStopped

    with pytest.raises(EmergencyStopped):  # 'x'
        env.step(policy)
    with pytest.raises(EmergencyStopped, match="reset"):
        env.step(policy)
    assert env.stats["emergency_stops"] == 1 and env.stats["interventions"] == 3
    env.reset()  # clears the stop (and the device's request)
    env.step(policy)


def test_non_finite_actions_never_reach_the_robot(monkeypatch):
    from robot_io.env import NonFiniteAction

    backend = PointBackend()
    backend.hold = lambda: backend.sent.append("hold")
    env = RobotEnv(backend)
    env.reset()
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(NonFiniteAction, match=r"the policy: non-finite action refused \(NaN/inf at index \[2\]"):
            env.step(np.array([0.1, 0.0, bad, 0.0], np.float32))
    assert backend.sent == ["hold"] * 3 and env.stats["holds"] == 3 and env.stats["steps"] == 0

    class NanDevice:
        def poll(self):
            return np.full(4, np.nan, np.float32)

    env.intervention = NanDevice()
    with pytest.raises(NonFiniteAction, match="NanDevice"):
        env.step(np.zeros(4, np.float32))
    assert backend.sent == ["hold"] * 4
    fake = make_fake_franky()  # and the Franka driver refuses one on its own (np.clip passes NaN through)
    monkeypatch.setitem(sys.modules, "franky", fake)
    franka = registry.get_type("franka").make(FrankaConfig(robot_ip="127.0.0.1", camera_type="none"))
    fake.log.clear()
    with pytest.raises(NonFiniteAction):
        franka.send_action(np.array([np.nan, 0, 0, 0, 0, 0, 1], np.float32))
    franka.box_low = np.array([np.nan, -0.3, 0.02])  # a NaN in the box would also make a NaN target
    with pytest.raises(NonFiniteAction, match="target"):
        franka.send_action(np.zeros(7, np.float32))
    assert not [e for e in fake.log if e[0] == "move" or e[0].startswith("gripper")]


# ------------------------------------------------------------------------------------------------ franka (fake franky)
def make_fake_franky():
    mod = types.ModuleType("franky")
    mod.log = []

    class Affine:
        def __init__(self, translation=(0, 0, 0), quaternion=(0, 0, 0, 1)):
            self.translation, self.quaternion = np.asarray(translation, float), np.asarray(quaternion, float)

    class Robot:
        def __init__(self, ip):
            self.ip, self.relative_dynamics_factor = ip, 1.0
            self.pose = Affine([0.5, 0.0, 0.2], [1.0, 0.0, 0.0, 0.0])

        @property
        def current_cartesian_state(self):
            twist = types.SimpleNamespace(linear=[0.0] * 3, angular=[0.0] * 3)
            return types.SimpleNamespace(pose=types.SimpleNamespace(end_effector_pose=self.pose),
                                         velocity=types.SimpleNamespace(end_effector_twist=twist))

        def recover_from_errors(self):
            mod.log.append(("recover",))

        def move(self, motion, asynchronous=False):
            mod.log.append(("move", type(motion).__name__, asynchronous))
            if isinstance(motion, CartesianMotion):
                self.pose = motion.target

    class Gripper:
        def __init__(self, ip):
            self.width = 0.08

        def move_async(self, width, speed):
            mod.log.append(("gripper_open", width))

        def grasp_async(self, width, speed, force, epsilon_outer=0.0):
            mod.log.append(("gripper_grasp", force))

    class CartesianMotion:
        def __init__(self, target, reference_type=None):
            self.target, self.reference_type = target, reference_type

    class JointMotion:
        def __init__(self, q):
            self.q = q

    class CartesianStopMotion:
        pass

    mod.Affine, mod.Robot, mod.Gripper, mod.CartesianMotion = Affine, Robot, Gripper, CartesianMotion
    mod.JointMotion, mod.CartesianStopMotion = JointMotion, CartesianStopMotion
    mod.ReferenceType = types.SimpleNamespace(Absolute="absolute", Relative="relative")
    return mod


def make_fake_realsense(serials):
    mod = types.ModuleType("pyrealsense2")
    mod.camera_info = types.SimpleNamespace(serial_number="serial")
    devices = [types.SimpleNamespace(get_info=lambda key, s=s: s) for s in serials]
    mod.context = lambda: types.SimpleNamespace(query_devices=lambda: devices)
    return mod


def test_franka_driver_against_fake_franky(monkeypatch):
    fake = make_fake_franky()
    monkeypatch.setitem(sys.modules, "franky", fake)
    backend = registry.get_type("franka").make(FrankaConfig(robot_ip="127.0.0.1", camera_type="none",
                                                            camera_serials=[]))
    env = RobotEnv(backend, control_hz=0)
    obs, _ = env.reset()
    assert obs["state"].shape == (14,) and ("move", "JointMotion", False) in fake.log
    assert ("gripper_open", 0.08) in fake.log
    fake.log.clear()
    obs, _, _, _, info = env.step(np.array([1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0], np.float32))
    assert ("move", "CartesianMotion", True) in fake.log and not any(e[0].startswith("gripper") for e in fake.log)
    assert np.allclose(obs["state"][:3], [0.52, 0.0, 0.18])  # 0.02 m per unit
    for _ in range(20):  # down into the table: the driver's position box stops at z = 0.02
        obs, *_ = env.step(np.array([0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0], np.float32))
    assert abs(obs["state"][2] - 0.02) < 1e-6
    assert sum(e[0] == "gripper_grasp" for e in fake.log) == 1  # commanded once, on the change
    env.hold()
    assert fake.log[-1] == ("move", "CartesianStopMotion", True)
    env.close()


# ------------------------------------------------------------------------------------------------ sim
def test_a_sim_robot_whose_first_reset_fails_closes_its_simulator(monkeypatch):
    import common.maniskill_env
    from robot_io.sim import SimBackend, SimConfig

    closed = []

    class BrokenSim:  # a ManiSkill env whose renderer fails at the first frame
        description = "push the cube"

        def __init__(self, *args):
            pass

        def reset(self, seed):
            raise RuntimeError("vkCreateDevice failed")

        def close(self):
            closed.append(True)

    monkeypatch.setattr(common.maniskill_env, "ManiSkillSingle", BrokenSim)
    with pytest.raises(RuntimeError, match="vkCreateDevice"):
        SimBackend(SimConfig(task="PushCube"))
    assert closed == [True]


@pytest.mark.parametrize("task", ["PickCube", "PushCube"])
def test_sim_robot_succeeds_under_the_scripted_expert(task):
    from robot_io.sim import SimExpert

    env = make_robot_env(f"sim:{task}")
    env.intervention = SimExpert(env.backend)
    successes = 0
    for episode in range(3):
        env.reset(seed=episode)
        for _ in range(100):
            _, reward, terminated, truncated, info = env.step(np.zeros(7, np.float32))  # the expert overrides
            assert info["intervened"]
            if terminated:
                successes += 1
                assert reward > 0 and info["success"]
                break
    env.close()
    assert successes >= 2, successes


# ------------------------------------------------------------------------------------------------ remote
def start_server(env, endpoint, **kwargs):
    server = RobotServer(env, endpoint, **kwargs)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    return server, thread


def test_server_client_round_trip_with_intervention():
    hub = RobotHub("tcp://127.0.0.1:0")
    keys = iter(["", "d"] + [""] * 100)
    env = RobotEnv(DummyBackend(DummyConfig(cameras=["main"], image_size=16, control_hz=50)),
                   intervention=KeyboardIntervention(read_keys=lambda: next(keys)))
    server, thread = start_server(env, hub.endpoint, heartbeat=0.2)
    try:
        remote = RemoteRobotEnv(hub, connect_timeout=10)
        assert remote.name == "dummy0" and remote.action_space.shape == (7,)
        obs, info = remote.reset(seed=3)
        assert obs["state"].shape == (14,) and obs["images"]["main"].shape == (16, 16, 3)
        assert obs["images"]["main"].dtype == np.uint8 and info["task_description"] == "dummy task"
        assert remote.observation_space.contains(obs)
        policy = np.full(7, 0.25, np.float32)
        _, reward, terminated, truncated, info = remote.step(policy)
        assert not info["intervened"] and np.allclose(info["executed_action"], policy)
        _, _, _, _, info = remote.step(policy)  # 'd': the human moves -y
        assert info["intervened"] and np.allclose(info["executed_action"], [0, -1, 0, 0, 0, 0, 1])
        start = time.perf_counter()
        for _ in range(25):
            remote.step(policy)
        assert 0.4 < time.perf_counter() - start < 0.9  # paced at 50 Hz on the robot side
        stats = hub.request("dummy0", "stats").meta
        assert stats["env"]["interventions"] >= 1 and stats["env"]["steps"] == 27
    finally:
        server.stop()
        thread.join(5)
        hub.close()


def test_robot_holds_when_learner_goes_silent():
    hub = RobotHub("tcp://127.0.0.1:0")
    env = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0)))
    server, thread = start_server(env, hub.endpoint, heartbeat=0.1, hold_after=0.5)
    try:
        remote = RemoteRobotEnv(hub, connect_timeout=10)
        remote.reset()
        remote.step(np.zeros(7, np.float32))
        assert server.moving
        hub.close()  # the learner dies mid-episode
        deadline = time.monotonic() + 3
        while (env.stats["holds"] == 0 or server.moving) and time.monotonic() < deadline:  # hold, then the flag
            time.sleep(0.05)
        assert env.stats["holds"] == 1 and server.stats["outages"] == 1 and not server.moving
    finally:
        server.stop()
        thread.join(5)


def test_a_step_that_waited_out_an_outage_is_refused_until_a_reset():
    # the server stalls past hold_after with a step queued (its caller gave up on it): the watchdog holds the arm,
    # and the queued step must not move it afterwards; the next reset starts a clean episode
    hub = RobotHub("tcp://127.0.0.1:0")
    env = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0)))
    server = RobotServer(env, hub.endpoint, heartbeat=0.1, hold_after=0.5)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            server.serve_once()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        remote = RemoteRobotEnv(hub, connect_timeout=10, step_timeout=0.3)
        remote.reset()
        remote.step(np.zeros(7, np.float32))
        stop.set()
        thread.join(5)  # the server stalls (the network, a busy robot PC) ...
        steps = env.stats["steps"]
        with pytest.raises(RobotUnavailable):  # ... the learner's step times out and it gives up on it
            remote.step(np.zeros(7, np.float32))
        time.sleep(0.7)  # past hold_after, with the step still queued on the robot's socket
        for _ in range(20):  # the server comes back: the watchdog holds first, then it reads the stale step
            server.serve_once(timeout=0.05)
        assert server.stats["holds"] == 1 and env.stats["steps"] == steps  # held, and the stale step did not run
        stop.clear()
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with pytest.raises(RobotUnavailable, match="arm was held"):  # the server refuses a step of the cut episode
            hub.request("dummy0", "step", arrays={"action": np.zeros(7, np.float32)})
        with pytest.raises(RobotUnavailable, match="refused until the next reset"):  # (the env does not even send)
            remote.step(np.zeros(7, np.float32))
        remote.reset()
        remote.step(np.zeros(7, np.float32))
        assert env.stats["steps"] == steps + 1
    finally:
        stop.set()
        thread.join(5)
        server.sock.close(linger=0)
        hub.close()


def test_a_step_retried_after_a_timeout_is_refused_until_a_reset():
    """One slow step (past step_timeout, well within hold_after) still runs on the robot: a retry by the caller would
    move the robot a second time, with an action from the same stale observation. The env refuses steps until a
    reset; the robot ran the one action it was sent."""
    class SlowOnce(DummyBackend):
        sent = 0

        def send_action(self, action):
            SlowOnce.sent += 1
            if SlowOnce.sent == 1:
                time.sleep(0.6)
            return super().send_action(action)

    hub = RobotHub("tcp://127.0.0.1:0")
    env = RobotEnv(SlowOnce(DummyConfig(cameras=[], control_hz=0)))
    server, thread = start_server(env, hub.endpoint, heartbeat=0.1, hold_after=5.0)
    try:
        remote = RemoteRobotEnv(hub, connect_timeout=10, step_timeout=0.3)
        remote.reset()
        SlowOnce.sent = 0
        with pytest.raises(RobotNoReply, match="no reply"):
            remote.step(np.full(7, 0.5, np.float32))
        with pytest.raises(RobotUnavailable, match="may still have run.*refused until the next reset"):
            remote.step(np.full(7, -0.5, np.float32))
        time.sleep(0.5)
        assert SlowOnce.sent == 1  # the slow step ran; the retry never reached the robot
        remote.reset()
        remote.step(np.zeros(7, np.float32))
        assert SlowOnce.sent == 2
    finally:
        server.stop()
        thread.join(5)
        hub.close()


def test_a_robot_back_with_another_spec_is_refused_at_reset():
    """A robot server restarted under the same name with another obs/action spec (a camera that failed to enumerate):
    the env's spaces no longer describe it, so reset refuses, saying what differs, instead of returning observations
    its observation_space does not contain."""
    hub = RobotHub("tcp://127.0.0.1:0", peer_timeout=0.5)
    first = RobotEnv(DummyBackend(DummyConfig(cameras=["wrist", "front"], image_size=16, control_hz=0)))
    server, thread = start_server(first, hub.endpoint, heartbeat=0.1)
    try:
        remote = RemoteRobotEnv(hub, "dummy0", connect_timeout=10, reconnect_timeout=10)
        remote.reset()
        server.stop()
        thread.join(5)
        time.sleep(1.0)  # past peer_timeout: the hub takes the next session as a restart
        again = RobotEnv(DummyBackend(DummyConfig(cameras=["wrist"], image_size=16, control_hz=0)))
        server, thread = start_server(again, hub.endpoint, heartbeat=0.1)
        deadline = time.monotonic() + 5
        while hub.records["dummy0"].spec == remote.spec and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(HandshakeError, match="another spec"):
            remote.reset()
    finally:
        server.stop()
        thread.join(5)
        hub.close()


def test_a_robot_back_at_another_control_rate_is_taken_with_its_new_settings(caplog):
    """The same spaces, another control rate after a restart (0.5 Hz instead of 10): reset goes on, logs what changed,
    and the env takes the robot's settings as they are now: its spec, and a step deadline of five of the new, longer
    periods (kept at the old rate's 2 s, every 2-s step at 0.5 Hz would be an outage)."""
    hub = RobotHub("tcp://127.0.0.1:0", peer_timeout=0.5)
    first = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=10)))
    server, thread = start_server(first, hub.endpoint, heartbeat=0.1)
    try:
        remote = RemoteRobotEnv(hub, "dummy0", connect_timeout=10, reconnect_timeout=10)
        remote.reset()
        assert remote.step_timeout == 2.0  # max(2 s, 5 periods of 0.1 s)
        server.stop()
        thread.join(5)
        time.sleep(1.0)  # past peer_timeout: the hub takes the next session as a restart
        again = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0.5)))
        server, thread = start_server(again, hub.endpoint, heartbeat=0.1)
        deadline = time.monotonic() + 5
        while hub.records["dummy0"].spec == remote.spec and time.monotonic() < deadline:
            time.sleep(0.05)
        with caplog.at_level("WARNING", logger="robot_io"):
            remote.reset()
        assert remote.spec["control_hz"] == 0.5 and remote.step_timeout == 10.0
        assert any("other settings" in r.getMessage() and "control_hz" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()
        thread.join(5)
        hub.close()


def test_a_request_that_cannot_be_encoded_is_a_clear_error_and_leaves_nothing_pending():
    """A seed msgpack cannot carry (gymnasium takes any int) fails at once with a ValueError, and leaves no pending
    entry behind: one would mark the robot busy for ever and hide its later outages."""
    hub = RobotHub("tcp://127.0.0.1:0", peer_timeout=0.5)
    env = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0)))
    server, thread = start_server(env, hub.endpoint, heartbeat=0.1)
    try:
        remote = RemoteRobotEnv(hub, connect_timeout=10)
        with pytest.raises(ValueError, match="cannot be sent"):
            remote.reset(seed=2**70)
        assert not hub._pending
        server.stop()
        thread.join(5)
        deadline = time.monotonic() + 5
        while hub.robots() and time.monotonic() < deadline:  # the robot's outage is still seen
            time.sleep(0.05)
        assert not hub.robots() and hub.stats["outages"] == 1
    finally:
        server.stop()
        hub.close()


def test_a_heartbeat_too_slow_for_the_hold_delay_is_refused():
    env = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0)))
    with pytest.raises(ValueError, match="at most half of hold_after"):
        RobotServer(env, "tcp://127.0.0.1:1", heartbeat=1.5, hold_after=2.0)


def test_a_beacon_host_is_resolved_once_at_start(monkeypatch):
    """Beacons go out once per heartbeat from the control loop: a host name is looked up when the server starts
    (an unknown one is a clear error there), never per beacon (DNS has no deadline)."""
    import socket

    looked_up, real = [], socket.gethostbyname
    monkeypatch.setattr(socket, "gethostbyname", lambda host: looked_up.append(host) or real("127.0.0.1"))
    hub = RobotHub("tcp://127.0.0.1:0")
    server = RobotServer(RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0))), hub.endpoint, heartbeat=0.05,
                         beacon=f"monitor.invalid:{free_port()}")
    try:
        server.serve(max_seconds=0.4)
        assert server.stats["announces"] >= 2 and looked_up == ["monitor.invalid"]
    finally:
        hub.close()
    monkeypatch.setattr(socket, "gethostbyname", lambda host: (_ for _ in ()).throw(socket.gaierror(-2, "unknown")))
    with pytest.raises(ValueError, match="does not resolve"):
        RobotServer(RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0))), hub.endpoint,
                    beacon="monitor.invalid:50555")


def test_robot_sockets_cap_incoming_frames():
    """The hub (bound in the learner) and the robot server cap what ZMQ reads for one frame, as every other receiver:
    a multi-GB frame from a stray peer is cut off by ZMQ, not read into memory."""
    from common.transport import DEFAULT_MAX_MESSAGE_BYTES, wire_limit

    hub = RobotHub("tcp://127.0.0.1:0")
    server = RobotServer(RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0))), hub.endpoint)
    try:
        assert server.sock.getsockopt(zmq.MAXMSGSIZE) == wire_limit(DEFAULT_MAX_MESSAGE_BYTES)
        assert hub.sock.getsockopt(zmq.MAXMSGSIZE) == wire_limit(DEFAULT_MAX_MESSAGE_BYTES)  # (a read of an option)
    finally:
        server.sock.close(linger=0)
        hub.close()


def test_a_robot_of_another_protocol_version_is_refused_with_both_versions():
    """An announce in another protocol version is answered with a refusal naming both versions (it was dropped as a
    bad frame: the robot served forever unconnected, the learner timed out with no reason)."""
    import msgpack

    hub = RobotHub("tcp://127.0.0.1:0")
    robot = zmq.Context.instance().socket(zmq.DEALER)
    robot.connect(hub.endpoint)
    try:
        header = msgpack.packb({"v": 99, "t": "announce", "s": 0, "m": {"name": "arm", "session": "s2",
                                                                         "protocol": 99}, "a": []}, use_bin_type=True)
        robot.send_multipart([header])
        assert robot.poll(3000)
        reply = robot.recv_multipart()
        assert b"refuse" in reply[0] and b"99" in reply[0] and hub.stats["refused"] == 1
    finally:
        robot.close(linger=0)
        hub.close()


def test_a_robot_of_another_protocol_version_exits_saying_so(monkeypatch):
    """The robot side of the same: a hub message in another version ends serve() with a HandshakeError naming
    both versions."""
    import robot_io.remote as remote_module
    from common.transport import ProtocolMismatch

    hub = RobotHub("tcp://127.0.0.1:0")
    server = RobotServer(RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0))), hub.endpoint, heartbeat=0.1)

    def other_version(frames):
        raise ProtocolMismatch(99, 0)

    monkeypatch.setattr(remote_module, "decode", other_version)  # every hub message reads as version 99
    try:
        with pytest.raises(HandshakeError, match="protocol version 99"):
            server.serve(max_seconds=5)
    finally:
        hub.close()


def test_a_robot_that_stops_reading_does_not_stall_the_hub(monkeypatch):
    # the hub's one thread serves every robot: a send to a robot whose queue is full must not block it
    import zmq

    from common.transport import PROTOCOL_VERSION, encode, make_socket
    from robot_io import remote

    monkeypatch.setattr(remote, "make_socket", lambda kind, *a, **kw: make_socket(  # the hub's queues: 2 messages
        kind, *a, **{**kw, **({"SNDHWM": 2} if kind == zmq.ROUTER else {})}))
    hub = RobotHub("tcp://127.0.0.1:0")
    stuck = zmq.Context.instance().socket(zmq.DEALER)
    stuck.setsockopt(zmq.ROUTING_ID, b"s1/stuck")
    stuck.setsockopt(zmq.RCVHWM, 2)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.connect(hub.endpoint)
    spec = {"observation": {}, "action": {"box": [7]}}
    stuck.send_multipart(encode("announce", {"name": "stuck", "session": "s1", "protocol": PROTOCOL_VERSION,
                                             "spec": spec}))
    hub.wait_for("stuck", 10)
    big = np.zeros(2_000_000, np.float32)  # 8 MB requests the robot never reads
    for _ in range(8):
        with pytest.raises(RobotUnavailable):
            hub.request("stuck", "step", arrays={"action": big}, timeout=0.2)
    env = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0)))
    server, thread = start_server(env, hub.endpoint, heartbeat=0.1)
    try:
        remote_env = RemoteRobotEnv(hub, "dummy0", connect_timeout=10)  # the hub still takes a new robot in
        remote_env.reset()
        remote_env.step(np.zeros(7, np.float32))
    finally:
        server.stop()
        thread.join(5)
        stuck.close(linger=0)
        hub.close()


def test_spec_mismatch_is_refused_with_the_difference():
    env = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0, action_dim=6)))
    expected = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0))).spec()
    hub = RobotHub("tcp://127.0.0.1:0", expected_spec=expected)
    server = RobotServer(env, hub.endpoint, heartbeat=0.1)
    try:
        with pytest.raises(HandshakeError, match="refused.*action"):
            server.serve(max_seconds=5)
        assert hub.stats["refused"] >= 1 and not hub.robots()
    finally:
        hub.close()


def test_hub_survives_bad_frames():
    hub = RobotHub("tcp://127.0.0.1:0")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(hub.endpoint)
    try:
        sock.send_multipart([b"\x00garbage", b"x"])
        sock.send_multipart([b"\xc1"])
        deadline = time.monotonic() + 3
        while hub.stats["bad_frames"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hub.stats["bad_frames"] == 2
        env = RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0)))
        server, thread = start_server(env, hub.endpoint, heartbeat=0.1)
        remote = RemoteRobotEnv(hub, connect_timeout=10)
        remote.reset()
        remote.step(np.zeros(7, np.float32))
        server.stop()
        thread.join(5)
    finally:
        sock.close(linger=0)
        hub.close()


class SlowResetBackend(DummyBackend):
    """A dummy whose reset takes `reset_seconds`, like a Franka homing move (the server is busy all that time)."""

    def __init__(self, reset_seconds: float, **config):
        super().__init__(DummyConfig(cameras=[], control_hz=0, **config))
        self.reset_seconds = reset_seconds

    def reset(self, seed=None):
        time.sleep(self.reset_seconds)
        return super().reset(seed)


def test_robot_call_longer_than_peer_timeout_is_not_an_outage():
    hub = RobotHub("tcp://127.0.0.1:0", peer_timeout=0.3)
    env = RobotEnv(SlowResetBackend(1.0))
    server, thread = start_server(env, hub.endpoint, heartbeat=0.1, hold_after=0.5)
    try:
        remote = RemoteRobotEnv(hub, connect_timeout=10, step_timeout=1.0)
        remote.reset()  # 1 s with no announce from the busy server
        remote.step(np.zeros(7, np.float32))  # used to raise "not connected": the hub had declared an outage
        assert hub.stats["outages"] == 0 and hub.robots()[0].online
        assert server.stats["outages"] == 0 and env.stats["holds"] == 0  # and the server had called it learner silence
    finally:
        server.stop()
        thread.join(5)
        hub.close()


def serve_in_thread(server):
    """Run server.serve() in a thread; the returned dict gets the exception it ended with, if any."""
    result = {}

    def run():
        try:
            server.serve()
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_second_server_with_the_same_name_is_refused_but_a_restart_takes_over():
    hub = RobotHub("tcp://127.0.0.1:0", peer_timeout=1.0)
    first = RobotServer(RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0))), hub.endpoint, heartbeat=0.1)
    first_thread, _ = serve_in_thread(first)
    try:
        remote = RemoteRobotEnv(hub, connect_timeout=10, step_timeout=1.0, reconnect_timeout=10)
        remote.reset()
        second = RobotServer(RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0, seed=1))), hub.endpoint,
                             heartbeat=0.1)
        assert second.name == first.name == "dummy0"  # both took the default name
        second_thread, second_result = serve_in_thread(second)
        second_thread.join(10)
        assert isinstance(second_result.get("error"), HandshakeError), second_result
        assert "already connected" in str(second_result["error"]) and "--name" in str(second_result["error"])
        assert hub.stats["duplicates"] == 1 and hub.records["dummy0"].session == first.session
        assert second.stats["requests"] == 0  # it never served the learner
        remote.reset()
        remote.step(np.zeros(7, np.float32))
        assert first_thread.is_alive()
        first.stop()  # a restart under the same name, before the hub's peer_timeout noticed the old one gone
        first_thread.join(5)
        restarted = RobotServer(RobotEnv(DummyBackend(DummyConfig(cameras=[], control_hz=0))), hub.endpoint,
                                heartbeat=0.1)
        restarted_thread, restarted_result = serve_in_thread(restarted)
        deadline = time.monotonic() + 5
        while hub.records["dummy0"].session != restarted.session and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.records["dummy0"].session == restarted.session and restarted_thread.is_alive(), restarted_result
        assert hub.stats["restarts"] == 1 and hub.stats["duplicates"] == 1
        remote.reset()
        remote.step(np.zeros(7, np.float32))
        restarted.stop()
        restarted_thread.join(5)
    finally:
        first.stop()
        hub.close()


def serve_cmd(port, beacon=""):
    return [sys.executable, "-m", "robot_io.serve", "--robot", "dummy,cameras=main,image_size=8", "--learner",
            f"tcp://127.0.0.1:{port}", "--control-hz", "50", "--heartbeat", "0.2", "--beacon", beacon]


def test_kill_server_outage_reported_then_reconnect():
    port = free_port()
    hub = RobotHub(f"tcp://127.0.0.1:{port}", peer_timeout=1.0)
    proc = subprocess.Popen(serve_cmd(port), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        remote = RemoteRobotEnv(hub, connect_timeout=60, step_timeout=1.0, reconnect_timeout=60)
        remote.reset(seed=0)
        remote.step(np.zeros(7, np.float32))
        proc.kill()  # kill -9 the robot server mid-episode
        proc.wait()
        start = time.monotonic()
        with pytest.raises(RobotUnavailable):
            remote.step(np.zeros(7, np.float32))
        assert time.monotonic() - start < 1.5  # within the step deadline
        assert remote.stats["outages"] == 1
        time.sleep(1.2)
        assert hub.stats["outages"] == 1 and not hub.robots()
        proc = subprocess.Popen(serve_cmd(port), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with pytest.raises(RobotUnavailable, match="not connected|reset"):  # back already: its episode is gone
            remote.step(np.zeros(7, np.float32))
        obs, _ = remote.reset(seed=1)  # waits for the robot to announce again
        _, _, _, _, info = remote.step(np.zeros(7, np.float32))
        assert obs["images"]["main"].shape == (8, 8, 3) and hub.stats["reconnects"] + hub.stats["restarts"] >= 1
        assert remote.stats["outage_seconds"] > 1.0
    finally:
        proc.kill()
        proc.wait()
        hub.close()


def test_discover_lists_beaconing_servers_and_local_robots():
    port, udp = free_port(), free_port()
    hub = RobotHub(f"tcp://127.0.0.1:{port}")
    proc = subprocess.Popen(serve_cmd(port, beacon=f"127.0.0.1:{udp}"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        hub.wait_for("dummy0", 60)
        beacons = listen_beacons(1.5, udp)
        assert [b["name"] for b in beacons] == ["dummy0"] and beacons[0]["learner"] == f"tcp://127.0.0.1:{port}"
        assert beacons[0]["spec"]["action"]["box"] == [7]  # the spec travels with the announcement
        out = subprocess.run([sys.executable, "-m", "robot_io.discover", "--robot", "dummy", "--wait", "1.5",
                              "--port", str(udp), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        import json

        info = json.loads(out.stdout)
        assert info["cpu"]["logical_cores"] >= 1 and "gpus" in info
        assert [r["name"] for r in info["robots"]] == ["dummy0"]
        assert [r["name"] for r in info["network_robots"]] == ["dummy0"]
    finally:
        proc.kill()
        proc.wait()
        hub.close()


def test_malformed_beacons_are_dropped_not_fatal():
    import socket

    import msgpack

    from robot_io.remote import BEACON_MAGIC

    udp = free_port()
    good = {"magic": BEACON_MAGIC, "name": "ok0", "spec": {"action": {"box": [7]}}}
    packets = [b"\x00junk", msgpack.packb([1, 2]), msgpack.packb({"magic": BEACON_MAGIC, "name": "x", b"k": 1}),
               msgpack.packb({"magic": BEACON_MAGIC, "name": "y", "spec": [1]}),
               msgpack.packb({"magic": BEACON_MAGIC, "name": 3}), msgpack.packb(good)]
    stop = threading.Event()

    def send():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        while not stop.is_set():
            for p in packets:
                sock.sendto(p, ("127.0.0.1", udp))
            time.sleep(0.05)
        sock.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        beacons = listen_beacons(0.5, udp)
    finally:
        stop.set()
        sender.join(2)
    assert [b["name"] for b in beacons] == ["ok0"]


def test_serve_cli_bad_robot_is_a_clear_error(capsys):
    out = subprocess.run([sys.executable, "-m", "robot_io.serve", "--robot", "franka", "--learner",
                          "tcp://127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ROBOT_IP": ""})
    assert out.returncode == 2 and "robot_ip is not set" in out.stderr
    out = subprocess.run([sys.executable, "-m", "robot_io.serve", "--robot", "dummy,speed=3", "--learner",
                          "tcp://127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "bad robot option" in out.stderr
    from robot_io import serve

    # a malformed beacon, key file or value: a message, no traceback
    for flags, said in ((["--beacon", "nonsense"], "--beacon takes HOST:PORT"),
                        (["--curve-secret", "/nonexistent.key", "--curve-server-key", "/x.key"], "no such file"),
                        (["--max-episode-steps", "-1"], "--max-episode-steps >= 1"),
                        (["--control-hz", "-5"], "--control-hz must be >= 0"),
                        # acks come once per heartbeat: at or above the hold delay a live learner would read silent
                        (["--heartbeat", "3", "--hold-after", "2"], "at most half of --hold-after")):
        with pytest.raises(SystemExit) as exit_info:
            serve.main(["--robot", "dummy", "--learner", "tcp://127.0.0.1:1", *flags])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err, flags


def test_serve_and_discover_say_what_is_wrong_with_an_endpoint(capsys):
    from robot_io import discover, serve

    assert serve.main(["--robot", "dummy", "--learner", "localhost:5600"]) == 2
    assert "cannot connect to 'localhost:5600'" in capsys.readouterr().err
    for flags, said in ((["--listen", "localhost:5600"], "cannot bind 'localhost:5600'"),
                        (["--port", "99999"], "--port must be in 1..65535")):
        with pytest.raises(SystemExit):
            discover.main([*flags, "--wait", "0"])
        assert said in capsys.readouterr().err, flags


@pytest.mark.parametrize("task", ["PickCube", "PegInsertionSide"])
def test_sim_robots_with_images_behind_the_same_interface(task):
    env = make_robot_env(f"sim:{task},obs_mode=rgb,image_size=32")
    obs, info = env.reset(seed=0)
    assert obs["images"]["main"].shape == (32, 32, 3) and obs["images"]["main"].dtype == np.uint8
    assert env.observation_space.contains(obs) and info["task_description"]
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs["state"].dtype == np.float32 and np.isfinite(obs["state"]).all()
    assert env.spec()["observation"]["dict"]["images"]["dict"]["main"]["box"] == [32, 32, 3]
    # the safety box's frame is the robot base's: ManiSkill places the base away from the world origin
    agent = env.backend.sim.env.agent
    base, tcp = agent.robot.pose.p[0].numpy(), agent.tcp.pose.p[0].numpy()
    assert np.linalg.norm(base) > 0.3 and np.allclose(agent.robot.pose.q[0].numpy(), [1, 0, 0, 0], atol=1e-6)
    assert np.allclose(env.backend.tcp_position(obs), tcp - base, atol=1e-5)
    env.close()


def test_latest_frame_camera_keeps_only_the_newest_frame():
    from robot_io.cameras import LatestFrameCamera

    class Counter(LatestFrameCamera):
        def __init__(self):
            super().__init__("fake", image_size=16)
            self.n = 0

        def grab(self):
            time.sleep(0.002)
            self.n += 1
            return np.full((48, 64, 3), self.n % 256, np.uint8)

    cam = Counter().start()
    try:
        first = cam.read(timeout=2.0)
        deadline = time.monotonic() + 2.0
        while cam.frames < 10 and time.monotonic() < deadline:  # ~5 ms a frame; longer on a busy machine
            time.sleep(0.01)
        later = cam.read(timeout=2.0)
        assert first.shape == (16, 16, 3) and later[0, 0, 0] > first[0, 0, 0]  # newest, center-cropped and resized
        assert cam.frames >= 10
    finally:
        cam.close()
    with pytest.raises(TimeoutError):
        LatestFrameCamera("silent").read(timeout=0.1)  # never started: no frame, a clear timeout


def test_a_camera_that_drops_a_frame_keeps_streaming():
    from robot_io.cameras import LatestFrameCamera

    class Flaky(LatestFrameCamera):
        def __init__(self, fail):
            super().__init__("flaky")
            self.calls, self.fail = 0, fail

        def grab(self):
            self.calls += 1
            if self.fail(self.calls):
                raise RuntimeError("Frame didn't arrive within 2000")
            time.sleep(0.002)
            return np.full((8, 8, 3), 7, np.uint8)

    cam = Flaky(lambda n: n == 1).start()  # one timeout (a RealSense hiccup), then frames again
    try:
        assert cam.read(timeout=5.0, max_age=1.0)[0, 0, 0] == 7 and cam.errors == 1
    finally:
        cam.close()
    dead = Flaky(lambda n: True).start()  # never a frame: read() times out naming the grab's error
    try:
        with pytest.raises(TimeoutError, match="grabbing fails: RuntimeError: Frame didn't arrive"):
            dead.read(timeout=0.3)
    finally:
        dead.close()


def test_spacemouse_reads_at_a_bounded_rate_and_an_unplugged_one_stops_the_episode(monkeypatch):
    from robot_io.teleop import SpaceMouseIntervention

    reads, unplugged = [], threading.Event()

    def read():
        if unplugged.is_set():
            raise OSError("device disconnected")
        reads.append(1)
        return types.SimpleNamespace(x=0.0, y=0.0, z=0.0, roll=0.0, pitch=0.0, yaw=0.0, buttons=[0, 0])

    fake = types.ModuleType("pyspacemouse")
    fake.open, fake.read, fake.close = (lambda: True), read, (lambda: None)
    monkeypatch.setitem(sys.modules, "pyspacemouse", fake)
    device = SpaceMouseIntervention()
    try:
        time.sleep(0.2)
        assert 5 <= len(reads) <= 100, len(reads)  # ~200 Hz, not a spinning core (pyspacemouse reads non-blocking)
        assert device.poll() is None  # no motion, no buttons: the policy acts
        unplugged.set()
        time.sleep(0.1)
        with pytest.raises(RuntimeError, match="SpaceMouse stopped: OSError"):
            device.poll()
    finally:
        device.close()


def test_discover_cli_bad_option_is_a_clear_error(capsys, monkeypatch):
    from robot_io import discover

    with pytest.raises(SystemExit) as exit_info:  # used to be a RobotValidationError traceback
        discover.main(["--robot", "dummy,control_hz=abc", "--wait", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "robot option control_hz='abc' is not a valid float" in err
    assert "environment variable" not in err
    monkeypatch.setenv("CONTROL_HZ", "abc")  # a bad environment variable is named as one
    with pytest.raises(SystemExit):
        discover.main(["--robot", "franka:127.0.0.1,camera_type=none", "--wait", "0"])
    assert "environment variable CONTROL_HZ='abc' is not a valid float" in capsys.readouterr().err
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:  # the beacon port held by another listener
        taken.bind(("", 0))
        with pytest.raises(SystemExit) as exit_info:  # used to be an OSError traceback
            discover.main(["--wait", "0.2", "--port", str(taken.getsockname()[1])])
    assert exit_info.value.code == 2 and "cannot listen for beacons on UDP port" in capsys.readouterr().err


def test_a_remote_env_whose_robot_never_comes_releases_its_hub():
    """RemoteRobotEnv binds its own hub from an endpoint: when no robot announces itself in time, the error leaves no
    bound socket and no hub thread behind, so the next try on the same endpoint waits for the robot again."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    for _ in range(2):
        with pytest.raises(RobotUnavailable):
            RemoteRobotEnv(endpoint, connect_timeout=0.2)
    assert not [t for t in threading.enumerate() if t.name == "robot-hub"]


def test_closing_a_robot_env_closes_its_backend_even_when_the_teleop_device_fails_to():
    backend = DummyBackend(DummyConfig(cameras=[], control_hz=0))
    closed = []
    backend.close = lambda: closed.append("backend")

    class BrokenDevice:
        def read(self):
            return None

        def close(self):
            raise OSError("the spacemouse was unplugged")

    env = RobotEnv(backend, intervention=BrokenDevice())
    with pytest.raises(OSError, match="unplugged"):
        env.close()
    assert closed == ["backend"]
