"""Scripted LIBERO expert with privileged simulator state, writing demo datasets (`common.demos` format).

The expert never looks at images: it reads the MuJoCo state inside our `LiberoSingle` wrapper and drives the robot with
the same 7-D OSC_POSE delta actions a policy emits (position x 0.05 m, rotation x 0.5 rad world-frame axis-angle,
gripper -1 open / +1 closed). What it relies on, all of it privileged (a policy sees none of this):
- the goal: the task's BDDL goal predicate `In(obj, <region site>)` / `On(obj, <object>)`, parsed from the problem;
- geometry: every object is the MuJoCo body `<name>_main` whose collision geoms are boxes; their world corners give the
  object's footprint and height, the goal's support surface (the basket floor, the plate top) and the obstacles;
- the end effector: the site `gripper0_grip_site` (the `robot0_eef_pos` observation); the Panda's fingers close along
  its x axis, its pads reach 1.2 cm above the site, the hand starts 3.1 cm above it and spans 20 x 6.4 cm.

Phases: travel high, go over the grasp point while turning to the grasp yaw, descend while re-tracking the live object
pose, close (12 steps), lift (abort when the fingers closed on nothing or the object did not come up), carry so that
the *object* (its hang below the fingers measured live) is over the goal, lower it onto the support, open, retreat.
LIBERO's In check is the object origin inside the region box, so basket episodes end (success) while lowering.
Grasp candidates are yaws across the object's footprint (boxes across their narrow axis, long boxes also off-centre),
or rim pinches for objects wider than the open hand (bowls); they are ranked by the hand's clearance from neighbouring
objects (the hand is 20 cm long and hits tall cans next to flat boxes). A failed attempt is retried with the next
candidate from the same init state; only the successful rollout is kept. Covers LIBERO-Object (all 10 tasks) and
LIBERO-Spatial except task 4 (the bowl in the drawer under the cabinet top: a vertical approach is the wrong shape).

Everything is rolled out physics-only (`cameras=False`, fast) through our wrapper's reset/step, so an episode is
exactly our env's (15 settle steps included), cut right after the success step. Image demos replay the recorded actions
in a camera env from the same reset id; the wrapper is bit-exact deterministic, so the replay must reproduce every
state and the success step (checked; divergences are reported and such episodes are not stored). `--action-noise`
perturbs the position commands (the expert re-tracks, so the demos show corrections); the noisy actions are stored.

    python -m common.libero_expert --suite libero_object --init-states 25-49 --out demos/libero_object
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.demos import begin_generation, end_generation, episode_segment, open_demo_writer
from common.fsutil import atomic_write
from common.libero_env import MAX_EPISODE_STEPS, LiberoSingle, suite_reset_table

POS_SCALE, ROT_SCALE = 0.05, 0.5  # OSC_POSE delta: metres and radians per unit action
OPEN, CLOSED = -1.0, 1.0
MAX_WIDTH = 0.068  # widest grasp: the open fingers are 7.8 cm apart
# Footprints around the grip site that must stay clear of other objects: (from this height above the site up,
# half-extent along the finger axis, half-extent across it): the hand from 3.1 cm above the site, the fingers below.
FOOTPRINTS = ((0.031, 0.10, 0.032), (-0.005, 0.05, 0.012))
HAND_BOTTOM = FOOTPRINTS[0][0]
CLOSE_STEPS, OPEN_STEPS = 12, 6
_GRID = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=float)  # sample points on a box


def parse_init_states(spec: str, n: int) -> list[int]:
    """"all", "25-49", "0,3,5" or a mix ("0-4,10") -> sorted init state indices, each in [0, n)."""
    if spec.strip().lower() == "all":
        return list(range(n))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            a, b = int(lo), int(hi) if dash else int(lo)
            if a > b:
                raise ValueError
            out.update(range(a, b + 1))
    except ValueError:
        raise ValueError(f"--init-states {spec!r}: expected 'all', a range like '25-49' or a list like '0,3,5'"
                         ) from None
    bad = sorted(i for i in out if not 0 <= i < n)
    if bad:
        raise ValueError(f"--init-states {spec!r}: indices {bad} are out of range; "
                         f"this suite has init states 0..{n - 1}")
    return sorted(out)


@dataclass
class Grasp:
    local: np.ndarray  # grasp point in the object's body frame
    axis: np.ndarray  # finger closing direction in the object's body frame
    width: float
    clearance: float


class Scene:
    """Privileged reads of the MuJoCo state inside a LiberoSingle (after reset) and the expert's script."""

    def __init__(self, env: LiberoSingle):
        import mujoco

        self.env, self.sim = env, env._env.sim
        m = self.m = self.sim.model._model
        self.d = self.sim.data._data
        name2id = lambda kind, n: mujoco.mj_name2id(m, kind, n)  # noqa: E731
        goal = [p for p in env._env.env.parsed_problem["goal_state"] if len(p) == 3 and p[0].lower() in ("in", "on")]
        if not goal:
            raise ValueError(f"task {env.description!r}: no In/On goal predicate, not a pick-and-place task")
        target, place = goal[0][1], goal[0][2]  # the first In/On predicate (all pick-and-place goals have one)
        self.body = name2id(mujoco.mjtObj.mjOBJ_BODY, f"{target}_main")
        self.goal_site = name2id(mujoco.mjtObj.mjOBJ_SITE, place)
        self.goal_body = (m.site_bodyid[self.goal_site] if self.goal_site >= 0
                          else name2id(mujoco.mjtObj.mjOBJ_BODY, f"{place}_main"))
        if self.body < 0 or self.goal_body < 0:
            raise ValueError(f"task {env.description!r}: bodies for {target!r} / {place!r} not found")
        self.grip = name2id(mujoco.mjtObj.mjOBJ_SITE, "gripper0_grip_site")
        names = [mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_BODY, b) or "" for b in range(m.nbody)]
        geoms = {b: [g for g in range(m.ngeom) if m.geom_bodyid[g] == b and m.geom_contype[g]]
                 for b in range(m.nbody) if names[b].endswith("_main")}
        self.geoms = {b: gs for b, gs in geoms.items() if gs}
        if self.body not in self.geoms:
            raise ValueError(f"task {env.description!r}: {target!r} has no collision boxes to grasp")
        self.others = [b for b in self.geoms if b != self.body]

    # ------------------------------------------------------------------------------------------ state
    def geom_points(self, g: int, grid: bool = False) -> np.ndarray:
        """World points of a collision geom's box (a mesh's local bounding box): 8 corners, or a 27-point grid."""
        c, h = (np.zeros(3), self.m.geom_size[g]) if self.m.geom_type[g] == 6 else np.split(self.m.geom_aabb[g], 2)
        s = _GRID if grid else _GRID[np.abs(_GRID).sum(1) == 3]
        return self.d.geom_xpos[g] + (c + s * h) @ self.d.geom_xmat[g].reshape(3, 3).T

    def points(self, body: int, grid: bool = False) -> np.ndarray:
        return np.concatenate([self.geom_points(g, grid) for g in self.geoms[body]])

    def pose(self, body: int) -> tuple[np.ndarray, np.ndarray]:
        return self.d.xpos[body].copy(), self.d.xmat[body].reshape(3, 3).copy()

    def eef(self) -> tuple[np.ndarray, np.ndarray]:
        return self.d.site_xpos[self.grip].copy(), self.d.site_xmat[self.grip].reshape(3, 3).copy()

    def goal(self) -> tuple[np.ndarray, float]:
        """Where the object goes (xy) and the height of the surface under that point (basket floor, plate top)."""
        xy = (self.d.site_xpos[self.goal_site] if self.goal_site >= 0 else self.d.xpos[self.goal_body])[:2].copy()
        support = -np.inf
        for g in self.geoms.get(self.goal_body, []):
            pts = self.geom_points(g)
            if np.all(pts.min(0)[:2] <= xy) and np.all(xy <= pts.max(0)[:2]):
                support = max(support, pts[:, 2].max())
        if support == -np.inf:  # nothing under the point: the bottom of the region, or the goal body's origin
            site = self.goal_site
            support = (self.d.site_xpos[site][2] - self.m.site_size[site][2] if site >= 0
                       else self.d.xpos[self.goal_body][2])
        return xy, support

    # ------------------------------------------------------------------------------------------ grasps
    def clearance(self, center: np.ndarray, u: np.ndarray, z: float) -> float:
        """Distance from the hand and finger footprints at a grasp (site at `center`/`z`, fingers along `u`) to every
        other object part that reaches their heights."""
        v = np.array([-u[1], u[0]])
        best = 1.0
        for b in self.others:
            p = self.points(b, grid=True)
            rel = p[:, :2] - center
            du, dv = np.abs(rel @ u), np.abs(rel @ v)
            for bottom, hu, hv in FOOTPRINTS:
                hit = p[:, 2] > z + bottom - 0.005
                if hit.any():
                    d = np.hypot(np.maximum(du[hit] - hu, 0), np.maximum(dv[hit] - hv, 0))
                    best = min(best, float(d.min()))
        return best

    def grasp_candidates(self, n: int = 3) -> list[Grasp]:
        """Yaws across the object's footprint (off-centre too for long boxes), or rim grasps for objects wider than
        the open hand (bowls); ranked by hand clearance (2 cm is enough), then width, then centring."""
        pts = self.points(self.body)
        pos, R = self.pose(self.body)
        top, bottom = pts[:, 2].max(), pts[:, 2].min()
        mid = (pts[:, :2].min(0) + pts[:, :2].max(0)) / 2
        options = []  # (grasp xy, finger direction, grip site height, width, shift, yaw)
        for yaw in np.deg2rad(np.arange(0, 180, 10)):
            u = np.array([np.cos(yaw), np.sin(yaw)])
            v = np.array([-u[1], u[0]])
            pu, pv = pts[:, :2] @ u, pts[:, :2] @ v
            width, length = np.ptp(pu), np.ptp(pv)
            if width <= MAX_WIDTH:
                for shift in (0.0, -0.02, 0.02) if length - width > 0.02 and length / 2 > 0.035 else (0.0,):
                    center = u * (pu.max() + pu.min()) / 2 + v * ((pv.max() + pv.min()) / 2 + shift)
                    options.append((center, u, top - min(0.028, max(top - bottom - 0.008, 0.0)), width, shift, yaw))
        if not options:  # wider than the open hand everywhere: pinch the rim, fingers across the wall
            for yaw in np.deg2rad(np.arange(0, 360, 30)):
                u = np.array([np.cos(yaw), np.sin(yaw)])
                options.append((mid + (((pts[:, :2] - mid) @ u).max() - 0.008) * u, u, top - 0.015, 0.0, 0.0, yaw))
        scored = []
        for center, u, z, width, shift, yaw in options:
            clear = self.clearance(center, u, z)
            key = (-np.floor(min(clear, 0.02) / 0.005), round(max(width - 0.055, 0.0), 2), abs(shift), width)
            world = np.array([*center, z])
            scored.append((key, yaw, Grasp(R.T @ (world - pos), R.T @ np.array([*u, 0.0]), width, clear)))
        scored.sort(key=lambda s: s[0])
        chosen: list[tuple[float, Grasp]] = []
        for _, yaw, g in scored:  # candidates at least 25 degrees apart
            if all(abs((yaw - y + np.pi / 2) % np.pi - np.pi / 2) > np.deg2rad(25) for y, _ in chosen):
                chosen.append((yaw, g))
        return [g for _, g in chosen[:n]]

    # ------------------------------------------------------------------------------------------ control
    def action(self, target: np.ndarray, axis_xy: np.ndarray, grip: float, gain: float = 1.5,
               speed: float = 1.0) -> np.ndarray:
        """P-control towards `target` with the gripper pointing down and its fingers along `axis_xy`."""
        from robosuite.utils.transform_utils import mat2quat, quat2axisangle

        pos, R = self.eef()
        d = (target - pos) / POS_SCALE * gain
        d *= min(1.0, speed / max(np.abs(d).max(), 1e-9))
        x = np.array([*axis_xy, 0.0]) if np.linalg.norm(axis_xy) > 1e-3 else np.array([*R[:2, 0], 0.0])
        x /= np.linalg.norm(x)
        if x @ R[:, 0] < 0:  # the hand is symmetric under a half turn: take the nearer of the two yaws
            x = -x
        R_des = np.stack([x, np.cross([0.0, 0.0, -1.0], x), [0.0, 0.0, -1.0]], axis=1)
        rot = np.clip(quat2axisangle(mat2quat(R_des @ R.T)) / ROT_SCALE, -1, 1)
        return np.concatenate([np.clip(d, -1, 1), rot, [grip]])

    def script(self, g: Grasp) -> Iterator[np.ndarray]:
        """The expert's actions for one grasp candidate; it returns early (aborts) when the grasp failed."""
        axis = None  # finger direction: follows the object until the grasp, then held

        def grasp_point() -> np.ndarray:
            pos, R = self.pose(self.body)
            return pos + R @ g.local

        def act(target: np.ndarray, grip: float, **kw) -> np.ndarray:
            return self.action(target, axis if axis is not None else (self.pose(self.body)[1] @ g.axis)[:2], grip, **kw)

        def goto(target: Callable[[], np.ndarray], grip: float, tol: float, limit: int, **kw):
            for _ in range(limit):
                t = target()
                if np.linalg.norm(t - self.eef()[0]) < tol:
                    return
                yield act(t, grip, **kw)

        def obj() -> np.ndarray:
            return self.pose(self.body)[0]

        def bottom() -> float:
            return self.points(self.body)[:, 2].min()

        start, (goal_xy, _) = self.eef()[0], self.goal()
        tops = {b: self.points(b)[:, 2].max() for b in self.others}
        z_high = max(start[2], max(tops.values()) + 0.05, self.points(self.body)[:, 2].max() + HAND_BOTTOM + 0.05)
        # travel high, go over the grasp point, descend while re-tracking the object, close
        yield from goto(lambda: np.array([*start[:2], z_high]), OPEN, 0.03, 20)
        yield from goto(lambda: np.array([*grasp_point()[:2], z_high]), OPEN, 0.01, 40)
        yield from goto(grasp_point, OPEN, 0.006, 40, gain=1.2)
        for _ in range(CLOSE_STEPS):
            yield act(grasp_point(), CLOSED)
        axis = self.eef()[1][:2, 0].copy()
        fingers = self.sim.data.qpos[self.env._env.robots[0]._ref_gripper_joint_pos_indexes]
        if abs(fingers[0] - fingers[1]) < 0.004:  # closed on nothing
            return
        grasp_z, obj_z0 = self.eef()[0][2], obj()[2]
        hang = grasp_z - bottom()  # how far the object reaches below the grip site
        # carry height: clear every object near the straight path to the goal (the basket rim included)
        obj_xy, seg = obj()[:2], goal_xy - obj()[:2]
        near = [0.0]
        for b, top in tops.items():
            c = self.pose(b)[0][:2]
            t = np.clip((c - obj_xy) @ seg / max(seg @ seg, 1e-9), 0, 1)
            if np.linalg.norm(obj_xy + t * seg - c) < 0.15:
                near.append(top)
        z_carry = max(near) + 0.04 + hang
        lift = np.array([*self.eef()[0][:2], z_carry])
        for _ in range(40):
            if self.eef()[0][2] - grasp_z > 0.04:
                if obj()[2] - obj_z0 < 0.025:  # the object did not come up
                    return
                break
            yield act(lift, CLOSED)
        offset0 = obj() - self.eef()[0]

        def dropped() -> bool:
            return np.linalg.norm(obj() - self.eef()[0] - offset0) > 0.04

        def over_goal() -> np.ndarray:  # the eef target that puts the object over the goal (hang measured live)
            return np.array([*(goal_xy - obj()[:2] + self.eef()[0][:2]), z_carry])

        for _ in range(30):  # rise to about the carry height before moving sideways
            if self.eef()[0][2] > z_carry - 0.03 or dropped():
                break
            yield act(lift, CLOSED)
        for _ in range(60):
            if np.linalg.norm(obj()[:2] - goal_xy) < 0.012 or dropped():
                break
            yield act(over_goal(), CLOSED)
        if dropped():
            return
        support = self.goal()[1]

        def lowered() -> np.ndarray:  # object bottom 1 cm above the support
            return over_goal() - np.array([0, 0, z_carry - self.eef()[0][2] + bottom() - support - 0.01])

        yield from goto(lowered, CLOSED, 0.006, 30, gain=1.0, speed=0.6)
        for _ in range(OPEN_STEPS):
            yield act(self.eef()[0], OPEN)
        up = self.eef()[0] + np.array([0, 0, 0.1])
        yield from goto(lambda: up, OPEN, 0.01, 20)
        for _ in range(10):  # let the object settle: the goal check may need contact
            yield act(up, OPEN)


