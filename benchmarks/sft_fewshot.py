"""Few-shot SFT of the tiny π0 (`algos/sft_pi0.py`): eval success after N demonstrations, the "few-shot SFT" row of
the πRL tables at CPU scale.

Rows: ManiSkill PushCube-v1 (state, pd_joint_pos, motion-planning demos, 100-step episodes) for several N, and one
LIBERO-Object task (two 64 px cameras, scripted-expert demos from init states disjoint from the eval ones). Each row is
a real run of the SFT script (subprocess) per seed; success is the deterministic sampler's success over the eval
episodes (initial states 0..E-1, never a demo's). πRL starts RL from checkpoints in the 20-60% band; the table marks
which rows land there.

    python benchmarks/sft_fewshot.py       # writes benchmarks/results/sft_fewshot.{md,json,png}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import tyro

from benchmarks.report import RESULTS_DIR, pyplot, write_results


@dataclass
class Args:
    pushcube_demos: list[int] = field(default_factory=lambda: [3, 5])
    """numbers of PushCube-v1 demos to try (with noise off the padding, 2 demos gave 0.11 and 10 gave 0.6-0.7)"""
    pushcube_steps: int = 1500
    """SFT steps per PushCube run"""
    pushcube_eval_episodes: int = 100
    """eval episodes per PushCube run"""
    libero_task: str = "libero_object/0"
    """LIBERO task (suite/task ids: one task, or a subset such as libero_object/0-3); empty to skip"""
    libero_demos: list[int] = field(default_factory=lambda: [20])
    """numbers of LIBERO demos to try (from init states 25..49)"""
    libero_steps: int = 2000
    """SFT steps per LIBERO run"""
    libero_eval_episodes: int = 25
    """eval episodes per LIBERO run (reset ids 0..E-1 of the eval walk: init states 0..E/T-1 of each of T tasks)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    """SFT seeds per PushCube setting"""
    libero_seeds: list[int] = field(default_factory=lambda: [1])
    """SFT seeds per LIBERO setting (image SFT + rendering eval cost ~25 min per seed on 2 CPU cores)"""
    run_dir: Path = ROOT / "runs" / "bench_sft"
    """where the SFT runs go"""
    demo_dir: Path = ROOT / "data" / "demos"
    """demo datasets (generated when missing)"""
    out_dir: Path = RESULTS_DIR
    """where sft_fewshot.{md,json,png} go"""


def run_sft(args: Args, env: str, task: str, demos: int, steps: int, episodes: int, seed: int, extra: list[str]):
    name = f"{env}_{task.replace('/', '_')}_n{demos}"
    run = args.run_dir / f"{task.replace('/', '_')}__{name}__{seed}"
    if not (run / "eval.json").exists():
        cmd = [sys.executable, str(ROOT / "algos" / "sft_pi0.py"), "--env", env, "--task", task, "--num-demos",
               str(demos), "--total-steps", str(steps), "--eval-every", str(steps), "--eval-episodes", str(episodes),
               "--seed", str(seed), "--exp-name", name, "--run-dir", str(args.run_dir), *extra]
        print("+", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        print(f"  {time.time() - t0:.0f} s", flush=True)
    return json.loads((run / "eval.json").read_text())[-1]


def main(args: Args) -> None:
    bad = [flag for flag, values in (("--seeds", args.seeds), ("--pushcube-demos", args.pushcube_demos),
                                       ("--libero-seeds", args.libero_seeds if args.libero_task else [1]),
                                       ("--libero-demos", args.libero_demos if args.libero_task else [1]))
             if not values or min(values) < (0 if "seeds" in flag else 1)]
    if bad:
        raise SystemExit(f"{', '.join(bad)}: give at least one value (demo counts >= 1, seeds >= 0)")
    rows = []
    settings = [("maniskill", "PushCube-v1", n, args.pushcube_steps, args.pushcube_eval_episodes,
                 ["--demos", str(args.demo_dir / "PushCube-v1")]) for n in args.pushcube_demos]
    if args.libero_task:
        settings += [("libero", args.libero_task, n, args.libero_steps, args.libero_eval_episodes,
                      ["--demos", str(args.demo_dir / f"{args.libero_task.replace('/', '_')}_n{n}")])
                     for n in args.libero_demos]
    for env, task, n, steps, episodes, extra in settings:
        seeds = args.seeds if env == "maniskill" else args.libero_seeds
        per_seed = [run_sft(args, env, task, n, steps, episodes, seed, extra) for seed in seeds]
        rates = [r["success_rate"] for r in per_seed]
        mean = float(np.mean(rates))
        rows.append({"task": task, "obs": "state" if env == "maniskill" else "2 cameras 64 px", "demos": n,
                     "sft_steps": steps, "eval_episodes_per_seed": episodes,
                     "success_per_seed": " / ".join(f"{r:.2f}" for r in rates), "success_mean": mean,
                     "few_shot_band": "yes" if 0.2 <= mean <= 0.6 else "no"})
        print(rows[-1], flush=True)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task in dict.fromkeys(r["task"] for r in rows):
        sub = [r for r in rows if r["task"] == task]
        ax.plot([r["demos"] for r in sub], [r["success_mean"] for r in sub], "o-", label=task)
    ax.axhspan(0.2, 0.6, color="grey", alpha=0.15, label="few-shot band (πRL starts)")
    ax.set_xlabel("demonstrations")
    ax.set_ylabel("SFT success rate")
    ax.set_ylim(0, 1)
    ax.legend()
    notes = ("Tiny π0 (`Pi0Config.tiny` with the SFT script's defaults: 4 layers, 128-wide expert; 1.17M "
             "parameters), flow-matching SFT with `algos/sft_pi0.py` defaults (batch 64, AdamW 3e-4 cosine, "
             "horizon 8, 8 actions executed per call, 5 Euler steps at eval, raw (identity-normalised) state, flow noise "
             "only on the env's action dims: `Pi0Config.noise_dims`; with openpi's noise on every padded dim (35 for PushCube, 32 for "
             "LIBERO) the same benchmark gave PushCube 0.41 / 0.38 with 10 demos, 0.36 / 0.31 with 20, LIBERO 0.04). "
             "PushCube demos: ManiSkill motion planning (seeds from 1,000,000; eval seeds 0..E-1). LIBERO demos: "
             "`common.libero_expert` from init states 25..49 (the first N successes), eval on init states 0..E-1. One eval per run, at the "
             "end of training, deterministic sampler with a fixed noise seed. Runs already in `--run-dir` are reused "
             "(delete it to rerun).")
    path = write_results("sft_fewshot", "Few-shot SFT success of the tiny π0 (CPU scale)",
                         ["task", "obs", "demos", "sft_steps", "eval_episodes_per_seed", "success_per_seed",
                          "success_mean", "few_shot_band"], rows, seeds=sorted(set(args.seeds) | set(args.libero_seeds)), notes=notes, out_dir=args.out_dir,
                         figure=fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
