"""The UAV formation table: ours (two-stage MAPPO with curriculum and attention) vs the APF controller, no curriculum
and the MLP encoder, on the static, dynamic and mixed presets, over seeds.

Each learned row is a real run of `algos/mappo_uav_formation.py` with the paper's utility weights (`--weights paper`:
stage 1's search is its own, K-times-as-long step) at the same env-step budget; its final evaluation (512 episodes
per preset, from the same initial states for every run: formation, column layouts, ball launch times) gives
collision-free rate, formation error, arrival and success. The APF row is `common.uav_apf` from the same initial
states through the script's own `evaluate`. A ball's throw (speed, angle, aim, height) is drawn when it launches, from
the env's one random stream, which the reset of an episode that ended early also draws from: throws match between
methods only until some episode of the batch has ended, so the comparison is not paired throw for throw. Runs are resumable: finished ones
(summary.json) are read back, interrupted ones continue from their checkpoint, so rerun the same command after a kill.
Each finished run also leaves a small record in `<out-dir>/uav_formation_runs/` (its evaluation, budget, machine,
date and a hash of the code that trained it), committed with the table: a later call, on another machine, reads a
run back from its record when its run directory is gone, as long as the settings and the code are the same (else it
trains again). An hour-long run per variant and seed on 2 cores does not fit one sitting nine times; this lets the
3-seed table be filled over several.
Targets (issue 8): ours >= 90% collision-free on every preset, and better than APF and both ablations on collision-free
rate and formation error.

    python benchmarks/uav_formation.py                           # 3 seeds x 3 variants, 8.4M env steps each, in turn
    python benchmarks/uav_formation.py --workers 9 --device cuda # all at once on a GPU box
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import tyro

from benchmarks.report import RESULTS_DIR, load_algo, machine_info, pyplot, seed_interval, utc_date, write_results
from common.fsutil import atomic_write
from common.uav_apf import APFController

VARIANTS = {"ours": [], "no curriculum": ["--no-curriculum"], "MLP encoder": ["--encoder", "mlp"]}
METRICS = ("collision_free", "formation_error", "arrival", "success", "left_corridor")
CODE_FILES = ("algos/mappo_uav_formation.py", "common/uav_formation_env.py")  # what a run's result depends on
# Earlier code whose runs of the listed variants train exactly as later code's, keyed by the later code's hash: the
# records of those runs still count. Links chain: the current code reaches back through every link that lists the
# variant (so nothing carries over when the code changes without a new link). Each link was checked bit for bit
# (agent.pt and summary.json of the same toy run of each variant under both) when the code changed.
ALL_VARIANTS = tuple(VARIANTS)
SAME_TRAINING: dict[str, dict[str, tuple[str, ...]]] = {
    # 2026-12-08: bad PPO flags refused up front (--attention-dim 0, lr <= 0, gamma / lambda outside [0, 1], ...):
    # toy runs (seed 5, 16 envs; default, no curriculum, MLP encoder, state critic, top-3 release, top-3 release_slot
    # with both full-weight options, sdf9_diff, walls at 2 m, --no-lr-restart with --value-clip-centre renormalised)
    # give the same agent.pt and summary.json (but for the run directory)
    "c32d09bec51141b9": {"490c77d03544a958": ALL_VARIANTS},
    # 2026-12-07: GAE written as a function (`gae`, tested against its definition), the same operations in the same
    # order: toy runs (seed 5, 16 envs; the nine variants of the last link, and --no-lr-restart with
    # --value-clip-centre renormalised) give the same agent.pt and summary.json
    "490c77d03544a958": {"4f71e97d66c2901b": ALL_VARIANTS},
    # 2026-12-07: --value-clip-centre added (an option, the default as before): toy runs (seed 5, 16 envs; default, no
    # curriculum, MLP encoder, state critic, top-3 release, top-3 release_slot with both full-weight options,
    # sdf9_diff, walls at 2 m, --no-lr-restart) give the same agent.pt and summary.json (but for the new argument)
    "4f71e97d66c2901b": {"db03b464bd45872e": ALL_VARIANTS},
    # 2026-12-07: the script's docstrings made precise (stage 1's "same initial states", Adam's moments carry over a
    # restart): toy runs (seed 5, 16 envs; default, no curriculum, MLP encoder, state critic, top-3 release, top-3
    # release_slot with both full-weight options, sdf9_diff, walls at 2 m, --no-lr-restart) give the same agent.pt and
    # summary.json (but for the run directory)
    "db03b464bd45872e": {"fd68d94669a5dc67": ALL_VARIANTS},
    # 2026-12-07: no link to 85c35d409d015afd: the update changed (the lr decay restarts each curriculum period, the
    # value clip centres on the critic's rollout output, one gradient-norm clip per network), so every run trains again
    # 2026-12-05: the slot term's denominator computed once (--full-slot-reward wrote it out twice) and a period's
    # checkpoint written from the bytes just saved: toy runs (seed 5, 16 envs; the thirteen variants of the last link)
    # give the same agent.pt, summary.json and period checkpoints
    "85c35d409d015afd": {"f1378ef5a21a2e26": ALL_VARIANTS},
    # 2026-12-04: each curriculum period's checkpoint also kept (checkpoint_after_period<k>_<preset>.pt): toy runs (seed
    # 5, 16 envs; the twelve variants of the last link, and top-3 slot with both full-weight options) give the same
    # agent.pt and summary.json
    "f1378ef5a21a2e26": {"b3805de146364bd0": ALL_VARIANTS},
    # 2026-12-04: --full-slot-reward added (an option, off by default): toy runs (seed 5, 16 envs; the twelve variants
    # of the last link) give the same agent.pt and summary.json (but for the new argument)
    "b3805de146364bd0": {"93408ff5a050f032": ALL_VARIANTS},
    # 2026-12-04: the forward reward's height term computed once (it was written out twice with --full-height-reward):
    # toy runs (seed 5, 16 envs; the eleven variants of the last link and the same top-3 slot run with
    # --full-height-reward) give the same agent.pt and summary.json (but for the run directory)
    "93408ff5a050f032": {"11a86324a4205fa3": ALL_VARIANTS},
    # 2026-12-04: --full-height-reward added (an option, off by default): toy runs (seed 5, 16 envs; the ten variants
    # of the last link and tokens top-3 with --relative-self-pos and release_slot) give the same agent.pt and
    # summary.json (but for the new argument)
    "11a86324a4205fa3": {"24effe8ff7ece593": ALL_VARIANTS},
    # 2026-12-04: --formation-reward release_slot added (an option, off by default): toy runs (seed 5, 16 envs; the
    # nine variants of the last link, and tokens top-3 with --relative-self-pos and the release reward) give the same
    # agent.pt and summary.json (but for the run directory)
    "24effe8ff7ece593": {"b28bbbfd2dae0fb5": ALL_VARIANTS},
    # 2026-12-03: --static-top-k added (column tokens: only the k nearest; off by default): toy runs (seed 5, 16 envs;
    # ours with and without --relative-self-pos and walls at 2 m, no curriculum, MLP encoder, sdf9_diff with and
    # without the release reward, tokens) give the same agent.pt and summary.json (but for the new argument)
    "b28bbbfd2dae0fb5": {"de66b3637e3501eb": ALL_VARIANTS},
    # 2026-12-03: --formation-reward release added (an option, off by default): toy runs (seed 5, 16 envs; ours with
    # and without --relative-self-pos and walls at 2 m, no curriculum, MLP encoder, sdf9_diff) give the same agent.pt
    # and summary.json (but for the new argument)
    "de66b3637e3501eb": {"7de355bc55f5751c": ALL_VARIANTS},
    # 2026-12-03: --static-mode sdf9_diff added (an option, off by default): toy runs (seed 5, 16 envs; ours with and
    # without --relative-self-pos and walls at 2 m, no curriculum, MLP encoder) give the same agent.pt and summary.json
    # as under 7b597be301c5f5b1, whose list carries over. 2026-12-02: --relative-self-pos allowed with walls (y only;
    # it was refused), so nothing that trained changed: ours, no curriculum, MLP encoder without walls and ours with
    # walls at 2 m gave the same agent.pt as under 89f95a27ab46646e (toy runs, seed 5, 16 envs); the hashes that code
    # listed carry over ... and the evaluation reports what ended the episodes (END_CAUSES): the same agent.pt again,
    # and the same figures for the keys both summaries have; and the env names those events once (END_CAUSES): the
    # same agent.pt and summary.json as 120479840ef58a95
    "7de355bc55f5751c": {"7b597be301c5f5b1": ALL_VARIANTS, "120479840ef58a95": ALL_VARIANTS,
                         "b8e59761a40ffd0e": ALL_VARIANTS, "89f95a27ab46646e": ALL_VARIANTS,
                         "06fedef55f9ca7bd": ALL_VARIANTS, "3f1c1327f0f08414": ("ours", "no curriculum")},
}


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """training seeds of every learned variant"""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """learned variants to train (ours, 'no curriculum', 'MLP encoder')"""
    frames: str = "0.4,4,4"
    """million env steps per curriculum period free,static,mixed (no curriculum trains on mixed for the sum);
    8.4M in all, about an hour per run on 2 cores"""
    num_envs: int = 256
    """parallel envs per run (the paper trains 1024; at this budget that leaves the free period 6 PPO iterations,
    so the CPU default is 256)"""
    eval_envs: int = 512
    """evaluation episodes per preset (the release evaluates 2 x its envs)"""
    dynamics: str = "ctbr"
    """ctbr (paper) or pointmass"""
    corridor_walls: float = 0.0
    """side walls at |x| = this (m) in training and evaluation, APF included (0: none, as released; 2.0 is the spec's
    4 m corridor)"""
    relative_self_pos: bool = False
    """the learned variants' self token: x, y relative to the formation centroid (with walls only y), instead of
    absolute (released)"""
    static_mode: str = "sdf9"
    """the learned variants' column observation: sdf9 (released), sdf9_diff (the same nine distances re-encoded:
    the drone's own and the neighbours' differences from it / 0.1) or tokens (one per column)"""
    static_top_k: int = 0
    """with --static-mode tokens: the learned variants see only the k nearest columns in range (0: all)"""
    formation_reward: str = "simple"
    """the learned variants' formation reward: simple (size + 1/(1 + normalised Laplacian cost)), release (the
    released code's rescaled terms, with the un-normalised Laplacian cost) or release_slot (the release plus a
    per-drone term for the distance from its slot: a departure)"""
    full_height_reward: bool = False
    """the learned variants keep the forward reward's height term at full weight while a ball flies (released: 0.2
    of it): a departure"""
    full_slot_reward: bool = False
    """with release_slot: the learned variants keep the slot term at full weight while a ball flies (else 0.2 of it):
    a departure"""
    lr_restart: bool = True
    """the learned variants start the lr decay again at each curriculum period (the script's default, as the paper's
    new run per period); --no-lr-restart: one decay across the curriculum"""
    value_clip_centre: str = "rollout"
    """the learned variants' value-clip centre (the script's --value-clip-centre): rollout (its default) or
    renormalised (the update before 2026-12-07)"""
    device: str = "cpu"
    """cpu or cuda: where the runs train"""
    workers: int = 1
    """runs trained at the same time"""
    threads: int = 2
    """torch threads per run"""
    run_dir: str = "runs/bench_uav"
    """where the runs (checkpoints, logs, summaries) go"""
    out_dir: str = str(RESULTS_DIR)
    """where the result files go (and the run records, in uav_formation_runs/)"""
    name: str = "uav_formation"
    """result files: <out-dir>/<name>.{md,json,png} (e.g. a table of fewer variants than the full one)"""
    records: bool = True
    """read runs back from their records when their run directory is gone (same settings and code), and write
    records of finished runs"""
    apf_only: bool = False
    """evaluate the APF controller alone (no learned runs; --variants and --seeds are ignored): its rows on the same
    evaluation episodes as every table's, e.g. to set beside a committed table after the controller changed"""


