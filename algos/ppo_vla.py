"""PPO / GRPO for a VLA with a tractable action likelihood: discretised action tokens, on ManiSkill and LIBERO.

Papers: RLinf (arXiv 2509.15965) and RLinf-VLA (arXiv 2510.06710), which fine-tune OpenVLA on ManiSkill and
OpenVLA-OFT on LIBERO with PPO and GRPO; OpenVLA (Kim et al., arXiv 2406.09246) for the action tokens (each action
dimension, scaled by its 1st / 99th demo percentiles to [-1, 1], is one of 256 uniform bins) and OpenVLA-OFT (Kim et
al., 2025) for decoding a whole action chunk in one pass. Reproduces the "few-shot SFT -> PPO / GRPO" shape of those
tables at CPU scale with the tiny VLM: behaviour cloning on a few demos (cross-entropy on their action tokens), then RL.

    python algos/ppo_vla.py                         # ManiSkill PushCube-v1 (state): BC on 3 demos, then PPO
    python algos/ppo_vla.py --env libero            # LIBERO-Object task 0 (images)
    python algos/ppo_vla.py --adv-type grpo         # GRPO: groups of envs share an initial state, no critic

The policy: the π0 VLM (SigLIP + Gemma, `common.pi0`) encodes the cameras and the prompt; the mean of its valid prefix
states and the normalised proprioceptive state feed an MLP whose output holds `--action-bins` logits for each of the
chunk's H actions and A action dimensions: H*A categoricals, independent given the observation (OFT's parallel
decoding). log pi(chunk | obs) = the sum over the executed tokens of log softmax(logits / temperature)[bin]: exact, so
the PPO ratio needs no surrogate likelihood (the flow policies of flow_sde_pi0.py / flow_noise_pi0.py need an SDE step
or a noise network to get one). The critic is an MLP on the same features, detached (RLinf's value head after the
VLM). PPO: samples are chunk steps (rewards summed over the chunk), GAE (γ 0.99, λ 0.95), clip 0.2, Huber value loss
(δ 10) with value clipping, an optional entropy bonus; the VLM is frozen by default (the action head and the critic
train) and `--train-vlm` trains it too. Eval decodes each token's most likely bin.
"""

import io
import json
import math
import os
import random
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

from common.demos import check_demos, demo_chunks, ensure_demos, load_demos
from common.envs import (check_task, eval_initial_states, make_task_env, run_eval_episodes, task_instructions,
                         task_names)
from common.fsutil import atomic_write
from common.libero_env import MAX_EPISODE_STEPS
from common.pi0 import PromptPrefixCache, pooled_prefix
from common.pi0_io import (NormStats, Pi0Processor, existing_checkpoint, load_pi0, load_pi0_policy, make_tokenizer,
                           read_torch_state, save_pi0)


