"""π0 denoising cost with and without the prefix KV cache (`common.pi0`), tiny config, side by side in one run.

"With cache": `encode_prefix` once per policy call, then K expert-only steps against the cached prefix K/V (what
openpi and our samplers do). "Without cache": every denoising step runs the full joint forward over [prefix; suffix]
(VLM + vision + expert). Both produce the same velocities (checked here, and pinned in tests/test_pi0.py). Reported:
ms per denoising step, ms per policy call of K steps, and the ratios. Settings: the LIBERO SFT model (two 64 px
cameras, 32 prompt tokens) and the state-only ManiSkill model (no cameras), π0 and π0.5.

    python benchmarks/pi0_denoise.py        # writes benchmarks/results/pi0_denoise.{md,json,png}
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import tyro

from benchmarks.report import RESULTS_DIR, pyplot, write_results
from common.pi0 import Pi0Config, Pi0Model


@dataclass
class Args:
    batch_size: int = 8
    """observations per policy call"""
    num_steps: int = 10
    """denoising steps per policy call (openpi's default)"""
    repeats: int = 20
    """timed policy calls per setting (after 3 warm-up calls)"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    seed: int = 0
    """seed of weights and inputs"""
    out_dir: Path = RESULTS_DIR
    """where pi0_denoise.{md,json,png} go"""


def time_calls(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(args: Args) -> None:
    small = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("batch_size", "num_steps", "repeats")
             if getattr(args, k) < 1]
    if small:
        raise SystemExit(f"{', '.join(small)}: must be >= 1")
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [("LIBERO model: 2 cameras 64 px", dict(num_cameras=2, image_size=64)),
                ("ManiSkill state model: no cameras", dict(num_cameras=0, action_dim=35))]
    rows = []
    for label, overrides in settings:
        for variant in ("pi0", "pi05"):
            torch.manual_seed(args.seed)
            cfg = Pi0Config.tiny(variant=variant, **overrides)
            model = Pi0Model(cfg).eval()
            B, K = args.batch_size, args.num_steps
            images = torch.randint(0, 256, (B, cfg.num_cameras, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
            img_masks = torch.ones(B, cfg.num_cameras, dtype=torch.bool)
            tokens = torch.randint(4, cfg.vocab, (B, cfg.max_tokens))
            tok_masks = torch.arange(cfg.max_tokens)[None].expand(B, -1) < 20
            state, noise = torch.randn(B, cfg.action_dim), torch.randn(B, cfg.horizon, cfg.action_dim)
            ts = Pi0Model.timesteps(K)

            def cached():
                prefix = model.encode_prefix(images, img_masks, tokens, tok_masks)
                x = noise
                for i in range(K):
                    x = x - (ts[i] - ts[i + 1]) * model.velocity(prefix, state, x, ts[i])[0]
                return x

            def uncached():
                x = noise
                for i in range(K):
                    t = ts[i].expand(B)
                    x = x - (ts[i] - ts[i + 1]) * model.forward_joint(images, img_masks, tokens, tok_masks, state, x, t)
                return x

            with torch.no_grad():
                err = (cached() - uncached()).abs().max().item()
                prefix = model.encode_prefix(images, img_masks, tokens, tok_masks)
                step_cached = time_calls(lambda: model.velocity(prefix, state, noise, ts[1]), args.repeats * 5)
                step_full = time_calls(lambda: model.forward_joint(images, img_masks, tokens, tok_masks, state, noise,
                                                                   ts[1].expand(B)), args.repeats * 5)
                call_cached = time_calls(cached, args.repeats)
                call_full = time_calls(uncached, args.repeats)
            rows.append({"setting": label, "variant": variant, "prefix_tokens": cfg.prefix_len,
                         "step_ms_cached": step_cached * 1e3, "step_ms_full": step_full * 1e3,
                         "step_speedup": step_full / step_cached, "call_ms_cached": call_cached * 1e3,
                         "call_ms_full": call_full * 1e3, "call_speedup": call_full / call_cached, "max_abs_diff": err})
            print(rows[-1])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [f"{r['setting'].split(':')[0]}\n{r['variant']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["call_ms_full"] for r in rows], 0.4, label="no cache (joint forward per step)")
    ax.bar([x + 0.2 for x in xs], [r["call_ms_cached"] for r in rows], 0.4, label="prefix cache")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel(f"ms per policy call ({args.num_steps} steps, batch {args.batch_size})")
    ax.legend()
    notes = (f"Batch {args.batch_size}, {args.num_steps} Euler steps per call, tiny config (common.pi0.Pi0Config.tiny), "
             f"fp32 on CPU, torch threads {torch.get_num_threads()}. `max_abs_diff` is the largest difference between "
             "the actions of the two samplers (same math; float rounding only). A policy call with the cache costs "
             "one prefix pass + K expert-only steps; without it, K full passes.")
    path = write_results("pi0_denoise", "π0 denoising: prefix KV cache vs full joint forward (tiny config)",
                         ["setting", "variant", "prefix_tokens", "step_ms_cached", "step_ms_full", "step_speedup",
                          "call_ms_cached", "call_ms_full", "call_speedup", "max_abs_diff"], rows,
                         seeds=[args.seed], notes=notes, out_dir=args.out_dir, figure=fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
