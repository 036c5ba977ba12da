"""Why do trained UAV formations still hit columns? For every episode a column hit ends, this looks back along the
hitting drone's path: was the column it hit the nearest column a moment earlier? The released column observation
(sdf9, and our sdf9_diff) holds distances to the nearest column only, so a column passed closely hides the one
behind it until the drone is past the first; per-column tokens (`--static-mode tokens`, `--static-top-k K`) show
the K nearest.

    python benchmarks/uav_column_hits.py --runs runs/bench_uav_release/*__1   # ~1 min per run and preset

Each run directory is one `algos/mappo_uav_formation.py` run (its agent.pt and summary.json: the settings it trained
with). Every run flies the same episodes: `--eval-envs` per preset from the script's evaluation seed, each env's
first episode, deterministic policy.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import tyro
from tqdm import tqdm

from benchmarks.report import RESULTS_DIR, load_algo, pyplot, write_results
from benchmarks.uav_formation_shape import load_runs

TOP_K = 3  # the share of hits whose column was among the drone's 3 nearest


@dataclass
class Args:
    runs: list[str] = field(default_factory=list)
    """run directories of algos/mappo_uav_formation.py (agent.pt + summary.json)"""
    presets: list[str] = field(default_factory=lambda: ["static", "mixed"])
    """presets with columns to fly"""
    eval_envs: int = 256
    """episodes per preset and run"""
    max_steps: int = 0
    """episode length (env steps); 0: the runs' own (900, 18 s)"""
    lags: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0])
    """how long before the hit to look (s)"""
    seed: int = 20_000
    """the evaluation seed (20,000: the episodes the script's and the UAV benchmark's evaluation fly)"""
    out_dir: str = str(RESULTS_DIR)
    """where the result files go"""
    name: str = "uav_column_hits"
    """result files: <out-dir>/<name>.{md,json,png}"""


@torch.no_grad()
def fly(algo, run_args, act, preset: str, seed: int, ref_obs, lag_steps: list[int]) -> dict:
    """Each env's first episode under `act(env, obs)`; for each that a column hit ends (after `end` steps): the
    hitting drone (the one nearest a column), the column, and that column's rank among the drone's active columns
    `lag` steps before the end, at time end - lag (0: the nearest), for each lag the episode is old enough for."""
    env = algo.make_env(run_args, preset, run_args.eval_envs, seed, "cpu")
    if not env.cfg.num_columns:
        raise SystemExit(f"preset {preset!r} has no columns")
    obs = algo.pad_like(env.reset(), ref_obs)
    depth = max(lag_steps) + 1
    history = torch.full((depth, env.E, env.N, 3), float("nan"))  # positions before each step, newest last
    alive = torch.ones(env.E, dtype=torch.bool)
    hits, episodes = [], 0
    for _ in range(run_args.max_steps):
        history = torch.cat([history[1:], env.p[None].clone()])
        columns, active, t = env.columns.clone(), env.col_active.clone(), env.t.clone()
        obs, _, _, _, info = env.step(act(env, obs))
        obs = algo.pad_like(obs, ref_obs)
        if "episode" in info:  # a finished env is reset already: its last positions are in the final observation
            ep = info["episode"]
            first = alive[ep["env_ids"]]
            for k in torch.nonzero(first).flatten().tolist():
                e = int(ep["env_ids"][k])
                alive[e] = False
                episodes += 1
                if not ep["hit_column"][k]:
                    continue
                p_end = info["final_obs"]["state"][e, :3 * env.N].view(env.N, 3)
                d_end = torch.linalg.norm(p_end[:, None, :2] - columns[e][None], dim=-1).masked_fill(~active[e], 1e6)
                drone = int(d_end.min(-1).values.argmin())
                col = int(d_end[drone].argmin())
                velocity = (p_end[drone] - history[-1, e, drone]) / env.cfg.dt
                to_col = columns[e, col] - p_end[drone, :2]
                cos = float(velocity[:2] @ to_col / (velocity[:2].norm() * to_col.norm()).clamp(min=1e-9))
                ranks = {}
                for lag in lag_steps:
                    if lag > int(t[e]) + 1:  # the episode is younger than the lag
                        continue
                    past = history[-lag, e, drone, :2]
                    d = torch.linalg.norm(columns[e] - past, dim=-1).masked_fill(~active[e], 1e6)
                    ranks[lag] = int((d < d[col]).sum())
                hits.append({"env": e, "end": int(t[e]) + 1, "drone": drone, "column": col, "ranks": ranks,
                             "speed": float(velocity.norm()),
                             "head_on": cos > math.cos(math.radians(30))})
        if not alive.any():
            break
    return {"episodes": episodes, "hits": hits}