# ---------------------------------------------------------------------------------------------- rollouts
@dataclass
class Episode:
    observations: list[dict[str, Any]]
    actions: list[np.ndarray]
    success: bool
    grasp_attempts: int


def expert_episode(env: LiberoSingle, reset_id: int, max_steps: int, max_grasps: int = 3, action_noise: float = 0.0,
                   rng: np.random.Generator | None = None) -> Episode:
    """Roll the expert out from `reset_id`, retrying the next grasp candidate from the same init state after a
    failure; returns the first successful rollout (cut at its success step) or the last failed one."""
    rng = rng if rng is not None else np.random.default_rng(0)
    episode = Episode([], [], False, 0)
    for k in range(max_grasps):
        obs = env.reset(reset_id)
        scene = Scene(env)
        candidates = scene.grasp_candidates(max_grasps)
        if k >= len(candidates):
            break
        episode = Episode([obs], [], False, k + 1)
        for a in scene.script(candidates[k]):
            if action_noise > 0:  # noisy position commands; the expert re-tracks, so the data shows corrections
                a[:3] += rng.normal(0.0, action_noise, 3)
            a = np.clip(a, -1, 1).astype(np.float32)  # what is stored is exactly what was executed
            obs, _, _, success = env.step(a)
            episode.observations.append(obs)
            episode.actions.append(a)
            if success or len(episode.actions) >= max_steps:
                episode.success = success
                break
        if episode.success:
            break
    return episode


