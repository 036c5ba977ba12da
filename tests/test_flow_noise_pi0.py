"""algos/flow_noise_pi0.py: the learned-noise chain and RLinf's behaviours (pirl.md §1, §8), and a short run."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.pi0 import Pi0Config, Pi0Model
from tests.helpers.tensorboard import all_scalars, scalar_values
from tests.helpers.cli import assert_each_refused

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("flow_noise_pi0", ROOT / "algos" / "flow_noise_pi0.py")
fn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fn)


def test_noise_std_is_bounded_for_any_input():
    head = fn.NoiseHead(16, 8, 0.08, 0.16)
    for scale in (0.0, 1.0, 1e3, -1e3):
        std = head(torch.randn(4, 5, 16) * scale + scale)
        assert std.shape == (4, 5, 8) and (std >= 0.08 - 1e-6).all() and (std <= 0.16 + 1e-6).all()
    # and it spans the range: the last layer driven to either end gives std_min / std_max, the middle their
    # geometric mean (a bounded log-variance)
    last = head.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        for bias, want in ((-50.0, 0.08), (50.0, 0.16), (0.0, (0.08 * 0.16) ** 0.5)):
            last.bias.fill_(bias)
            torch.testing.assert_close(head(torch.randn(3, 2, 16)), torch.full((3, 2, 8), want))


def test_noise_head_runs_once_on_a_chunk_state_expanded_over_the_actions():
    """The MLP expert's one hidden per chunk reaches the head expanded (stride 0) over the horizon: the head runs on
    one row and expands its output; values and gradients equal the head's on the materialised copies."""
    torch.manual_seed(0)
    head = fn.NoiseHead(16, 8, 0.08, 0.16)
    h = torch.randn(4, 16, requires_grad=True)
    std = head(h[:, None].expand(-1, 5, -1))
    assert std.shape == (4, 5, 8) and std.stride(1) == 0
    std.pow(2).sum().backward()
    grads = [p.grad.clone() for p in head.parameters()] + [h.grad.clone()]
    head.zero_grad(), h.grad.zero_()
    dense = head(h[:, None].expand(-1, 5, -1).contiguous())
    assert dense.stride(1) != 0 and torch.allclose(std, dense, atol=1e-7)
    dense.pow(2).sum().backward()
    for a, b in zip(grads, [p.grad for p in head.parameters()] + [h.grad]):
        assert torch.allclose(a, b, atol=1e-6)


def policy():
    torch.manual_seed(0)
    cfg = Pi0Config.tiny(num_cameras=0)
    model = Pi0Model(cfg).eval()
    tokens = torch.randint(4, cfg.vocab, (5, cfg.max_tokens))
    prefix = model.encode_prefix(torch.zeros(5, 0, 64, 64, 3, dtype=torch.uint8), torch.zeros(5, 0, dtype=torch.bool),
                                 tokens, torch.ones_like(tokens, dtype=torch.bool))
    head = fn.NoiseHead(cfg.expert_width, cfg.action_dim, 0.08, 0.16)
    return model, head, prefix, torch.randn(5, cfg.action_dim), torch.randn(5, cfg.horizon, cfg.action_dim)


def test_every_step_is_stochastic_and_the_log_prob_is_a_mean_over_k_plus_1_terms():
    model, head, prefix, state, noise = policy()
    K = 4
    with torch.no_grad():
        out = model.sample(prefix, state, noise, K, fn.make_step_fn(head, True))
        logp, last = fn.chain_log_prob(out.chain, out.means, out.stds)
        means, stds, hidden = fn.recompute_chain(model, head, prefix, state, out.chain)
    assert (out.stds > 0).all()  # all K steps, the last one included
    total = fn.gaussian_log_prob(out.chain[:, 0], torch.zeros_like(noise), torch.ones_like(noise))
    for i in range(K):
        total = total + fn.gaussian_log_prob(out.chain[:, i + 1], out.means[:, i], out.stds[:, i])
    assert torch.allclose(logp, total / (K + 1), atol=1e-5)
    assert torch.allclose(fn.chain_log_prob(out.chain, means, stds)[0], logp, atol=1e-5)  # first PPO ratio is 1
    final = fn.gaussian_log_prob(out.chain[:, K], out.means[:, K - 1], out.stds[:, K - 1]) / (K + 1)
    assert torch.allclose(last, final, atol=1e-6)  # the last transition's share, left out where its action never ran
    assert hidden.shape[1] == K


