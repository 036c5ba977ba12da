"""Where does a UAV formation's error come from? The formation error the tables report (time-mean distance of each
drone from its slot around the centroid, m) taken apart for trained policies and the APF baseline: how much of it
a rotation of the whole formation explains (the formation reward is built from pair distances only, so it is blind to
rotation), how much a change of size, and what is left: the shape itself. With the mean sorted pair distances, the
shape is visible directly (the paper's triangle: three sides of sqrt(3) = 1.732 m).

    python benchmarks/uav_formation_shape.py --runs runs/bench_uav_sdf9diff/*_sdf9_diff__*   # ~1 min per run

Each run directory is one `algos/mappo_uav_formation.py` run (its agent.pt and summary.json: the settings it trained
with). Every method flies the same episodes: `--eval-envs` per preset, from the script's evaluation seed.
"""

from __future__ import annotations

import json
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
from common.uav_apf import APFController
from common.uav_formation_env import formation_cost

ALIGNMENTS = ("formation_error", "yaw_aligned", "rotation_aligned", "shape_error")
PHASES = ("error_before_throw", "error_ball_in_air", "error_after_throw")
STEP_SHARES = tuple(name.replace("error_", "steps_") for name in PHASES)


@dataclass
class Args:
    runs: list[str] = field(default_factory=list)
    """run directories of algos/mappo_uav_formation.py (agent.pt + summary.json); none: APF only"""
    presets: list[str] = field(default_factory=lambda: ["free", "static", "dynamic", "mixed"])
    """presets to fly (free: no obstacles, the formation the policy keeps when nothing disturbs it)"""
    eval_envs: int = 128
    """episodes per preset and method"""
    max_steps: int = 0
    """episode length (env steps); 0: the runs' own (900, 18 s)"""
    seed: int = 20_000
    """the evaluation seed (20,000: the episodes the script's and the UAV benchmark's evaluation fly)"""
    apf: bool = True
    """fly the APF baseline too"""
    out_dir: str = str(RESULTS_DIR)
    """where the result files go"""
    name: str = "uav_formation_shape"
    """result files: <out-dir>/<name>.{md,json,png}"""


