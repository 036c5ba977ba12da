"""common.replay_buffer: durability under kill -9, recovery, sampling window, cache, mixing, concurrency."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.replay_buffer import BufferError, ReplayBuffer, sample_mixed
from tests.helpers.buffer_writer import make_segment

ROOT = Path(__file__).resolve().parents[1]


def assert_segment_equal(got: dict, want: dict) -> None:
    for key in ("actions", "rewards", "terminated", "truncated", "policy_version", "intervention"):
        assert np.array_equal(got[key], want[key]), key
    for group in ("obs", "extras"):
        for key in want[group]:
            assert np.array_equal(got[group][key], want[group][key]) and got[group][key].dtype == want[group][key].dtype


def test_add_read_back_and_plain_h5py_layout(tmp_path):
    buf = ReplayBuffer(tmp_path, compression="gzip")
    seg = make_segment(3)
    seg_id = buf.add(seg, meta={"episode": 7})
    assert_segment_equal(buf.read_segment(seg_id), seg)
    with h5py.File(tmp_path / "segments" / f"seg_{seg_id:09d}.h5", "r") as f:  # documented layout, plain h5py
        T = f.attrs["length"]
        assert f["obs/image"].shape == (T + 1, 16, 16, 3) and f["actions"].shape == (T, 3)
        assert json.loads(f.attrs["meta"]) == {"episode": 7}
    assert json.loads((tmp_path / "meta.json").read_text())["schema"]["obs/image"] == ["|u1", [16, 16, 3]]


def test_sample_returns_consistent_transitions(tmp_path):
    buf = ReplayBuffer(tmp_path, cache_transitions=64)  # small cache: most segments are read from files
    segs = {buf.add(make_segment(s)): make_segment(s) for s in range(10)}
    batch = buf.sample(500)
    assert buf.stats["cache_hits"] > 0 and buf.stats["cache_misses"] > 0
    for i in range(500):
        seg, t = segs[batch["segment_id"][i]], batch["step"][i]
        assert np.array_equal(batch["obs"]["image"][i], seg["obs"]["image"][t])
        assert np.array_equal(batch["next_obs"]["image"][i], seg["obs"]["image"][t + 1])
        assert np.array_equal(batch["actions"][i], seg["actions"][t])
        assert batch["rewards"][i] == seg["rewards"][t]
        assert np.array_equal(batch["extras"]["chain"][i], seg["extras"]["chain"][t])


def test_sampling_window_distribution(tmp_path):
    buf = ReplayBuffer(tmp_path, sample_window=3, seed=0)
    for s in range(8):
        T = 10 * (s + 1)
        buf.add({"obs": {"x": np.zeros((T + 1, 1), np.float32)}, "actions": np.zeros((T, 1), np.float32)})
    batch = buf.sample(60_000)
    ids, counts = np.unique(batch["segment_id"], return_counts=True)
    assert ids.tolist() == [5, 6, 7]  # only the newest three
    expected = np.array([60, 70, 80]) / 210  # uniform over transitions, so proportional to length
    assert np.allclose(counts / counts.sum(), expected, atol=0.01)
    steps = batch["step"][batch["segment_id"] == 7]
    assert steps.min() == 0 and steps.max() == 79
    assert abs(np.bincount(steps, minlength=80).std() / np.bincount(steps, minlength=80).mean()) < 0.15


def test_reopen_restores_counters_and_eviction(tmp_path):
    buf = ReplayBuffer(tmp_path, capacity_segments=4, eviction="delete")
    for s in range(6):
        buf.add(make_segment(s))
    assert buf.ids == [2, 3, 4, 5] and not (tmp_path / "segments/seg_000000000.h5").exists()
    buf.close()  # (one writer at a time: as a process that ended)
    again = ReplayBuffer.open(tmp_path, capacity_segments=4)
    assert again.ids == [2, 3, 4, 5] and again.next_id == 6
    assert again.num_transitions == buf.num_transitions and again.add(make_segment(9)) == 6

    again.close()
    # more on disk than the capacity (a smaller capacity, or a kill between an add's index line and its eviction's
    # delete): opening deletes nothing, the first add deletes the files beyond capacity, so they never come back
    small = ReplayBuffer.open(tmp_path, capacity_segments=2, eviction="delete")
    assert small.ids == [5, 6] and len(list((tmp_path / "segments").glob("*.h5"))) == 4  # 3 4 5 6
    assert small.add(make_segment(10)) == 7
    assert sorted(p.name for p in (tmp_path / "segments").glob("*.h5")) == ["seg_000000006.h5", "seg_000000007.h5"]
    small.close()
    assert ReplayBuffer.open(tmp_path, capacity_segments=100).ids == [6, 7]

    keep_dir = tmp_path / "keep"
    keep = ReplayBuffer(keep_dir, capacity_segments=2, eviction="keep")
    for s in range(4):
        keep.add(make_segment(s))
    assert keep.ids == [2, 3] and len(list((keep_dir / "segments").glob("*.h5"))) == 4
    keep.close()
    assert ReplayBuffer.open(keep_dir, capacity_segments=10).ids == [0, 1, 2, 3]  # an earlier run, reusable


def test_recovery_from_torn_index_and_unindexed_files(tmp_path):
    buf = ReplayBuffer(tmp_path)
    for s in range(3):
        buf.add(make_segment(s))
    index = tmp_path / "index.jsonl"
    lines = index.read_bytes().split(b"\n")
    index.write_bytes(b"\n".join(lines[:1]) + b"\n" + lines[1][:7])  # torn second line, third missing
    (tmp_path / "segments" / "seg_000000003.h5.tmp").write_bytes(b"half a file")
    buf.close()
    again = ReplayBuffer.open(tmp_path)
    assert again.ids == [0, 1, 2] and not list(tmp_path.glob("**/*.tmp"))
    assert_segment_equal(again.read_segment(2), make_segment(2))
    assert all(json.loads(l) for l in index.read_text().splitlines())  # the index is whole again


def test_bad_input_errors(tmp_path):
    buf = ReplayBuffer(tmp_path)
    with pytest.raises(BufferError, match="T\\+1 rows"):
        buf.add({"obs": {"x": np.zeros((5, 1))}, "actions": np.zeros((5, 1))})
    text = make_segment(0)
    text["extras"]["note"] = np.array(["grasp"] * len(text["actions"]))  # HDF5 stores no numpy unicode: refused
    with pytest.raises(BufferError, match="note.*np.char.encode"):  # before it fixes the schema on disk
        buf.add(text)
    buf.add(make_segment(0))
    assert ReplayBuffer.open(tmp_path, readonly=True).total_added == len(make_segment(0)["actions"])
    with pytest.raises(BufferError, match="open for writing elsewhere"):  # a second writer would remove the first's
        ReplayBuffer.open(tmp_path)  # half-written files and append under the same ids
    buf.close()
    with pytest.raises(BufferError, match="closed"):  # it no longer holds the lock: another writer may
        buf.add(make_segment(2))
    buf = ReplayBuffer.open(tmp_path)
    buf.add(make_segment(1))
    seg = make_segment(1)
    seg["obs"]["image"] = seg["obs"]["image"][:, :8]
    with pytest.raises(BufferError, match="schema"):
        buf.add(seg)
    with pytest.raises(BufferError, match="not a replay buffer"):
        ReplayBuffer.open(tmp_path / "nope")
    with pytest.raises(BufferError, match="empty"):
        ReplayBuffer(tmp_path / "empty").sample(4)
    buf.close()
    meta = (tmp_path / "meta.json").read_text()
    for damaged, says in ((meta[:len(meta) // 2], "unreadable JSON"), ('["a list"]', "not an object"),
                          (json.dumps({**json.loads(meta), "schema": 3}), "no usable schema")):
        (tmp_path / "meta.json").write_text(damaged)
        with pytest.raises(BufferError, match=says):
            ReplayBuffer.open(tmp_path, readonly=True)


def test_sigkill_at_random_moments_never_loses_a_durable_segment(tmp_path):
    rng = np.random.default_rng(0)
    durable: dict[int, int] = {}
    checked: set[int] = set()  # segments already read whole after a reopen (files never change once renamed in)
    seed = 0
    mid_write = 0  # rounds whose kill left a half-written file behind (the recovery's hard case)
    for round_ in range(20):
        proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.buffer_writer", str(tmp_path), str(seed),
                                 "gzip" if round_ % 2 else ""], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = proc.stdout.readline()  # wait for the first durable segment, then kill at a random moment
        assert line.startswith("durable"), f"round {round_}: the writer did not start"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out = line + proc.stdout.read()
        proc.wait()
        for l in out.splitlines():
            _, seg_id, s = l.split()
            durable[int(seg_id)] = int(s)
            seed = max(seed, int(s) + 1)
        mid_write += bool(list(tmp_path.glob("**/*.tmp")))
        buf = ReplayBuffer.open(tmp_path)
        assert set(durable) <= set(buf.ids), f"round {round_}: durable segments lost"
        assert not (tmp_path / "corrupt").exists(), f"round {round_}: a renamed-in file was torn"
        for seg_id in rng.choice(list(durable), size=min(5, len(durable)), replace=False):
            assert_segment_equal(buf.read_segment(int(seg_id)), make_segment(durable[int(seg_id)]))
        for seg_id in set(buf.ids) - checked:  # whatever came is whole (also a segment added but not yet reported)
            seg = buf.read_segment(seg_id)
            assert_segment_equal(seg, make_segment(seg["meta"]["seed"]))
            checked.add(seg_id)
        buf.sample(64)
        buf.close()  # the next writer's turn
    assert len(durable) >= 20
    print(f"kills that left a half-written file: {mid_write} of 20")
    assert mid_write >= 2  # the kills did land mid-write, not only between segments
    buf = ReplayBuffer.open(tmp_path)
    for seg_id, s in durable.items():
        assert_segment_equal(buf.read_segment(seg_id), make_segment(s))


def test_concurrent_add_and_sample(tmp_path):
    """Two threads sample while segments are added and the oldest evicted (files deleted under the samplers): every
    row is the stored transition, bit for bit."""
    buf = ReplayBuffer(tmp_path, cache_transitions=200, sample_window=0, capacity_segments=5, eviction="delete")
    buf.add(make_segment(0))
    errors, stop, samples = [], threading.Event(), [0]
    want = {s: make_segment(s) for s in range(40)}  # segment s is make_segment(s): its id is its seed here

    def sampler():
        try:
            while not stop.is_set():
                b = buf.sample(32)
                for i, (seg_id, step) in enumerate(zip(b["segment_id"].tolist(), b["step"].tolist())):
                    seg = want[seg_id]
                    assert b["policy_version"][i] == seg_id and np.array_equal(b["actions"][i], seg["actions"][step])
                    for key in seg["obs"]:
                        assert np.array_equal(b["obs"][key][i], seg["obs"][key][step])
                        assert np.array_equal(b["next_obs"][key][i], seg["obs"][key][step + 1])
                samples[0] += 1
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=sampler) for _ in range(2)]
    for t in threads:
        t.start()
    for s in range(1, 40):
        assert buf.add(want[s]) == s
        time.sleep(0.005)  # let the samplers in between adds
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert samples[0] >= 50 and buf.ids == list(range(35, 40)), (samples[0], buf.ids)


def test_mixed_batches_give_each_source_its_share_in_expectation():
    """A share that is not a whole number of rows is rounded down or up at random, never always down: a source owed
    0.31 rows a batch gets about 31 rows in 100 batches (it got none when every share was rounded down)."""
    bufs = [ReplayBuffer(None, cache_transitions=1000) for _ in range(3)]
    for i, buf in enumerate(bufs):
        buf.add(make_segment(i))
    rng, counts, batches = np.random.default_rng(0), np.zeros(3), 400
    shares = np.array([0.5, 0.4988, 0.0012])
    for _ in range(batches):
        source = sample_mixed(list(zip(bufs, shares)), 256, rng)["source"]
        assert len(source) == 256 and (source == 0).sum() == 128  # a whole share stays exact
        counts += np.bincount(source, minlength=3)
    expected = shares[2] * 256 * batches  # 123
    assert abs(counts[2] - expected) < 4 * np.sqrt(expected), counts


def test_mixed_batches_and_prefetch(tmp_path):
    online, demos = ReplayBuffer(tmp_path / "online"), ReplayBuffer(tmp_path / "demos")
    for s in range(3):
        online.add(make_segment(s))
        demos.add(make_segment(100 + s))
    batch = sample_mixed([(online, 0.5), (demos, 0.5)], 256, np.random.default_rng(0))
    assert (batch["source"] == 0).sum() == 128 and batch["obs"]["image"].shape == (256, 16, 16, 3)
    assert (batch["policy_version"][batch["source"] == 1] >= 100).all()
    plain = ReplayBuffer(tmp_path / "plain")  # segments without the extras: mixing says so, either order
    seg = make_segment(7)
    del seg["extras"]
    plain.add(seg)
    for pair in ([(online, 0.5), (plain, 0.5)], [(plain, 0.5), (online, 0.5)]):
        with pytest.raises(BufferError, match="different keys in extras"):
            sample_mixed(pair, 16, np.random.default_rng(0))
    it = online.prefetch(16, depth=2, seed=0)
    assert next(it)["actions"].shape == (16, 3)
    it.close()
    start = time.monotonic()  # the prefetch thread's error reaches the consumer at once, not a 60 s queue.Empty
    with pytest.raises(BufferError, match="empty"):
        next(ReplayBuffer(tmp_path / "empty").prefetch(16))
    assert time.monotonic() - start < 5


def test_counters_and_edge_cases(tmp_path):
    buf = ReplayBuffer(tmp_path, capacity_segments=2, eviction="delete")
    total = sum(buf.lengths[buf.add(make_segment(s))] for s in range(4))
    assert buf.total_added == total and ReplayBuffer.open(tmp_path, readonly=True).total_added == total  # evicted
    # ones count too
    with pytest.raises(BufferError, match="evicted"):  # its file is gone: said, not an OSError from h5py
        buf.read_segment(0)
    assert ReplayBuffer.open(tmp_path, capacity_segments=0, readonly=True).ids == []  # 0 keeps none, as on add
    ram = ReplayBuffer(None, cache_transitions=10)
    with pytest.raises(BufferError, match="does not fit"):
        ram.add(make_segment(0))
    assert ram.ids == [] and ram.total_added == 0  # refused before any state changed
    seg = {"obs": {"x": np.zeros((4, 2), np.float32)}, "actions": np.zeros((3, 0), np.float32)}
    zero = ReplayBuffer(tmp_path / "zero")
    zero.add(seg)  # zero-width arrays are stored too
    assert zero.read_segment(0)["actions"].shape == (3, 0)


def test_ram_only_buffer():
    buf = ReplayBuffer(None, cache_transitions=100)
    for s in range(10):
        buf.add(make_segment(s))
    assert sum(buf.lengths[i] + 1 for i in buf.ids) <= 100 and buf.ids[-1] == 9
    assert buf.sample(8)["actions"].shape == (8, 3)


def test_reopened_buffer_samples_from_a_warm_cache_and_nested_keys_read_back(tmp_path):
    rng = np.random.default_rng(0)
    segments = []
    buf = ReplayBuffer(tmp_path / "b", cache_transitions=1000)
    for _ in range(5):
        seg = {"obs": {"state": rng.normal(size=(11, 3)).astype(np.float32),
                       "images/main": rng.integers(0, 255, (11, 8, 8, 3), dtype=np.uint8)},
               "actions": rng.normal(size=(10, 2)).astype(np.float32), "rewards": np.ones(10, np.float32)}
        segments.append(seg)
        buf.add(seg)
    buf.close()
    reopened = ReplayBuffer.open(tmp_path / "b", cache_transitions=1000)
    batch = reopened.sample(64)
    assert reopened.stats["files_read"] == 0  # every row came from the RAM ring, warmed at open
    assert batch["obs"]["images/main"].shape == (64, 8, 8, 3)
    got = reopened.read_segment(3)
    assert_segment_equal(got, {**segments[3], "extras": {}, "terminated": np.zeros(10, bool),
                               "truncated": np.zeros(10, bool), "policy_version": np.zeros(10, np.int64),
                               "intervention": np.zeros(10, bool)})
    small = ReplayBuffer.open(tmp_path / "b", cache_transitions=25, readonly=True)  # only the newest two fit
    assert list(small._cached) == [3, 4]


def test_an_index_whose_last_line_lost_its_newline_still_takes_appends(tmp_path):
    buf = ReplayBuffer(tmp_path)
    for s in range(3):
        buf.add(make_segment(s))
    index = tmp_path / "index.jsonl"
    index.write_bytes(index.read_bytes().rstrip(b"\n"))  # e.g. a power loss between the line and its newline
    buf.close()
    again = ReplayBuffer.open(tmp_path)
    assert len(again.lengths) == 3 and index.read_bytes().endswith(b"\n")  # well formed again, before any append
    again.add(make_segment(3))
    again.close()
    reopened = ReplayBuffer.open(tmp_path)  # the appended line was glued onto the last one before
    assert len(reopened.lengths) == 4 and reopened.total_added == again.total_added
    assert (tmp_path / "index.jsonl").read_bytes().count(b"\n") == 4


def test_a_failed_schema_write_leaves_no_schema_behind(tmp_path, monkeypatch):
    """The first add writes meta.json (the schema). If that write fails (a full disk), the add fails and the buffer
    must not keep the schema in memory only: the next add writes it, and a reopened buffer can sample."""
    import common.replay_buffer as rb

    real_write = rb.atomic_write

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rb, "atomic_write", full_disk)
    buf = ReplayBuffer(tmp_path)
    with pytest.raises(OSError):
        buf.add(make_segment(0))
    monkeypatch.setattr(rb, "atomic_write", real_write)
    assert buf.schema is None
    buf.add(make_segment(1))
    buf.close()
    again = ReplayBuffer.open(tmp_path)
    assert again.schema is not None and len(again.sample(4, rng=np.random.default_rng(0))["actions"]) == 4
