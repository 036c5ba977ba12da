"""Two-stage MAPPO for multi-UAV formation flight with static and dynamic obstacle avoidance.

Reproduces Xie et al., "Multi-UAV Formation Control with Static and Dynamic Obstacle Avoidance via Reinforcement
Learning" (arXiv 2410.18495; code thu-uav/multi-UAV-formation) on our batched CPU env (common/uav_formation_env.py):
- stage 1: random search over linear utilities w on the simplex (U[0,1]^4 normalised, numpy seed 1 as the released
  code): each candidate is trained in a simplified scenario and evaluated on the four objectives (formation,
  obstacle, forward, smoothness), every candidate from the same initial states; `weights.csv`; the winner maximises the
  worst min-max-normalised objective (tie-break: collision-free rate). `--weights paper` or `--weights a,b,c,d`
  skips it;
- stage 2: a curriculum free -> static -> mixed with the chosen w, each period warm-started from the last, with fixed
  frame budgets in the paper's ratio 1:10:10 (or `--gate`: advance once the collision-free rate passes 0.9), the
  learning-rate decay starting again each period (the paper trains each as a new run from the last checkpoint,
  which also starts Adam afresh; here Adam's moments carry over);
- MAPPO with a shared actor and the paper's attention encoder (per-type embeddings, masked self-attention over all
  tokens, cross-attention from the self token); the critic sees the agent's observation (as released) or the global
  state (`--critic state`, true MAPPO); value normalisation, Huber value loss clipped around the critic's rollout
  output, a gradient-norm clip per network, the paper's PPO hyper-parameters.
Ablations: `--no-curriculum`, `--encoder mlp`, `--critic state`. Eval: collision-free rate, formation error (m),
arrival, success per preset (static, dynamic, mixed), with top-view trajectory plots.

    python algos/mappo_uav_formation.py                       # stage 1 + stage 2 at CPU scale, then the eval
    python algos/mappo_uav_formation.py --weights paper --frames 0.2,2,2
    python algos/mappo_uav_formation.py --weights paper --resume   # after an interruption: the same flags + --resume

Each curriculum period also leaves `checkpoint_after_period<k>_<preset>.pt` in the run directory. A variant of the
later periods (another reward while the balls fly, say) can branch from one: copy it to `checkpoint.pt` in a new run
directory (another --exp-name) and start that run with its own flags and --resume.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.fsutil import atomic_write  # noqa: E402
from common.uav_formation_env import (END_CAUSES, FORMATION_REWARDS, OBJECTIVES, PRESETS,  # noqa: E402
                                      FormationConfig, FormationEnv)

PAPER_WEIGHTS = (0.142, 0.219, 0.126, 0.512)  # formation, obstacle, forward, smoothness (released)
SHAPE_FLAGS = ("encoder", "critic", "attention_dim", "num_drones", "static_mode", "static_top_k")  # a resume keeps them


@dataclass
class Args:
    exp_name: str = "mappo_uav_formation"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """torch.backends.cudnn.deterministic"""
    torch_threads: int = 2
    """torch CPU threads (0: torch's default)"""
    cuda: bool = True
    """env and networks on CUDA when available"""
    track: bool = False
    """log to Weights & Biases (offline unless WANDB_MODE says otherwise)"""
    wandb_project_name: str = "rlinf-hackable"
    """W&B project"""
    run_dir: str = "runs"
    """where runs go: <run_dir>/uav_formation__<exp_name>__<seed>/"""
    resume: bool = False
    """continue this run (same --exp-name / --seed) from its checkpoint"""

    # Pipeline
    weights: str = ""
    """skip stage 1: 'paper' (0.142, 0.219, 0.126, 0.512) or four numbers 'formation,obstacle,forward,smooth'"""
    num_candidates: int = 8
    """stage 1: utility vectors tried (paper: 20)"""
    search_frames: float = 1.0
    """stage 1: million env steps per candidate (the spec: 1-2 at CPU scale)"""
    search_scenario: str = "free_ball"
    """stage 1's simplified scenario: free_ball (no columns, 1 ball) or static4 (4 columns, no ball)"""
    frames: str = "0.2,2,2"
    """stage 2: million env steps per period free,static,mixed (paper: 15,150,150)"""
    curriculum: bool = True
    """False: train on mixed only, for the sum of the budgets (ablation)"""
    gate: bool = False
    """advance a period early once the rolling collision-free rate reaches --gate-rate"""
    gate_rate: float = 0.9
    """the performance gate"""
    eval_presets: str = "static,dynamic,mixed"
    """presets of the final evaluation"""
    eval_envs: int = 512
    """episodes per preset in the final evaluation (one batched round; the release evaluates 2 x its envs)"""
    plot_episodes: int = 4
    """episodes drawn in the top-view trajectory plots (0: no plots)"""

    # Env
    num_envs: int = 256
    """parallel envs (paper: 1024)"""
    num_drones: int = 3
    """drones in the formation"""
    dynamics: str = "ctbr"
    """ctbr (paper) or pointmass"""
    static_mode: str = "sdf9"
    """sdf9 (one 9-distance token, as released), sdf9_diff (the same nine numbers as the drone's own distance and
    the neighbours' differences from it / 0.1: which side the column is on at unit scale; a departure) or tokens
    (one per column)"""
    static_top_k: int = 0
    """with --static-mode tokens: only the k nearest columns in range (0: all); the nearest-distance summary hides
    the column behind the one being passed"""
    formation_reward: str = "simple"
    """simple (size term + 1/(1 + normalised Laplacian cost)) or release (the released code's rescaled terms: size
    + 1/(1 + un-normalised Laplacian cost), which charges a shrunken or squeezed formation, a sharp normalised-
    Laplacian term, and the size terms again at 0.2 once every ball has flown) or release_slot (the release plus
    each drone's 5/(1 + (distance from its slot / 0.2 m)^2), 0.2 of it while a ball flies: a departure, as every
    release term is blind to a turn of the formation, which the formation error counts)"""
    full_height_reward: bool = False
    """keep the forward reward's height term (5 clip(1 - |z - 1.5|, 0)) at full weight while a ball flies (released:
    0.2 of it, like every shaping term), so a dodge is not free to drop towards the floor: a departure"""
    full_slot_reward: bool = False
    """with release_slot: its slot term at full weight while a ball flies (else 0.2 of it), so a dodge costs what
    each drone leaves its slot about the centroid, and a rigid shift of the whole formation costs nothing: a
    departure"""
    relative_self_pos: bool = False
    """self token: x, y relative to the formation centroid instead of absolute (released: absolute, which grows
    along the 40 m corridor); with --corridor-walls only y (the policy sees the walls by its absolute x)"""
    max_steps: int = 900
    """episode length (18 s)"""
    corridor_walls: float = 0.0
    """side walls at |x| = this many metres, touched = a collision (0: none, as released; the spec's corridor is 4 m
    wide: 2.0). Without them a policy may fly round the column field instead of through it"""

    # Networks
    encoder: str = "attention"
    """attention (paper) or mlp (ablation: flattened tokens, 3x256)"""
    critic: str = "obs"
    """obs (the released code: the agent's observation) or state (true MAPPO: the global state)"""
    attention_dim: int = 32
    """token width"""

    # PPO (paper, cfg/algo/mappo.yaml)
    num_steps: int = 64
    """rollout steps per env per iteration"""
    update_epochs: int = 4
    """PPO epochs"""
    num_minibatches: int = 16
    """minibatches per epoch"""
    learning_rate: float = 5e-4
    """actor and critic learning rate"""
    lr_decay: float = 0.9985
    """per-iteration exponential decay"""
    lr_restart: bool = True
    """each curriculum period starts the decay again at --learning-rate, as the paper, which trains each period as a
    new run from the last one's checkpoint (there Adam starts afresh too; here its moments carry over). False: one
    decay across the whole curriculum; at the paper's budget that leaves the mixed period near 1e-5"""
    clip_coef: float = 0.1
    """policy and value clip"""
    value_clip_centre: str = "rollout"
    """what the value clip centres on: rollout (the critic's normalised output at rollout time, as the release's
    MAPPO) or renormalised (the rollout value re-expressed in the value normalisation just updated: the update
    before 2026-12-07)"""
    ent_coef: float = 0.001
    """entropy bonus"""
    gamma: float = 0.995
    """discount"""
    gae_lambda: float = 0.95
    """GAE λ"""
    huber_delta: float = 10.0
    """Huber δ of the value loss"""
    max_grad_norm: float = 10.0
    """gradient clipping"""
    value_norm_beta: float = 0.995
    """ValueNorm running-statistics decay"""


# ------------------------------------------------------------------------------------------------ networks
def ffn(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One-head scaled dot-product attention; `bias` is 0 or -inf (masked key), [B, 1, Tk]. Written out because the
    tokens are few (6 with sdf9): torch's fused CPU kernel costs more than these three small batched matmuls."""
    return torch.softmax(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5 + bias, -1) @ v


class AttentionEncoder(nn.Module):
    """The paper's PartialAttentionEncoder: per-type Linear -> 32, masked self-attention over all tokens (pre-LN, one
    head, FFN), cross-attention from the self token over the others, [self, attended] -> FFN -> 64."""

    def __init__(self, dims: dict, d: int = 32):
        super().__init__()
        self.embed = nn.ModuleDict({k: nn.Linear(n, d) for k, n in dims.items()})
        self.norm1, self.qkv1, self.proj1 = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn1 = ffn(d)
        self.norm2, self.q2, self.kv2 = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.proj2 = nn.Linear(d, d)
        self.out = ffn(2 * d)
        self.out_dim = 2 * d

    def forward(self, obs: dict) -> torch.Tensor:  # obs tensors [B, ...] -> [B, 64]
        B, others = obs["self"].shape[0], obs["others"].shape[1]
        x = torch.cat([self.embed["self"](obs["self"])[:, None], self.embed["others"](obs["others"]),
                       self.embed["balls"](obs["balls"]), self.embed["static"](obs["static"])], 1)
        # the self and other-drone tokens are always visible, so no row is fully masked
        mask = torch.cat([obs["ball_mask"].new_zeros(B, 1 + others), obs["ball_mask"], obs["static_mask"]], 1)
        x = x.masked_fill(mask[..., None], 0.0)
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask, float("-inf"))[:, None]
        q, k, v = self.qkv1(self.norm1(x)).chunk(3, -1)
        x = x + self.proj1(attend(q, k, v, bias))
        x = x + self.ffn1(x)
        q, kv = x[:, :1], self.norm2(x[:, 1:])
        k, v = self.kv2(kv).chunk(2, -1)
        att = self.proj2(attend(self.q2(self.norm2(q)), k, v, bias[..., 1:]))
        y = torch.cat([q, q + att], -1)[:, 0]
        return y + self.out(y)


class MLPEncoder(nn.Module):
    """Ablation: every token (masked ones zeroed) and the masks flattened into a 3x256 MLP -> 64. The masks are inputs
    because a zeroed token is not "absent": a zeroed column summary reads as a column at distance 0."""

    def __init__(self, dims: dict, counts: dict):
        super().__init__()
        n = sum(dims[k] * counts[k] for k in dims) + counts["balls"] + counts["static"]
        self.net = nn.Sequential(nn.Linear(n, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256),
                                 nn.ReLU(), nn.Linear(256, 64))
        self.out_dim = 64

    def forward(self, obs: dict) -> torch.Tensor:
        parts = [obs["self"], obs["others"].flatten(1),
                 obs["balls"].masked_fill(obs["ball_mask"][..., None], 0).flatten(1),
                 obs["static"].masked_fill(obs["static_mask"][..., None], 0).flatten(1),
                 obs["ball_mask"].float(), obs["static_mask"].float()]
        return self.net(torch.cat(parts, -1))


class Agent(nn.Module):
    def __init__(self, args: Args, sample_obs: dict, state_dim: int, num_agents: int):
        super().__init__()
        dims = {k: sample_obs[k].shape[-1] for k in ("self", "others", "balls", "static")}
        counts = {"self": 1, "others": sample_obs["others"].shape[-2], "balls": sample_obs["balls"].shape[-2],
                  "static": sample_obs["static"].shape[-2]}
        make = (lambda: AttentionEncoder(dims, args.attention_dim)) if args.encoder == "attention" else \
            (lambda: MLPEncoder(dims, counts))
        self.actor_enc = make()
        self.mean = nn.Linear(self.actor_enc.out_dim, 4)
        nn.init.xavier_uniform_(self.mean.weight, gain=0.01)
        nn.init.zeros_(self.mean.bias)
        self.log_std = nn.Parameter(torch.zeros(4))
        self.critic_kind, self.num_agents = args.critic, num_agents
        if args.critic == "obs":
            self.critic_enc = make()
            self.value_head = nn.Linear(self.critic_enc.out_dim, 1)
        else:  # the global state plus the agent's id
            self.critic_enc = nn.Sequential(nn.Linear(state_dim + num_agents, 256), nn.ReLU(), nn.Linear(256, 256),
                                            nn.ReLU())
            self.value_head = nn.Linear(256, 1)

    def actor_parameters(self) -> list[nn.Parameter]:
        return [*self.actor_enc.parameters(), *self.mean.parameters(), self.log_std]

    def critic_parameters(self) -> list[nn.Parameter]:
        return [*self.critic_enc.parameters(), *self.value_head.parameters()]

    def dist(self, obs):
        return torch.distributions.Normal(self.mean(self.actor_enc(obs)), self.log_std.exp())

    def value(self, obs, state_ids=None):
        if self.critic_kind == "obs":
            return self.value_head(self.critic_enc(obs)).squeeze(-1)
        return self.value_head(self.critic_enc(state_ids)).squeeze(-1)


class ValueNorm(nn.Module):
    """ValueNorm1 of MAPPO: debiased running mean / mean-square (β = 0.995); the critic predicts normalised values."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("mean_sq", torch.zeros(()))
        self.register_buffer("debias", torch.zeros(()))

    def update(self, x):
        self.mean.mul_(self.beta).add_(x.mean() * (1 - self.beta))
        self.mean_sq.mul_(self.beta).add_((x ** 2).mean() * (1 - self.beta))
        self.debias.mul_(self.beta).add_(1 - self.beta)

    def stats(self):
        mean = self.mean / self.debias.clamp(min=1e-5)
        var = (self.mean_sq / self.debias.clamp(min=1e-5) - mean ** 2).clamp(min=1e-2)
        return mean, var.sqrt()

    def normalize(self, x):
        mean, std = self.stats()
        return (x - mean) / std

    def denormalize(self, x):
        mean, std = self.stats()
        return x * std + mean


# ------------------------------------------------------------------------------------------------ helpers
def flat_obs(obs: dict) -> dict:
    """[E, N, ...] -> [E*N, ...] (agents as batch; the shared actor)."""
    return {k: v.flatten(0, 1) for k, v in obs.items() if k != "state"}


def state_ids(obs: dict, n: int) -> torch.Tensor:
    E = obs["state"].shape[0]
    ids = torch.eye(n, device=obs["state"].device).expand(E, n, n)
    return torch.cat([obs["state"][:, None].expand(E, n, -1), ids], -1).flatten(0, 1)


def make_env(args: Args, preset: str, num_envs: int, seed: int, device) -> FormationEnv:
    extra = {}
    if preset == "free_ball":
        preset, extra = "dynamic", dict(num_balls=1)
    elif preset == "static4":
        preset, extra = "static", dict(num_columns=4)
    return FormationEnv(FormationConfig.preset(preset, num_envs=num_envs, num_drones=args.num_drones,
                                               dynamics=args.dynamics, static_mode=args.static_mode,
                                               static_top_k=args.static_top_k,
                                               relative_self_pos=args.relative_self_pos,
                                               formation_reward=args.formation_reward,
                                               full_height_reward=args.full_height_reward,
                                               full_slot_reward=args.full_slot_reward,
                                               corridor_walls=args.corridor_walls,
                                               max_steps=args.max_steps, seed=seed, device=str(device), **extra))


def pad_like(obs: dict, ref: dict) -> dict:
    """Scenarios differ in token counts (0 vs 2 balls, 0 vs 10 columns): pad to the widest, masked, so one network
    serves every period of the curriculum."""
    out = dict(obs)
    for key, mask in (("balls", "ball_mask"), ("static", "static_mask")):
        want, have = ref[key].shape[-2], obs[key].shape[-2]
        if have < want:
            pad = want - have
            out[key] = F.pad(obs[key], (0, 0, 0, pad))
            out[mask] = F.pad(obs[mask], (0, pad), value=True)
    if "state" in ref and obs["state"].shape[-1] < ref["state"].shape[-1]:
        out["state"] = F.pad(obs["state"], (0, ref["state"].shape[-1] - obs["state"].shape[-1]))
    return out


def policy_actions(agent):
    """The deterministic policy as `evaluate`'s `act(env, obs)`: the Gaussian's mean."""
    return lambda env, obs: agent.dist(flat_obs(obs)).mean.view(env.E, env.N, 4)


@torch.no_grad()
def evaluate(act, args: Args, preset: str, weights, ref_obs, device, seed: int, plot_path: Path | None = None):
    """One batched round of `eval_envs` episodes on `preset` with `act(env, obs) -> actions [E, N, 4]` (the policy,
    or a controller such as the APF baseline): collision-free rate, formation error, arrival, success, the four
    discounted objective returns, and the share of episodes each END_CAUSES event ended (several can fire at once)."""
    env = make_env(args, preset, args.eval_envs, seed, device)
    obs = pad_like(env.reset(), ref_obs)
    done = torch.zeros(env.E, dtype=torch.bool, device=device)
    stats: dict[str, torch.Tensor] = {}
    track = []
    # the layouts the drawn episodes fly through (an env that finishes is reset with new columns)
    columns = env.columns[:args.plot_episodes].cpu().clone() if env.cfg.num_columns else None
    for _ in range(args.max_steps):
        action = act(env, obs)
        if plot_path is not None:
            # an episode that has ended is not drawn further (the env auto-resets it)
            shown = args.plot_episodes
            track.append(env.p[:shown].masked_fill(done[:shown, None, None], float("nan")).cpu())
        obs, _, _, _, info = env.step(action)
        obs = pad_like(obs, ref_obs)
        if "episode" in info:
            ep = info["episode"]
            fresh = ~done[ep["env_ids"]]
            for key in ("collision_free", "formation_error", "arrival", "success", "left_corridor", "returns",
                        *END_CAUSES):
                value = ep[key].float()
                if key not in stats:
                    stats[key] = torch.zeros(env.E, *value.shape[1:], device=device)
                stats[key][ep["env_ids"][fresh]] = value[fresh]
            done[ep["env_ids"]] = True
        if done.all():
            break
    result = {k: float(v.mean()) for k, v in stats.items() if k != "returns"}
    result.update({f"return_{name}": float(stats["returns"][:, i].mean()) for i, name in enumerate(OBJECTIVES)})
    result["utility"] = float((stats["returns"] * torch.as_tensor(weights, device=device)).sum(-1).mean())
    if plot_path is not None and track:
        plot_tracks(torch.stack(track), columns, env.cfg.column_radius, plot_path, preset, env.cfg.corridor_walls)
    return result


def plot_tracks(track: torch.Tensor, columns: torch.Tensor | None, radius: float, path: Path, title: str,
                walls: float = 0.0) -> None:
    """Top view of each drawn episode: its drones' x-y tracks, its column layout ([episodes, S, 2] or None) and the
    side walls (if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = track.shape[1]
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 6), squeeze=False)
    for e in range(n):
        ax = axes[0, e]
        for x, y in (columns[e].numpy() if columns is not None else []):
            ax.add_patch(plt.Circle((x, y), radius, color="gray"))
        for x in ((-walls, walls) if walls else ()):
            ax.axvline(x, color="black", lw=2)
        for i in range(track.shape[2]):
            ax.plot(track[:, e, i, 0], track[:, e, i, 1], lw=1)
        ax.set_xlim(-3, 3)
        ax.set_aspect("equal")
        ax.set_title(f"{title} #{e}", fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ training
def gae(rewards, values, dones, next_value, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation over (T, agents) steps, each agent its own value; `dones[t]`: the agent's
    env ended its episode at step t (its next value, an auto-reset env's, belongs to a new episode); `next_value`:
    the value after the last step."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        nv = next_value if t == len(rewards) - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nv * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        advantages[t] = last
    return advantages


def train(args: Args, agent, optimizer, vnorm, weights, preset: str, frames: float, ref_obs, device, writer, tag: str,
          state: dict, save_fn=None) -> dict:
    """PPO on `preset` for `frames` million env steps (continues `agent`); returns rolling episode statistics."""
    recent = {"collision_free": [], "formation_error": [], "forward": []}
    if frames <= 0:  # a period given no budget is skipped
        return {k: float("nan") for k in recent}
    env = make_env(args, preset, args.num_envs, args.seed + state["global_step"] % 100_000, device)
    E, N, T = env.E, env.N, args.num_steps
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)
    obs = pad_like(env.reset(), ref_obs)
    iterations = max(1, int(frames * 1e6 / (E * T)))
    done = state["period_iterations"] if save_fn is not None else 0  # resumed mid-period: only what is left
    bar = tqdm(range(done, iterations), desc=tag, mininterval=2.0, initial=done, total=iterations)
    for it in bar:
        start = time.time()
        buf = {k: [] for k in ("obs", "sid", "act", "logp", "vpred", "val", "rew", "done")}
        for _ in range(T):  # ALGO LOGIC: rollout
            with torch.no_grad():
                fo = flat_obs(obs)
                sid = state_ids(obs, N) if args.critic == "state" else None
                dist = agent.dist(fo)
                action = dist.sample()
                vpred = agent.value(fo, sid)  # normalised: the value clip's centre, as the critic said it
                value = vnorm.denormalize(vpred)
            next_obs, reward, terminated, truncated, info = env.step(action.view(E, N, 4))
            next_obs = pad_like(next_obs, ref_obs)
            r = (reward * w).sum(-1).flatten()
            boot = torch.zeros(E * N, device=device)
            if truncated.any():  # bootstrap the time limit with the value of the final observation
                final = pad_like(info["final_obs"], ref_obs)
                with torch.no_grad():
                    fv = vnorm.denormalize(agent.value(flat_obs(final), state_ids(final, N) if args.critic ==
                                                       "state" else None)).view(E, N)
                boot = (truncated[:, None] * fv).flatten()
            buf["obs"].append(fo)
            buf["sid"].append(sid)
            buf["act"].append(action)
            buf["logp"].append(dist.log_prob(action).sum(-1))
            buf["vpred"].append(vpred)
            buf["val"].append(value)
            buf["rew"].append(r + args.gamma * boot)
            buf["done"].append(info["done"][:, None].expand(E, N).flatten().float())
            if "episode" in info:
                ep = info["episode"]
                recent["collision_free"] += ep["collision_free"].float().tolist()
                recent["formation_error"] += ep["formation_error"].tolist()
                recent["forward"] += ep["returns"][:, 2].tolist()
            obs = next_obs
            state["global_step"] += E
        with torch.no_grad():  # ALGO LOGIC: GAE over agents (each agent its own value, env-level dones)
            fo = flat_obs(obs)
            next_value = vnorm.denormalize(agent.value(fo, state_ids(obs, N) if args.critic == "state" else None))
            vals, rews, dones = torch.stack(buf["val"]), torch.stack(buf["rew"]), torch.stack(buf["done"])
            adv = gae(rews, vals, dones, next_value, args.gamma, args.gae_lambda)
            returns = adv + vals
            vnorm.update(returns)
        b_obs = {k: torch.cat([o[k] for o in buf["obs"]]) for k in buf["obs"][0]}
        b_sid = torch.cat(buf["sid"]) if args.critic == "state" else None
        b_act, b_logp = torch.cat(buf["act"]), torch.cat(buf["logp"])
        b_adv, b_ret = adv.flatten(), vnorm.normalize(returns.flatten())
        b_adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)  # once per batch (the spec, MAPPO)
        if args.value_clip_centre == "rollout":  # the critic's raw outputs (as the release's MAPPO, which also
            b_val = torch.cat(buf["vpred"])      # normalises the returns with the statistics just updated)
        else:
            b_val = vnorm.normalize(vals.flatten())
        n = b_act.shape[0]
        mb = n // args.num_minibatches
        actor_params, critic_params = agent.actor_parameters(), agent.critic_parameters()
        clipfracs = []
        for _ in range(args.update_epochs):  # ALGO LOGIC: PPO update
            perm = torch.randperm(n, device=device)
            for s in range(0, n - mb + 1, mb):
                idx = perm[s:s + mb]
                o = {k: v[idx] for k, v in b_obs.items()}
                dist = agent.dist(o)
                logp = dist.log_prob(b_act[idx]).sum(-1)
                ratio = (logp - b_logp[idx]).exp()
                a = b_adv[idx]
                pg_loss = -torch.min(ratio * a, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * a).mean() * 4
                v = agent.value(o, b_sid[idx] if b_sid is not None else None)
                v_clip = b_val[idx] + (v - b_val[idx]).clamp(-args.clip_coef, args.clip_coef)
                v_loss = torch.max(F.huber_loss(v, b_ret[idx], delta=args.huber_delta, reduction="none"),
                                   F.huber_loss(v_clip, b_ret[idx], delta=args.huber_delta, reduction="none")).mean()
                entropy = dist.entropy().sum(-1).mean()
                loss = pg_loss + v_loss - args.ent_coef * entropy
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(actor_params, args.max_grad_norm)  # each network its own clip (the
                nn.utils.clip_grad_norm_(critic_params, args.max_grad_norm)  # release: one optimizer each)
                optimizer.step()
                clipfracs.append(float(((ratio - 1).abs() > args.clip_coef).float().mean()))
        for g in optimizer.param_groups:
            g["lr"] *= args.lr_decay
        state["iterations"] += 1
        state["period_iterations"] = it + 1
        # TRY NOT TO MODIFY: record rewards for plotting purposes
        step = state["global_step"]
        for key in recent:
            recent[key] = recent[key][-2 * E:]
        if recent["collision_free"]:
            writer.add_scalar(f"charts/{tag}/collision_free", np.mean(recent["collision_free"]), step)
            writer.add_scalar("charts/success_rate", np.mean(recent["collision_free"]), step)
            writer.add_scalar("charts/formation_error", np.mean(recent["formation_error"]), step)
            writer.add_scalar("charts/episodic_return", np.mean(recent["forward"]), step)
        writer.add_scalar("charts/SPS", int(E * T / max(time.time() - start, 1e-6)), step)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), step)
        writer.add_scalar("losses/value_loss", v_loss.item(), step)
        writer.add_scalar("losses/entropy", entropy.item(), step)
        writer.add_scalar("losses/clipfrac", float(np.mean(clipfracs)), step)
        cf = np.mean(recent["collision_free"]) if recent["collision_free"] else float("nan")
        bar.set_postfix(collision_free=f"{cf:.2f}", sps=int(E * T / max(time.time() - start, 1e-6)))
        if save_fn is not None and state["iterations"] % 20 == 0:
            save_fn()
        if args.gate and len(recent["collision_free"]) >= E and cf >= args.gate_rate:
            tqdm.write(f"{tag}: collision-free {cf:.2f} >= {args.gate_rate}: gate passed after {it + 1} iterations")
            break
    return {k: float(np.mean(v)) if v else float("nan") for k, v in recent.items()}