@dataclass
class Args:
    exp_name: str = "ppo_vla"
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

    # Environment
    env: str = "maniskill"
    """maniskill or libero"""
    task: str = ""
    """a ManiSkill env id or LIBERO "<suite>/<task ids>" (one task, libero_object/0; a subset, libero_object/0-3 or
    /0,2,5; a whole suite, libero_object) (default: PushCube-v1, libero_object/0)"""
    obs_mode: str = "state"
    """ManiSkill observation mode (state or rgb); LIBERO always uses images"""
    control_mode: str = "pd_joint_pos"
    """ManiSkill controller (the motion-planning demos' one)"""
    image_size: int = 64
    """camera resolution"""
    max_episode_steps: int = 0
    """0: 100 for ManiSkill (its registered 50 is too short), the suite's limit for LIBERO"""
    num_envs: int = 4
    """parallel training envs (worker processes on CPU)"""
    bootstrap: str = "truncation"
    """add γ·V(final obs) to a chunk's reward when it ends in: truncation (correct), always (RLinf's ManiSkill), none"""

    # Model and initialisation
    init: str = "bc"
    """bc (behaviour cloning on --bc-demos demos first, in this run), vla:PATH (a checkpoint of this script, e.g. a
    BC-only run with --total-iterations 0), scratch (RL from a random action head)"""
    backbone: str = "scratch"
    """where the VLM comes from for --init bc / scratch: scratch (a fresh --model), sft:PATH (a π0 checkpoint of
    algos/sft_pi0.py), openpi:PATH (real π0 weights)"""
    model: str = "tiny"
    """VLM preset for --backbone scratch: tiny, pi0 or pi05"""
    tokenizer: str = "bytes"
    """bytes, or PaliGemma's SentencePiece model (real weights)"""
    action_bins: int = 256
    """tokens per action dimension (OpenVLA: 256 uniform bins over [-1, 1])"""
    action_chunk: int = 8
    """actions decoded and executed per policy call"""
    head_hidden: int = 256
    """width of the action head's and the critic's two hidden layers"""
    temperature: float = 1.0
    """sampling temperature of the rollouts (the log-probs are those of the tempered distribution)"""
    train_vlm: bool = False
    """train the VLM in RL too (default: frozen, its features computed once per rollout step)"""

    # Behaviour cloning (the few-shot start)
    bc_demos: int = 0
    """demos for --init bc, per task (0: 3 on ManiSkill, 20 on LIBERO, as the SFT start of the πRL scripts); generated
    first when missing"""
    demos: str = ""
    """demo dataset directory (default data/demos/<task>)"""
    bc_steps: int = 1500
    """Adam steps of cross-entropy on the demos' action tokens (the VLM trains too)"""
    bc_lr: float = 1e-3
    """BC learning rate"""
    bc_batch_size: int = 64
    """BC samples per step"""

    # PPO
    total_iterations: int = 60
    """RL iterations (rollout + update)"""
    total_minutes: float = 0.0
    """stop after this much training wall clock (env start-up and evals not counted; 0: no limit)"""
    num_steps: int = 32
    """chunk steps per env per iteration (GAE mode)"""
    update_epochs: int = 4
    """PPO epochs per iteration"""
    minibatch_size: int = 64
    """chunk steps per minibatch"""
    learning_rate: float = 5e-5
    """actor learning rate (action head, and the VLM with --train-vlm)"""
    value_lr: float = 1e-3
    """critic learning rate"""
    actor_warmup: int = 3
    """RL iterations over which the actor lr ramps from 0 (the critic learns the BC policy's values first); gae
    only: under grpo, which has no critic, the actor trains at the full lr from the first iteration"""
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
    ent_coef: float = 0.0
    """entropy bonus (mean token entropy)"""
    norm_adv: bool = True
    """normalise GAE advantages over the batch (GRPO's are normalised within their groups already)"""
    logprob_type: str = "token"
    """token (one ratio per executed action token) or chunk (one per sample: its chunk x A token log-probs summed,
    so a small change per token makes a large ratio: at lr 1e-4 on PushCube the first update clipped 64% of them)"""
    adv_type: str = "gae"
    """gae (PPO with a critic) or grpo (group-relative, no critic)"""
    group_size: int = 4
    """GRPO: envs per group sharing one initial state (num_envs must be a multiple)"""
    filter_rewards: bool = True
    """GRPO: drop groups whose mean success is outside [0.1, 0.9]"""

    # Evaluation
    eval_every: int = 20
    """iterations between evaluations (also after BC and at the end)"""
    eval_episodes: int = 0
    """greedy-decoding eval episodes, initial states 0..N-1 (0: 50 on ManiSkill, 25 per LIBERO task)"""
    num_eval_envs: int = 2
    """parallel eval envs"""
    checkpoint_every: int = 5
    """iterations between checkpoints (resume points)"""


def mlp(d_in: int, hidden: int, d_out: int, last_std: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                        nn.Linear(hidden, d_out))
    nn.init.normal_(net[-1].weight, std=last_std)
    nn.init.zeros_(net[-1].bias)
    return net


class ActionTokenHead(nn.Module):
    """[VLM prefix mean, state] -> logits (B, chunk, A, bins): one categorical per action token."""

    def __init__(self, d_in: int, hidden: int, chunk: int, action_dim: int, bins: int):
        super().__init__()
        self.shape = (chunk, action_dim, bins)
        self.net = mlp(d_in, hidden, chunk * action_dim * bins, last_std=0.01)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats).view(-1, *self.shape)


def bin_centres(bins: int, device=None) -> torch.Tensor:
    """OpenVLA's de-tokenisation: bin k of `bins` uniform bins over [-1, 1] decodes to its centre."""
    edges = torch.linspace(-1, 1, bins + 1, device=device)
    return (edges[:-1] + edges[1:]) / 2


