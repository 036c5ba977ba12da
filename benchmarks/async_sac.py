"""USER's real-world system at CPU scale: async vs sync SAC / RLPD on sim robots, learning curves, kill-and-resume.

Every figure is a real run of `algos/async_sac_real.py` (subprocesses on loopback, sim robots paced like real ones).
- profile: the same robots and settings in `--mode async` and `--mode sync` for the same wall-clock budget; generation
  seconds per episode (wall-clock per finished episode per robot: a sync robot also waits while the learner trains),
  learner seconds per update (wall-clock per critic update), the actors' achieved control rate vs its target, and the
  async / sync ratios (USER's profiling table).
- learn: success (deterministic eval episodes of the actors) against wall-clock, state and image observations, per
  seed; final success = the eval episodes of the last `--final-window` minutes.
- resume: learner and actors as separate processes; `kill -9` of the learner mid-run, restart with `--resume`; time
  until the learner stores and trains again, and transitions lost (holes in the actors' acknowledged sequence ids).

    python benchmarks/async_sac.py --parts profile resume           # async_sac_profile.*, async_sac_resume.*
    python benchmarks/async_sac.py --parts learn --learn-obs state  # async_sac_learning_state.* (3 seeds)
    python benchmarks/async_sac.py --parts learn --learn-obs rgb    # async_sac_learning_rgb.*
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import tyro

from benchmarks.report import RESULTS_DIR, free_port, pyplot, write_results
from common.fsutil import atomic_write

SCRIPT = str(ROOT / "algos" / "async_sac_real.py")


@dataclass
class Args:
    parts: list[str] = field(default_factory=lambda: ["profile", "learn", "resume"])
    """which parts to run: profile, learn, resume"""
    task: str = "PushCube"
    """sim task (a scripted expert provides the demo episodes)"""
    robot_options: str = "control_hz=10,reward_mode=normalized_dense"
    """robot_io options of the sim robot for every part"""
    num_robots: int = 2
    """robots (actor processes) in the profile and resume parts"""
    profile_minutes: float = 3.0
    """wall-clock per mode in the profile"""
    profile_flags: list[str] = field(default_factory=lambda: ["--sync-steps", "200"])
    """flags of every profile run"""
    profile_async_utd: float = 0.0
    """UTD cap of the async profile run (0: none; USER's learner trains continuously while robots act)"""
    profile_sync_utd: list[float] = field(default_factory=lambda: [0.5, 1.0, 3.0])
    """sync baselines: critic updates per collected transition, each phase (USER's sync SAC implies ~0.2)"""
    learn_minutes: float = 12.0
    """wall-clock per learning run"""
    learn_obs: list[str] = field(default_factory=lambda: ["state"])
    """observation modes of the learning runs (the results file is named after them)"""
    learn_robot_options: str = "control_hz=50,reward_mode=normalized_dense,control_mode=pd_ee_delta_pos"
    """robot options of the learning runs (paced at 50 Hz; end-effector position control, as the scripted expert)"""
    learn_flags: list[str] = field(default_factory=lambda: [
        "--gamma", "0.8", "--max-episode-steps", "50", "--bootstrap-terminal", "--num-q", "2", "--critic-actor-ratio",
        "1", "--utd", "2"])
    """SAC flags of the learning runs (ManiSkill's SAC recipe for PushCube: short horizon, gamma 0.8, bootstrap at
    success; a 2-head ensemble and an actor update per critic update, so the 1-core CPU learner makes ~35 actor
    updates/s)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds of the learning runs"""
    final_window: float = 4.0
    """minutes at the end whose eval episodes give the final success"""
    resume_kill_after: float = 75.0
    """seconds of running before the learner is killed"""
    sac_flags: list[str] = field(default_factory=lambda: ["--hidden", "128"])
    """extra flags for the profile and resume runs"""
    run_dir: str = "runs/bench_async_sac"
    """where the runs go (replaced per part)"""
    out_dir: str = str(RESULTS_DIR)
    """where the result files go"""


def scalars(run_dir: Path) -> dict[str, list[tuple[float, float, float]]]:
    """tag -> [(wall_time, step, value)]"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_script(flags: list[str], timeout: float) -> str:
    out = subprocess.run([sys.executable, SCRIPT, *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"async_sac_real.py {' '.join(flags)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def only_run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.name != "actor_spool"]
    return run_dir


def profile(args: Args, root: Path) -> tuple[list[dict], dict]:
    rows, raw = [], {}
    robot = f"sim:{args.task},{args.robot_options}"
    target_hz = float(next((o.split("=")[1] for o in args.robot_options.split(",") if o.startswith("control_hz")), 0))
    runs = [("async", args.profile_async_utd)] + [("sync", utd) for utd in args.profile_sync_utd]
    for mode, utd in runs:
        out = root / f"profile_{mode}_utd{utd:g}"
        run_script(["--mode", mode, "--utd", str(utd), "--robot", robot, "--num-robots", str(args.num_robots),
                    "--run-dir", str(out), "--total-minutes", str(args.profile_minutes), "--total-env-steps",
                    "10000000", "--port", str(free_port()), *args.sac_flags, *args.profile_flags],
                   timeout=args.profile_minutes * 60 + 600)
        run_dir = only_run_dir(out)
        summary = json.loads((run_dir / "summary.json").read_text())
        logs = scalars(run_dir)
        seconds = summary["minutes"] * 60
        hz = [v for _, _, v in logs.get("actor/control_hz", [])[1:] if v > 0]
        row = {"mode": mode, "UTD setting": "no cap" if utd == 0 else f"{utd:g}",
               "UTD achieved": summary["updates"] / max(summary["transitions"], 1),
               "minutes": summary["minutes"], "transitions": summary["transitions"],
               "episodes": summary["episodes"], "updates": summary["updates"],
               "generation s/episode": seconds * args.num_robots / max(summary["episodes"], 1),
               "learner s/update": seconds / max(summary["updates"], 1),
               "control Hz (median)": float(np.median(hz)) if hz else None,
               "control rate error %": abs(np.median(hz) - target_hz) / target_hz * 100 if hz and target_hz else None}
        rows.append(row)
        raw[f"{mode}_utd{utd:g}"] = {"summary": {k: v for k, v in summary.items() if k != "args"}, "row": row}
    a = rows[0]
    for s in rows[1:]:
        rows.append({"mode": f"speed-up: async / sync at UTD {s['UTD setting']}",
                     "generation s/episode": s["generation s/episode"] / a["generation s/episode"],
                     "learner s/update": s["learner s/update"] / a["learner s/update"]})
    return rows, raw


def learn(args: Args, root: Path) -> tuple[list[dict], dict, dict]:
    rows, curves, raw = [], {}, {}
    for obs in args.learn_obs:
        finals = []
        for seed in args.seeds:
            out = root / f"learn_{obs}_{seed}"
            robot = f"sim:{args.task},obs_mode={obs},{args.learn_robot_options}"
            run_script(["--robot", robot, "--seed", str(seed), "--run-dir", str(out), "--total-minutes",
                        str(args.learn_minutes), "--total-env-steps", "10000000", "--port", str(free_port()),
                        *args.learn_flags], timeout=args.learn_minutes * 60 + 900)
            run_dir = only_run_dir(out)
            logs = scalars(run_dir)
            evals = logs.get("eval/success_rate", [])
            counts = [v for _, _, v in logs.get("eval/episodes", [])]
            counts = counts if len(counts) == len(evals) else [1.0] * len(evals)
            t0 = min(t for series in logs.values() for t, _, _ in series)
            curve = [((t - t0) / 60, v) for t, _, v in evals]
            curves[f"{obs} seed {seed}"] = curve
            end = max((m for m, _ in curve), default=0.0)
            window = [(v, n) for (m, v), n in zip(curve, counts) if m >= end - args.final_window]
            episodes = int(sum(n for _, n in window))
            final = float(sum(v * n for v, n in window) / episodes) if episodes else 0.0
            finals.append(final)
            summary = json.loads((run_dir / "summary.json").read_text())
            raw[f"{obs}_{seed}"] = {"final_success": final, "curve": curve,
                                    "summary": {k: v for k, v in summary.items() if k != "args"}}
            rows.append({"observations": obs, "seed": seed, "minutes": summary["minutes"],
                         "transitions": summary["transitions"], "updates": summary["updates"],
                         f"eval success, last {args.final_window:g} min": final, "eval episodes": episodes})
        rows.append({"observations": obs, "seed": "mean", f"eval success, last {args.final_window:g} min":
                     float(np.mean(finals))})
    return rows, curves, raw


def stored_seqs(run_dir: Path) -> dict[str, list[int]]:
    """Acknowledged (session, seq) ids per actor session: policy segments in buffer/, interventions in demo_buffer/
    (their copies in buffer/ carry no id)."""
    seqs: dict[str, list[int]] = {}
    for name in ("buffer", "demo_buffer"):
        index = run_dir / name / "index.jsonl"
        for line in index.read_text().splitlines() if index.exists() else []:
            meta = json.loads(line)["meta"]
            if "session" in meta:
                seqs.setdefault(meta["session"], []).append(meta["seq"])
    return seqs


def resume(args: Args, root: Path) -> tuple[list[dict], dict]:
    port = free_port()
    robot = f"sim:{args.task},{args.robot_options}"
    common = ["--robot", robot, "--run-dir", str(root), "--port", str(port), "--num-robots", str(args.num_robots),
              *args.sac_flags]
    learner = subprocess.Popen([sys.executable, SCRIPT, "--role", "learner", "--total-env-steps", "10000000", *common],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    actors = [subprocess.Popen([sys.executable, SCRIPT, "--role", "actor", "--robot-index", str(i), *common], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
              for i in range(args.num_robots)]
    try:
        time.sleep(args.resume_kill_after)
        run_dir = only_run_dir(root)
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        killed_at = time.time()
        before = stored_seqs(run_dir)
        n_before = sum(map(len, before.values()))
        time.sleep(5.0)  # an outage: the actors keep acting and hold what they cannot send
        restart = time.time()
        proc = subprocess.Popen([sys.executable, SCRIPT, "--resume", str(run_dir), "--role", "learner",
                                 "--total-minutes", "100000"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        first_store = first_update = None
        updates_before = None
        deadline = time.time() + 300
        for line in proc.stdout:
            now = time.time()
            if line.startswith("resumed"):
                updates_before = int(line.split(":")[1].split()[0])
            if line.startswith("[learner] first update"):
                first_update = now
            if first_store is None and sum(map(len, stored_seqs(run_dir).values())) > n_before:
                first_store = now
            if (first_update and first_store) or now > deadline:
                break
        time.sleep(10.0)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        after = stored_seqs(run_dir)
    finally:
        for actor in actors:
            os.killpg(actor.pid, signal.SIGKILL)
        if learner.poll() is None:
            learner.kill()
    kept = all(set(seqs) <= set(after.get(s, [])) for s, seqs in before.items())
    holes = sum(max(seqs) + 1 - len(set(seqs)) for seqs in after.values())
    duplicates = sum(len(seqs) - len(set(seqs)) for seqs in after.values())
    row = {"outage (s)": restart - killed_at, "restart -> stores again (s)": (first_store or np.nan) - restart,
           "restart -> trains again (s)": (first_update or np.nan) - restart, "updates at restart": updates_before,
           "segments before kill": n_before, "segments after": sum(map(len, after.values())),
           "durable segments kept": kept, "transitions lost (holes)": holes, "duplicates": duplicates}
    return [row], row


def add_raw(path: Path, raw: dict) -> None:
    """The per-run details next to the table's figures in <name>.json."""
    data = json.loads(path.read_text())
    data["raw"] = raw
    atomic_write(path, json.dumps(data, indent=1, default=float) + "\n")


def main(args: Args) -> None:
    root = ROOT / args.run_dir
    out_dir = Path(args.out_dir)
    unknown = [part for part in args.parts if part not in ("profile", "learn", "resume")]
    if unknown or not args.parts:  # all checked before any part's directory is cleared
        raise SystemExit(f"unknown parts {unknown}; choose from profile, learn, resume" if unknown else
                         "--parts: give at least one of profile, learn, resume")
    for part in args.parts:
        part_root = root / (part if part != "learn" else "learn_" + "_".join(args.learn_obs))
        if part_root.exists():
            import shutil

            shutil.rmtree(part_root)
        part_root.mkdir(parents=True)
        print(f"== {part}", flush=True)
        if part == "profile":
            rows, raw = profile(args, part_root)
            cols = ["mode", "UTD setting", "UTD achieved", "minutes", "transitions", "episodes", "updates",
                    "generation s/episode", "learner s/update", "control Hz (median)", "control rate error %"]
            notes = (f"Robots: {args.num_robots} x `sim:{args.task},{args.robot_options}` (paced like real robots); "
                     f"flags `{' '.join(args.sac_flags + args.profile_flags)}`. Generation s/episode: wall-clock per finished episode per "
                     f"robot. Learner s/update: wall-clock per critic update (a sync learner idles while its robots "
                     f"collect; the async one trains continuously, as in USER). Every run: {args.profile_minutes:g} "
                     f"min on the same 2-core machine (the learner and the robots share it). The learner-cadence "
                     f"ratio depends on the sync baseline's UTD (USER's CNN+SAC sync figures, 20.3 s/episode and "
                     f"0.64 s/update at 0.14 s of compute per update, imply ~40 updates per episode). Targets "
                     f"(issue 7): async >= 1.5x on generation and >= 4x on learner cadence; control rate within 2% "
                     f"of its target.")
            plt = pyplot()
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
            runs = [r for r in rows if "UTD setting" in r]
            labels = [f"{r['mode']}\nUTD {r['UTD setting']}" for r in runs]
            for ax, key in zip(axes, ("generation s/episode", "learner s/update")):
                ax.bar(labels, [r[key] for r in runs], color=["C0"] + ["C1"] * (len(runs) - 1))
                ax.set_title(f"{key} (lower is better)", fontsize=9)
                ax.tick_params(labelsize=7)
            write_results("async_sac_profile", "Async vs sync SAC / RLPD: USER's profiling table at CPU scale", cols,
                          rows, seeds=[1], notes=notes, out_dir=out_dir, figure=fig)
            add_raw(out_dir / "async_sac_profile.json", raw)
        elif part == "learn":
            rows, curves, raw = learn(args, part_root)
            plt = pyplot()
            fig, ax = plt.subplots(figsize=(7, 4))
            for name, curve in curves.items():
                if curve:
                    ax.plot(*zip(*curve), marker=".", label=name)
            ax.set_xlabel("wall-clock minutes")
            ax.set_ylabel("eval success (deterministic episodes)")
            ax.set_title(f"async SAC / RLPD, sim:{args.task}")
            ax.legend(fontsize=7)
            cols = ["observations", "seed", "minutes", "transitions", "updates",
                    f"eval success, last {args.final_window:g} min", "eval episodes"]
            notes = (f"One robot `sim:{args.task},obs_mode=<obs>,{args.learn_robot_options}` per run, "
                     f"{args.learn_minutes:g} min each, flags `{' '.join(args.learn_flags)}`; demos: the scripted "
                     f"expert's first episodes (interventions, routed to the demo buffer). Every 5th actor episode is "
                     f"deterministic (the eval episodes). Target (issue 7): >= 90% on the state task.")
            name = "async_sac_learning_" + "_".join(args.learn_obs)
            write_results(name, "Async SAC / RLPD on a sim robot: success vs wall-clock", cols, rows,
                          seeds=args.seeds, notes=notes, out_dir=out_dir, figure=fig)
            add_raw(out_dir / f"{name}.json", raw)
        else:
            rows, raw = resume(args, part_root)
            cols = list(rows[0])
            notes = ("Learner and robots as separate processes; the learner is killed with SIGKILL after "
                     f"{args.resume_kill_after:g} s, restarted with `--resume` 5 s later. Holes: sequence ids missing "
                     "from the actors' acknowledged streams after the restart (each segment is stored durably before "
                     "it is acknowledged; unacknowledged ones are resent from the actors' spools).")
            write_results("async_sac_resume", "Async SAC: kill -9 of the learner and --resume", cols, rows, seeds=[1],
                          notes=notes, out_dir=out_dir)
            add_raw(out_dir / "async_sac_resume.json", raw)
    print(f"results in {out_dir}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