EVAL_SEED = 20_000  # the seed of the script's final evaluation (its evaluate calls): every method, APF too, flies
# the same initial states


def run_name(variant: str) -> str:
    return "bench_" + variant.replace(" ", "_").lower()


# The learned variants' env and training options passed on to the script: (Args field, default, run-directory
# suffix, formatted with the value). A set one is a setting of its own (record, run directory, the script's flag); one
# at its default adds nothing, so the records of runs from before it existed keep their names.
LEARNED_OPTIONS = (("relative_self_pos", False, "_relpos"), ("static_mode", "sdf9", "_{}"),
                   ("static_top_k", 0, "_top{}"), ("formation_reward", "simple", "_{}_form"),
                   ("full_height_reward", False, "_fullheight"), ("full_slot_reward", False, "_fullslot"),
                   ("lr_restart", True, "_nolrrestart"), ("value_clip_centre", "rollout", "_vclip{}"))


def set_options(args: Args) -> dict:
    """The LEARNED_OPTIONS that differ from their defaults, by field name."""
    return {name: getattr(args, name) for name, default, _ in LEARNED_OPTIONS if getattr(args, name) != default}


def exp_name(args: Args, variant: str) -> str:
    """The script's --exp-name, so its run directory: runs with walls (or any set LEARNED_OPTIONS) get their own,
    beside those without."""
    chosen = set_options(args)
    return (run_name(variant) + (f"_walls{args.corridor_walls:g}" if args.corridor_walls else "")
            + "".join(suffix.format(chosen[name]) for name, _, suffix in LEARNED_OPTIONS if name in chosen))


