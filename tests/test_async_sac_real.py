"""algos/async_sac_real.py: learner and actors as subprocesses on loopback (dummy and sim robots), kill -9 of the
learner and --resume (buffer, counters and policy version continue, no acknowledged transition lost), sync mode,
the handshake refusing a different robot, a run directory never overwritten."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.transport import HandshakeError, RpcClient, TransportTimeout, decode, unpack_frames
from tests.helpers.cli import run_each
from tests.helpers.ports import free_port
from tests.helpers.tensorboard import all_scalars

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "algos" / "async_sac_real.py")
SMALL = ["--hidden", "32", "--num-q", "4", "--batch-size", "32", "--learning-starts", "60", "--sync-every", "5",
         "--checkpoint-every", "10", "--segment-steps", "10", "--max-episode-steps", "30"]


def run(args, timeout=240):
    out = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def stored_seqs(buffer_dir: Path) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for line in (buffer_dir / "index.jsonl").read_text().splitlines():
        meta = json.loads(line)["meta"]
        if "session" in meta:
            seqs.setdefault(meta["session"], []).append(meta["seq"])
    return seqs


def run_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name != "actor_spool"]


def test_help():
    out = run(["--help"], timeout=120)
    assert "--role" in out.stdout and "--resume" in out.stdout and "--demo-fraction" in out.stdout


def test_two_dummy_robots_async(tmp_path):
    port = free_port(3)
    run(["--robot", "dummy,cameras=main,image_size=16,control_hz=50", "--num-robots", "2", "--run-dir",
         str(tmp_path), "--total-env-steps", "500", "--port", str(port), *SMALL])
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["transitions"] >= 500 and summary["updates"] > 0 and summary["version"] >= 2
    logs = all_scalars(run_dir)
    for tag in ("sync/policy_lag", "sync/weights_applied", "learner/updates_per_s", "learner/utd_achieved",
                "actor/control_hz", "transport/latency_ms", "buffer/size", "buffer/durable_size"):
        assert tag in logs, tag
    assert max(logs["sync/weights_applied"]) >= 2  # the actors' weights version advanced
    # paced, never faster than asked (exact pacing: test_robot_io's fake clock; two actors and a learner share the
    # cores here, so an actor may fall short of 50 Hz on a loaded machine, but not run unpaced)
    hz = np.median(logs["actor/control_hz"][1:] or logs["actor/control_hz"])
    assert 25 < hz < 52.5, hz
    with h5py.File(sorted((run_dir / "buffer" / "segments").iterdir())[-1]) as f:  # plain h5py reads it
        assert f["obs/images/main"].shape[1:] == (16, 16, 3) and f["obs/images/main"].dtype == np.uint8
        assert f["policy_version"][:].min() >= 0
    robots = {json.loads(line)["meta"]["robot"] for line in (run_dir / "buffer" / "index.jsonl").read_text().splitlines()}
    assert robots == {"dummy-0", "dummy-1"}


def test_sim_robot_expert_segments_go_to_the_demo_buffer(tmp_path):
    port = free_port(3)
    run(["--robot", "sim:PickCube", "--run-dir", str(tmp_path), "--total-env-steps", "150", "--port", str(port),
         "--expert-episodes", "2", *SMALL])
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["demo_transitions"] >= 20
    with h5py.File(sorted((run_dir / "demo_buffer" / "segments").iterdir())[0]) as f:
        assert f["intervention"][:].all() and f["obs/state"].shape[1] > 20
    assert summary["updates"] > 0


def test_sync_mode(tmp_path):
    run(["--mode", "sync", "--robot", "dummy,cameras=,control_hz=0", "--run-dir", str(tmp_path),
         "--total-env-steps", "150", "--sync-steps", "50", "--port", str(free_port(3)), *SMALL])
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["transitions"] >= 150 and summary["updates"] >= 50
    # resumed, the episodes (their reset seeds, and which the expert flies) go on where the run stopped
    run(["--resume", str(run_dir), "--total-env-steps", "300"])
    episodes = [json.loads(line)["meta"].get("episode") for line in (run_dir / "buffer" / "index.jsonl").open()
                if json.loads(line)["meta"].get("episode_done")]
    assert len(episodes) >= 8 and episodes == list(range(len(episodes))), episodes


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("async_sac_real", SCRIPT)
    sac = importlib.util.module_from_spec(spec)
    sys.modules["async_sac_real"] = sac
    spec.loader.exec_module(sac)
    return sac


def _always_success_classifier(path: Path, robot: str) -> None:
    import torch
    from safetensors.torch import save_file

    sac = _load_script()
    env = sac.make_actor_env(sac.Args(robot=robot))
    model = sac.RewardClassifier(env.spec())
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(10.0)  # sigmoid(10) > 0.5 on every observation
    save_file(model.state_dict(), str(path))


def test_the_td_target_draws_the_next_action_from_the_current_policy(monkeypatch):
    """SAC's backup needs a' ~ pi(.|s'): the actor head on the current encoder's features of s'. The target encoder
    (Polyak-averaged, lagging) only feeds the target critic."""
    import torch

    sac = _load_script()
    monkeypatch.setattr(sac, "random_shift", lambda images: images)  # the same pixels on both paths
    torch.manual_seed(0)
    env = sac.make_actor_env(sac.Args(robot="dummy,cameras=main,image_size=16,control_hz=0"))
    spec = env.spec()
    env.close()
    learner = sac.Learner(sac.Args(hidden=32, num_q=2, critic_subsample=2), spec, torch.device("cpu"))
    with torch.no_grad():  # a target encoder far from the current one, as after many updates
        for p in learner.encoder_target.parameters():
            p.add_(torch.randn_like(p))
    rng = np.random.default_rng(0)
    state_dim = spec["observation"]["dict"]["state"]["box"][0]

    def obs():
        return {"images/main": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
                "state": rng.normal(size=(8, state_dim)).astype(np.float32)}

    sample = {"obs": obs(), "next_obs": obs(), "actions": rng.uniform(-1, 1, (8, learner.policy.action_dim)),
              "rewards": np.zeros(8, np.float32), "terminated": np.zeros(8, bool)}
    next_obs = {k: torch.as_tensor(v) for k, v in sample["next_obs"].items()}
    with torch.no_grad():
        current, lagging = learner.policy.encoder(next_obs), learner.encoder_target(next_obs)
    assert not torch.allclose(current, lagging)
    seen = []
    head = learner.policy.head
    monkeypatch.setattr(learner.policy, "head", lambda feats, *a: seen.append(feats.detach().clone()) or head(feats, *a))
    learner.update(sample)
    assert torch.allclose(seen[0], current), "the next action must come from the current encoder's features"


def test_checking_a_robots_spec_draws_nothing_from_the_rng():
    """The learner checks each registering robot's spec by building the networks: shapes only, so a resumed run's
    restored RNG stream (and the training thread's draws) are untouched."""
    import torch

    sac = _load_script()
    env = sac.make_actor_env(sac.Args(robot="dummy,cameras=main,image_size=16,control_hz=0"))
    spec = env.spec()
    env.close()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert sac.spec_problem(spec, 32) is None and sac.spec_problem({"observation": {}}, 32)
    assert torch.equal(torch.rand(3), expected)


def test_an_actor_that_stops_closes_its_robot(monkeypatch, tmp_path):
    sac = _load_script()
    args = sac.Args(robot="dummy,cameras=,control_hz=0", port=free_port(3))
    env = sac.make_actor_env(args)
    closed = []
    monkeypatch.setattr(env, "close", lambda: closed.append(True))
    monkeypatch.setattr(sac, "make_actor_env", lambda a: env)
    monkeypatch.setattr(sac.signal, "signal", lambda *a: None)  # (the actor's SIGTERM handler: not in pytest's process)

    def refuse(self, method, meta=None, arrays=None, timeout=5.0):
        raise HandshakeError("refused: spec mismatch")

    monkeypatch.setattr(sac.RpcClient, "call", refuse)
    with pytest.raises(SystemExit, match="refused"):
        sac.run_actor(args, tmp_path / "run")
    assert closed == [True]  # a real arm is held and its cameras stopped, however the actor ends


def test_the_demo_half_of_a_batch_is_uniform_over_interventions_and_prior_demos_together():
    from common.replay_buffer import ReplayBuffer, sample_mixed

    sac = _load_script()

    def buffer(segments: int, steps: int) -> ReplayBuffer:
        buf = ReplayBuffer(None, cache_transitions=10_000)
        for _ in range(segments):
            buf.add({"obs": {"state": np.zeros((steps + 1, 3), np.float32)}, "actions": np.zeros((steps, 2), np.float32),
                     "rewards": np.zeros(steps, np.float32), "terminated": np.zeros(steps, bool),
                     "truncated": np.zeros(steps, bool)})
        return buf

    online, interventions, prior = buffer(5, 10), buffer(1, 10), buffer(3, 30)  # 10 corrected steps, 90 demo steps
    sources = sac.batch_sources(online, [interventions, prior], 0.5)  # by transitions, not segments
    assert [(b, round(f, 6)) for b, f in sources] == [(online, 0.5), (interventions, 0.05), (prior, 0.45)]
    # a first short correction next to many demos: 2 of 1,562 demo steps, 0.16 rows a batch, still sampled
    first, demos, rng = buffer(1, 2), buffer(40, 39), np.random.default_rng(0)
    rows = sum(int((sample_mixed(sac.batch_sources(online, [first, demos], 0.5), 256, rng)["source"] == 1).sum())
               for _ in range(200))
    assert 10 <= rows <= 60, rows  # 33 expected
    assert sac.batch_sources(online, [buffer(0, 1), None], 0.5) == [(online, 1.0)]  # no demonstrations yet
    assert sac.batch_sources(online, [interventions, None], 0.5) == [(online, 0.5), (interventions, 0.5)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_reward_model_success_ends_the_episode(tmp_path, mode):
    """A real robot's own reward is 0 and never terminates: the classifier's success is the reward, the success and
    the end of the episode (SERL), in the async actors and in sync mode alike."""
    robot = "dummy,cameras=,control_hz=0"
    _always_success_classifier(tmp_path / "success.safetensors", robot)
    run(["--mode", mode, "--robot", robot, "--run-dir", str(tmp_path / "runs"), "--total-env-steps", "80",
         "--sync-steps", "20", "--port", str(free_port(3)), "--reward-model", str(tmp_path / "success.safetensors"),
         *SMALL])
    (run_dir,) = run_dirs(tmp_path / "runs")
    done = [json.loads(line)["meta"] for line in (run_dir / "buffer" / "index.jsonl").open()
            if json.loads(line)["meta"].get("episode_done")]
    assert len(done) >= 20
    assert all(m["length"] == 1 and m["success"] == 1.0 and m["episodic_return"] == 1.0 for m in done), done[:3]


def test_uncapped_async_learner_trains_past_the_data_rate(tmp_path):
    """--utd 0: USER's learner trains continuously while the robot acts (the cap, --utd 1 by default, stops at one
    update per transition); --mode sync needs a positive UTD (its updates per collected transition)."""
    run(["--robot", "dummy,cameras=,control_hz=15", "--run-dir", str(tmp_path), "--total-env-steps", "150",
         "--port", str(free_port(3)), "--utd", "0", *SMALL])
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] > 1.5 * summary["transitions"], summary  # a cap of 1 would stop at 1.0
    bad = subprocess.run([sys.executable, SCRIPT, "--mode", "sync", "--utd", "0", "--run-dir", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--utd must be > 0" in bad.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("checkpointed", [True, False])
def test_kill_9_learner_then_resume_loses_nothing(tmp_path, checkpointed):
    port = free_port(3)
    robot = "dummy,cameras=,control_hz=100"
    never = [] if checkpointed else ["--checkpoint-every", "1000000", "--checkpoint-seconds", "1000000"]
    common = ["--run-dir", str(tmp_path), "--port", str(port), "--robot", robot, *SMALL, *never]
    learner = subprocess.Popen([sys.executable, SCRIPT, "--role", "learner", "--total-env-steps", "100000", *common],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    actor = subprocess.Popen([sys.executable, SCRIPT, "--role", "actor", *common], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run_dir = tmp_path / "dummy__async_sac_real__1"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ckpt = run_dir / "learner.pt"
            if (ckpt.exists() or not checkpointed) and (run_dir / "buffer" / "index.jsonl").exists() and \
                    sum(1 for _ in (run_dir / "buffer" / "index.jsonl").open()) >= 30:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the learner did not get going")
        learner.send_signal(signal.SIGKILL)  # kill -9 mid-run
        learner.wait()
        import torch

        before = torch.load(run_dir / "learner.pt", weights_only=False) if checkpointed else \
            {"learner": {"updates": 0, "version": 0}}
        assert (run_dir / "learner.pt").exists() == checkpointed
        seen_versions = [json.loads(line)["meta"].get("weights_version", 0)
                         for line in (run_dir / "buffer" / "index.jsonl").read_text().splitlines()]
        stored_before = stored_seqs(run_dir / "buffer")
        time.sleep(2.0)  # the actor keeps acting meanwhile, holding what it cannot send
        assert actor.poll() is None
        budget = sum(len(v) for v in stored_before.values()) * 10 + 400
        out = run(["--resume", str(run_dir), "--role", "learner", "--total-env-steps", str(budget)], timeout=240)
        assert "resumed" in out.stdout
        # the new budget is the run's now: a further --resume (after a crash of this one) keeps it
        assert json.loads((run_dir / "args.json").read_text())["total_env_steps"] == budget
        after = torch.load(run_dir / "learner.pt", weights_only=False)
        assert after["learner"]["updates"] > before["learner"]["updates"]
        assert after["learner"]["version"] > max([before["learner"]["version"], *seen_versions])
        stored_after = stored_seqs(run_dir / "buffer")
        for session, seqs in stored_before.items():  # everything durable before the kill is still there
            assert set(seqs) <= set(stored_after[session])
        # No duplicate, and no hole except items the actor still holds: new batches go out at once while the ones
        # the dead learner never acknowledged are resent after a delay, so the resumed learner may stop (its
        # --total-env-steps) between the two; those stay in the actor's spool for the next learner.
        held = {int(item[0]) for path in (tmp_path / "actor_spool").glob("*/*.msg")
                for item in decode([bytes(f) for f in unpack_frames(path.read_bytes())]).meta["items"]}
        for session, seqs in stored_after.items():
            assert len(seqs) == len(set(seqs)), session
            holes = set(range(max(seqs) + 1)) - set(seqs)
            assert holes <= held, (session, sorted(holes), sorted(held))
        assert sum(map(len, stored_after.values())) > sum(map(len, stored_before.values()))
    finally:
        os.killpg(actor.pid, signal.SIGKILL)
        actor.wait()
        if learner.poll() is None:
            learner.kill()


def test_refusals(tmp_path):
    port = free_port(3)
    common = ["--run-dir", str(tmp_path), "--port", str(port), *SMALL]
    learner = subprocess.Popen([sys.executable, SCRIPT, "--role", "learner", "--robot", "dummy,cameras=,control_hz=50",
                                "--total-env-steps", "100000", *common], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    # a register without a usable spec is refused before it can become the run's spec (spec.json, which a resume
    # reloads): the learner goes on serving and takes the next, well-formed robot
    rpc = RpcClient(f"tcp://127.0.0.1:{port + 2}", {"protocol": 1}, client_id="junk")
    try:
        for meta in ({"robot": "junk"}, {"robot": "junk", "spec": {"observation": {"dict": {}}, "action": "x"}}):
            deadline = time.monotonic() + 120
            while True:
                try:
                    rpc.call("register", meta, timeout=5.0)
                    raise AssertionError(f"a register with {meta} was accepted")
                except HandshakeError as exc:
                    assert "cannot use" in str(exc), exc
                    break
                except TransportTimeout:  # the learner is still starting
                    assert time.monotonic() < deadline and learner.poll() is None, "the learner never answered"
        assert learner.poll() is None and not list(tmp_path.glob("*/spec.json"))
    finally:
        rpc.close()
    first = subprocess.Popen([sys.executable, SCRIPT, "--role", "actor", "--robot", "dummy,cameras=,control_hz=50",
                              *common], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the learner takes the first robot that registers: start the odd one only once `first` is registered
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("*/spec.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(tmp_path.glob("*/spec.json")), "the first actor never registered"
        other = subprocess.run([sys.executable, SCRIPT, "--role", "actor", "--robot",
                                "dummy,cameras=,control_hz=50,action_dim=4,name=odd", *common], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and "differs" in other.stderr and "action" in other.stderr
    finally:
        for proc in (first, learner):
            proc.kill()
            proc.wait()
    again = subprocess.run([sys.executable, SCRIPT, "--role", "learner", "--robot", "dummy", *common], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--resume" in again.stderr and "nothing was overwritten" in again.stderr


def test_bad_input_fails_before_a_run_directory_exists(tmp_path):
    cases = [(["--robot", "dummy,bogus=1"], "bogus"), (["--sync-every", "0"], "--sync-every 0"),
             (["--num-robots", "0"], "--num-robots 0"),
             (["--demos", "/nonexistent_demos"], "--demos /nonexistent_demos: no such directory"),
             (["--reward-model", "/nonexistent.safetensors"], "no such file"),
             (["--reward-threshold", "1.5"], "--reward-threshold must be in (0, 1)"),
             (["--total-minutes", "-1"], "--total-minutes must be >= 0"),
             (["--critic-subsample", "0"], "1 <= --critic-subsample <= --num-q"),
             (["--hidden", "0"], "--hidden 0: must be >= 1"),
             (["--learning-rate", "-1"], "--learning-rate must be > 0"),
             (["--gamma", "-1"], "--gamma must be in [0, 1]"), (["--tau", "5"], "--tau must be in (0, 1]"),
             (["--robot", "dummy,name=arm", "--num-robots", "2"], "every robot would take the same name"),
             (["--robot", "franka:10.0.0.2", "--num-robots", "2"], "every robot would take the same robot_ip"),
             (["--robot", "franka,robot_ip=10.0.0.2", "--num-robots", "2"], "the same robot_ip")]
    outs = run_each([[sys.executable, SCRIPT, "--run-dir", str(tmp_path), *flags] for flags, _ in cases], cwd=ROOT,
                    timeout=120)
    for (flags, says), out in zip(cases, outs):
        assert out.returncode != 0 and says in out.stderr and "Traceback" not in out.stderr, flags
    assert not tmp_path.exists() or not run_dirs(tmp_path)  # nothing to clean up before a retry


def test_the_reward_classifier_counts_success_above_its_threshold():
    import torch

    sac = _load_script()
    env = sac.make_actor_env(sac.Args(robot="dummy,cameras=main,image_size=16,control_hz=0"))
    obs, _ = env.reset(seed=0)
    spec = env.spec()
    env.close()
    verdicts = []
    for threshold in (0.6, 0.7):
        model = sac.RewardClassifier(spec, threshold)
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(math.log(0.65 / 0.35))  # success probability 0.65 on every frame
        verdicts.append(model.judge(obs, False, {}))
    assert verdicts == [(1.0, True), (0.0, False)]


def _actor_pids(run_dir: Path) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"actor" in cmd and str(run_dir).encode() in cmd:
            pids.append(int(pid))
    return pids


def test_local_actors_die_with_their_learner_and_a_dead_actor_stops_the_learner(tmp_path):
    port = free_port(3)
    learner = subprocess.Popen([sys.executable, SCRIPT, "--robot", "dummy,cameras=,control_hz=50", "--run-dir",
                                str(tmp_path), "--port", str(port), "--total-env-steps", "100000", *SMALL], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "dummy__async_sac_real__1"
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "buffer" / "index.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        actors = _actor_pids(run_dir)
        assert len(actors) == 1
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        deadline = time.monotonic() + 20
        while _actor_pids(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _actor_pids(run_dir)  # an orphaned actor would act on, and fight the --resume's actor
    finally:
        for pid in _actor_pids(run_dir):
            os.kill(pid, signal.SIGKILL)
    # an actor that cannot start (here: a reward model file that is not one) stops its learner with the reason
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    out = subprocess.run([sys.executable, SCRIPT, "--robot", "dummy,cameras=,control_hz=50", "--run-dir",
                          str(tmp_path / "other"), "--port", str(port), "--reward-model",
                          str(tmp_path / "junk.safetensors"),
                          *SMALL], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "local actor(s) exited: #0 with code 1" in out.stderr


def test_each_q_head_has_its_own_layer_norm():
    """RLPD's critics are independent networks: no parameter is shared across the ensemble's heads."""
    import torch

    sac = _load_script()
    critic = sac.Critic(6, 2, 4, 16, True)
    assert all(p.shape[0] == 4 for p in critic.parameters()), [tuple(p.shape) for p in critic.parameters()]
    critic(torch.randn(5, 6), torch.randn(5, 2))[0].sum().backward()  # head 0 alone
    for name, p in critic.named_parameters():
        assert p.grad[1:].abs().sum() == 0 and p.grad[0].abs().sum() > 0, name


def test_the_log_prob_is_the_density_of_the_action_the_robot_gets():
    """tanh-Gaussian scaled to the robot's box [-2, 2] x [0, 3]: the log-prob counts the box's Jacobian too, so the
    entropy the temperature tunes against --target-entropy is the action's."""
    import torch
    from torch.distributions import Normal, TransformedDistribution
    from torch.distributions.transforms import AffineTransform, TanhTransform

    sac = _load_script()
    spec = {"observation": {"dict": {"state": {"dtype": "float32", "box": [3], "low": -1.0, "high": 1.0}}},
            "action": {"dtype": "float32", "box": [2], "low": [-2.0, 0.0], "high": [2.0, 3.0]}}
    torch.manual_seed(0)
    policy = sac.Policy(spec, 16)
    feats = torch.randn(64, policy.encoder.out_dim)
    actions, logp = policy.head(feats)
    h = policy.trunk(feats)
    base = Normal(policy.mean(h), policy.log_std(h).clamp(-5, 2).exp())
    dist = TransformedDistribution(base, [TanhTransform(), AffineTransform(policy.offset, policy.scale)])
    inside = (actions[:, 0].abs() < 1.99) & (actions[:, 1] > 0.01) & (actions[:, 1] < 2.99)  # tanh's inverse
    assert inside.sum() > 32
    torch.testing.assert_close(logp[inside], dist.log_prob(actions).sum(-1)[inside], rtol=1e-4, atol=1e-3)


def test_demos_of_another_layout_are_refused_before_training(tmp_path):
    """A --demos buffer whose observations differ from the robot's (another state size) stops the learner as soon as
    the robot's spec is known, saying what differs, not in the first mixed batch after --learning-starts."""
    from common.replay_buffer import ReplayBuffer

    demos = ReplayBuffer(tmp_path / "demos")
    T = 5
    demos.add({"obs": {"state": np.zeros((T + 1, 3), np.float32)}, "actions": np.zeros((T, 7), np.float32),
               "rewards": np.zeros(T, np.float32), "terminated": np.zeros(T, bool), "truncated": np.zeros(T, bool),
               "policy_version": np.zeros(T, np.int64), "intervention": np.ones(T, bool)})
    demos.close()
    sac = _load_script()
    spec = {"observation": {"dict": {"state": {"dtype": "float32", "box": [4], "low": -1.0, "high": 1.0}}},
            "action": {"dtype": "float32", "box": [7], "low": -1.0, "high": 1.0}}
    problem = sac.prior_problem(ReplayBuffer.open(tmp_path / "demos", readonly=True), spec)
    assert "obs/state" in problem and "actions" not in problem
    # the same layout, but steps that carry extras the robot's segments do not: the mixed batch would fail
    with_extras = ReplayBuffer(tmp_path / "demos_extras")
    with_extras.add({"obs": {"state": np.zeros((T + 1, 4), np.float32)}, "actions": np.zeros((T, 7), np.float32),
                     "rewards": np.zeros(T, np.float32), "terminated": np.zeros(T, bool),
                     "truncated": np.zeros(T, bool), "policy_version": np.zeros(T, np.int64),
                     "intervention": np.ones(T, bool), "extras": {"logp": np.zeros(T, np.float32)}})
    with_extras.close()
    problem = sac.prior_problem(ReplayBuffer.open(tmp_path / "demos_extras", readonly=True), spec)
    assert problem is not None and "extras" in problem and "logp" in problem
    out = subprocess.run([sys.executable, SCRIPT, "--mode", "sync", "--robot", "dummy,cameras=,control_hz=0",
                          "--demos", str(tmp_path / "demos"), "--run-dir", str(tmp_path / "runs"),
                          "--total-env-steps", "100000", "--port", str(free_port(3)), *SMALL],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "does not fit this robot" in out.stderr and "obs/state" in out.stderr, \
        out.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("*/buffer/segments/*"))  # no robot time spent


def test_a_spool_left_by_another_run_is_set_aside(tmp_path):
    """An actor's spool (unsent segments, episode count) belongs to the learner run it was made for: one left by a
    deleted run of the same name is moved aside, contents intact, not sent into the new run; this run's is kept."""
    sac = _load_script()
    old = tmp_path / "actor_spool" / "old__robot"  # made before runs had ids: taken as the run's (a --resume)
    old.mkdir(parents=True)
    (old / "episodes.json").write_text('{"episode": 4}')
    sac.set_aside_other_runs_spool(old, "resumed", "robot")
    assert (old / "episodes.json").exists() and (old / "run_id").read_text() == "resumed"
    spool = tmp_path / "actor_spool" / "run__robot"
    sac.set_aside_other_runs_spool(spool, "first", "robot")
    (spool / "episodes.json").write_text('{"episode": 11}')
    sac.set_aside_other_runs_spool(spool, "first", "robot")  # the same run (an actor restart): kept
    assert (spool / "episodes.json").exists()
    sac.set_aside_other_runs_spool(spool, "second", "robot")
    (aside,) = (tmp_path / "actor_spool").glob("run__robot.other-run-*")
    assert (aside / "episodes.json").read_text() == '{"episode": 11}' and (aside / "run_id").read_text() == "first"
    assert sorted(p.name for p in spool.iterdir()) == ["run_id"] and (spool / "run_id").read_text() == "second"


def test_a_fresh_run_after_a_deleted_one_starts_its_actors_afresh(tmp_path):
    """Deleting a run and starting it again (the learner refuses an existing directory): the new run's actor starts
    its episode count at 0, so it drives its expert episodes again (they went on from the deleted run's count, and
    the demo buffer stayed empty), and sends nothing the deleted run's actor had spooled."""
    common = ["--robot", "sim:PickCube", "--run-dir", str(tmp_path), "--total-env-steps", "150",
              "--expert-episodes", "2", *SMALL]
    run([*common, "--port", str(free_port(3))])
    (run_dir,) = run_dirs(tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["demo_transitions"] > 0
    (spool,) = (tmp_path / "actor_spool").iterdir()
    shutil.rmtree(run_dir)
    started = time.time()
    run([*common, "--port", str(free_port(3))])
    (aside,) = (tmp_path / "actor_spool").glob(f"{spool.name}.other-run-*")
    assert (spool / "run_id").read_text() == (run_dir / "run_id").read_text() != (aside / "run_id").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["demo_transitions"] > 0
    sent = [json.loads(line)["meta"]["sent_at"] for buffer in ("buffer", "demo_buffer")
            for line in (run_dir / buffer / "index.jsonl").read_text().splitlines()]
    assert min(sent) >= started


def test_a_remote_actor_takes_the_learners_network_width(tmp_path):
    """A remote actor started with another --hidden than its learner builds the learner's network (told in the
    handshake) instead of dying at the first weight update."""
    port = free_port(3)
    common = ["--run-dir", str(tmp_path), "--port", str(port), "--robot", "dummy,cameras=,control_hz=0", *SMALL]
    actor = subprocess.Popen([sys.executable, SCRIPT, "--role", "actor", *common, "--hidden", "16"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = run(["--role", "learner", "--total-env-steps", "200", *common, "--hidden", "48"])
        summary = json.loads((tmp_path / "dummy__async_sac_real__1" / "summary.json").read_text())
        assert summary["version"] >= 2 and summary["transitions"] >= 200, out.stdout[-2000:]
        assert actor.poll() is None or actor.returncode == 0
    finally:
        os.killpg(actor.pid, signal.SIGTERM)
        text = actor.communicate(timeout=30)[0]
    assert "learner's networks have 48 hidden units (--hidden 16 here)" in text, text[-2000:]
    assert "does not fit this model" not in text


def test_a_resumed_learner_saves_its_new_version_at_once(tmp_path):
    """Killed again before its first checkpoint, a resumed learner must not come back with the version numbers it
    has already published: the version it jumps to on resume is on disk before it trains."""
    import torch

    port = free_port(3)
    never = ["--checkpoint-every", "1000000", "--checkpoint-seconds", "1000000"]
    common = ["--run-dir", str(tmp_path), "--port", str(port), "--robot", "dummy,cameras=,control_hz=100", *SMALL,
              *never]
    run_dir = tmp_path / "dummy__async_sac_real__1"
    learner = subprocess.Popen([sys.executable, SCRIPT, "--role", "learner", "--total-env-steps", "100000", *common],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    actor = subprocess.Popen([sys.executable, SCRIPT, "--role", "actor", *common], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    resumed = None
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "buffer" / "index.jsonl").exists()
                   and sum(1 for _ in (run_dir / "buffer" / "index.jsonl").open()) >= 3):
            assert time.monotonic() < deadline, "the learner did not get going"
            time.sleep(0.2)
        learner.kill()
        learner.wait()
        assert not (run_dir / "learner.pt").exists()  # never checkpointed
        resumed = subprocess.Popen([sys.executable, SCRIPT, "--resume", str(run_dir), "--role", "learner",
                                    "--total-env-steps", "100000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while not (run_dir / "learner.pt").exists() and time.monotonic() < deadline and resumed.poll() is None:
            time.sleep(0.2)
        resumed.kill()  # kill -9 before any checkpoint of its own
        resumed.wait()
        assert (run_dir / "learner.pt").exists(), "the resumed learner's version was not saved"
        seen = [json.loads(line)["meta"].get("weights_version", 0)
                for line in (run_dir / "buffer" / "index.jsonl").read_text().splitlines()]
        version = torch.load(run_dir / "learner.pt", weights_only=False)["learner"]["version"]
        # above the first run's start (1) and every sync it could make before a checkpoint, and all it stored
        assert version == max([1 + 1_000_000 // 5, *seen]) + 1
    finally:
        os.killpg(actor.pid, signal.SIGKILL)
        actor.wait()
        for proc in (learner, resumed):
            if proc is not None and proc.poll() is None:
                proc.kill()


def test_a_sim_task_the_expert_cannot_drive_runs_without_expert_episodes(capsys):
    """The scripted expert drives end-effector deltas only: a sim robot in joint control gets no expert (and says
    so) instead of an actor that dies constructing one."""
    sac = _load_script()
    env = sac.make_actor_env(sac.Args(robot="sim:PickCube,control_mode=pd_joint_delta_pos", expert_episodes=10))
    try:
        assert env.intervention is None or type(env.intervention).__name__ != "SimExpert"
        assert "no scripted expert for PickCube-v1 with pd_joint_delta_pos control" in capsys.readouterr().out
    finally:
        env.close()