def tokenize_actions(actions: torch.Tensor, bins: int) -> torch.Tensor:
    """Normalised actions (clipped to [-1, 1]) -> bin indices."""
    return ((actions.clamp(-1, 1) + 1) / 2 * bins).long().clamp(max=bins - 1)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """Per-token log-prob (B, chunk, A) of `tokens` and entropy of the tempered categoricals."""
    logp_all = F.log_softmax(logits / temperature, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, tokens[..., None]).squeeze(-1), entropy


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


def grpo_advantages(episode_return, episode_success, group_size: int, filter_rewards: bool):
    """GRPO over (N,) episodes in groups of `group_size` consecutive envs: each return minus its group's mean, over
    the group's standard deviation (a group of equal returns gets 0); and which episodes to keep: with
    `filter_rewards` only groups whose mean success is in [0.1, 0.9] (all failing or all succeeding teaches nothing)."""
    returns = episode_return.view(-1, group_size)
    advantages = ((returns - returns.mean(1, keepdim=True)) / (returns.std(1, keepdim=True) + 1e-6)).view(-1)
    keep = torch.ones_like(advantages, dtype=torch.bool)
    if filter_rewards:
        success = episode_success.view(-1, group_size).mean(1)  # success, whatever the reward
        keep = ((success >= 0.1) & (success <= 0.9)).repeat_interleave(group_size)
    return advantages, keep


def actor_loss(logratio, advantages, clip: float, weights):
    """PPO clipped surrogate, averaged over the executed elements (`weights` 1/0)."""
    ratio = logratio.exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return (loss * weights).sum() / weights.expand_as(loss).sum().clamp(min=1)


def value_loss(new_value, old_value, returns, clip: float, delta: float):
    """Huber loss with value clipping around the rollout values (max of the clipped and unclipped losses)."""
    clipped = old_value + (new_value - old_value).clamp(-clip, clip)
    return torch.max(F.huber_loss(new_value, returns, delta=delta, reduction="none"),
                     F.huber_loss(clipped, returns, delta=delta, reduction="none")).mean()


def make_env(args: Args, num_envs: int, eval_mode: bool = False, num_episodes: int | None = None,
             auto_reset: bool = True):
    return make_task_env(args.env, args.task, num_envs, obs_mode=args.obs_mode, control_mode=args.control_mode,
                         image_size=args.image_size, max_episode_steps=args.max_episode_steps, eval_mode=eval_mode,
                         num_eval_episodes=num_episodes, auto_reset=auto_reset, seed=args.seed)


