"""The shared episode logic of common.vec_env.BatchedEnv, against a tiny deterministic backend."""

import numpy as np
import pytest
import torch

from common.vec_env import Backend, BatchedEnv


class CountingBackend(Backend):
    """state = [reset_id, steps taken]; reward 1 per step (or the success level); terminates with success after
    `term_after[i]` steps (0 = never)."""

    def __init__(self, num_envs, term_after, level_reward=False, step_inactive=False):
        self.num_envs, self.action_dim, self.device = num_envs, 2, torch.device("cpu")
        self.term_after, self.level_reward = list(term_after), level_reward
        self.step_inactive = step_inactive  # like a GPU batch simulator, which cannot leave an env out
        self.state = np.zeros((num_envs, 2), np.float32)
        self.step_calls = np.zeros(num_envs, int)
        self.reset_log = []
        self.observe_log = []

    def reset(self, env_ids, reset_ids):
        for i, r in zip(env_ids, reset_ids):
            self.state[i] = (r, 0)
            self.reset_log.append((i, r))

    def step(self, actions, active, observe):
        assert actions.shape == (self.num_envs, 2)
        self.observe_log.append(observe.copy())
        self.state[np.ones_like(active) if self.step_inactive else active, 1] += 1
        self.step_calls[active] += 1
        success = torch.tensor([t > 0 and s >= t for s, t in zip(self.state[:, 1], self.term_after)])
        reward = success.float() if self.level_reward else torch.ones(self.num_envs)
        return reward, success.clone(), success

    def observation(self):
        return {"state": torch.from_numpy(self.state.copy()), "images": {"main": torch.zeros(self.num_envs, 4, 4, 3,
                dtype=torch.uint8)}, "task_description": [f"env {i}" for i in range(self.num_envs)]}


def make(term_after=(0, 0), max_steps=10, **kw):
    backend = CountingBackend(len(term_after), term_after, level_reward=kw.pop("level_reward", False),
                              step_inactive=kw.pop("step_inactive", False))
    return BatchedEnv(backend, max_episode_steps=max_steps, num_reset_ids=kw.pop("num_reset_ids", 100), **kw), backend


def test_single_step_shapes():
    env, _ = make()
    obs = env.reset(seed=0)
    assert obs["state"].shape == (2, 2) and obs["images"]["main"].dtype == torch.uint8
    obs, r, term, trunc, info = env.step(torch.zeros(2, 2))
    assert r.shape == (2,) and term.shape == trunc.shape == (2,) and term.dtype == torch.bool
    assert obs["state"][:, 1].tolist() == [1, 1] and info["executed_steps"].tolist() == [1, 1]


def test_chunk_stops_env_at_termination_and_autoresets_with_final_obs():
    env, backend = make(term_after=(2, 0), max_steps=10)
    env.reset(reset_ids=[5, 6])
    obs, r, term, trunc, info = env.step(torch.zeros(2, 4, 2))
    assert r.shape == (2, 4)
    assert r[0].tolist() == [1, 1, 0, 0] and r[1].tolist() == [1, 1, 1, 1]  # env 0 stops after its 2nd step
    assert backend.step_calls.tolist() == [2, 4]
    assert term.tolist() == [True, False] and trunc.tolist() == [False, False]
    assert info["done"].tolist() == [True, False]
    assert info["final_observation"]["state"][0].tolist() == [5, 2]  # the terminal state, for bootstrapping
    ep = info["episode"]
    assert ep["length"][0] == 2 and ep["return"][0] == 2 and ep["success_once"][0] and ep["success_at_end"][0]
    assert ep["reset_id"][0] == 5
    assert obs["state"][0, 1] == 0 and obs["state"][1].tolist() == [6, 4]  # env 0 already restarted
    assert env.lengths.tolist() == [0, 4] and env.returns.tolist() == [0, 4]


def test_truncation_at_max_steps_and_episode_stats():
    env, _ = make(term_after=(0, 0), max_steps=3)
    env.reset()
    _, _, term, trunc, info = env.step(torch.zeros(2, 5, 2))
    assert trunc.tolist() == [True, True] and not term.any()
    assert info["executed_steps"].tolist() == [3, 3] and info["episode"]["length"].tolist() == [3, 3]
    assert not info["episode"]["success_once"].any()


def test_ignore_terminations_keeps_running_and_counts_success_once():
    env, _ = make(term_after=(2, 0), max_steps=4, ignore_terminations=True)
    env.reset()
    _, r, term, trunc, info = env.step(torch.zeros(2, 4, 2))
    assert not term.any() and trunc.all() and info["executed_steps"].tolist() == [4, 4]
    assert info["episode"]["success_once"].tolist() == [True, False]
    assert info["episode"]["success_at_end"].tolist() == [True, False]


