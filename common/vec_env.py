"""The batched env API that every simulator wrapper in `common/` shares.

    env = make_maniskill_env(...) or make_libero_env(...)      # both return a `BatchedEnv`
    obs = env.reset()                                          # dict: state [N, D] float32, images {cam: [N, H, W, 3]
                                                               #       uint8} (if any), task_description list[str]
    obs, reward, terminated, truncated, info = env.step(actions)

`actions` is [N, A] (one step, `reward` is [N]) or [N, k, A] (a chunk of k actions from one policy call, `reward` is
[N, k]). Within a chunk an env that terminates or hits its time limit stops executing the rest of its chunk (those
rewards are 0); `terminated` / `truncated` are collapsed onto the chunk. All outputs are torch tensors on `device`.

Auto-reset happens at the chunk boundary. For every env that finished, `info["done"]` is True and
`info["final_observation"]` holds its last observation (for value bootstrapping), `info["episode"]` its return, length,
`success_once` (success at any step), `success_at_end` (success at its last step) and the reset id it ran. The returned
`obs` is already the first observation of the next episode.

Reset ids select initial states (ManiSkill: the episode seed; LIBERO: a (task, init state) pair). Training draws them
at random from a seeded generator (with `reset_id_sets`, env i only from `reset_id_sets[i]`: LIBERO gives each env its
own tasks so that a reset never rebuilds a simulator while the other envs wait); `eval_mode` deals
0..num_eval_episodes-1 round-robin to the envs, each exactly once, and an env whose share is used up stops
(`info["executed_steps"] == 0`, `env.eval_complete` once all have).

The simulator-specific part is a `Backend` (see the class below); everything about episodes lives here, once.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


class Backend:
    """What a simulator wrapper implements. All batch dimensions are `num_envs`.

    Optional: `step_chunk(actions [N, k, A], active, steps_left [N], stop_on_terminate) -> reward, terminated,
    success ([N, k] each)`, where each active env runs its chunk on its own until the chunk ends, it has run
    `steps_left` steps, or (with `stop_on_terminate`) it terminates, leaving its last observation current. Worker
    processes use it to answer a chunk in one round trip (`common.subproc.SubprocBackend`). A backend with
    `resets_in_chunk = True` also takes `next_reset_ids` (an id or None per env): an env whose episode ends in the
    chunk starts the next one from that id right away, and the `reset` call that follows for it must then return that
    prepared episode (its observation until then stays the episode's last one)."""

    num_envs: int
    action_dim: int
    device: torch.device

    def reset(self, env_ids: Sequence[int], reset_ids: Sequence[int]) -> None:
        """Start new episodes in `env_ids` from the initial states named by `reset_ids`."""
        raise NotImplementedError

    def step(self, actions: torch.Tensor, active: np.ndarray,
             observe: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply actions [N, A] to the envs where `active` is True; return reward, terminated, success (each [N]).
        Rows of inactive envs are ignored by the caller (a batched simulator may step them anyway). Where `observe` is
        False nobody will look at the observation after this step (a step inside a chunk), so a backend may skip
        rendering it; a step that terminates must still leave a fresh observation."""
        raise NotImplementedError

    def observation(self) -> dict[str, Any]:
        """The latest observation of every env, batched."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _clone_obs(obs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in obs.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.clone()
        elif isinstance(value, dict):
            out[key] = _clone_obs(value)
        else:
            out[key] = list(value)
    return out


def _merge_obs(dst: dict[str, Any], src: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    """Rows of `src` where `mask`, rows of `dst` elsewhere."""
    out = {}
    for key, value in dst.items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.where(mask.view(-1, *([1] * (value.dim() - 1))), src[key], value)
        elif isinstance(value, dict):
            out[key] = _merge_obs(value, src[key], mask)
        else:
            out[key] = [s if m else d for d, s, m in zip(value, src[key], mask.tolist())]
    return out


class BatchedEnv:
    def __init__(
        self,
        backend: Backend,
        *,
        max_episode_steps: int,
        num_reset_ids: int,
        auto_reset: bool = True,
        ignore_terminations: bool = False,
        relative_reward: bool = False,
        eval_mode: bool = False,
        num_eval_episodes: int | None = None,
        seed: int = 0,
        action_low: float | np.ndarray | None = None,
        action_high: float | np.ndarray | None = None,
        reset_id_sets: Sequence[Sequence[int]] | None = None,
    ):
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.backend = backend
        self.num_envs, self.action_dim, self.device = backend.num_envs, backend.action_dim, backend.device
        self.max_episode_steps = max_episode_steps
        self.num_reset_ids = num_reset_ids
        self.auto_reset, self.ignore_terminations, self.relative_reward = auto_reset, ignore_terminations, relative_reward
        self.eval_mode = eval_mode
        self.num_eval_episodes = num_reset_ids if num_eval_episodes is None else num_eval_episodes
        if eval_mode and not 1 <= self.num_eval_episodes <= num_reset_ids:
            raise ValueError(f"num_eval_episodes must be in [1, {num_reset_ids}], got {self.num_eval_episodes}")
        if eval_mode and self.num_eval_episodes < self.num_envs:  # (a worker never reset has no observation to give)
            raise ValueError(f"an eval of {self.num_eval_episodes} episodes on {self.num_envs} envs leaves an env "
                             f"without an episode: use at most {self.num_eval_episodes} envs")
        self.action_low, self.action_high = action_low, action_high
        if reset_id_sets is not None:
            reset_id_sets = [np.asarray(ids, dtype=np.int64) for ids in reset_id_sets]
            if len(reset_id_sets) != backend.num_envs or any(ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or
                                                             ids.max() >= num_reset_ids for ids in reset_id_sets):
                raise ValueError(f"reset_id_sets needs one non-empty set of ids in [0, {num_reset_ids}) per env "
                                 f"({backend.num_envs})")
        self.reset_id_sets = reset_id_sets
        self._rng = np.random.default_rng(seed)
        n, dev = self.num_envs, self.device
        self.returns = torch.zeros(n, device=dev)
        self.lengths = torch.zeros(n, dtype=torch.long, device=dev)
        self.success_once = torch.zeros(n, dtype=torch.bool, device=dev)
        self.last_success = torch.zeros(n, dtype=torch.bool, device=dev)
        self._prev_level = torch.zeros(n, device=dev)
        self.reset_ids = np.full(n, -1, dtype=np.int64)
        self.stopped = np.ones(n, dtype=bool)  # done without auto-reset, or eval share used up
        self._eval_next = np.zeros(n, dtype=np.int64)
        self._drawn: list[int | None] = [None] * n  # a training draw made ahead (`_upcoming_reset_id`), not used yet

    # ---------------------------------------------------------------- reset ids
    def _upcoming_reset_id(self, env_id: int) -> int | None:
        """The reset id this env's next episode will start from (None: it stops), without using it up: a training draw
        is made now and kept until `_next_reset_id` takes it."""
        if self.eval_mode:
            rid = env_id + self._eval_next[env_id] * self.num_envs
            return int(rid) if rid < self.num_eval_episodes else None
        if self._drawn[env_id] is None:
            ids = self.reset_id_sets[env_id] if self.reset_id_sets is not None else None
            self._drawn[env_id] = int(self._rng.integers(self.num_reset_ids) if ids is None else
                                      ids[self._rng.integers(len(ids))])
        return self._drawn[env_id]

    def _next_reset_id(self, env_id: int) -> int | None:
        rid = self._upcoming_reset_id(env_id)
        if self.eval_mode and rid is not None:
            self._eval_next[env_id] += 1
        self._drawn[env_id] = None
        return rid

    @property
    def eval_complete(self) -> bool:
        return bool(self.eval_mode and self.stopped.all())

    def _start_episodes(self, env_ids: Sequence[int], reset_ids: Sequence[int] | None = None) -> None:
        run_ids, run_resets = [], []
        for j, i in enumerate(env_ids):
            rid = self._next_reset_id(i) if reset_ids is None else int(reset_ids[j])
            if rid is None:
                self.stopped[i] = True
                continue
            if not 0 <= rid < self.num_reset_ids:
                raise ValueError(f"reset id {rid} is out of range [0, {self.num_reset_ids})")
            run_ids.append(i)
            run_resets.append(rid)
        if run_ids:
            self.backend.reset(run_ids, run_resets)
            idx = torch.as_tensor(run_ids, device=self.device)
            for t in (self.returns, self.lengths, self.success_once, self.last_success, self._prev_level):
                t[idx] = 0
            self.reset_ids[run_ids] = run_resets
            self.stopped[run_ids] = False

    @property
    def rng_state(self) -> dict:
        """The state of the initial-state draw (JSON-able): a resumed run restores it to go on drawing new states."""
        return self._rng.bit_generator.state

    @rng_state.setter
    def rng_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state
        self._drawn = [None] * self.num_envs

    def reset(self, seed: int | None = None, reset_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """Reset every env. `reset_ids` (one per env) pins the initial states; otherwise they are drawn (training) or
        the eval walk restarts from the beginning (eval_mode). `seed` reseeds the draw."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self._drawn = [None] * self.num_envs
        if reset_ids is not None and len(reset_ids) != self.num_envs:
            raise ValueError(f"reset_ids needs one id per env ({self.num_envs}), got {len(reset_ids)}")
        self._eval_next[:] = 0
        self.stopped[:] = True
        self._start_episodes(range(self.num_envs), reset_ids)
        return self.backend.observation()

    # ---------------------------------------------------------------- step
    def _check_actions(self, actions) -> torch.Tensor:
        if isinstance(actions, np.ndarray):
            if not np.issubdtype(actions.dtype, np.floating):
                raise TypeError(f"actions must be a floating-point array (float32 or float64), got dtype {actions.dtype}")
            actions = torch.from_numpy(actions)
        elif not isinstance(actions, torch.Tensor):
            raise TypeError(f"actions must be a torch.Tensor or numpy array, got {type(actions).__name__}")
        if not actions.is_floating_point():
            raise TypeError(f"actions must be a floating-point tensor (float32 or float64), got dtype {actions.dtype}")
        shape = tuple(actions.shape)
        if actions.dim() not in (2, 3) or shape[0] != self.num_envs or shape[-1] != self.action_dim:
            raise ValueError(
                f"actions must have shape (num_envs={self.num_envs}, {self.action_dim}) for one step or "
                f"(num_envs={self.num_envs}, k, {self.action_dim}) for a chunk of k steps; got {shape}"
            )
        if actions.dim() == 3 and shape[1] < 1:
            raise ValueError("an action chunk needs at least one step (k >= 1)")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")
        actions = actions.to(device=self.device, dtype=torch.float32)
        if self.action_low is not None:
            actions = torch.clamp(
                actions,
                torch.as_tensor(self.action_low, dtype=torch.float32, device=self.device),
                torch.as_tensor(self.action_high, dtype=torch.float32, device=self.device),
            )
        return actions if actions.dim() == 3 else actions.unsqueeze(1)

    def step(self, actions):
        chunked = isinstance(actions, (torch.Tensor, np.ndarray)) and actions.ndim == 3
        actions = self._check_actions(actions)
        n, k, dev = self.num_envs, actions.shape[1], self.device
        rewards = torch.zeros(n, k, device=dev)
        terminated = torch.zeros(n, dtype=torch.bool, device=dev)
        truncated = torch.zeros(n, dtype=torch.bool, device=dev)
        executed = torch.zeros(n, dtype=torch.long, device=dev)
        active = ~self.stopped.copy()
        # A batched simulator keeps stepping an env that finished inside the chunk, so its terminal observation is
        # taken when it finishes, not at the end of the chunk.
        captured, captured_mask = None, torch.zeros(n, dtype=torch.bool, device=dev)
        chunk_result = None
        # the next episode's initial state of every running env, drawn before the step whatever the backend (the
        # same seed then gives the same episodes with every backend)
        upcoming = [self._upcoming_reset_id(i) if active[i] and self.auto_reset else None for i in range(n)]
        # A backend that can run a chunk by itself gets one call; the loop below replays its per-step results.
        if k > 1 and getattr(self.backend, "step_chunk", None) is not None:
            steps_left = (self.max_episode_steps - self.lengths).cpu().numpy()
            extra = {}
            if getattr(self.backend, "resets_in_chunk", False):
                # each worker whose episode ends in this chunk starts its next one in the same round trip, while the
                # others still step, instead of in a reset call of its own after the chunk that the others wait out
                extra["next_reset_ids"] = upcoming
            chunk_result = self.backend.step_chunk(actions, active.copy(), steps_left, not self.ignore_terminations,
                                                   **extra)
        for j in range(k):
            if not active.any():
                break
            if chunk_result is None:
                # Observations inside a chunk are never seen: only the last step's, and that of an episode's last step.
                observe = np.full(n, j == k - 1) | (self.lengths + 1 >= self.max_episode_steps).cpu().numpy()
                reward, term, success = self.backend.step(actions[:, j], active, observe)
            else:
                reward, term, success = (x[:, j] for x in chunk_result)
            mask = torch.as_tensor(active, device=dev)
            reward, term, success = reward.to(dev).float(), term.to(dev).bool(), success.to(dev).bool()
            if self.relative_reward:  # the env reports a level; pay out its change so an episode sums to the final level
                reward, level = reward - self._prev_level, reward
                self._prev_level = torch.where(mask, level, self._prev_level)
            reward = torch.where(mask, reward, torch.zeros_like(reward))
            rewards[:, j] = reward
            self.returns += reward
            self.lengths += mask.long()
            executed += mask.long()
            self.success_once |= success & mask
            self.last_success = torch.where(mask, success, self.last_success)
            if self.ignore_terminations:
                term = torch.zeros_like(term)
            term = term & mask
            trunc = mask & ~term & (self.lengths >= self.max_episode_steps)
            terminated |= term
            truncated |= trunc
            finished = term | trunc
            active &= ~finished.cpu().numpy()
            if chunk_result is None and j < k - 1 and finished.any() and active.any():
                now = _clone_obs(self.backend.observation())
                captured = now if captured is None else _merge_obs(captured, now, finished)
                captured_mask |= finished

        done = terminated | truncated
        obs = self.backend.observation()
        info: dict[str, Any] = {"success": self.last_success.clone(), "executed_steps": executed, "done": done}
        if done.any():
            done_ids = torch.nonzero(done).flatten().tolist()
            final = _clone_obs(obs)
            info["final_observation"] = final if captured is None else _merge_obs(final, captured, captured_mask)
            info["episode"] = {
                "return": self.returns.clone(),
                "length": self.lengths.clone(),
                "success_once": self.success_once.clone(),
                "success_at_end": self.last_success.clone(),
                "reset_id": torch.as_tensor(self.reset_ids.copy(), device=dev),
            }
            self.stopped[done_ids] = True
            if self.auto_reset:
                self._start_episodes(done_ids)
                obs = _merge_obs(obs, self.backend.observation(), done)
        return obs, (rewards if chunked else rewards[:, 0]), terminated, truncated, info

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