def run_settings(args: Args) -> dict:
    """What a finished or interrupted run must share with this call to be reused."""
    settings = {"frames": args.frames, "num_envs": args.num_envs, "eval_envs": args.eval_envs,
                "dynamics": args.dynamics}
    if args.corridor_walls:  # only when set: the records of runs without walls keep their names
        settings["corridor_walls"] = args.corridor_walls
    return {**settings, **set_options(args)}  # the same


def code_hash() -> str:
    digest = hashlib.sha256()
    for name in CODE_FILES:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


def same_training_codes(variant: str) -> tuple[str, ...]:
    """The current code's hash and those of earlier code that trains `variant` the same: SAME_TRAINING's links
    followed back from the current code, each listing `variant`."""
    current = code_hash()
    codes, todo = [current], [current]
    while todo:
        for old, variants in SAME_TRAINING.get(todo.pop(), {}).items():
            if variant in variants and old not in codes:
                codes.append(old)
                todo.append(old)
    return tuple(codes)


def record_path(args: Args, variant: str, seed: int) -> Path:
    """One file per variant, seed and settings (a run of another budget is another record)."""
    tag = hashlib.sha256(json.dumps(run_settings(args), sort_keys=True).encode()).hexdigest()[:8]
    return Path(args.out_dir) / "uav_formation_runs" / f"{run_name(variant)}__{seed}__{tag}.json"


