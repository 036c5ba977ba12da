"""algos/mappo_uav_formation.py: the attention encoder's mask / order invariance, the stage-1 winner rule, the whole
two-stage pipeline at toy scale with resume, and a short training run that improves the forward return."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mappo_uav_formation", ROOT / "algos" / "mappo_uav_formation.py")
mu = importlib.util.module_from_spec(spec)
sys.modules["mappo_uav_formation"] = mu
spec.loader.exec_module(mu)

from common.uav_formation_env import FormationConfig, FormationEnv  # noqa: E402
from tests.helpers.tensorboard import scalar_values  # noqa: E402

TOY = ["--num-envs", "16", "--num-steps", "16", "--num-minibatches", "4", "--num-candidates", "2",
       "--search-frames", "0.001", "--frames", "0.0005,0.0005,0.0005", "--eval-envs", "8", "--max-steps", "60",
       "--torch-threads", "1"]


def obs_batch(n_envs=4):
    env = FormationEnv(FormationConfig.preset("mixed", num_envs=n_envs, static_mode="tokens"))
    env.reset()
    for b in range(2):
        env.launch_ball(torch.arange(n_envs), b)
    obs, *_ = env.step(env.hover_action())
    return mu.flat_obs(obs)


def test_attention_encoder_ignores_masked_tokens_and_token_order():
    torch.manual_seed(0)
    obs = obs_batch()
    enc = mu.AttentionEncoder({k: obs[k].shape[-1] for k in ("self", "others", "balls", "static")})
    base = enc(obs)
    perm = torch.randperm(obs["static"].shape[1])
    shuffled = {**obs, "static": obs["static"][:, perm], "static_mask": obs["static_mask"][:, perm],
                "balls": obs["balls"].flip(1), "ball_mask": obs["ball_mask"].flip(1)}
    assert torch.allclose(enc(shuffled), base, atol=1e-5)
    junk = {**obs, "static": torch.where(obs["static_mask"][..., None], torch.randn_like(obs["static"]) * 100,
                                         obs["static"])}
    assert torch.allclose(enc(junk), base, atol=1e-5)  # what a mask hides never matters
    assert obs["static_mask"].any() and not obs["ball_mask"].any()  # some columns hidden, both balls in flight
    hidden = {**obs, "ball_mask": obs["ball_mask"].clone()}
    hidden["ball_mask"][:, 1] = True  # the second ball hidden (landed): hiding it changes the encoding ...
    hidden_base = enc(hidden)
    assert not torch.allclose(hidden_base, base, atol=1e-3)
    junk_ball = {**hidden, "balls": hidden["balls"].clone()}
    junk_ball["balls"][:, 1] = torch.randn_like(junk_ball["balls"][:, 1]) * 100
    assert torch.allclose(enc(junk_ball), hidden_base, atol=1e-5)  # ... and what it then holds does not
    visible = ~obs["static_mask"]
    assert visible.any()
    changed = {**obs, "static": obs["static"] + visible[..., None] * 0.5}
    assert not torch.allclose(enc(changed), base, atol=1e-3)


def test_mlp_encoder_tells_an_absent_token_from_a_zero_one():
    """The ablation's MLP sees masked tokens as zeros, so it needs the masks too: without them, `dynamic` (no columns,
    the 9-distance summary masked) looks like a drone touching a column (all 9 distances 0)."""
    torch.manual_seed(0)
    env = FormationEnv(FormationConfig.preset("mixed", num_envs=4))
    obs = mu.flat_obs(env.reset())
    counts = {k: obs[k].shape[-2] if obs[k].dim() == 3 else 1 for k in ("self", "others", "balls", "static")}
    enc = mu.MLPEncoder({k: obs[k].shape[-1] for k in counts}, counts)
    touching = {**obs, "static": torch.zeros_like(obs["static"]), "static_mask": torch.zeros_like(obs["static_mask"])}
    absent = {**obs, "static_mask": torch.ones_like(obs["static_mask"])}
    assert not torch.allclose(enc(touching), enc(absent), atol=1e-4)
    junk = {**absent, "static": torch.randn_like(obs["static"]) * 100}
    assert torch.allclose(enc(junk), enc(absent))  # what a mask hides never matters

def test_stage1_winner_maximises_the_worst_normalised_objective():
    rows = [{"return_formation": 1, "return_obstacle": 0, "return_forward": 5, "return_smoothness": 3,
             "collision_free": 0.9},
            {"return_formation": 0.6, "return_obstacle": 0.5, "return_forward": 4, "return_smoothness": 2,
             "collision_free": 0.5},
            {"return_formation": 0, "return_obstacle": 1, "return_forward": 0, "return_smoothness": 0,
             "collision_free": 1.0}]
    assert mu.pick_winner(rows) == 1
    tie = [dict(rows[1]), {**rows[1], "collision_free": 0.8}]
    assert mu.pick_winner(tie) == 1  # equal objectives: the higher collision-free rate
    assert mu.pick_winner(tie[::-1]) == 0  # wherever it stands


def test_pipeline_at_toy_scale_and_resume(tmp_path):
    cmd = [sys.executable, str(ROOT / "algos" / "mappo_uav_formation.py"), "--run-dir", str(tmp_path), *TOY]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "uav_formation__mappo_uav_formation__1"
    rows = (run_dir / "weights.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("candidate,w_formation") and sum("True" in r for r in rows) == 1
    released = np.random.RandomState(1).rand(20, 4)  # the thu-uav code: np.random.seed(1); np.random.rand(20, 4)
    for row, want in zip(rows[1:], released / released.sum(1, keepdims=True)):
        assert np.allclose([float(x) for x in row.split(",")[1:5]], want), row
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["eval"]) == {"static", "dynamic", "mixed"} and abs(sum(summary["weights"]) - 1) < 1e-6
    for preset, res in summary["eval"].items():
        assert 0 <= res["collision_free"] <= 1 and res["formation_error"] >= 0
        assert (run_dir / f"eval_{preset}.png").stat().st_size > 1000
    # each curriculum period leaves its own checkpoint to branch from (the copy of checkpoint.pt at its end)
    for k, preset in enumerate(("free", "static", "mixed")):
        saved = torch.load(run_dir / f"checkpoint_after_period{k}_{preset}.pt", weights_only=False)
        assert saved["state"]["stage"] == "curriculum" and saved["state"]["period"] == k + 1
        assert saved["state"]["period_iterations"] == 0
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "--resume" in again.stderr
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout and "stage done" in resumed.stdout
    bad = subprocess.run(cmd + ["--weights", "1,2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "four non-negative numbers" in bad.stderr
    other = subprocess.run(cmd + ["--resume", "--encoder", "mlp"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)  # another network than the checkpoint's: said, not a state-dict traceback
    assert other.returncode != 0 and "trained with --encoder attention (given mlp)" in other.stderr, other.stderr[-500:]
    assert torch.load(run_dir / "agent.pt", weights_only=True).keys() == saved["agent"].keys()  # whole, and weights only


def test_column_observation_modes_train_and_evaluate(tmp_path):
    """--static-mode sdf9_diff (the 9 distances re-encoded) and tokens run the whole curriculum and the eval (tokens
    with the released formation reward plus the slot term, --formation-reward release_slot, and the 3 nearest
    columns, --static-top-k 3); a
    bad mode, reward or top-k is refused with the choices."""
    base = [sys.executable, str(ROOT / "algos" / "mappo_uav_formation.py"), "--run-dir", str(tmp_path), *TOY,
            "--weights", "paper", "--plot-episodes", "0"]
    for mode, reward, top_k in (("sdf9_diff", "simple", 0), ("tokens", "release_slot", 3)):
        out = subprocess.run(base + ["--static-mode", mode, "--formation-reward", reward, "--static-top-k", str(top_k),
                                     "--exp-name", mode], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((tmp_path / f"uav_formation__{mode}__1" / "summary.json").read_text())
        assert summary["args"]["static_mode"] == mode and summary["args"]["formation_reward"] == reward
        assert summary["args"]["static_top_k"] == top_k
        assert set(summary["eval"]) == {"static", "dynamic", "mixed"}
        # the flags reach the env the script builds (a summary repeats its args whether or not they did)
        env_cfg = mu.make_env(mu.Args(static_mode=mode, formation_reward=reward, static_top_k=top_k), "mixed", 2, 0,
                              "cpu").cfg
        assert (env_cfg.static_mode, env_cfg.formation_reward, env_cfg.static_top_k) == (mode, reward, top_k)
    bad = subprocess.run(base + ["--static-mode", "sdf9_grad"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "sdf9_diff" in bad.stderr
    bad = subprocess.run(base + ["--formation-reward", "laplacian"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "release" in bad.stderr
    bad = subprocess.run(base + ["--static-top-k", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "static_top_k" in bad.stderr  # sdf9 has no column tokens to keep


def test_short_training_improves_the_forward_return(tmp_path):
    torch.manual_seed(0)
    args = mu.Args(num_envs=64, num_steps=32, num_minibatches=4, max_steps=100, dynamics="pointmass",
                   eval_envs=32, torch_threads=1)
    device = torch.device("cpu")
    ref_obs = mu.make_env(args, "mixed", 2, 0, device).reset()
    agent = mu.Agent(args, mu.flat_obs(ref_obs), ref_obs["state"].shape[-1], 3)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    vnorm = mu.ValueNorm(args.value_norm_beta)
    weights = (0.1, 0.1, 0.7, 0.1)
    before = mu.evaluate(mu.policy_actions(agent), args, "free", weights, ref_obs, device, seed=5)
    from torch.utils.tensorboard import SummaryWriter

    mu.train(args, agent, optimizer, vnorm, weights, "free", 0.1, ref_obs, device, SummaryWriter(str(tmp_path)),
             "free", {"global_step": 0, "iterations": 0})
    after = mu.evaluate(mu.policy_actions(agent), args, "free", weights, ref_obs, device, seed=5)
    # (seed 0: 483 -> 1889, arrival 0 -> 1): the untrained policy hovers, the trained one flies to the goal
    assert after["return_forward"] > 2 * before["return_forward"] and before["arrival"] == 0, (before, after)
    assert after["arrival"] >= 0.9, (before, after)


def test_a_period_resumed_from_a_mid_period_checkpoint_runs_only_what_is_left(tmp_path):
    """kill -9 right after the iteration-20 checkpoint of a 25-iteration period: the resumed period runs the last 5
    iterations, so the run trains its budget, not 20 iterations more."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    args = mu.Args(num_envs=8, num_steps=4, num_minibatches=1, update_epochs=1, max_steps=50, dynamics="pointmass",
                   torch_threads=1)
    device = torch.device("cpu")
    ref_obs = mu.make_env(args, "mixed", 2, 0, device).reset()
    agent = mu.Agent(args, mu.flat_obs(ref_obs), ref_obs["state"].shape[-1], 3)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    vnorm = mu.ValueNorm(args.value_norm_beta)
    frames = 25 * 8 * 4 / 1e6
    state = {"global_step": 0, "iterations": 0, "period_iterations": 0}
    checkpoint = {}

    class Killed(Exception):
        pass

    def save_then_die():
        checkpoint.update(json.loads(json.dumps(state)))
        raise Killed

    writer = SummaryWriter(str(tmp_path))
    try:
        mu.train(args, agent, optimizer, vnorm, mu.PAPER_WEIGHTS, "free", frames, ref_obs, device, writer, "p", state,
                 save_fn=save_then_die)
    except Killed:
        pass
    assert checkpoint == {"global_step": 20 * 32, "iterations": 20, "period_iterations": 20}
    state = dict(checkpoint)
    mu.train(args, agent, optimizer, vnorm, mu.PAPER_WEIGHTS, "free", frames, ref_obs, device, writer, "p", state,
             save_fn=lambda: None)
    assert state == {"global_step": 25 * 32, "iterations": 25, "period_iterations": 25}


