"""PPO and GRPO for a VLA with action tokens (`algos/ppo_vla.py`) at CPU scale: the few-shot BC start vs PPO vs GRPO.

Per seed: `algos/ppo_vla.py --total-iterations 0` makes the start (behaviour cloning of the tiny VLM + action-token
head on a few motion-planning demos, then its eval), and the same script fine-tunes that checkpoint with PPO and with
GRPO for a wall-clock budget (`--init vla:<start>`). Every number is a real run of the script (subprocesses).
Success is the greedy (most likely bin) policy's over the eval episodes (fixed initial states 0..E-1, the same for
every row); the BC row is the RL runs' eval at iteration 0. 95% intervals: Wilson per run; over seeds, mean ±
t-interval of the per-seed rates. Throughput: training env-steps/s (eval excluded) over the raw simulator speed
measured in this same run (same env, same worker count, same chunking, random actions).

    python benchmarks/ppo_vla.py                      # PushCube-v1: writes benchmarks/results/ppo_vla_maniskill.*
    python benchmarks/ppo_vla.py --seeds 1 --minutes 5 --name ppo_vla_quick
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import tyro

from benchmarks.pirl import flags_tag, raw_throughput, run, seed_interval, wilson
from benchmarks.report import RESULTS_DIR, pyplot, write_results

ALGORITHMS = ("gae", "grpo")
LABELS = {"gae": "PPO", "grpo": "GRPO"}


@dataclass
class Args:
    env: str = "maniskill"
    """maniskill (PushCube-v1, state) or libero (a LIBERO-Object task, two 64 px cameras)"""
    task: str = ""
    """default: PushCube-v1 / libero_object/0"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds (each: its own BC start and one RL run per algorithm)"""
    algorithms: list[str] = field(default_factory=lambda: list(ALGORITHMS))
    """gae (PPO) and / or grpo"""
    minutes: float = 10.0
    """RL wall-clock budget per run (eval time excluded)"""
    eval_every: int = 10
    """RL iterations between evals"""
    eval_episodes: int = 0
    """eval episodes per evaluation (0: 100 for PushCube, 25 for LIBERO)"""
    bc_demos: int = 0
    """demos for the BC start (0: 3 for PushCube, 20 for LIBERO)"""
    bc_flags: str = ""
    """extra flags for the BC start, one string (e.g. --bc-flags="--bc-steps 3000")"""
    rl_flags: str = ""
    """extra flags for both RL runs, one string (e.g. --rl-flags="--learning-rate 1e-5")"""
    throughput_seconds: float = 20.0
    """timed seconds of the raw-simulator throughput measurement"""
    run_dir: Path = ROOT / "runs" / "bench_ppo_vla"
    """where the runs go (finished runs are reused)"""
    demo_dir: Path = ROOT / "data" / "demos"
    """demo datasets (generated when missing)"""
    out_dir: Path = RESULTS_DIR
    """where the result files go"""
    name: str = ""
    """results file name (default ppo_vla_<env>)"""