def load_record(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text())
        rec["settings"], rec["code"], rec["eval"], rec["env_steps"], rec["train_seconds"], rec["date"]
        return rec
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path} is not a readable run record ({exc!r}): delete it to train that run again")


def read_record(args: Args, variant: str, seed: int) -> dict | None:
    """The record of this run if it was made by the same code with the same settings, else None."""
    path = record_path(args, variant, seed)
    if not args.records or not path.exists():
        return None
    rec = load_record(path)
    if rec["settings"] != run_settings(args) or rec["code"] not in same_training_codes(variant):
        print(f"[{variant} seed {seed}] {path.name} came from other code or settings: training again", flush=True)
        return None
    return rec


def write_record(args: Args, variant: str, seed: int, run: Path, out: dict) -> dict | None:
    """Record a finished run, once, with the hash of the code it started with (bench_code.json in its directory).
    Returns the run's record (the one written now, or an earlier call's), or None where it has none."""
    path = record_path(args, variant, seed)
    started = run / "bench_code.json"
    if not args.records or not started.exists():
        return None  # a run from before records existed: which code trained it is not known
    code = json.loads(started.read_text())["code"]
    if path.exists() and (earlier := load_record(path))["code"] == code:
        return earlier
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"variant": variant, "seed": seed, "settings": run_settings(args), "code": code,
           "code_files": list(CODE_FILES), "eval": out["eval"], "env_steps": out["env_steps"],
           "weights": out.get("weights"), "train_seconds": out["train_seconds"], "threads": args.threads,
           "workers": args.workers, "device": args.device, "machine": machine_info(),
           "date": utc_date((run / "summary.json").stat().st_mtime)}
    atomic_write(path, json.dumps(rec, indent=1) + "\n")
    return rec


