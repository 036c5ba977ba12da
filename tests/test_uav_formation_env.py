"""common.uav_formation_env: hover, formation cost invariances, the 9-distance summary, ball aiming, masks,
termination flags, presets and throughput (spec §3.7)."""

import math
import time

import pytest
import torch

from common.uav_formation_env import (FormationConfig, FormationEnv, formation_cost, formation_offsets, laplacian,
                                      sdf9, sdf9_diff)


def test_hover_is_stable():
    env = FormationEnv(FormationConfig.preset("free", num_envs=4))
    env.reset()
    start = env.p.clone()
    for _ in range(50):  # 1 s
        _, _, terminated, _, _ = env.step(env.hover_action())
    assert (env.p - start).norm(dim=-1).max() < 0.01 and not terminated.any()


def test_formation_cost_invariances():
    target = formation_offsets(3, 1.0)
    assert formation_cost(target, target) < 1e-6
    rot = torch.tensor([[math.cos(0.7), -math.sin(0.7), 0.0], [math.sin(0.7), math.cos(0.7), 0.0], [0, 0, 1.0]])
    moved = (target @ rot.T) * 2.5 + torch.tensor([3.0, -1.0, 0.4])
    assert formation_cost(moved, target) < 1e-5  # translation, rotation and scale
    bent = target.clone()
    bent[0, 0] = 0.2
    assert formation_cost(bent, target) > 0.05
    assert laplacian(target, normalized=False).sum(-1).abs().max() < 1e-6  # rows of a Laplacian sum to 0


def test_sdf9_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 3, 2, generator=g) * 4
    cols = torch.rand(2, 5, 2, generator=g) * 4
    active = torch.tensor([[True, True, False, True, True], [True, False, False, False, True]])
    got = sdf9(p, cols, active, far=10.0)
    for e in range(2):
        for i in range(3):
            k = 0
            for dx in (-0.1, 0.0, 0.1):
                for dy in (-0.1, 0.0, 0.1):
                    pt = p[e, i] + torch.tensor([dx, dy])
                    want = min(float((pt - cols[e, s]).norm()) for s in range(5) if active[e, s])
                    assert abs(float(got[e, i, k]) - want) < 1e-5
                    k += 1


def test_sdf9_diff_is_sdf9_re_encoded_at_unit_scale():
    g = torch.Generator().manual_seed(1)
    p, cols = torch.rand(4, 3, 2, generator=g) * 4, torch.rand(4, 6, 2, generator=g) * 4
    d = sdf9(p, cols, torch.ones(4, 6, dtype=torch.bool), far=10.0)
    enc = sdf9_diff(d)
    assert enc.shape == d.shape and torch.equal(enc[..., 0], d[..., 4])  # the drone's own distance first
    others = torch.cat([d[..., :4], d[..., 5:]], -1)
    assert torch.allclose(enc[..., 1:] * 0.1 + enc[..., :1], others, atol=1e-6)  # invertible: nothing lost
    assert enc[..., 1:].abs().max() <= 2 ** 0.5 + 1e-4  # a distance is 1-Lipschitz: neighbours 0.1-0.14 m away
    # a column straight ahead (+y) of a drone: the neighbours' differences point away from it
    ahead = sdf9_diff(sdf9(torch.zeros(1, 1, 2), torch.tensor([[[0.0, 1.5]]]), torch.ones(1, 1, dtype=torch.bool),
                           far=10.0))[0, 0]
    # sdf9's grid runs x-major over (-0.1, 0, 0.1)^2: (0, -0.1) is its 3, (0, +0.1) its 5, so here 4 and 5
    assert ahead[5] < -0.99 and ahead[4] > 0.99  # the point ahead is 0.1 m nearer, the one behind 0.1 m farther
    assert ahead[0] == 1.5 and abs(float(ahead[2])) < 0.05  # its own distance; (-0.1, 0), beside it: about as far
    env = FormationEnv(FormationConfig.preset("mixed", num_envs=4, static_mode="sdf9_diff"))
    ref = FormationEnv(FormationConfig.preset("mixed", num_envs=4))
    obs, want = env.reset(), ref.reset()  # same seed: same columns and drones
    assert torch.equal(obs["static"], sdf9_diff(want["static"])) and torch.equal(obs["static_mask"],
                                                                                want["static_mask"])
    with pytest.raises(ValueError, match="sdf9_diff"):
        FormationEnv(FormationConfig.preset("static", num_envs=2, static_mode="sdf9_grad"))