def test_bad_flags_fail_before_training_and_plots_can_be_off(tmp_path):
    import pytest

    for flag, said in ((dict(num_envs=0), "--num-envs must be >= 1"), (dict(eval_envs=0), "--eval-envs"),
                       (dict(eval_presets="static,stati"), "--eval-presets takes names"),
                       (dict(plot_episodes=-1), "--plot-episodes must be >= 0"),
                       (dict(num_drones=1), "--num-drones must be >= 2"), (dict(gate_rate=0.0), "--gate-rate"),
                       (dict(corridor_walls=-1.0), "corridor_walls is a half-width"),
                       (dict(corridor_walls=0.9), "spawns across a wall"),
                       (dict(num_envs=2, num_steps=2), "--num-minibatches 16 exceeds the batch"),
                       (dict(attention_dim=0), "--attention-dim must be >= 1"),
                       (dict(learning_rate=-1e-4), "--learning-rate must be > 0"),
                       (dict(learning_rate=float("nan")), "--learning-rate must be > 0"),
                       (dict(lr_decay=1.5), "--lr-decay must be in"), (dict(gamma=1.2), "--gamma must be in"),
                       (dict(gae_lambda=-0.1), "--gae-lambda"), (dict(clip_coef=0.0), "--clip-coef"),
                       (dict(ent_coef=-0.01), "--ent-coef"), (dict(huber_delta=0.0), "--huber-delta"),
                       (dict(max_grad_norm=-1.0), "--max-grad-norm"), (dict(value_norm_beta=1.0), "--value-norm-beta")):
        with pytest.raises(SystemExit, match=said):
            mu.main(mu.Args(run_dir=str(tmp_path / "bad"), **flag))
        assert not (tmp_path / "bad").exists()  # refused before a run directory exists
    cmd = [sys.executable, str(ROOT / "algos" / "mappo_uav_formation.py"), "--run-dir", str(tmp_path), *TOY,
           "--weights", "paper", "--eval-presets", "static", "--plot-episodes", "0", "--corridor-walls", "2.0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "uav_formation__mappo_uav_formation__1"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["eval"]) == {"static"} and summary["args"]["corridor_walls"] == 2.0
    assert not list(run_dir.glob("eval_*.png"))


def test_eval_plots_draw_the_columns_each_episode_flew_through(monkeypatch, tmp_path):
    """An env whose episode ends is reset with a new layout: the plot must show the first episode's columns."""
    args = mu.Args(eval_envs=4, plot_episodes=2, max_steps=60)
    ref_obs = mu.make_env(args, "mixed", 2, 0, "cpu").reset()
    made, drawn = [], {}
    real_make_env = mu.make_env
    monkeypatch.setattr(mu, "make_env", lambda *a, **k: made.append(real_make_env(*a, **k)) or made[-1])
    monkeypatch.setattr(mu, "plot_tracks",
                        lambda track, columns, radius, path, title, walls=0.0: drawn.update(columns=columns))
    fall = lambda env, obs: torch.full((env.E, env.N, 4), -5.0)  # no thrust: every episode crashes early  # noqa: E731
    res = mu.evaluate(fall, args, "static", mu.PAPER_WEIGHTS, ref_obs, "cpu", seed=7, plot_path=tmp_path / "p.png")
    assert res["collision_free"] == 0.0
    assert res["crash"] == 1.0 and res["hit_column"] == res["too_close"] == res["hit_wall"] == 0.0  # what ended them
    first = real_make_env(args, "static", 4, 7, "cpu")
    first.reset()
    assert torch.equal(drawn["columns"], first.columns[:2])
    assert not torch.equal(made[0].columns[:2], first.columns[:2])  # the env itself has moved on to new layouts


def test_evaluation_says_what_ended_the_episodes():
    """The share of episodes each event ended: a formation flown sideways into a wall, then one that hovers."""
    args = mu.Args(eval_envs=4, max_steps=60, dynamics="pointmass", corridor_walls=2.0)
    ref_obs = mu.make_env(args, "mixed", 2, 0, "cpu").reset()
    sideways = torch.tensor([5.0, 0.0, 0.0, 0.0])  # pointmass: +3 m/s in x
    res = mu.evaluate(lambda env, obs: sideways.expand(env.E, env.N, 4), args, "free", mu.PAPER_WEIGHTS, ref_obs,
                      "cpu", seed=3)
    assert res["collision_free"] == 0.0 and res["hit_wall"] == 1.0
    assert res["crash"] == res["too_close"] == res["hit_column"] == res["hit_ball"] == 0.0
    res = mu.evaluate(lambda env, obs: torch.zeros(env.E, env.N, 4), args, "free", mu.PAPER_WEIGHTS, ref_obs, "cpu",
                      seed=3)
    assert res["collision_free"] == 1.0 and all(res[c] == 0.0 for c in mu.END_CAUSES)


def test_each_curriculum_period_restarts_the_learning_rate_and_a_zero_budget_skips_it(tmp_path):
    """The paper trains each period as a new run from the last checkpoint: its lr decay starts again at 5e-4
    (--no-lr-restart: one decay across the curriculum). A period given 0 env steps trains nothing."""
    base = [sys.executable, str(ROOT / "algos" / "mappo_uav_formation.py"), "--run-dir", str(tmp_path), *TOY,
            "--weights", "paper", "--plot-episodes", "0", "--eval-presets", "free", "--dynamics", "pointmass",
            "--frames", "0.0005,0,0.001"]  # 256 env steps per iteration: 1, 0 and 3 iterations
    decay = mu.Args().lr_decay
    for flag, name in (([], "restart"), (["--no-lr-restart"], "continuous")):
        out = subprocess.run(base + flag + ["--exp-name", name], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "period 1 (static): no budget, skipped" in out.stdout
        lrs = scalar_values(tmp_path / f"uav_formation__{name}__1", "charts/learning_rate")
        assert len(lrs) == 4  # logged after each iteration's decay
        steps = [1, 1, 2, 3] if name == "restart" else [1, 2, 3, 4]
        assert np.allclose(lrs, [5e-4 * decay ** k for k in steps], rtol=1e-6), (name, lrs)


def test_a_resume_mid_period_keeps_the_decayed_learning_rate(monkeypatch, tmp_path):
    """Killed right after a mid-period checkpoint (global iteration 20 = the 19th of the mixed period), the resumed
    run goes on from lr x 0.9985^19, not from a restarted 5e-4 (only a new period restarts it)."""
    args = dict(run_dir=str(tmp_path), weights="paper", num_envs=16, num_steps=16, num_minibatches=4,
                frames="0.0005,0,0.0064", eval_envs=4, eval_presets="free", max_steps=60, torch_threads=1,
                plot_episodes=0, dynamics="pointmass", cuda=False)  # 1 free and 25 mixed iterations

    class Killed(Exception):
        pass

    real_train = mu.train

    def train_then_die(*a, save_fn=None, **k):
        def save_and_die():
            save_fn()
            if a[10].startswith("period2"):  # (the tag)
                raise Killed
        return real_train(*a, save_fn=save_and_die if save_fn else None, **k)

    monkeypatch.setattr(mu, "train", train_then_die)
    try:
        mu.main(mu.Args(**args))
    except Killed:
        pass
    monkeypatch.setattr(mu, "train", real_train)
    run_dir = tmp_path / "uav_formation__mappo_uav_formation__1"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["period_iterations"] == 19
    mu.main(mu.Args(**args, resume=True))
    lrs = scalar_values(run_dir, "charts/learning_rate")  # both sittings' logs: 1 + 19, then the last 6
    decay = mu.Args().lr_decay
    assert np.allclose(lrs[-6:], [5e-4 * decay ** k for k in range(20, 26)], rtol=1e-6), lrs[-6:]


def test_actor_and_critic_parameters_split_the_agent_for_their_own_clips():
    ref_obs = mu.make_env(mu.Args(), "mixed", 2, 0, "cpu").reset()
    for encoder in ("attention", "mlp"):
        for critic in ("obs", "state"):
            agent = mu.Agent(mu.Args(encoder=encoder, critic=critic), mu.flat_obs(ref_obs),
                             ref_obs["state"].shape[-1], 3)
            actor, crit = [id(p) for p in agent.actor_parameters()], [id(p) for p in agent.critic_parameters()]
            assert len(set(actor)) == len(actor) and len(set(crit)) == len(crit)  # none clipped twice over
            assert not set(actor) & set(crit) and set(actor) | set(crit) == {id(p) for p in agent.parameters()}


@pytest.mark.parametrize("centre", ["rollout", "renormalised"])
def test_the_value_clip_centres_on_the_critics_rollout_output(monkeypatch, tmp_path, centre):
    """MAPPO clips the new value around the critic's output stored at rollout time. With a clip of 0 the clipped value
    is that centre, and at the first minibatch the critic is unchanged, so it equals the value itself, sample for
    sample; a centre re-expressed in the statistics updated after the rollout (the code before 2026-12-07) or taken
    in another order is not. `--value-clip-centre renormalised` is that earlier centre: the value's denormalised
    rollout output normalised again with the statistics just updated."""
    import copy

    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    args = mu.Args(num_envs=8, num_steps=8, num_minibatches=2, update_epochs=1, max_steps=50, dynamics="pointmass",
                   torch_threads=1, clip_coef=0.0, value_clip_centre=centre)
    ref_obs = mu.make_env(args, "mixed", 2, 0, "cpu").reset()
    agent = mu.Agent(args, mu.flat_obs(ref_obs), ref_obs["state"].shape[-1], 3)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    vnorm = mu.ValueNorm(args.value_norm_beta)
    vnorm.update(torch.full((4,), 50.0))  # statistics far from this rollout's returns: the update moves them
    before = copy.deepcopy(vnorm)
    seen, real_huber = [], mu.F.huber_loss
    monkeypatch.setattr(mu.F, "huber_loss", lambda x, y, **k: seen.append(x.detach().clone()) or real_huber(x, y, **k))
    mu.train(args, agent, optimizer, vnorm, mu.PAPER_WEIGHTS, "free", 64 / 1e6, ref_obs, "cpu",
             SummaryWriter(str(tmp_path)), "p", {"global_step": 0, "iterations": 0})
    value, clipped = seen[0], seen[1]  # the first minibatch: huber(v, ret), then huber(v_clip, ret)
    assert value.std() > 1e-3
    if centre == "rollout":
        assert torch.allclose(value, clipped, atol=1e-6)
    else:  # one iteration ran: `vnorm` holds the statistics updated once after the rollout
        assert not torch.allclose(value, clipped, atol=1e-3)
        assert torch.allclose(clipped, vnorm.normalize(before.denormalize(value)), atol=1e-4)


def test_stage1_compares_every_candidate_on_the_same_episodes(monkeypatch, tmp_path):
    seeds = []

    def fake_evaluate(act, args, preset, weights, ref_obs, device, seed, plot_path=None):
        seeds.append((preset, seed))
        return {"collision_free": 1.0, "formation_error": 0.1, "arrival": 1.0, "success": 1.0,
                **{f"return_{o}": float(np.random.rand()) for o in mu.OBJECTIVES}}

    monkeypatch.setattr(mu, "train", lambda *a, **k: {"collision_free": 1.0, "formation_error": 0.1})
    monkeypatch.setattr(mu, "evaluate", fake_evaluate)
    mu.main(mu.Args(run_dir=str(tmp_path), num_candidates=3, num_envs=4, plot_episodes=0, torch_threads=1,
                    cuda=False, eval_presets="static"))
    search = [s for p, s in seeds if p == "free_ball"]
    assert len(search) == 3 and len(set(search)) == 1
    assert ("static", 20_000) in seeds
