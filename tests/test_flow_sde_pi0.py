"""algos/flow_sde_pi0.py: the Flow-SDE math and RLinf's behaviours (pirl.md §8), and short runs of the script."""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.pi0 import Pi0Config, Pi0Model, gaussian_log_prob
from tests.helpers.tensorboard import all_scalars
from tests.helpers.cli import assert_each_refused

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("flow_sde_pi0", ROOT / "algos" / "flow_sde_pi0.py")
fs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fs)


def test_sigma_schedule_edge_case_and_first_step_std():
    sig = fs.sde_sigmas(4, 0.5)
    assert sig.shape == (4,) and sig[0].item() == pytest.approx(1.0)  # a*sqrt(K) at t = 1
    ts = Pi0Model.timesteps(4)
    assert torch.allclose(sig[1:], 0.5 * torch.sqrt(ts[1:4] / (1 - ts[1:4])))
    _, std = fs.sde_transition(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), ts[0], ts[0] - ts[1], sig[0])
    assert torch.allclose(std, torch.full_like(std, 0.5))  # K = 4, a = 0.5: first-step std 0.5


def test_zero_noise_sde_is_the_euler_ode_step():
    x, v = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mean, std = fs.sde_transition(x, v, torch.tensor(0.75), torch.tensor(0.25), torch.tensor(0.0))
    assert torch.allclose(mean, x - 0.25 * v, atol=1e-6) and (std == 0).all()


def gaussian_velocity(x, t, m, s):
    """Exact flow velocity E[noise - a | x_t = x] for data a ~ N(m, s^2), x_t = t*noise + (1-t)*a."""
    cov = t - (1 - t) * s ** 2
    var = t ** 2 + (1 - t) ** 2 * s ** 2
    return -m + cov / var * (x - (1 - t) * m)


