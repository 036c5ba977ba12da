"""ManiSkill demonstrations from ManiSkill 3.0.1's motion-planning solutions, stored in our demo format (common.demos).

    python -m common.maniskill_demos --task PushCube-v1 --num-episodes 20 --out data/demos/PushCube-v1
    python -m common.maniskill_demos --task PickCube-v1 --num-episodes 10 --out data/demos/PickCube-v1 --obs-mode rgb

Why a subprocess with numpy 1: the planner (mplib 0.1.1, an old pybind11 build) segfaults under numpy 2, which the
project pins. `scripts/setup.sh` installs numpy 1.26.4 into the side directory `<venv>/numpy1`; the planner runs in a
child process with that directory first on PYTHONPATH, so numpy 1.26.4 shadows numpy 2 there only (torch, sapien,
mani_skill and mplib import fine with it). The child gets one seed per request on stdin and answers one JSON line
(the executed pd_joint_pos actions, success step, error) on a private copy of its stdout; no pickle crosses the pipe.
Every answer has a deadline; a child that segfaults or hangs is reported, killed, and restarted for the next seed.

Replay design: the parent (numpy 2) replays each planned action sequence in our own `ManiSkillSingle` wrapper (same
task, pd_joint_pos, the requested obs_mode / image_size) from `reset(seed)`, so the stored observations are exactly
what our env gives a policy. ManiSkill's CPU physics is deterministic, so the replay should succeed at the planner's
success step; a replay that does not is counted as diverged. Episodes are cut right after the first success step
(terminated there). Demo seeds start at 1_000_000, disjoint from eval reset ids 0..N.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SOURCE = "maniskill_motionplanning"
CONTROL_MODE = "pd_joint_pos"
SETUP_COMMAND = "bash scripts/setup.sh"
NUMPY1_DIR = Path(sys.prefix) / "numpy1"  # installed by scripts/setup.sh
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# ManiSkill 3.0.1's MP_SOLUTIONS (mani_skill/examples/motionplanning/panda/run.py): task -> solver in `.solutions`.
# A static table, because importing the solutions imports mplib, which must not happen under numpy 2.
SOLUTIONS = {
    "PickCube-v1": "solvePickCube", "PushCube-v1": "solvePushCube", "StackCube-v1": "solveStackCube",
    "PegInsertionSide-v1": "solvePegInsertionSide", "PlugCharger-v1": "solvePlugCharger",
    "PlaceSphere-v1": "solvePlaceSphere", "PullCube-v1": "solvePullCube", "PullCubeTool-v1": "solvePullCubeTool",
    "LiftPegUpright-v1": "solveLiftPegUpright", "StackPyramid-v1": "solveStackPyramid",
    "DrawTriangle-v1": "solveDrawTriangle", "DrawSVG-v1": "solveDrawSVG",
}
_FAULT_ENV = "_MANISKILL_DEMOS_FAULT"  # tests only: "<seed>:crash" or "<seed>:hang" makes the child misbehave


def numpy1_dir() -> Path:
    if not (NUMPY1_DIR / "numpy" / "__init__.py").is_file():
        raise FileNotFoundError(
            f"numpy 1.26.4 side directory {NUMPY1_DIR} is missing; the ManiSkill motion planner (mplib 0.1.1) "
            f"crashes under numpy 2 and runs with it instead. Install it with `{SETUP_COMMAND}`.")
    return NUMPY1_DIR


# ---- child: runs under numpy 1.26.4 ------------------------------------------------------------------------------
def _planner_worker(task: str, max_steps: int) -> None:
    """Answer seeds read from stdin with one JSON line each: {seed, actions, success_step, error}."""
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the solvers print to stdout; keep the protocol channel clean
    import gymnasium as gym
    import torch

    from common.maniskill_env import _make_raw_env
    from mani_skill.examples.motionplanning.panda import solutions

    torch.set_num_threads(1)
    env = _make_raw_env(task, 1, "physx_cpu", "state", CONTROL_MODE, "sparse", 128)  # as ManiSkillSingle builds it
    solve = getattr(solutions, SOLUTIONS[task])
    fault_seed, _, fault = os.environ.get(_FAULT_ENV, "").partition(":")

    class Stop(Exception):
        pass

    class Recorder(gym.Wrapper):  # the solver steps through this: record each action, stop at success or max_steps
        def step(self, action):
            action = torch.as_tensor(np.asarray(action), dtype=torch.float32)[None]  # exactly what our wrapper sends
            self.actions.append(action[0].tolist())
            out = self.env.step(action)
            if bool(out[4]["success"][0]):
                self.success_step = len(self.actions) - 1
                raise Stop
            if len(self.actions) >= max_steps:
                raise Stop
            return out

    rec = Recorder(env)
    print(json.dumps({"ready": True}), file=results, flush=True)
    for line in sys.stdin:
        seed = int(line)
        if str(seed) == fault_seed:
            if fault == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(3600)
        rec.actions, rec.success_step, error = [], None, None
        try:
            solve(rec, seed=seed, debug=False, vis=False)
        except Stop:
            pass
        except Exception as exc:  # a planning failure is a failed attempt, not a crash
            error = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"seed": seed, "actions": rec.actions, "success_step": rec.success_step, "error": error}),
              file=results, flush=True)


# ---- parent ------------------------------------------------------------------------------------------------------
class PlannerFailure(RuntimeError):
    """The planner child died or missed its deadline."""


class _Planner:
    """The numpy-1 child process; started lazily, restarted after a crash or timeout."""

    def __init__(self, task: str, max_steps: int, timeout: float, start_timeout: float = 300.0):
        self.args = [sys.executable, "-m", "common.maniskill_demos", "--planner-worker", task, str(max_steps)]
        self.timeout, self.start_timeout, self.proc = timeout, start_timeout, None
        paths = [str(numpy1_dir()), str(PROJECT_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}

    def _read(self, timeout: float, what: str) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else None
        if line:
            return json.loads(line)
        if line is None:
            self.proc.kill()
        code = self.proc.wait()
        why = (f"missed its {timeout:.0f} s deadline" if line is None else
               f"died with {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace")[-2000:]
        self.close()
        self.proc = None
        raise PlannerFailure(f"the planner process {why} {what}; its last output:\n{tail}")

    def solve(self, seed: int) -> dict:
        if self.proc is None:
            self.log = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                         env=self.env, cwd=PROJECT_ROOT, text=True)
            try:
                self._read(self.start_timeout, "while starting")
            except PlannerFailure as exc:  # not seed-specific: retrying the next seed would fail the same way
                raise RuntimeError(str(exc)) from None
        try:
            self.proc.stdin.write(f"{seed}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died; _read reports how
        return self._read(self.timeout, f"on seed {seed}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            self.log.close()


def _replay(env, seed: int, actions: list) -> tuple[list, list, list, int | None]:
    """Replay in our wrapper; stop right after the first success step."""
    observations, taken, rewards = [env.reset(seed)], [], []
    for action in actions:
        obs, reward, _, success = env.step(np.asarray(action, np.float32))
        observations.append(obs)
        taken.append(np.asarray(action, np.float32))
        rewards.append(reward)
        if success:
            return observations, taken, rewards, len(taken) - 1
    return observations, taken, rewards, None


def generate_demos(task: str, num_episodes: int, out: str | Path, obs_mode: str = "state", image_size: int = 128,
                   seed_offset: int = 1_000_000, max_steps: int = 100, keep_failures: bool = False,
                   max_attempts: int | None = None, timeout: float = 120.0, progress: bool = True) -> dict[str, Any]:
    """Plan, replay and store `num_episodes` successful episodes (trying at most `max_attempts`, default 3N, seeds
    from `seed_offset` on). Returns the report, also written to `<out>/report.json`. Episodes of `task` that `out`
    already holds count towards `num_episodes` and their seeds are not tried again: an interrupted generation goes on
    where it stopped (`common.demos.begin_generation`)."""
    if task not in SOLUTIONS:
        raise ValueError(f"ManiSkill has no motion-planning solution for {task!r}; tasks with one: "
                         f"{', '.join(SOLUTIONS)}")
    numpy1_dir()
    import torch
    from tqdm import tqdm

    from common.demos import begin_generation, end_generation, episode_segment, open_demo_writer
    from common.fsutil import atomic_write
    from common.maniskill_env import OBS_MODES, ManiSkillSingle, check_task, task_description

    if obs_mode not in OBS_MODES:
        raise ValueError(f"unknown obs_mode {obs_mode!r}; choose one of {OBS_MODES}")
    check_task(task)
    max_attempts = max_attempts or 3 * num_episodes
    threads, start = torch.get_num_threads(), time.monotonic()
    held = begin_generation(out, {"generator": "maniskill_demos", "task": task, "num_episodes": num_episodes,
                                  "obs_mode": obs_mode, "image_size": image_size, "seed_offset": seed_offset})
    stored_seeds = {m.get("reset_id") for m in held if m.get("task") == task}  # an interrupted run's, or an earlier
    writer = open_demo_writer(out)
    planner = env = None  # made at the first seed to try (none when the dataset already holds enough)
    counts = dict(attempts=0, planner_successes=0, replay_successes=0, diverged=0, crashes=0,
                  stored=len(stored_seeds), stored_before=len(stored_seeds))
    lengths, failures, last_seed = [], [], None
    bar = tqdm(total=num_episodes, initial=min(num_episodes, len(stored_seeds)), desc=f"{task} demos",
               disable=not progress)
    try:
        for seed in range(seed_offset, seed_offset + max_attempts):
            if counts["stored"] >= num_episodes:
                break
            if seed in stored_seeds:
                continue
            if planner is None:
                planner = _Planner(task, max_steps, timeout)
                env = ManiSkillSingle(task, obs_mode, CONTROL_MODE, "sparse", image_size)
            counts["attempts"] += 1
            last_seed = seed
            try:
                plan = planner.solve(seed)
            except PlannerFailure as exc:
                counts["crashes"] += 1
                failures.append(f"seed {seed}: {str(exc).splitlines()[0]}")
                tqdm.write(f"[maniskill_demos] {exc}", file=sys.stderr)
                continue
            planned = plan["success_step"] is not None
            counts["planner_successes"] += planned
            if plan["error"]:
                failures.append(f"seed {seed}: {plan['error']}")
            if not (planned or keep_failures) or not plan["actions"]:
                continue
            observations, actions, rewards, success_step = _replay(env, seed, plan["actions"])
            success = success_step is not None
            counts["replay_successes"] += planned and success
            if planned and success_step != plan["success_step"]:
                counts["diverged"] += 1
                failures.append(f"seed {seed}: replay diverged (planner success at step {plan['success_step']}, "
                                f"replay {success_step})")
            if not (success or keep_failures):
                continue
            writer.add(episode_segment(observations, actions, success_step, rewards), meta=dict(
                source=SOURCE, env="maniskill", task=task, task_description=task_description(task), reset_id=seed,
                success=success, control_mode=CONTROL_MODE, planner_success=planned, length=len(actions)))
            counts["stored"] += 1
            lengths.append(len(actions))
            bar.set_postfix(attempts=counts["attempts"], planner_ok=counts["planner_successes"], refresh=False)
            bar.update(1)
    finally:
        bar.close()
        if planner is not None:
            planner.close()
            env.close()
        torch.set_num_threads(threads)  # ManiSkillSingle sets 1 for its worker processes
    seconds = time.monotonic() - start
    report = dict(
        task=task, obs_mode=obs_mode, image_size=image_size, out=str(out), requested=num_episodes, **counts,
        complete=counts["stored"] >= num_episodes,
        planner_success_rate=counts["planner_successes"] / max(counts["attempts"], 1),
        replay_success_rate=counts["replay_successes"] / max(counts["planner_successes"], 1),
        length_mean=float(np.mean(lengths)) if lengths else None, length_min=min(lengths, default=None),
        length_max=max(lengths, default=None), seconds=round(seconds, 2),
        seconds_per_demo=round(seconds / max(counts["stored"] - counts["stored_before"], 1), 3),
        seeds=f"{seed_offset}..{last_seed}" if last_seed is not None else "", failures=failures[:50],
    )
    atomic_write(Path(out) / "report.json", json.dumps(report, indent=2) + "\n")
    end_generation(out)
    return report


@dataclass
class Args:
    task: str = "PushCube-v1"
    """ManiSkill task with a motion-planning solution"""
    num_episodes: int = 20
    """successful episodes wanted (those the --out dataset already holds count)"""
    out: Path = Path("data/demos/PushCube-v1")
    """demo dataset directory (appended to if it exists: its seeds are not tried again)"""
    obs_mode: str = "state"
    """state or rgb (the observations are recorded by replay in our wrapper)"""
    image_size: int = 128
    """camera resolution with obs_mode rgb"""
    seed_offset: int = 1_000_000
    """first demo seed (eval uses reset ids 0..N)"""
    keep_failures: bool = False
    """also store episodes that did not succeed (meta success=False)"""
    max_steps: int = 100
    """episode cap in steps (the registered 50 is too short for planner demos)"""
    max_attempts: int | None = None
    """seeds to try at most (default 3 x num_episodes)"""
    timeout: float = 120.0
    """seconds the planner may take per seed before it is killed and restarted"""


def main(args: Args) -> dict[str, Any]:
    report = generate_demos(args.task, args.num_episodes, args.out, args.obs_mode, args.image_size, args.seed_offset,
                            args.max_steps, args.keep_failures, args.max_attempts, args.timeout)
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=2))
    for line in report["failures"]:
        print(f"  {line}")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--planner-worker"]:
        _planner_worker(sys.argv[2], int(sys.argv[3]))
    else:
        import tyro

        sys.exit(0 if main(tyro.cli(Args))["complete"] else 1)