def script(args: Args, seed: int, name: str, *flags: str) -> dict:
    """Run algos/ppo_vla.py once (unless that run finished before) and return its summary."""
    summary = args.run_dir / f"{args.task.replace('/', '_')}__{name}__{seed}" / "summary.json"
    if not summary.exists():
        run([sys.executable, str(ROOT / "algos" / "ppo_vla.py"), "--env", args.env, "--task", args.task,
             "--seed", str(seed), "--exp-name", name, "--run-dir", str(args.run_dir), "--eval-episodes",
             str(args.eval_episodes), "--no-capture-video", *flags])
    finished = datetime.fromtimestamp(summary.stat().st_mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
    return {**json.loads(summary.read_text()), "finished_utc": finished}


def main(args: Args) -> None:
    if args.env not in ("maniskill", "libero"):
        raise SystemExit(f"--env must be maniskill or libero, got {args.env!r}")
    bad = [a for a in args.algorithms if a not in ALGORITHMS]
    if bad or not args.algorithms or not args.seeds:
        raise SystemExit(f"--algorithms takes {ALGORITHMS}, --seeds at least one; got {args.algorithms}, {args.seeds}")
    if args.minutes <= 0:  # the runs' only limit: --total-minutes 0 would mean none
        raise SystemExit(f"--minutes must be > 0, got {args.minutes}")
    args.task = args.task or ("PushCube-v1" if args.env == "maniskill" else "libero_object/0")
    if args.env == "libero":  # 25 per task: its init states 0..24 (25..49 make the demos)
        from common.libero_env import eval_episode_count

        try:
            args.eval_episodes = eval_episode_count(args.eval_episodes, args.task)
        except ValueError as e:
            raise SystemExit(str(e))
    args.eval_episodes = args.eval_episodes or 100
    args.bc_demos = args.bc_demos or (3 if args.env == "maniskill" else 20)
    name = args.name or f"ppo_vla_{args.env}"
    demos = args.demo_dir / args.task.replace("/", "_")
    if args.env == "libero":
        demos = demos.with_name(demos.name + f"_n{args.bc_demos}")
    runs: dict[str, list[dict]] = {"bc": [], **{a: [] for a in args.algorithms}}
    for seed in args.seeds:
        bc_name = f"bc_n{args.bc_demos}" + flags_tag(args.bc_flags)
        runs["bc"].append(script(args, seed, bc_name, "--bc-demos", str(args.bc_demos), "--demos", str(demos),
                                 "--total-iterations", "0", *shlex.split(args.bc_flags)))
        start = args.run_dir / f"{args.task.replace('/', '_')}__{bc_name}__{seed}" / "checkpoint"
        for algo in args.algorithms:
            rl_name = f"{algo}_{args.minutes:g}min" + flags_tag(args.bc_flags, args.rl_flags)
            runs[algo].append(script(args, seed, rl_name, "--init", f"vla:{start}", "--adv-type", algo,
                                     "--total-minutes", str(args.minutes), "--total-iterations", "1000000",
                                     "--eval-every", str(args.eval_every), *shlex.split(args.rl_flags)))

    first = runs[args.algorithms[0]][0]["args"]
    t0 = time.time()
    raw = raw_throughput(args, first["num_envs"], first["action_chunk"], 8 if args.env == "maniskill" else 7)
    print(f"raw simulator: {raw:.0f} env-steps/s ({time.time() - t0:.0f} s)")

    rows, n = [], args.eval_episodes
    for key in ("bc", *args.algorithms):
        rates = [r["history"][0 if key == "bc" else -1]["success_rate"] for r in runs[key]]
        per_seed = "; ".join(f"{p:.2f} [{wilson(p * n, n)[0]:.2f}, {wilson(p * n, n)[1]:.2f}]" for p in rates)
        row = {"row": "BC start" if key == "bc" else LABELS[key], "success": float(np.mean(rates)),
               "± (95%, seeds)": seed_interval(rates), "per seed [Wilson 95%]": per_seed}
        if key != "bc":
            starts = [r["history"][0]["success_rate"] for r in runs[key]]
            sps = [r["env_steps"] / max(r["minutes"] * 60, 1e-9) for r in runs[key]]
            row.update({"gain (points)": round(100 * float(np.mean(np.subtract(rates, starts))), 6),  # no 1e-16 noise
                        "env steps": int(np.mean([r["env_steps"] for r in runs[key]])),
                        "RL minutes": float(np.mean([r["minutes"] for r in runs[key]])),
                        "env-steps/s": float(np.mean(sps)), "vs raw sim": float(np.mean(sps)) / raw})
        rows.append(row)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in args.algorithms:
        for i, r in enumerate(runs[key]):
            h = r["history"]
            ax.plot([p["minutes"] for p in h], [p["success_rate"] for p in h], color=f"C{ALGORITHMS.index(key)}",
                    alpha=0.8, label=LABELS[key] if i == 0 else None)
    ax.set_xlabel("RL wall-clock minutes (eval excluded)")
    ax.set_ylabel(f"eval success ({n} episodes)")
    ax.set_title(f"ppo_vla on {args.task}: BC start -> RL")
    ax.legend()
    notes = (f"Per seed: BC of the tiny VLM + {first['action_bins']}-bin action-token head on {args.bc_demos} demos "
             f"(`--total-iterations 0`), then {args.minutes:g} minutes of RL wall clock per algorithm from that "
             f"checkpoint, {first['num_envs']} envs, chunk {first['action_chunk']}. Success: greedy decoding, "
             f"{n} eval episodes (initial states 0..{n - 1}). Raw simulator in this run: {raw:.0f} env-steps/s "
             f"(random actions, same workers and chunking). Runs finished (UTC): "
             + ", ".join(sorted({r['finished_utc'] for v in runs.values() for r in v})) + ".")
    write_results(name, f"ppo_vla on {args.task}: BC start vs PPO vs GRPO",
                  ["row", "success", "± (95%, seeds)", "gain (points)", "per seed [Wilson 95%]", "env steps",
                   "RL minutes", "env-steps/s", "vs raw sim"], rows, seeds=args.seeds, notes=notes,
                  out_dir=args.out_dir, figure=fig)
    print((args.out_dir / f"{name}.md").read_text())


if __name__ == "__main__":
    main(tyro.cli(Args))