def test_sde_preserves_the_ode_marginals_on_a_toy_field():
    torch.manual_seed(0)
    m, s, K, n = 1.5, 0.3, 200, 200_000
    sig = fs.sde_sigmas(K, 0.5)
    ts = Pi0Model.timesteps(K)
    x = torch.randn(n, dtype=torch.float64)
    for i in range(K):
        t, d = ts[i].double(), (ts[i] - ts[i + 1]).double()
        mean, std = fs.sde_transition(x, gaussian_velocity(x, t, m, s), t, d, sig[i].double())
        x = mean + std * torch.randn(n, dtype=torch.float64)
        if i + 1 in (K // 4, K // 2):  # the marginal at t must be the flow's: N((1-t) m, t^2 + (1-t)^2 s^2)
            tn = float(ts[i + 1])
            assert x.mean().item() == pytest.approx((1 - tn) * m, abs=0.02)
            assert x.std().item() == pytest.approx((tn ** 2 + (1 - tn) ** 2 * s ** 2) ** 0.5, rel=0.03)
    assert x.mean().item() == pytest.approx(m, abs=0.02) and x.std().item() == pytest.approx(s, rel=0.05)


def tiny_policy():
    torch.manual_seed(0)
    cfg = Pi0Config.tiny(num_cameras=0)
    model = Pi0Model(cfg).eval()
    tokens = torch.randint(4, cfg.vocab, (6, cfg.max_tokens))
    prefix = model.encode_prefix(torch.zeros(6, 0, 64, 64, 3, dtype=torch.uint8), torch.zeros(6, 0, dtype=torch.bool),
                                 tokens, torch.ones_like(tokens, dtype=torch.bool))
    return model, prefix, torch.randn(6, cfg.action_dim), torch.randn(6, cfg.horizon, cfg.action_dim)


def test_one_shared_stochastic_step_and_its_log_prob_recomputes_exactly():
    model, prefix, state, noise = tiny_policy()
    K, sig = 4, fs.sde_sigmas(4, 0.5)
    draws = [fs.draw_stochastic_steps(random.Random(7), K, False, False) for _ in range(2)]
    assert draws[0] == draws[1] and len(draws[0]) == 1  # seedable, one step per call
    rng = random.Random(0)
    seen = {next(iter(fs.draw_stochastic_steps(rng, K, False, True))) for _ in range(200)}
    assert seen == {0, 1, 2}  # ignore_last: {0..K-2}
    seen = {next(iter(fs.draw_stochastic_steps(rng, K, False, False, [0, 2]))) for _ in range(200)}
    assert seen == {0, 2}  # --sde-steps 0,2
    stochastic = {2}
    with torch.no_grad():
        out = model.sample(prefix, state, noise, K, fs.make_step_fn(stochastic, sig))
        logp, last = fs.chain_log_prob(out, stochastic, K, joint=False)
    assert (out.stds[:, 2] > 0).all() and (out.stds[:, [0, 1, 3]] == 0).all()  # shared by all 6 samples
    assert torch.equal(last, torch.zeros_like(logp))  # not the last step: no share of it to leave out
    k = torch.full((6,), 2)
    with torch.no_grad():
        again, again_last, _ = fs.recompute_log_prob(model, prefix, state, out.chain, k, sig, joint=False)
    assert torch.allclose(again, logp, atol=1e-5) and torch.equal(again_last, last)  # PPO's first ratio is 1


def test_chain_from_x1_remakes_the_sde_input_and_sees_early_weight_changes():
    """--chain-from-x1: the SDE step's input is re-made from x_1 by the ODE steps under the current weights. Same
    weights: the stored chain's log-prob (ratio 1), for every step k, mixed in one batch. Other weights: a log-prob
    that differs from the stored-input one, and is the exact density of the last step's sample given x_1."""
    model, prefix, state, noise = tiny_policy()
    K, sig = 4, fs.sde_sigmas(4, 0.5)
    ks = torch.arange(6) % K  # rows 0..5 took their SDE step at k = 0, 1, 2, 3, 0, 1
    with torch.no_grad():
        outs = [model.sample(prefix, state, noise, K, fs.make_step_fn({k}, sig)) for k in range(K)]
        rows = torch.arange(6)
        chain = torch.stack([outs[k].chain[j] for j, k in enumerate(ks.tolist())])
        logp = torch.stack([fs.chain_log_prob(outs[k], {k}, K, False)[0][j] for j, k in enumerate(ks.tolist())])
        last = torch.stack([fs.chain_log_prob(outs[k], {k}, K, False)[1][j] for j, k in enumerate(ks.tolist())])
        assert torch.equal(last[ks == K - 1], logp[ks == K - 1]) and not last[ks < K - 1].any()
        again, again_last, _ = fs.recompute_log_prob(model, prefix, state, chain, ks, sig, joint=False, from_x1=True)
        assert torch.allclose(again, logp, atol=1e-5) and torch.allclose(again_last, last, atol=1e-5)
        for p in model.parameters():  # other weights
            p.add_(0.01 * torch.randn_like(p))
        stored = fs.recompute_log_prob(model, prefix, state, chain, ks, sig, joint=False)[0]
        remade = fs.recompute_log_prob(model, prefix, state, chain, ks, sig, joint=False, from_x1=True)[0]
        assert torch.equal(stored[ks == 0], remade[ks == 0])  # k = 0: x_1 is the input either way
        for j in rows[ks > 0].tolist():
            assert not torch.allclose(stored[j], remade[j], atol=1e-4)
        last = model.sample(prefix, state, noise, K, fs.make_step_fn(set(), sig)).chain[:, K - 1]  # ODE to x_{K-1}
        mean, std = fs.sde_transition(last, model.velocity(prefix, state, last, Pi0Model.timesteps(K)[K - 1])[0],
                                      Pi0Model.timesteps(K)[K - 1], Pi0Model.timesteps(K)[K - 1], sig[K - 1])
        exact = gaussian_log_prob(chain[3, K], mean[3], std[3])  # row 3: k = K - 1
        assert torch.allclose(remade[3], exact, atol=1e-5)


def test_obs_ode_critic_reads_the_ode_chunk_of_the_same_noise_not_the_sde_draw():
    model, prefix, state, noise = tiny_policy()
    K, sig = 4, fs.sde_sigmas(4, 0.5)
    with torch.no_grad():
        ode = model.sample(prefix, state, noise, K, fs.make_step_fn(set(), sig))
        sde = model.sample(prefix, state, noise, K, fs.make_step_fn({1}, sig))
        assert not torch.allclose(sde.actions, ode.actions)  # the SDE draw moved the actions
        for stochastic in ({0}, {1}, {3}, {0, 1, 2, 3}):  # one SDE step, or all (--joint)
            sde = model.sample(prefix, state, noise, K, fs.make_step_fn(stochastic, sig))
            assert torch.equal(fs.ode_chunk(model, prefix, state, K, sde, stochastic), ode.actions)
        assert fs.ode_chunk(model, prefix, state, K, ode, set()) is ode.actions  # no second pass
        other = model.sample(prefix, state, torch.randn_like(noise), K, fs.make_step_fn({1}, sig))
        assert not torch.allclose(fs.ode_chunk(model, prefix, state, K, other, {1}), ode.actions)  # it reads x_1


def test_joint_log_prob_is_the_mean_over_k_plus_1_terms():
    model, prefix, state, noise = tiny_policy()
    K, sig = 4, fs.sde_sigmas(4, 0.5)
    stochastic = fs.draw_stochastic_steps(random.Random(0), K, True, False)
    with torch.no_grad():
        out = model.sample(prefix, state, noise, K, fs.make_step_fn(stochastic, sig))
        logp, last = fs.chain_log_prob(out, stochastic, K, joint=True)
        total = fs.gaussian_log_prob(out.chain[:, 0], torch.zeros_like(noise), torch.ones_like(noise))
        for i in range(K):
            total = total + fs.gaussian_log_prob(out.chain[:, i + 1], out.means[:, i], out.stds[:, i])
        again, again_last, hidden = fs.recompute_log_prob(model, prefix, state, out.chain, torch.full((6,), -1), sig,
                                                          joint=True)
    assert torch.allclose(logp, total / (K + 1), atol=1e-5) and torch.allclose(again, logp, atol=1e-5)
    final = fs.gaussian_log_prob(out.chain[:, K], out.means[:, K - 1], out.stds[:, K - 1]) / (K + 1)
    assert torch.allclose(last, final, atol=1e-6) and torch.allclose(again_last, last, atol=1e-5)
    assert hidden.shape[1] == K


def test_expert_value_is_averaged_over_steps_and_no_dual_clip():
    head = fs.ValueHead(8, (16,))
    hidden = torch.randn(3, 4, 5, 8)
    per_step = head(hidden.mean(2))
    assert torch.allclose(fs.expert_value(head, hidden, True), per_step.mean(1))
    # A < 0 with a large ratio: the plain clipped surrogate, not RLinf's dual clip at 3.0
    logratio, adv = torch.log(torch.tensor([[10.0]])), torch.tensor([[-1.0]])
    assert fs.actor_loss(logratio, adv, 0.2, torch.ones(1, 1)).item() == pytest.approx(10.0)
    assert not hasattr(fs.Args, "clip_ratio_c") and not hasattr(fs.Args, "double_layer")


def test_actions_never_executed_stay_out_of_the_ppo_loss():
    # token log-probs: 2 samples x 3 elements; sample 0 ran only its first element (its episode ended mid-chunk)
    # (the unexecuted entries inside the clip range, where they would get a gradient if the loss counted them)
    logratio = torch.tensor([[0.1, 0.05, -0.05], [0.1, 0.1, 0.1]], requires_grad=True)
    executed = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[1.0], [1.0]])
    loss = fs.actor_loss(logratio, adv, 0.2, executed)
    loss.backward()
    # the mean runs over the 4 executed elements; the unexecuted ones get no gradient
    assert loss.item() == pytest.approx(-4 * torch.tensor(0.1).exp().item() / 4)
    assert logratio.grad[0, 1] == 0 and logratio.grad[0, 2] == 0 and logratio.grad[0, 0] != 0


