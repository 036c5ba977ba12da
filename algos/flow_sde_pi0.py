"""πRL Flow-SDE: PPO for flow-matching VLAs (π0 / π0.5) with the Flow-SDE log-likelihood, on LIBERO and ManiSkill.

Paper: Chen et al., "πRL: Online RL Fine-tuning for Flow-based Vision-Language-Action Models" (arXiv 2510.25889),
as RLinf implements it (`noise_method: flow_sde`). Reproduces the "few-shot SFT -> Flow-SDE PPO" rows of the πRL
tables; at CPU scale with the tiny π0 (`--preset cpu`, the default), with RLinf's hyper-parameters on GPUs
(`--preset paper`).

    python algos/flow_sde_pi0.py --env libero            # LIBERO-Object task 0, tiny π0, CPU
    python algos/flow_sde_pi0.py --env maniskill         # PushCube-v1 (state), the MLP action expert's CPU recipe

The denoising chain x_1 -> x_0 (K Euler steps) becomes a policy: at each policy call ONE step k ~ U{0..K-1}, shared
by the whole batch (RLinf's behaviour), uses the marginal-preserving reverse SDE
    sigma_i = a*sqrt(t_i / (1 - t_i))   (t = 1 uses t_1 in the denominator: sigma_0 = a*sqrt(K))
    mean = x0_hat*(1 - (t - d)) + x1_hat*(t - d - sigma_i^2 * d / (2t)),  std = sqrt(d)*sigma_i
with x0_hat = x_t - t*v and x1_hat = x_t + (1 - t)*v; all other steps are deterministic ODE steps. The action's
log-prob is that transition's Gaussian, sliced to the executed [chunk, env action dims]. Where an episode ended
mid-chunk, the actions that never ran still count when the SDE step came before the last (their draw moved the
executed actions through the later ODE steps); a last step's draw moved nothing but its own action, and is left out
for those. `--joint` makes every step
stochastic and uses the mean over the K+1 terms (N(0, I) of x_1, then each transition), RLinf's joint_logprob.
PPO: samples are chunk steps (rewards summed over the chunk), GAE (γ 0.99, λ 0.95) over chunk steps, clip 0.2,
Huber value loss (δ 10) with value clipping 0.2, no KL, no dual clip. Critic (`--critic`): by default on what the
policy observes (the VLM prefix mean + the state), never on the sampled chain; RLinf's placements are kept as options
(`expert`: the action expert's hidden states, detached, averaged over the visited denoising steps, for π0; `vlm`:
the prefix, for π0.5) and used by `--preset paper`. The expert's states see x_t, so that "value" is partly a value of
the sampled action, a biased baseline; at CPU scale it collapsed PPO. `obs_ode` adds the chunk the ODE makes from
the call's own x_1: a baseline that knows the initial noise but not the SDE draw. Only the action expert and the
heads train.
`--adv-type grpo`: groups of envs share an initial state, one episode each, group-normalised returns.
"""

import contextlib
import copy
import io
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.envs import (REWARD_MODES, check_task, default_eval_envs, fill_defaults, make_task_env,
                         rlinf_libero_values, rlinf_pi05_values, run_eval_episodes, task_instructions)
from common.libero_env import MAX_EPISODE_STEPS
from common.fsutil import atomic_write
from common.pi0 import (Pi0Model, PromptPrefixCache, RolloutPrefixKeeper, gaussian_log_prob, pooled_prefix,
                        prefix_from)