def test_eval_is_the_plain_ode_and_never_calls_the_noise_head():
    model, head, prefix, state, noise = policy()
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model.sample(prefix, state, noise, 4, fn.make_step_fn(head, False))
        ode = model.sample(prefix, state, noise, 4)
    assert not calls and (out.stds == 0).all() and torch.equal(out.actions, ode.actions)


def test_obs_ode_critic_reads_the_noiseless_chunk_of_the_same_x1():
    model, head, prefix, state, noise = policy()
    with torch.no_grad():
        ode = model.sample(prefix, state, noise, 4)
        noisy = model.sample(prefix, state, noise, 4, fn.make_step_fn(head, True))
        assert not torch.allclose(noisy.actions, ode.actions)  # the injected noise moved the actions
        assert torch.equal(fn.ode_chunk(model, prefix, state, noise, 4, head, noisy, True), ode.actions)
        assert fn.ode_chunk(model, prefix, state, noise, 4, head, ode, False) is ode.actions  # no second pass


def test_entropy_includes_the_unit_initial_term_and_is_averaged():
    stds = torch.full((2, 4, 8, 6), 0.1)
    stds[1, :, 2, 1] = 0.2  # one element of the second sample: its own entropy, laid out as the log-probs
    ent = fn.chain_entropy(stds, chunk=5, action_dim=3)
    one, tenth, fifth = (0.5 * math.log(2 * math.pi * math.e * sd ** 2) for sd in (1.0, 0.1, 0.2))
    expected = torch.full((2, 15), (one + 4 * tenth) / 5)
    expected[1, 2 * 3 + 1] = (one + 4 * fifth) / 5
    assert ent.shape == (2, 15) and torch.allclose(ent, expected)


def test_an_action_cut_by_the_episode_end_keeps_its_earlier_transitions_in_the_ratio():
    """Every Flow-Noise step draws, so an action that never ran (its episode ended mid-chunk) moved the executed ones
    through its draws at the earlier steps: those terms stay (gradient, weight 1); its last transition's share,
    which moved nothing but itself, is left out (no gradient). With one step nothing earlier has parameters."""
    old_logp, old_last = torch.zeros(1, 2), torch.zeros(1, 2)
    executed = torch.tensor([[1.0, 0.0]])
    early, final = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    new_logp = old_logp + torch.stack([torch.zeros(()), early + final])[None]
    new_last = old_last + torch.stack([torch.zeros(()), final])[None]
    logratio, weights = fn.cut_chunk_log_ratio(new_logp, new_last, old_logp, old_last, executed, num_steps=4)
    assert torch.equal(weights, torch.ones(1, 2))
    fn.actor_loss(logratio, torch.ones(1, 1), 0.2, weights).backward()
    assert early.grad != 0 and final.grad == 0
    assert torch.equal(fn.cut_chunk_log_ratio(new_logp, new_last, old_logp, old_last, executed, num_steps=1)[1],
                       executed)