def test_an_action_cut_by_the_episode_end_keeps_its_earlier_draws_in_the_ratio():
    """Sample 0's episode ended after its first action. Its second element's SDE draw came at an earlier step, and
    moved the executed element through the later steps: its term stays in the ratio and gets a gradient. Its third
    element's term is a last transition's (it moved nothing but that element): left out, no gradient, weight 0
    where that is all the sample has (the SDE step was the last)."""
    old_logp, old_last = torch.zeros(2, 3), torch.zeros(2, 3)
    executed = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    theta = torch.zeros(2, requires_grad=True)  # moves sample 0's element 1 (earlier share), element 2 (last share)
    shift = torch.zeros(2, 3).index_put((torch.tensor([0]), torch.tensor([1])), theta[0]) \
        .index_put((torch.tensor([0]), torch.tensor([2])), theta[1])
    last_shift = torch.zeros(2, 3).index_put((torch.tensor([0]), torch.tensor([2])), theta[1])
    new_logp, new_last = old_logp + 0.1 + shift, old_last + last_shift
    logratio, weights = fs.cut_chunk_log_ratio(new_logp, new_last, old_logp, old_last, executed, torch.ones(2, 1))
    assert torch.equal(weights, torch.ones(2, 3))
    fs.actor_loss(logratio, torch.ones(2, 1), 0.2, weights).backward()
    assert theta.grad[0] != 0 and theta.grad[1] == 0
    _, weights = fs.cut_chunk_log_ratio(new_logp, new_last, old_logp, old_last, executed, torch.zeros(2, 1))
    assert torch.equal(weights, executed)  # the SDE step was the last: the cut actions have no term left


