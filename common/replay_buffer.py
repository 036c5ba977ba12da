"""A persistent, crash-consistent, cache-aware replay buffer of trajectory segments in HDF5.

Layout of a buffer directory (readable with plain h5py; also our demonstration-dataset format for SFT):

    meta.json                     format version, schema (key -> dtype, per-step shape), created; written atomically
    index.jsonl                   one line per durable segment: {"id", "length", "meta"}; append-only
    segments/seg_000000042.h5     one file per segment, written to *.tmp, fsynced, renamed, directory fsynced
        attrs: id, length, meta (JSON), format
        obs/<key>        [T+1, ...]   observations, the last row is the observation after the last action
        actions          [T, ...]     rewards [T] float32, terminated / truncated / intervention [T] bool,
        policy_version   [T] int64    extras/<key> [T, ...] (free-form per-step data, e.g. denoising chains)

Durability: `add` returns once the segment's file is renamed into place and the directory is fsynced, so a segment
reported durable survives `kill -9` at any later moment. Recovery on `open` (which also restores the counters) reads
the index, drops a torn last line, re-indexes segment files that were renamed but not yet indexed, and deletes
leftover *.tmp files, so a reopened buffer never contains a torn segment.

Sampling: uniform over the transitions of the newest `sample_window` segments (0 = all in capacity). The newest
segments live in a preallocated RAM ring of `cache_transitions` rows; cache hits are served with one fancy index per
key, misses are read from their files, one read per file per batch. `add` and `sample` are safe from different
threads; `prefetch` samples in a background thread.
Capacity: beyond `capacity_segments`, the oldest segments leave the sampling set; `eviction="delete"` also deletes
their files, `eviction="keep"` keeps them on disk (an earlier run or demos stay reusable). A buffer opened with more
segments on disk than its capacity (a smaller capacity than before, or a kill between an add and its eviction) leaves
the oldest out of the sampling set and, with "delete", deletes their files at its first add: opening deletes nothing.
`sample_mixed` draws one batch from several buffers at fixed fractions (RLPD's 50/50 online/demo batches).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from common.fsutil import atomic_write, exclusive_lock, fsync_path

log = logging.getLogger("replay_buffer")

FORMAT_VERSION = 1
STEP_KEYS = ("actions", "rewards", "terminated", "truncated", "policy_version", "intervention")
STEP_DTYPES = {"rewards": np.float32, "terminated": np.bool_, "truncated": np.bool_, "policy_version": np.int64,
               "intervention": np.bool_}


class BufferError(RuntimeError):
    """A malformed segment, a schema mismatch, or a buffer directory that cannot be used."""


def _flatten(segment: dict) -> tuple[dict[str, np.ndarray], int]:
    """Segment dict -> {"obs/k": [T+1,...], "actions": [T,...], ..., "extras/k": [T,...]} with validated lengths."""
    if "obs" not in segment or not isinstance(segment["obs"], dict) or "actions" not in segment:
        raise BufferError("a segment needs 'obs' (a dict of arrays with T+1 rows) and 'actions' (T rows)")
    actions = np.asarray(segment["actions"])
    T = actions.shape[0] if actions.ndim else 0
    if T < 1:
        raise BufferError("a segment needs at least one step")
    flat = {"actions": actions}
    for key, dtype in STEP_DTYPES.items():
        value = segment.get(key)
        if value is None:
            value = np.zeros(T, dtype)
        value = np.asarray(value, dtype=dtype)
        if value.ndim == 0:
            value = np.full(T, value, dtype)
        flat[key] = value
    for key, value in segment["obs"].items():
        flat[f"obs/{key}"] = np.asarray(value)
    for key, value in (segment.get("extras") or {}).items():
        flat[f"extras/{key}"] = np.asarray(value)
    for key, value in flat.items():
        if value.dtype.kind not in "biufcS":  # checked before the first segment fixes the buffer's schema
            raise BufferError(f"segment key {key!r} has dtype {value.dtype}, which HDF5 cannot store as is: use "
                              f"numbers, bools or fixed-length bytes (text: np.char.encode(a, 'utf-8'))")
        want = T + 1 if key.startswith("obs/") else T
        if value.ndim == 0 or value.shape[0] != want:
            raise BufferError(f"segment key {key!r} has {value.shape[0] if value.ndim else 0} rows, expected {want} "
                              f"(T={T} steps; observations need T+1 rows)")
    return flat, T


class ReplayBuffer:
    def __init__(self, directory: str | Path | None = None, *, capacity_segments: int = 100_000,
                 eviction: str = "delete", cache_transitions: int = 100_000, sample_window: int = 0,
                 compression: str | None = None, seed: int = 0, readonly: bool = False):
        if eviction not in ("delete", "keep"):
            raise ValueError(f"eviction must be 'delete' or 'keep', got {eviction!r}")
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
        self.dir = Path(directory) if directory is not None else None
        self.capacity_segments, self.eviction = capacity_segments, eviction
        self.cache_transitions, self.sample_window = cache_transitions, sample_window
        self.compression, self.readonly = compression, readonly
        self.rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self.schema: dict[str, tuple[str, tuple]] | None = None
        self.ids: list[int] = []  # segments in the sampling set, oldest first
        self._stale: list[int] = []  # segments on disk beyond capacity when opened (see _recover)
        self.lengths: dict[int, int] = {}
        self.seg_meta: dict[int, dict] = {}
        self.next_id = 0
        self.total_added = 0  # transitions ever added (durable), across restarts
        self._cache: dict[str, np.ndarray] = {}
        self._cached: OrderedDict[int, int] = OrderedDict()  # id -> first ring row
        self._window_cache = None
        self._ring_pos = 0
        self.stats = {"cache_hits": 0, "cache_misses": 0, "files_read": 0}
        self._writer_lock = None
        if self.dir is not None:
            (self.dir / "segments").mkdir(parents=True, exist_ok=True)
            if not readonly:
                self._take_writer_lock()
            self._recover()
            self._warm_cache()

    def _take_writer_lock(self) -> None:
        """One writer per directory: a second would remove the first's half-written files when it opens and append
        segments under the same ids. Held (flock) while this object lives; a killed process's goes with it."""
        fd = exclusive_lock(self.dir / "writer.lock")
        if fd is None:
            raise BufferError(f"{self.dir} is open for writing elsewhere (another process, or another ReplayBuffer "
                              f"object here): close that one, or open this one with readonly=True") from None
        self._writer_lock = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        """Let another writer open the directory (also done when this object is garbage-collected)."""
        if self._writer_lock is not None:
            self._writer_lock()

    @classmethod
    def open(cls, directory: str | Path, **kwargs) -> "ReplayBuffer":
        """Open an existing buffer directory (resume, demos, an earlier run); counters are restored from disk."""
        if not (Path(directory) / "segments").is_dir():
            raise BufferError(f"{directory} is not a replay buffer directory (no segments/ folder)")
        return cls(directory, **kwargs)

    # ---------------------------------------------------------------------------------------------- recovery
    def _path(self, seg_id: int) -> Path:
        return self.dir / "segments" / f"seg_{seg_id:09d}.h5"

    def _recover(self) -> None:
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            try:  # (meta.json is written atomically: damaged after the fact)
                meta = json.loads(meta_path.read_text())
            except ValueError:
                raise BufferError(f"{meta_path}: not a buffer's meta.json (unreadable JSON: a damaged or partial "
                                  f"copy?)") from None
            if not isinstance(meta, dict):
                raise BufferError(f"{meta_path}: not a buffer's meta.json (a JSON {type(meta).__name__}, not an "
                                  f"object)")
            fmt = meta.get("format")
            if fmt != FORMAT_VERSION:
                raise BufferError(f"{self.dir}: buffer format {fmt}, this code reads {FORMAT_VERSION}")
            try:
                self.schema = {k: (v[0], tuple(v[1])) for k, v in meta["schema"].items()}
            except (KeyError, TypeError, IndexError, AttributeError):
                raise BufferError(f"{meta_path}: no usable schema (a damaged copy?)") from None
        for tmp in self.dir.glob("**/*.tmp"):
            if not self.readonly:
                tmp.unlink()
        index: dict[int, dict] = {}
        index_path = self.dir / "index.jsonl"
        if index_path.exists():
            raw = index_path.read_bytes()
            good_end = 0
            for line in raw.split(b"\n")[:-1] if raw.endswith(b"\n") else raw.split(b"\n"):
                try:
                    entry = json.loads(line)
                    index[int(entry["id"])] = entry
                    good_end += len(line) + 1
                except (ValueError, KeyError):
                    break  # a torn tail: everything after it is re-indexed from the files below
            if good_end < len(raw) and not self.readonly:
                with open(index_path, "r+b") as f:
                    f.truncate(good_end)
            elif good_end > len(raw) and not self.readonly:  # a whole last line without its newline: restore it,
                with open(index_path, "ab") as f:  # or the next line appended would be glued onto it
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
        on_disk = {int(p.stem[4:]): p for p in (self.dir / "segments").glob("seg_*.h5")}
        for seg_id in sorted(set(on_disk) - set(index)):  # renamed into place, crash before the index line
            try:
                with h5py.File(on_disk[seg_id], "r") as f:
                    entry = {"id": seg_id, "length": int(f.attrs["length"]), "meta": json.loads(f.attrs["meta"])}
            except Exception as exc:  # cannot happen with atomic renames; never let it poison the buffer
                log.error("segment file %s is unreadable (%s): moved aside", on_disk[seg_id], exc)
                if not self.readonly:
                    (self.dir / "corrupt").mkdir(exist_ok=True)
                    os.replace(on_disk[seg_id], self.dir / "corrupt" / on_disk[seg_id].name)
                continue
            index[seg_id] = entry
            if not self.readonly:
                self._append_index(entry)
        present = sorted(i for i in index if i in on_disk)
        self.next_id = max(list(index) + list(on_disk) + [-1]) + 1
        self.total_added = sum(entry["length"] for entry in index.values())  # evicted segments count too
        self.ids = present[max(0, len(present) - self.capacity_segments):]
        # beyond capacity on disk: a kill between an add's index line and its eviction's delete, or a reopen with a
        # smaller capacity. With eviction="delete" their files go at the next add (opening alone deletes nothing)
        self._stale = present[:max(0, len(present) - self.capacity_segments)]
        self.lengths = {i: index[i]["length"] for i in self.ids}
        self.seg_meta = {i: index[i].get("meta", {}) for i in self.ids}

    def _warm_cache(self) -> None:
        """Load the newest segments that fit into the RAM ring, so a reopened buffer samples at cache speed."""
        if not self.ids or self.schema is None:
            return
        budget, chosen = self.cache_transitions, []
        for seg_id in reversed(self.ids):
            rows = self.lengths[seg_id] + 1
            if rows > budget:
                break
            budget -= rows
            chosen.append(seg_id)
        for seg_id in reversed(chosen):
            self._cache_put(seg_id, self._read_flat(seg_id), self.lengths[seg_id])

    def _read_flat(self, seg_id: int) -> dict[str, np.ndarray]:
        """Every dataset of a segment file under its flat key ("obs/images/main", "actions", ...)."""
        flat: dict[str, np.ndarray] = {}
        with h5py.File(self._path(seg_id), "r") as f:
            f.visititems(lambda name, obj: flat.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return flat

    def _append_index(self, entry: dict) -> None:
        with open(self.dir / "index.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ---------------------------------------------------------------------------------------------- adding
    def _check_schema(self, flat: dict[str, np.ndarray]) -> None:
        schema = {k: (v.dtype.str, tuple(v.shape[1:])) for k, v in flat.items()}
        if self.schema is None:
            if self.dir is not None:  # written first: a failed write leaves no schema that meta.json lacks
                atomic_write(self.dir / "meta.json", json.dumps({
                    "format": FORMAT_VERSION, "schema": {k: [d, list(s)] for k, (d, s) in schema.items()},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
            self.schema = schema
        elif schema != self.schema:
            diff = {k: {"buffer": self.schema.get(k), "segment": schema.get(k)}
                    for k in set(schema) | set(self.schema) if schema.get(k) != self.schema.get(k)}
            raise BufferError(f"segment does not match the buffer's schema: {diff}")

    def _write_file(self, seg_id: int, flat: dict[str, np.ndarray], T: int, meta: dict) -> None:
        path = self._path(seg_id)
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs.update(id=seg_id, length=T, meta=json.dumps(meta), format=FORMAT_VERSION)
            for key, value in flat.items():
                if value[0].size == 0:  # a zero-width dimension cannot be chunked
                    f.create_dataset(key, data=value)
                    continue
                chunk_rows = max(1, min(len(value), max(1, (1 << 16) // max(1, value[0].nbytes))))
                f.create_dataset(key, data=value, chunks=(chunk_rows, *value.shape[1:]),
                                 compression=self.compression if value.nbytes > 4096 else None)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)

    def add(self, segment: dict, meta: dict | None = None) -> int:
        """Store one segment; returns its id once it is durable (or in RAM, for a buffer without a directory)."""
        if self.readonly:
            raise BufferError("this buffer was opened read-only")
        if self._writer_lock is not None and not self._writer_lock.alive:
            raise BufferError(f"this buffer was closed: another writer may have {self.dir} now")
        flat, T = _flatten(segment)
        meta = dict(meta or {})
        if self.dir is None and T + 1 > self.cache_transitions:  # refuse before any state changes
            raise BufferError(f"a segment of {T} steps does not fit cache_transitions={self.cache_transitions}, "
                              f"and this buffer has no directory to keep it in")
        with self._lock:
            self._check_schema(flat)
            seg_id = self.next_id
            self.next_id += 1
        if self.dir is not None:
            self._write_file(seg_id, flat, T, meta)  # the slow part, outside the lock: sampling goes on
            self._append_index({"id": seg_id, "length": T, "meta": meta})
        with self._lock:
            self._window_cache = None
            self.ids.append(seg_id)
            self.lengths[seg_id] = T
            self.seg_meta[seg_id] = meta
            self.total_added += T
            self._cache_put(seg_id, flat, T)
            while len(self.ids) > self.capacity_segments:
                self._evict(self.ids.pop(0))
            if self._stale and self.eviction == "delete":
                log.info("deleting %d segment files beyond capacity left by an earlier run", len(self._stale))
                for stale_id in self._stale:
                    self._path(stale_id).unlink(missing_ok=True)
            self._stale = []
        return seg_id

    def _evict(self, seg_id: int) -> None:
        self.lengths.pop(seg_id, None)
        self.seg_meta.pop(seg_id, None)
        self._cached.pop(seg_id, None)
        if self.dir is not None and self.eviction == "delete":
            self._path(seg_id).unlink(missing_ok=True)

    def _cache_put(self, seg_id: int, flat: dict[str, np.ndarray], T: int) -> None:
        rows = T + 1
        if rows > self.cache_transitions:
            if self.dir is None:
                raise BufferError(f"a segment of {T} steps does not fit cache_transitions={self.cache_transitions}, "
                                  f"and this buffer has no directory to keep it in")
            return
        if not self._cache:
            self._cache = {k: np.zeros((self.cache_transitions, *shape), dtype=np.dtype(dtype))
                           for k, (dtype, shape) in self.schema.items()}
        start = self._ring_pos if self._ring_pos + rows <= self.cache_transitions else 0
        end = start + rows
        for other, other_start in list(self._cached.items()):  # evict overlapped segments
            if other_start < end and start < other_start + self.lengths.get(other, 0) + 1:
                del self._cached[other]
        for key, value in flat.items():
            self._cache[key][start:start + len(value)] = value
        self._cached[seg_id] = start
        self._ring_pos = end
        if self.dir is None:  # RAM only: what falls out of the cache is gone
            for dropped in [i for i in self.ids if i not in self._cached]:
                self.ids.remove(dropped)
                self._evict(dropped)

    # ---------------------------------------------------------------------------------------------- sampling
    @property
    def num_segments(self) -> int:
        return len(self.ids)

    @property
    def num_transitions(self) -> int:
        with self._lock:
            return sum(self.lengths[i] for i in self.ids)

    def __len__(self) -> int:
        return self.num_transitions

    def window(self) -> list[int]:
        with self._lock:
            return list(self.ids[-self.sample_window:] if self.sample_window else self.ids)

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """A batch of transitions drawn uniformly from the sampling window:
        obs / next_obs (dicts), actions, rewards, terminated, truncated, policy_version, intervention, extras,
        plus segment_id and step of each row."""
        rng = rng or self.rng
        with self._lock:
            ids, lengths, cum, cache_starts = self._window_arrays()
            draws = rng.integers(cum[-1], size=batch_size)
            which = np.searchsorted(cum, draws, side="right")
            seg_ids = ids[which]
            steps = draws - (cum[which] - lengths[which])
            starts = cache_starts[which]
            hit = starts >= 0
            rows = starts + steps
            if hit.all():  # the common case: one fancy index per key, no masks
                out = {key: arr[rows] for key, arr in self._cache.items()}
                nxt = {key: arr[rows + 1] for key, arr in self._cache.items() if key.startswith("obs/")}
            else:
                out = {key: np.empty((batch_size, *shape), dtype=np.dtype(dtype))
                       for key, (dtype, shape) in self.schema.items()}
                nxt = {key: np.empty((batch_size, *shape), dtype=np.dtype(dtype))
                       for key, (dtype, shape) in self.schema.items() if key.startswith("obs/")}
                if hit.any():
                    for key, arr in self._cache.items():
                        out[key][hit] = arr[rows[hit]]
                        if key in nxt:
                            nxt[key][hit] = arr[rows[hit] + 1]
            self.stats["cache_hits"] += int(hit.sum())
            self.stats["cache_misses"] += int((~hit).sum())
            if (~hit).any():  # read from files under the lock, so an eviction cannot delete a file mid-read
                for seg_id in np.unique(seg_ids[~hit]):
                    sel = np.nonzero((seg_ids == seg_id) & ~hit)[0]
                    self._read_rows(int(seg_id), steps[sel], sel, out, nxt)
        batch: dict[str, Any] = {"obs": {}, "next_obs": {}, "extras": {}, "segment_id": seg_ids, "step": steps}
        for key, value in out.items():
            if key.startswith("obs/"):
                batch["obs"][key[4:]] = value
                batch["next_obs"][key[4:]] = nxt[key]
            elif key.startswith("extras/"):
                batch["extras"][key[7:]] = value
            else:
                batch[key] = value
        return batch

    def _read_rows(self, seg_id, steps, sel, out, nxt) -> None:
        self.stats["files_read"] += 1
        lo, hi = int(steps.min()), int(steps.max()) + 2  # one contiguous read per key (h5py point reads are slow)
        with h5py.File(self._path(seg_id), "r") as f:
            for key in out:
                data = f[key][lo:hi if key in nxt else hi - 1]
                out[key][sel] = data[steps - lo]
                if key in nxt:
                    nxt[key][sel] = data[steps + 1 - lo]

    def _window_arrays(self):
        """(ids, lengths, cumulative lengths, cache start row or -1) of the sampling window; rebuilt only after a
        change (an add, an eviction, or a segment falling out of the RAM cache)."""
        if self._window_cache is None:
            ids = self.ids[-self.sample_window:] if self.sample_window else self.ids
            if not ids:
                raise BufferError("cannot sample from an empty buffer")
            lengths = np.array([self.lengths[i] for i in ids])
            starts = np.array([self._cached.get(i, -1) for i in ids])
            self._window_cache = (np.asarray(ids), lengths, np.cumsum(lengths), starts)
        return self._window_cache

    def read_segment(self, seg_id: int) -> dict[str, Any]:
        """A whole segment back in the shape it was added (for SFT datasets, checks, export). Under the lock, as in
        `sample`: an `add` in another thread may evict (delete) the file meanwhile."""
        seg: dict[str, Any] = {"obs": {}, "extras": {}}
        with self._lock:
            if not self._path(seg_id).exists():
                raise BufferError(f"segment {seg_id} has no file in {self.dir} (evicted, or never added)")
            flat = self._read_flat(seg_id)
            with h5py.File(self._path(seg_id), "r") as f:
                seg["meta"] = json.loads(f.attrs["meta"])
        for key, value in flat.items():
            group, _, sub = key.partition("/")
            if sub and group in seg:  # obs/images/main -> seg["obs"]["images/main"], as it was added
                seg[group][sub] = value
            else:
                seg[key] = value
        return seg

    def prefetch(self, batch_size: int, depth: int = 2, seed: int | None = None) -> Iterator[dict]:
        """Batches sampled in a background thread, `depth` ahead. Stop by closing the iterator."""
        q: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()
        rng = np.random.default_rng(seed)

        def work():
            while not stop.is_set():
                try:
                    batch = self.sample(batch_size, rng)
                except Exception as exc:  # handed to the consumer, raised there (not lost with this thread)
                    batch = exc
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if isinstance(batch, Exception):
                    return

        thread = threading.Thread(target=work, name="buffer-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                batch = q.get(timeout=60)
                if isinstance(batch, Exception):
                    raise batch
                yield batch
        finally:
            stop.set()
            thread.join(timeout=5)


def sample_mixed(sources: list[tuple[ReplayBuffer, float]], batch_size: int,
                 rng: np.random.Generator | None = None) -> dict[str, Any]:
    """One batch drawn from several buffers at fixed fractions (e.g. [(online, 0.5), (demos, 0.5)] for RLPD).
    Each source gets its share of the rows rounded down or up, at random, so that its expected count is exactly its
    share (a source owed 0.3 rows per batch gets one in about 3 batches, not none). `batch["source"]` says which
    buffer each row came from."""
    rng = rng or np.random.default_rng()
    fractions = np.array([f for _, f in sources], dtype=np.float64)
    if (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"fractions must be >= 0 and sum to > 0, got {fractions.tolist()}")
    exact = fractions / fractions.sum() * batch_size
    counts = np.floor(exact).astype(int)
    short = batch_size - int(counts.sum())
    if short:  # systematic sampling: one row more for each source whose fractional part a point falls into
        ends = np.cumsum(exact - counts)
        picks = np.searchsorted(ends, rng.random() + np.arange(short), side="right")
        np.add.at(counts, np.minimum(picks, len(counts) - 1), 1)
    parts = [buf.sample(int(n), rng) for (buf, _), n in zip(sources, counts) if n > 0]
    batch = _concat(parts)
    batch["source"] = np.concatenate([np.full(n, i) for i, n in enumerate(counts) if n > 0])
    return batch


def _concat(parts: list[dict], where: str = "batch") -> dict:
    keys = [sorted(p) for p in parts]
    if any(k != keys[0] for k in keys):  # e.g. online segments with extras mixed with demos without them
        raise BufferError(f"the mixed buffers hold different keys in {where}: {keys}; mix only buffers of one layout")
    out = {}
    for key, value in parts[0].items():
        if isinstance(value, dict):
            out[key] = _concat([p[key] for p in parts], key) if value or any(p[key] for p in parts) else {}
        else:
            out[key] = np.concatenate([p[key] for p in parts])
    return out