@pytest.mark.parametrize("critic,ref_coef", [("obs", "0"), ("obs_ode", "5")])
def test_a_few_iterations_run_with_an_exact_first_ratio(tmp_path, critic, ref_coef):
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_noise_pi0.py"), "--run-dir", str(tmp_path),
                          "--env", "maniskill", "--init", "scratch", "--num-envs", "2", "--num-steps", "4",
                          "--total-iterations", "2", "--eval-episodes", "2", "--num-eval-envs", "1", "--eval-every", "2",
                          "--minibatch-size", "4", "--max-episode-steps", "20", "--critic", critic,
                          "--ref-coef", ref_coef], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "PushCube-v1__flow_noise_pi0__1"
    assert json.loads((run_dir / "summary.json").read_text())["algorithm"] == "flow_noise"
    logs = all_scalars(run_dir)
    # float32 rounding of log-probs summed over the chunk, batched differently: ~1e-5 (a wrong chain gives order 1);
    # the 20-step episodes end mid-chunk, whose actions that never ran keep their draws before the last transition
    assert all(v < 1e-4 for v in logs["losses/first_ratio_error"])
    assert logs["charts/train_samples"] == [2 * 4, 2 * 4]  # nothing masked after a done
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == 2 * 56  # per env 8+8+4, 8+8+4, 8+8
    # the entropy of a Gaussian per chain element, 0.5 log(2 pi e std^2), averaged: the K noise steps' std is in
    # [0.08, 0.16], x_1's is 1 (4 steps by default): between the two ends' averages
    K = 4
    low, high = [(K * (0.5 * math.log(2 * math.pi * math.e * sd ** 2)) + 0.5 * math.log(2 * math.pi * math.e)) / (K + 1)
                 for sd in (0.08, 0.16)]
    assert all(low - 1e-4 <= v <= high + 1e-4 for v in logs["losses/entropy"]), (low, high, logs["losses/entropy"])
    if ref_coef != "0":  # the reference is the loaded policy: no distance before the actor first moves, some after
        penalty = logs["losses/ref_penalty"]
        assert penalty[0] == 0 and penalty[1] > 0


def test_preset_cpu_takes_the_mlp_experts_recipe_on_maniskill(tmp_path):
    """As Flow-SDE's: an MLP expert on ManiSkill gets the measured CPU recipe (flags given win), a Gemma one does not."""
    from common.pi0_io import save_pi0

    def preset_line(init):
        out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_noise_pi0.py"), "--run-dir", str(tmp_path),
                              "--env", "maniskill", "--init", init, "--num-steps", "4", "--eval-every", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "--eval-every" in out.stderr, out.stderr[-400:]
        return next((line for line in out.stdout.splitlines() if "--preset cpu with an MLP action expert" in line), "")

    line = preset_line(f"sft:{save_pi0(tmp_path / 'mlp', Pi0Model(Pi0Config.tiny(expert='mlp')))}")
    assert "--num-envs 16, --num-steps 4, --minibatch-size 128, --learning-rate 3e-05" in line
    assert preset_line(f"sft:{save_pi0(tmp_path / 'gemma', Pi0Model(Pi0Config.tiny()))}") == ""


def test_preset_paper_takes_rlinfs_pi05_values_for_a_pi05(tmp_path):
    """As Flow-SDE's: a π0.5 gets RLinf's π0.5 values under --preset paper (ManiSkill: 5 epochs, chunk ratios; LIBERO:
    the suite's denoising steps and epochs, no noise level)."""
    from common.pi0_io import save_pi0

    def paper(*flags):
        out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_noise_pi0.py"), "--run-dir", str(tmp_path),
                              "--preset", "paper", *flags, "--eval-every", "0"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode != 0 and "--eval-every" in out.stderr, out.stderr[-400:]
        return out.stdout

    pi05 = f"sft:{save_pi0(tmp_path / 'pi05', Pi0Model(Pi0Config.tiny(variant='pi05')))}"
    assert "--preset paper, π0.5: --update-epochs 5, --logprob-type chunk" in paper("--env", "maniskill", "--init", pi05)
    assert "--preset paper, π0.5: --num-denoise-steps 3, --update-epochs 1" in paper(
        "--env", "libero", "--task", "libero_spatial/0", "--init", pi05)
    assert "π0.5" not in paper("--env", "maniskill", "--init", "scratch")