from common.pi0_io import (Pi0Processor, existing_checkpoint, init_expert, init_variant, load_pi0,
                           load_pi0_policy, make_tokenizer, read_torch_state, save_pi0)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    exp_name: str = "flow_sde_pi0"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use CUDA when available"""
    torch_threads: int = 1
    """CPU threads for torch (0: torch's default); 1 suits the tiny model on a small shared CPU"""
    track: bool = False
    """track with Weights and Biases (offline unless WANDB_MODE says otherwise)"""
    wandb_project_name: str = "rlinf-hackable"
    """the W&B project"""
    run_dir: str = "runs"
    """where runs (logs, checkpoints, videos) go"""
    resume: bool = False
    """continue this run (same --exp-name/--seed/--task) from its checkpoint"""
    capture_video: bool = True
    """write an mp4 of the first eval episode (image observations only)"""
    preset: str = "cpu"
    """cpu (tiny model, few envs; on ManiSkill with an MLP action expert, sft:auto's there, the measured CPU_MLP_EXPERT
    settings for the flags not given) or paper (RLinf's πRL yaml values for this env and the π0 or π0.5 that --init
    loads; needs GPUs and real weights)"""

    # Environment
    env: str = "libero"
    """libero or maniskill"""
    task: str = ""
    """LIBERO "<suite>/<task ids>" (one task, libero_object/0; a subset, libero_object/0-3 or /0,2,5; a whole suite,
    libero_object) or a ManiSkill env id (default: libero_object/0, PushCube-v1)"""
    obs_mode: str = "state"
    """ManiSkill observation mode (state or rgb); LIBERO always uses images"""
    control_mode: str = "pd_joint_pos"
    """ManiSkill controller (the motion-planning demos' one)"""
    reward_mode: str = "sparse"
    """ManiSkill reward: sparse (success), or a shaped level (dense, normalized_dense) paid out as its change per step,
    so an episode sums to its final level (RLinf's relative reward); LIBERO is always sparse"""
    image_size: int = 64
    """camera resolution"""
    max_episode_steps: int = 0
    """0: 100 for ManiSkill (its registered 50 is too short), the suite's limit for LIBERO"""
    num_envs: int = 4
    """parallel training envs (worker processes on CPU)"""
    bootstrap: str = "truncation"
    """add γ·V(final obs) to a chunk's reward when it ends in: truncation (correct), always (RLinf's ManiSkill), none"""

    # Model and initialisation
    init: str = "sft:auto"
    """sft:PATH (our SFT checkpoint), sft:auto (runs/sft/..., made by algos/sft_pi0.py if missing), openpi:PATH, scratch"""
    model: str = "tiny"
    """preset for --init scratch: tiny, pi0 or pi05"""
    tokenizer: str = "bytes"
    """bytes, or PaliGemma's SentencePiece model (real weights)"""
    sft_demos: int = 0
    """demos per task for sft:auto (0: 3 on ManiSkill PushCube, 20 on LIBERO)"""
    sft_expert: str = "auto"
    """action expert of the checkpoint sft:auto makes: gemma (π0's), mlp (a 3x256 MLP velocity net on the pooled
    prefix, the state and x_t: the calibration's flow policy in the π0 wrapper), auto (mlp on ManiSkill with state
    observations, where --preset cpu has a measured recipe for it; gemma otherwise)"""
    train_expert_only: bool = True
    """freeze SigLIP and the Gemma VLM (πRL's default)"""
    keep_prefix_gib: float = 4.0
    """with a frozen VLM and cameras: keep each rollout sample's VLM prefix (K/V and states, a function of the
    observation alone) for the update instead of encoding its images again in every epoch (the same numbers; on the
    CPU LIBERO defaults re-encoding was ~80% of the update), while one iteration's prefixes fit in this many GiB
    (held twice for a moment while the update's batch is built; 0: always re-encode)"""
    train_head_only: bool = False
    """train only the action output projection (and the critic), the rest of the expert frozen: a cautious mode; it
    holds the SFT policy but on PushCube did not move it either (approx. KL ~0 at lr 3e-5)"""

    # Flow-SDE
    num_denoise_steps: int = 4
    """K, Euler steps per policy call"""
    noise_level: float = 0.5
    """a in sigma_i = a*sqrt(t/(1-t))"""
    joint: bool = False
    """every denoising step stochastic, log-prob = mean over the K+1 terms (RLinf joint_logprob)"""
    ignore_last: bool = False
    """draw the stochastic step from {0..K-2} instead of {0..K-1}"""
    sde_steps: str = ""
    """denoising steps the SDE step is drawn from, comma-separated (e.g. "0", the first and noisiest; empty: all K).
    The later steps' small sigma makes their log-prob gradients ~10x larger and, at CPU batch sizes, mostly noise"""
    chain_from_x1: bool = False
    """in the update, re-run the ODE steps before each sample's SDE step from its stored x_1 under the current
    weights (with gradients) instead of reusing the stored x_k: the ratio then sees the weight change that moves the
    SDE step's input too. With --sde-steps set to the last step (K-1) the log-prob is the exact density of the
    executed chunk given x_1; otherwise the ODE steps after the SDE step still move unseen"""
    ref_coef: float = 0.0
    """weight of a penalty that pulls the eval (ODE) policy's executed actions toward the starting policy's, on
    minibatch states and their stored x_1 (mean squared difference, model units): RLHF's KL-to-reference for a
    deterministic sampler. At CPU batch sizes the updates are mostly noise, and the weights' random walk loses a
    few-shot fit (a shuffled-advantage control collapsed as fast as the real run); this bounds the walk. 0: off (πRL)"""
    ref_samples: int = 64
    """minibatch samples the --ref-coef penalty is computed on (K expert passes with gradients each)"""
    ema_decay: float = 0.0
    """per-iteration decay of an exponential moving average of the trained weights, which the eval runs (and the
    checkpoint keeps): Polyak averaging, as diffusion-policy training evaluates an EMA. At CPU batch sizes an update
    is mostly noise; averaging the last ~1/(1-decay) iterations' weights cancels it and keeps their common drift.
    The rollouts still use the live weights. 0: off, the eval runs the live weights (πRL)"""
    eval_live: bool = False
    """with --ema-decay: also evaluate the live weights at each eval (eval/success_rate_live; twice the eval time)"""
    action_chunk: int = 8
    """actions executed per policy call (<= the model's horizon)"""
    noise_on: str = "executed"
    """executed (SDE noise only on the executed chunk steps and env action dims; the padded dims' noise would move the
    executed actions through the later denoising steps without entering the log-prob) or all (RLinf)"""

    # PPO
    total_iterations: int = 20
    """RL iterations (rollout + update)"""
    total_minutes: float = 0.0
    """stop after this much training wall clock (env start-up and evals not counted; 0: no limit)"""
    num_steps: int = 64
    """chunk steps per env per iteration (GAE mode)"""
    update_epochs: int = 2
    """PPO epochs per iteration"""
    minibatch_size: int = 256
    """chunk steps per minibatch (256 samples per Adam step: smaller ones made the tiny expert's updates noise)"""
    learning_rate: float = 1e-5
    """actor learning rate (expert + projections); 3e-5 threw a PushCube SFT policy from 0.82 to 0.20 in 60
    iterations, 3e-6 held it (0.82 -> 0.88) but did not lift a weak one (RLinf: 5e-6 to 8e-6 at 2-5k per step)"""
    value_lr: float = 1e-3
    """critic (value head) learning rate"""
    actor_warmup: int = 10
    """RL iterations over which the actor lr ramps linearly from 0 (the critic learns first, and Adam's first
    full-size steps on a tiny batch do not throw the SFT policy away: without it the first PushCube update moved the
    policy by an approx. KL of 0.17, 40x the later ones; 0 under --preset paper)"""
    anneal_lr: bool = False
    """decay the actor lr linearly to 0 over the run's budget, by the larger share used of --total-iterations and
    --total-minutes (CleanRL's anneal_lr; RLinf keeps it constant): late updates, mostly noise at CPU batch sizes,
    then move the weights less"""
    weight_decay: float = 0.01
    """AdamW weight decay (betas 0.9, 0.95 as RLinf)"""
    gamma: float = 0.99
    """discount over chunk steps"""
    gae_lambda: float = 0.95
    """GAE λ"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    value_clip: float = 0.2
    """value clipping around the rollout values"""
    huber_delta: float = 10.0
    """Huber δ of the value loss"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    norm_adv: bool = True
    """normalise GAE advantages over the batch (GRPO's are normalised within their groups already)"""
    logprob_type: str = "chunk"
    """chunk (one ratio per sample: log-probs summed) or token (one ratio per executed action element)"""
    critic: str = "obs"
    """expert (RLinf's π0: mean of the expert's action-token states; they see the sampled chain, so the "value"
    leaks the action), vlm (RLinf's π0.5: mean of the prefix states), obs (prefix mean + state: action-free),
    auto (RLinf's choice for the variant; --preset paper). With the expert critic PushCube PPO collapsed (0.56 -> 0.16
    in 10 iterations) where the obs critic held (0.64): the value of a sampled action is not a baseline.
    obs_ode: obs plus the chunk that the ODE (no SDE step) makes from the call's initial noise x_1: a baseline that
    knows which x_1 was drawn (x_1 moves the action far more than the SDE step does) but not the SDE step's draw, so
    it is still a valid baseline for that step's log-prob; costs one more ODE pass per policy call"""
    detach_critic_input: bool = True
    """stop critic gradients at the expert (πRL's π0 configs)"""
    adv_type: str = "gae"
    """gae (PPO with a critic) or grpo (group-relative, no critic)"""
    group_size: int = 4
    """GRPO: envs per group sharing one initial state (num_envs must be a multiple)"""
    filter_rewards: bool = True
    """GRPO: drop groups whose mean success is outside [0.1, 0.9]"""

    # Evaluation
    eval_every: int = 10
    """iterations between evaluations (also at the start and the end)"""
    probe_every: int = 10
    """iterations between measurements of how far an update moves the eval (ODE) policy's actions on 64 rollout
    states (losses/ode_action_change; two extra ODE passes, so not every iteration; 0: never)"""
    eval_episodes: int = 0
    """deterministic (ODE) eval episodes, initial states 0..N-1 (0: 50 on ManiSkill; 25 per LIBERO task, whose
    init states 25..49 made the SFT demos: a subset's N walk init states 0..N/T-1 of each of its T tasks)"""
    num_eval_envs: int = 0
    """parallel eval envs (0: 2, or a LIBERO subset's task count when it has 3-4 tasks: no env rebuild per episode)"""
    eval_at_start: bool = True
    """evaluate the starting policy before training (iteration 0 of the history); the πRL benchmark evaluates each
    SFT start once, in an eval-only run of its own (--total-iterations 0), and turns this off in the RL runs"""
    checkpoint_every: int = 5
    """iterations between checkpoints (resume points)"""


PAPER = {  # RLinf's πRL yaml values (pirl.md §3.5), π0 on LIBERO (flow_sde) and ManiSkill
    "libero": dict(critic='auto', noise_on='all', train_head_only=False, actor_warmup=0,
                   num_envs=64, num_denoise_steps=4,
                   noise_level=0.5, action_chunk=5, update_epochs=4, learning_rate=5e-06, value_lr=0.0001,
                   minibatch_size=2048, logprob_type='chunk', image_size=224, bootstrap='none', num_steps=48),
    "maniskill": dict(critic='auto', noise_on='all', train_head_only=False, actor_warmup=0,
                      num_envs=320, num_denoise_steps=4,
                      action_chunk=5, update_epochs=4, learning_rate=7.91e-06, value_lr=0.000155, minibatch_size=5120,
                      logprob_type='token', bootstrap='always', max_episode_steps=80, num_steps=16, image_size=224,
                      reward_mode='normalized_dense'),  # RLinf's ManiSkill reward is shaped and relative (§3.4)
}


# --preset cpu's PPO settings when --init loads an MLP action expert on ManiSkill (sft:auto makes one there): the
# calibration's recipe, measured on PushCube, 3 seeds x 12 min (README, πRL section); 480 iterations are ~470k env
# steps, ~6 minutes of training here. With the Gemma expert the class defaults stand (lr 3e-5 threw its SFT
# policy away).
CPU_MLP_EXPERT = dict(num_envs=16, num_steps=8, minibatch_size=128, learning_rate=3e-5, actor_warmup=0,
                      total_iterations=480, eval_every=40)


class ValueHead(nn.Module):
    """RLinf's critic MLP: ReLU hidden layers (Kaiming init), last layer N(0, 0.02) with bias."""

    def __init__(self, width: int, hidden: tuple[int, ...]):
        super().__init__()
        layers, d = [], width
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            nn.init.kaiming_normal_(layers[-2].weight, nonlinearity="relu")
            nn.init.zeros_(layers[-2].bias)
            d = h
        self.net = nn.Sequential(*layers, nn.Linear(d, 1))
        nn.init.normal_(self.net[-1].weight, std=0.02)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(x).squeeze(-1)


def sde_sigmas(num_steps: int, noise_level: float) -> torch.Tensor:
    """sigma_i = a*sqrt(t_i/(1 - t_i)) for i = 0..K-1; at t = 1 the denominator uses t_1 (sigma_0 = a*sqrt(K))."""
    ts = Pi0Model.timesteps(num_steps).double()
    denom = torch.where(ts == 1, ts[1], ts)
    return (noise_level * torch.sqrt(ts / (1 - denom)))[:-1].float()


def sde_transition(x_t, v, t, d, sigma):
    """Flow-SDE mean and std (Euler-Maruyama of the marginal-preserving reverse SDE); t, d, sigma broadcast."""
    x0, x1 = x_t - v * t, x_t + v * (1 - t)
    mean = x0 * (1 - (t - d)) + x1 * (t - d - sigma ** 2 * d / (2 * t))
    return mean, torch.sqrt(d) * sigma * torch.ones_like(mean)


def ode_chunk(model, prefix, state, num_steps: int, out, stochastic: set[int]) -> torch.Tensor:
    """What the `obs_ode` critic reads: the actions (B, H, action_dim) that the ODE makes from this call's initial
    noise x_1 (never the SDE step's draw: the baseline must not see it). `out`'s own when nothing was stochastic; else
    the chain up to the first SDE step is already the ODE's, and the ODE goes on from there."""
    if not stochastic:
        return out.actions
    x = out.chain[:, min(stochastic)]
    for i in range(min(stochastic), num_steps):
        x = model.transition(prefix, state, x, i, num_steps)[0]  # Euler: the ODE step
    return x


def make_step_fn(stochastic: set[int], sigmas: torch.Tensor, noise_mask: torch.Tensor | None = None):
    """The sampler hook: SDE on the steps in `stochastic`, ODE (std 0) elsewhere; with `noise_mask` (bool, broadcast
    to x) the SDE applies only where it is True and the rest of x follows the ODE."""

    def step_fn(i, x_t, v, h, t, d):
        ode = x_t - d * v
        if i not in stochastic:
            return ode, torch.zeros_like(x_t)
        mean, std = sde_transition(x_t, v, t, d, sigmas[i].to(x_t.device))
        if noise_mask is None:
            return mean, std
        return torch.where(noise_mask, mean, ode), std * noise_mask

    return step_fn


def draw_stochastic_steps(rng: random.Random, num_steps: int, joint: bool, ignore_last: bool,
                          candidates: list[int] | None = None) -> set[int]:
    """Which denoising steps are SDE in one policy call: all (joint), else ONE step shared by the whole batch, drawn
    with Python's `random` as RLinf does (from {0..K-2} with ignore_last, from `candidates` when given)."""
    if joint:
        return set(range(num_steps))
    if candidates:
        return {candidates[rng.randrange(len(candidates))]}
    return {rng.randrange(num_steps - 1 if ignore_last else num_steps)}


def chain_log_prob(out, stochastic: set[int], num_steps: int, joint: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise log-prob (B, H, A) of a sampled chain: the one SDE step's Gaussian, or with `joint` the mean over
    the K+1 terms [log N(x_1 | 0, I)] + [each transition] (RLinf's joint_logprob: a mean, not a sum); and the last
    transition's share of it (all of it when the SDE step is the last, else none)."""
    if joint:
        x1 = out.chain[:, 0]
        terms = [gaussian_log_prob(x1, torch.zeros_like(x1), torch.ones_like(x1))]
        terms += [gaussian_log_prob(out.chain[:, i + 1], out.means[:, i], out.stds[:, i]) for i in range(num_steps)]
        terms = torch.stack(terms, 1)
        return terms.mean(1), terms[:, -1] / terms.shape[1]
    (k,) = stochastic
    logp = gaussian_log_prob(out.chain[:, k + 1], out.means[:, k], out.stds[:, k])
    return logp, logp if k == num_steps - 1 else torch.zeros_like(logp)


def cut_chunk_log_ratio(new_logp, new_last, old_logp, old_last, executed, earlier_terms):
    """Per-element log-ratio (B, chunk*A) and loss weights where an episode ended mid-chunk (`executed` 0 for the
    actions that never ran). Such an element's draw at an earlier denoising step still moved the executed elements
    (through the later steps' velocities), so its term stays; only a last transition's, which moved nothing but the
    element itself, is left out. `earlier_terms` (B, 1): whether a sample has terms before its last transition."""
    cut = 1.0 - executed
    logratio = (new_logp - cut * new_last) - (old_logp - cut * old_last)
    return logratio, executed + cut * earlier_terms


def recompute_log_prob(model, prefix, state, chain, k, sigmas, joint: bool, from_x1: bool = False):
    """Log-prob (B, H, A) of stored chains under the current parameters, its last transition's share (as
    `chain_log_prob`), and the expert hidden states visited
    (B, steps, H, we). SDE: each sample's own step k (one batched forward, t per sample), its input x_k the stored
    one or, `from_x1`, re-made by the ODE steps from the stored x_1 under the current weights; joint: all K steps."""
    K = chain.shape[1] - 1
    ts = Pi0Model.timesteps(K, chain.device)
    sigmas = sigmas.to(chain.device)
    if joint:
        x1 = chain[:, 0]
        terms, hidden = [gaussian_log_prob(x1, torch.zeros_like(x1), torch.ones_like(x1))], []
        for i in range(K):
            v, h = model.velocity(prefix, state, chain[:, i], ts[i])
            mean, std = sde_transition(chain[:, i], v, ts[i], ts[i] - ts[i + 1], sigmas[i])
            terms.append(gaussian_log_prob(chain[:, i + 1], mean, std))
            hidden.append(h)
        terms = torch.stack(terms, 1)
        return terms.mean(1), terms[:, -1] / terms.shape[1], torch.stack(hidden, 1)
    B = chain.shape[0]
    idx = torch.arange(B, device=chain.device)
    x_t, x_next = chain[idx, k], chain[idx, k + 1]
    if from_x1:
        xs = [chain[:, 0]]
        for i in range(int(k.max())):
            xs.append(model.transition(prefix, state, xs[-1], i, K)[0])  # Euler: the ODE step of the rollout
        x_t = torch.stack(xs)[k, idx]
    v, h = model.velocity(prefix, state, x_t, ts[k])
    view = (B, 1, 1)
    mean, std = sde_transition(x_t, v, ts[k].view(view), (ts[k] - ts[k + 1]).view(view), sigmas[k].view(view))
    logp = gaussian_log_prob(x_next, mean, std)
    return logp, logp * (k == K - 1).view(view), h[:, None]


def expert_value(value_head, hidden, detach: bool):
    """π0 critic: mean over the action tokens of the expert states, a value per visited denoising step, then the mean
    over those steps (K at rollout; 1 for SDE or K for joint in training: RLinf's behaviour)."""
    feats = hidden.mean(2)
    return value_head(feats.detach() if detach else feats).mean(1)


def gae(rewards, values, dones, next_value, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation over (T, N) chunk steps; `dones[t]`: the episode ended at step t (its next
    value, an auto-reset env's, belongs to a new episode); `next_value`: the value after the last step."""
    advantages = torch.zeros(rewards.shape)
    lastgaelam = torch.zeros(rewards.shape[1:])
    for t in reversed(range(len(rewards))):
        nv = next_value if t == len(rewards) - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nv * nonterminal - values[t]
        lastgaelam = delta + gamma * lam * nonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages


def actor_loss(logratio, advantages, clip: float, weights):
    """PPO clipped surrogate, averaged over the elements the loss counts (`weights` 1/0: see cut_chunk_log_ratio); no dual clip (RLinf does not pass
    clip_ratio_c for openpi policies)."""
    ratio = logratio.exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return (loss * weights).sum() / weights.expand_as(loss).sum().clamp(min=1)


def value_loss(new_value, old_value, returns, clip: float, delta: float):
    """Huber loss with value clipping around the rollout values (max of the clipped and unclipped losses)."""
    clipped = old_value + (new_value - old_value).clamp(-clip, clip)
    return torch.max(F.huber_loss(new_value, returns, delta=delta, reduction="none"),
                     F.huber_loss(clipped, returns, delta=delta, reduction="none")).mean()


def freeze_all_but_head(model) -> None:
    """Only `action_out_proj` (expert hidden -> velocity) keeps gradients."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("action_out_proj."))


def make_env(args: Args, num_envs: int, eval_mode: bool = False, num_episodes: int | None = None,
             auto_reset: bool = True):
    return make_task_env(args.env, args.task, num_envs, obs_mode=args.obs_mode, control_mode=args.control_mode,
                         image_size=args.image_size, max_episode_steps=args.max_episode_steps, eval_mode=eval_mode,
                         num_eval_episodes=num_episodes, auto_reset=auto_reset, seed=args.seed,
                         reward_mode=args.reward_mode)


def sft_demo_count(args: Args) -> int:
    return args.sft_demos or (20 if args.env == "libero" else 3)  # the in-band recipes of benchmarks/sft_fewshot


def sft_expert(args: Args) -> str:
    if args.sft_expert != "auto":
        return args.sft_expert
    return "mlp" if args.env == "maniskill" and args.obs_mode == "state" else "gemma"


def sft_exp_name(args: Args) -> str:
    """The auto SFT run's name says how it was made: another demo count, observation mode or expert is another
    checkpoint."""
    obs = args.obs_mode if args.obs_mode == "state" else f"{args.obs_mode}{args.image_size}"
    return f"sft_pi0_{sft_demo_count(args)}demos_{obs}" + ("_mlp256" if sft_expert(args) == "mlp" else "")


def sft_auto_path(args: Args) -> Path:
    return ROOT / "runs" / "sft" / f"{args.task.replace('/', '_')}__{sft_exp_name(args)}__1" / "final"


def make_sft_checkpoint(args: Args, path: Path) -> None:
    """Run algos/sft_pi0.py (demos are generated if missing) to make the few-shot SFT start."""
    demos = sft_demo_count(args)
    cmd = [sys.executable, str(ROOT / "algos" / "sft_pi0.py"), "--env", args.env, "--task", args.task,
           "--num-demos", str(demos), "--run-dir", str(path.parent.parent), "--exp-name", sft_exp_name(args),
           "--seed", "1", "--resume",  # a first try killed mid-SFT continues from its checkpoint
           "--obs-mode", args.obs_mode, "--image-size", str(args.image_size), "--eval-episodes", "10",
           "--total-steps", "2000" if args.env == "libero" else "1500", "--eval-every", "100000",
           *(["--expert", "mlp", "--expert-width", "256"] if sft_expert(args) == "mlp" else [])]
    print(f"no SFT checkpoint at {path}: making one ({demos} demos, {sft_expert(args)} expert):\n  {' '.join(cmd)}",
          flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def load_policy(args: Args, tokenizer, device):
    kind, _, path = args.init.partition(":")
    if kind == "sft" and path in ("", "auto"):
        path = str(sft_auto_path(args))
        if existing_checkpoint(path) is None:  # (or its .old copy, where a kill came between SFT's two renames)
            make_sft_checkpoint(args, Path(path))
    try:
        return load_pi0_policy(f"{kind}:{path}" if kind != "scratch" else kind, env=args.env, obs_mode=args.obs_mode,
                               preset=args.model, device=device, instructions=task_instructions(args.env, args.task),
                               tokenizer=tokenizer)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{e}. Make an SFT checkpoint with: python algos/sft_pi0.py --env {args.env} --task "
                         f"{args.task} (it prints its path), or pass --init sft:auto")


if __name__ == "__main__":
    args = tyro.cli(Args)
    # TRY NOT TO MODIFY: argument checks and defaults
    if args.env not in ("libero", "maniskill"):
        raise SystemExit(f"--env must be libero or maniskill, got {args.env!r}")
    if args.preset not in ("cpu", "paper"):
        raise SystemExit(f"--preset must be cpu or paper, got {args.preset!r}")
    args.task = args.task or ("libero_object/0" if args.env == "libero" else "PushCube-v1")
    try:  # the task now, not after the model and the run directory are made
        check_task(args.env, args.task, exists=True)
    except ValueError as e:
        raise SystemExit(f"--task {args.task}: {e}")
    suite = args.task.split("/")[0]
    if args.preset == "paper":  # the paper's values for every flag left at its default (a flag given wins)
        pi05 = rlinf_pi05_values(args.env, suite, noise_level=True) if init_variant(args.init, args.model) == "pi05" \
            else {}
        kept = fill_defaults(args, {**PAPER[args.env], **(rlinf_libero_values(suite) if args.env == "libero" else {}),
                                    **pi05})
        if pi05:
            print("--preset paper, π0.5: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in pi05.items()),
                  flush=True)
        if kept:
            print(f"--preset paper: keeping the flags given ({', '.join(kept)}) over the paper's values", flush=True)
    elif args.env == "maniskill" and init_expert(args.init, sft_expert(args)) == "mlp":  # (a bad --sft-expert: below)
        kept = fill_defaults(args, CPU_MLP_EXPERT)
        print("--preset cpu with an MLP action expert: " + ", ".join(
            f"--{k.replace('_', '-')} {getattr(args, k)}" for k in CPU_MLP_EXPERT) +
              (f" (given: {', '.join(kept)})" if kept else ""), flush=True)
    if not args.max_episode_steps:
        args.max_episode_steps = MAX_EPISODE_STEPS[suite] if args.env == "libero" else 100
    for name, choices in (("bootstrap", ("truncation", "always", "none")), ("logprob_type", ("chunk", "token")),
                          ("noise_on", ("executed", "all")),
                          ("critic", ("auto", "expert", "vlm", "obs", "obs_ode")), ("adv_type", ("gae", "grpo")),
                          ("reward_mode", REWARD_MODES), ("sft_expert", ("auto", "gemma", "mlp")),
                          ("obs_mode", ("state", "rgb")), ("model", ("tiny", "pi0", "pi05"))):
        if getattr(args, name) not in choices:
            raise SystemExit(f"--{name.replace('_', '-')} must be one of {choices}, got {getattr(args, name)!r}")
    if args.init.partition(":")[0] not in ("sft", "openpi", "scratch") or args.init in ("openpi", "openpi:"):
        raise SystemExit(f"--init must be sft:PATH, sft:auto, openpi:PATH or scratch; got {args.init!r}")
    for name, low in (("num_envs", 1), ("num_steps", 1), ("update_epochs", 1), ("minibatch_size", 1),
                      ("group_size", 2), ("action_chunk", 1), ("total_iterations", 0), ("total_minutes", 0),
                      ("eval_episodes", 0), ("num_eval_envs", 0), ("sft_demos", 0), ("max_episode_steps", 0),
                      ("actor_warmup", 0), ("learning_rate", 0), ("value_lr", 0), ("keep_prefix_gib", 0),
                      ("image_size", 1), ("torch_threads", 0)):
        if getattr(args, name) < low:  # now, not after the model, an SFT run or the first rollout
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.noise_level <= 0:  # sigma 0: every step deterministic, no log-prob to train on
        raise SystemExit(f"--noise-level must be > 0, got {args.noise_level}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise SystemExit(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.env == "libero" and args.reward_mode != "sparse":
        raise SystemExit(f"--reward-mode {args.reward_mode}: LIBERO has only the sparse success reward")
    if args.env == "libero":
        from common.libero_env import eval_episode_count

        try:
            args.eval_episodes = eval_episode_count(args.eval_episodes, args.task)
        except ValueError as e:
            raise SystemExit(str(e))
    args.eval_episodes = args.eval_episodes or 50
    args.num_eval_envs = args.num_eval_envs or default_eval_envs(args.env, args.task)
    if args.adv_type == "grpo" and args.num_envs % args.group_size:
        raise SystemExit(f"--num-envs {args.num_envs} must be a multiple of --group-size {args.group_size}")
    K = args.num_denoise_steps
    try:
        sde_steps = sorted({int(x) for x in args.sde_steps.split(",") if x.strip()})
    except ValueError:
        sde_steps = None
    if sde_steps is None or any(not 0 <= k < K for k in sde_steps) or (sde_steps and (args.joint or args.ignore_last)):
        raise SystemExit(f"--sde-steps must be comma-separated steps in [0, {K - 1}] (without --joint / --ignore-last), "
                         f"got {args.sde_steps!r}")
    if args.chain_from_x1 and args.joint:
        raise SystemExit("--chain-from-x1 re-makes the input of the one SDE step; --joint stores every step's input")
    if args.ignore_last and args.joint:
        raise SystemExit("--ignore-last keeps the one SDE step off the last denoising step; --joint makes every step "
                         "stochastic")
    if args.eval_live and not args.ema_decay:
        raise SystemExit("--eval-live evaluates the live weights beside the EMA's: give --ema-decay too")
    if args.eval_every < 1 or args.checkpoint_every < 1:
        raise SystemExit(f"--eval-every and --checkpoint-every are iteration counts >= 1 (the start and the end "
                         f"are always evaluated and saved), got {args.eval_every} and {args.checkpoint_every}")
    if args.probe_every < 0:
        raise SystemExit(f"--probe-every is an iteration count (0: never), got {args.probe_every}")
    if args.ref_coef < 0 or args.ref_samples < 1:
        raise SystemExit(f"--ref-coef must be >= 0 and --ref-samples >= 1, got {args.ref_coef} and {args.ref_samples}")
    if K < 1 or (args.ignore_last and K < 2):
        raise SystemExit(f"--num-denoise-steps must be >= 1 (>= 2 with --ignore-last), got {K}")

    run_name = f"{args.task.replace('/', '_')}__{args.exp_name}__{args.seed}"
    run_dir = Path(args.run_dir) / run_name
    ckpt_dir = run_dir / "checkpoint"
    resume_dir = existing_checkpoint(ckpt_dir)  # or checkpoint.old, where a kill came mid-save
    if (resume_dir or (run_dir / "summary.json").exists()) and not args.resume:
        raise SystemExit(f"{run_dir} exists; pass --resume to continue it or choose another --exp-name")
    if args.resume and not resume_dir:  # a typo in --exp-name must not pass for a resume
        print(f"--resume: no checkpoint in {run_dir}, starting a new run", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name,
                   mode=os.environ.get("WANDB_MODE", "offline"))
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    rng = random.Random(args.seed)  # RLinf draws the SDE step with Python's random module

    # Policy, critic, optimiser
    tokenizer = make_tokenizer(args.tokenizer)
    model, norm_stats, env_action_dim, camera_keys = load_policy(args, tokenizer, device)
    cfg = model.cfg
    if not 1 <= args.action_chunk <= cfg.horizon:
        raise SystemExit(f"--action-chunk must be in [1, horizon={cfg.horizon}], got {args.action_chunk}")
    processor = Pi0Processor(cfg, tokenizer, norm_stats, env_action_dim, camera_keys)
    if args.train_expert_only:
        model.freeze_vlm()
    if args.train_head_only:
        freeze_all_but_head(model)
    # the policy the --ref-coef penalty pulls toward: the one loaded by --init (also when resuming), frozen
    ref_model = copy.deepcopy(model).requires_grad_(False).eval() if args.ref_coef else None
    critic_on = ("vlm" if cfg.is_pi05 else "expert") if args.critic == "auto" else args.critic
    if not args.detach_critic_input and critic_on != "expert":
        raise SystemExit(f"--no-detach-critic-input lets the expert critic's gradients into the action expert; the "
                         f"{critic_on} critic reads the prefix, always detached")
    critic_width = {"vlm": cfg.vlm_width, "obs": cfg.vlm_width + cfg.action_dim,
                    "obs_ode": cfg.vlm_width + cfg.action_dim + args.action_chunk * env_action_dim}.get(critic_on,
                                                                                                cfg.expert_width)
    value_head = ValueHead(critic_width, (512, 256, 128) if critic_on == "expert" else (1024, 512, 256)).to(device)
    actor_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": actor_params, "lr": args.learning_rate},
                                   {"params": list(value_head.parameters()), "lr": args.value_lr}],
                                  betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay,
                                  fused=True)  # one kernel per step (CPU and CUDA): the update is many small tensors
    sigmas = sde_sigmas(K, args.noise_level)
    ts = Pi0Model.timesteps(K).to(device)
    chunk, A = args.action_chunk, env_action_dim
    noise_mask = None
    if args.noise_on == "executed":
        noise_mask = torch.zeros(1, cfg.horizon, cfg.action_dim, dtype=torch.bool, device=device)
        noise_mask[:, :chunk, :A] = True
    start_iter, global_step, history, resumed_rngs = 0, 0, [], {}
    if args.resume and resume_dir:
        model, norm_stats, meta = load_pi0(resume_dir, device)
        if args.train_expert_only:
            model.freeze_vlm()
        if args.train_head_only:
            freeze_all_but_head(model)
        actor_params = [p for p in model.parameters() if p.requires_grad]
        optimizer.param_groups[0]["params"] = actor_params
        try:
            state = read_torch_state(resume_dir / "trainer.pt")
        except ValueError as e:
            raise SystemExit(f"--resume: {e}") from None
        value_head.load_state_dict(state["value_head"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        resumed_rngs = state
        rng.setstate((state["py_rng"][0], tuple(state["py_rng"][1]), state["py_rng"][2]))
        start_iter, global_step, history = meta["extra"]["iteration"], meta["extra"]["global_step"], meta["extra"]["history"]
        print(f"resuming {run_name} at iteration {start_iter}")
    # --ema-decay: the eval's weights, an average of the live ones (from the start's, or the checkpoint's)
    ema_params = None
    if args.ema_decay:
        ema_params = [t.to(device) for t in resumed_rngs["ema"]] if "ema" in resumed_rngs else \
            [p.detach().clone() for p in actor_params]

    prompt_prefixes = PromptPrefixCache(model)  # state-only tasks: the frozen VLM sees only the prompt
    # policy calls per env per rollout; with a frozen VLM and cameras the rollout's prefixes are kept for the update
    max_calls = args.num_steps if args.adv_type == "gae" else math.ceil(args.max_episode_steps / chunk)
    keep_prefix = RolloutPrefixKeeper(args.keep_prefix_gib if args.train_expert_only and
                                      prompt_prefixes.per_observation else 0, args.num_envs * max_calls)

    def prefix_of(batch, grad: bool):
        """The VLM prefix (cached K/V): the one kept from the rollout, else encoded."""
        kept = prefix_from(batch)
        if kept is not None:
            return kept
        inputs = (batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"])
        if args.train_expert_only:
            return prompt_prefixes(*inputs)
        with torch.set_grad_enabled(grad):
            return model.encode_prefix(*inputs)

    def prefix_and_value(batch, grad: bool):
        """The VLM prefix and, for the VLM critic, the value from the mean of the valid prefix states."""
        prefix = prefix_of(batch, grad)
        # obs_ode: only once act() has put the ODE chunk into the batch
        value = obs_value(prefix, batch) if critic_on in ("vlm", "obs") or "ode_chunk" in batch else None
        return prefix, value

    def obs_value(prefix, batch):
        """The vlm / obs / obs_ode critics' value from an already computed prefix."""
        feats = pooled_prefix(prefix).detach()
        if critic_on != "vlm":  # π0 keeps the state out of the prefix: give it to the critic directly
            feats = torch.cat([feats, batch["state"].float()], -1)
        if critic_on == "obs_ode":
            feats = torch.cat([feats, batch["ode_chunk"].flatten(1)], -1)
        return value_head(feats)

    def act(obs, deterministic: bool, generator=None):
        """One policy call -> env actions (B, chunk, A) and the rollout record."""
        batch = processor.batch(obs["state"], obs.get("images"), obs["task_description"], device)
        with torch.no_grad():
            prefix, value = prefix_and_value(batch, grad=False)
            B = batch["state"].shape[0]
            noise = model.initial_noise(B, device, generator)
            stochastic = set() if deterministic else \
                draw_stochastic_steps(rng, K, args.joint, args.ignore_last, sde_steps)
            out = model.sample(prefix, batch["state"], noise, K, make_step_fn(stochastic, sigmas, noise_mask), generator)
            if critic_on == "obs_ode":
                ode = ode_chunk(model, prefix, batch["state"], K, out, stochastic)
                batch["ode_chunk"] = ode[:, :chunk, :A].float()
                value = obs_value(prefix, batch)  # the prefix is already there: not encoded again
            if critic_on == "expert":
                value = expert_value(value_head, out.hidden, args.detach_critic_input)
            logp, last = chain_log_prob(out, stochastic, K, args.joint) if stochastic else \
                (torch.zeros_like(noise), torch.zeros_like(noise))
        if not deterministic:
            keep_prefix(batch, prefix)
        actions = processor.actions_to_env(out.actions[:, :chunk], obs["state"])
        k = -1 if args.joint or not stochastic else next(iter(stochastic))
        record = {"batch": batch, "chain": out.chain, "k": torch.full((B,), k, dtype=torch.long, device=device),
                  "logp": logp[:, :chunk, :A].reshape(B, -1), "logp_last": last[:, :chunk, :A].reshape(B, -1),
                  "value": value}
        return actions, record

    def value_of(obs):
        """V(obs) for bootstrapping: the critic alone when it reads the observation (no denoising chain); the expert
        critic reads the expert's states, and obs_ode the ODE chunk, so they need a deterministic chain (fresh x_1)."""
        if critic_on in ("expert", "obs_ode"):
            return act(obs, deterministic=True)[1]["value"]
        batch = processor.batch(obs["state"], obs.get("images"), obs["task_description"], device)
        with torch.no_grad():
            return prefix_and_value(batch, grad=False)[1]

    def recompute(batch, chain, k):
        """Log-probs (B, chunk*A), their last transitions' shares and values (B,) of stored transitions under the
        current parameters."""
        prefix, value = prefix_and_value(batch, grad=True)
        logp, last, hidden = recompute_log_prob(model, prefix, batch["state"], chain, k, sigmas, args.joint,
                                                args.chain_from_x1)
        if critic_on == "expert":
            value = expert_value(value_head, hidden, args.detach_critic_input)
        B = chain.shape[0]
        return logp[:, :chunk, :A].reshape(B, -1), last[:, :chunk, :A].reshape(B, -1), value

    def ode_actions(batch, noise):
        """The deterministic (ODE) policy's executed actions (B, chunk, A) from the given initial noise, model units."""
        with torch.no_grad():
            prefix = prefix_of(batch, grad=False)  # (no value: the probe reads only actions)
            return model.sample(prefix, batch["state"], noise, K, make_step_fn(set(), sigmas)).actions[:, :chunk, :A]

    def reference_penalty(batch, x1):
        """Mean squared difference between the ODE policy's executed actions and the reference policy's, from x1."""
        prefix = prefix_of(batch, grad=True)
        with torch.no_grad():
            ref_prefix = prefix if args.train_expert_only else \
                ref_model.encode_prefix(batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"])
            target = ref_model.sample(ref_prefix, batch["state"], x1, K).actions[:, :chunk, :A]
        return (model.sample(prefix, batch["state"], x1, K).actions[:, :chunk, :A] - target).pow(2).mean()

    eval_seconds = [0.0]  # eval time, kept out of SPS and of the training wall clock

    @contextlib.contextmanager
    def eval_weights(live: bool):
        """The weights the eval runs: the EMA's (--ema-decay), swapped in for its duration, or the live ones."""
        if ema_params is None or live:
            yield
            return
        with torch.no_grad():
            kept = [p.detach().to("cpu", copy=True) for p in actor_params]  # not a second copy on the GPU
            for p, e in zip(actor_params, ema_params):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(actor_params, kept):
                    p.copy_(k)

    def evaluate(step: int, live: bool = False) -> dict:
        t0 = time.time()
        env = make_env(args, min(args.num_eval_envs, args.eval_episodes), eval_mode=True,
                       num_episodes=args.eval_episodes)
        gen = torch.Generator(device=device).manual_seed(args.seed)  # the same noise every eval: deterministic
        model.eval()
        video = run_dir / f"eval_{step}{'_live' if live and ema_params is not None else ''}.mp4"
        try:
            with eval_weights(live):
                stats = run_eval_episodes(env, lambda obs: act(obs, deterministic=True, generator=gen)[0],
                                          video if args.capture_video else None)
        finally:
            model.train()
        eval_seconds[0] += time.time() - t0
        return stats

    def rng_states() -> dict:
        """What a resumed run needs to go on drawing where this one stopped: initial states (env and GRPO groups),
        CUDA noise."""
        np_state = np.random.get_state()
        return {"cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "draws": json.dumps({"env": envs.rng_state, "np": [np_state[0], np_state[1].tolist(), *np_state[2:]]})}

    def save(iteration: int) -> None:
        buf = io.BytesIO()
        py_state = rng.getstate()
        torch.save({"value_head": value_head.state_dict(), "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(), "py_rng": [py_state[0], list(py_state[1]), py_state[2]],
                    **({"ema": ema_params} if ema_params is not None else {}), **rng_states()}, buf)
        save_pi0(ckpt_dir, model, norm_stats, processor.tokenizer.name,
                 extra={"iteration": iteration, "global_step": global_step, "history": history,
                        "train_minutes": (time.time() - start_time - eval_seconds[0]) / 60,
                        **({"sim_seconds": sim_seconds[0]} if sim_known else {}),
                        "camera_keys": list(camera_keys), "args": asdict(args)},
                 extra_files={"trainer.pt": buf.getvalue()})

    # TRY NOT TO MODIFY: start the game
    print(f"{args.env} {args.task}: π0 {cfg.variant} ({sum(p.numel() for p in actor_params):,} parameters trained), "
          f"Flow-SDE K={K} a={args.noise_level}{' joint' if args.joint else ''}, critic on {critic_on}, "
          f"{args.num_envs} envs, device {device}")
    if start_iter == 0 and args.eval_at_start:
        stats = evaluate(0)
        history.append({"iteration": 0, "global_step": 0, "minutes": 0.0, **stats})
        writer.add_scalar("eval/success_rate", stats["success_rate"], 0)
        print(f"SFT start: eval success {stats['success_rate']:.2f} over {stats['episodes']} episodes")
    training = start_iter < args.total_iterations  # --total-iterations 0: an eval-only run, no training envs
    if training:
        envs = make_env(args, args.num_envs, auto_reset=args.adv_type == "gae")
        draws = json.loads(resumed_rngs["draws"]) if "draws" in resumed_rngs else None
        if draws is not None:  # go on drawing initial states (and groups) where the run stopped, from the first reset
            envs.rng_state = draws["env"]
            np.random.set_state((draws["np"][0], np.asarray(draws["np"][1], np.uint32), *draws["np"][2:]))
            if resumed_rngs["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(resumed_rngs["cuda_rng"])
        obs = envs.reset(seed=args.seed if draws is None else None)  # (reseeded, it would replay the first states)
    # the training clock starts here, as in CleanRL: env start-up and the start's eval are outside it, like evals
    eval_seconds[0] = 0.0
    start_time = time.time() - (meta["extra"].get("train_minutes", 0.0) * 60 if start_iter else 0.0)  # resumed
    # seconds spent inside envs.step while training: the simulator's own speed in this run, next to the training's
    # (unknown for a run resumed from a checkpoint that did not count them: then not reported)
    sim_known = not start_iter or "sim_seconds" in meta["extra"]
    sim_seconds = [meta["extra"].get("sim_seconds", 0.0) if start_iter else 0.0]
    bar = tqdm(range(start_iter, args.total_iterations), initial=start_iter, total=args.total_iterations,
               desc="flow-sde", mininterval=2.0)
    for iteration in bar:
        it_start = time.time()
        # ---------------------------------------------------------------- ALGO LOGIC: rollout in action chunks
        records, rewards, dones, masks, episode_stats = [], [], [], [], []
        if args.adv_type == "grpo":  # one episode per env; groups of envs share an initial state
            group_ids = np.random.randint(0, envs.num_reset_ids, args.num_envs // args.group_size)
            obs = envs.reset(reset_ids=np.repeat(group_ids, args.group_size).tolist())
        alive = torch.ones(args.num_envs, dtype=torch.bool)
        episode_success = torch.zeros(args.num_envs)  # GRPO: each env's one episode (the reward filter's success)
        for step in range(max_calls):
            actions, rec = act(obs, deterministic=False)
            actions, sim_start = actions.cpu(), time.time()
            obs, reward, terminated, truncated, info = envs.step(actions)
            sim_seconds[0] += time.time() - sim_start
            done = (terminated | truncated).cpu()
            reward = reward.sum(1).cpu()  # chunk-level reward: the executed steps' sum
            executed = info["executed_steps"].cpu()
            global_step += int(executed.sum())
            # an episode that ended mid-chunk never ran the chunk's later actions: their last transitions' terms stay
            # out of the log-prob (see cut_chunk_log_ratio)
            rec["executed"] = (torch.arange(chunk)[None, :, None] < executed[:, None, None]).expand(-1, -1, A) \
                .reshape(len(executed), -1).to(device)
            if args.adv_type == "gae" and done.any() and args.bootstrap != "none":
                boot = truncated.cpu() if args.bootstrap == "truncation" else done
                if boot.any():
                    final = info["final_observation"]
                    idx = torch.nonzero(boot).flatten()
                    sub = {"state": final["state"][idx], "task_description": [final["task_description"][i] for i in idx]}
                    if "images" in final:
                        sub["images"] = {key: val[idx] for key, val in final["images"].items()}
                    reward[idx] += args.gamma * value_of(sub).cpu()
            records.append(rec)
            rewards.append(reward)
            dones.append(done)
            masks.append(alive.clone())
            if args.adv_type == "grpo":  # one episode per env: its chunk steps after the first done are padding
                ended = alive & done
                if ended.any() and "episode" in info:
                    episode_success[ended] = torch.as_tensor(info["episode"]["success_once"]).float().cpu()[ended]
                alive &= ~done
            if "episode" in info:
                for i in torch.nonzero(info["done"]).flatten().tolist():
                    episode_stats.append((float(info["episode"]["return"][i]), float(info["episode"]["success_once"][i])))
            if args.adv_type == "grpo" and not alive.any():
                break
        T = len(records)
        rewards_t, dones_t, masks_t = torch.stack(rewards), torch.stack(dones).float(), torch.stack(masks).float()

        # ---------------------------------------------------------------- ALGO LOGIC: advantages
        with torch.no_grad():
            if args.adv_type == "gae":
                values = torch.stack([r["value"].cpu() for r in records])
                next_value = value_of(obs).cpu()
                advantages = gae(rewards_t, values, dones_t, next_value, args.gamma, args.gae_lambda)
                returns = advantages + values
            else:
                values = torch.zeros(T, args.num_envs)
                episode_return = (rewards_t * masks_t).sum(0).view(-1, args.group_size)
                mean, std = episode_return.mean(1, keepdim=True), episode_return.std(1, keepdim=True)
                group_adv = ((episode_return - mean) / (std + 1e-6)).view(-1)
                advantages = group_adv[None].expand(T, -1).clone()
                if args.filter_rewards:  # success in [0.1, 0.9]: groups that all fail or all succeed teach nothing
                    # success itself, not return > 0: a shaped reward's return is > 0 after almost any progress
                    success = episode_success.view(-1, args.group_size).mean(1)
                    keep = ((success >= 0.1) & (success <= 0.9)).repeat_interleave(args.group_size)
                    masks_t = masks_t * keep[None].float()
                returns = advantages

        # flatten the rollout: (T, N) -> T*N samples, only masked-in ones
        flat_mask = masks_t.reshape(-1).bool()
        def cat(key):
            return torch.cat([r[key] for r in records])
        batch_keys = records[0]["batch"].keys()
        data = {k: torch.cat([r["batch"][k] for r in records])[flat_mask.to(device)] for k in batch_keys}
        for r in records:  # the update reads `data`: the rollout's copies (and kept prefixes) can go
            del r["batch"]
        chains, ks, logp_old = cat("chain")[flat_mask.to(device)], cat("k")[flat_mask.to(device)], cat("logp")[flat_mask.to(device)]
        last_old = cat("logp_last")[flat_mask.to(device)]
        executed_mask = cat("executed")[flat_mask.to(device)].float()
        adv_flat, ret_flat = advantages.reshape(-1)[flat_mask].to(device), returns.reshape(-1)[flat_mask].to(device)
        val_flat = values.reshape(-1)[flat_mask].to(device)
        n_samples = int(flat_mask.sum())
        if args.norm_adv and args.adv_type == "gae" and n_samples > 1:  # once, over the whole batch (the spec);
            adv_flat = (adv_flat - adv_flat.mean()) / (adv_flat.std() + 1e-8)  # GRPO's again would shift their signs
        rollout_time = time.time() - it_start

        # ---------------------------------------------------------------- ALGO LOGIC: PPO update
        # the eval policy's actions on up to 64 rollout states, before and after: how far the update moves what runs
        # at eval, which the ratio of the sampled steps alone does not measure
        probe = probe_noise = actions_before = None
        if n_samples and args.probe_every and iteration % args.probe_every == 0:
            probe = {k: v[:64] for k, v in data.items()}
            probe_noise = model.initial_noise(len(probe["state"]), device,
                                              torch.Generator(device=device).manual_seed(0))
            actions_before = ode_actions(probe, probe_noise)
        lr_scale = min(1.0, iteration / args.actor_warmup) if args.actor_warmup else 1.0
        if args.anneal_lr:  # linear decay to 0 over whichever budget (iterations, minutes) runs out first
            used = iteration / args.total_iterations
            if args.total_minutes:
                used = max(used, (time.time() - start_time - eval_seconds[0]) / 60 / args.total_minutes)
            lr_scale *= max(0.0, 1.0 - used)
        optimizer.param_groups[0]["lr"] = args.learning_rate * lr_scale
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        clipfracs, approx_kls, pg_losses, v_losses, ref_losses, first_ratio_err = [], [], [], [], [], None
        for epoch in range(args.update_epochs if n_samples else 0):
            perm = torch.randperm(n_samples, device=device)
            for start in range(0, n_samples, args.minibatch_size):
                mb = perm[start:start + args.minibatch_size]
                mb_batch = {k: v[mb] for k, v in data.items()}
                k_mb = ks[mb].clamp(min=0)
                new_logp, new_last, new_value = recompute(mb_batch, chains[mb], k_mb)
                earlier = (torch.full_like(k_mb, K > 1) if args.joint else k_mb < K - 1).float()[:, None]
                logratio, weights = cut_chunk_log_ratio(new_logp, new_last, logp_old[mb], last_old[mb],
                                                        executed_mask[mb], earlier)
                if args.logprob_type == "chunk":
                    logratio, weights = logratio.sum(-1, keepdim=True), weights.amax(-1, keepdim=True)
                ratio = logratio.exp()
                if epoch == 0 and start == 0:
                    first_ratio_err = float((ratio.detach() - 1).abs().max())
                mb_adv = adv_flat[mb][:, None]
                pg_loss = actor_loss(logratio, mb_adv, args.clip_coef, weights)
                loss = pg_loss
                if args.adv_type == "gae":
                    v_loss = value_loss(new_value, val_flat[mb], ret_flat[mb], args.value_clip, args.huber_delta)
                    loss = loss + v_loss
                    v_losses.append(v_loss.item())
                if ref_model is not None:
                    sub = mb[:args.ref_samples]
                    ref_loss = reference_penalty({k: v[sub] for k, v in data.items()}, chains[sub][:, 0])
                    loss = loss + args.ref_coef * ref_loss
                    ref_losses.append(ref_loss.item())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(actor_params + list(value_head.parameters()), args.max_grad_norm)
                optimizer.step()
                with torch.no_grad():  # over the elements the loss counts (a left-out one has ratio 1 by construction)
                    counted = weights.sum().clamp(min=1)
                    approx_kls.append(float((((ratio - 1) - logratio) * weights).sum() / counted))
                    clipfracs.append(float((((ratio - 1).abs() > args.clip_coef) * weights).sum() / counted))
                pg_losses.append(pg_loss.item())

        if ema_params is not None:
            with torch.no_grad():
                for e, p in zip(ema_params, actor_params):
                    e.lerp_(p.detach(), 1.0 - args.ema_decay)
        if actions_before is not None:  # mean |change| of the eval policy's actions (normalised units)
            change = (ode_actions(probe, probe_noise) - actions_before).abs().mean()
            writer.add_scalar("losses/ode_action_change", float(change), global_step)
        # TRY NOT TO MODIFY: record rewards for plotting purposes
        elapsed = time.time() - start_time - eval_seconds[0]  # training wall clock
        if episode_stats:
            writer.add_scalar("charts/episodic_return", np.mean([e[0] for e in episode_stats]), global_step)
            writer.add_scalar("charts/success_rate", np.mean([e[1] for e in episode_stats]), global_step)
        writer.add_scalar("charts/SPS", int(global_step / max(elapsed, 1e-6)), global_step)
        # the simulator alone (time in envs.step): SPS over it is the share of training time spent simulating
        if sim_known:
            writer.add_scalar("charts/sim_SPS", int(global_step / max(sim_seconds[0], 1e-6)), global_step)
        writer.add_scalar("charts/train_samples", n_samples, global_step)
        writer.add_scalar("losses/policy_loss", np.mean(pg_losses) if pg_losses else 0.0, global_step)
        writer.add_scalar("losses/value_loss", np.mean(v_losses) if v_losses else 0.0, global_step)
        if ref_losses:
            writer.add_scalar("losses/ref_penalty", np.mean(ref_losses), global_step)
        writer.add_scalar("losses/approx_kl", np.mean(approx_kls) if approx_kls else 0.0, global_step)
        writer.add_scalar("losses/clipfrac", np.mean(clipfracs) if clipfracs else 0.0, global_step)
        writer.add_scalar("losses/first_ratio_error", float("nan") if first_ratio_err is None else first_ratio_err,
                          global_step)  # NaN: no minibatch trained this iteration (not a perfect ratio)
        if args.adv_type == "gae" and n_samples > 1:  # how much of the return the rollout's values explained
            var_returns = float(ret_flat.var())
            writer.add_scalar("losses/explained_variance", float("nan") if var_returns == 0 else
                              1 - float((ret_flat - val_flat).var()) / var_returns, global_step)
        writer.add_scalar("time/rollout", rollout_time, global_step)
        writer.add_scalar("time/update", time.time() - it_start - rollout_time, global_step)
        del records, data, probe  # not alive through the eval and the next rollout
        bar.set_postfix(success=f"{np.mean([e[1] for e in episode_stats]) if episode_stats else float('nan'):.2f}",
                        steps=global_step)
        done_iters = iteration + 1
        out_of_time = args.total_minutes and elapsed / 60 >= args.total_minutes
        if done_iters % args.eval_every == 0 or done_iters == args.total_iterations or out_of_time:
            stats = evaluate(done_iters)
            if ema_params is not None and args.eval_live:
                live_stats = evaluate(done_iters, live=True)
                stats["live_success_rate"], stats["live_episodic_return"] = (live_stats["success_rate"],
                                                                             live_stats["episodic_return"])
                writer.add_scalar("eval/success_rate_live", stats["live_success_rate"], global_step)
            history.append({"iteration": done_iters, "global_step": global_step, "minutes": elapsed / 60, **stats})
            writer.add_scalar("eval/success_rate", stats["success_rate"], global_step)
            live = f" (live weights {stats['live_success_rate']:.2f})" if "live_success_rate" in stats else ""
            tqdm.write(f"iteration {done_iters}: eval success {stats['success_rate']:.2f}{live} ({global_step} env "
                       f"steps, {elapsed / 60:.1f} min)")
        if done_iters % args.checkpoint_every == 0 or done_iters == args.total_iterations or out_of_time:
            save(done_iters)
        if out_of_time:
            break
    # the training clock where the last checkpoint read it (closing the envs and saving are not training)
    train_minutes = (time.time() - start_time - eval_seconds[0]) / 60
    if training:
        envs.close()
    ema_dir = run_dir / "ema_policy"
    if ema_params is not None and training:  # the policy the evals scored, loadable as --init sft:<run>/ema_policy
        with eval_weights(live=False):
            save_pi0(ema_dir, model, norm_stats, processor.tokenizer.name,
                     extra={"iteration": done_iters, "global_step": global_step, "ema_decay": args.ema_decay})
    summary = {"task": args.task, "env": args.env, "algorithm": "flow_sde" + ("_joint" if args.joint else ""),
               "start_success": history[0]["success_rate"] if history and history[0]["iteration"] == 0 else None,
               "final_success": history[-1]["success_rate"] if history else None,
               "env_steps": global_step, "minutes": train_minutes,
               "sim_seconds": sim_seconds[0] if sim_known else None,
               "history": history, "args": asdict(args)}
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=1))
    start, final = ("-" if x is None else f"{x:.2f}" for x in (summary["start_success"], summary["final_success"]))
    print(f"\n{args.task}: eval success {start} (SFT start) -> {final} "
          f"after {global_step} env steps in {summary['minutes']:.1f} min. Checkpoint: {ckpt_dir}"
          + (f"; the EMA policy the evals scored: {ema_dir}" if ema_dir.exists() else ""))
    writer.close()
