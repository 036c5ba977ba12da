"""Replay-buffer benchmark: durable append and sampling of `common.replay_buffer` vs an in-RAM numpy ring buffer.

- Durable append: transitions/s through `ReplayBuffer.add` (each segment fsynced and renamed into place before `add`
  returns), for state transitions (state 32-D float32) and image transitions (128x128x3 uint8 + 8-D state), with
  segments of `segment_len` steps.
- Sampling: batches of 256 transitions (obs, next_obs, action, reward, flags) per second, from the RAM cache (all hits)
  and from files (a cache too small to hold the window: all misses), vs a preallocated numpy ring buffer of the same
  capacity sampled with the same fancy indexing.

    python benchmarks/replay_buffer.py        # writes benchmarks/results/replay_buffer.{md,json,png}
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tyro

from benchmarks.report import RESULTS_DIR, pyplot, write_results
from common.replay_buffer import ReplayBuffer


@dataclass
class Args:
    segment_len: int = 200
    """steps per segment (an episode of a 20-second task at 10 Hz)"""
    state_segments: int = 100
    """segments in the state-transition runs"""
    image_segments: int = 20
    """segments in the image-transition runs"""
    batch_size: int = 256
    """sampling batch size"""
    sample_batches: int = 200
    """batches timed per sampling run"""
    seed: int = 0
    """seed of the data and the sampling"""
    out_dir: Path = RESULTS_DIR
    """where replay_buffer.{md,json,png} go"""


def make_segment(rng, T: int, image: bool) -> dict:
    obs = {"state": rng.standard_normal((T + 1, 8 if image else 32)).astype(np.float32)}
    if image:
        obs["image"] = rng.integers(0, 255, (T + 1, 128, 128, 3), dtype=np.uint8)
    return {"obs": obs, "actions": rng.standard_normal((T, 7)).astype(np.float32),
            "rewards": rng.standard_normal(T).astype(np.float32), "terminated": np.zeros(T, bool),
            "truncated": np.zeros(T, bool)}


class RamRing:
    """The reference: preallocated numpy arrays, obs stored per transition with its next obs, uniform sampling."""

    def __init__(self, capacity: int, seg: dict):
        self.cap, self.n, self.pos = capacity, 0, 0
        self.obs = {k: np.zeros((capacity, *v.shape[1:]), v.dtype) for k, v in seg["obs"].items()}
        self.next_obs = {k: np.zeros((capacity, *v.shape[1:]), v.dtype) for k, v in seg["obs"].items()}
        self.step = {k: np.zeros((capacity, *seg[k].shape[1:]), seg[k].dtype)
                     for k in ("actions", "rewards", "terminated", "truncated")}

    def add(self, seg: dict) -> None:
        T = len(seg["actions"])
        idx = (self.pos + np.arange(T)) % self.cap
        for k, v in seg["obs"].items():
            self.obs[k][idx], self.next_obs[k][idx] = v[:-1], v[1:]
        for k in self.step:
            self.step[k][idx] = seg[k]
        self.pos, self.n = (self.pos + T) % self.cap, min(self.cap, self.n + T)

    def sample(self, batch: int, rng) -> dict:
        i = rng.integers(self.n, size=batch)
        return {"obs": {k: v[i] for k, v in self.obs.items()}, "next_obs": {k: v[i] for k, v in self.next_obs.items()},
                **{k: v[i] for k, v in self.step.items()}}


def sample_rate(sample, batches: int) -> float:
    sample()
    start = time.perf_counter()
    for _ in range(batches):
        sample()
    return batches / (time.perf_counter() - start)


def main(args: Args) -> None:
    rows = []
    T = args.segment_len
    for kind, n_seg in (("state", args.state_segments), ("image 128x128x3", args.image_segments)):
        image = kind != "state"
        rng = np.random.default_rng(args.seed)
        segments = [make_segment(rng, T, image) for _ in range(n_seg)]
        capacity = n_seg * (T + 1)
        tmp = Path(tempfile.mkdtemp(prefix="bench_buffer_"))
        try:
            buf = ReplayBuffer(tmp / "buf", cache_transitions=capacity)
            start = time.perf_counter()
            for seg in segments:
                buf.add(seg)
            append = n_seg * T / (time.perf_counter() - start)
            ring = RamRing(capacity, segments[0])
            start = time.perf_counter()
            for seg in segments:
                ring.add(seg)
            ring_append = n_seg * T / (time.perf_counter() - start)
            srng = np.random.default_rng(args.seed)
            ring_rate = sample_rate(lambda: ring.sample(args.batch_size, srng), args.sample_batches)
            hit_rate = sample_rate(lambda: buf.sample(args.batch_size, srng), args.sample_batches)
            assert buf.stats["cache_misses"] == 0
            # reopened with room for one segment: RAM holds the newest (warmed on open), so nearly every draw reads
            # the files; the share of draws served from RAM is reported (files_hit_share)
            cold = ReplayBuffer.open(tmp / "buf", cache_transitions=T + 1, readonly=True)
            miss_rate = sample_rate(lambda: cold.sample(args.batch_size, srng), max(10, args.sample_batches // 10))
            hit_share = cold.stats["cache_hits"] / max(1, cold.stats["cache_hits"] + cold.stats["cache_misses"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append({"transitions": kind, "durable_append_per_s": round(append, 1),
                     "ram_ring_append_per_s": round(ring_append, 1),
                     "sample_batches_per_s_cache": round(hit_rate, 1),
                     "sample_batches_per_s_files": round(miss_rate, 1),
                     "ram_ring_batches_per_s": round(ring_rate, 1),
                     "cache_vs_ram_ring": round(hit_rate / ring_rate, 2),
                     "files_hit_share": round(hit_share, 3)})
        print(rows[-1], flush=True)

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(rows))
    a.bar(x - 0.2, [r["durable_append_per_s"] for r in rows], 0.4, label="ours, durable (fsync)")
    a.bar(x + 0.2, [r["ram_ring_append_per_s"] for r in rows], 0.4, label="RAM ring (nothing on disk)")
    a.set_xticks(x, [r["transitions"] for r in rows])
    a.set_yscale("log")
    a.set_title("append, transitions / s")
    a.legend(fontsize=8)
    for off, key, label in ((-0.27, "sample_batches_per_s_cache", "ours, RAM cache"),
                            (0.0, "sample_batches_per_s_files", "ours, from files"),
                            (0.27, "ram_ring_batches_per_s", "RAM ring")):
        b.bar(x + off, [r[key] for r in rows], 0.27, label=label)
    b.set_xticks(x, [r["transitions"] for r in rows])
    b.set_yscale("log")
    b.set_title(f"sampling, batches of {args.batch_size} / s")
    b.legend(fontsize=8)
    notes = (f"Segments of {T} steps; {args.state_segments} state segments (32-D state), {args.image_segments} image "
             f"segments (128x128x3 uint8 + 8-D state); 7-D actions. Durable append: each segment written to an HDF5 "
             f"file (uncompressed), fsynced, renamed, directory fsynced, index line appended and fsynced, before "
             f"`add` returns. Sampling returns obs and next_obs for every row. `files` = a buffer reopened with a "
             f"one-segment cache, so nearly every row is read from its segment file (one read per file per batch). "
             f"Targets: durable append >= 10k state transitions/s; sampling from the cache >= 0.5x the RAM ring.")
    path = write_results("replay_buffer", "Replay buffer: durable append and sampling vs a RAM ring",
                         ["transitions", "durable_append_per_s", "ram_ring_append_per_s",
                          "sample_batches_per_s_cache", "sample_batches_per_s_files", "ram_ring_batches_per_s",
                          "cache_vs_ram_ring", "files_hit_share"], rows, seeds=[args.seed], notes=notes,
                         out_dir=args.out_dir, figure=fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