def aligned_errors(x: torch.Tensor, slots: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean per-drone distance [E] between the formation x [E, N, 3] and its slots [N, 3], both about their centroids:
    as they are (the env's formation error), after the least-squares best rotation of the slots about the vertical
    (yaw), after the best 3-D rotation (which also undoes a mirrored flat formation: a half turn out of its plane),
    and after the best rotation and scale (Kabsch / Umeyama): what no rotation or size explains."""
    x = x - x.mean(1, keepdim=True)
    y = (slots - slots.mean(0)).expand_as(x)
    out = {"formation_error": (x - y).norm(dim=-1).mean(-1)}
    for key, dims in (("yaw_aligned", 2), ("rotation_aligned", 3)):
        xa, ya = x[..., :dims], y[..., :dims]
        u, _, vt = torch.linalg.svd(ya.transpose(1, 2) @ xa)
        flip = torch.ones(x.shape[0], dims, dtype=x.dtype, device=x.device)
        flip[:, -1] = torch.sign(torch.linalg.det(vt.transpose(1, 2) @ u.transpose(1, 2)))  # a rotation, no mirror
        rot = vt.transpose(1, 2) @ torch.diag_embed(flip) @ u.transpose(1, 2)
        yr = torch.cat([ya @ rot.transpose(1, 2), y[..., dims:]], -1)
        out[key] = (x - yr).norm(dim=-1).mean(-1)
        if dims == 3:
            scale = (yr * x).sum((1, 2)) / (yr * yr).sum((1, 2)).clamp(min=1e-9)
            out["shape_error"] = (x - scale[:, None, None] * yr).norm(dim=-1).mean(-1)
    return out


def pair_distances(x: torch.Tensor) -> torch.Tensor:
    """Every drone pair's distance [E, N (N - 1) / 2]: pairs 0-1, 0-2, ..., 1-2, ..."""
    i, j = torch.triu_indices(x.shape[1], x.shape[1], 1)
    return (x[:, i] - x[:, j]).norm(dim=-1)


@torch.no_grad()
def ball_phase(env) -> torch.Tensor:
    """[E] phase of each env's episode with respect to the balls: 0 before the first throw, 1 while a ball is in the
    air, 2 with none in the air after a throw (between throws or after the last: does the formation come back?);
    always 0 in presets without balls. The release's formation reward drops to 0.2 in phase 1."""
    if not env.cfg.num_balls:
        return torch.zeros(env.E, dtype=torch.long)
    in_air = env.ball_active.any(-1)
    thrown = (env.t[:, None] > env.ball_launch).any(-1)
    return torch.where(in_air, 1, torch.where(thrown, 2, 0))


def fly(algo, run_args, act, preset: str, seed: int, ref_obs) -> dict:
    """One batched round of episodes (each env's first): each episode's time means over its steps, the env's own
    formation error among them (the same steps), then their mean over the episodes. The formation error is also
    split by ball phase (`ball_phase`): each episode's time mean over its steps in that phase, then the mean over the
    episodes that have such steps (NaN where none has)."""
    env = algo.make_env(run_args, preset, run_args.eval_envs, seed, "cpu")
    obs = algo.pad_like(env.reset(), ref_obs)
    n_pairs = env.N * (env.N - 1) // 2
    sums = {k: torch.zeros(env.E) for k in (*ALIGNMENTS, "laplacian_cost")}
    pair_sum, steps = torch.zeros(env.E, n_pairs), torch.zeros(env.E)
    alive = torch.ones(env.E, dtype=torch.bool)
    collision_free, env_error = torch.zeros(env.E), torch.zeros(env.E)
    phase_sum, phase_steps = torch.zeros(env.E, len(PHASES)), torch.zeros(env.E, len(PHASES))
    for _ in range(run_args.max_steps):
        phase_before = ball_phase(env)
        obs, _, _, _, info = env.step(act(env, obs))
        obs = algo.pad_like(obs, ref_obs)
        p, ended, phase = env.p.clone(), None, ball_phase(env)
        if "episode" in info:  # a finished env is reset already: its last positions are in the final observation
            ep = info["episode"]
            p[ep["env_ids"]] = info["final_obs"]["state"][ep["env_ids"], :3 * env.N].view(-1, env.N, 3)
            phase[ep["env_ids"]] = phase_before[ep["env_ids"]]  # its balls are reset too: the phase it ended in
            first = alive[ep["env_ids"]]  # only each env's first episode counts
            ended = ep["env_ids"][first]
            collision_free[ended] = ep["collision_free"][first].float()
            env_error[ended] = ep["formation_error"][first]
        p, phase = p[alive], phase[alive]
        errors = aligned_errors(p, env.offsets)
        for key, value in errors.items():
            sums[key][alive] += value
        in_phase = torch.nn.functional.one_hot(phase, len(PHASES)).float()
        phase_sum[alive] += in_phase * errors["formation_error"][:, None]
        phase_steps[alive] += in_phase
        sums["laplacian_cost"][alive] += formation_cost(p, env.offsets)
        pair_sum[alive] += pair_distances(p)
        steps[alive] += 1
        if ended is not None:
            alive[ended] = False
        if not alive.any():
            break
    result = {key: float((value / steps).mean()) for key, value in sums.items()}
    for k, name in enumerate(PHASES):
        result[name] = float((phase_sum[:, k] / phase_steps[:, k]).nanmean())  # 0/0 = NaN: no step in the phase
        result[STEP_SHARES[k]] = float((phase_steps[:, k] / steps).mean())
    result["pair_distances"] = [round(float(d), 3) for d in (pair_sum / steps[:, None]).mean(0)]
    result["collision_free"] = float(collision_free.mean())
    result["env_formation_error"] = float(env_error.mean())  # the tables' figure, for comparison
    return result


def run_label(run: Path) -> str:
    """'<exp name> seed <seed>' from the script's run directory name, uav_formation__<exp name>__<seed>."""
    parts = run.name.split("__")
    return f"{parts[1].removeprefix('bench_')} seed {parts[2]}" if len(parts) == 3 else run.name


def load_run(algo, run: Path, args: Args):
    summary = json.loads((run / "summary.json").read_text())
    fields = algo.Args.__dataclass_fields__
    run_args = algo.Args(**{k: v for k, v in summary["args"].items() if k in fields})
    run_args.eval_envs = args.eval_envs
    run_args.max_steps = args.max_steps or run_args.max_steps
    ref_obs = algo.make_env(run_args, "mixed", 2, 0, "cpu").reset()
    agent = algo.Agent(run_args, algo.flat_obs(ref_obs), ref_obs["state"].shape[-1], run_args.num_drones)
    agent.load_state_dict(torch.load(run / "agent.pt", map_location="cpu", weights_only=True))
    return run_args, agent.eval(), ref_obs


def load_runs(algo, runs: list[Path], args) -> list[tuple]:
    """(label, run args, agent, reference observation) for each finished run directory; refuses unfinished runs and
    two runs of the same label (name and seed)."""
    missing = [str(r) for r in runs if not ((r / "agent.pt").exists() and (r / "summary.json").exists())]
    if missing:
        raise SystemExit(f"not finished runs of algos/mappo_uav_formation.py (no agent.pt / summary.json): {missing}")
    names = [run_label(r) for r in runs]
    if len(set(names)) < len(names):
        raise SystemExit(f"two runs of the same name and seed: {names}; give each once")
    return [(name, *load_run(algo, r, args)) for name, r in zip(names, runs)]


def main(args: Args) -> None:
    algo = load_algo("mappo_uav_formation")
    bad = [p for p in args.presets if p not in algo.PRESETS]
    if bad or not args.presets:
        raise SystemExit(f"--presets takes names from {sorted(algo.PRESETS)}, got {args.presets}")
    if args.eval_envs < 1 or args.max_steps < 0:
        raise SystemExit("need --eval-envs >= 1 and --max-steps >= 0")
    runs = [Path(r) for r in args.runs]
    if not runs and not args.apf:
        raise SystemExit("nothing to fly: give --runs, or leave the APF baseline on")
    torch.set_num_threads(1)
    methods = load_runs(algo, runs, args)
    if args.apf:  # the APF flies with the first run's env settings (the default ones when APF flies alone)
        base = methods[0][1] if methods else algo.Args(eval_envs=args.eval_envs,
                                                       max_steps=args.max_steps or algo.Args.max_steps)
        ref = methods[0][3] if methods else algo.make_env(base, "mixed", 2, 0, "cpu").reset()
        methods.append(("APF", base, None, ref))
    rows = []
    with tqdm(total=len(methods) * len(args.presets), desc="episodes") as bar:
        for name, run_args, agent, ref_obs in methods:
            act = (lambda env, obs: APFController(env).act()) if agent is None else algo.policy_actions(agent)
            for preset in args.presets:
                r = fly(algo, run_args, act, preset, args.seed, ref_obs)
                rows.append({"method": name, "preset": preset,
                             **{k: round(r[k], 3) for k in (*ALIGNMENTS, "laplacian_cost", "collision_free",
                                                            "env_formation_error")},
                             "pair_distances": r["pair_distances"],
                             "pairs_m": " / ".join(f"{d:.2f}" for d in r["pair_distances"]),
                             **{k: None if np.isnan(r[k]) else round(r[k], 3) for k in PHASES},
                             **{k: round(r[k], 3) for k in STEP_SHARES},
                             "error_by_phase": " / ".join("-" if np.isnan(r[k]) else f"{r[k]:.3f}" for k in PHASES),
                             "steps_by_phase": " / ".join(f"{r[k]:.2f}" for k in STEP_SHARES)})
                bar.update()
    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.presets), figsize=(3.2 * len(args.presets), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    names = [m[0] for m in methods]
    width = 0.8 / len(ALIGNMENTS)
    for ax, preset in zip(axes, args.presets):
        for k, key in enumerate(ALIGNMENTS):
            vals = [next(r[key] for r in rows if r["method"] == n and r["preset"] == preset) for n in names]
            ax.bar(np.arange(len(names)) + (k - 1.5) * width, vals, width, label=key.replace("_", " "))
        ax.set(title=preset, xticks=range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    axes[0].set_ylabel("mean distance from slot (m)")
    axes[0].legend(fontsize=7)
    slots = algo.make_env(methods[0][1], "free", 1, 0, "cpu").offsets
    target = " / ".join(f"{d:.2f}" for d in pair_distances(slots[None])[0].tolist())
    i, j = torch.triu_indices(len(slots), len(slots), 1)
    pairs = ", ".join(f"{a}-{b}" for a, b in zip(i.tolist(), j.tolist()))
    notes = (f"{args.eval_envs} episodes per preset and method (each env's first), evaluation seed {args.seed}: "
             "every method meets the same column layouts and ball launch times (the balls' throws are drawn at "
             "launch, so they differ between methods); deterministic policies (the Gaussian's mean). Per episode, the "
             "time mean over its steps, then the mean over episodes. `formation_error`: mean distance of each drone "
             "from its slot about the centroid (m; the env's own figure, the tables', which `env_formation_error` "
             "repeats from the env); `yaw_aligned`: the same after the least-squares best rotation of the slots about "
             "the vertical; `rotation_aligned`: after the best 3-D rotation (a flat formation with two drones "
             "swapped, a mirror image, is a half turn out of its plane away: it counts here, not as shape); "
             "`shape_error`: after the best rotation and scale (what no rotation or size explains). `laplacian_cost`: "
             "the normalised-Laplacian cost the formation reward is built from (0 for any rotation or size of the "
             f"target shape). `pairs_m`: the drone pairs' mean distances, pairs {pairs} (target {target} m"
             + ("; drone 0's slot is at +x, across the flight direction +y from the other two, so pair 1-2 lies along "
                "the flight" if len(slots) == 3 else "") + "). Collision-free is over the whole episode, as in the "
             "tables. `error_by_phase`: the formation error before the first ball is thrown / while a ball is in the "
             "air / after a throw with none in the air (between throws or after the last: does the formation come "
             "back?), per episode over its steps in that phase, then the mean over the episodes with such steps "
             "('-': none; the formation reward drops to 0.2 while a ball is in the air); `steps_by_phase`: the mean share of an episode's steps "
             "in each phase (presets without balls: all before).")
    seeds = sorted({int(m[1].seed) for m in methods if m[2] is not None})
    path = write_results(args.name, "UAV formation error taken apart: rotation, size and shape",
                         ["preset", "method", *ALIGNMENTS, "laplacian_cost", "pairs_m", "collision_free",
                          "env_formation_error", "error_by_phase", "steps_by_phase"], sorted(rows, key=lambda r: args.presets.index(r["preset"])),
                         seeds=seeds or [args.seed], notes=notes, out_dir=args.out_dir, figure=fig)
    print(path.read_text())


if __name__ == "__main__":
    main(tyro.cli(Args))