def run(args, tmp_path, timeout=600):
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_sde_pi0.py"), "--run-dir", str(tmp_path), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("critic,ref_coef", [("obs", "0"), ("obs_ode", "5")])
def test_few_iterations_on_maniskill_with_exact_first_ratio(tmp_path, critic, ref_coef):
    out = run(["--env", "maniskill", "--init", "scratch", "--num-envs", "2", "--num-steps", "4", "--total-iterations",
               "2", "--eval-episodes", "2", "--num-eval-envs", "1", "--eval-every", "2", "--minibatch-size", "4",
               "--max-episode-steps", "20", "--critic", critic, "--ref-coef", ref_coef, "--probe-every", "1"],
              tmp_path)
    run_dir = tmp_path / "PushCube-v1__flow_sde_pi0__1"
    summary = json.loads((run_dir / "summary.json").read_text())
    # 20-step episodes end in the middle of their third 8-action chunk: per env 8 + 8 + 4, 8 + 8 + 4, 8 + 8 steps
    assert [h["iteration"] for h in summary["history"]] == [0, 2] and summary["env_steps"] == 2 * 56
    logs = all_scalars(run_dir)
    # float32 rounding of a log-prob summed over the chunk's 64 entries, batched differently: ~1e-5 (a wrong chain
    # or step gives errors of order 1)
    assert all(v < 1e-4 for v in logs["losses/first_ratio_error"])
    # auto-reset (GAE) rollouts: every chunk step trains, also those where an episode ended (mid-chunk: the actions
    # that never ran keep only their draws before the last transition, which the first ratio checks above too)
    assert logs["charts/train_samples"] == [2 * 4, 2 * 4]
    # the eval policy's actions: unmoved by the first update (actor lr 0 at warm-up step 0), moved by the second
    change = logs["losses/ode_action_change"]
    assert change[0] == 0 and change[1] > 0
    if ref_coef != "0":  # the reference is the loaded policy: no distance before the actor first moves, some after
        penalty = logs["losses/ref_penalty"]
        assert penalty[0] == 0 and penalty[1] > 0
    assert len(logs["losses/explained_variance"]) == 2
    assert "eval success" in out.stdout


def test_resume_goes_on_where_the_run_stopped(tmp_path):
    """GRPO on ManiSkill: 1 iteration, then --resume to 2. The resumed run continues the initial-state draws (env and
    groups), the training clock and the simulator's clock instead of starting them over."""
    flags = ["--env", "maniskill", "--init", "scratch", "--num-envs", "2", "--group-size", "2", "--adv-type", "grpo",
             "--eval-episodes", "1", "--num-eval-envs", "1", "--max-episode-steps", "16", "--minibatch-size", "4",
             "--checkpoint-every", "1", "--no-capture-video"]
    run([*flags, "--total-iterations", "1"], tmp_path)
    run_dir = tmp_path / "PushCube-v1__flow_sde_pi0__1"
    first = json.loads((run_dir / "summary.json").read_text())
    trainer = torch.load(next(run_dir.glob("**/trainer.pt")), weights_only=True)
    draws = json.loads(trainer["draws"])
    assert draws["np"][2] != 624  # the GRPO group draw advanced (np.random left its freshly seeded position)
    out = run([*flags, "--total-iterations", "2", "--resume"], tmp_path)
    assert "resuming" in out.stdout and "at iteration 1" in out.stdout
    second = json.loads((run_dir / "summary.json").read_text())
    assert [h["iteration"] for h in second["history"]] == [0, 1, 2]
    # the resumed run's first reset drew its initial states from where the run's draw stopped (reseeded, it replayed
    # iteration 0's and left the draw where the checkpoint had it)
    resumed = json.loads(torch.load(run_dir / "checkpoint" / "trainer.pt", weights_only=True)["draws"])
    assert resumed["env"] != draws["env"]
    assert second["env_steps"] > first["env_steps"] and second["minutes"] >= first["minutes"]
    # the simulator's seconds (inside envs.step) go on from the checkpoint's too, and are part of the training clock
    assert 0 < first["sim_seconds"] < second["sim_seconds"] <= second["minutes"] * 60
    # a checkpoint from before the scripts counted them: the resumed run does not report a simulator time it lacks
    config = run_dir / "checkpoint" / "pi0_config.json"
    meta = json.loads(config.read_text())
    del meta["extra"]["sim_seconds"]
    config.write_text(json.dumps(meta))
    run([*flags, "--total-iterations", "3", "--resume"], tmp_path)
    third = json.loads((run_dir / "summary.json").read_text())
    assert third["env_steps"] > second["env_steps"] and third["sim_seconds"] is None
    # a torn trainer.pt: a clear refusal naming the file, not torch's unpickling advice
    trainer_pt = run_dir / "checkpoint" / "trainer.pt"
    trainer_pt.write_bytes(trainer_pt.read_bytes()[:100])
    torn = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_sde_pi0.py"), "--run-dir", str(tmp_path), *flags,
                           "--total-iterations", "4", "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert torn.returncode != 0 and "trainer.pt is not a torch file" in torn.stderr, torn.stderr[-2000:]
    assert "Traceback" not in torn.stderr