def main(args: Args) -> None:
    algo = load_algo("mappo_uav_formation")
    bad = [p for p in args.presets if p not in algo.PRESETS or not algo.PRESETS[p]["num_columns"]]
    if bad or not args.presets:
        with_columns = sorted(p for p, c in algo.PRESETS.items() if c["num_columns"])
        raise SystemExit(f"--presets takes presets with columns {with_columns}, got {args.presets}")
    if args.eval_envs < 1 or args.max_steps < 0 or not args.lags or min(args.lags) <= 0:
        raise SystemExit("need --eval-envs >= 1, --max-steps >= 0 and --lags > 0 s")
    if not args.runs:
        raise SystemExit("give --runs: finished runs of algos/mappo_uav_formation.py (agent.pt + summary.json)")
    torch.set_num_threads(1)
    loaded = load_runs(algo, [Path(r) for r in args.runs], args)
    dt = algo.make_env(loaded[0][1], "free", 1, 0, "cpu").cfg.dt
    lag_steps = [max(1, round(s / dt)) for s in args.lags]
    rows = []
    with tqdm(total=len(loaded) * len(args.presets), desc="episodes") as bar:
        for name, run_args, agent, ref_obs in loaded:
            for preset in args.presets:
                r = fly(algo, run_args, algo.policy_actions(agent), preset, args.seed, ref_obs, lag_steps)
                hits = r["hits"]
                row = {"method": name, "preset": preset, "episodes": r["episodes"], "column_hits": len(hits),
                       "hit_rate": round(len(hits) / max(r["episodes"], 1), 3)}
                for s, lag in zip(args.lags, lag_steps):
                    seen = [h["ranks"][lag] for h in hits if lag in h["ranks"]]
                    row[f"nearest_{s:g}s"] = round(float(np.mean([x == 0 for x in seen])), 2) if seen else None
                    row[f"top{TOP_K}_{s:g}s"] = round(float(np.mean([x < TOP_K for x in seen])), 2) if seen else None
                row["head_on"] = round(float(np.mean([h["head_on"] for h in hits])), 2) if hits else None
                row["speed_m_s"] = round(float(np.mean([h["speed"] for h in hits])), 2) if hits else None
                row["by_drone"] = " / ".join(str(sum(h["drone"] == i for h in hits))
                                             for i in range(run_args.num_drones))
                rows.append(row)
                bar.update()
    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.presets), figsize=(4.2 * len(args.presets), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    width = 0.8 / len(loaded)
    for ax, preset in zip(axes, args.presets):
        for k, (name, *_) in enumerate(loaded):
            row = next(r for r in rows if r["method"] == name and r["preset"] == preset)
            vals = [row[f"nearest_{s:g}s"] or 0.0 for s in args.lags]
            ax.bar(np.arange(len(args.lags)) + (k - (len(loaded) - 1) / 2) * width, vals, width,
                   label=f"{name} ({row['column_hits']} hits)")
        ax.set(title=preset, xticks=range(len(args.lags)), ylim=(0, 1), xlabel="time before the hit (s)")
        ax.set_xticklabels([f"{s:g}" for s in args.lags])
    axes[0].set_ylabel("hit column was the nearest (share of hits)")
    axes[0].legend(fontsize=6)
    notes = (f"{args.eval_envs} episodes per preset and run (each env's first), evaluation seed {args.seed}: every run "
             "meets the same column layouts; deterministic policies (the Gaussian's mean). For each episode that a "
             "column hit ended: the hitting drone is the one nearest a column at the end, the column the nearest to "
             "it. `nearest_<t>s`: the share of those hits whose column was that drone's nearest active column t "
             f"seconds before the hit (the only one the sdf9 / sdf9_diff observation describes); `top{TOP_K}_<t>s`: "
             f"among its {TOP_K} nearest (what `--static-top-k {TOP_K}` shows); hits in episodes younger than t are "
             "left out of that column. `head_on`: the drone's velocity at the hit within 30 degrees of the direction "
             "to the column's axis; `speed_m_s`: its speed then. `by_drone`: hits per drone (drone 0's slot is at +x, "
             "beside the flight direction +y; drone 1 leads, drone 2 trails it in the same lane).")
    seeds = sorted({int(m[1].seed) for m in loaded})
    path = write_results(args.name, "UAV column hits: was the column hit in view?",
                         ["preset", "method", "episodes", "column_hits", "hit_rate",
                          *[f"{key}_{s:g}s" for s in args.lags for key in ("nearest", f"top{TOP_K}")],
                          "head_on", "speed_m_s", "by_drone"],
                         sorted(rows, key=lambda r: args.presets.index(r["preset"])), seeds=seeds, notes=notes,
                         out_dir=args.out_dir, figure=fig)
    print(path.read_text())


if __name__ == "__main__":
    main(tyro.cli(Args))