def test_bad_flags_are_refused(tmp_path):
    cases = [(["--env", "gym"], "--env"), (["--critic", "x"], "--critic"),
             (["--noise-std-min", "0.2", "--noise-std-max", "0.1"], "--noise-std-min"),
             (["--ref-coef", "-1"], "--ref-coef"), (["--eval-every", "0"], "--eval-every"),
             (["--sft-expert", "big"], "--sft-expert"),
             (["--probe-every", "-1"], "--probe-every"),
             (["--ema-decay", "1"], "--ema-decay"),
             (["--minibatch-size", "0"], "--minibatch-size must be >= 1"),
             (["--eval-episodes", "-1"], "--eval-episodes must be >= 0"),
             (["--adv-type", "grpo", "--group-size", "1", "--num-envs", "1"], "--group-size must be >= 2"),
             (["--eval-live"], "give --ema-decay too"),
             (["--init", "scratch", "--critic", "obs", "--no-detach-critic-input"], "always detached"),
             (["--init", "openpi"], "--init must be"), (["--model", "huge"], "--model must be one of"),
             (["--obs-mode", "foo"], "--obs-mode must be one of")]
    assert_each_refused(cases, lambda flags: [sys.executable, str(ROOT / "algos" / "flow_noise_pi0.py"), "--run-dir",
                                              str(tmp_path), "--env", "maniskill", *flags], cwd=ROOT)


def test_a_few_iterations_on_one_libero_task_with_images(tmp_path):
    """The default LIBERO task (libero_object/0, one task, its eval init states 0, 1), with both cameras."""
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_noise_pi0.py"), "--run-dir", str(tmp_path),
                          "--env", "libero", "--init", "scratch", "--num-envs", "2", "--num-steps", "4",
                          "--total-iterations", "1", "--eval-episodes", "2", "--num-eval-envs", "2",
                          "--max-episode-steps", "16", "--minibatch-size", "4", "--image-size", "32",
                          "--no-capture-video"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "libero_object_0__flow_noise_pi0__1" / "summary.json").read_text())
    assert summary["env"] == "libero" and [h["episodes"] for h in summary["history"]] == [2, 2]
    assert "VLM prefixes take" in out.stdout and "kept for the update" in out.stdout  # frozen VLM, cameras


def test_eval_only_runs_of_both_scripts_score_one_start_alike(tmp_path):
    """benchmarks/pirl.py evaluates each SFT start once (flow_sde_pi0.py --total-iterations 0) and gives that number
    to both algorithms' rows: the two scripts' evals of one start must play the same episodes with the same actions
    (compared through the eval videos: a random start's sparse returns are all 0, its camera frames are not)."""
    import imageio.v3 as iio
    from common.pi0_io import NormStats, make_tokenizer, save_pi0

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)  # PushCube rgb: 25-D state, 8-D joint actions
    stats = NormStats.from_data({"state": torch.randn(64, 25, generator=g).numpy(),
                                 "actions": torch.randn(64, 8, generator=g).numpy()})
    save_pi0(tmp_path / "start", Pi0Model(Pi0Config.tiny(action_dim=32)), stats, make_tokenizer(None).name)
    histories, videos = [], []
    for script in ("flow_sde_pi0", "flow_noise_pi0"):
        out = subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), "--run-dir", str(tmp_path / "runs"),
                              "--env", "maniskill", "--obs-mode", "rgb", "--init", f"sft:{tmp_path / 'start'}",
                              "--exp-name", script, "--total-iterations", "0", "--num-envs", "1", "--eval-episodes",
                              "2", "--max-episode-steps", "24"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        run_dir = tmp_path / "runs" / f"PushCube-v1__{script}__1"
        histories.append(json.loads((run_dir / "summary.json").read_text())["history"])
        videos.append(iio.imread(run_dir / "eval_0.mp4"))
    assert [h["iteration"] for h in histories[0]] == [0] and histories[0] == histories[1]
    assert videos[0].shape == videos[1].shape and len(videos[0]) >= 3
    assert (videos[0][0] != videos[0][-1]).any()  # the arm moved: the frames can tell two policies apart
    assert (videos[0] == videos[1]).all()


