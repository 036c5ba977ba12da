"""Throughput of the UAV formation env and of MAPPO training on it.

- env alone: env-steps/s of `FormationEnv` (preset mixed, CTBR dynamics, hover actions) at E = 256 ... 4096 on one
  core (torch.set_num_threads(1)), against the raw limit of the same loop with the physics only (no rewards, no
  observations: what a bare simulator step costs);
- end to end: `algos/mappo_uav_formation.py`'s rollout + PPO update (attention encoder, the paper's PPO settings) for a
  few iterations on 2 cores, env-steps/s including the update.
Targets (issue 8): >= 50k env-steps/s at E = 1024 on one core; >= 10k env-steps/s end to end on 2 cores.

    python benchmarks/uav_throughput.py
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import tyro

from benchmarks.report import RESULTS_DIR, load_algo, pyplot, write_results
from common.uav_formation_env import FormationConfig, FormationEnv


@dataclass
class Args:
    envs: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    """env counts for the env-alone measurement"""
    steps: int = 50
    """timed steps per measurement (after 5 warm-up steps)"""
    repeats: int = 3
    """measurements per setting (the median is reported)"""
    train_envs: int = 256
    """envs of the end-to-end measurement"""
    train_iterations: int = 3
    """PPO iterations timed end to end (after one warm-up iteration)"""
    device: str = "cpu"
    """cpu, or cuda (results go to uav_throughput_cuda; the env and the networks on the GPU)"""
    out_dir: str = str(RESULTS_DIR)
    """where the result files go"""


def rate(fn, n_envs: int, steps: int, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = []
    for _ in range(repeats):
        for _ in range(5):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        out.append(n_envs * steps / (time.perf_counter() - start))
    return float(np.median(out))


def main(args: Args) -> None:
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"--device must be cpu or cuda (with a GPU), got {args.device!r}")
    cuda = args.device == "cuda"
    where = "GPU" if cuda else "1 core"
    rows = []
    torch.set_num_threads(1)
    for E in args.envs:
        env = FormationEnv(FormationConfig.preset("mixed", num_envs=E, device=args.device))
        env.reset()
        a = env.hover_action()
        full = rate(lambda: env.step(a), E, args.steps, args.repeats)
        raw_env = FormationEnv(FormationConfig.preset("mixed", num_envs=E, device=args.device))
        raw_env.reset()
        ua = torch.tanh(a)
        raw = rate(lambda: raw_env.integrate_drones(ua), E, args.steps, args.repeats)
        rows.append({"what": f"env alone, {where}", "envs": E, "env-steps/s": full, "agent-steps/s": full * env.N,
                     "physics only env-steps/s": raw, "env / physics only": full / raw})
        print(rows[-1], flush=True)

    # end to end: the script's own rollout + update loop
    torch.set_num_threads(2)
    mu = load_algo("mappo_uav_formation")
    from torch.utils.tensorboard import SummaryWriter
    import tempfile

    targs = mu.Args(num_envs=args.train_envs, torch_threads=2)
    device = torch.device(args.device)
    ref_obs = mu.make_env(targs, "mixed", 2, 0, device).reset()
    agent = mu.Agent(targs, mu.flat_obs(ref_obs), ref_obs["state"].shape[-1], targs.num_drones).to(device)
    opt = torch.optim.Adam(agent.parameters(), lr=targs.learning_rate, eps=1e-5)
    vnorm = mu.ValueNorm(targs.value_norm_beta).to(device)
    frames = args.train_envs * targs.num_steps / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        state = {"global_step": 0, "iterations": 0}
        mu.train(targs, agent, opt, vnorm, mu.PAPER_WEIGHTS, "mixed", frames, ref_obs, device, writer, "warmup", state)
        start = time.perf_counter()
        mu.train(targs, agent, opt, vnorm, mu.PAPER_WEIGHTS, "mixed", frames * args.train_iterations, ref_obs,
                 device, writer, "timed", state)
        seconds = time.perf_counter() - start
    e2e = args.train_envs * targs.num_steps * args.train_iterations / seconds
    rows.append({"what": f"MAPPO end to end, {'GPU' if cuda else '2 cores'} (rollout + PPO update)", "envs": args.train_envs,
                 "env-steps/s": e2e, "agent-steps/s": e2e * targs.num_drones})
    print(rows[-1], flush=True)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    env_rows = [r for r in rows if r["what"].startswith("env")]
    ax.plot([r["envs"] for r in env_rows], [r["env-steps/s"] for r in env_rows], marker="o", label="env step")
    ax.plot([r["envs"] for r in env_rows], [r["physics only env-steps/s"] for r in env_rows], marker="s",
            label="physics only")
    ax.axhline(50_000, ls="--", c="gray", label="target at E=1024")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("envs")
    ax.set_ylabel(f"env-steps/s ({where})")
    ax.legend()
    notes = ("Preset mixed (3 drones, 10 columns, 2 balls), CTBR dynamics, sdf9 static token, hover actions; median "
             f"of {args.repeats} runs of {args.steps} steps. 'Physics only' is the dynamics update alone (the raw "
             "limit of a step without collisions, rewards and observations). End to end: the script's `train` "
             f"(attention encoder, {targs.num_steps}-step rollouts, 4 epochs x 16 minibatches) after one warm-up "
             "iteration. Targets (issue 8): >= 50k env-steps/s at E = 1024 on one core, >= 10k end to end.")
    cols = ["what", "envs", "env-steps/s", "agent-steps/s", "physics only env-steps/s", "env / physics only"]
    write_results("uav_throughput_cuda" if cuda else "uav_throughput",
                  "UAV formation env and MAPPO throughput" + (" on a GPU" if cuda else ""), cols, rows, seeds=[0], notes=notes,
                  out_dir=args.out_dir, figure=fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