def test_without_auto_reset_done_envs_freeze():
    env, backend = make(term_after=(1, 0), max_steps=10, auto_reset=False)
    env.reset()
    env.step(torch.zeros(2, 2))
    obs, r, term, trunc, info = env.step(torch.zeros(2, 2))
    assert info["executed_steps"].tolist() == [0, 1] and r.tolist() == [0, 1] and not term[0]
    assert backend.step_calls.tolist() == [1, 2] and obs["state"][0].tolist()[1] == 1


def test_relative_reward_pays_the_level_once():
    env, _ = make(term_after=(2, 0), max_steps=6, level_reward=True, relative_reward=True, ignore_terminations=True)
    env.reset()
    _, r, _, _, info = env.step(torch.zeros(2, 6, 2))
    assert r[0].tolist() == [0, 1, 0, 0, 0, 0] and r[1].sum() == 0
    assert info["episode"]["return"].tolist() == [1, 0]


def test_eval_mode_walks_each_reset_id_once_in_order():
    env, backend = make(term_after=(1, 1), max_steps=5, eval_mode=True, num_eval_episodes=5)
    env.reset()
    seen = []
    for _ in range(10):
        _, _, _, _, info = env.step(torch.zeros(2, 2))
        if "episode" in info:
            seen += info["episode"]["reset_id"][info["done"]].tolist()
        if env.eval_complete:
            break
    assert env.eval_complete and sorted(seen) == [0, 1, 2, 3, 4]
    assert [r for _, r in backend.reset_log] == [0, 1, 2, 3, 4]
    assert [i for i, _ in backend.reset_log] == [0, 1, 0, 1, 0]  # dealt round-robin
    _, _, _, _, info = env.step(torch.zeros(2, 2))
    assert info["executed_steps"].tolist() == [0, 0]


def test_an_eval_with_fewer_episodes_than_envs_is_refused():
    with pytest.raises(ValueError, match="an eval of 1 episodes on 2 envs.*at most 1 envs"):
        make(term_after=(1, 1), eval_mode=True, num_eval_episodes=1)


def test_random_reset_ids_are_seeded():
    a, _ = make()
    b, _ = make()
    assert a.reset(seed=3)["state"].tolist() == b.reset(seed=3)["state"].tolist()
    assert a.reset(seed=3)["state"].tolist() != a.reset(seed=4)["state"].tolist()


@pytest.mark.parametrize(
    "actions, err, match",
    [
        (torch.zeros(3, 2), ValueError, r"num_envs=2"),
        (torch.zeros(2, 5), ValueError, r"shape"),
        (torch.zeros(2, 0, 2), ValueError, r"at least one step"),
        (torch.zeros(2, 2, dtype=torch.long), TypeError, r"floating"),
        (np.zeros((2, 2), dtype=np.int32), TypeError, r"floating"),
        ([[0.0, 0.0], [0.0, 0.0]], TypeError, r"torch.Tensor or numpy"),
        (torch.full((2, 2), float("nan")), ValueError, r"NaN"),
    ],
)
def test_bad_actions_raise_clear_errors(actions, err, match):
    env, _ = make()
    env.reset()
    with pytest.raises(err, match=match):
        env.step(actions)


def test_bad_reset_ids_raise():
    env, _ = make(num_reset_ids=10)
    with pytest.raises(ValueError, match="out of range"):
        env.reset(reset_ids=[0, 10])
    with pytest.raises(ValueError, match="one id per env"):
        env.reset(reset_ids=[0])


def test_reset_id_sets_keep_each_env_to_its_own_initial_states():
    env, backend = make(term_after=(1, 1), max_steps=5, num_reset_ids=10, reset_id_sets=[[0, 1, 2], [7]])
    env.reset(seed=0)
    for _ in range(30):  # every step ends both episodes: 31 draws per env
        env.step(torch.zeros(2, 2))
    drawn = {i: {r for j, r in backend.reset_log if j == i} for i in (0, 1)}
    assert drawn[0] == {0, 1, 2} and drawn[1] == {7}  # each env draws from its whole set, and only from it
    ev, eb = make(num_reset_ids=4, reset_id_sets=[[0], [1]], eval_mode=True)  # an eval walks every id regardless
    ev.reset()
    assert sorted(r for _, r in eb.reset_log) == [0, 1]
    for bad in ([[0]], [[0], []], [[0], [10]], [[0], [-1]]):
        with pytest.raises(ValueError, match="one non-empty set"):
            make(num_reset_ids=10, reset_id_sets=bad)


