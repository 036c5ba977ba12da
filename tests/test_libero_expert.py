"""common.libero_expert: the scripted LIBERO expert (privileged simulator state) and the demo datasets it writes."""

import json
import subprocess
import sys

import mujoco
import numpy as np
import pytest

from common.demos import GENERATING, load_demos
from common.libero_env import MAX_EPISODE_STEPS, LiberoSingle, suite_reset_table
from common.libero_expert import MAX_WIDTH, Scene, expert_episode, generate_libero_demos, parse_init_states
from common.replay_buffer import ReplayBuffer


@pytest.fixture(scope="module")
def physics():
    env = LiberoSingle("libero_object", suite_reset_table("libero_object"), cameras=False)
    yield env
    env.close()


@pytest.mark.parametrize("init", [0, 7])
def test_expert_puts_the_alphabet_soup_in_the_basket(physics, init):
    ep = expert_episode(physics, init, MAX_EPISODE_STEPS["libero_object"])  # task 0: reset id = init state index
    assert ep.success and physics.check_success()
    assert 1 <= ep.grasp_attempts <= 3 and len(ep.observations) == len(ep.actions) + 1
    actions = np.stack(ep.actions)
    assert actions.shape[1] == 7 and actions.dtype == np.float32 and np.abs(actions).max() <= 1
    assert len(actions) < MAX_EPISODE_STEPS["libero_object"]
    assert actions[0, -1] == -1 and (actions[:, -1] == 1).sum() >= 12  # starts open, closes for the grasp


def test_target_and_goal_come_from_the_bddl_goal_predicate(physics):
    physics.reset(50)  # task 1: the cream cheese
    scene = Scene(physics)
    assert mujoco.mj_id2name(scene.m, mujoco.mjtObj.mjOBJ_BODY, scene.body) == "cream_cheese_1_main"
    assert mujoco.mj_id2name(scene.m, mujoco.mjtObj.mjOBJ_SITE, scene.goal_site) == "basket_1_contain_region"
    candidates = scene.grasp_candidates(3)
    assert 1 <= len(candidates) <= 3 and all(g.width <= MAX_WIDTH for g in candidates)


def test_image_demo_replays_bit_exact_and_loads_back(tmp_path):
    out = tmp_path / "demos"
    report = generate_libero_demos("libero_object", [0], "3", out, image_size=64, shadows=False, progress=False)
    task = report["tasks"]["libero_object/0"]
    assert task["success_any_grasp"] == 1.0 and task["stored"] == 1 and task["replay_divergences"] == []
    assert json.loads((out / "report.json").read_text())["tasks"]["libero_object/0"]["stored"] == 1
    (ep,) = load_demos(out)
    T = len(ep["actions"])
    assert ep["obs"]["state"].shape == (T + 1, 8) and ep["actions"].shape == (T, 7)
    assert ep["obs"]["main"].shape == ep["obs"]["wrist"].shape == (T + 1, 64, 64, 3)
    assert ep["obs"]["main"].dtype == np.uint8
    meta = ep["meta"]
    assert meta["source"] == "libero_scripted" and meta["env"] == "libero" and meta["task"] == "libero_object/0"
    assert meta["reset_id"] == 3 and meta["init_index"] == 3 and meta["success"] and meta["length"] == T
    assert meta["task_description"] == "pick the alphabet soup and place it in the basket"
    assert meta["grasp_attempts"] == task["grasp_attempts"]
    buf = ReplayBuffer.open(out, readonly=True, eviction="keep")
    seg = buf.read_segment(buf.ids[0])
    assert seg["terminated"][-1] and seg["terminated"].sum() == 1 and seg["rewards"][-1] == 1.0
    # the stored (replayed) episode is the physics-only one: same actions, same states, success on the last step
    env = LiberoSingle("libero_object", suite_reset_table("libero_object"), cameras=False)
    try:
        obs = env.reset(3)
        assert np.array_equal(obs["state"], ep["obs"]["state"][0])
        for t, a in enumerate(ep["actions"]):
            obs, _, _, success = env.step(a)
            assert success == (t == T - 1)
        assert np.array_equal(obs["state"], ep["obs"]["state"][-1])
    finally:
        env.close()
    # killed before its report (marked as generating): run again, it goes on, and skips the pair it already holds
    (out / "report.json").unlink()
    (out / GENERATING).write_text("{}")
    again = generate_libero_demos("libero_object", [0], "3", out, image_size=64, shadows=False, progress=False)
    task = again["tasks"]["libero_object/0"]
    assert task["episodes"] == 0 and task["stored"] == task["stored_before"] == 1 and task["success_any_grasp"] is None
    assert len(load_demos(out)) == 1 and not (out / GENERATING).exists() and (out / "report.json").exists()


def test_init_states_spec():
    assert parse_init_states("all", 50) == list(range(50))
    assert parse_init_states("25-27, 0,3", 50) == [0, 3, 25, 26, 27]
    for bad in ("25-", "a,b", "5-3", ""):
        with pytest.raises(ValueError, match=r"--init-states .*expected 'all', a range like '25-49'"):
            parse_init_states(bad, 50)
    with pytest.raises(ValueError, match=r"indices \[50, 51\] are out of range; this suite has init states 0..49"):
        parse_init_states("48-51", 50)


def test_cli_rejects_a_bad_init_states_string(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "common.libero_expert", "--tasks", "0", "--init-states", "0-x",
                           "--no-cameras", "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--init-states '0-x'" in proc.stderr
    assert not (tmp_path / "d").exists()