def test_a_thrown_ball_passes_near_its_aim_point():
    env = FormationEnv(FormationConfig.preset("dynamic", num_envs=64, dynamics="pointmass", throw_threshold=10_000))
    env.reset()
    fly = torch.zeros(64, 3, 4)
    fly[..., 1] = math.atanh(2 / 3)  # 2 m/s along y in point-mass mode
    for _ in range(60):  # reach the cruise speed
        env.step(fly)
    aim = env.launch_ball(torch.arange(64), 0)
    best = torch.full((64,), 1e9)
    for _ in range(100):
        env.step(fly)
        best = torch.minimum(best, (env.ball_p[:, 0] - aim).norm(dim=-1))
    assert (best < 0.3).float().mean() > 0.95, best.max()


def test_masks_hide_unlaunched_and_landed_balls_and_far_columns():
    env = FormationEnv(FormationConfig.preset("mixed", num_envs=8, static_mode="tokens", obs_range=3.0))
    obs = env.reset()
    assert obs["ball_mask"].all() and (obs["balls"] == 0).all()  # nothing thrown yet
    env.launch_ball(torch.arange(8), 1)
    obs, *_ = env.step(env.hover_action())
    assert not obs["ball_mask"][:, :, 1].all() and obs["ball_mask"][:, :, 0].all()
    env.ball_p[:, 1, 2], env.ball_v[:, 1] = 0.1, 0.0  # landed
    obs, *_ = env.step(env.hover_action())
    assert obs["ball_mask"].all()
    far = obs["static"][..., 0] > 3.0
    assert not far.any()  # masked tokens are zeroed; visible ones are within range
    assert obs["static_mask"].shape == (8, 3, 10) and obs["static"].shape == (8, 3, 10, 10)
    env.col_active[::2, 0] = False  # and an inactive column is hidden wherever it stands
    env.p[..., 1] = torch.linspace(0.0, 30.0, 8)[:, None]  # drones spread through the field: near and far columns
    obs = env._obs()
    dist = (env.columns[:, None] - env.p[:, :, None, :2]).norm(dim=-1)  # brute force: drone to column centre
    want = ~env.col_active[:, None] | (dist > 3.0)
    assert torch.equal(obs["static_mask"], want) and want.any() and (~want).any()
    assert (obs["static"][want] == 0).all() and torch.allclose(obs["static"][..., 0][~want], dist[~want])


def test_top_k_column_tokens_are_the_nearest_columns_in_range():
    """static_top_k keeps, per drone, the k nearest columns of the full token set (the summary shows only the
    nearest); far and inactive ones are masked and sort last; a k without tokens is refused."""
    full = FormationEnv(FormationConfig.preset("mixed", num_envs=16, static_mode="tokens", obs_range=3.0))
    top = FormationEnv(FormationConfig.preset("mixed", num_envs=16, static_mode="tokens", obs_range=3.0,
                                              static_top_k=3))
    full.reset()
    top.reset()
    for env in (full, top):  # drones spread through the column field, so each sees a different set
        env.p[..., 1] = torch.linspace(0.0, 30.0, 16)[:, None] + torch.tensor([0.3, 0.0, -0.6])
        env.col_active[::4, 2] = False  # and some columns inactive
    want, got = full._obs(), top._obs()
    assert got["static"].shape == (16, 3, 3, 10) and got["static_mask"].shape == (16, 3, 3)
    dist = want["static"][..., 0].masked_fill(want["static_mask"], float("inf"))
    nearest = dist.sort(-1).values[..., :3]
    seen = got["static"][..., 0].masked_fill(got["static_mask"], float("inf")).sort(-1).values
    assert torch.equal(seen, nearest)  # the same distances, so the same columns (ties aside)
    assert torch.equal(got["static_mask"].sum(-1), (~want["static_mask"]).sum(-1).clamp(max=3).neg() + 3)
    assert (~got["static_mask"]).any() and got["static_mask"].any()  # both cases occur in this layout
    for i, j in ((0, 0), (5, 1), (9, 2)):  # each visible token is one of the full set's, whole
        for tok in got["static"][i, j][~got["static_mask"][i, j]]:
            assert (want["static"][i, j] == tok).all(-1).any()
    with pytest.raises(ValueError, match="static_top_k"):
        FormationEnv(FormationConfig.preset("static", num_envs=2, static_top_k=3))  # sdf9 has no tokens to keep
    with pytest.raises(ValueError, match="static_top_k"):
        FormationEnv(FormationConfig.preset("static", num_envs=2, static_mode="tokens", static_top_k=-1))