def test_few_iterations_on_libero_grpo_with_images(tmp_path):
    """On a two-task subset of LIBERO-Object (each env prompted with its own task), evaluated on init states 0, 0 of
    tasks 0, 3."""
    out = run(["--env", "libero", "--task", "libero_object/0,3", "--init", "scratch", "--num-envs", "2",
               "--group-size", "2", "--adv-type", "grpo", "--total-iterations", "1", "--eval-episodes", "2",
               "--num-eval-envs", "2", "--max-episode-steps", "16", "--minibatch-size", "4", "--image-size", "32",
               "--no-capture-video"], tmp_path)
    summary = json.loads((tmp_path / "libero_object_0,3__flow_sde_pi0__1" / "summary.json").read_text())
    assert summary["env"] == "libero" and len(summary["history"]) == 2
    assert [h["episodes"] for h in summary["history"]] == [2, 2]
    assert "kept for the update" in out.stdout  # a frozen VLM with cameras: the rollout's prefixes are reused


def test_kept_rollout_prefixes_give_the_update_of_re_encoded_ones(tmp_path):
    """With cameras and a frozen VLM the update reads the prefixes the rollout computed instead of encoding the
    images again (5x faster updates on LIBERO's CPU defaults): the same losses, to float rounding, as re-encoding."""
    logs = {}
    for gib in ("4", "0"):
        out = run(["--env", "maniskill", "--obs-mode", "rgb", "--init", "scratch", "--num-envs", "2", "--num-steps",
                   "3", "--total-iterations", "2", "--eval-episodes", "1", "--num-eval-envs", "1", "--eval-every", "2",
                   "--minibatch-size", "3", "--max-episode-steps", "24", "--critic", "obs_ode", "--ref-coef", "5",
                   "--keep-prefix-gib", gib, "--no-capture-video", "--exp-name", f"keep{gib}", "--probe-every",
                   "1"], tmp_path)
        assert ("kept for the update" in out.stdout) == (gib != "0")
        logged = all_scalars(tmp_path / f"PushCube-v1__keep{gib}__1")
        logs[gib] = {tag: logged[tag] for tag in
                     ("losses/policy_loss", "losses/value_loss", "losses/ref_penalty", "losses/ode_action_change")}
    for tag, kept in logs["4"].items():
        assert kept[1] != 0 or tag == "losses/policy_loss", tag  # the second update moved something
        assert torch.allclose(torch.tensor(kept), torch.tensor(logs["0"][tag]), rtol=1e-4, atol=1e-7), \
            (tag, kept, logs["0"][tag])


def test_a_start_whose_prompt_merges_two_tasks_is_refused(tmp_path):
    """libero_spatial's tasks 1 and 6 share their first 31 bytes: a 32-token model would train them as one prompt."""
    from common.pi0_io import make_tokenizer, save_pi0

    save_pi0(tmp_path / "short", Pi0Model(Pi0Config.tiny()), None, make_tokenizer(None).name)
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_sde_pi0.py"), "--run-dir", str(tmp_path / "runs"),
                          "--env", "libero", "--task", "libero_spatial/1,6", "--init", f"sft:{tmp_path / 'short'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "cuts the instructions of different tasks" in out.stderr, out.stderr[-1000:]
    assert "python algos/sft_pi0.py --env libero --task libero_spatial/1,6" in out.stderr


