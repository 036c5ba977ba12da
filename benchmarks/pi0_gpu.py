"""π0 / π0.5 at real size on a GPU: one πRL policy call and one PPO minibatch step, random weights.

No checkpoint can be downloaded here, so the weights are random; the shapes, the memory and the time are those of the
real models (`Pi0Config.pi0()` / `.pi05()`: SigLIP So400m + Gemma 2B + Gemma 300M expert, openpi's mixed bf16). Per
variant it measures:
- the prefix pass (3 cameras at 224 px + the preset's prompt length) and a policy call of K denoising steps with the prefix K/V
  cache, against K full joint forwards over [prefix; suffix] (the cache's speedup at real size);
- Flow-SDE (algos/flow_sde_pi0.py): a rollout call with one stochastic step, then the training recompute of the same
  transitions (per-sample t, gradients on): the PPO ratio must be 1 at the first epoch; in bf16 this measures how far
  it is from 1; then backward + AdamW on the action expert (VLM frozen), ms and peak memory;
- Flow-Noise (algos/flow_noise_pi0.py): the same with the noise head and all K steps stochastic.

    python benchmarks/pi0_gpu.py                     # on a CUDA machine; writes benchmarks/results/pi0_gpu.{md,json}
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import tyro

from algos import flow_noise_pi0 as fnoise
from algos import flow_sde_pi0 as fsde
from benchmarks.report import RESULTS_DIR, write_results
from common.pi0 import Pi0Config, Pi0Model


@dataclass
class Args:
    variants: tuple[str, ...] = ("pi0", "pi05")
    """model presets to measure"""
    batch_size: int = 8
    """observations per policy call and per PPO minibatch"""
    num_steps: int = 4
    """K, denoising steps per policy call (πRL's LIBERO / ManiSkill configs use 4)"""
    num_cameras: int = 3
    """camera images per observation (π0's base + two wrists)"""
    chunk: int = 5
    """executed actions per call (πRL's action chunk)"""
    env_action_dim: int = 7
    """executed action dims (LIBERO: 7)"""
    repeats: int = 5
    """timed repeats per measurement (after 2 warm-ups)"""
    precision: str = "mixed_bf16"
    """mixed_bf16 (openpi's) or fp32"""
    seed: int = 0
    """seed of weights and inputs"""
    device: str = "cuda"
    """cuda, or cpu with --variants tiny (a smoke run of this script)"""
    out_dir: Path = RESULTS_DIR
    """where pi0_gpu.{md,json} go"""


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device, reset: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def timed(fn, repeats: int, device) -> float:
    """Mean seconds per call, CUDA-synchronised, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def measure(variant: str, args: Args, device) -> dict:
    torch.manual_seed(args.seed)
    if variant not in ("pi0", "pi05", "tiny"):
        raise SystemExit(f"unknown variant {variant!r}: pi0, pi05 or tiny")
    cfg = getattr(Pi0Config, variant)(num_cameras=args.num_cameras)
    with torch.device(device):
        model = Pi0Model(cfg)
    if args.precision == "mixed_bf16":
        model.to_mixed_bf16()
    model.freeze_vlm()
    B, K, chunk, A = args.batch_size, args.num_steps, args.chunk, args.env_action_dim
    g = torch.Generator(device=device).manual_seed(args.seed)
    images = torch.randint(0, 256, (B, cfg.num_cameras, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                           device=device, generator=g)
    img_masks = torch.ones(B, cfg.num_cameras, dtype=torch.bool, device=device)
    tokens = torch.randint(0, cfg.vocab, (B, cfg.max_tokens), device=device, generator=g)
    tok_masks = torch.ones_like(tokens, dtype=torch.bool)
    state = torch.randn(B, cfg.action_dim, device=device, generator=g)
    noise = torch.randn(B, cfg.horizon, cfg.action_dim, device=device, generator=g)
    row = {"variant": variant, "params_B": sum(p.numel() for p in model.parameters()) / 1e9,
           "trained_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}

    # policy call: cached prefix vs K full joint forwards
    with torch.no_grad():
        prefix = model.encode_prefix(images, img_masks, tokens, tok_masks)
        row["prefix_tokens"] = prefix.pad_mask.shape[1]
        row["prefix_ms"] = 1e3 * timed(lambda: model.encode_prefix(images, img_masks, tokens, tok_masks),
                                       args.repeats, device)
        ode = fsde.make_step_fn(set(), fsde.sde_sigmas(K, 0.5))

        def cached_call():
            p = model.encode_prefix(images, img_masks, tokens, tok_masks)
            return model.sample(p, state, noise, K, ode).actions

        ts = Pi0Model.timesteps(K, device)

        def full_call():
            x = noise
            for i in range(K):
                v = model.forward_joint(images, img_masks, tokens, tok_masks, state, x, ts[i].expand(B))
                x = x - (ts[i] - ts[i + 1]) * v
            return x

        row["call_ms_cached"] = 1e3 * timed(cached_call, args.repeats, device)
        row["call_ms_full"] = 1e3 * timed(full_call, args.repeats, device)
        row["cache_speedup"] = row["call_ms_full"] / row["call_ms_cached"]
        row["cache_max_abs_diff"] = float((cached_call().float() - full_call().float()).abs().max())

    # Flow-SDE: rollout call, then the training recompute of the same transitions
    sigmas = fsde.sde_sigmas(K, 0.5)
    rng = random.Random(args.seed)
    with torch.no_grad():
        ks = []
        chains, logps = [], []
        for _ in range(2):  # two calls -> a minibatch that mixes stochastic steps, as PPO's does
            stochastic = fsde.draw_stochastic_steps(rng, K, False, False)
            out = model.sample(prefix, state, noise, K, fsde.make_step_fn(stochastic, sigmas))
            chains.append(out.chain)
            logps.append(fsde.chain_log_prob(out, stochastic, K, False)[0][:, :chunk, :A].float())
            ks.append(torch.full((B,), next(iter(stochastic)), device=device))
    chain, k, logp_old = torch.cat(chains), torch.cat(ks), torch.cat(logps)
    big = lambda x: torch.cat([x, x])  # noqa: E731  the prefix of the two calls' observations
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)

    def sde_update():
        p = model.encode_prefix(big(images), big(img_masks), big(tokens), big(tok_masks))
        logp = fsde.recompute_log_prob(model, p, big(state), chain, k, sigmas, False)[0]
        logratio = (logp[:, :chunk, :A].float() - logp_old).sum((1, 2))
        loss = fsde.actor_loss(logratio, torch.randn_like(logratio), 0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return logratio.detach()

    with torch.no_grad():
        p = model.encode_prefix(big(images), big(img_masks), big(tokens), big(tok_masks))
        logp = fsde.recompute_log_prob(model, p, big(state), chain, k, sigmas, False)[0]
        row["sde_first_logratio_max"] = float((logp[:, :chunk, :A].float() - logp_old).sum((1, 2)).abs().max())
    peak_gib(device, reset=True)
    row["sde_update_ms"] = 1e3 * timed(sde_update, args.repeats, device)
    row["sde_update_peak_GiB"] = peak_gib(device)

    # Flow-Noise: every step stochastic with the learned std
    head = fnoise.NoiseHead(cfg.expert_width, cfg.action_dim, 0.08, 0.16).to(device)
    with torch.no_grad():
        out = model.sample(prefix, state, noise, K, fnoise.make_step_fn(head, True))
        logp_old = fnoise.chain_log_prob(out.chain, out.means, out.stds)[0][:, :chunk, :A].float()
        means, stds, _ = fnoise.recompute_chain(model, head, prefix, state, out.chain)
        logp = fnoise.chain_log_prob(out.chain, means, stds)[0][:, :chunk, :A].float()
        row["noise_first_logratio_max"] = float((logp - logp_old).sum((1, 2)).abs().max())
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=1e-6)

    def noise_update():
        p = model.encode_prefix(images, img_masks, tokens, tok_masks)
        means, stds, _ = fnoise.recompute_chain(model, head, p, state, out.chain)
        logratio = (fnoise.chain_log_prob(out.chain, means, stds)[0][:, :chunk, :A].float() - logp_old).sum((1, 2))
        loss = fnoise.actor_loss(logratio, torch.randn_like(logratio), 0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    peak_gib(device, reset=True)
    row["noise_update_ms"] = 1e3 * timed(noise_update, args.repeats, device)
    row["noise_update_peak_GiB"] = peak_gib(device)
    del model, opt, head
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(args: Args) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/pi0_gpu.py needs a CUDA GPU (the real-size models do not fit a CPU budget); "
                         "`--device cpu --variants tiny` smoke-tests it")
    if args.precision not in ("mixed_bf16", "fp32"):
        raise SystemExit(f"--precision must be mixed_bf16 or fp32, got {args.precision!r}")
    device = torch.device(args.device)
    rows = []
    for variant in args.variants:
        rows.append(measure(variant, args, device))
        print(rows[-1], flush=True)
    columns = ["variant", "params_B", "trained_M", "prefix_tokens", "prefix_ms", "call_ms_cached", "call_ms_full",
               "cache_speedup", "cache_max_abs_diff", "sde_first_logratio_max", "sde_update_ms",
               "sde_update_peak_GiB", "noise_first_logratio_max", "noise_update_ms", "noise_update_peak_GiB"]
    notes = (f"Random weights, {args.precision}, batch {args.batch_size} ({2 * args.batch_size} for the Flow-SDE "
             f"update: two rollout calls), {args.num_cameras} cameras at 224 px, the preset's prompt length (π0 48, "
             "π0.5 200 tokens), "
             f"K = {args.num_steps}, chunk {args.chunk} x {args.env_action_dim} executed dims. `*_first_logratio_max`: "
             "the largest |log ratio| (summed over the executed chunk) between the rollout's log-prob and the "
             "training recompute of the same transitions before any update (exactly 0 in fp32 on CPU, see "
             "tests/test_flow_sde_pi0.py). Update = prefix pass + recompute + backward + AdamW step on the action "
             "expert (VLM and SigLIP frozen).")
    write_results("pi0_gpu", "π0 / π0.5 at real size on one GPU: policy call and PPO step", columns, rows,
                  seeds=[args.seed], notes=notes, out_dir=args.out_dir)


if __name__ == "__main__":
    main(tyro.cli(Args))
