"""One simulator per worker process, driven over pipes with deadlines.

Used by the env wrappers whose simulators cannot batch on the CPU (ManiSkill's `physx_cpu`, LIBERO / robosuite).
A worker builds its env from a factory (a module-level function, so `forkserver` / `spawn` can import it), then
serves method calls until told to close. Every wait on a worker has a deadline, a worker that dies is reported with
its exit code, and a worker whose parent dies exits on its own.
These pipes connect our own processes on one machine; nothing here goes over a network.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np


class WorkerError(RuntimeError):
    """A simulator worker failed, died, or did not answer before its deadline."""


def _worker_main(conn, factory: Callable[..., Any], kwargs: dict, parent_pid: int) -> None:
    try:
        env = factory(**kwargs)
    except BaseException as exc:  # report construction errors (bad task, missing asset) to the parent verbatim
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        conn.close()
        return
    conn.send(("ok", None))
    while True:
        # A worker never outlives the process that drives it: its death closes the pipe (EOF below), and as a
        # second check the worker looks for it once a second (with forkserver, getppid() is the server, not it).
        if not conn.poll(1.0):
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                break
            continue
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            break
        if method == "__close__":
            try:
                env.close()
            finally:
                conn.send(("ok", None))
            break
        try:
            conn.send(("ok", run_chunk(env, *args) if method == "__chunk__" else getattr(env, method)(*args)))
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    conn.close()


def run_chunk(env, actions: np.ndarray, steps_left: int, stop_on_terminate: bool, next_reset_id: int | None = None):
    """Run a chunk of actions (k, A) in one worker call: step until the chunk, the episode's `steps_left` or (with
    `stop_on_terminate`) a termination ends it. Only the last step is observed (a terminating step leaves a fresh
    observation by the env's contract). If the episode ended and `next_reset_id` is given, reset to it right away.
    -> (last obs, rewards, terminated, success, reset obs or None), one list entry per executed step."""
    rewards, terminated, success, obs = [], [], [], None
    n = max(1, min(len(actions), int(steps_left)))
    for j in range(n):
        obs, r, term, succ = env.step(actions[j], j == n - 1)
        rewards.append(float(r)), terminated.append(bool(term)), success.append(bool(succ))
        if term and stop_on_terminate:
            break
    ended = (terminated[-1] and stop_on_terminate) or len(rewards) >= steps_left
    reset_obs = env.reset(int(next_reset_id)) if ended and next_reset_id is not None else None
    return obs, rewards, terminated, success, reset_obs


class WorkerPool:
    """`n` worker processes, each owning one env built by `factory(**kwargs_i)`.

    `call(ids, method, args_per_id)` sends the calls to all addressed workers first and then collects the answers,
    so the workers run in parallel. `timeout` bounds every answer; `start_timeout` bounds env construction.
    """

    def __init__(
        self,
        factory: Callable[..., Any],
        kwargs_per_worker: Sequence[dict],
        start_method: str = "forkserver",
        timeout: float = 120.0,
        start_timeout: float = 600.0,
        name: str = "env",
    ):
        ctx = mp.get_context(start_method)
        self.name, self.timeout = name, timeout
        self.broken: str | None = None
        self.hung: set[int] = set()  # workers that missed a deadline: close() kills them without waiting
        self.conns, self.procs = [], []
        try:  # a worker that fails to start or construct stops the ones already started
            for i, kwargs in enumerate(kwargs_per_worker):
                parent_conn, child_conn = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main, args=(child_conn, factory, kwargs, os.getpid()), daemon=True,
                    name=f"{name}-worker-{i}",
                )
                try:
                    proc.start()
                except BaseException:
                    parent_conn.close()
                    raise
                finally:
                    child_conn.close()
                self.conns.append(parent_conn)
                self.procs.append(proc)
            self._collect(range(len(self.conns)), "construct", start_timeout)
        except BaseException:
            self.close(timeout=5.0)
            raise

    def __len__(self) -> int:
        return len(self.conns)

    def call(self, ids: Sequence[int], method: str, args_per_id: Sequence[tuple] | None = None) -> list:
        if self.broken:  # after a timeout or a death the pipes may hold late answers: refuse rather than mix them up
            raise WorkerError(f"{self.name} workers unusable after an earlier failure: {self.broken}")
        ids = list(ids)
        for j, i in enumerate(ids):
            args = args_per_id[j] if args_per_id is not None else ()
            try:
                self.conns[i].send((method, tuple(args)))
            except (BrokenPipeError, OSError) as exc:
                self.broken = self._death_message(i, method)
                raise WorkerError(self.broken) from exc
        return self._collect(ids, method, self.timeout)

    def _collect(self, ids, method: str, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        results, errors = [], []
        for i in ids:
            conn = self.conns[i]
            while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                if not self.procs[i].is_alive():
                    self.broken = self._death_message(i, method)
                    raise WorkerError(self.broken)
                if time.monotonic() >= deadline:
                    self.hung.add(i)
                    self.broken = f"{self.name} worker {i} did not answer '{method}' within {timeout:.0f} s"
                    raise WorkerError(self.broken)
            try:
                status, payload = conn.recv()
            except (EOFError, OSError) as exc:
                self.broken = self._death_message(i, method)
                raise WorkerError(self.broken) from exc
            if status == "error":
                errors.append(f"{self.name} worker {i}, '{method}': {payload}")
            results.append(payload)
        if errors:
            raise WorkerError("\n".join(errors))
        return results

    def _death_message(self, i: int, method: str) -> str:
        self.procs[i].join(timeout=1.0)
        return f"{self.name} worker {i} died during '{method}' (exit code {self.procs[i].exitcode})"

    def close(self, timeout: float = 30.0) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                try:
                    conn.send(("__close__", ()))
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + timeout
        for i, (conn, proc) in enumerate(zip(self.conns, self.procs)):
            proc.join(timeout=0.0 if i in self.hung else max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
            conn.close()
        self.conns, self.procs = [], []


def stack_observations(per_env: Sequence[dict], device) -> dict[str, Any]:
    """Per-env numpy observations (state, images {cam: HxWx3 uint8}, task_description) -> one batched dict of tensors."""
    import torch

    first = per_env[0]
    out: dict[str, Any] = {"state": torch.from_numpy(np.stack([o["state"] for o in per_env])).to(device)}
    if "images" in first:
        out["images"] = {
            cam: torch.from_numpy(np.stack([o["images"][cam] for o in per_env])).to(device) for cam in first["images"]
        }
    out["task_description"] = [o["task_description"] for o in per_env]
    return out


class SubprocBackend:
    """A `common.vec_env.Backend` over a `WorkerPool` whose envs expose
    `reset(reset_id) -> obs` and `step(action, observe) -> (obs, reward, terminated, success)` with numpy
    observations (`observe=False`: the observation may be stale, nobody looks at it). A worker whose episode ends
    inside a chunk starts the next one in the same round trip (`resets_in_chunk`), so a slow reset (LIBERO: ~0.3 s,
    ~1.6 s for another task) runs while the other workers still step."""

    resets_in_chunk = True

    def __init__(self, pool: WorkerPool, action_dim: int, device="cpu"):
        import torch

        self.pool, self.num_envs, self.action_dim = pool, len(pool), action_dim
        self.device = torch.device(device)
        self._obs: list[dict | None] = [None] * self.num_envs
        self._prepared: dict[int, tuple[int, dict]] = {}  # env -> (reset id, first obs) of an episode begun in a chunk

    def reset(self, env_ids, reset_ids) -> None:
        calls = []
        for i, r in zip(env_ids, reset_ids):
            prepared = self._prepared.pop(i, None)
            if prepared is not None and prepared[0] == int(r):
                self._obs[i] = prepared[1]
            else:
                calls.append((i, int(r)))
        ids = [i for i, _ in calls]
        for i, obs in zip(ids, self.pool.call(ids, "reset", [(r,) for _, r in calls]) if calls else []):
            self._obs[i] = obs

    def step(self, actions, active, observe=None):
        import torch

        ids = [i for i in range(self.num_envs) if active[i]]
        observe = np.ones(self.num_envs, bool) if observe is None else observe
        acts = actions.detach().cpu().numpy()
        reward = torch.zeros(self.num_envs)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool)
        success = torch.zeros(self.num_envs, dtype=torch.bool)
        calls = [(acts[i], bool(observe[i])) for i in ids]
        for i, (obs, r, term, succ) in zip(ids, self.pool.call(ids, "step", calls)):
            self._obs[i] = obs
            reward[i], terminated[i], success[i] = float(r), bool(term), bool(succ)
        return reward, terminated, success

    def step_chunk(self, actions, active, steps_left, stop_on_terminate: bool, next_reset_ids=None):
        """Actions [N, k, A]: each active worker runs its whole chunk in one round trip (`run_chunk`), instead of k
        lock-step calls; one whose episode ends starts the next from `next_reset_ids[i]` when that is not None.
        -> reward, terminated, success, each [N, k] (zeros after an env's last executed step)."""
        import torch

        if self._prepared:  # the caller ended those episodes elsewhere than the workers did: their states are lost
            raise RuntimeError(f"envs {sorted(self._prepared)} began an episode in their last chunk that no reset "
                               "asked for: the caller and the workers disagree on where the episode ended")
        ids = [i for i in range(self.num_envs) if active[i]]
        acts = actions.detach().cpu().numpy()
        k = acts.shape[1]
        reward = torch.zeros(self.num_envs, k)
        terminated = torch.zeros(self.num_envs, k, dtype=torch.bool)
        success = torch.zeros(self.num_envs, k, dtype=torch.bool)
        upcoming = [None if next_reset_ids is None else next_reset_ids[i] for i in ids]
        calls = [(acts[i], int(steps_left[i]), stop_on_terminate, rid) for i, rid in zip(ids, upcoming)]
        for i, rid, (obs, r, term, succ, reset_obs) in zip(ids, upcoming, self.pool.call(ids, "__chunk__", calls)):
            self._obs[i], m = obs, len(r)
            reward[i, :m], terminated[i, :m], success[i, :m] = torch.tensor(r), torch.tensor(term), torch.tensor(succ)
            if reset_obs is not None:
                self._prepared[i] = (int(rid), reset_obs)
        return reward, terminated, success

    def observation(self) -> dict[str, Any]:
        if any(o is None for o in self._obs):
            raise RuntimeError("call reset() before step() or observation()")
        return stack_observations(self._obs, self.device)

    def close(self) -> None:
        self.pool.close()