def test_bad_flags_are_refused(tmp_path):
    cases = [(["--env", "gym"], "--env"), (["--init", "foo"], "--init"), (["--bootstrap", "x"], "--bootstrap"),
             (["--adv-type", "grpo", "--num-envs", "3"], "multiple"), (["--sde-steps", "0,7"], "--sde-steps"),
             (["--sde-steps", "0", "--joint"], "--sde-steps"), (["--sde-steps", "first"], "--sde-steps"),
             (["--env", "libero", "--eval-episodes", "50"], "init states 0..24"),
             (["--chain-from-x1", "--joint"], "--chain-from-x1"), (["--ref-coef", "-1"], "--ref-coef"),
             (["--eval-every", "0"], "--eval-every"), (["--ema-decay", "-0.1"], "--ema-decay"),
             (["--probe-every", "-1"], "--probe-every"), (["--sft-expert", "big"], "--sft-expert"),
             (["--env", "libero", "--task", "libero_foo/0"], "with a suite of"),
             (["--env", "libero", "--task", "libero_object/99"], "out of range"),
             (["--task", "NoSuchTask-v1"], "unknown ManiSkill task"),
             (["--adv-type", "grpo", "--group-size", "1", "--num-envs", "1"], "--group-size must be >= 2"),
             (["--num-envs", "0"], "--num-envs must be >= 1"),
             (["--total-minutes", "-1"], "--total-minutes must be >= 0"),
             (["--noise-level", "0"], "--noise-level must be > 0"),
             (["--joint", "--ignore-last"], "--ignore-last keeps"), (["--eval-live"], "give --ema-decay too"),
             (["--init", "scratch", "--critic", "obs", "--no-detach-critic-input"], "always detached"),
             (["--init", "foo"], "got 'foo'"), (["--model", "huge"], "--model must be one of"),
             (["--obs-mode", "rbg"], "--obs-mode must be one of"), (["--image-size", "0"], "--image-size must be >= 1"),
             (["--torch-threads", "-3"], "--torch-threads must be >= 0")]
    assert_each_refused(cases, lambda flags: [sys.executable, str(ROOT / "algos" / "flow_sde_pi0.py"), "--run-dir",
                                              str(tmp_path), "--env", "maniskill", *flags], cwd=ROOT)


def test_noise_only_on_the_executed_entries():
    """--noise-on executed: outside the executed chunk steps and env dims the SDE step is the plain ODE step (std 0),
    inside it is the full Flow-SDE transition."""
    torch.manual_seed(0)
    sigmas = fs.sde_sigmas(4, 0.5)
    mask = torch.zeros(1, 8, 6, dtype=torch.bool)
    mask[:, :5, :3] = True
    x, v = torch.randn(2, 8, 6), torch.randn(2, 8, 6)
    t, d = torch.tensor(0.75), torch.tensor(0.25)
    mean, std = fs.make_step_fn({1}, sigmas, mask)(1, x, v, None, t, d)
    sde_mean, sde_std = fs.sde_transition(x, v, t, d, sigmas[1])
    assert torch.allclose(mean[:, :5, :3], sde_mean[:, :5, :3]) and torch.allclose(std[:, :5, :3], sde_std[:, :5, :3])
    assert torch.allclose(mean[:, 5:], x[:, 5:] - d * v[:, 5:]) and torch.allclose(mean[:, :, 3:], x[:, :, 3:] - d * v[:, :, 3:])
    assert (std[:, 5:] == 0).all() and (std[:, :, 3:] == 0).all() and (std[:, :5, :3] > 0).all()
    ode_mean, ode_std = fs.make_step_fn({1}, sigmas, mask)(0, x, v, None, t, d)  # not the stochastic step
    assert torch.allclose(ode_mean, x - d * v) and (ode_std == 0).all()


def test_train_head_only_leaves_only_the_action_output_projection():
    model = Pi0Model(Pi0Config.tiny())
    fs.freeze_all_but_head(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"action_out_proj.weight", "action_out_proj.bias"}


def test_preset_paper_keeps_the_flags_given():
    """--preset paper fills what was left at its default; a flag given on the command line wins (and is named). The
    run is stopped right after the argument checks (--eval-every 0), before the 3B model would load."""
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_sde_pi0.py"), "--env", "libero", "--task",
                          "libero_10/0", "--preset", "paper", "--num-envs", "16", "--eval-every", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--eval-every" in out.stderr
    assert "keeping the flags given (--num-envs 16)" in out.stdout


