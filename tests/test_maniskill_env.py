"""common.maniskill_env on the CPU: worker processes (physx_cpu) and the in-process batched backend, which is the
code path that runs physx_cuda on a GPU machine (here with one CPU scene)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from common.maniskill_env import (
    OFFLINE_TASKS, ManiSkillBatchedBackend, ManiSkillSingle, MissingAssetError, make_maniskill_env,
    scene_is_randomised, task_description,
)
from common.vec_env import BatchedEnv


@pytest.fixture(scope="module")
def cpu_env():
    env = make_maniskill_env("PickCube-v1", 2, sim_backend="cpu", max_episode_steps=6, seed=0)
    yield env
    env.close()


def test_reset_and_step_shapes(cpu_env):
    obs = cpu_env.reset(seed=0)
    assert obs["state"].shape == (2, 42) and obs["state"].dtype == torch.float32
    assert obs["task_description"] == ["pick cube", "pick cube"] and "images" not in obs
    obs, r, term, trunc, info = cpu_env.step(torch.zeros(2, 7))
    assert r.shape == (2,) and r.dtype == torch.float32 and term.dtype == torch.bool
    assert info["executed_steps"].tolist() == [1, 1]


def test_chunked_step_and_auto_reset_keeps_final_observation(cpu_env):
    cpu_env.reset(reset_ids=[11, 12])
    obs, r, term, trunc, info = cpu_env.step(torch.zeros(2, 4, 7))
    assert r.shape == (2, 4) and not info["done"].any()
    before = obs["state"].clone()
    obs, r, term, trunc, info = cpu_env.step(torch.full((2, 4, 7), 0.3))
    assert trunc.all() and info["executed_steps"].tolist() == [2, 2]  # 6-step limit reached inside the chunk
    assert info["episode"]["length"].tolist() == [6, 6]
    assert info["episode"]["reset_id"].tolist() == [11, 12]
    final = info["final_observation"]["state"]
    assert not torch.equal(final, before)  # the terminal observation, not the one before the chunk
    assert not torch.equal(final, obs["state"])  # obs is already the next episode's first observation


def test_same_reset_id_same_initial_state(cpu_env):
    a = cpu_env.reset(reset_ids=[3, 4])["state"]
    b = cpu_env.reset(reset_ids=[3, 3])["state"]
    assert torch.equal(a[0], b[0]) and torch.equal(b[0], b[1])
    assert not torch.equal(a[0], a[1])


def test_rgb_observations():
    env = make_maniskill_env("PushCube-v1", 1, obs_mode="rgb", image_size=64, sim_backend="cpu")
    try:
        obs = env.reset(seed=1)
        img = obs["images"]["main"]
        assert img.shape == (1, 64, 64, 3) and img.dtype == torch.uint8 and img.float().std() > 1
        assert obs["state"].dim() == 2
        obs, *_ = env.step(torch.zeros(1, 2, 7))
        assert obs["images"]["main"].shape == (1, 64, 64, 3)
    finally:
        env.close()


def scripted_push(raw, t):
    """Privileged-state PushCube expert (pd_ee_delta_pos): go behind the cube, lower, push towards the goal."""
    tcp, cube, goal = raw.agent.tcp.pose.p[0], raw.obj.pose.p[0], raw.goal_region.pose.p[0]
    behind = cube + torch.tensor([-0.05, 0.0, 0.0])
    if t < 15:
        target = behind + torch.tensor([0.0, 0.0, 0.05])
    elif t < 25:
        target = behind
    else:
        target = torch.stack([goal[0], goal[1], behind[2]])
    return torch.cat([torch.clamp((target - tcp) / 0.02, -1, 1), torch.tensor([-1.0])])


def test_success_detected_on_a_known_good_action_sequence():
    backend = ManiSkillBatchedBackend("PushCube-v1", 1, "physx_cpu", "state", "pd_ee_delta_pos", "sparse", 64)
    env = BatchedEnv(backend, max_episode_steps=100, num_reset_ids=2**31 - 1, action_low=backend.low,
                     action_high=backend.high)
    actions, reset_id = [], 7
    env.reset(reset_ids=[reset_id])
    for t in range(100):
        a = scripted_push(backend.env, t)
        actions.append(a)
        _, r, term, trunc, info = env.step(a[None])
        if info["done"].any():
            break
    env.close()
    assert term.item() and not trunc.item() and r.item() == 1.0
    assert info["episode"]["success_once"].item() and info["episode"]["success_at_end"].item()
    n = len(actions)

    # The same actions from the same reset id succeed at the same step through the worker-process path.
    env = make_maniskill_env("PushCube-v1", 1, control_mode="pd_ee_delta_pos", sim_backend="cpu", max_episode_steps=100)
    try:
        env.reset(reset_ids=[reset_id])
        chunk = torch.stack(actions)[None]
        _, r, term, trunc, info = env.step(chunk)
        assert term.item() and info["executed_steps"].item() == n and info["episode"]["success_once"].item()
        assert r[0].tolist() == [0.0] * (n - 1) + [1.0]

        # and a do-nothing sequence does not succeed
        env.reset(reset_ids=[reset_id])
        _, r, term, trunc, info = env.step(torch.zeros(1, n, 4))
        assert not term.item() and not info["success"].item() and r.sum() == 0
    finally:
        env.close()


def test_relative_dense_reward_sums_to_final_level():
    """The relative reward's steps add up to the level the same actions reach at the end, which the plain reward
    pays at its last step."""
    actions = torch.rand(1, 5, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rewards = {}
    for relative in (True, False):
        env = make_maniskill_env("PushCube-v1", 1, reward_mode="normalized_dense", relative_reward=relative,
                                 sim_backend="cpu", max_episode_steps=5)
        try:
            env.reset(reset_ids=[0])
            _, rewards[relative], _, _, info = env.step(actions)
        finally:
            env.close()
    assert abs(rewards[True].sum().item() - rewards[False][0, -1].item()) < 1e-5
    assert not torch.allclose(rewards[True], rewards[False])  # (the level changes along the way)


def test_a_task_that_draws_its_scene_rebuilds_it_at_each_reset():
    """PegInsertionSide draws its peg's size when it builds its scene: a CPU worker rebuilds it at every reset,
    from the reset's seed (another id, another peg; the same id, the same peg). PushCube draws only poses at reset
    and keeps its scene (a rebuild costs ~0.2 s)."""
    assert scene_is_randomised("PegInsertionSide-v1") and scene_is_randomised("RotateValveLevel2-v1")
    assert not scene_is_randomised("PushCube-v1") and not scene_is_randomised("PickCube-v1")
    env = ManiSkillSingle("PegInsertionSide-v1", "state", None, "sparse", 64)
    try:
        sizes = []
        for reset_id in (0, 1, 2, 0):
            env.reset(reset_id)
            sizes.append(env.env.peg_half_sizes[0].clone())
    finally:
        env.close()
    assert torch.equal(sizes[0], sizes[3]) and len({tuple(s.tolist()) for s in sizes[:3]}) == 3


def test_bad_input_errors():
    with pytest.raises(ValueError, match="PickCube-v1"):  # the message lists the valid tasks
        make_maniskill_env("PickCubeTypo-v1", sim_backend="cpu")
    with pytest.raises(ValueError, match="obs_mode"):
        make_maniskill_env("PickCube-v1", obs_mode="depthmap")
    with pytest.raises(ValueError, match="reward_mode"):
        make_maniskill_env("PickCube-v1", reward_mode="shaped")
    with pytest.raises(ValueError, match="sim_backend"):
        make_maniskill_env("PickCube-v1", sim_backend="tpu")
    with pytest.raises(ValueError, match=r"no 'sparse' reward; it supports \['normalized_dense', 'dense'\]"):
        make_maniskill_env("MS-AntRun-v1", sim_backend="cpu")  # before: a NotImplementedError from a worker
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}  # (other tests' envs may be running)
    with pytest.raises(ValueError, match="num_eval_episodes"):  # refused once the workers run: they are closed
        make_maniskill_env("PushCube-v1", num_envs=1, sim_backend="cpu", eval_mode=True, num_eval_episodes=0)
    assert {p.pid for p in multiprocessing.active_children()} <= before  # (not left to the garbage collector)


def test_a_task_without_a_success_condition_steps_and_never_succeeds():
    """The control suites have no success in their info (before: KeyError 'success' at the first step)."""
    env = make_maniskill_env("MS-CartpoleBalance-v1", 1, sim_backend="cpu", reward_mode="dense", control_mode=None,
                             max_episode_steps=4, seed=0)
    try:
        env.reset(seed=0)
        for _ in range(5):
            _, _, _, _, info = env.step(torch.zeros(1, 1, env.action_dim))
        assert not bool(info["success"].any())
    finally:
        env.close()


def test_task_needing_a_download_fails_at_once_naming_the_asset():
    import time

    start = time.monotonic()
    with pytest.raises(MissingAssetError, match=r"PickSingleYCB-v1.*'ycb'"):
        make_maniskill_env("PickSingleYCB-v1", sim_backend="cpu")
    assert time.monotonic() - start < 10


def test_missing_physx_gpu_library_says_what_to_fetch_and_where():
    """On an offline GPU box, physx_cuda fails inside sapien.physx.enable_gpu(), which downloads SAPIEN's PhysX GPU
    library from GitHub at first use (seen on a lent H200): the error must name that library, its URL and folder."""
    import requests
    import sapien.physx

    from common.maniskill_env import missing_file_message

    url = "/sapien-sim/physx-precompiled/releases/download/105.1-physx-5.3.1.patch0/linux-so.zip"
    exc = requests.exceptions.ConnectionError(f"HTTPSConnectionPool(host='github.com', port=443): Max retries "
                                              f"exceeded with url: {url} (Caused by NameResolutionError(...))")
    message = missing_file_message("PushCube-v1", exc)
    assert "PhysX GPU library" in message and f"https://github.com{url}" in message
    assert str(Path.home() / ".sapien" / "physx" / sapien.physx.version()) in message
    assert "sim_backend='cpu'" in message
    assert "Tasks that need no download" in missing_file_message("PickSingleYCB-v1", FileNotFoundError("ycb"))
    assert missing_file_message("PushCube-v1", ValueError("bad control mode")) is None


def test_wrong_action_shape_through_the_real_env(cpu_env):
    cpu_env.reset()
    with pytest.raises(ValueError, match=r"\(num_envs=2, 7\)"):
        cpu_env.step(torch.zeros(2, 8))
    with pytest.raises(TypeError, match="floating"):
        cpu_env.step(np.zeros((2, 7), dtype=np.int64))


def test_offline_task_list_and_descriptions():
    assert len(OFFLINE_TASKS) == 45 and "PushT-v1" in OFFLINE_TASKS
    assert task_description("MS-CartpoleBalance-v1") == "cartpole balance"