def train_one(args: Args, variant: str, seed: int) -> dict:
    """Train (or resume, or read back from its run directory or its record) one run; returns its summary plus
    wall time and where it came from."""
    run = Path(args.run_dir).resolve() / f"uav_formation__{exp_name(args, variant)}__{seed}"
    summary, timing, settings = run / "summary.json", run / "bench_time.json", run / "bench_settings.json"
    want = run_settings(args)
    if not run.exists():
        rec = read_record(args, variant, seed)
        if rec is not None:
            print(f"[{variant} seed {seed}] read back from {record_path(args, variant, seed).name} (trained "
                  f"{rec['date']} on {rec['machine']['cpu']})", flush=True)
            return rec
    if settings.exists() or summary.exists():
        have = json.loads(settings.read_text()) if settings.exists() else \
            {k: json.loads(summary.read_text())["args"][k] for k in want}
        if have != want:
            raise SystemExit(f"{run} was trained with {have}, not {want}: pick another --run-dir (or delete it)")
    if not summary.exists():
        run.mkdir(parents=True, exist_ok=True)
        atomic_write(settings, json.dumps(want))
        started = run / "bench_code.json"
        if not (run / "checkpoint.pt").exists():  # a fresh start: the code its record will name
            atomic_write(started, json.dumps({"code": code_hash()}))
        elif started.exists() and json.loads(started.read_text())["code"] not in same_training_codes(variant):
            print(f"[{variant} seed {seed}] the code changed since this run started: it resumes, but gets no record",
                  flush=True)
            started.unlink()
        cmd = [sys.executable, str(ROOT / "algos" / "mappo_uav_formation.py"), "--weights", "paper",
               "--frames", args.frames, "--num-envs", str(args.num_envs), "--eval-envs", str(args.eval_envs),
               "--dynamics", args.dynamics, "--corridor-walls", str(args.corridor_walls), "--seed", str(seed),
               "--exp-name", exp_name(args, variant), "--run-dir", str(run.parent),
               "--torch-threads", str(args.threads), *VARIANTS[variant]]
        for name, value in set_options(args).items():
            flag = "--" + name.replace("_", "-")
            cmd += [flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)]
        if args.device == "cpu":
            cmd.append("--no-cuda")
        if (run / "checkpoint.pt").exists():
            cmd.append("--resume")
        before = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
        start = time.time()
        # an interrupted run's time counts too: written every minute (a kill -9 of this process loses at most that)
        # and when the run ends or is interrupted
        save_time = lambda: atomic_write(timing, json.dumps({"seconds": before + time.time() - start}))
        done = threading.Event()

        def tick():
            while not done.wait(60):
                save_time()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            with open(run / "bench.log", "a") as log:
                print(f"[{variant} seed {seed}] {' '.join(cmd[1:])}", flush=True)
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            done.set()
            ticker.join()
            save_time()
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} seed {seed} failed (exit {proc.returncode}); see {run / 'bench.log'}")
    out = json.loads(summary.read_text())
    out["train_seconds"] = json.loads(timing.read_text())["seconds"] if timing.exists() else float("nan")
    rec = write_record(args, variant, seed, run, out)
    if rec is not None:
        where = {k: rec[k] for k in ("machine", "threads", "workers")}  # as it trained (maybe under an earlier call)
    else:
        where = {"machine": machine_info(), "threads": args.threads, "workers": args.workers}  # this call's
    out.update(date=utc_date(summary.stat().st_mtime), **where)
    print(f"[{variant} seed {seed}] " + ", ".join(f"{p}: cf {r['collision_free']:.2f} fe {r['formation_error']:.2f}"
                                                   for p, r in out["eval"].items()), flush=True)
    return out