def replay(env: LiberoSingle, reset_id: int, episode: Episode) -> tuple[list[dict[str, Any]], str | None]:
    """Replay an episode's actions in (camera) env `env`; returns the observations and why it diverged (None:
    every state bit-identical and success on the same step)."""
    observations = [env.reset(reset_id)]
    success = False
    for a in episode.actions:
        obs, _, _, success = env.step(a)
        observations.append(obs)
        if success:
            break
    for t, (a, b) in enumerate(zip(observations, episode.observations)):
        if not np.array_equal(a["state"], b["state"]):
            return observations, f"state differs at step {t}"
    if len(observations) != len(episode.observations) or success != episode.success:
        return observations, f"ended after {len(observations) - 1} steps (success={success}), " \
                             f"the physics-only rollout after {len(episode.actions)} (success={episode.success})"
    return observations, None


def generate_libero_demos(suite: str, task_ids: list[int] | None, init_states: list[int] | str | None,
                          out: str | Path, *, cameras: bool = True, image_size: int = 128, shadows: bool = True,
                          max_steps: int | None = None, max_grasps: int = 3, action_noise: float = 0.0,
                          keep_failures: bool = False, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run the expert on every (task, init state), store the successful episodes as a demo dataset in `out` and
    return the report (also written to `<out>/report.json`). Pairs whose episode `out` already holds are skipped: an
    interrupted generation goes on where it stopped (`common.demos.begin_generation`)."""
    from tqdm import tqdm

    table = suite_reset_table(suite)
    task_ids = sorted({t for t, _ in table}) if task_ids is None else list(task_ids)
    suite_reset_table(suite, task_ids)  # validates the task ids
    n_init = min(sum(1 for t, _ in table if t == task) for task in task_ids)
    if init_states is None or isinstance(init_states, str):
        init_states = parse_init_states(init_states or "all", n_init)
    max_steps = max_steps or MAX_EPISODE_STEPS[suite]
    out = Path(out)
    held = begin_generation(out, {"generator": "libero_expert", "suite": suite, "tasks": task_ids,
                                  "init_states": init_states, "cameras": cameras, "image_size": image_size})
    stored_before = {(m.get("task"), m.get("init_index")) for m in held}
    descriptions = {m.get("task"): m.get("task_description") for m in held}
    physics = LiberoSingle(suite, table, cameras=False)
    camera = LiberoSingle(suite, table, image_size=image_size, shadows=shadows) if cameras else None
    writer = open_demo_writer(out)
    report: dict[str, Any] = {"suite": suite, "init_states": init_states, "cameras": cameras, "image_size": image_size,
                              "max_steps": max_steps, "max_grasps": max_grasps, "action_noise": action_noise,
                              "tasks": {}}
    bar = tqdm(total=len(task_ids) * len(init_states), desc=f"{suite} expert", disable=not progress)
    try:
        for task in task_ids:
            todo = [init for init in init_states if (f"{suite}/{task}", init) not in stored_before]
            already = len(init_states) - len(todo)
            bar.update(already)
            start = time.perf_counter()
            for env in ((physics, camera) if camera is not None else (physics,)) if todo else ():
                env.reset(table.index((task, todo[0])))  # build the task's envs, untimed
            build_s, physics_s, replay_s = time.perf_counter() - start, 0.0, 0.0
            results, stored, divergences = [], 0, []  # results: (success, grasp attempts, length) per init state
            for init in todo:
                reset_id = table.index((task, init))
                t0 = time.perf_counter()
                ep = expert_episode(physics, reset_id, max_steps, max_grasps, action_noise,
                                    np.random.default_rng([seed, reset_id]))
                physics_s += time.perf_counter() - t0
                results.append((ep.success, ep.grasp_attempts, len(ep.actions)))
                observations, keep = ep.observations, bool(ep.actions) and (ep.success or keep_failures)
                if keep and camera is not None:
                    t0 = time.perf_counter()
                    observations, why = replay(camera, reset_id, ep)
                    replay_s += time.perf_counter() - t0
                    if why is not None:
                        divergences.append({"reset_id": reset_id, "why": why})
                        keep = False
                if keep:
                    meta = dict(source="libero_scripted", env="libero", task=f"{suite}/{task}",
                                task_description=physics.description, reset_id=reset_id, init_index=init,
                                success=ep.success, length=len(ep.actions), grasp_attempts=ep.grasp_attempts,
                                action_noise=action_noise)
                    writer.add(episode_segment(observations, ep.actions, len(ep.actions) - 1 if ep.success else None),
                               meta)
                    stored += 1
                bar.update(1)
                bar.set_postfix(task=task, success=f"{sum(r[0] for r in results)}/{len(results)}")
            lengths = [n for ok, _, n in results if ok]
            rate = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731 (None: every pair was stored before)
            report["tasks"][f"{suite}/{task}"] = {
                "description": physics.description if todo else descriptions.get(f"{suite}/{task}"),
                "episodes": len(results), "grasp_attempts": sum(r[1] for r in results),
                "success_first_grasp": rate([ok and k == 1 for ok, k, _ in results]),
                "success_any_grasp": rate([ok for ok, _, _ in results]), "stored": stored + already,
                "stored_before": already,
                "length_mean": float(np.mean(lengths)) if lengths else None,
                "length_min": min(lengths, default=None), "length_max": max(lengths, default=None),
                "seconds": time.perf_counter() - start, "env_build_s": build_s,
                "physics_s_per_episode": physics_s / max(1, len(results)),
                "replay_s_per_episode": replay_s / max(1, stored + len(divergences)),
                "replay_divergences": divergences,
            }
    finally:
        bar.close()
        physics.close()
        if camera is not None:
            camera.close()
    rows = list(report["tasks"].values())
    total = {k: sum(r[k] for r in rows) for k in ("episodes", "grasp_attempts", "stored", "seconds")}
    total["success_any_grasp"] = sum((r["success_any_grasp"] or 0.0) * r["episodes"] for r in rows) / max(
        1, total["episodes"])
    total["replay_divergences"] = sum(len(r["replay_divergences"]) for r in rows)
    total["stored_before"] = sum(r["stored_before"] for r in rows)
    report["total"] = total
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    end_generation(out)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'task':<18} {'episodes':>8} {'1st grasp':>9} {'any grasp':>9} {'stored':>6} {'length':>16} "
             f"{'s/ep phys':>9} {'s/ep replay':>11}  description"]
    pct = lambda x: f"{x:>9.0%}" if x is not None else f"{'-':>9}"  # noqa: E731 (None: all stored before)
    for task, r in report["tasks"].items():
        length = f"{r['length_mean']:.0f} ({r['length_min']}-{r['length_max']})" if r["length_mean"] else "-"
        lines.append(f"{task:<18} {r['episodes']:>8} {pct(r['success_first_grasp'])} {pct(r['success_any_grasp'])} "
                     f"{r['stored']:>6} {length:>16} {r['physics_s_per_episode']:>9.2f} "
                     f"{r['replay_s_per_episode']:>11.2f}  {r['description']}")
        lines += [f"    replay divergence at reset id {d['reset_id']}: {d['why']}" for d in r["replay_divergences"]]
    t = report["total"]
    lines.append(f"total: {t['episodes']} episodes, success {t['success_any_grasp']:.1%}, {t['stored']} stored, "
                 f"{t['replay_divergences']} replay divergences, {t['seconds']:.0f} s")
    return "\n".join(lines)


@dataclass
class Args:
    suite: str = "libero_object"
    """LIBERO suite (the expert handles pick-and-place goals: In(obj, region) / On(obj, obj))"""
    tasks: list[int] | None = None
    """task ids of the suite (default: all)"""
    init_states: str = "all"
    """init states per task: 'all', a range '25-49' or a list '0,3,5' (keep them disjoint from the eval ones)"""
    out: Path | None = None
    """demo dataset directory (appended to if it exists: pairs it already holds are skipped); default demos/<suite>"""
    cameras: bool = True
    """record main/wrist images by replaying each successful rollout in a camera env (off: state-only demos)"""
    image_size: int = 128
    """camera image height and width"""
    shadows: bool = True
    """render shadows and reflections (match the eval env's setting)"""
    max_steps: int | None = None
    """episode step limit (default: our MAX_EPISODE_STEPS for the suite)"""
    max_grasps: int = 3
    """grasp candidates tried per init state before giving up"""
    action_noise: float = 0.0
    """std of gaussian noise added to the expert's position actions (in action units; recovery data)"""
    keep_failures: bool = False
    """also store failed episodes (meta success=False)"""
    seed: int = 0
    """seed of the action noise"""


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    result = generate_libero_demos(
        args.suite, args.tasks, args.init_states, args.out or Path("demos") / args.suite, cameras=args.cameras,
        image_size=args.image_size, shadows=args.shadows, max_steps=args.max_steps, max_grasps=args.max_grasps,
        action_noise=args.action_noise, keep_failures=args.keep_failures, seed=args.seed)
    print(format_report(result))