def test_preset_paper_takes_rlinfs_pi05_values_for_a_pi05(tmp_path):
    """The variant --init loads is read without its weights (our checkpoint's config, openpi's config.json or, where
    that does not say, its weight names); for a π0.5 --preset paper takes RLinf's π0.5 values (pirl.md §3.5), a flag
    given still wins. Stopped after the argument checks (--eval-every 0)."""
    from common.pi0_io import init_variant, save_openpi, save_pi0

    pi05 = Pi0Model(Pi0Config.tiny(variant="pi05"))
    ours, pi0 = save_pi0(tmp_path / "pi05", pi05), save_pi0(tmp_path / "pi0", Pi0Model(Pi0Config.tiny()))
    openpi = save_openpi(tmp_path / "openpi05", pi05)
    conf = json.loads((openpi / "config.json").read_text())
    del conf["pi05"]  # a config.json that does not say: the weight names do
    (openpi / "config.json").write_text(json.dumps(conf))
    assert [init_variant(f"sft:{ours}"), init_variant(f"sft:{pi0}"), init_variant(f"openpi:{openpi}")] == \
        ["pi05", "pi0", "pi05"]
    assert [init_variant("scratch", "pi05"), init_variant("scratch", "tiny"), init_variant("sft:auto")] == \
        ["pi05", "pi0", "pi0"]
    assert init_variant(f"sft:{tmp_path / 'nothing'}") == "pi0"  # the load, later, says what is wrong
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{}")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert init_variant(f"openpi:{tmp_path / 'corrupt'}") == "pi0"

    def paper(*flags):
        out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_sde_pi0.py"), "--run-dir", str(tmp_path),
                              "--preset", "paper", *flags, "--eval-every", "0"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode != 0 and "--eval-every" in out.stderr, out.stderr[-400:]
        return out.stdout

    out = paper("--env", "libero", "--task", "libero_object/0", "--init", f"sft:{ours}", "--update-epochs", "3")
    assert "--preset paper, π0.5: --num-denoise-steps 5, --noise-level 0.3, --update-epochs 1" in out
    assert "keeping the flags given (--update-epochs 3" in out
    assert "--update-epochs 5, --logprob-type chunk" in paper("--env", "maniskill", "--init", f"openpi:{openpi}")
    assert "π0.5" not in paper("--env", "libero", "--task", "libero_object/0", "--init", f"sft:{pi0}")


def test_preset_cpu_takes_the_mlp_experts_recipe_on_maniskill(tmp_path):
    """--preset cpu fills the MLP expert's measured PPO settings where --init loads an MLP expert on ManiSkill (read
    from the checkpoint's config; sft:auto makes one there), keeps the flags given, and leaves a Gemma expert, LIBERO
    and image observations on the class defaults. Stopped after the argument checks (--eval-every 0)."""
    from common.pi0_io import save_pi0

    mlp = save_pi0(tmp_path / "mlp", Pi0Model(Pi0Config.tiny(expert="mlp")))
    gemma = save_pi0(tmp_path / "gemma", Pi0Model(Pi0Config.tiny()))

    def preset_line(*flags):
        out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_sde_pi0.py"), "--run-dir", str(tmp_path),
                              *flags, "--eval-every", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "--eval-every" in out.stderr, out.stderr[-400:]
        return next((line for line in out.stdout.splitlines() if "--preset cpu with an MLP action expert" in line), "")

    line = preset_line("--env", "maniskill", "--init", f"sft:{mlp}", "--learning-rate", "1e-5")
    assert "--num-envs 16, --num-steps 8, --minibatch-size 128, --learning-rate 1e-05, --actor-warmup 0" in line
    assert "(given: --learning-rate 1e-05, --eval-every 0)" in line
    assert preset_line("--env", "maniskill", "--init", f"sft:{gemma}") == ""
    assert "--num-envs 16" in preset_line("--env", "maniskill")  # sft:auto makes an MLP expert on ManiSkill state
    assert preset_line("--env", "maniskill", "--sft-expert", "gemma") == ""
    assert preset_line("--env", "maniskill", "--obs-mode", "rgb") == ""
    assert preset_line("--env", "libero", "--init", f"sft:{mlp}") == ""
    assert fs.sft_exp_name(fs.Args(env="maniskill", task="PushCube-v1")) == "sft_pi0_3demos_state_mlp256"
    assert fs.sft_exp_name(fs.Args(env="maniskill", task="PushCube-v1", sft_expert="gemma")) == "sft_pi0_3demos_state"