def sd(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_ci(values: list[float]) -> str:
    """mean ± half-width of its 95% t-interval over the seeds"""
    return f"{np.mean(values):.3f} ± {seed_interval(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(args: Args) -> None:
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.variants, args.seeds = list(dict.fromkeys(args.variants)), list(dict.fromkeys(args.seeds))
    if args.apf_only:
        args.variants, args.seeds = [], [EVAL_SEED]
    elif not args.variants or not args.seeds:
        raise SystemExit("give at least one --variants and one --seeds")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name) or args.name.startswith("."):
        raise SystemExit(f"--name {args.name!r}: use letters, digits, '_', '-' and '.' (a file name, no path)")
    mu = load_algo("mappo_uav_formation")
    targs = mu.Args(eval_envs=args.eval_envs, dynamics=args.dynamics, corridor_walls=args.corridor_walls,
                    **{name: getattr(args, name) for name, _, _ in LEARNED_OPTIONS})
    try:  # the env's own checks (e.g. walls the formation would spawn across), before any run starts
        mu.make_env(targs, "free", 1, 0, "cpu")
    except ValueError as exc:
        raise SystemExit(f"bad env settings: {exc}") from None
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        results = dict(zip(jobs, pool.map(lambda job: train_one(args, *job), jobs)))
    presets = list(next(iter(results.values()))["eval"]) if results else targs.eval_presets.split(",")

    # the APF controller on the same evaluation episodes (the script's evaluate, seed 20000)
    device = torch.device("cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu")
    ref_obs = mu.make_env(targs, "mixed", 2, 0, device).reset()
    apf = {p: mu.evaluate(lambda env, obs: APFController(env).act(), targs, p, mu.PAPER_WEIGHTS, ref_obs, device,
                          seed=EVAL_SEED) for p in presets}

    rows, per_method = [], {}
    for preset in presets:
        evals = {"APF": [apf[preset]], **{v: [results[(v, s)]["eval"][preset] for s in args.seeds]
                                          for v in args.variants}}
        per_method[preset] = {method: {m: [e[m] for e in ev] for m in METRICS} for method, ev in evals.items()}
        for method, vals in per_method[preset].items():
            row = {"preset": preset, "method": method}
            row.update({m: mean_ci(vals[m]) for m in METRICS})
            row.update({f"{m}_mean": float(np.mean(vals[m])) for m in METRICS})
            row.update({f"{m}_sd": sd(vals[m]) for m in METRICS})
            row.update({f"{m}_ci95": seed_interval(vals[m]) for m in METRICS})
            row.update({f"{m}_per_seed": vals[m] for m in METRICS})
            # what ended the episodes: the share of episodes each event ended (records before 2026-12-02 lack it)
            if all(c in e for e in evals[method] for c in mu.END_CAUSES):
                ends = {c: float(np.mean([e[c] for e in evals[method]])) for c in mu.END_CAUSES}
                row["ended_by"] = ", ".join(f"{c} {v:.2f}" for c, v in ends.items() if v > 0) or "-"
                row.update({f"ended_{c}_mean": v for c, v in ends.items()})
            else:
                row["ended_by"] = "n/a"
            if method != "APF":
                runs = [results[(method, s)] for s in args.seeds]
                row["env_steps_M"] = float(np.mean([r["env_steps"] for r in runs]) / 1e6)
                row["train_min"] = float(np.mean([r["train_seconds"] for r in runs]) / 60)
            rows.append(row)

    checks = []
    for preset in presets:
        ours = per_method[preset].get("ours")
        if ours is None:
            continue
        cf, fe = np.mean(ours["collision_free"]), np.mean(ours["formation_error"])
        verdicts = []
        for m in (m for m in per_method[preset] if m != "ours"):
            m_cf = np.mean(per_method[preset][m]["collision_free"])
            m_fe = np.mean(per_method[preset][m]["formation_error"])
            lost = ([f"collision-free {cf:.2f} vs {m_cf:.2f}"] if not (cf > m_cf or cf == 1.0) else []) + \
                   ([f"formation error {fe:.2f} vs {m_fe:.2f} m"] if not fe < m_fe else [])
            verdicts.append(f"beats {m} on both" if not lost else f"not {m} ({', '.join(lost)})")
        checks.append(f"{preset}: ours collision-free {cf:.2f} ({'meets' if cf >= 0.9 else 'misses'} >= 0.90); "
                      + "; ".join(verdicts))

    plt = pyplot()
    methods = list(per_method[presets[0]])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(methods)
    for j, (metric, label) in enumerate((("collision_free", "collision-free rate"),
                                         ("formation_error", "formation error (m)"))):
        for i, method in enumerate(methods):
            vals = [per_method[p][method][metric] for p in presets]
            axes[j].bar(np.arange(len(presets)) + i * width, [np.mean(v) for v in vals], width,
                        yerr=[seed_interval(v) for v in vals], label=method, capsize=2)
        axes[j].set_xticks(np.arange(len(presets)) + width * (len(methods) - 1) / 2, presets)
        axes[j].set_ylabel(label)
    axes[0].axhline(0.9, ls="--", c="gray")
    axes[0].legend(fontsize=7)
    frames = [float(x) for x in args.frames.split(",")]
    notes = (f"Budget per learned run: {sum(frames):g} M env steps (curriculum free/static/mixed = {args.frames} M; "
             f"no curriculum: all on mixed), {args.num_envs} envs, the paper's PPO settings and utility weights "
             f"(w = {mu.PAPER_WEIGHTS}), {args.dynamics} dynamics, trained on {args.device}. Paper budget: "
             f"315 M env steps. Evaluation: {args.eval_envs} episodes per preset (900 steps, 18 s), from the same initial "
             "states for every method (the balls' throws are drawn at launch, so they differ once an episode of the "
             "batch has ended early); values are mean ± the half-width of its 95% t-interval over the training seeds (the "
             "json also has the sample sd; APF is deterministic: one evaluation). "
             "Collision-free: no crash, no drone pair closer than 0.15 m, no hit over the whole episode; formation "
             "error: time-mean distance from the formation slots (m); success: collision-free, arrived and formation "
             "error < 0.3 m; left_corridor: the formation's centroid went past |x| = 2 m, the edge of the column "
             "field, at some step (round the columns rather than through them"
             + (f"; side walls at |x| = {args.corridor_walls:g} m end an episode that touches them, APF repelled by "
                "them too)" if args.corridor_walls else "; nothing in the env stops it)")
             + "; ended_by: the share of episodes that each event ended (crash: out of the 0.2-2.8 m height band; "
             "too_close: a drone pair closer than 0.15 m; a column, ball or wall hit; several can end one episode; "
             "n/a: a record from before the evaluation reported it)"
             + (". The learned variants' self token holds " + ("y" if args.corridor_walls else "x, y")
                + " relative to the formation centroid (--relative-self-pos)" if args.relative_self_pos else "")
             + ({"sdf9_diff": ". The learned variants see the columns as the nine distances re-encoded: the "
                              "drone's own, then each neighbour's difference from it / 0.1 (--static-mode sdf9_diff)",
                 "tokens": ". The learned variants see " + (f"the {args.static_top_k} nearest columns" if
                                                             args.static_top_k else "each column")
                           + " within range as a token of its own (--static-mode tokens"
                           + (f" --static-top-k {args.static_top_k})" if args.static_top_k else ")")}.get(
                 args.static_mode, ""))
             + (". The learned variants train on the released code's formation reward (--formation-reward release: "
                "the size term plus 1/(1 + un-normalised Laplacian cost), a sharp normalised-Laplacian term, the size "
                "terms again at 0.2 once every ball has flown" + (
                    "; plus, a departure, each drone's 5 c / (1 + (distance from its slot about the centroid / 0.2 m)"
                    "^2), c = 0.2 while a ball flies, else 1: every release term is blind to a turn of the formation, "
                    "which the formation error counts; --formation-reward release_slot" if args.formation_reward ==
                    "release_slot" else "") + ")" if args.formation_reward != "simple" else "")
             + (". The learned variants keep the forward reward's height term, 5 clip(1 - |z - 1.5 m|, 0), at full "
                "weight while a ball flies (released: 0.2 of it; a departure, --full-height-reward)"
                if args.full_height_reward else "")
             + (". The learned variants keep the slot term at full weight while a ball flies (c = 1 for it; a "
                "departure, --full-slot-reward): a rigid shift of the formation is a free dodge, a drone leaving its "
                "slot is not" if args.full_slot_reward else "")
             + (". The learned variants decay the lr once across the curriculum (--no-lr-restart; the script's "
                "default, as the paper, starts the decay again at each period)" if not args.lr_restart else "")
             + (". The learned variants' value clip centres on the rollout value re-expressed in the value "
                "normalisation just updated (--value-clip-centre renormalised, the update before 2026-12-07; the "
                "script's default centres on the critic's output at rollout time, as the release's MAPPO)"
                if args.value_clip_centre != "rollout" else "")
             + ".\n\n"
             + ("Where each run trained (`train_min` is its wall time there): "
                + "; ".join(f"{v} seed {s}: {r['date']}, {r['machine']['cpu']}, {r['threads']} thread(s), "
                            f"{r['workers']} run(s) at a time" for (v, s), r in results.items())
                + ".\n\nTargets:\n" + "\n".join(f"- {c}" for c in checks) if results else ""))
    if args.apf_only:
        notes = (f"The APF controller alone (`--apf-only`; `Seeds` is the evaluation's seed, {EVAL_SEED}, not a "
                 "training seed), on the evaluation episodes of the tables with these settings; the budget and the "
                 "learned variants' settings below describe those tables' runs, none of which ran here. " + notes)
    cols = ["preset", "method", *METRICS, "ended_by", "env_steps_M", "train_min"]
    title = "Multi-UAV formation: the APF controller" if args.apf_only else "Multi-UAV formation: ours vs APF and ablations"
    write_results(args.name, title, cols, rows, seeds=args.seeds,
                  notes=notes, out_dir=args.out_dir, figure=fig)
    print("\n".join(checks))


if __name__ == "__main__":
    main(tyro.cli(Args))