def test_termination_flags_fire_on_scripted_collisions():
    env = FormationEnv(FormationConfig.preset("mixed", num_envs=4, dynamics="pointmass"))
    env.reset()
    env.p[0, 0, 2] = 0.1  # crash
    env.p[1, 1] = env.p[1, 0] + torch.tensor([0.05, 0.0, 0.0])  # too close
    env.columns[2, 0] = env.p[2, 0, :2]  # a column through drone 0
    env.ball_active[3, 0], env.ball_p[3, 0], env.ball_v[3, 0] = True, env.p[3, 2], torch.zeros(3)
    _, reward, terminated, truncated, info = env.step(torch.zeros(4, 3, 4))
    assert terminated.tolist() == [True, True, True, True] and not truncated.any()
    flags = ("crash", "too_close", "hit_column", "hit_ball")
    assert [[bool(info[f][e]) for f in flags] for e in range(4)] == [[e == i for i in range(4)] for e in range(4)]
    assert (info["episode"]["collision_free"] == 0).all() and (reward[..., 1] < -10).any()
    assert (env.t == 0).all()  # auto-reset


def test_truncation_metrics_and_reward_shape():
    env = FormationEnv(FormationConfig.preset("free", num_envs=6, dynamics="pointmass", max_steps=20))
    obs = env.reset()
    fly = torch.zeros(6, 3, 4)
    fly[..., 1] = math.atanh(2 / 3)
    for t in range(20):
        obs, reward, terminated, truncated, info = env.step(fly)
    assert truncated.all() and not terminated.any() and reward.shape == (6, 3, 4)
    ep = info["episode"]
    assert ep["collision_free"].all() and (ep["formation_error"] < 0.05).all() and ep["returns"].shape == (6, 4)
    assert not ep["arrival"].any()  # 20 steps are far from the goal
    assert not ep["left_corridor"].any()
    assert obs["self"].shape[:2] == (6, 3) and obs["others"].shape == (6, 3, 2, 7) and obs["state"].shape[0] == 6


def formation_rewards(mode: str, shapes: torch.Tensor) -> tuple[FormationEnv, torch.Tensor]:
    """Four `dynamic` envs (no ball thrown yet) with their drones placed at `shapes` [4, 3, 3] about each formation's
    centroid: the env and the formation reward [4, 3]."""
    env = FormationEnv(FormationConfig.preset("dynamic", num_envs=4, formation_reward=mode, dynamics="pointmass"))
    env.reset()
    env.p = env.p.mean(1, keepdim=True) + shapes
    return env, env._reward_and_flags(torch.zeros(4, 3, 4))[0][..., 0]