def test_reward_mode_flag():
    """--reward-mode is checked with the other flags; LIBERO refuses a shaped reward; RLinf's ManiSkill preset pays
    ManiSkill's normalised dense level as a relative reward, unless a reward mode is given."""
    def run(*flags):
        return subprocess.run([sys.executable, str(ROOT / "algos" / "flow_sde_pi0.py"), *flags, "--eval-every", "0"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    out = run("--env", "maniskill", "--reward-mode", "shaped")
    assert out.returncode != 0 and "--reward-mode must be one of ('sparse', 'dense', 'normalized_dense')" in out.stderr
    out = run("--env", "libero", "--reward-mode", "dense")
    assert out.returncode != 0 and "LIBERO has only the sparse success reward" in out.stderr
    assert fs.PAPER["maniskill"]["reward_mode"] == "normalized_dense"
    out = run("--env", "maniskill", "--preset", "paper", "--reward-mode", "sparse")
    assert out.returncode != 0 and "keeping the flags given (--reward-mode sparse)" in out.stdout


@pytest.mark.parametrize("script", ["flow_sde_pi0", "flow_noise_pi0"])
def test_sft_auto_continues_a_killed_sft_run(script, tmp_path, monkeypatch):
    """--init sft:auto after a kill during the SFT it started: the SFT run is continued (--resume; a fresh start
    refused its own half-made run directory), and a kill between SFT's two final renames (only final.old left) is a
    finished start, not a reason to train again."""
    spec = importlib.util.spec_from_file_location(script, ROOT / "algos" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from common.pi0_io import save_pi0

    final = tmp_path / "sft" / "PushCube-v1__x__1" / "final"
    monkeypatch.setattr(mod, "sft_auto_path", lambda args: final)
    calls = []
    monkeypatch.setattr(mod.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    args = mod.Args(env="maniskill", task="PushCube-v1", init="sft:auto")
    with pytest.raises(SystemExit):  # the stub made no checkpoint: the load that follows fails, saying how to make one
        mod.load_policy(args, None, torch.device("cpu"))
    (cmd,) = calls
    assert "--resume" in cmd and cmd[cmd.index("--run-dir") + 1] == str(final.parent.parent)
    save_pi0(final.with_name("final.old"), Pi0Model(Pi0Config.tiny(expert="mlp")))
    calls.clear()
    from common.pi0_io import make_tokenizer
    policy = mod.load_policy(args, make_tokenizer("bytes"), torch.device("cpu"))
    assert not calls and policy is not None


@pytest.mark.parametrize("script", ["flow_sde_pi0", "flow_noise_pi0", "ppo_vla", "mappo_uav_formation"])
def test_gae_against_the_sum_it_stands_for(script, monkeypatch):
    """Each script's GAE against its definition written out: A_t = sum_l (gamma lambda)^l delta_{t+l}, stopped at the
    end of t's episode (an auto-reset env's next value is a new episode's), delta_k = r_k + gamma V_{k+1} (1 - d_k)
    - V_k, V_T the value after the rollout."""
    name = f"gae_check_{script}"  # registered while loading (dataclasses look their module up), under a name no
    spec = importlib.util.spec_from_file_location(name, ROOT / "algos" / f"{script}.py")  # other test module uses
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    T, N, gamma, lam = 9, 5, 0.99, 0.95
    rewards, values = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    next_value = torch.randn(N, generator=g)
    dones = (torch.rand(T, N, generator=g) < 0.25).float()
    dones[3, 0] = dones[8, 1] = 1.0  # mid-rollout and at the last step
    dones[:, 2] = 0.0  # one env with no episode end
    want = torch.zeros(T, N)
    for n in range(N):
        for t in range(T):
            for k in range(t, T):
                v_next = next_value[n] if k == T - 1 else values[k + 1, n]
                delta = rewards[k, n] + gamma * v_next * (1 - dones[k, n]) - values[k, n]
                want[t, n] += (gamma * lam) ** (k - t) * delta
                if dones[k, n]:
                    break
    torch.testing.assert_close(mod.gae(rewards, values, dones, next_value, gamma, lam), want)