def test_reward_mode_flag():
    """As in flow_sde_pi0: a shaped reward on LIBERO is refused; RLinf's ManiSkill preset pays the dense level."""
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "flow_noise_pi0.py"), "--env", "libero", "--reward-mode",
                          "normalized_dense", "--eval-every", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "LIBERO has only the sparse success reward" in out.stderr
    assert fn.PAPER["maniskill"]["reward_mode"] == "normalized_dense"


@pytest.mark.parametrize("script", ["flow_sde_pi0", "flow_noise_pi0"])
def test_a_resumed_run_trains_bit_for_bit_as_one_that_was_never_stopped(tmp_path, script):
    """GRPO (one episode per env per iteration, so an iteration's end is an episode's) with a dense reward: 2
    iterations in one go and 1 + --resume to 2 end with the same weights, bit for bit (model, value head, noise
    head, optimizer state): the checkpoint carries every draw (torch, numpy, the env's initial states, the SDE
    step's Python draw) and the state the update needs. A 1-iteration run differs: the comparison sees learning."""
    flags = ["--env", "maniskill", "--init", "scratch", "--num-envs", "2", "--group-size", "2", "--adv-type", "grpo",
             "--reward-mode", "normalized_dense", "--no-filter-rewards", "--actor-warmup", "0", "--max-episode-steps",
             "16", "--minibatch-size", "4", "--eval-episodes", "1", "--num-eval-envs", "1", "--checkpoint-every", "1",
             "--no-capture-video", "--no-cuda"]  # (CPU on a GPU machine too: its kernels need not repeat bit for bit)

    def train(run_dir, *extra):
        out = subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), "--run-dir", str(run_dir), *flags,
                              *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        ckpt = run_dir / f"PushCube-v1__{script}__1" / "checkpoint"
        weights = load_file(ckpt / "model.safetensors")
        trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
        heads = {f"{h}.{k}": v for h in ("value_head", "noise_head") for k, v in trainer.get(h, {}).items()}
        moments = {f"adam.{i}.{k}": v for i, st in trainer["optimizer"]["state"].items() for k, v in st.items()
                   if torch.is_tensor(v)}
        return {**weights, **heads, **moments}

    straight = train(tmp_path / "straight", "--total-iterations", "2")
    once = train(tmp_path / "stopped", "--total-iterations", "1")
    resumed = train(tmp_path / "stopped", "--total-iterations", "2", "--resume")
    assert straight.keys() == resumed.keys()
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []
    assert any(not torch.equal(straight[k], once[k]) for k in straight)