def test_actions_are_clipped_to_the_action_space():
    env, backend = make(action_low=-1.0, action_high=1.0)
    env.reset()
    seen = {}
    original = backend.step
    backend.step = lambda a, m, o: (seen.setdefault("a", a.clone()), original(a, m, o))[1]
    env.step(torch.tensor([[5.0, -5.0], [0.5, 0.0]], dtype=torch.float64))
    assert seen["a"].tolist() == [[1.0, -1.0], [0.5, 0.0]] and seen["a"].dtype == torch.float32


def test_only_observations_someone_sees_are_requested():
    env, backend = make(term_after=(0, 0), max_steps=5)
    env.reset()
    env.step(torch.zeros(2, 3, 2))
    assert [o.tolist() for o in backend.observe_log] == [[False, False], [False, False], [True, True]]
    backend.observe_log.clear()
    env.step(torch.zeros(2, 3, 2))  # the episode's last step (5) falls inside the chunk: it is observed
    assert [o.tolist() for o in backend.observe_log] == [[False, False], [True, True]]


def test_final_observation_is_the_terminal_one_even_when_the_simulator_keeps_stepping():
    env, backend = make(term_after=(2, 0), max_steps=10, step_inactive=True)
    env.reset(reset_ids=[1, 2])
    _, r, term, _, info = env.step(torch.zeros(2, 5, 2))
    assert term.tolist() == [True, False] and r[0].tolist() == [1, 1, 0, 0, 0]
    assert info["final_observation"]["state"][0].tolist() == [1, 2]  # taken at its 2nd step, not after 5


class CountingWorkerEnv:
    """A worker-process env for `SubprocBackend`: state [reset_id, steps]; terminates with success after
    `(reset_id % 5) + 1` steps when the reset id is odd, never when it is even."""

    def reset(self, reset_id):
        self.rid, self.steps = reset_id, 0
        return self._obs()

    def _obs(self):
        return {"state": np.array([self.rid, self.steps], np.float32), "task_description": "count"}

    def step(self, action, observe=True):
        self.steps += 1
        done = self.rid % 2 == 1 and self.steps >= self.rid % 5 + 1
        return self._obs(), float(action[0]) + self.steps, done, done

    def close(self):
        pass


@pytest.mark.parametrize("ignore_terminations,eval_mode", [(False, False), (True, False), (False, True)])
def test_worker_chunks_in_one_round_trip_match_lock_step_stepping(ignore_terminations, eval_mode):
    """Chunks answered in one round trip, with the next episode begun in it, give exactly what lock-step calls and
    separate resets give; the chunked workers get no reset call after the first."""
    from common.subproc import SubprocBackend, WorkerPool

    class LockStep(SubprocBackend):  # the same workers without step_chunk: one call per step, resets on their own
        step_chunk = None

    runs, methods = [], []
    for backend_cls in (SubprocBackend, LockStep):
        pool = WorkerPool(CountingWorkerEnv, [{}] * 3, timeout=20)
        calls, call = [], pool.call
        pool.call = lambda ids, method, args=None: (calls.append(method), call(ids, method, args))[1]
        try:
            env = BatchedEnv(backend_cls(pool, 2), max_episode_steps=7, num_reset_ids=40, seed=3,
                             ignore_terminations=ignore_terminations, eval_mode=eval_mode, num_eval_episodes=20)
            assert (env.backend.step_chunk is not None) == (backend_cls is SubprocBackend)
            out = [env.reset()]
            gen = torch.Generator().manual_seed(0)
            for _ in range(12):
                out.append(env.step(torch.rand(3, 4, 2, generator=gen)))
            runs.append(out)
            methods.append(calls)
        finally:
            pool.close()
    assert methods[0].count("reset") == 1 and methods[0].count("__chunk__") == 12
    assert methods[1].count("reset") > 3  # the lock-step run reset its workers after every episode
    fast, slow = runs
    assert torch.equal(fast[0]["state"], slow[0]["state"])
    saw_mid_chunk_end = False
    for (o1, r1, t1, tr1, i1), (o2, r2, t2, tr2, i2) in zip(fast[1:], slow[1:]):
        assert torch.equal(o1["state"], o2["state"]) and torch.equal(r1, r2)
        assert torch.equal(t1, t2) and torch.equal(tr1, tr2) and torch.equal(i1["executed_steps"], i2["executed_steps"])
        assert ("final_observation" in i1) == ("final_observation" in i2)
        if "final_observation" in i1:
            assert torch.equal(i1["final_observation"]["state"], i2["final_observation"]["state"])
            for key in ("return", "length", "success_once", "reset_id"):
                assert torch.equal(i1["episode"][key], i2["episode"][key])
        saw_mid_chunk_end |= bool(((i1["executed_steps"] > 0) & (i1["executed_steps"] < 4)).any())
    assert saw_mid_chunk_end  # episodes ended inside chunks (terminations or the 7-step limit)
