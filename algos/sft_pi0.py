"""Few-shot flow-matching SFT of π0 / π0.5 from demonstrations: the starting point of πRL.

Papers: π0 (Black et al., 2024, arXiv 2410.24164) for the flow-matching objective; πRL (Chen et al., 2025,
arXiv 2510.25889), whose RL runs start from few-shot SFT checkpoints ("few-shot SFT" rows of its tables).
Reproduces, at CPU scale with the tiny config: SFT success after N demos on ManiSkill PushCube-v1 (state) and on a
LIBERO-Object task (images), in the few-shot band (20-60%) that πRL starts from.

    python algos/sft_pi0.py --env maniskill --task PushCube-v1 --num-demos 10
    python algos/sft_pi0.py --env libero --task libero_object/0 --num-demos 10

Demos come from `common.maniskill_demos` (motion planning) or `common.libero_expert` (scripted expert); missing demos
are generated first, from seeds / init states disjoint from the eval ones (the script refuses to evaluate on a demo's
initial state). The model is `common.pi0.Pi0Model` (openpi conventions), trained with the per-element flow-matching
MSE on normalised, zero-padded action chunks (openpi: chunks running past an episode's end repeat its last action).
Eval runs the deterministic Euler sampler and executes `action_chunk` actions per policy call. The checkpoint
(`runs/<run>/checkpoint`, our format with norm stats) is what `algos/flow_sde_pi0.py` / `flow_noise_pi0.py` start
from; `--resume` continues an interrupted run from it (model, optimiser, step, RNG).
"""

import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.demos import check_demos, demo_chunks, ensure_demos, load_demos
from common.envs import (check_task, default_eval_envs, eval_initial_states, make_task_env, run_eval_episodes,
                         task_names)
from common.fsutil import atomic_write
from common.pi0 import Pi0Config, Pi0Model
from common.pi0_io import (NormStats, Pi0Processor, check_prompts, existing_checkpoint, instruction_tokens, load_pi0,
                           make_tokenizer, openpi_delta_action_dims, read_torch_state, save_pi0)


