"""algos/ppo_vla.py: action tokens (bins, de-tokenisation, log-probs), and end to end at tiny scale on PushCube-v1
(state): behaviour cloning on demos -> PPO, ratio exactly 1 at the first update, resume, GRPO from its checkpoint."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.tensorboard import all_scalars, scalar_values
from tests.helpers.cli import assert_each_refused

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(ROOT / "algos" / "ppo_vla.py")]
spec = importlib.util.spec_from_file_location("ppo_vla", ROOT / "algos" / "ppo_vla.py")
pv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pv)  # the __main__ block does not run


def test_action_tokens_round_trip_and_log_probs():
    bins = 256
    centres = pv.bin_centres(bins)
    assert torch.equal(pv.tokenize_actions(centres, bins), torch.arange(bins))
    x = torch.rand(1000) * 2.4 - 1.2  # out-of-range values clip to the end bins
    err = (centres[pv.tokenize_actions(x, bins)] - x.clamp(-1, 1)).abs()
    assert float(err.max()) <= 1 / bins + 1e-6
    logits, tokens = torch.randn(3, 2, 4, 7), torch.randint(0, 7, (3, 2, 4))
    for temp in (1.0, 0.5):
        logp, entropy = pv.token_log_probs(logits, tokens, temp)
        dist = torch.distributions.Categorical(logits=logits / temp)
        assert torch.allclose(logp, dist.log_prob(tokens), atol=1e-6)
        assert torch.allclose(entropy, dist.entropy(), atol=1e-5)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from common.maniskill_demos import generate_demos

    out = tmp_path_factory.mktemp("demos") / "PushCube-v1"
    assert generate_demos("PushCube-v1", 3, out, progress=False)["stored"] == 3
    return out


def run(args, timeout=600):
    out = subprocess.run(SCRIPT + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_bc_then_ppo_resume_and_grpo(demos, tmp_path):
    small = ["--run-dir", str(tmp_path), "--num-envs", "2", "--num-steps", "4", "--eval-episodes", "2",
             "--num-eval-envs", "1", "--max-episode-steps", "40", "--minibatch-size", "8", "--update-epochs", "2",
             "--action-chunk", "4", "--head-hidden", "64"]
    run(small + ["--demos", str(demos), "--bc-demos", "3", "--bc-steps", "150", "--total-iterations", "1"])
    run_dir = tmp_path / "PushCube-v1__ppo_vla__1"
    bc = scalar_values(run_dir, "losses/bc_loss")
    assert len(bc) == 3 and bc[-1] < 0.7 * bc[0], bc  # cross-entropy on the demos' tokens falls
    # the first minibatch of the first epoch recomputes the rollout's log-probs (float round-off of another batch
    # size aside): ratio 1
    assert scalar_values(run_dir, "losses/first_ratio_error")[0] < 1e-5
    assert scalar_values(run_dir, "charts/learning_rate") and scalar_values(run_dir, "losses/explained_variance")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] > 0 and [h["iteration"] for h in summary["history"]] == [0, 1]
    assert {"vla.pt", "trainer.pt", "norm_stats.json"} <= {p.name for p in (run_dir / "checkpoint").iterdir()}
    trainer = torch.load(run_dir / "checkpoint" / "trainer.pt", weights_only=True)
    assert len(trainer["cuda_rng"]) == torch.cuda.device_count() and "np_rng" in trainer  # the GPUs' too, if any

    # a kill -9 between save_pi0's two renames leaves only checkpoint.old: it still counts, and --resume goes on from it
    (run_dir / "checkpoint").rename(run_dir / "checkpoint.old")
    again = subprocess.run(SCRIPT + small + ["--total-iterations", "2"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode != 0 and "--resume" in again.stderr
    out = run(small + ["--total-iterations", "2", "--resume"])
    assert "resuming PushCube-v1__ppo_vla__1 at iteration 1" in out.stdout and "bc:" not in out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [h["iteration"] for h in summary["history"]] == [0, 1, 2]
    assert (run_dir / "checkpoint").exists() and not (run_dir / "checkpoint.old").exists()
    out = run(small + ["--total-iterations", "2", "--resume"])  # a finished run: nothing left to train, no crash
    again = json.loads((run_dir / "summary.json").read_text())
    assert "at iteration 2" in out.stdout and again["history"] == summary["history"]
    assert again["env_steps"] == summary["env_steps"]

    # GRPO from that checkpoint (its head shape, bins and norm stats), no BC, no critic. Without the success filter
    # every episode is kept, and the first iteration trains at the full lr (no critic warm-up: there is no critic).
    # The entropy bonus moves the head even where both episodes of the group returned the same (advantages 0)
    out = run(small + ["--exp-name", "grpo", "--init", f"vla:{run_dir / 'checkpoint'}", "--adv-type", "grpo",
                       "--group-size", "2", "--action-chunk", "8", "--total-iterations", "1", "--no-filter-rewards",
                       "--ent-coef", "0.01"])
    assert "keeping its --action-chunk 4 (given 8)" in out.stdout
    grpo_dir = tmp_path / "PushCube-v1__grpo__1"
    assert scalar_values(grpo_dir, "charts/learning_rate") == [pytest.approx(pv.Args.learning_rate)]
    logged = all_scalars(grpo_dir)
    assert logged["losses/policy_loss"] and "losses/value_loss" not in logged  # (no critic)
    before = torch.load(run_dir / "checkpoint" / "vla.pt", weights_only=True)
    after = torch.load(grpo_dir / "checkpoint" / "vla.pt", weights_only=True)
    assert any(not torch.equal(v, after["head"][k]) for k, v in before["head"].items()), "GRPO trained nothing"
    other = subprocess.run(SCRIPT + small + ["--exp-name", "x", "--init", f"vla:{run_dir / 'checkpoint'}", "--task",
                                             "PickCube-v1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "was trained on" in other.stderr, other.stderr[-500:]
    grpo = json.loads((grpo_dir / "summary.json").read_text())
    assert grpo["algorithm"] == "ppo_vla_grpo" and grpo["args"]["action_chunk"] == 4  # the checkpoint's head
    assert grpo["start_success"] == summary["final_success"]  # the same greedy policy on the same eval episodes


def test_grpo_advantages_within_groups_and_the_success_filter():
    """Each episode's return against its own group's (consecutive envs) mean and standard deviation; a group of equal
    returns gets 0, not NaN; the filter keeps the groups whose mean success is in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(0)
    returns = torch.randn(12, generator=g)
    returns[3:6] = 0.5  # a group whose episodes all returned the same
    success = torch.tensor([1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.float32)
    advantages, keep = pv.grpo_advantages(returns, success, 3, filter_rewards=True)
    for group in range(4):
        r = returns[3 * group:3 * group + 3]
        torch.testing.assert_close(advantages[3 * group:3 * group + 3], (r - r.mean()) / (r.std() + 1e-6))
    assert torch.equal(advantages[3:6], torch.zeros(3))
    assert keep.tolist() == [True] * 3 + [False] * 6 + [True] * 3  # the second group all succeeds, the third all fails
    assert pv.grpo_advantages(returns, success, 3, filter_rewards=False)[1].all()


def test_bad_flags_are_refused(tmp_path):
    cases = [(["--env", "mujoco"], "--env"), (["--init", "sft:x"], "--init must be"),
             (["--init", "vla:/nonexistent"], "vla.pt missing"), (["--backbone", "hf:x"], "--backbone"),
             (["--action-bins", "1"], "--action-bins must be >= 2"),
             (["--adv-type", "grpo", "--num-envs", "3"], "multiple of --group-size"),
             (["--temperature", "0"], "--temperature"), (["--logprob-type", "seq"], "--logprob-type"),
             (["--actor-warmup", "-1"], "--actor-warmup must be >= 0"), (["--model", "huge"], "--model must be one of"),
             (["--torch-threads", "-3"], "--torch-threads must be >= 0"), (["--image-size", "0"], "--image-size")]
    (tmp_path / "heads_only").mkdir()
    (tmp_path / "heads_only" / "vla.pt").write_bytes(b"")  # a vla.pt without the model beside it
    cases.append((["--init", f"vla:{tmp_path / 'heads_only'}"], "not a checkpoint of this script"))
    assert_each_refused(cases, lambda flags: SCRIPT + flags + ["--run-dir", str(tmp_path / "r")], cwd=ROOT)
    assert not (tmp_path / "r").exists()  # none of them made its run directory
