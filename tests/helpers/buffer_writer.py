"""Adds deterministic segments to a replay buffer forever, printing "durable ID SEED" after each add returns.
The kill -9 test kills it at random moments and checks every reported segment afterwards."""

import sys

import numpy as np

from common.replay_buffer import ReplayBuffer


def make_segment(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    T = int(rng.integers(5, 40))
    return {
        "obs": {"image": rng.integers(0, 255, (T + 1, 16, 16, 3), dtype=np.uint8),
                "state": rng.standard_normal((T + 1, 5)).astype(np.float32)},
        "actions": rng.standard_normal((T, 3)).astype(np.float32),
        "rewards": rng.standard_normal(T).astype(np.float32),
        "terminated": rng.random(T) < 0.1,
        "truncated": np.zeros(T, bool),
        "policy_version": np.full(T, seed, np.int64),
        "intervention": rng.random(T) < 0.2,
        "extras": {"chain": rng.standard_normal((T, 4, 3)).astype(np.float32)},
    }


if __name__ == "__main__":
    directory, first_seed = sys.argv[1], int(sys.argv[2])
    buf = ReplayBuffer(directory, compression=(sys.argv[3] or None) if len(sys.argv) > 3 else None)
    seed = first_seed
    while True:
        seg_id = buf.add(make_segment(seed), meta={"seed": seed})
        print(f"durable {seg_id} {seed}", flush=True)
        seed += 1