@dataclass
class Args:
    exp_name: str = "sft_pi0"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (data order, noise, eval)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use CUDA when available"""
    torch_threads: int = 1
    """CPU threads for torch (0: torch's default). 1 suits tiny models: with 2 threads on a busy 2-core machine,
    OpenMP barriers made each step ~50x slower"""
    track: bool = False
    """track the run with Weights and Biases (offline unless WANDB_MODE says otherwise)"""
    wandb_project_name: str = "rlinf-hackable"
    """the W&B project"""
    run_dir: str = "runs"
    """where runs (TensorBoard logs, checkpoint, videos) go"""
    resume: bool = False
    """continue the run named by --exp-name/--seed/--task from its checkpoint"""
    capture_video: bool = True
    """write an mp4 of the first eval episode (image observations only)"""

    # Task and data
    env: str = "maniskill"
    """maniskill or libero"""
    task: str = "PushCube-v1"
    """ManiSkill env id, or "<suite>/<task ids>" for LIBERO (libero_object/0; a subset trained together,
    libero_object/0-3 or /0,2,5; a whole suite, libero_object)"""
    demos: str = ""
    """demo dataset directory (default data/demos/<task>); generated when missing"""
    num_demos: int = 10
    """demonstrations used (per task): the few-shot knob"""
    obs_mode: str = "state"
    """ManiSkill observation mode: state or rgb (LIBERO always uses images)"""
    control_mode: str = "pd_joint_pos"
    """ManiSkill controller the demos were recorded in (motion-planning demos: pd_joint_pos)"""
    image_size: int = 64
    """camera resolution of demos and eval env"""
    max_episode_steps: int = 0
    """episode limit at eval (0: 100 for ManiSkill, the suite's limit for LIBERO)"""

    # Model
    model: str = "tiny"
    """model preset: tiny, pi0 or pi05 (real sizes need a GPU)"""
    variant: str = "pi0"
    """pi0 (state token) or pi05 (adaptive-norm time conditioning, no state unless --discrete-state)"""
    discrete_state: bool = False
    """π0.5 only: the state as 256 bins in the prompt"""
    init_from: str = ""
    """start from a checkpoint (ours or openpi's PyTorch format) instead of random weights"""
    tokenizer: str = "bytes"
    """bytes, or the path of PaliGemma's SentencePiece model (needed for real weights)"""
    horizon: int = 8
    """action chunk length the model predicts"""
    depth: int = 4
    """tiny preset only: layers of the VLM and the expert (0: the preset's 2). 4 layers and a 128-wide expert took
    PushCube from 13% to 36% with 20 demos (sft_fewshot benchmark notes)"""
    expert_width: int = 128
    """tiny preset only: action-expert width, its MLP is 2x (0: the preset's 64)"""
    expert: str = "gemma"
    """tiny preset only: gemma (π0's action expert) or mlp (a 3-layer MLP velocity net, πRL's CPU-calibration flow
    policy; --expert-width 256 matches it)"""
    action_dim: int = 0
    """padded action/state width (0: max(32, state dim), as openpi pads to 32)"""
    noise_on_padding: bool = False
    """also put flow noise on the zero-padded action dims, as openpi trains. Off (noise_dims = the env's action width)
    the padding stays exactly 0 on the whole path instead of being noise inputs the model must learn to ignore"""
    normalize_state: bool = False
    """normalise the state with demo statistics (openpi does). Off stores identity stats: with a few demos the
    per-dim statistics over-weight dims that barely vary in them (PushCube, 10 demos, same MLP: 5% vs 28% raw)"""
    train_expert_only: bool = False
    """freeze SigLIP + the Gemma VLM (πRL's train_expert_only)"""

    # Training
    total_steps: int = 3000
    """gradient steps"""
    batch_size: int = 64
    """samples (observation, action chunk) per step"""
    learning_rate: float = 3e-4
    """peak AdamW learning rate (cosine decay to 10% after warmup)"""
    warmup_steps: int = 100
    """linear warmup steps"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    checkpoint_every: int = 500
    """steps between checkpoints (resume points)"""
    log_every: int = 50
    """steps between loss logs"""

    # Evaluation
    eval_every: int = 1000
    """steps between evaluations (and at the end)"""
    eval_at_end: bool = True
    """evaluate the final weights (--no-eval-at-end: a caller that evaluates the start with its own sampler, as
    benchmarks/pirl.py does, skips this one)"""
    eval_episodes: int = 0
    """episodes per evaluation, initial states 0..N-1 (0: 100 for ManiSkill; 25 per LIBERO task, whose init states
    25..49 are kept for demos: a subset's N walk init states 0..N/T-1 of each of its T tasks)"""
    num_eval_envs: int = 0
    """parallel eval envs (0: 2, or a LIBERO subset's task count when it has 3-4 tasks: no env rebuild per episode)"""
    action_chunk: int = 8
    """actions executed per policy call (<= horizon)"""
    num_denoise_steps: int = 5
    """Euler steps of the sampler"""


def make_eval_env(args: Args, num_envs: int, num_episodes: int):
    return make_task_env(args.env, args.task, num_envs, obs_mode=args.obs_mode, control_mode=args.control_mode,
                         image_size=args.image_size, max_episode_steps=args.max_episode_steps or None,
                         eval_mode=True, num_eval_episodes=num_episodes, seed=args.seed)


def evaluate(model, processor, args: Args, device, video_path: Path | None = None) -> dict:
    """Deterministic-sampler success over eval episodes 0..N-1 (fixed noise seed)."""
    env = make_eval_env(args, min(args.num_eval_envs, args.eval_episodes), args.eval_episodes)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def act(obs):
        with torch.no_grad():
            batch = processor.batch(obs["state"], obs.get("images"), obs["task_description"], device)
            prefix = model.encode_prefix(batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"])
            noise = model.initial_noise(len(obs["state"]), device, gen)
            sample = model.sample(prefix, batch["state"], noise, args.num_denoise_steps)
        return processor.actions_to_env(sample.actions[:, : args.action_chunk], obs["state"])

    model.eval()
    try:
        return run_eval_episodes(env, act, video_path)
    finally:
        model.train()


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.env not in ("maniskill", "libero"):
        raise SystemExit(f"--env must be maniskill or libero, got {args.env!r}")
    try:  # the task now, not after the demos and the model are made
        check_task(args.env, args.task, exists=True)
    except ValueError as e:
        raise SystemExit(f"--task {args.task}: {e}")
    if args.env == "maniskill" and args.obs_mode not in ("state", "rgb"):  # a typo must not train a state policy
        raise SystemExit(f"--obs-mode must be state or rgb, got {args.obs_mode!r}")
    if args.demos and Path(args.demos).exists() and not Path(args.demos).is_dir():
        raise SystemExit(f"--demos {args.demos} is a file, not a demo directory")
    if args.env == "libero":
        from common.libero_env import DEMO_INIT_STATES, eval_episode_count

        try:
            args.eval_episodes = eval_episode_count(args.eval_episodes, args.task)
        except ValueError as e:
            raise SystemExit(str(e))
        if args.num_demos > len(DEMO_INIT_STATES):
            raise SystemExit(f"LIBERO has 50 init states per task and demos come from {DEMO_INIT_STATES.start}.."
                             f"{DEMO_INIT_STATES.stop - 1} (eval uses the others): --num-demos <= "
                             f"{len(DEMO_INIT_STATES)} (per task), got {args.num_demos}")
    args.eval_episodes = args.eval_episodes or 100
    args.num_eval_envs = args.num_eval_envs or default_eval_envs(args.env, args.task)
    positive = ("num_demos", "total_steps", "batch_size", "warmup_steps", "checkpoint_every", "log_every",
                "eval_every", "num_eval_envs", "num_denoise_steps", "horizon")
    bad = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in positive if getattr(args, k) < 1]
    if bad:
        raise SystemExit(f"these must be >= 1: {', '.join(bad)}")
    if args.action_chunk < 1 or not (args.init_from or args.resume) and args.action_chunk > args.horizon:
        raise SystemExit(f"--action-chunk must be in [1, --horizon {args.horizon}], got {args.action_chunk}")
    if args.model not in ("tiny", "pi0", "pi05"):
        raise SystemExit(f"--model must be tiny, pi0 or pi05, got {args.model!r}")
    if args.expert not in ("gemma", "mlp") or (args.expert == "mlp" and (args.model, args.variant) != ("tiny", "pi0")):
        raise SystemExit(f"--expert must be gemma or mlp (mlp with --model tiny --variant pi0 only), got {args.expert!r}")
    if args.discrete_state and not args.normalize_state:
        raise SystemExit("--discrete-state bins the state over [-1, 1]: it needs --normalize-state")
    if args.variant not in ("pi0", "pi05"):
        raise SystemExit(f"--variant must be pi0 or pi05, got {args.variant!r}")
    if args.discrete_state and (args.model, args.variant) not in (("tiny", "pi05"), ("pi05", "pi0"), ("pi05", "pi05")):
        raise SystemExit("--discrete-state is π0.5's state input: use it with --model pi05 or --variant pi05")
    if args.model != "tiny" and args.tokenizer == "bytes":  # before a 3B model is built for nothing
        raise SystemExit(f"--model {args.model} needs PaliGemma's tokenizer: pass --tokenizer <path or hub id>")
    run_name = f"{args.task.replace('/', '_')}__{args.exp_name}__{args.seed}"
    run_dir = Path(args.run_dir) / run_name
    ckpt_dir = run_dir / "checkpoint"
    if run_dir.exists() and not args.resume and any(
            (run_dir / d).exists() for d in ("checkpoint", "checkpoint.old", "final", "final.old")):
        raise SystemExit(f"{run_dir} exists; pass --resume to continue it or choose another --exp-name")
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

    # Demonstrations -> dataset
    demo_dir = ensure_demos(args.env, args.task, args.num_demos, args.demos or None, obs_mode=args.obs_mode,
                            image_size=args.image_size)
    tasks = task_names(args.env, args.task)
    episodes = load_demos(demo_dir, per_task=args.num_demos, tasks=tasks)
    if len(episodes) < args.num_demos * len(tasks):
        raise SystemExit(f"{demo_dir} holds {len(episodes)} successful demos of {args.task}, --num-demos asks for "
                         f"{args.num_demos} of each of its {len(tasks)} tasks")
    try:
        camera_keys = check_demos(episodes, demo_dir, env=args.env, obs_mode=args.obs_mode,
                                  control_mode=args.control_mode, image_size=args.image_size,
                                  eval_states=eval_initial_states(args.env, args.task, args.eval_episodes))
    except ValueError as e:
        raise SystemExit(str(e))
    state_dim, env_action_dim = episodes[0]["obs"]["state"].shape[1], episodes[0]["actions"].shape[1]
    all_states = np.concatenate([e["obs"]["state"][:-1] for e in episodes])
    all_actions = np.concatenate([e["actions"] for e in episodes])
    norm_stats = NormStats.from_data({"state": all_states, "actions": all_actions})
    if not args.normalize_state:  # identity stats (z-score and quantile both map x -> x)
        norm_stats.stats["state"] = {"mean": np.zeros(state_dim), "std": np.ones(state_dim) - 1e-6,
                                     "q01": -np.ones(state_dim), "q99": np.ones(state_dim) - 1e-6}
    print(f"{len(episodes)} demos, {len(all_states)} samples, state {state_dim}-D, actions {env_action_dim}-D, "
          f"cameras {camera_keys or 'none'}")

    # Model
    tokenizer = make_tokenizer(args.tokenizer)
    # π0.5 with the state in the prompt: the prompt must hold every state bin (a cut prompt hides the state)
    longest = max((ep["meta"]["task_description"] for ep in episodes), key=len).strip().replace("_", " ")
    state_prompt_tokens = len(tokenizer.encode(f"Task: {longest}, State: {' '.join(['255'] * state_dim)};\nAction: ",
                                               add_bos=True))
    # several tasks (a LIBERO subset): each instruction whole, or a cut could give two tasks one prompt (the tiny
    # config's 32 tokens leave libero_spatial's ten instructions five distinct prompts)
    instructions = sorted({ep["meta"]["task_description"] for ep in episodes})
    prompt_tokens = instruction_tokens(tokenizer, instructions)
    start_step, trainer_state = 0, None
    results = []
    resume_dir = existing_checkpoint(ckpt_dir)  # or checkpoint.old, where a kill came mid-save
    if args.resume and not resume_dir:  # a typo in --exp-name must not pass for a resume
        print(f"--resume: no checkpoint in {run_dir}, starting a new run", flush=True)
    if args.resume and resume_dir:
        model, norm_stats, meta = load_pi0(resume_dir, device)
        try:
            trainer_state = read_torch_state(resume_dir / "trainer.pt")
        except ValueError as e:
            raise SystemExit(f"--resume: {e}") from None
        start_step, results = meta["extra"]["step"], meta["extra"].get("results", [])
        print(f"resuming {run_name} at step {start_step}")
    elif args.init_from:
        model, loaded_stats, meta = load_pi0(args.init_from, device)
        if meta["format"] == "openpi":  # its config.json does not say which action dims are deltas (as the RL start)
            model.cfg = replace(model.cfg, delta_action_dims=openpi_delta_action_dims(model.cfg, args.env))
            if model.cfg.delta_action_dims and loaded_stats is None:
                raise SystemExit(f"--init-from {args.init_from}: an openpi π0 LIBERO checkpoint predicts delta actions, "
                                 f"normalised with its own statistics, and has no assets/**/norm_stats.json here")
        norm_stats = loaded_stats or norm_stats
    else:
        width = args.action_dim or max(32, state_dim, env_action_dim)
        preset = {"tiny": Pi0Config.tiny, "pi0": Pi0Config.pi0, "pi05": Pi0Config.pi05}[args.model]
        overrides = dict(action_dim=width, horizon=args.horizon, discrete_state_input=args.discrete_state,
                         noise_dims=0 if args.noise_on_padding else env_action_dim)
        if args.discrete_state:
            overrides.update(max_tokens=max(preset().max_tokens, state_prompt_tokens))
        elif len(instructions) > 1:
            overrides.update(max_tokens=max(preset().max_tokens, prompt_tokens))
        if args.model == "tiny":
            overrides.update(num_cameras=len(camera_keys), variant=args.variant, image_size=args.image_size)
            if args.depth:
                overrides.update(depth=args.depth)
            if args.expert_width:
                overrides.update(expert_width=args.expert_width, expert_mlp=2 * args.expert_width)
            overrides.update(expert=args.expert)
        model = Pi0Model(preset(**overrides)).to(device)
    cfg = model.cfg
    if args.resume and resume_dir or args.init_from:  # the loaded model's shape rules: say which flags lose
        given = {"horizon": args.horizon, "variant": args.variant, "discrete_state_input": args.discrete_state,
                 "expert": args.expert}
        ignored = [f"{k}={v} (the model has {getattr(cfg, k)})" for k, v in given.items()
                   if v != getattr(cfg, k) and getattr(Args, {"discrete_state_input": "discrete_state"}.get(k, k)) != v]
        if ignored:
            print(f"the loaded model's shape is kept; ignoring {', '.join(ignored)}", flush=True)
    try:
        check_prompts(cfg, tokenizer, instructions)
    except ValueError as e:
        raise SystemExit(f"{e}: start a new model for this task set")
    if cfg.discrete_state_input and state_prompt_tokens > cfg.max_tokens:
        raise SystemExit(f"the state prompt needs {state_prompt_tokens} tokens, the model holds {cfg.max_tokens}: the "
                         f"state bins would be cut off (start a new model, or pass a smaller state)")
    if not 1 <= args.action_chunk <= cfg.horizon:
        raise SystemExit(f"--action-chunk must be in [1, the model's horizon {cfg.horizon}], got {args.action_chunk}")
    states, chunks, images, texts = demo_chunks(episodes, cfg.horizon, camera_keys)
    processor = Pi0Processor(cfg, tokenizer, norm_stats, env_action_dim, camera_keys)
    if args.train_expert_only:
        model.freeze_vlm()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.total_steps))))))
    data_rng = np.random.default_rng(args.seed)
    if trainer_state is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        schedule.load_state_dict(trainer_state["schedule"])
        data_rng.bit_generator.state = trainer_state["data_rng"]
        torch.set_rng_state(trainer_state["torch_rng"])
        if trainer_state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer_state["cuda_rng"])
    print(f"model {cfg.variant} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"({sum(p.numel() for p in params) / 1e6:.2f}M trained), device {device}")

    def save(step: int, directory: Path) -> None:
        state = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "data_rng": data_rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, state)
        extra = {"step": step, "args": asdict(args), "camera_keys": list(camera_keys), "results": results}
        save_pi0(directory, model, norm_stats, tokenizer.name, extra=extra, extra_files={"trainer.pt": state.getvalue()})

    # Training loop
    model.train()
    start_time, loss_sum, loss_n = time.time(), 0.0, 0
    bar = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="sft", mininterval=2.0)
    for step in bar:
        idx = torch.from_numpy(data_rng.integers(0, len(states), args.batch_size))
        batch = processor.batch(states[idx], {k: v[idx] for k, v in images.items()}, [texts[i] for i in idx], device)
        target = processor.actions_to_model(chunks[idx], states[idx]).to(device)
        loss = model.flow_loss(batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"],
                               batch["state"], target).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        schedule.step()
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        done = step + 1
        if done % args.log_every == 0 or done == args.total_steps:
            writer.add_scalar("losses/flow_loss", loss_sum / loss_n, done)
            writer.add_scalar("losses/grad_norm", float(grad_norm), done)
            writer.add_scalar("charts/learning_rate", schedule.get_last_lr()[0], done)
            writer.add_scalar("charts/SPS", int((done - start_step) * args.batch_size / (time.time() - start_time)),
                              done)
            bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}")
            loss_sum, loss_n = 0.0, 0
        at_end = done == args.total_steps
        if (done % args.eval_every == 0 and not at_end) or (at_end and args.eval_at_end):
            t0 = time.time()
            video = run_dir / f"eval_{done}.mp4" if args.capture_video else None
            stats = evaluate(model, processor, args, device, video)
            for k in ("success_rate", "episodic_return", "episode_length"):
                writer.add_scalar(f"eval/{k}", stats[k], done)
            writer.add_scalar("time/eval", time.time() - t0, done)
            results.append({"step": done, **stats})
            tqdm.write(f"step {done}: eval success {stats['success_rate']:.2f} over {stats['episodes']} episodes "
                       f"({time.time() - t0:.0f} s)")
        if done % args.checkpoint_every == 0 and done < args.total_steps:  # after the eval: a resume never skips one
            save(done, ckpt_dir)
    save(args.total_steps, ckpt_dir)
    final = run_dir / "final"
    save(args.total_steps, final)
    atomic_write(run_dir / "eval.json", json.dumps(results, indent=1))
    print(f"checkpoint for RL: {final}")
    writer.close()