def pick_winner(rows: list[dict]) -> int:
    """Maximise the worst min-max-normalised objective return; tie-break on the collision-free rate."""
    vals = np.array([[r[f"return_{o}"] for o in OBJECTIVES] for r in rows])
    lo, hi = vals.min(0), vals.max(0)
    norm = (vals - lo) / np.where(hi > lo, hi - lo, 1.0)
    worst = norm.min(1)
    best = np.flatnonzero(np.isclose(worst, worst.max()))
    return int(max(best, key=lambda i: rows[i]["collision_free"]))


def main(args: Args) -> None:
    for name, choices in (("encoder", ("attention", "mlp")), ("critic", ("obs", "state")),
                          ("dynamics", ("ctbr", "pointmass")), ("static_mode", ("sdf9", "sdf9_diff", "tokens")),
                          ("formation_reward", FORMATION_REWARDS), ("value_clip_centre", ("rollout", "renormalised")),
                          ("search_scenario", ("free_ball", "static4"))):
        if getattr(args, name) not in choices:
            raise SystemExit(f"--{name.replace('_', '-')} must be one of {choices}, got {getattr(args, name)!r}")
    for name, low in (("num_envs", 1), ("eval_envs", 1), ("num_drones", 2), ("num_steps", 1), ("update_epochs", 1),
                      ("num_minibatches", 1), ("num_candidates", 1), ("plot_episodes", 0), ("max_steps", 1),
                      ("attention_dim", 1)):
        if getattr(args, name) < low:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name, ok, rule in (("learning_rate", args.learning_rate > 0, "> 0"), ("lr_decay", 0 < args.lr_decay <= 1,
                           "in (0, 1]"), ("clip_coef", args.clip_coef > 0, "> 0"), ("ent_coef", args.ent_coef >= 0,
                           ">= 0"), ("gamma", 0 <= args.gamma <= 1, "in [0, 1]"), ("gae_lambda",
                           0 <= args.gae_lambda <= 1, "in [0, 1]"), ("huber_delta", args.huber_delta > 0, "> 0"),
                           ("max_grad_norm", args.max_grad_norm > 0, "> 0"),
                           ("value_norm_beta", 0 < args.value_norm_beta < 1, "in (0, 1)")):
        if not ok:  # (NaN fails every rule too)
            raise SystemExit(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    if args.num_minibatches > args.num_envs * args.num_steps * args.num_drones:
        raise SystemExit(f"--num-minibatches {args.num_minibatches} exceeds the batch of --num-envs x --num-steps x "
                         f"--num-drones = {args.num_envs * args.num_steps * args.num_drones} samples")
    if not 0 < args.gate_rate <= 1:
        raise SystemExit(f"--gate-rate is a collision-free rate in (0, 1], got {args.gate_rate}")
    eval_presets = [p for p in args.eval_presets.split(",") if p]
    bad = [p for p in eval_presets if p not in PRESETS]
    if bad or not eval_presets:  # checked now, not after an hour of training
        raise SystemExit(f"--eval-presets takes names from {sorted(PRESETS)}, comma-separated; "
                         f"got {args.eval_presets!r}")
    try:  # the env's own checks (walls against the formation, ...) now, not after stage 1
        make_env(args, "free", 1, 0, "cpu")
    except ValueError as exc:
        raise SystemExit(f"bad env settings: {exc}") from None
    try:
        budgets = [float(x) for x in args.frames.split(",")]
        assert len(budgets) == 3 and min(budgets) >= 0
    except (ValueError, AssertionError):
        raise SystemExit(f"--frames takes three non-negative numbers (million steps), got {args.frames!r}") from None
    fixed = None
    if args.weights == "paper":
        fixed = PAPER_WEIGHTS
    elif args.weights:
        try:
            fixed = tuple(float(x) for x in args.weights.split(","))
            assert len(fixed) == 4 and min(fixed) >= 0 and sum(fixed) > 0
            fixed = tuple(x / sum(fixed) for x in fixed)
        except (ValueError, AssertionError):
            raise SystemExit(f"--weights is 'paper' or four non-negative numbers, got {args.weights!r}") from None
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    run_dir = Path(args.run_dir) / f"uav_formation__{args.exp_name}__{args.seed}"
    if run_dir.exists() and not args.resume and (run_dir / "checkpoint.pt").exists():
        raise SystemExit(f"{run_dir} exists: add --resume to continue it, or pick another --exp-name / --seed")
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run_dir))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_dir.name,
                   mode=os.environ.get("WANDB_MODE", "offline"))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # the widest observation (mixed) fixes the network's token layout for every scenario
    ref_env = make_env(args, "mixed", 2, 0, device)
    ref_obs = ref_env.reset()
    ref_flat = flat_obs(ref_obs)

    def fresh():
        agent = Agent(args, ref_flat, ref_obs["state"].shape[-1], args.num_drones).to(device)
        return agent, torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5), \
            ValueNorm(args.value_norm_beta).to(device)

    agent, optimizer, vnorm = fresh()
    state = {"stage": "search" if fixed is None else "curriculum", "candidate": 0, "period": 0, "global_step": 0,
             "iterations": 0, "period_iterations": 0, "search_rows": [], "weights": list(fixed) if fixed else None}
    ckpt = run_dir / "checkpoint.pt"

    def save(*copies: Path):
        buf = io.BytesIO()
        torch.save({"agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "vnorm": vnorm.state_dict(),
                    "state": state, "torch_rng": torch.get_rng_state(), "args": asdict(args)}, buf)
        for path in (ckpt, *copies):
            atomic_write(path, buf.getvalue())

    if args.resume and ckpt.exists():
        try:  # weights_only: a checkpoint handed over from elsewhere runs no code; a torn copy says so
            saved = torch.load(io.BytesIO(ckpt.read_bytes()), weights_only=True)
        except Exception as e:
            raise SystemExit(f"cannot resume from {ckpt}: not a checkpoint this script wrote, or a partial copy "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        # the networks' shape comes from these flags: a different value cannot load the checkpoint's weights
        differ = [f"--{k.replace('_', '-')} {saved['args'][k]} (given {getattr(args, k)})" for k in SHAPE_FLAGS
                  if k in saved.get("args", {}) and saved["args"][k] != getattr(args, k)]
        if differ:
            raise SystemExit(f"cannot resume {run_dir}: it was trained with {', '.join(differ)}")
        agent.load_state_dict(saved["agent"])
        optimizer.load_state_dict(saved["optimizer"])
        vnorm.load_state_dict(saved["vnorm"])
        state.update(saved["state"])
        torch.set_rng_state(saved["torch_rng"])
        print(f"resuming {run_dir}: stage {state['stage']}, {state['global_step']} env steps", flush=True)

    # ---------------------------------------------------------------- stage 1: utility search
    if state["stage"] == "search":
        # the released code: np.random.seed(1); np.random.rand(20, 4) (the first K of those 20)
        candidates = np.random.RandomState(1).rand(args.num_candidates, 4)
        candidates /= candidates.sum(1, keepdims=True)
        while state["candidate"] < args.num_candidates:
            k = state["candidate"]
            w = candidates[k]
            agent, optimizer, vnorm = fresh()  # each candidate is its own training run
            train(args, agent, optimizer, vnorm, w, args.search_scenario, args.search_frames, ref_obs, device,
                  writer, f"search{k}", state)
            row = {"candidate": k, **{f"w_{o}": float(x) for o, x in zip(OBJECTIVES, w)},
                   **evaluate(policy_actions(agent), args, args.search_scenario, w, ref_obs, device, seed=10_000)}
            state["search_rows"].append(row)
            state["candidate"] += 1
            print(f"stage 1 candidate {k}: w={np.round(w, 3).tolist()} collision-free {row['collision_free']:.2f}",
                  flush=True)
            save()
        rows = state["search_rows"]
        winner = pick_winner(rows)
        with open(run_dir / "weights.csv", "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(rows[0]) + ["chosen"])
            out.writeheader()
            for i, r in enumerate(rows):
                out.writerow({**r, "chosen": i == winner})
        state["weights"] = [rows[winner][f"w_{o}"] for o in OBJECTIVES]
        print(f"stage 1: chose candidate {winner}, w = {np.round(state['weights'], 3).tolist()} "
              f"(max-min normalised objective; weights.csv)", flush=True)
        agent, optimizer, vnorm = fresh()
        state.update(stage="curriculum", period=0, period_iterations=0)
        save()

    # ---------------------------------------------------------------- stage 2: curriculum
    periods = [("free", budgets[0]), ("static", budgets[1]), ("mixed", budgets[2])] if args.curriculum else \
        [("mixed", sum(budgets))]
    while state["stage"] == "curriculum" and state["period"] < len(periods):
        preset, frames = periods[state["period"]]
        if args.lr_restart and state["period_iterations"] == 0:  # (a resume mid-period keeps the saved lr)
            for g in optimizer.param_groups:
                g["lr"] = args.learning_rate
        stats = train(args, agent, optimizer, vnorm, state["weights"], preset, frames, ref_obs, device, writer,
                      f"period{state['period']}_{preset}", state, save_fn=save)
        print(f"stage 2 period {state['period']} ({preset}): no budget, skipped" if frames <= 0 else
              f"stage 2 period {state['period']} ({preset}, {frames:g}M steps): rolling collision-free "
              f"{stats['collision_free']:.2f}, formation error {stats['formation_error']:.3f} m", flush=True)
        state.update(period=state["period"] + 1, period_iterations=0)
        save(run_dir / f"checkpoint_after_period{state['period'] - 1}_{preset}.pt")
    state["stage"] = "done"
    save()

    # ---------------------------------------------------------------- evaluation
    results = {}
    for preset in eval_presets:
        res = evaluate(policy_actions(agent), args, preset, state["weights"], ref_obs, device, seed=20_000,
                       plot_path=run_dir / f"eval_{preset}.png" if args.plot_episodes else None)
        results[preset] = res
        for key, value in res.items():
            writer.add_scalar(f"eval/{preset}/{key}", value, state["global_step"])
        print(f"eval {preset}: collision-free {res['collision_free']:.2f}, formation error "
              f"{res['formation_error']:.3f} m, arrival {res['arrival']:.2f}, success {res['success']:.2f}", flush=True)
    summary = {"weights": state["weights"], "env_steps": state["global_step"], "eval": results, "args": asdict(args)}
    buf = io.BytesIO()
    torch.save(agent.state_dict(), buf)
    atomic_write(run_dir / "agent.pt", buf.getvalue())  # before the summary: a run with a summary has its agent
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=1))
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
