"""common/envs.py: the env factory refuses unknown envs and malformed LIBERO tasks before building anything, and says
which initial states an eval of one LIBERO task or of a task subset starts from."""

import pytest

from common.envs import check_task, default_eval_envs, eval_initial_states, make_task_env, task_names
from common.libero_env import eval_episode_count, libero_task_ids


def test_bad_env_and_task_names_are_refused():
    with pytest.raises(ValueError, match="env must be"):
        make_task_env("gym", "CartPole-v1", 1)
    for task in ("libero_object/x", "a/b/1", "libero_object/", "libero_object/3-", "libero_object/-3",
                 "libero_object/1,,2", "libero_foo/1", "libero_object/0/1", "libero_object/03", "libero_object/\u00b2",
                 "libero_object/\u0663"):
        with pytest.raises(ValueError, match="<suite>/<task ids>"):
            check_task("libero", task)
    with pytest.raises(ValueError, match=r"out of range for libero_goal, which has tasks 0..9"):
        check_task("libero", "libero_goal/8-10")
    with pytest.raises(ValueError, match="out of range"):
        check_task("libero", "libero_object/0-99999999999")  # refused before any list is built
    for task in ("libero_object/1,1", "libero_object/0-2,2"):
        with pytest.raises(ValueError, match="each task once"):
            check_task("libero", task)
    for task in ("libero_object/3-1", "libero_object/0,3-1"):
        with pytest.raises(ValueError, match="lo <= hi"):
            check_task("libero", task)
    for task in ("libero_object/3", "libero_object/0-3", "libero_object/0,2,5", "libero_object", "libero_90/89"):
        check_task("libero", task)
    check_task("maniskill", "PushCube-v1")


def test_libero_task_subsets():
    assert libero_task_ids("libero_object/3") == ("libero_object", [3])
    assert libero_task_ids("libero_object/0-3") == ("libero_object", [0, 1, 2, 3])
    assert libero_task_ids("libero_spatial/5,0-1") == ("libero_spatial", [5, 0, 1])
    assert libero_task_ids("libero_goal") == ("libero_goal", list(range(10)))
    assert task_names("libero", "libero_object/2,7") == ["libero_object/2", "libero_object/7"]
    assert task_names("maniskill", "PushCube-v1") == ["PushCube-v1"]


def test_default_eval_envs_keep_one_task_each_on_small_libero_subsets():
    # an eval deals episodes round-robin: with one env per task no env changes task (a rebuild) between episodes
    assert default_eval_envs("libero", "libero_object/0-3") == 4
    assert default_eval_envs("libero", "libero_object/0,2,5") == 3
    assert default_eval_envs("libero", "libero_object/0") == 2
    assert default_eval_envs("libero", "libero_object") == 2  # ten tasks: two envs, rebuilding
    assert default_eval_envs("maniskill", "PushCube-v1") == 2


def test_eval_episodes_and_their_initial_states():
    # one task: init states 0..24 (25..49 made the demos); four tasks: 25 each, so up to 100 episodes
    assert eval_episode_count(0, "libero_object/0") == 25
    assert eval_episode_count(0, "libero_object/0-3") == 100
    assert eval_episode_count(40, "libero_object/0-3") == 40
    with pytest.raises(ValueError, match="init states 0..24 of each task"):
        eval_episode_count(26, "libero_object/0")
    with pytest.raises(ValueError, match="at most 100"):
        eval_episode_count(101, "libero_object/0-3")
    assert eval_initial_states("libero", "libero_object/0", 25) == range(25)
    assert eval_initial_states("libero", "libero_object/0-3", 100) == range(25)
    assert eval_initial_states("libero", "libero_object/0-3", 10) == range(3)  # init state by init state over tasks
    assert eval_initial_states("maniskill", "PushCube-v1", 100) == range(100)


def test_reward_mode_is_checked_and_shaped_levels_are_paid_relative():
    with pytest.raises(ValueError, match="reward_mode must be one of"):
        make_task_env("maniskill", "PushCube-v1", 1, reward_mode="shaped")
    with pytest.raises(ValueError, match="LIBERO has only the sparse"):
        make_task_env("libero", "libero_object/0", 1, reward_mode="normalized_dense")
    import torch

    from common.maniskill_env import make_maniskill_env

    actions = torch.rand(1, 6, 8, generator=torch.Generator().manual_seed(0)) * 0.2  # joint targets near home
    env = make_task_env("maniskill", "PushCube-v1", 1, reward_mode="normalized_dense", max_episode_steps=6)
    level_env = make_maniskill_env("PushCube-v1", 1, reward_mode="normalized_dense", control_mode="pd_joint_pos",
                                   sim_backend="cpu", max_episode_steps=6)
    try:  # the relative rewards add up, step by step, to the level a plain dense env reports
        assert env.relative_reward and not level_env.relative_reward
        env.reset(reset_ids=[0])
        level_env.reset(reset_ids=[0])
        _, r, _, _, _ = env.step(actions)
        _, level, _, _, _ = level_env.step(actions)
        assert level.min() > 0 and (r[0, 1:] != level[0, 1:]).all()
        assert torch.allclose(r.cumsum(1), level, atol=1e-6)
    finally:
        env.close()
        level_env.close()


def test_a_preset_fills_only_the_flags_not_given():
    from dataclasses import dataclass

    from common.envs import fill_defaults

    @dataclass
    class A:
        num_envs: int = 4
        reward_mode: str = "sparse"
        capture_video: bool = True
        lr: float = 1e-5

    preset = dict(num_envs=320, reward_mode="normalized_dense", capture_video=False, lr=5e-6)
    args = A(num_envs=16, capture_video=False)  # as parsed: one of the flags given has its default value
    kept = fill_defaults(args, preset, argv=["--num-envs", "16", "--reward-mode=sparse", "--no-capture-video"])
    assert (args.num_envs, args.reward_mode, args.capture_video, args.lr) == (16, "sparse", False, 5e-6)
    assert kept == ["--num-envs 16", "--reward-mode sparse"]


def test_pi05_libero_presets_clip_gradients_at_1_where_pi0s_libero_10_clips_at_2():
    """pirl.md §3.5: clip_grad 1.0 (π0 libero_10: 2.0) for π0, 1.0 on every suite for π0.5; the scripts merge the π0.5
    values over the π0 ones."""
    from common.envs import rlinf_libero_values, rlinf_pi05_values

    assert rlinf_libero_values("libero_10")["max_grad_norm"] == 2.0
    for suite in ("libero_spatial", "libero_object", "libero_goal", "libero_10"):
        merged = {**rlinf_libero_values(suite), **rlinf_pi05_values("libero", suite, noise_level=True)}
        assert merged["max_grad_norm"] == 1.0, suite
