"""Asynchronous SAC / RLPD for real robots: actors on robots, a learner on a GPU box.

Reproduces the real-world learning system of RLinf-USER (Zang et al., 2026: "RLinf-USER: a unified and extensible
system for real-world online policy learning") at CleanRL scale: fully asynchronous actors and learner, a persistent
crash-safe replay buffer, versioned weight sync, human interventions routed to the demo buffer, with the SAC / RLPD
learner of SERL / HIL-SERL (Luo et al., 2024) and RLPD (Ball et al., 2023: 50/50 demo batches, a LayerNorm Q
ensemble with a subsampled min, high UTD).

    python algos/async_sac_real.py --robot sim:PickCube --num-robots 2           # learner + 2 local sim actors
    python algos/async_sac_real.py --role learner --bind-host 0.0.0.0            # a learner for remote robots
    python algos/async_sac_real.py --role actor --robot franka:172.16.0.2 --learner-host LEARNER   # on a robot
    python algos/async_sac_real.py --mode sync --robot sim:PickCube              # baseline: collect, then train
    python algos/async_sac_real.py --resume runs/<run name>                      # after a crash (even kill -9)

Ports on the learner: data `--port`, weights `--port`+1, handshake RPC `--port`+2; actors dial out (NAT friendly;
over the internet forward the three ports through one SSH tunnel). Every transition carries the policy version that
produced it; actors never wait for the learner (they act with their last weights and hold unsent transitions, spooled
to disk, until it is back); the learner stores each segment durably (HDF5, fsync) before acknowledging it, so a
`kill -9` loses no acknowledged transition, and `--resume` restores networks, optimisers, targets, temperature,
counters, RNG state and the buffers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.fsutil import atomic_write  # noqa: E402
from common.replay_buffer import ReplayBuffer, sample_mixed  # noqa: E402
from common.transport import (DataReceiver, DataSender, HandshakeError, RpcClient, RpcServer,  # noqa: E402
                              TransportError, TransportTimeout, spec_diff)
from common.weight_sync import WeightPublisher, WeightSubscriber  # noqa: E402
from robot_io.env import RobotEnv, flatten_obs, make_robot_env, spaces_from_spec  # noqa: E402
from robot_io.registry import RobotValidationError, parse_robot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    exp_name: str = "async_sac_real"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """torch.backends.cudnn.deterministic"""
    torch_threads: int = 1
    """torch CPU threads per process (0: torch's default)"""
    cuda: bool = True
    """train on CUDA when available (the learner; actors run on CPU)"""
    track: bool = False
    """log to Weights & Biases (offline unless WANDB_MODE says otherwise)"""
    wandb_project_name: str = "rlinf-hackable"
    """W&B project"""
    run_dir: str = "runs"
    """where runs go: <run_dir>/<task>__<exp_name>__<seed>/ (buffer/, demo_buffer/, learner.pt, logs)"""
    resume: str = ""
    """a run directory to continue (learner: checkpoint + buffers; its saved args are reused)"""

    # System
    role: str = ""
    """all (learner + --num-robots local actor processes; the default), learner, or actor; with --resume, the run's
    own unless given"""
    mode: str = "async"
    """async, or sync (one process: collect --sync-steps, then train, alternately: the baseline)"""
    robot: str = "sim:PickCube"
    """robot_io robot string: sim:TASK, dummy, franka:IP (with ,key=value options)"""
    num_robots: int = 1
    """actor processes --role all starts (robots may differ in name, not in spec)"""
    robot_index: int = 0
    """this actor's index (seeds and names)"""
    control_hz: float = -1.0
    """override the robot's control rate (-1: the robot's own; 0: unpaced)"""
    max_episode_steps: int = -1
    """episode cap (-1: the robot's own, e.g. max_episode_steps= in --robot; 100 for the built-in robots)"""
    learner_host: str = "127.0.0.1"
    """where actors find the learner"""
    bind_host: str = "127.0.0.1"
    """interface the learner binds (0.0.0.0 for remote robots)"""
    port: int = 5600
    """data port; weights port+1, handshake port+2"""
    total_env_steps: int = 20_000
    """stop after this many transitions have reached the learner"""
    total_minutes: float = 0.0
    """stop after this wall-clock budget (0: none)"""
    segment_steps: int = 25
    """transitions per data item (an episode is cut into segments so data flows before it ends)"""

    # Demonstrations and interventions
    demos: str = ""
    """a replay-buffer directory of demonstrations (RLPD's prior data; e.g. an earlier run's demo_buffer)"""
    expert_episodes: int = 10
    """sim robots: episodes per actor driven by the scripted expert at the start (interventions -> demo buffer)"""
    expert_takeover: float = 0.0
    """sim robots: afterwards, the probability that the expert takes over an episode (HIL-SERL style)"""
    reward_model: str = ""
    """optional learned reward: a safetensors success classifier (see RewardClassifier); its 0/1 verdict is the
    reward and the success, and a success ends the episode"""
    reward_threshold: float = 0.5
    """--reward-model: the success probability above which a frame counts as success (SERL 0.5; RLinf's 0.8 cuts
    false positives, each of which ends an episode with the reward)"""

    # SAC / RLPD (RLinf's realworld RLPD config, real_world_system.md §6)
    gamma: float = 0.96
    """discount"""
    tau: float = 0.005
    """target network Polyak rate"""
    batch_size: int = 256
    """transitions per update (half from demos when there are any)"""
    demo_fraction: float = 0.5
    """share of every batch drawn from the demonstrations (RLPD): the run's interventions and --demos, uniformly
    over their transitions together"""
    learning_rate: float = 3e-4
    """actor, critic and temperature learning rate"""
    num_q: int = 10
    """Q ensemble size"""
    critic_subsample: int = 2
    """heads whose min forms the target"""
    critic_actor_ratio: int = 4
    """critic updates per actor update"""
    utd: float = 1.0
    """cap on critic updates per received transition (the learner idles above it); async 0: no cap (USER's learner
    trains continuously); --mode sync: updates per collected transition"""
    layer_norm: bool = True
    """LayerNorm in the critics (RLPD)"""
    initial_alpha: float = 0.01
    """initial entropy temperature"""
    target_entropy: float = -3.0
    """automatic entropy tuning target (RLinf's, for its 6-D actions; SERL / RLPD use -action_dim / 2)"""
    bootstrap_terminal: bool = False
    """bootstrap through terminations in the TD target (ManiSkill's SAC recipe for dense sim rewards, where a success
    ends the episode: without it, ending forfeits the reward of staying at the goal and the policy learns to hover
    short of success; keep it off for sparse success rewards, SERL style)"""
    max_grad_norm: float = 10.0
    """gradient clipping"""
    hidden: int = 256
    """MLP width"""
    learning_starts: int = 500
    """transitions in the buffer before the first update"""
    sync_every: int = 20
    """critic updates between weight pushes"""
    checkpoint_every: int = 500
    """critic updates between learner checkpoints"""
    checkpoint_seconds: float = 60.0
    """and at least this often (wall-clock)"""
    sync_steps: int = 200
    """--mode sync: env steps per collection phase"""
    eval_every: int = 5
    """every N-th actor episode is deterministic (eval/success_rate); async mode only (--mode sync collects
    stochastic episodes)"""
    max_backlog: int = 2000
    """segments an actor keeps in RAM beyond its sender's spool while the learner is away (the oldest go first)"""


# ------------------------------------------------------------------------------------------------ networks
class Encoder(nn.Module):
    """Images: one small CNN per camera (DrQ / SERL style, LayerNorm + tanh features); state: passed through."""

    def __init__(self, spec: dict, channels: int = 32, feature_dim: int = 50):
        super().__init__()
        obs = spec["observation"]["dict"]
        self.cameras = sorted(obs["images"]["dict"]) if "images" in obs else []
        self.state_dim = obs["state"]["box"][0]
        self.cnns = nn.ModuleDict()
        for cam in self.cameras:
            h, w = obs["images"]["dict"][cam]["box"][:2]
            conv = nn.Sequential(nn.Conv2d(3, channels, 3, 2), nn.ReLU(), nn.Conv2d(channels, channels, 3, 1),
                                 nn.ReLU(), nn.Conv2d(channels, channels, 3, 1), nn.ReLU(), nn.Flatten())
            n = conv(torch.zeros(1, 3, h, w)).shape[1]
            self.cnns[cam] = nn.Sequential(conv, nn.Linear(n, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())
        self.out_dim = feature_dim * len(self.cameras) + self.state_dim

    def forward(self, obs: dict) -> torch.Tensor:
        feats = [self.cnns[c](obs[f"images/{c}"].permute(0, 3, 1, 2).float() / 255.0) for c in self.cameras]
        return torch.cat([*feats, obs["state"].float()], -1)


class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul: (E, B, in) -> (E, B, out)."""

    def __init__(self, num: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(num, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num, 1, d_out).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    """E independent LayerNorms (each head its own scale and shift, as RLPD's independent critics): (E, B, d)."""

    def __init__(self, num: int, d: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(num, 1, d)), nn.Parameter(torch.zeros(num, 1, d))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class Critic(nn.Module):
    def __init__(self, d_in: int, action_dim: int, num_q: int, hidden: int, layer_norm: bool):
        super().__init__()
        self.num_q, layers, d = num_q, [], d_in + action_dim
        for _ in range(2):
            layers += [EnsembleLinear(num_q, d, hidden), EnsembleLayerNorm(num_q, hidden) if layer_norm else
                       nn.Identity(), nn.ReLU()]
            d = hidden
        self.net = nn.Sequential(*layers, EnsembleLinear(num_q, d, 1))

    def forward(self, feats, actions):  # -> (E, B)
        x = torch.cat([feats, actions], -1)
        return self.net(x.unsqueeze(0).expand(self.num_q, -1, -1)).squeeze(-1)


class Policy(nn.Module):
    """What actors run and what the learner broadcasts: the encoder and a tanh-Gaussian actor head."""

    def __init__(self, spec: dict, hidden: int):
        super().__init__()
        self.encoder = Encoder(spec)
        action = spec["action"]
        self.action_dim = action["box"][0]
        low = np.broadcast_to(np.asarray(action["low"], np.float32), (self.action_dim,))
        high = np.broadcast_to(np.asarray(action["high"], np.float32), (self.action_dim,))
        self.register_buffer("scale", torch.tensor((high - low) / 2))
        self.register_buffer("offset", torch.tensor((high + low) / 2))
        self.trunk = nn.Sequential(nn.Linear(self.encoder.out_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                   nn.ReLU())
        self.mean, self.log_std = nn.Linear(hidden, self.action_dim), nn.Linear(hidden, self.action_dim)

    def head(self, feats, deterministic: bool = False):
        h = self.trunk(feats)
        mean, log_std = self.mean(h), self.log_std(h).clamp(-5, 2)
        u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # tanh change of variables
        log_prob = log_prob - self.scale.log().sum()  # and the box's: the density of the action the robot gets
        return torch.tanh(u) * self.scale + self.offset, log_prob

    @torch.no_grad()
    def act(self, obs: dict, deterministic: bool = False) -> np.ndarray:
        device = self.scale.device
        batch = {k: torch.as_tensor(np.asarray(v), device=device)[None] for k, v in flatten_obs(obs).items()}
        return self.head(self.encoder(batch), deterministic)[0][0].cpu().numpy()


def spec_problem(spec, hidden: int) -> str | None:
    """Why a robot's spec cannot drive this script's networks, or None: a state vector, optional (H, W, 3) uint8
    cameras, a bounded 1-D action box."""
    try:
        obs, action = spaces_from_spec(spec["observation"]), spaces_from_spec(spec["action"])
        if not isinstance(obs, gym.spaces.Dict) or "state" not in obs.spaces or len(obs["state"].shape) != 1:
            return "the observation must be a dict with a 1-D 'state' box"
        for cam, box in (obs.spaces["images"].spaces.items() if "images" in obs.spaces else ()):
            if len(box.shape) != 3 or box.shape[2] != 3 or box.dtype != np.uint8 or min(box.shape[:2]) < 8:
                return f"camera {cam!r} must be an (H, W, 3) uint8 box of at least 8 x 8 pixels, got {box}"
        if not isinstance(action, gym.spaces.Box) or len(action.shape) != 1 or not action.shape[0] \
                or not (np.all(np.isfinite(action.low)) and np.all(np.isfinite(action.high))
                        and np.all(action.low < action.high)):
            return "the action must be a non-empty 1-D box with finite low < high"
        with torch.device("meta"):  # shapes only: no memory, and no draw from the RNG a run checkpoints
            Policy(spec, hidden)
    except Exception as exc:  # a malformed spec from the network, whatever part of it is wrong
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def prior_problem(prior: ReplayBuffer, spec: dict) -> str | None:
    """Why a --demos buffer cannot be mixed into this robot's batches (its observations or actions are laid out
    otherwise), or None; an empty one mixes in nothing."""
    if prior.schema is None:
        return None
    obs = spaces_from_spec(spec["observation"])
    want = {"obs/state": obs["state"].shape, "actions": spaces_from_spec(spec["action"]).shape,
            **{f"obs/images/{cam}": box.shape for cam, box in (obs.spaces["images"].spaces.items()
                                                                if "images" in obs.spaces else ())}}
    have = {k: shape for k, (_, shape) in prior.schema.items() if k.startswith("obs/") or k == "actions"}
    diff = {k: {"demos": have.get(k), "robot": want.get(k)} for k in sorted(set(want) | set(have))
            if have.get(k) != want.get(k)}
    if diff:
        return f"shapes differ (None: absent): {diff}"
    extras = sorted(k[len("extras/"):] for k in prior.schema if k.startswith("extras/"))
    return f"its steps carry extras the robot's do not (a batch mixes the same keys): {extras}" if extras else None


def random_shift(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """DrQ's augmentation: pad by replication, crop back at a random offset per sample. images (B, H, W, C) uint8."""
    B, H, W, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (pad,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, B))
    rows = (torch.arange(H)[None] + dy[:, None])[:, :, None].expand(B, H, W)
    cols = (torch.arange(W)[None] + dx[:, None])[:, None, :].expand(B, H, W)
    out = padded[torch.arange(B)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.to(images.dtype)


class RewardClassifier(nn.Module):
    """The learned-reward hook (SERL's success classifier): the Encoder (image features and the state) plus a linear
    head; reward 1 where sigmoid(logit) > `threshold`. Load with --reward-model FILE (safetensors of this module's
    state dict)."""

    def __init__(self, spec: dict, threshold: float = 0.5):
        super().__init__()
        self.encoder = Encoder(spec)
        self.head = nn.Linear(self.encoder.out_dim, 1)
        self.threshold = threshold

    @torch.no_grad()
    def reward(self, obs: dict) -> float:
        batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in flatten_obs(obs).items()}
        return float(torch.sigmoid(self.head(self.encoder(batch)))[0, 0] > self.threshold)

    def judge(self, obs: dict, terminated: bool, info: dict) -> tuple[float, bool]:
        """SERL's hook: the classifier's verdict is the reward and the success, and a success ends the episode (a
        real robot's own reward is 0 and never terminates: without this, Q bootstraps past the goal forever)."""
        success = self.reward(obs)
        info["success"] = success
        return success, bool(terminated or success > 0)


def expert_takes_over(args: Args, robot_index: int, episode: int) -> bool:
    """The first --expert-episodes, then --expert-takeover of the rest: drawn per robot and episode, so robots differ
    and a restarted actor (or a resumed sync run) goes on with the same draws."""
    return episode < args.expert_episodes or \
        random.Random(f"{args.seed}/{robot_index}/{episode}").random() < args.expert_takeover


def load_reward_model(path: str, spec: dict, threshold: float = 0.5) -> RewardClassifier:
    from safetensors.torch import load_file

    model = RewardClassifier(spec, threshold)
    try:
        model.load_state_dict(load_file(path))
    except Exception as exc:  # a file that is not one, or one made for another observation spec
        raise SystemExit(f"--reward-model {path}: not a RewardClassifier of this robot's observations ({exc})") \
            from None
    return model.eval()


# ------------------------------------------------------------------------------------------------ learner pieces
def batch_sources(online: ReplayBuffer, offline: list, demo_fraction: float) -> list[tuple[ReplayBuffer, float]]:
    """RLPD's batch: `demo_fraction` from the demonstrations, uniform over the transitions of the offline buffers
    together (the run's interventions and --demos: one demo buffer, as RLinf and HIL-SERL keep, so a first short
    correction does not take a fixed share of every batch), the rest online; all online while there are none."""
    offline = [(b, len(b)) for b in offline if b is not None and len(b)]
    total = sum(n for _, n in offline)
    return [(online, 1 - demo_fraction if offline else 1.0)] + [(b, demo_fraction * n / total) for b, n in offline]


class Learner:
    """Networks, optimisers and the SAC / RLPD update; checkpoints everything (atomically) to learner.pt."""

    def __init__(self, args: Args, spec: dict, device: torch.device):
        self.args, self.spec, self.device = args, spec, device
        self.policy = Policy(spec, args.hidden).to(device)
        self.critic = Critic(self.policy.encoder.out_dim, self.policy.action_dim, args.num_q, args.hidden,
                             args.layer_norm).to(device)
        self.critic_target, self.encoder_target = copy.deepcopy(self.critic), copy.deepcopy(self.policy.encoder)
        self.log_alpha = torch.tensor(math.log(args.initial_alpha), device=device, requires_grad=True)
        actor_params = [p for n, p in self.policy.named_parameters() if not n.startswith("encoder.")]
        self.critic_opt = torch.optim.Adam([*self.critic.parameters(), *self.policy.encoder.parameters()],
                                           lr=args.learning_rate)
        self.actor_opt = torch.optim.Adam(actor_params, lr=args.learning_rate)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.learning_rate)
        self.updates, self.version, self.metrics = 0, 0, {}

    def to_batch(self, sample: dict) -> tuple[dict, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device

        def obs(d):
            out = {k: torch.as_tensor(v, device=dev) for k, v in d.items()}
            for k in out:
                if k.startswith("images/"):
                    out[k] = random_shift(out[k])
            return out

        return (obs(sample["obs"]), obs(sample["next_obs"]), torch.as_tensor(sample["actions"], device=dev).float(),
                torch.as_tensor(sample["rewards"], device=dev).float(),
                torch.as_tensor(sample["terminated"], device=dev).float())

    def update(self, sample: dict) -> None:
        a = self.args
        obs, next_obs, actions, rewards, terminated = self.to_batch(sample)
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():  # RLPD target: min over a random subset of the target ensemble, entropy backup
            # a' ~ the current policy (its own encoder, as SERL); only the critic's side of the target lags
            next_actions, next_logp = self.policy.head(self.policy.encoder(next_obs))
            heads = torch.randperm(a.num_q, device=self.device)[:a.critic_subsample]
            next_q = self.critic_target(self.encoder_target(next_obs), next_actions)[heads].min(0).values
            done = 0.0 if a.bootstrap_terminal else terminated
            target = rewards + a.gamma * (1 - done) * (next_q - alpha * next_logp)
        q = self.critic(self.policy.encoder(obs), actions)
        critic_loss = F.mse_loss(q, target.expand_as(q))
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        nn.utils.clip_grad_norm_([*self.critic.parameters(), *self.policy.encoder.parameters()], a.max_grad_norm)
        self.critic_opt.step()
        self.metrics.update({"losses/critic_loss": critic_loss.item(), "losses/q_mean": q.mean().item()})
        if self.updates % a.critic_actor_ratio == 0:
            feats = self.policy.encoder(obs).detach()  # the actor does not shape the encoder (DrQ / SERL)
            new_actions, logp = self.policy.head(feats)
            actor_loss = (alpha * logp - self.critic(feats, new_actions).mean(0)).mean()
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            nn.utils.clip_grad_norm_(self.actor_opt.param_groups[0]["params"], a.max_grad_norm)  # not the encoder's

            self.actor_opt.step()
            alpha_loss = -(self.log_alpha * (logp.detach() + a.target_entropy)).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_opt.step()
            self.metrics.update({"losses/actor_loss": actor_loss.item(), "losses/alpha": alpha.item(),
                                 "losses/entropy": -logp.mean().item()})
        with torch.no_grad():
            for net, tgt in ((self.critic, self.critic_target), (self.policy.encoder, self.encoder_target)):
                for p, tp in zip(net.parameters(), tgt.parameters()):
                    tp.lerp_(p, a.tau)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "encoder_target": self.encoder_target.state_dict(),
                "log_alpha": self.log_alpha.detach().cpu(), "critic_opt": self.critic_opt.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "alpha_opt": self.alpha_opt.state_dict(),
                "updates": self.updates, "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        for name in ("policy", "critic", "critic_target", "encoder_target", "critic_opt", "actor_opt", "alpha_opt"):
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.updates, self.version = int(state["updates"]), int(state["version"])


def save_checkpoint(path: Path, learner: Learner, counters: dict, sample_rng: np.random.Generator) -> None:
    """Everything but the buffers (they are durable on their own) in one file, written atomically."""
    counters["sample_rng"] = sample_rng.bit_generator.state
    buf = io.BytesIO()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    torch.save({"learner": learner.state_dict(), "counters": counters, "spec": learner.spec,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "numpy_rng": [name, keys.tolist(), pos, has_gauss, cached],
                "py_rng": json.dumps(random.getstate())}, buf)
    atomic_write(path, buf.getvalue())


def segment_from_message(arrays: dict) -> dict:
    return {"obs": {k[4:]: v for k, v in arrays.items() if k.startswith("obs.")},
            **{k: arrays[k] for k in ("actions", "rewards", "terminated", "truncated", "policy_version",
                                      "intervention")}}


# ------------------------------------------------------------------------------------------------ actor pieces
class SegmentWriter:
    """Cuts an actor's stream into segments (every --segment-steps, at episode ends and where the intervention flag
    changes, so a segment is all-human or all-policy) and keeps what the learner has not taken yet."""

    def __init__(self, first_obs: dict):
        self.reset(first_obs)

    def reset(self, obs: dict) -> None:
        self.obs, self.steps = [flatten_obs(obs)], {k: [] for k in ("actions", "rewards", "terminated", "truncated",
                                                                     "policy_version", "intervention")}

    def add(self, action, reward, terminated, truncated, version, intervened, next_obs) -> None:
        for key, value in zip(self.steps, (action, reward, terminated, truncated, version, intervened)):
            self.steps[key].append(value)
        self.obs.append(flatten_obs(next_obs))

    def __len__(self) -> int:
        return len(self.steps["actions"])

    def take(self) -> dict[str, np.ndarray]:
        arrays = {f"obs.{k}": np.stack([o[k] for o in self.obs]) for k in self.obs[0]}
        dtypes = {"actions": np.float32, "rewards": np.float32, "terminated": bool, "truncated": bool,
                  "policy_version": np.int64, "intervention": bool}
        arrays.update({k: np.asarray(v, dtypes[k]) for k, v in self.steps.items()})
        last = self.obs[-1]
        self.obs, self.steps = [last], {k: [] for k in self.steps}
        return arrays


def robot_string(args: Args) -> str:
    return args.robot if "name=" in args.robot or args.robot.startswith("franka") or args.num_robots == 1 \
        else f"{args.robot},name={args.robot.split(',')[0].replace(':', '-')}-{args.robot_index}"


def make_actor_env(args: Args) -> RobotEnv:
    env = make_robot_env(robot_string(args), args.robot_index,
                         control_hz=None if args.control_hz < 0 else args.control_hz,
                         max_episode_steps=None if args.max_episode_steps < 0 else args.max_episode_steps)
    from robot_io.sim import SimBackend, SimExpert

    if isinstance(env.backend, SimBackend) and (args.expert_episodes or args.expert_takeover):
        if env.backend.task in SimExpert.TASKS and env.backend.config.control_mode.startswith("pd_ee_delta_pos"):
            env.intervention = SimExpert(env.backend, takeover=1.0, seed=args.seed * 1000 + args.robot_index)
        else:
            print(f"no scripted expert for {env.backend.task} with {env.backend.config.control_mode} control: no "
                  f"expert episodes (give --demos)", flush=True)
    return env


def set_aside_other_runs_spool(spool: Path, run_id: str, robot: str) -> None:
    """A spool (unsent segments, the episode count) is the learner run's that it was made for: one a deleted or
    other run left under this name is moved aside (kept, not sent: it would put that run's transitions into this
    run's buffer, and its episode count would skip this run's expert episodes), and this run's id written into
    the new one. A spool without an id (made before runs had ids) is taken as this run's."""
    mark = spool / "run_id"
    if spool.exists() and mark.exists() and mark.read_text().strip() != run_id:
        aside = spool.with_name(f"{spool.name}.other-run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        spool.rename(aside)
        print(f"[actor {robot}] {spool} belonged to another learner run: moved to {aside} (not sent)", flush=True)
    if not mark.exists():
        spool.mkdir(parents=True, exist_ok=True)
        atomic_write(mark, run_id)


def run_actor(args: Args, run_dir: Path) -> None:
    """One robot: act at its control rate with the newest weights, stream segments to the learner, never wait."""
    torch.manual_seed(args.seed * 1000 + args.robot_index)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # (the learner's terminate()) unwinds: the robot is held
    env = make_actor_env(args)
    with contextlib.ExitStack() as cleanup:  # whatever ends the actor (learner gone, e-stop, a crash): the
        cleanup.callback(env.close)  # robot is held and closed, sockets and the spool released
        spec = env.spec()
        spec.pop("name", None)
        endpoint = f"tcp://{args.learner_host}:{args.port}"
        rpc = RpcClient(f"tcp://{args.learner_host}:{args.port + 2}", {"protocol": 1}, client_id=env.name)
        cleanup.callback(rpc.close)
        deadline = time.monotonic() + 120
        while True:  # the handshake: the learner compares our obs / action spec with its own
            try:
                learner_run = rpc.call("register", {"spec": spec, "robot": env.name}, timeout=5.0).meta
                break
            except HandshakeError as exc:
                raise SystemExit(f"{env.name}: {exc}") from None
            except TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{env.name}: no learner at {endpoint} for 120 s (is it running?)") from None
        hidden = int(learner_run.get("hidden", args.hidden))  # the learner's network, whatever our --hidden says
        if hidden != args.hidden:
            print(f"[actor {env.name}] the learner's networks have {hidden} hidden units (--hidden {args.hidden} "
                  f"here): using {hidden}", flush=True)
        policy = Policy(spec, hidden)
        policy.eval()
        weights = WeightSubscriber(f"tcp://{args.learner_host}:{args.port + 1}", policy)
        cleanup.callback(weights.close)
        spool = run_dir.parent / "actor_spool" / f"{run_dir.name}__{env.name}"  # unsent items survive a restart
        set_aside_other_runs_spool(spool, str(learner_run.get("run_id", "")), env.name)
        sender = DataSender(endpoint, sender_id=env.name, spool_dir=spool, max_pending=4096, resend_after=2.0)
        cleanup.callback(sender.close)
        reward_model = load_reward_model(args.reward_model, spec, args.reward_threshold) if args.reward_model else None
        backlog: list[tuple[dict, dict]] = []  # items the sender had no room for (learner gone for long)
        progress = spool / "episodes.json"  # a restarted actor goes on (expert episodes, reset seeds) where it stopped
        episode, dropped = json.loads(progress.read_text())["episode"] if progress.exists() else 0, 0
        parent = int(os.environ.get("ASYNC_SAC_LEARNER_PID", 0))  # set for the local actors of --role all
        print(f"[actor {env.name}] acting at {env.control_hz or 'unpaced'} Hz, sending to {endpoint}", flush=True)
        while True:
            takeover = env.intervention is not None and expert_takes_over(args, args.robot_index, episode)
            if env.intervention is not None:
                env.intervention.takeover = 1.0 if takeover else 0.0
            deterministic = args.eval_every > 0 and episode % args.eval_every == args.eval_every - 1 and not takeover
            obs, _ = env.reset(seed=args.seed * 100_000 + args.robot_index * 10_000 + episode)
            writer, done, ret, ep_start = SegmentWriter(obs), False, 0.0, time.monotonic()
            while not done:
                if parent and os.getppid() != parent:  # our learner died (kill -9): stop, never act on for no one
                    raise SystemExit(f"[actor {env.name}] the learner (pid {parent}) is gone: stopping")
                if weights.poll():  # swap weights in between steps, never inside one
                    weights.apply()
                action = policy.act(obs, deterministic)
                obs, reward, terminated, truncated, info = env.step(action)
                if reward_model is not None:
                    reward, terminated = reward_model.judge(obs, terminated, info)
                ret += reward
                done = terminated or truncated
                intervened = bool(info["intervened"])
                if len(writer) and intervened != bool(writer.steps["intervention"][-1]):
                    backlog.append(({"intervened": not intervened}, writer.take()))
                writer.add(info["executed_action"], reward, terminated, truncated, weights.version, intervened, obs)
                if done or len(writer) >= args.segment_steps:
                    meta = {"intervened": intervened}
                    if done:
                        meta.update(episode_done=True, success=float(info["success"]), episodic_return=ret,
                                    length=env.steps, deterministic=deterministic, human=takeover,
                                    episode_seconds=time.monotonic() - ep_start)
                    backlog.append((meta, writer.take()))
                if len(backlog) > args.max_backlog:
                    dropped += len(backlog) - args.max_backlog
                    del backlog[:len(backlog) - args.max_backlog]
                    print(f"[actor {env.name}] learner away: {dropped} segments dropped (--max-backlog)", flush=True)
                while backlog:
                    meta, arrays = backlog[0]
                    meta.update(sent_at=time.time(), control_hz=info["control_hz"], weights_version=weights.version,
                                weights_applied=weights.stats["applied"], robot=env.name)
                    try:
                        sender.send(meta, arrays, timeout=0.0)
                    except TransportTimeout:
                        break  # keep it; the learner is away. Acting goes on.
                    backlog.pop(0)
                sender.poll()
            episode += 1
            atomic_write(progress, json.dumps({"episode": episode}))


# ------------------------------------------------------------------------------------------------ main
def main(args: Args) -> None:
    for name, choices in (("role", ("all", "learner", "actor")), ("mode", ("async", "sync"))):
        if getattr(args, name) not in (*choices, "" if name == "role" else None):  # role "": all, or the saved one
            raise SystemExit(f"--{name} must be one of {choices}, got {getattr(args, name)!r}")
    if not 0 <= args.demo_fraction < 1 or not 1 <= args.critic_subsample <= args.num_q:
        raise SystemExit(f"--demo-fraction must be in [0, 1) and 1 <= --critic-subsample <= --num-q, got "
                         f"{args.demo_fraction}, {args.critic_subsample} and {args.num_q}")
    if not 0 < args.reward_threshold < 1:
        raise SystemExit(f"--reward-threshold must be in (0, 1), got {args.reward_threshold}")
    if args.utd < 0 or (args.mode == "sync" and args.utd == 0):
        raise SystemExit(f"--utd must be > 0 (or 0 for an uncapped async learner), got {args.utd} in --mode {args.mode}")
    small = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("sync_every", "checkpoint_every", "num_robots",
             "critic_actor_ratio", "segment_steps", "batch_size", "sync_steps", "max_backlog", "hidden")
             if getattr(args, k) < 1]
    if small:
        raise SystemExit(f"{', '.join(small)}: must be >= 1")
    ranges = [f"--{flag} must be {bound}, got {value}" for flag, value, ok, bound in (
        ("learning-rate", args.learning_rate, args.learning_rate > 0, "> 0"),
        ("gamma", args.gamma, 0 <= args.gamma <= 1, "in [0, 1]"), ("tau", args.tau, 0 < args.tau <= 1, "in (0, 1]"),
        ("torch-threads", args.torch_threads, args.torch_threads >= 0, ">= 0")) if not ok]
    if ranges:
        raise SystemExit("; ".join(ranges))
    if args.total_env_steps < 0 or args.total_minutes < 0:
        raise SystemExit(f"--total-env-steps and --total-minutes must be >= 0 (0 minutes: no time limit), got "
                         f"{args.total_env_steps} and {args.total_minutes}")
    for flag, path, ok in (("--demos", args.demos, Path.is_dir), ("--reward-model", args.reward_model, Path.is_file)):
        if path and not ok(Path(path)):  # now, not once a run directory that --resume would reuse them from exists
            raise SystemExit(f"{flag} {path}: no such {'directory' if ok is Path.is_dir else 'file'}")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    resumed = bool(args.resume)
    if resumed:
        run_dir = Path(args.resume)
        if not (run_dir / "args.json").exists():
            raise SystemExit(f"--resume {run_dir}: no args.json there; not a run directory of this script")
        saved = json.loads((run_dir / "args.json").read_text())
        keep = {"resume": args.resume, "role": args.role or saved.get("role") or "all", "robot_index": args.robot_index}
        for key in ("total_env_steps", "total_minutes"):  # new budgets may be given; otherwise the saved ones
            if getattr(args, key) != getattr(Args, key):
                keep[key] = getattr(args, key)
        ignored = [f"--{k.replace('_', '-')}" for k, v in asdict(args).items()
                   if k not in keep and k in saved and v != getattr(Args, k, v) and v != saved[k]]
        if ignored:
            print(f"--resume continues the run as it was: ignoring {' '.join(ignored)} (budgets and --role may "
                  f"change)", flush=True)
        args = Args(**{**saved, **keep})
        budgets = {k: keep[k] for k in ("total_env_steps", "total_minutes") if k in keep}
        if budgets and args.role != "actor":  # kept for the next --resume too (after a crash of this one)
            atomic_write(run_dir / "args.json", json.dumps({**saved, **budgets}, indent=1))
    else:
        args.role = args.role or "all"
        try:  # a bad robot string fails here, before a run directory exists, not in an actor the learner waits for
            rtype, first = parse_robot(robot_string(args))
            second = parse_robot(robot_string(replace(args, robot_index=args.robot_index + 1)))[1]
        except (RobotValidationError, KeyError, ValueError) as exc:  # what parse_robot raises for a bad string
            raise SystemExit(f"--robot {args.robot!r}: {exc}") from None
        arm = rtype.target_field if rtype.count_var else None  # (a type whose robots are told apart by an address)
        same = [f for f in ("name", arm)
                if f and getattr(first, f) is not None and getattr(first, f) == getattr(second, f)]
        if args.num_robots > 1 and (args.role == "all" or args.mode == "sync") and same:
            raise SystemExit(f"--num-robots {args.num_robots} with --robot {args.robot!r}: every robot would take the "
                             f"same {' and '.join(same)}; leave it out of --robot (names are made per robot) and give "
                             f"arms' addresses in the environment, one per robot (e.g. ROBOT_IP=ip0,ip1)")
        task = args.robot.split(",")[0].replace(":", "-")
        run_dir = Path(args.run_dir) / f"{task}__{args.exp_name}__{args.seed}"
    if args.role == "actor":
        run_actor(args, run_dir)
        return
    with contextlib.ExitStack() as cleanup:  # however the learner ends (done, an error, a dead actor): local actors
        # stopped, sync-mode robots held and closed, sockets closed, in reverse order of opening
        learn(args, run_dir, resumed, cleanup)


def learn(args: Args, run_dir: Path, resumed: bool, cleanup: contextlib.ExitStack) -> None:
    """The learner (and with --role all its local actors, or in --mode sync the robots themselves)."""
    if not resumed and run_dir.exists():
        raise SystemExit(f"run directory {run_dir} exists: continue it with --resume {run_dir}, or pick another "
                         f"--exp-name / --seed (nothing was overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resumed:
        atomic_write(run_dir / "args.json", json.dumps(asdict(args), indent=1))
    run_id_path = run_dir / "run_id"  # what tells this run's actor spools from a deleted run's of the same name
    if not run_id_path.exists():
        atomic_write(run_id_path, uuid.uuid4().hex)
    run_id = run_id_path.read_text().strip()
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    writer = SummaryWriter(str(run_dir))
    cleanup.callback(writer.close)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_dir.name,
                   mode=os.environ.get("WANDB_MODE", "offline"))

    # Buffers: durable before acknowledged; on resume they come back with their counters
    online = ReplayBuffer(run_dir / "buffer", cache_transitions=200_000, seed=args.seed)
    demo = ReplayBuffer(run_dir / "demo_buffer", cache_transitions=100_000, seed=args.seed + 1)
    prior = ReplayBuffer.open(args.demos, readonly=True) if args.demos else None
    counters = {"episodes": 0, "successes": 0.0, "minutes": 0.0}
    sample_rng = np.random.default_rng(args.seed)  # which transitions each batch takes (checkpointed)
    learner: Learner | None = None
    ckpt = run_dir / "learner.pt"
    if resumed and ckpt.exists():
        try:  # weights_only: a checkpoint handed over from elsewhere runs no code; a torn copy says so
            state = torch.load(io.BytesIO(ckpt.read_bytes()), weights_only=True)
        except Exception as e:
            raise SystemExit(f"cannot resume from {ckpt}: not a checkpoint this script wrote, or a partial copy "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        learner = Learner(args, state["spec"], device)
        learner.load_state_dict(state["learner"])
        counters = state["counters"]
        if "sample_rng" in counters:
            sample_rng.bit_generator.state = counters["sample_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():  # the GPU learner's draws (heads, a', shifts)
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, cached))
        version, internal, gauss = json.loads(state["py_rng"])
        random.setstate((version, tuple(internal), gauss))
        print(f"resumed {run_dir}: {learner.updates} updates, policy v{learner.version}, "
              f"{online.total_added} + {demo.total_added} (demo) transitions in the buffers", flush=True)
    elif resumed:
        print(f"resumed {run_dir}: 0 updates (no learner checkpoint yet: fresh networks), "
              f"{online.total_added} + {demo.total_added} (demo) transitions in the buffers", flush=True)

    # Handshake: the first robot fixes the spec (kept in spec.json; or the checkpoint has it); others must match it
    spec_path = run_dir / "spec.json"
    spec_box: dict = {"spec": learner.spec if learner else
                      (json.loads(spec_path.read_text()) if spec_path.exists() else None)}
    if spec_box["spec"] is not None and (problem := spec_problem(spec_box["spec"], args.hidden)):
        raise SystemExit(f"cannot resume {run_dir}: its spec.json is not a usable robot spec ({problem}); delete "
                         f"spec.json to take the next robot's spec")

    def register(msg):
        theirs = msg.meta.get("spec")
        problem = spec_problem(theirs, args.hidden)
        if problem:  # checked before it can become the run's spec (spec.json, which a resume reloads)
            raise HandshakeError(f"robot {msg.meta.get('robot')} sent a spec this learner cannot use: {problem}")
        if spec_box["spec"] is None:
            spec_box["spec"] = theirs
        diff = spec_diff({k: v for k, v in spec_box["spec"].items() if k not in ("task_description",)},
                         {k: v for k, v in theirs.items() if k not in ("task_description",)})
        diff.pop("type", None)
        if diff:
            raise HandshakeError(f"robot {msg.meta.get('robot')} differs from this learner's robots: {diff} "
                                 f"(heterogeneous robots need one learner per obs/action spec)")
        return {"version": learner.version if learner else 0, "run_id": run_id, "hidden": args.hidden}

    rpc = RpcServer(f"tcp://{args.bind_host}:{args.port + 2}", {"protocol": 1}, {"register": register},
                    peer_timeout=float("inf")).start()  # handshakes only: liveness is the data channel's job
    cleanup.callback(rpc.close)
    actors: list[subprocess.Popen] = []
    if args.role == "all" and args.mode == "async":  # local robots: actors read this run's args.json
        for i in range(args.num_robots):
            actors.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--role", "actor",
                                            "--resume", str(run_dir), "--robot-index", str(i)],
                                           env={**os.environ, "ASYNC_SAC_LEARNER_PID": str(os.getpid())}))

    def stop_actors() -> None:  # SIGTERM: each holds and closes its robot and sends what it has
        for proc in actors:
            if proc.poll() is None:
                proc.terminate()
        for proc in actors:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    cleanup.callback(stop_actors)

    def check_actors() -> None:  # a local actor that died leaves the learner without data: stop, and say why
        dead = [(i, p.returncode) for i, p in enumerate(actors) if p.poll() is not None]
        if dead:
            for proc in actors:
                proc.kill()
            raise SystemExit(f"local actor(s) exited: {', '.join(f'#{i} with code {rc}' for i, rc in dead)} (see "
                             f"their output above); fix the cause and continue with --resume {run_dir}")
    if args.reward_model and args.role == "learner" and args.mode == "async":
        print("note: --reward-model judges rewards where the robots act: give it to each --role actor (this "
              "learner does not use it)", flush=True)
    sync_reward_model = None
    if args.mode == "sync":
        spec_envs = []
        for i in range(args.num_robots):
            spec_envs.append(make_actor_env(Args(**{**asdict(args), "robot_index": i})))
            cleanup.callback(spec_envs[-1].close)
        spec_box["spec"] = spec_box["spec"] or {k: v for k, v in spec_envs[0].spec().items() if k != "name"}
        if args.reward_model:  # the same success classifier as the async actors use
            sync_reward_model = load_reward_model(args.reward_model, spec_envs[0].spec(), args.reward_threshold)
    print(f"learner at tcp://{args.bind_host}:{args.port} (weights +1, handshake +2); run dir {run_dir}; waiting for "
          f"a robot" if spec_box["spec"] is None else f"learner ready; run dir {run_dir}", flush=True)
    while spec_box["spec"] is None:
        check_actors()
        time.sleep(0.05)
    if not spec_path.exists():
        atomic_write(spec_path, json.dumps(spec_box["spec"], indent=1))
    if prior is not None and (problem := prior_problem(prior, spec_box["spec"])):  # now, not in the first batch
        raise SystemExit(f"--demos {args.demos} does not fit this robot: {problem}")
    if learner is None:
        learner = Learner(args, spec_box["spec"], device)
    if resumed:  # actors ignore versions they are past: continue above any version published before the crash,
        # i.e. the checkpoint's (at least the first one a run publishes) plus the syncs that can follow it before the
        # next checkpoint (a version an actor applied need not be named by a stored segment), and any a stored
        # segment names; saved at once, so a second crash before the next checkpoint goes above this one's too
        seen = [m.get("weights_version", 0) for b in (online, demo) for m in b.seg_meta.values()]
        learner.version = max([max(learner.version, 1) + -(-args.checkpoint_every // args.sync_every), *seen]) + 1
        save_checkpoint(ckpt, learner, counters, sample_rng)
    publisher = WeightPublisher(f"tcp://{args.bind_host}:{args.port + 1}", learner.policy)
    cleanup.callback(publisher.close)
    learner.version = max(learner.version, 1)
    publisher.publish(learner.version)

    # The receiver thread: drain arriving segments into the buffers, durably, then acknowledge
    delivered = [(m["session"], m["seq"]) for b in (online, demo) for m in b.seg_meta.values() if "session" in m]
    stats = {"lag": [], "latency_ms": [], "control_hz": [], "applied": {}, "episodes": [], "gen_seconds": [],
             "rejected": 0}
    stop = threading.Event()
    lock = threading.Lock()

    def store(arrays: dict, meta: dict) -> None:
        segment = segment_from_message(arrays)
        if meta.get("intervened"):  # human segments teach through both buffers (HIL-SERL); the copy that marks the
            # segment delivered (its session and seq) goes last, so a failure between the two is retried whole
            online.add(segment, {k: v for k, v in meta.items() if k not in ("session", "seq")})
        (demo if meta.get("intervened") else online).add(segment, meta)
        with lock:
            stats["lag"].append(learner.version - float(np.mean(arrays["policy_version"])))
            if "sent_at" in meta:
                stats["latency_ms"].append(1000 * (time.time() - meta["sent_at"]))
            stats["control_hz"].append(meta.get("control_hz", 0.0))
            stats["applied"][meta.get("robot", "?")] = meta.get("weights_applied", 0)
            if meta.get("episode_done"):
                stats["episodes"].append(meta)

    def receive_loop(receiver: DataReceiver) -> None:
        while not stop.is_set():
            msg = receiver.recv(timeout=0.2)
            if msg is None:
                continue
            try:
                store(msg.arrays, {**{k: v for k, v in msg.meta.items() if k != "sender"}, "seq": msg.seq})
            except OSError as exc:  # the disk (full, failing): not stored now; the actor's resend brings it again
                receiver.release(msg)
                print(f"[learner] segment from {msg.meta.get('robot')} not stored, taken again on its resend: "
                      f"{exc}", flush=True)
                continue
            except Exception as exc:  # malformed: it never will be; acknowledged, so the actor stops resending it
                print(f"[learner] segment from {msg.meta.get('robot')} rejected (malformed): {exc}", flush=True)
                with lock:
                    stats["rejected"] += 1
            receiver.ack(msg)

    receiver, receive_thread = None, None
    if args.mode == "async":
        receiver = DataReceiver(f"tcp://{args.bind_host}:{args.port}", delivered=delivered)
        receive_thread = threading.Thread(target=receive_loop, args=(receiver,), daemon=True)
        receive_thread.start()

        def stop_receiving() -> None:  # the thread first: a ZMQ socket must not be closed while another uses it
            stop.set()
            receive_thread.join(timeout=5)
            receiver.close()
        cleanup.callback(stop_receiving)

    # TRY NOT TO MODIFY: the training loop
    start_time, minutes_before = time.time(), counters["minutes"]
    last_log, updates_at_log, train_seconds = time.time(), learner.updates, 0.0
    updates_at_start, last_ckpt = learner.updates, time.time()
    sync_obs = [None] * args.num_robots
    sync_writers, sync_version = [None] * args.num_robots, learner.version
    sync_ep, sync_ret, sync_t0 = [0] * args.num_robots, [0.0] * args.num_robots, [0.0] * args.num_robots
    if resumed and args.mode == "sync":  # go on with the episodes (expert ones, reset seeds) where the run stopped:
        # each finished episode left one episode_done segment in the online buffer, durable before the crash
        finished_eps = [m.get("robot") for m in online.seg_meta.values() if m.get("episode_done")]
        sync_ep = [max(finished_eps.count(env.name), counters.get("sync_episodes", [0] * args.num_robots)[i])
                   for i, env in enumerate(spec_envs)]
    while True:
        received = online.total_added
        elapsed_min = minutes_before + (time.time() - start_time) / 60
        finished = received >= args.total_env_steps or bool(args.total_minutes and elapsed_min >= args.total_minutes)
        if finished:
            n_updates = 0
        elif args.mode == "sync":  # collect --sync-steps with the current weights, then train on them
            t0 = time.time()
            for _ in range(math.ceil(args.sync_steps / args.num_robots)):
                for i, env in enumerate(spec_envs):
                    if sync_obs[i] is None:
                        sync_obs[i], _ = env.reset(seed=args.seed * 100_000 + i * 10_000 + sync_ep[i])
                        sync_writers[i], sync_ret[i], sync_t0[i] = SegmentWriter(sync_obs[i]), 0.0, time.monotonic()
                    takeover = env.intervention is not None and expert_takes_over(args, i, sync_ep[i])
                    if env.intervention is not None:
                        env.intervention.takeover = 1.0 if takeover else 0.0
                    action = learner.policy.act(sync_obs[i])
                    obs, reward, term, trunc, info = env.step(action)
                    if sync_reward_model is not None:
                        reward, term = sync_reward_model.judge(obs, term, info)
                    w = sync_writers[i]
                    sync_ret[i] += reward
                    if len(w) and bool(info["intervened"]) != bool(w.steps["intervention"][-1]):
                        store(w.take(), {"intervened": not info["intervened"]})
                    w.add(info["executed_action"], reward, term, trunc, sync_version, info["intervened"], obs)
                    sync_obs[i] = obs
                    if term or trunc or len(w) >= args.segment_steps:
                        meta = {"intervened": bool(info["intervened"]), "control_hz": info["control_hz"],
                                "robot": env.name}
                        if term or trunc:
                            meta.update(episode_done=True, success=float(info["success"]), episodic_return=sync_ret[i],
                                        length=env.steps, deterministic=False, human=takeover,
                                        episode_seconds=time.monotonic() - sync_t0[i], episode=sync_ep[i])
                            sync_obs[i], sync_ep[i] = None, sync_ep[i] + 1
                            counters["sync_episodes"] = list(sync_ep)
                        store(w.take(), meta)
            stats["gen_seconds"].append(time.time() - t0)
            n_updates = int(args.utd * args.sync_steps) if online.total_added >= args.learning_starts else 0
        else:
            n_updates = 1
            if received < args.learning_starts or (args.utd > 0 and learner.updates >= args.utd * received):
                time.sleep(0.01)  # wait for data (the cap keeps the UTD at --utd)
                n_updates = 0
        if n_updates and learner.updates == updates_at_start:
            print(f"[learner] first update after start, {time.time() - start_time:.1f} s in", flush=True)
        t0 = time.time()
        for _ in range(n_updates):
            sample = sample_mixed(batch_sources(online, [demo, prior], args.demo_fraction), args.batch_size,
                                  sample_rng)
            learner.update(sample)
            if learner.updates % args.sync_every == 0:
                learner.version += 1
                sync_version = learner.version
                publisher.publish(learner.version)
            if learner.updates % args.checkpoint_every == 0 or time.time() - last_ckpt > args.checkpoint_seconds:
                counters["minutes"] = minutes_before + (time.time() - start_time) / 60
                save_checkpoint(ckpt, learner, counters, sample_rng)
                last_ckpt = time.time()
        train_seconds += time.time() - t0

        if finished or time.time() - last_log >= 5.0:  # TRY NOT TO MODIFY: record rewards for plotting purposes
            if not finished:
                check_actors()
            now, step = time.time(), online.total_added
            with lock:
                episodes, stats["episodes"] = stats["episodes"], []
                lag, latency, hz = stats["lag"], stats["latency_ms"], stats["control_hz"]
                stats["lag"], stats["latency_ms"], stats["control_hz"] = [], [], []
            train_eps = [e for e in episodes if not e.get("deterministic") and not e.get("human")]
            eval_eps = [e for e in episodes if e.get("deterministic")]
            counters["episodes"] += len(episodes)
            if train_eps:
                writer.add_scalar("charts/success_rate", np.mean([e["success"] for e in train_eps]), step)
                writer.add_scalar("charts/episodic_return", np.mean([e["episodic_return"] for e in train_eps]), step)
                writer.add_scalar("time/episode_seconds", np.mean([e["episode_seconds"] for e in train_eps]), step)
            if eval_eps:
                writer.add_scalar("eval/success_rate", np.mean([e["success"] for e in eval_eps]), step)
                writer.add_scalar("eval/episodes", len(eval_eps), step)
            ups = (learner.updates - updates_at_log) / max(now - last_log, 1e-6)
            writer.add_scalar("learner/updates_per_s", ups, step)
            writer.add_scalar("learner/utd_achieved", learner.updates / max(step, 1), step)
            writer.add_scalar("learner/train_seconds_per_update", train_seconds / max(learner.updates, 1), step)
            writer.add_scalar("sync/policy_lag", float(np.mean(lag)) if lag else 0.0, step)
            writer.add_scalar("sync/weights_applied", float(sum(stats["applied"].values())), step)
            writer.add_scalar("transport/rejected_segments", stats["rejected"], step)
            writer.add_scalar("sync/version", learner.version, step)
            writer.add_scalar("actor/control_hz", float(np.mean(hz)) if hz else 0.0, step)
            writer.add_scalar("transport/latency_ms", float(np.median(latency)) if latency else 0.0, step)
            writer.add_scalar("buffer/size", len(online), step)
            writer.add_scalar("buffer/durable_size", online.total_added, step)
            writer.add_scalar("buffer/demo_size", demo.total_added, step)
            writer.add_scalar("charts/SPS", int(step / max(now - start_time, 1e-6)), step)
            for key, value in learner.metrics.items():
                writer.add_scalar(key, value, step)
            succ = f"{np.mean([e['success'] for e in train_eps]):.2f}" if train_eps else "-"
            print(f"[learner] {step} transitions (+{demo.total_added} demo), {learner.updates} updates "
                  f"({ups:.1f}/s), v{learner.version}, success {succ}, actors' control "
                  f"{np.mean(hz) if hz else 0:.1f} Hz", flush=True)
            last_log, updates_at_log = now, learner.updates
        if finished:
            break
    counters["minutes"] = minutes_before + (time.time() - start_time) / 60
    save_checkpoint(ckpt, learner, counters, sample_rng)
    cleanup.close()  # (the receiver, the actors, the sockets: before the summary that says the run is done)
    summary = {"transitions": online.total_added, "demo_transitions": demo.total_added, "updates": learner.updates,
               "version": learner.version, "minutes": counters["minutes"], "episodes": counters["episodes"],
               "args": asdict(args)}
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=1))
    print(f"done: {summary['transitions']} transitions, {learner.updates} updates, policy v{learner.version}, "
          f"{summary['minutes']:.1f} min; run dir {run_dir}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