def test_release_formation_reward_charges_shrunken_and_squeezed_formations():
    """--formation-reward release (the released code's rescaled terms) against the default: the exact formation
    (rotated too) scores its known maximum, while a triangle at 0.6 of its size or squeezed along y loses at least
    twice what the default charges; the size terms count 0.2 more once every ball has flown and 0.2x while one is in
    the air; a bad value is refused."""
    off = formation_offsets(3, 1.0)
    turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    shapes = torch.stack([off, off @ turn.T, off * 0.6, off * torch.tensor([1.0, 0.65, 1.0])])
    form = {}
    for mode in ("simple", "release"):
        env, form[mode] = formation_rewards(mode, shapes)
        assert torch.allclose(form[mode], form[mode][:, :1].expand(4, 3))  # every drone gets the same
    shape_term = (1 / (1 + (0.04 * 10 / 3) ** 2) - 0.12) / 2  # at cost 0
    assert torch.allclose(form["release"][:2, 0], torch.tensor(5 * (2 + shape_term)), atol=1e-4)
    assert torch.allclose(form["simple"][:2, 0], torch.tensor(10.0), atol=1e-4)
    for k in (2, 3):
        lost = {mode: float(form[mode][0, 0] - form[mode][k, 0]) for mode in form}
        assert lost["simple"] > 0.1 and lost["release"] > 2 * lost["simple"], (k, lost)
    # balls: all thrown and landed -> the size terms at 1.2; one in the air -> everything at 0.2
    env.p = env.p.mean(1, keepdim=True) + off
    env.t[:], env.ball_launch[:] = 5, 0
    assert torch.allclose(env._reward_and_flags(torch.zeros(4, 3, 4))[0][..., 0],
                          torch.tensor(5 * (1.2 * 2 + shape_term)), atol=1e-4)
    env.ball_active[:, 0] = True
    env.ball_p[:, 0] = torch.tensor([0.0, 20.0, 5.0])
    assert torch.allclose(env._reward_and_flags(torch.zeros(4, 3, 4))[0][..., 0],
                          torch.tensor(0.2 * 5 * (2 + shape_term)), atol=1e-4)
    with pytest.raises(ValueError, match="formation_reward"):
        FormationEnv(FormationConfig.preset("free", num_envs=2, formation_reward="laplacian"))


def test_slot_formation_reward_charges_a_turned_formation_per_drone():
    """--formation-reward release_slot: the release's terms plus, per drone, 5 c / (1 + (e_i / 0.2 m)^2) for its
    distance e_i from its own slot about the centroid. The release pays a turned formation as much as the exact one;
    the slot term charges it, and charges only the drone that left its slot; 0.2 of it while a ball flies."""
    off = formation_offsets(3, 1.0)
    turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    moved = off.clone()
    moved[0, 0] += 0.3  # one drone 0.3 m off along x: 0.2 m from its slot about the new centroid, the others 0.1 m
    shapes = torch.stack([off, off @ turn.T, moved, off])
    form = {}
    for mode in ("release", "release_slot"):
        env, form[mode] = formation_rewards(mode, shapes)
    assert torch.allclose(form["release"][1], form["release"][0], atol=1e-4)  # blind to the turn
    slot = form["release_slot"] - form["release"]
    assert torch.allclose(slot[0], torch.tensor(5.0), atol=1e-4)  # every drone in its slot
    err = (shapes - shapes.mean(1, keepdim=True) - (off - off.mean(0))).norm(dim=-1)
    assert torch.allclose(slot, 5 / (1 + (err / 0.2) ** 2), atol=1e-4)
    assert (slot[1] < 0.2).all()  # a quarter turn: each drone ~1.4 m from its slot
    assert abs(float(slot[2, 0]) - 2.5) < 1e-3  # the moved drone loses half its term ...
    assert torch.allclose(slot[2, 1:], torch.tensor(4.0))  # ... the others, 0.1 m off, a fifth
    env.ball_active[:, 0] = True  # a ball in the air: 0.2 of every formation term, the slot term's too
    env.ball_p[:, 0] = torch.tensor([0.0, 20.0, 5.0])
    env.p = env.p.mean(1, keepdim=True) + off
    in_air = env._reward_and_flags(torch.zeros(4, 3, 4))[0][..., 0]
    shape_term = (1 / (1 + (0.04 * 10 / 3) ** 2) - 0.12) / 2
    assert torch.allclose(in_air, torch.tensor(0.2 * 5 * (2 + shape_term + 1)), atol=1e-4)


