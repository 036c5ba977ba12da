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
from robot_io.remote import RemoteRobotEnv, RobotHub, RobotServer, RobotUnavailable, listen_beacons
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
    assert configs[0].control_hz == 10.0  # only unset (None) fields fill from the environment
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
    (skipped,) = franka.enumerate([FrankaConfig(robot_ip="192.0.2.1", disable_validate=True)])
    assert skipped.details == {"validated": False}
    with pytest.raises(registry.RobotValidationError, match="obs_mode"):
        registry.get_type("sim").enumerate([registry.get_type("sim").config_cls(obs_mode="depth")])


def test_missing_optional_package_names_the_install(monkeypatch):
    from robot_io.teleop import SpaceMouseIntervention

    monkeypatch.setitem(sys.modules, "pyspacemouse", None)
    with pytest.raises(registry.MissingDependencyError, match="pip install pyspacemouse"):
        SpaceMouseIntervention()


# ------------------------------------------------------------------------------------------------ the env
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
        while env.stats["holds"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env.stats["holds"] == 1 and server.stats["outages"] == 1 and not server.moving
    finally:
        server.stop()
        thread.join(5)


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


def test_serve_cli_bad_robot_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "robot_io.serve", "--robot", "franka", "--learner",
                          "tcp://127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ROBOT_IP": ""})
    assert out.returncode == 2 and "robot_ip is not set" in out.stderr
    out = subprocess.run([sys.executable, "-m", "robot_io.serve", "--robot", "dummy,speed=3", "--learner",
                          "tcp://127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "bad robot option" in out.stderr


@pytest.mark.parametrize("task", ["PickCube", "PegInsertionSide"])
def test_sim_robots_with_images_behind_the_same_interface(task):
    env = make_robot_env(f"sim:{task},obs_mode=rgb,image_size=32")
    obs, info = env.reset(seed=0)
    assert obs["images"]["main"].shape == (32, 32, 3) and obs["images"]["main"].dtype == np.uint8
    assert env.observation_space.contains(obs) and info["task_description"]
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs["state"].dtype == np.float32 and np.isfinite(obs["state"]).all()
    assert env.spec()["observation"]["dict"]["images"]["dict"]["main"]["box"] == [32, 32, 3]
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
        time.sleep(0.05)
        later = cam.read(timeout=2.0)
        assert first.shape == (16, 16, 3) and later[0, 0, 0] > first[0, 0, 0]  # newest, center-cropped and resized
        assert cam.frames >= 10
    finally:
        cam.close()
    with pytest.raises(TimeoutError):
        LatestFrameCamera("silent").read(timeout=0.1)  # never started: no frame, a clear timeout