if __name__ == "__main__":
    args = tyro.cli(Args)
    # TRY NOT TO MODIFY: argument checks and defaults
    if args.env not in ("libero", "maniskill"):
        raise SystemExit(f"--env must be libero or maniskill, got {args.env!r}")
    args.task = args.task or ("libero_object/0" if args.env == "libero" else "PushCube-v1")
    try:  # the task now, not after the model and the run directory are made
        check_task(args.env, args.task, exists=True)
    except ValueError as e:
        raise SystemExit(f"--task {args.task}: {e}")
    suite = args.task.split("/")[0]
    if not args.max_episode_steps:
        args.max_episode_steps = MAX_EPISODE_STEPS[suite] if args.env == "libero" else 100
    for name, choices in (("bootstrap", ("truncation", "always", "none")), ("logprob_type", ("chunk", "token")),
                          ("adv_type", ("gae", "grpo")), ("model", ("tiny", "pi0", "pi05"))):
        if getattr(args, name) not in choices:
            raise SystemExit(f"--{name.replace('_', '-')} must be one of {choices}, got {getattr(args, name)!r}")
    init_kind, _, init_path = args.init.partition(":")
    if init_kind not in ("bc", "vla", "scratch") or (init_kind == "vla") != bool(init_path):
        raise SystemExit(f"--init must be bc, vla:PATH or scratch, got {args.init!r}")
    if init_kind == "vla" and not (Path(init_path) / "vla.pt").exists():
        raise SystemExit(f"--init {args.init}: no checkpoint of this script there (vla.pt missing)")
    if init_kind == "vla" and not (Path(init_path) / "pi0_config.json").exists():  # (before the run dir is made)
        raise SystemExit(f"--init {args.init}: not a checkpoint of this script (vla.pt without pi0_config.json)")
    if args.backbone.partition(":")[0] not in ("scratch", "sft", "openpi"):
        raise SystemExit(f"--backbone must be scratch, sft:PATH or openpi:PATH, got {args.backbone!r}")
    if args.env == "libero":
        from common.libero_env import eval_episode_count

        try:
            args.eval_episodes = eval_episode_count(args.eval_episodes, args.task)
        except ValueError as e:
            raise SystemExit(str(e))
    args.eval_episodes = args.eval_episodes or 50
    args.bc_demos = args.bc_demos or (20 if args.env == "libero" else 3)
    for name, low in (("action_bins", 2), ("action_chunk", 1), ("head_hidden", 1), ("num_envs", 1), ("num_steps", 1),
                      ("update_epochs", 1), ("minibatch_size", 1), ("bc_batch_size", 1), ("bc_steps", 0),
                      ("total_iterations", 0), ("eval_every", 1), ("checkpoint_every", 1), ("num_eval_envs", 1),
                      ("group_size", 2), ("total_minutes", 0), ("actor_warmup", 0), ("image_size", 1),
                      ("torch_threads", 0)):
        if getattr(args, name) < low:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise SystemExit(f"--temperature must be > 0, got {args.temperature}")
    if args.env == "maniskill" and args.obs_mode not in ("state", "rgb"):
        raise SystemExit(f"--obs-mode must be state or rgb, got {args.obs_mode!r}")
    if args.demos and Path(args.demos).exists() and not Path(args.demos).is_dir():
        raise SystemExit(f"--demos {args.demos} is a file, not a demo directory")
    if args.adv_type == "grpo" and args.num_envs % args.group_size:
        raise SystemExit(f"--num-envs {args.num_envs} must be a multiple of --group-size {args.group_size}")

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

    # ALGO LOGIC: the VLA (VLM + action-token head + critic) and, for --init bc, its demos
    resuming = args.resume and resume_dir is not None and (resume_dir / "vla.pt").exists()
    start_from = resume_dir if resuming else Path(init_path) if init_kind == "vla" else None
    episodes, meta = None, {"extra": {}}
    tokenizer = make_tokenizer(args.tokenizer)
    if start_from is not None:
        try:
            model, norm_stats, meta = load_pi0(start_from, device)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"{start_from}: {e}") from None
        extra = meta.get("extra", {})
        if not {"env_action_dim", "camera_keys", "args"} <= set(extra):
            raise SystemExit(f"{start_from}: not a checkpoint of this script (another script's: no env_action_dim, "
                             f"camera_keys or args in its metadata)")
        env_action_dim, camera_keys, saved_args = extra["env_action_dim"], tuple(extra["camera_keys"]), extra["args"]
        made_for = {k: saved_args[k] for k in ("env", "task", "obs_mode", "control_mode")}
        if made_for != {k: getattr(args, k) for k in made_for}:
            raise SystemExit(f"{start_from} was trained on {made_for}: pass the same --env / --task / --obs-mode / "
                             "--control-mode")
        for key in ("action_bins", "action_chunk", "head_hidden"):  # the head's shape is the checkpoint's
            if getattr(args, key) != saved_args[key]:
                print(f"{start_from}: keeping its --{key.replace('_', '-')} {saved_args[key]} (given "
                      f"{getattr(args, key)}): the action head was trained with it", flush=True)
            setattr(args, key, saved_args[key])
    else:
        try:
            model, norm_stats, env_action_dim, camera_keys = load_pi0_policy(
                args.backbone, env=args.env, obs_mode=args.obs_mode, preset=args.model, device=device,
                instructions=task_instructions(args.env, args.task), tokenizer=tokenizer)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--backbone {args.backbone}: {e}")
        if init_kind == "bc":
            demo_dir = ensure_demos(args.env, args.task, args.bc_demos, args.demos or None, obs_mode=args.obs_mode,
                                    image_size=args.image_size)
            tasks = task_names(args.env, args.task)
            episodes = load_demos(demo_dir, per_task=args.bc_demos, tasks=tasks)
            if len(episodes) < args.bc_demos * len(tasks):
                raise SystemExit(f"{demo_dir} holds {len(episodes)} successful demos of {args.task}, --bc-demos asks "
                                 f"for {args.bc_demos} of each of its {len(tasks)} tasks: pass --demos with a new "
                                 f"directory (they are generated there)")
            try:
                camera_keys = check_demos(episodes, demo_dir, env=args.env, obs_mode=args.obs_mode,
                                          control_mode=args.control_mode, image_size=args.image_size,
                                          eval_states=eval_initial_states(args.env, args.task,
                                                                          args.eval_episodes)) or camera_keys
            except ValueError as e:
                raise SystemExit(str(e))
            env_action_dim = episodes[0]["actions"].shape[1]
            if norm_stats is None:  # OpenVLA's action bounds: the demos' 1st / 99th percentiles
                norm_stats = NormStats.from_data({"state": np.concatenate([e["obs"]["state"][:-1] for e in episodes]),
                                                  "actions": np.concatenate([e["actions"] for e in episodes])})
    cfg = model.cfg
    if norm_stats is None:
        raise SystemExit("--init scratch with --backbone scratch has no action bounds to tokenise with: use --init bc "
                         "(bounds from the demos) or a --backbone checkpoint with norm stats")
    camera_keys = camera_keys[: cfg.num_cameras]
    processor = Pi0Processor(cfg, tokenizer, norm_stats, env_action_dim, camera_keys)
    processor.quantile = True  # every dim to [-1, 1] by its q01 / q99 (OpenVLA), the bins' range
    chunk, A, bins = args.action_chunk, env_action_dim, args.action_bins
    feat_dim = cfg.vlm_width + cfg.action_dim
    head = ActionTokenHead(feat_dim, args.head_hidden, chunk, A, bins).to(device)
    value_head = mlp(feat_dim, args.head_hidden, 1, last_std=0.02).to(device)
    centres = bin_centres(bins, device)
    if start_from is not None:
        try:
            heads = read_torch_state(start_from / "vla.pt")
        except ValueError as e:
            raise SystemExit(f"cannot start from {start_from}: {e}") from None
        head.load_state_dict(heads["head"])
        value_head.load_state_dict(heads["value_head"])
    if not args.train_vlm:
        model.requires_grad_(False)
    actor_params = list(head.parameters()) + [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": actor_params, "lr": args.learning_rate},
                                   {"params": list(value_head.parameters()), "lr": args.value_lr}],
                                  betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    start_iter, global_step, history, bc_done = 0, 0, [], init_kind != "bc"
    trainer = None
    if resuming:
        try:
            trainer = read_torch_state(resume_dir / "trainer.pt")
        except ValueError as e:
            raise SystemExit(f"--resume: {e}") from None
        optimizer.load_state_dict(trainer["optimizer"])
        torch.set_rng_state(trainer["torch_rng"])
        if trainer.get("cuda_rng") and torch.cuda.is_available():  # sampling and shuffling draw on the GPU's
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])
        extra = meta["extra"]
        start_iter, global_step, history, bc_done = extra["iteration"], extra["global_step"], extra["history"], True
        print(f"resuming {run_name} at iteration {start_iter}")

    prompt_prefixes = PromptPrefixCache(model)  # state-only tasks: a frozen VLM sees only the prompt

    def features(batch, grad: bool) -> torch.Tensor:
        """[mean of the valid VLM prefix states, normalised state] (B, feat_dim)."""
        inputs = (batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"])
        if grad:
            prefix = model.encode_prefix(*inputs)
        elif not args.train_vlm:  # frozen VLM (outside BC): prompt-only prefixes are cached
            prefix = prompt_prefixes(*inputs)
        else:
            with torch.no_grad():
                prefix = model.encode_prefix(*inputs)
        return torch.cat([pooled_prefix(prefix), batch["state"].float()], -1)

    def act(obs, deterministic: bool):
        """One policy call -> env actions (B, chunk, A) and the rollout record."""
        batch = processor.batch(obs["state"], obs.get("images"), obs["task_description"], device)
        with torch.no_grad():
            feats = features(batch, grad=False)
            logits = head(feats)
            if deterministic:
                tokens = logits.argmax(-1)
            else:
                tokens = torch.distributions.Categorical(logits=logits / args.temperature).sample()
            logp, _ = token_log_probs(logits, tokens, args.temperature)
            value = value_head(feats).squeeze(-1)
        actions = processor.actions_to_env(centres[tokens], obs["state"])
        B = tokens.shape[0]
        record = {"feats": feats, "tokens": tokens, "logp": logp.reshape(B, -1), "value": value}
        if args.train_vlm:
            record["batch"] = batch
        return actions, record

    def value_of(obs):
        batch = processor.batch(obs["state"], obs.get("images"), obs["task_description"], device)
        with torch.no_grad():
            return value_head(features(batch, grad=False)).squeeze(-1)

    def evaluate(step: int) -> dict:
        env = make_env(args, min(args.num_eval_envs, args.eval_episodes), eval_mode=True,
                       num_episodes=args.eval_episodes)
        return run_eval_episodes(env, lambda obs: act(obs, deterministic=True)[0],
                                 run_dir / f"eval_{step}.mp4" if args.capture_video else None)

    def save(iteration: int, minutes: float) -> None:
        heads, trainer_buf = io.BytesIO(), io.BytesIO()
        torch.save({"head": head.state_dict(), "value_head": value_head.state_dict()}, heads)
        np_state = np.random.get_state()
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "np_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                    "env_rng": json.dumps(envs.rng_state) if envs is not None else None}, trainer_buf)
        save_pi0(ckpt_dir, model, norm_stats, processor.tokenizer.name,
                 extra={"iteration": iteration, "global_step": global_step, "history": history, "train_minutes": minutes,
                        "env_action_dim": env_action_dim, "camera_keys": list(camera_keys), "args": asdict(args)},
                 extra_files={"vla.pt": heads.getvalue(), "trainer.pt": trainer_buf.getvalue()})

    # ---------------------------------------------------------------- ALGO LOGIC: behaviour cloning (the SFT start)
    envs = None
    print(f"{args.env} {args.task}: VLA {cfg.variant} VLM + {bins}-bin action tokens ({chunk} x {A} per call), "
          f"{sum(p.numel() for p in actor_params):,} actor parameters trained in RL, {args.adv_type}, device {device}")
    if not bc_done:
        states, chunks, images, texts = demo_chunks(episodes, chunk, camera_keys)
        targets = tokenize_actions(processor.actions_to_model(chunks, states)[..., :A], bins)
        bc_params = list(head.parameters()) + list(model.parameters())  # BC trains the VLM too (SFT)
        model.requires_grad_(True)
        bc_opt = torch.optim.AdamW(bc_params, lr=args.bc_lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(args.seed)
        for step in (bar := tqdm(range(args.bc_steps), desc="bc", mininterval=2.0)):
            idx = torch.randint(0, len(states), (args.bc_batch_size,), generator=gen)
            batch = processor.batch(states[idx], {k: v[idx] for k, v in images.items()}, [texts[i] for i in idx],
                                    device)
            logits = head(features(batch, grad=True))
            loss = F.cross_entropy(logits.reshape(-1, bins), targets[idx].to(device).reshape(-1))
            bc_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(bc_params, 1.0)
            bc_opt.step()
            if step % 50 == 0:
                writer.add_scalar("losses/bc_loss", loss.item(), step)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.requires_grad_(args.train_vlm)
        prompt_prefixes.clear()
        del episodes, states, chunks, images, targets
    if not history:  # (a run resumed from its post-BC checkpoint has this eval already)
        stats = evaluate(0)
        history.append({"iteration": 0, "global_step": 0, "minutes": 0.0, **stats})
        writer.add_scalar("eval/success_rate", stats["success_rate"], 0)
        print(f"{'BC' if init_kind == 'bc' else 'initial'} policy: eval success {stats['success_rate']:.2f} over "
              f"{stats['episodes']} episodes")
        save(0, 0.0)  # the start (after BC): a kill in RL does not redo it

    # ---------------------------------------------------------------- ALGO LOGIC: RL
    last_iter, saved_iter = start_iter, start_iter
    if start_iter < args.total_iterations:
        envs = make_env(args, args.num_envs, auto_reset=args.adv_type == "gae")
        resumed_draw = trainer is not None and bool(trainer.get("env_rng"))
        if resumed_draw:  # go on drawing initial states where the run stopped, from the first reset on
            envs.rng_state = json.loads(trainer["env_rng"])
            s = trainer["np_rng"]
            np.random.set_state((s[0], np.asarray(s[1], np.uint32), *s[2:]))
        obs = envs.reset(seed=None if resumed_draw else args.seed)  # (reseeded, it would replay the first states)
    # the training clock starts here, as in CleanRL: env start-up and the start's eval are outside it, like evals
    start_time, eval_seconds = time.time() - meta["extra"].get("train_minutes", 0.0) * 60 * resuming, 0.0
    bar = tqdm(range(start_iter, args.total_iterations), initial=start_iter, total=args.total_iterations,
               desc=args.adv_type, mininterval=2.0)
    for iteration in bar:
        it_start = time.time()
        records, rewards, dones, masks, episode_stats = [], [], [], [], []
        if args.adv_type == "grpo":  # one episode per env; groups of envs share an initial state
            group_ids = np.random.randint(0, envs.num_reset_ids, args.num_envs // args.group_size)
            obs = envs.reset(reset_ids=np.repeat(group_ids, args.group_size).tolist())
        alive = torch.ones(args.num_envs, dtype=torch.bool)
        episode_success = torch.zeros(args.num_envs)  # GRPO: each env's one episode (the reward filter's success)
        max_calls = args.num_steps if args.adv_type == "gae" else math.ceil(args.max_episode_steps / chunk)
        for step in range(max_calls):
            actions, rec = act(obs, deterministic=False)
            obs, reward, terminated, truncated, info = envs.step(actions.cpu())
            done = (terminated | truncated).cpu()
            reward = reward.sum(1).cpu()  # chunk-level reward: the executed steps' sum
            executed = info["executed_steps"].cpu()
            global_step += int(executed.sum())
            # an episode that ended mid-chunk never ran the chunk's later actions: their tokens stay out
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

        # advantages: GAE over chunk steps, or GRPO's group-normalised episode returns
        with torch.no_grad():
            if args.adv_type == "gae":
                values = torch.stack([r["value"].cpu() for r in records])
                next_value = value_of(obs).cpu()
                advantages = gae(rewards_t, values, dones_t, next_value, args.gamma, args.gae_lambda)
                returns = advantages + values
            else:
                values = torch.zeros(T, args.num_envs)
                advantages, keep = grpo_advantages((rewards_t * masks_t).sum(0), episode_success, args.group_size,
                                                   args.filter_rewards)
                advantages = advantages[None].expand(T, -1).clone()  # each of an episode's chunk steps
                masks_t = masks_t * keep[None].float()
                returns = advantages

        flat_mask = masks_t.reshape(-1).bool().to(device)

        def cat(key):
            return torch.cat([r[key] for r in records])[flat_mask]
        feats, tokens, logp_old, executed_mask = cat("feats"), cat("tokens"), cat("logp"), cat("executed").float()
        data = {k: torch.cat([r["batch"][k] for r in records])[flat_mask] for k in records[0]["batch"]} \
            if args.train_vlm else None
        adv_flat = advantages.reshape(-1).to(device)[flat_mask]
        ret_flat, val_flat = returns.reshape(-1).to(device)[flat_mask], values.reshape(-1).to(device)[flat_mask]
        n_samples = int(flat_mask.sum())
        if args.norm_adv and args.adv_type == "gae" and n_samples > 1:
            adv_flat = (adv_flat - adv_flat.mean()) / (adv_flat.std() + 1e-8)
        rollout_time = time.time() - it_start

        # PPO update
        warmup = args.actor_warmup if args.adv_type == "gae" else 0  # (GRPO has no critic to give a head start)
        optimizer.param_groups[0]["lr"] = args.learning_rate * min(1.0, iteration / warmup) if warmup \
            else args.learning_rate
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        clipfracs, approx_kls, pg_losses, v_losses, entropies, first_ratio_err = [], [], [], [], [], None
        for epoch in range(args.update_epochs if n_samples else 0):
            perm = torch.randperm(n_samples, device=device)
            for start in range(0, n_samples, args.minibatch_size):
                mb = perm[start:start + args.minibatch_size]
                mb_feats = features({k: v[mb] for k, v in data.items()}, grad=True) if args.train_vlm else feats[mb]
                new_logp, entropy = token_log_probs(head(mb_feats), tokens[mb], args.temperature)
                new_logp, entropy = new_logp.reshape(len(mb), -1), entropy.reshape(len(mb), -1)
                mb_executed = executed_mask[mb]
                logratio = (new_logp - logp_old[mb]) * mb_executed
                if args.logprob_type == "chunk":
                    logratio, mb_executed_r = logratio.sum(-1, keepdim=True), mb_executed.amax(-1, keepdim=True)
                else:
                    mb_executed_r = mb_executed
                ratio = logratio.exp()
                if epoch == 0 and start == 0:
                    first_ratio_err = float((ratio.detach() - 1).abs().max())
                pg_loss = actor_loss(logratio, adv_flat[mb][:, None], args.clip_coef, mb_executed_r)
                ent = (entropy * mb_executed).sum() / mb_executed.sum().clamp(min=1)
                loss = pg_loss - args.ent_coef * ent
                if args.adv_type == "gae":
                    new_value = value_head(mb_feats.detach()).squeeze(-1)
                    v_loss = value_loss(new_value, val_flat[mb], ret_flat[mb], args.value_clip, args.huber_delta)
                    loss = loss + v_loss
                    v_losses.append(v_loss.item())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(actor_params + list(value_head.parameters()), args.max_grad_norm)
                optimizer.step()
                with torch.no_grad():  # over the executed samples only (a masked one has ratio 1 by construction)
                    n_exec = mb_executed_r.sum().clamp(min=1)
                    approx_kls.append(float((((ratio - 1) - logratio) * mb_executed_r).sum() / n_exec))
                    clipfracs.append(float((((ratio - 1).abs() > args.clip_coef) * mb_executed_r).sum() / n_exec))
                pg_losses.append(pg_loss.item())
                entropies.append(ent.item())

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        elapsed = time.time() - start_time - eval_seconds  # training wall clock
        if episode_stats:
            writer.add_scalar("charts/episodic_return", np.mean([e[0] for e in episode_stats]), global_step)
            writer.add_scalar("charts/success_rate", np.mean([e[1] for e in episode_stats]), global_step)
        writer.add_scalar("charts/SPS", int(global_step / max(elapsed, 1e-6)), global_step)
        # NaN where no minibatch trained this iteration (GRPO's filter kept no group): not a loss of 0
        for key, values_logged in (("policy_loss", pg_losses), ("value_loss", v_losses), ("entropy", entropies),
                                   ("approx_kl", approx_kls), ("clipfrac", clipfracs)):
            if key == "value_loss" and args.adv_type != "gae":
                continue  # GRPO has no critic
            writer.add_scalar(f"losses/{key}", np.mean(values_logged) if values_logged else float("nan"), global_step)
        writer.add_scalar("losses/first_ratio_error", float("nan") if first_ratio_err is None else first_ratio_err,
                          global_step)
        if args.adv_type == "gae" and n_samples > 1:  # how much of the return the rollout's values explained
            var_returns = float(ret_flat.var())
            writer.add_scalar("losses/explained_variance", float("nan") if var_returns == 0 else
                              1 - float((ret_flat - val_flat).var()) / var_returns, global_step)
        writer.add_scalar("time/rollout", rollout_time, global_step)
        writer.add_scalar("time/update", time.time() - it_start - rollout_time, global_step)
        bar.set_postfix(success=f"{np.mean([e[1] for e in episode_stats]) if episode_stats else float('nan'):.2f}",
                        steps=global_step)
        done_iters = iteration + 1
        out_of_time = args.total_minutes and elapsed / 60 >= args.total_minutes
        if done_iters % args.eval_every == 0 or done_iters == args.total_iterations or out_of_time:
            t0 = time.time()
            stats = evaluate(done_iters)
            eval_seconds += time.time() - t0
            history.append({"iteration": done_iters, "global_step": global_step, "minutes": elapsed / 60, **stats})
            writer.add_scalar("eval/success_rate", stats["success_rate"], global_step)
            tqdm.write(f"iteration {done_iters}: eval success {stats['success_rate']:.2f} ({global_step} env steps, "
                       f"{elapsed / 60:.1f} min)")
        last_iter = done_iters
        if done_iters % args.checkpoint_every == 0 or done_iters == args.total_iterations or out_of_time:
            save(done_iters, elapsed / 60)
            saved_iter = done_iters
        if out_of_time:
            break
    minutes = (time.time() - start_time - eval_seconds) / 60
    if saved_iter != last_iter:
        save(last_iter, minutes)
    if envs is not None:
        envs.close()
    summary = {"task": args.task, "env": args.env, "algorithm": f"ppo_vla_{args.adv_type}",
               "start_success": history[0]["success_rate"], "final_success": history[-1]["success_rate"],
               "env_steps": global_step, "minutes": minutes, "history": history, "args": asdict(args)}
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=1))
    print(f"\n{args.task}: eval success {summary['start_success']:.2f} (start) -> {summary['final_success']:.2f} "
          f"after {global_step} env steps in {minutes:.1f} min. Checkpoint: {ckpt_dir}")
    writer.close()