def gain_of_option(option: str, place, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """Four `dynamic` envs, their drones placed by `place(env)`: what turning `option` on adds to the rewards [4, 3,
    4], without a ball in the air and with one (far away: only its 0.2 discount matters)."""
    rewards = {}
    for on in (False, True):
        env = FormationEnv(FormationConfig.preset("dynamic", num_envs=4, dynamics="pointmass", **config,
                                                  **{option: on}))
        env.reset()
        place(env)
        rewards[on, "no ball"] = env._reward_and_flags(torch.zeros(4, 3, 4))[0]
        env.ball_active[:, 0] = True
        env.ball_p[:, 0] = torch.tensor([0.0, 20.0, 5.0])
        rewards[on, "ball"] = env._reward_and_flags(torch.zeros(4, 3, 4))[0]
    return rewards[True, "no ball"] - rewards[False, "no ball"], rewards[True, "ball"] - rewards[False, "ball"]


def test_full_height_reward_keeps_the_height_term_while_a_ball_flies():
    """--full-height-reward: the forward reward's height term 5 clip(1 - |z - 1.5|, 0) counts in full while a ball
    is in the air (released: 0.2 of it, like the rest of the forward reward); without a ball both are the same, and
    every other objective is untouched."""
    heights = torch.tensor([1.5, 1.2, 0.8, 0.3])  # per env; the height term 5 / 3.5 / 1.5 / 0

    def place(env):
        env.p[..., 2] = heights[:, None]

    without_ball, gained = gain_of_option("full_height_reward", place)
    assert torch.equal(without_ball, torch.zeros(4, 3, 4))
    height_term = 5 * (1 - (heights - 1.5).abs()).clamp(min=0)
    assert torch.allclose(gained[..., 2], 0.8 * height_term[:, None].expand(4, 3), atol=1e-4)
    assert torch.equal(gained[..., [0, 1, 3]], torch.zeros(4, 3, 3))


def test_full_slot_reward_keeps_the_slot_term_while_a_ball_flies():
    """--full-slot-reward (with release_slot): the slot term 5 / (1 + (e_i / 0.2 m)^2) counts in full while a ball is
    in the air (else 0.2 of it, like every formation term): a drone out of its slot loses the whole term, the whole
    formation shifted together loses nothing; without a ball both are the same; the other objectives are untouched;
    any other formation reward refuses it."""
    off = formation_offsets(3, 1.0)
    moved = off.clone()
    moved[0, 0] += 0.3  # one drone out of its slot (0.2 m about the new centroid, the others 0.1 m)
    shapes = torch.stack([off, off + torch.tensor([0.5, 0.0, -0.2]), moved, off])

    def place(env):
        env.p = env.p.mean(1, keepdim=True) + shapes

    without_ball, gained = gain_of_option("full_slot_reward", place, formation_reward="release_slot")
    assert torch.equal(without_ball, torch.zeros(4, 3, 4))
    err = (shapes - shapes.mean(1, keepdim=True) - (off - off.mean(0))).norm(dim=-1)
    slot_term = 5 / (1 + (err / 0.2) ** 2)
    assert torch.allclose(gained[..., 0], 0.8 * slot_term, atol=1e-4)
    assert torch.allclose(gained[1, :, 0], gained[0, :, 0], atol=1e-4)  # a rigid shift: the full 0.8 x 5 kept
    assert abs(float(gained[2, 0, 0]) - 0.8 * 2.5) < 1e-3  # the drone off its slot: half of it
    assert torch.equal(gained[..., 1:], torch.zeros(4, 3, 3))
    with pytest.raises(ValueError, match="full_slot_reward"):
        FormationEnv(FormationConfig.preset("dynamic", num_envs=2, formation_reward="release", full_slot_reward=True))


def test_an_episode_that_goes_round_the_column_field_is_marked():
    env = FormationEnv(FormationConfig.preset("free", num_envs=2, dynamics="pointmass", max_steps=60))
    env.reset()
    fly = torch.zeros(2, 3, 4)
    fly[..., 1] = math.atanh(2 / 3)  # forward
    fly[1, :, 0] = -math.atanh(0.9)  # env 1 also sideways, fast: past x = -2 well within 60 steps
    for _ in range(60):
        *_, info = env.step(fly)
    assert info["episode"]["left_corridor"].tolist() == [False, True]


@pytest.mark.parametrize("preset", ["free", "static", "dynamic", "mixed"])
def test_presets_run(preset):
    env = FormationEnv(FormationConfig.preset(preset, num_envs=16))
    obs = env.reset()
    for _ in range(5):
        obs, reward, *_ = env.step(torch.randn(16, 3, 4) * 0.1 + env.hover_action())
    assert torch.isfinite(reward).all() and all(torch.isfinite(v.float()).all() for v in obs.values())


def test_throughput_smoke():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env = FormationEnv(FormationConfig.preset("mixed", num_envs=512))
        env.reset()
        a = env.hover_action()
        for _ in range(5):
            env.step(a)
        start, steps = time.process_time(), 40  # CPU time: a busy CI machine may share the core
        for _ in range(steps):
            env.step(a)
        rate = 512 * steps / (time.process_time() - start)
    finally:
        torch.set_num_threads(threads)  # the later tests' setting, not this one's
    assert rate > 20_000, rate


def test_apf_baseline_flies_the_free_scenario_in_formation():
    from common.uav_apf import APFController

    env = FormationEnv(FormationConfig.preset("free", num_envs=8))
    env.reset()
    ctrl = APFController(env)
    for _ in range(900):
        _, _, terminated, truncated, info = env.step(ctrl.act())
        assert not terminated.any()
    ep = info["episode"]
    assert ep["collision_free"].all() and ep["arrival"].all() and (ep["formation_error"] < 0.05).all()


def test_apf_baseline_dodges_balls_without_flying_into_the_floor():
    """A ball falling onto the formation must not push the APF's drones below the crash height: pushed along the
    full 3-D closest approach, about a third of these episodes ended on the floor."""
    from common.uav_apf import APFController

    env = FormationEnv(FormationConfig.preset("dynamic", num_envs=64, seed=30_000))
    env.reset()
    ctrl = APFController(env)
    ended = torch.zeros(env.E, dtype=torch.bool)
    crashed = torch.zeros(env.E, dtype=torch.bool)
    for _ in range(900):
        _, _, terminated, truncated, info = env.step(ctrl.act())
        crashed |= info["crash"] & ~ended
        ended |= terminated | truncated
        if ended.all():
            break
    assert ended.all()
    assert crashed.float().mean() <= 0.05, crashed.float().mean()


def test_global_state_keeps_one_layout_across_presets():
    """The centralised critic's input: every preset has the same slots (before, static's columns sat where mixed
    keeps its balls)."""
    states = {}
    for preset in ("free", "static", "dynamic", "mixed"):
        env = FormationEnv(FormationConfig.preset(preset, num_envs=2))
        states[preset] = (env.reset()["state"], env)
    assert len({s.shape for s, _ in states.values()}) == 1
    drones = 3 * (3 + 3 + 6 + 3)
    static_state, static_env = states["static"]
    mixed_state, mixed_env = states["mixed"]
    assert (static_state[:, drones:drones + 2 * 7] == 0).all()  # no balls in static: their slots stay empty
    columns = static_state[:, drones + 2 * 7:].reshape(2, 10, 3)
    assert torch.equal(columns[..., :2], static_env.columns) and (columns[..., 2] == 1).all()
    mixed_columns = mixed_state[:, drones + 2 * 7:].reshape(2, 10, 3)
    assert torch.equal(mixed_columns[..., :2], mixed_env.columns)


def test_relative_self_position_is_centred_on_the_formation():
    env = FormationEnv(FormationConfig.preset("free", num_envs=2, relative_self_pos=True))
    obs = env.reset()
    for _ in range(30):
        obs, *_ = env.step(env.hover_action())
    env.p += torch.tensor([0.0, 25.0, 0.0])  # far down the corridor: the self token does not change
    moved = env._obs()
    assert torch.allclose(moved["self"], obs["self"], atol=1e-5)
    assert torch.allclose(moved["self"][..., 2], env.p[..., 2])  # the height stays absolute
    centred = env.p[..., :2] - env.p[..., :2].mean(1, keepdim=True)  # x, y from the centroid, not from one drone
    assert torch.allclose(moved["self"][..., :2], centred, atol=1e-5)


def test_relative_self_position_with_walls_keeps_x_absolute():
    """With walls the policy sees them by its absolute x, so `relative_self_pos` centres y only."""
    env = FormationEnv(FormationConfig.preset("free", num_envs=2, corridor_walls=2.0, relative_self_pos=True))
    obs = env.reset()
    for _ in range(30):
        obs, *_ = env.step(env.hover_action())
    assert torch.allclose(obs["self"][..., 0], env.p[..., 0])  # x absolute: where the walls are
    assert torch.allclose(obs["self"][..., 1], env.p[..., 1] - env.p[..., 1].mean(1, keepdim=True))
    env.p += torch.tensor([0.0, 25.0, 0.0])  # far down the corridor: the self token does not change
    assert torch.allclose(env._obs()["self"], obs["self"], atol=1e-5)
    env.p += torch.tensor([0.5, 0.0, 0.0])  # sideways, towards a wall: it does
    assert torch.allclose(env._obs()["self"][..., 0] - obs["self"][..., 0], torch.full((2, 3), 0.5))


def test_side_walls_end_an_episode_that_touches_them_and_are_off_by_default():
    """`corridor_walls` > 0: a drone at |x| >= the wall is a collision; nearer than 0.4 m costs obstacle reward."""
    def run(walls):
        env = FormationEnv(FormationConfig.preset("free", num_envs=3, dynamics="pointmass", corridor_walls=walls))
        env.reset()
        env.p[0, :, 0] += 0.2  # well inside: drone 0 at x = 1.2
        env.p[1, :, 0] += 0.85  # drone 0 at x = 1.85: 0.15 m from the wall, no contact
        env.p[2, :, 0] -= 1.6  # drones 1, 2 at x = -2.1: through the wall on the left
        return env.step(torch.zeros(3, 3, 4))

    _, reward, terminated, _, info = run(2.0)
    assert terminated.tolist() == [False, False, True] and info["hit_wall"].tolist() == [False, False, True]
    assert (info["episode"]["collision_free"] == 0).all() and info["episode"]["hit_wall"].all()
    _, free_reward, free_terminated, _, free_info = run(0.0)  # the same states without walls
    assert not free_terminated.any() and not free_info["hit_wall"].any()
    obstacle_cost = free_reward[..., 1] - reward[..., 1]
    assert torch.allclose(obstacle_cost[0], torch.zeros(3))
    assert obstacle_cost[1, 0] == pytest.approx(0.4 - 0.15, abs=1e-4) and (obstacle_cost[1, 1:] == 0).all()
    assert (obstacle_cost[2, 1:] > 20).all()  # contact: -20 and the -0.4 of the near zone (and the terminal -10)
    with pytest.raises(ValueError, match="spawns across a wall"):
        FormationEnv(FormationConfig.preset("free", num_envs=1, corridor_walls=1.0))


def test_apf_baseline_keeps_off_the_side_walls():
    from common.uav_apf import APFController

    walls = FormationEnv(FormationConfig.preset("free", num_envs=1, corridor_walls=2.0))
    none = FormationEnv(FormationConfig.preset("free", num_envs=1))
    for env in (walls, none):
        env.reset()
        env.p[..., 0] += 0.7  # drone 0 at x = 1.7, 0.3 m from the right wall
    pushed = APFController(walls).desired_acceleration() - APFController(none).desired_acceleration()
    assert pushed[0, 0, 0] < -1.0  # drone 0 is pushed back towards the middle
    env = FormationEnv(FormationConfig.preset("free", num_envs=8, corridor_walls=2.0))
    env.reset()
    ctrl = APFController(env)
    for _ in range(900):
        *_, info = env.step(ctrl.act())
    assert info["episode"]["collision_free"].all()