@pytest.mark.parametrize("script", ["flow_sde_pi0", "flow_noise_pi0"])
def test_ema_weights_average_the_live_ones_and_survive_resume(tmp_path, script):
    """--ema-decay 0.5: after each iteration the eval's weights are ema <- 0.5 ema + 0.5 live, kept in the checkpoint
    and restored by --resume (here from the checkpoint.old that a kill mid-save leaves); the eval swaps them in (with the shaped reward its return differs from the live
    weights' eval) and the live weights come back after it (the checkpoint, saved after the eval, holds live weights
    that differ from the EMA)."""
    from common.pi0_io import load_pi0

    flags = ["--env", "maniskill", "--init", "scratch", "--num-envs", "2", "--num-steps", "4", "--minibatch-size", "4",
             "--max-episode-steps", "24", "--eval-episodes", "1", "--num-eval-envs", "1", "--eval-every", "1",
             "--checkpoint-every", "1", "--actor-warmup", "0", "--learning-rate", "1e-3", "--ema-decay", "0.5",
             "--eval-live", "--reward-mode", "normalized_dense", "--no-capture-video"]

    def trained(directory):
        model = load_pi0(directory)[0]
        model.freeze_vlm()
        return [p.detach() for p in model.parameters() if p.requires_grad]

    def weights():
        ckpt = tmp_path / f"PushCube-v1__{script}__1" / "checkpoint"
        live = trained(ckpt)
        ema = torch.load(ckpt / "trainer.pt", weights_only=True)["ema"]
        return live, ema[:len(live)]  # Flow-Noise's list goes on with its noise head

    for total in ("1", "2"):
        out = subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), "--run-dir", str(tmp_path), *flags,
                              "--total-iterations", total, *(["--resume"] if total == "2" else [])], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "live weights" in out.stdout
        if total == "1":
            live1, ema1 = weights()
            sim1 = json.loads((tmp_path / f"PushCube-v1__{script}__1" / "summary.json").read_text())["sim_seconds"]
            # a kill -9 between save_pi0's two renames leaves only checkpoint.old: --resume goes on from it (and
            # the run's next save replaces it), it does not start over
            ckpt = tmp_path / f"PushCube-v1__{script}__1" / "checkpoint"
            ckpt.rename(ckpt.with_name("checkpoint.old"))
        else:
            assert "at iteration 1" in out.stdout
    assert not (tmp_path / f"PushCube-v1__{script}__1" / "checkpoint.old").exists()
    live2, ema2 = weights()
    assert any(not torch.equal(e, p) for e, p in zip(ema1, live1))  # the eval gave the live weights back
    assert any(not torch.equal(a, b) for a, b in zip(live1, live2))  # the actor moved in iteration 2
    for e2, e1, p2 in zip(ema2, ema1, live2):  # the resumed average went on from the checkpoint's
        torch.testing.assert_close(e2, 0.5 * e1 + 0.5 * p2, rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / f"PushCube-v1__{script}__1" / "summary.json").read_text())
    assert [("live_success_rate" in h) for h in summary["history"]] == [False, True, True]
    # the simulator's seconds (time in envs.step, evals not counted) go on from the checkpoint's, within the training
    # clock that went on too
    assert 0 < sim1 < summary["sim_seconds"] <= summary["minutes"] * 60
    assert all(h["episodic_return"] != h["live_episodic_return"] for h in summary["history"][1:])  # two policies ran
    # the policy the evals scored, as a checkpoint of its own
    assert all(torch.equal(a, b) for a, b in zip(trained(tmp_path / f"PushCube-v1__{script}__1" / "ema_policy"), ema2))
    if script == "flow_noise_pi0":  # the noise head's weights mean other stds under other bounds: refused on resume
        out = subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), "--run-dir", str(tmp_path), *flags,
                              "--total-iterations", "3", "--resume", "--noise-std-max", "0.3"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode != 0 and "--noise-std-max 0.16" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("script", ["flow_sde_pi0", "flow_noise_pi0"])
def test_anneal_lr_decays_the_actor_lr_to_zero_over_the_budget(tmp_path, script):
    """--anneal-lr: the actor lr falls linearly to 0 over --total-iterations, or over --total-minutes when that runs
    out first (here after the first rollout: its one update gets lr 0)."""
    flags = ["--env", "maniskill", "--init", "scratch", "--num-envs", "2", "--num-steps", "4", "--minibatch-size", "4",
             "--max-episode-steps", "24", "--eval-episodes", "1", "--num-eval-envs", "1", "--actor-warmup", "0",
             "--learning-rate", "3e-4", "--anneal-lr", "--no-capture-video"]

    def lrs(name, *extra):
        out = subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), "--run-dir", str(tmp_path / name),
                              *flags, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return scalar_values(tmp_path / name / f"PushCube-v1__{script}__1", "charts/learning_rate")

    assert lrs("iterations", "--total-iterations", "3", "--eval-every", "3") == pytest.approx([3e-4, 2e-4, 1e-4])
    assert lrs("minutes", "--total-iterations", "3", "--total-minutes", "0.0005", "--eval-every", "3") == [0.0]
