"""The πRL table at CPU scale: few-shot SFT vs Flow-SDE vs Flow-Noise success, with the tiny π0.

Per seed: `algos/sft_pi0.py` makes the few-shot SFT start (motion-planning demos for ManiSkill, scripted-expert demos
for LIBERO), then `algos/flow_sde_pi0.py` and `algos/flow_noise_pi0.py` fine-tune it for a wall-clock budget. Every
number is a real run of those scripts (subprocesses). Success is the deterministic (ODE) policy's over the eval
episodes (fixed initial states 0..E-1, the same for every row); the SFT row is the RL scripts' eval of the start
(one eval-only run per seed).
95% intervals: Wilson per run; over seeds, mean ± t-interval of the per-seed rates. Throughput: training env-steps/s
(evals and env start-up excluded) over the raw simulator speed measured by the same command on the same machine (same
env, same worker count, same chunking, random actions). The results JSON keeps each RL run (`runs`), so a later call
on another machine reuses the seeds it holds as they were measured and runs only the missing ones: a table too long
for one sitting grows a seed at a time.

    python benchmarks/pirl.py                                     # PushCube-v1: writes benchmarks/results/pirl_maniskill.*
    python benchmarks/pirl.py --env libero --seeds 1 --minutes 20 # LIBERO-Object task 0, 25 eval episodes
    python benchmarks/pirl.py --env libero --task libero_object/0-3 --sft-only  # four tasks (100 eval episodes):
                                                                  # their SFT starts first, beside other work
    python benchmarks/pirl.py --algorithms flow_sde --minutes 30 --eval-every 20 --sde-flags="--noise-level 0.3" \
        --name pirl_maniskill_sde_30min                           # flags for one algorithm, its own table
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import tyro

from benchmarks.report import RESULTS_DIR, machine_info, pyplot, seed_interval, write_results

ALGORITHMS = ("flow_sde", "flow_noise")


@dataclass
class Args:
    env: str = "maniskill"
    """maniskill (PushCube-v1, state) or libero (a LIBERO-Object task, two 64 px cameras)"""
    task: str = ""
    """default: PushCube-v1 / libero_object/0 (a LIBERO subset such as libero_object/0-3: one SFT start and one RL run
    over its tasks, 25 eval episodes per task)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds (each: its own SFT start and one RL run per algorithm)"""
    algorithms: list[str] = field(default_factory=lambda: list(ALGORITHMS))
    """which RL scripts to run"""
    minutes: float = 10.0
    """RL wall-clock budget per run (the scripts' training clock: env start-up and evals excluded)"""
    eval_every: int = 10
    """RL iterations between evals"""
    eval_episodes: int = 0
    """eval episodes per evaluation (0: 100 for PushCube, 25 per LIBERO task: its init states 0..24, as 25..49 made
    the SFT demos)"""
    sft_demos: int = 0
    """demos for the SFT start, per task (0: 3 for PushCube, 20 for LIBERO: the few-shot band of
    benchmarks/sft_fewshot)"""
    sft_steps: int = 0
    """SFT steps (0: 1500 for PushCube, 2000 for LIBERO)"""
    sft_flags: str = ""
    """extra flags for the SFT start, one string (e.g. --sft-flags="--expert mlp --expert-width 256": the
    calibration's MLP flow policy)"""
    rl_flags: str = ""
    """extra flags for both RL scripts, one string (e.g. --rl-flags="--learning-rate 3e-5 --num-steps 32")"""
    sde_flags: str = ""
    """extra flags for Flow-SDE only (e.g. --sde-flags="--noise-level 0.3")"""
    noise_flags: str = ""
    """extra flags for Flow-Noise only"""
    throughput_seconds: float = 20.0
    """timed seconds of the raw-simulator throughput measurement"""
    run_dir: Path = ROOT / "runs" / "bench_pirl"
    """where the SFT and RL runs go (finished runs are reused)"""
    demo_dir: Path = ROOT / "data" / "demos"
    """demo datasets (generated when missing)"""
    out_dir: Path = RESULTS_DIR
    """where pirl_<env>.{md,json,png} go"""
    name: str = ""
    """results file name (default pirl_<env>; e.g. a separate table for one algorithm's longer runs)"""
    sft_only: bool = False
    """make the demos, the SFT starts of every seed and their evals, then stop: their budgets are steps and
    episodes, so they may share the machine with other work; the RL runs' budget is wall-clock minutes, so run the same
    command without this flag alone on the machine afterwards (it reuses the SFT starts and their evals)"""


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate over n episodes."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"  {time.time() - t0:.0f} s", flush=True)


def flags_tag(*flags: str) -> str:
    """A short, stable suffix for run names, so that finished runs are reused only with the same flags."""
    return "_" + hashlib.sha1(" | ".join(flags).encode()).hexdigest()[:6] if any(f.strip() for f in flags) else ""


def resume_flag(run: Path) -> list[str]:
    """["--resume"] for a run that stopped before it finished (killed, machine gone) and left a checkpoint: the
    script goes on from it (its budget counts what the checkpoint had done). Else []."""
    return ["--resume"] if any((run / d).exists() for d in ("checkpoint", "checkpoint.old")) else []


def sft_start(args: Args, seed: int) -> Path:
    name = f"sft_n{args.sft_demos}_s{args.sft_steps}" + flags_tag(args.sft_flags)
    final = args.run_dir / f"{args.task.replace('/', '_')}__{name}__{seed}" / "final"
    if not (final / "pi0_config.json").exists():
        demos = args.demo_dir / (args.task if args.env == "maniskill" else f"{args.task.replace('/', '_')}_n{args.sft_demos}")
        run([sys.executable, str(ROOT / "algos" / "sft_pi0.py"), "--env", args.env, "--task", args.task,
             "--num-demos", str(args.sft_demos), "--demos", str(demos), "--total-steps", str(args.sft_steps),
             "--eval-episodes", "0", "--eval-every", str(args.sft_steps), "--no-eval-at-end",  # start_eval's instead
             "--seed", str(seed), "--exp-name", name, "--run-dir", str(args.run_dir),
             *resume_flag(final.parent), *shlex.split(args.sft_flags)])
    return final


def start_eval(args: Args, seed: int, init: Path) -> dict:
    """The SFT start's eval (a history entry of iteration 0): one eval-only run of an RL script (--total-iterations
    0) per seed. Both RL scripts evaluate with the same deterministic ODE sampler, noise and
    episodes, so their runs skip it (--no-eval-at-start): it is made once, and in --sft-only, outside the
    wall-clock-budgeted phase."""
    name = "start_eval" + flags_tag(args.sft_flags, args.rl_flags)
    summary = args.run_dir / f"{args.task.replace('/', '_')}__{name}__{seed}" / "summary.json"
    if not summary.exists():  # with the first algorithm's script (--rl-flags may hold flags only the chosen ones take)
        run([sys.executable, str(ROOT / "algos" / f"{args.algorithms[0]}_pi0.py"), "--env", args.env, "--task",
             args.task, "--init", f"sft:{init}", "--seed", str(seed), "--exp-name", name, "--run-dir",
             str(args.run_dir), "--eval-episodes", str(args.eval_episodes), "--no-capture-video",
             *shlex.split(args.rl_flags), "--total-iterations", "0"])
    return json.loads(summary.read_text())["history"][0]


def rl_run_name(args: Args, algorithm: str) -> str:
    """The RL run's --exp-name: algorithm, budget and a tag of every flag that could change the run."""
    own_flags = args.sde_flags if algorithm == "flow_sde" else args.noise_flags
    # the algorithm's own flags join the tag only when given, so runs named before they existed are still reused
    tagged = (args.sft_flags, args.rl_flags, own_flags) if own_flags.strip() else (args.sft_flags, args.rl_flags)
    return f"{algorithm}_{args.minutes:g}min" + flags_tag(*tagged)


def rl_run_id(args: Args, algorithm: str, seed: int) -> str:
    """The RL run's directory name (the scripts' <task>__<exp-name>__<seed>)."""
    return f"{args.task.replace('/', '_')}__{rl_run_name(args, algorithm)}__{seed}"


def rl_run(args: Args, algorithm: str, seed: int, init: Path) -> dict:
    own_flags = args.sde_flags if algorithm == "flow_sde" else args.noise_flags
    run_id, name = rl_run_id(args, algorithm, seed), rl_run_name(args, algorithm)
    summary = args.run_dir / run_id / "summary.json"
    if not summary.exists():
        run([sys.executable, str(ROOT / "algos" / f"{algorithm}_pi0.py"), "--env", args.env, "--task", args.task,
             "--init", f"sft:{init}", "--seed", str(seed), "--exp-name", name, "--run-dir", str(args.run_dir),
             "--total-minutes", str(args.minutes), "--total-iterations", "1000000", "--eval-every",
             str(args.eval_every), "--eval-episodes", str(args.eval_episodes), "--no-capture-video",
             # the start's eval is start_eval's, unless this algorithm's own flags could change what it evaluates
             *([] if own_flags.strip() else ["--no-eval-at-start"]),
             *resume_flag(summary.parent), *shlex.split(args.rl_flags), *shlex.split(own_flags)])
    # a finished run is reused as it is, so the table says when each one ran (the file's mtime, UTC)
    finished = datetime.fromtimestamp(summary.stat().st_mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
    result = json.loads(summary.read_text())
    if not (result["history"] and result["history"][0]["iteration"] == 0):  # runs made before 2026-12-05 have it
        result["history"] = [start_eval(args, seed, init), *result["history"]]
    return {"run": run_id, "algorithm": algorithm, "seed": seed, "history": result["history"],
            "minutes": result["minutes"], "env_steps": result["env_steps"], "num_envs": result["args"]["num_envs"],
            "sim_seconds": result.get("sim_seconds"),  # (runs made before 2026-12-06 did not time their envs.step)
            "action_chunk": result["args"]["action_chunk"], "finished_utc": finished}


def sim_columns(run: dict) -> dict:
    """The run's own simulator speed (env steps per second inside `envs.step`) and training's share of it."""
    sim = run.get("sim_seconds")
    if not sim:
        return {"sim_sps": None, "sim_ratio": None}
    return {"sim_sps": run["env_steps"] / sim, "sim_ratio": sim / max(run["minutes"] * 60, 1e-9)}


def committed_runs(path: Path) -> dict[str, dict]:
    """The RL runs a results file was made from, by run id ({} for none, or a file from before runs were kept).

    A run's directory lives on the machine that made it; the committed results keep what the table needs of each run
    (its eval history, budget, steps and the raw throughput measured beside it), so a table too long for one sitting
    (the four-task LIBERO one: ~2 h per seed here) grows a seed at a time, on whatever machine runs the next one."""
    if not path.exists():
        return {}
    return {r["run"]: r for r in json.loads(path.read_text()).get("runs", [])}


def raw_throughput(args: Args, num_envs: int, chunk: int, action_dim: int) -> float:
    """Env-steps/s of the same env (same workers, same chunking) under random actions: the simulator's limit here."""
    from common.envs import make_task_env
    from common.libero_env import MAX_EPISODE_STEPS

    max_steps = 100 if args.env == "maniskill" else MAX_EPISODE_STEPS[args.task.split("/")[0]]
    env = make_task_env(args.env, args.task, num_envs, max_episode_steps=max_steps, seed=0)
    try:
        env.reset(seed=0)
        g = torch.Generator().manual_seed(0)
        env.step(torch.rand(num_envs, chunk, action_dim, generator=g) * 0.2 - 0.1)  # warm-up
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.throughput_seconds:
            _, _, _, _, info = env.step(torch.rand(num_envs, chunk, action_dim, generator=g) * 0.2 - 0.1)
            steps += int(info["executed_steps"].sum())
        return steps / (time.perf_counter() - t0)
    finally:
        env.close()


def main(args: Args) -> None:
    if args.env not in ("maniskill", "libero"):
        raise SystemExit(f"--env must be maniskill or libero, got {args.env!r}")
    bad = [a for a in args.algorithms if a not in ALGORITHMS]
    if bad or not args.algorithms or not args.seeds:
        raise SystemExit(f"--algorithms takes one or more of {ALGORITHMS} (got {args.algorithms}), --seeds one or "
                         f"more seeds (got {args.seeds})")
    if args.minutes <= 0:  # the runs' only limit: --total-minutes 0 would mean none
        raise SystemExit(f"--minutes must be > 0, got {args.minutes}")
    args.task = args.task or ("PushCube-v1" if args.env == "maniskill" else "libero_object/0")
    args.sft_demos = args.sft_demos or (3 if args.env == "maniskill" else 20)
    args.sft_steps = args.sft_steps or (1500 if args.env == "maniskill" else 2000)
    if args.env == "libero":  # a LIBERO task has 50 init states; the SFT demos use some of them
        from common.libero_env import eval_episode_count

        try:
            args.eval_episodes = eval_episode_count(args.eval_episodes, args.task)
        except ValueError as e:
            raise SystemExit(str(e))
    args.eval_episodes = args.eval_episodes or 100
    if args.sft_only:
        for seed in args.seeds:
            init = sft_start(args, seed)
            start = start_eval(args, seed, init)
            print(f"seed {seed}: SFT start {init}, eval success {start['success_rate']:.2f} over {start['episodes']} "
                  "episodes", flush=True)
        return
    name = args.name or f"pirl_{args.env}"
    kept = committed_runs(args.out_dir / f"{name}.json")
    runs = []
    for seed in args.seeds:
        init = None  # a seed whose runs are all in the committed results needs no SFT start here
        for algorithm in args.algorithms:
            run_id = rl_run_id(args, algorithm, seed)
            if run_id in kept and not (args.run_dir / run_id / "summary.json").exists():
                runs.append(kept[run_id])
                continue
            init = init or sft_start(args, seed)
            runs.append(rl_run(args, algorithm, seed, init))
            same = kept.get(run_id, {})
            if same.get("finished_utc") == runs[-1]["finished_utc"] and "raw_sps" in same:
                # the committed run itself, its directory still here: its raw throughput is the one measured beside it
                runs[-1].update(raw_sps=same["raw_sps"], machine=same["machine"])
    made_here = [r for r in runs if "raw_sps" not in r]
    if made_here:  # the same env workers and chunking as training, on this machine
        raw = raw_throughput(args, num_envs=made_here[0]["num_envs"], chunk=made_here[0]["action_chunk"],
                             action_dim=8 if args.env == "maniskill" else 7)
        machine = machine_info()
        for r in made_here:
            r.update(raw_sps=raw, machine=f"{machine['cpu']}, {machine['cores']} cores")

    rows = []
    for r in runs:
        h0, h1 = r["history"][0], r["history"][-1]
        n = h1["episodes"]
        lo, hi = wilson(h1["success_rate"] * n, n)
        sps, raw = r["env_steps"] / max(r["minutes"] * 60, 1e-9), r["raw_sps"]
        rows.append({"algorithm": r["algorithm"], "seed": r["seed"], "sft_success": h0["success_rate"],
                     "rl_success": h1["success_rate"], "ci95": f"[{lo:.2f}, {hi:.2f}]",
                     "gain_points": 100 * (h1["success_rate"] - h0["success_rate"]), "minutes": r["minutes"],
                     "env_steps": r["env_steps"], "train_sps": sps, "raw_sps": raw, "sps_ratio": sps / raw,
                     **sim_columns(r), "finished_utc": r["finished_utc"]})
    for algorithm in args.algorithms:
        sel = [row for row in rows if row["algorithm"] == algorithm and isinstance(row["seed"], int)]
        if not sel:
            continue
        sft, rl = [row["sft_success"] for row in sel], [row["rl_success"] for row in sel]
        gains = [row["gain_points"] for row in sel]
        rows.append({"algorithm": algorithm, "seed": "mean", "sft_success": float(np.mean(sft)),
                     "rl_success": float(np.mean(rl)), "ci95": f"± {seed_interval(rl):.2f} (seeds)",
                     "gain_points": float(np.mean(gains)), "minutes": float(np.mean([row["minutes"] for row in sel])),
                     "env_steps": int(np.mean([row["env_steps"] for row in sel])),
                     "train_sps": float(np.mean([row["train_sps"] for row in sel])),
                     "raw_sps": float(np.mean([row["raw_sps"] for row in sel])),
                     "sps_ratio": float(np.mean([row["sps_ratio"] for row in sel])),
                     **{k: float(np.mean([row[k] for row in sel])) if all(row[k] is not None for row in sel) else None
                        for k in ("sim_sps", "sim_ratio")}, "finished_utc": ""})

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"flow_sde": "tab:blue", "flow_noise": "tab:orange"}
    styles = ["-", "--", ":", "-."]  # seeds told apart by line style, algorithms by colour
    for r in runs:
        ax.plot([h["minutes"] for h in r["history"]], [h["success_rate"] for h in r["history"]], marker="o",
                linestyle=styles[args.seeds.index(r["seed"]) % len(styles)], color=colors[r["algorithm"]], alpha=0.8,
                label=f"{r['algorithm']} seed {r['seed']}")
    ax.set_xlabel("RL wall-clock minutes (eval excluded)")
    ax.set_ylabel(f"eval success ({args.eval_episodes} episodes, ODE)")
    ax.set_title(f"πRL on {args.task}, tiny π0 from few-shot SFT")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    notes = (f"Few-shot SFT start: {args.sft_demos} demos, {args.sft_steps} steps (`algos/sft_pi0.py`"
             f"{' ' + args.sft_flags if args.sft_flags else ''}, one per seed). "
             f"RL: `algos/flow_sde_pi0.py` / `algos/flow_noise_pi0.py` with their CPU defaults (which follow the "
             f"start's action expert: an MLP expert on ManiSkill gets the scripts' `CPU_MLP_EXPERT` settings)"
             f"{' plus `' + args.rl_flags + '`' if args.rl_flags else ''}"
             f"{'; Flow-SDE with `' + args.sde_flags + '`' if args.sde_flags else ''}"
             f"{'; Flow-Noise with `' + args.noise_flags + '`' if args.noise_flags else ''}, "
             f"{args.minutes:g} minutes of training each (evals and env start-up excluded), "
             f"eval every {args.eval_every} iterations on {args.eval_episodes} fixed initial states. "
             "`sft_success` is the SFT start's eval with the RL scripts' deterministic sampler (an eval-only run "
             f"of {args.algorithms[0]}_pi0.py per seed, `--total-iterations 0`: both scripts evaluate the same ODE "
             "with the same noise; runs made before 2026-12-05 evaluated their start themselves), `rl_success` the "
             "last eval. `raw_sps`: the same "
             f"worker envs ({runs[0]['num_envs']}) stepping chunks of {runs[0]['action_chunk']} random actions for "
             f"{args.throughput_seconds:g} s on the machine of that run, measured by the command that made it; "
             "`sps_ratio` = training env-steps/s over it (target >= 0.8). `sim_sps`: the simulator's speed inside "
             "the run itself (env steps over the seconds spent in the training envs' `step`, the policy's actions, "
             "auto-resets included), and `sim_ratio` = training env-steps/s over it, i.e. the share of the training "
             "wall clock spent simulating: measured over the same minutes as the training, so the VM's speed drift "
             "between the run and the `raw_sps` measurement does not enter it (empty for runs made before "
             "2026-12-06). `finished_utc`: when that RL run ended "
             "(finished runs with the same flags are reused, not re-run: from the run directory, or from this "
             "table's JSON, which keeps each run's history, so a seed made on another day or machine stays as it was "
             "measured; the JSON's `runs` say which machine). Target gain: >= +30 points on PushCube-v1 within 30 min.")
    shown = " vs ".join({"flow_sde": "Flow-SDE", "flow_noise": "Flow-Noise"}[a] for a in args.algorithms)
    made = {r["run"] for r in runs}  # the JSON keeps the committed runs this table did not ask for (other seeds or
    # flags), so a narrower call loses none of them
    write_results(name, f"πRL at CPU scale: {args.task}, few-shot SFT vs {shown}",
                  ["algorithm", "seed", "sft_success", "rl_success", "ci95", "gain_points", "minutes", "env_steps",
                   "train_sps", "raw_sps", "sps_ratio", "sim_sps", "sim_ratio", "finished_utc"], rows, seeds=args.seeds, notes=notes,
                  out_dir=args.out_dir, figure=fig,
                  extra={"runs": runs + [r for run_id, r in kept.items() if run_id not in made]})


if __name__ == "__main__":
    main(tyro.cli(Args))
