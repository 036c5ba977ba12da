"""Weights published in place through shared memory: the learner's CPU tensors themselves live in a file in /dev/shm,
and each actor copies them out when it chooses, under a reader-writer lock. `WeightPublisher(..., in_place=True)` /
`WeightSubscriber` use it for `shm://NAME` endpoints (a subscriber finds out which kind the channel is by itself).

    pub = InPlacePublisher("weights")            # owns /dev/shm/rlx-weights, as ShmPublisher does
    block = pub.create(header, nbytes)           # a uint8 tensor in the file: the learner's tensors become views of it
    pub.begin_write()                            # before the tensors change (WeightPublisher hooks optimizer.step)
    pub.publish(version)                         # they are consistent again, and are `version`
    sub = InPlaceSubscriber("weights")
    msg = sub.latest()                           # a Message whose arrays view the learner's tensors (nothing copied)
    version = sub.begin_read(msg)                # the shared lock: the version the arrays hold now, or None (then
    ...copy the arrays out...; sub.end_read()    #   the learner is changing them, nothing is locked: poll again)

Why: `common.shm_broadcast` snapshots each update into a slot that no reader holds; with a zero-copy reader that
viewing the latest slot, the copies alternate between two slots, one more buffer in the caches than a memcpy between
two fixed buffers, and each slot costs the model's bytes again (3 max_readers + 2 of them). Here the one copy is the
reader's, from the learner's tensors into its own parameters, always between the same two places; the learner never
copies and the model's bytes are in shared memory once.

Protocol. The control page's sequence word is 2 * version while the tensors hold that version, and odd while the
learner changes them. The learner makes it odd under an exclusive flock before its first write after a publish
(waiting, if a reader is copying, for that copy: at most one copy's time), and even (the next version) at publish. A
reader takes a shared flock, copies only while the word is even, and lets go: no reader copies while the learner
writes, and none holds the learner up for longer than the copies in progress. `WeightPublisher` announces (calls
`begin_write`) before `optimizer.step()` of an optimizer holding the tensors, `load_state_dict()` of the model or any
submodule, and the forward in training mode of a module whose buffers are sent (batch norm's statistics); other
changes go in `WeightPublisher.writing()`. An unannounced change could be read half-done: `WeightPublisher` counts
the ones torch's version counters show (`unguarded_writes`) and warns (writes through `.data` are not counted). A
publisher dropped without `close()` retires its file (a finalizer): nothing would announce changes any more. A
reader stuck inside its copy (stopped, not dead: a dead process's lock goes with it) is waited for `stall_s`; then
the learner moves its tensors into a new file (made before the old one is retired: with no room for it, OSError and
nothing changes) and retires this one (the stuck reader finishes an intact copy of the old one, then moves over).
`stall_s` must exceed the slowest reader's copy of the model, or every announcement pays it and a move.

The file: a 4 KiB control page of int64 words (0 magic, 1 layout, 2 header bytes, 3 block bytes, 5 retired,
6 writer waiting: readers start no copy while it is 1, so a stream of overlapping copies cannot keep the learner out,
7 sequence word, 8 heartbeat: ns since the epoch at each publish, 9 publisher pid; the magic, retired and pid
words sit where `common.shm_broadcast`'s do, so either kind of publisher retires the other's file), then the header
(a `common.transport` header: type "in_place", meta {"mode"}, the arrays' specs; written once per file) padded to
4 KiB, then the block: the arrays laid out as `transport.packed_block_layout` places them (64-byte aligned). A new
set of tensors (other names, shapes or dtypes) makes a new file. Files are 0600; one thread publishes.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import weakref
from fcntl import LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, flock
from pathlib import Path

import msgpack
import numpy as np

from common.shm_broadcast import (CONTROL_BYTES, INPLACE_MAGIC, MAGIC, SLOT_ALIGN, W_HEARTBEAT, W_LAYOUT, W_MAGIC,
                                  W_PID, W_RETIRED, ShmError, ShmKindError, _checked, _lock_owner, _path, _reserve,
                                  mark_retired, owner_alive, shm_dir)
from common.transport import (_HEADER_LIMITS, FrameError, Message, TransportTimeout, _array, _check_spec,
                              _parse_header, packed_block_layout)

log = logging.getLogger("transport")

LAYOUT_VERSION = 1
W_HEADER_BYTES, W_BLOCK_BYTES, W_WANT, W_SEQ = 2, 3, 6, 7


def _aligned(n: int) -> int:
    return -(-n // SLOT_ALIGN) * SLOT_ALIGN


def _lock_soon(fd: int, mode: int, seconds: float) -> bool:
    """Take the flock `mode` on `fd` within `seconds`; whether it came. Polls from 20 us up to 2 ms between tries:
    the other side holds it for a word's write or one copy of the weights."""
    deadline, pause = time.monotonic() + seconds, 2e-5
    while True:
        try:
            flock(fd, mode | LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(2 * pause, 0.002)


class InPlacePublisher:
    def __init__(self, name: str, *, stall_s: float = 5.0):
        """Own the channel `name`. `stall_s`: how long `begin_write` / `publish` wait for the readers' copies in
        progress before giving up (they return False; `WeightPublisher` then moves the tensors to a new file): more
        than the slowest reader's copy of the model takes. Raises ShmError if a live publisher owns the name."""
        _checked(name)
        if not stall_s > 0:
            raise ValueError(f"stall_s must be > 0, got {stall_s}")
        self.name, self.path, self.stall_s = name, _path(name), stall_s
        owner = _lock_owner(Path(f"{self.path}.owner"), 1.0)
        if owner < 0:
            raise ShmError(f"shared-memory channel {name!r} ({self.path}) is owned by a live publisher")
        # [owner lock fd, file fd]: a publisher dropped without close() still retires its file (readers stop
        # reading tensors that nobody announces changes of any more) and gives up the name
        self._fds = [owner, -1]
        self._finalizer = weakref.finalize(self, _retire_and_close, self.path, self._fds, os.getpid())
        self._words = None
        self.stats = {"files": 0, "stalls": 0}

    def create(self, header: bytes, block_bytes: int):
        """A new file with this header and a block of `block_bytes` (a torch uint8 tensor, zeroed, returned),
        replacing and retiring the current one once it is made (if it cannot be, OSError, and the current one
        stays). Its sequence word says "being written" until the first publish."""
        import torch

        if block_bytes <= 0:
            raise ValueError("an in-place channel holds at least one byte")
        if self._fds[0] < 0:
            raise RuntimeError("create() after close()")
        header_span, tmp = _aligned(len(header)), self.path.with_name(f"{self.path.name}.{os.getpid()}.new")
        size = CONTROL_BYTES + header_span + _aligned(block_bytes)
        fd, old = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), -1
        try:
            os.ftruncate(fd, size)
            try:
                _reserve(fd, 0, size)
            except OSError as exc:
                raise OSError(exc.errno, f"no room for {size} bytes in {shm_dir()} ({os.strerror(exc.errno)}); "
                                         f"in Docker raise --shm-size") from None
            ctl = np.zeros(CONTROL_BYTES // 8, np.int64)
            ctl[[W_MAGIC, W_LAYOUT, W_HEADER_BYTES, W_BLOCK_BYTES, W_SEQ, W_PID]] = (
                INPLACE_MAGIC, LAYOUT_VERSION, len(header), block_bytes, 1, os.getpid())
            os.pwrite(fd, ctl.tobytes() + header, 0)
            mm = mmap.mmap(fd, size)  # stays mapped while the learner's tensors view it, after the fd is closed
            old = self._fds[1]
            if old < 0:  # a file another (dead) publisher of this name left: retired below too
                try:
                    old = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    pass
            os.replace(tmp, self.path)  # readers never see a half-made file
        except BaseException:
            os.close(fd)
            if old >= 0 and old != self._fds[1]:
                os.close(old)
            tmp.unlink(missing_ok=True)
            raise
        if old >= 0:  # after the replace: readers that see it retired find the new file at the path (no wait for
            mark_retired(old, wait_s=0.01)  # the lock: a stuck reader holds it, and readers read the word under it)
            os.close(old)
        self._fds[1], self._words = fd, memoryview(mm)[:CONTROL_BYTES].cast("q")
        self.stats["files"] += 1
        return torch.from_numpy(np.frombuffer(mm, np.uint8, block_bytes, CONTROL_BYTES + header_span))

    @property
    def writing(self) -> bool:
        """Whether the sequence word says the tensors are being changed (no file yet: False)."""
        return self._words is not None and bool(self._words[W_SEQ] & 1)

    def begin_write(self) -> bool:
        """Mark the tensors as being changed, after the readers' copies in progress; False if they did not end
        within `stall_s` (nothing marked)."""
        words = self._words
        if words is None or words[W_SEQ] & 1:
            return True
        return self._set_seq(words[W_SEQ] + 1)

    def publish(self, version: int) -> bool:
        """The tensors are consistent and are `version` (> every earlier one) from now on; False as `begin_write`."""
        if self._words is None:
            raise RuntimeError("publish() before create()")
        return self._set_seq(2 * version, time.time_ns())

    def _set_seq(self, seq: int, heartbeat: int | None = None) -> bool:
        words, fd = self._words, self._fds[1]
        words[W_WANT] = 1  # no reader starts a copy from now on: only the copies in progress are waited for
        try:
            if not _lock_soon(fd, LOCK_EX, self.stall_s):
                self.stats["stalls"] += 1
                return False
            try:
                words[W_SEQ] = seq
                if heartbeat is not None:
                    words[W_HEARTBEAT] = heartbeat
            finally:
                flock(fd, LOCK_UN)
        finally:
            words[W_WANT] = 0
        return True

    def close(self) -> None:
        """Retire the file and give up the name (the learner's tensors keep the mapping until they let it go)."""
        self._words = None
        self._finalizer()


def _retire_and_close(path: Path, fds: list, pid: int) -> None:
    if os.getpid() != pid:  # a forked child's exit: the file and the name are its parent's
        return
    owner, fd = fds
    fds[:] = [-1, -1]
    if fd >= 0:
        mark_retired(fd, wait_s=0.01)
        path.unlink(missing_ok=True)
        os.close(fd)
    if owner >= 0:
        Path(f"{path}.owner").unlink(missing_ok=True)
        os.close(owner)


class InPlaceSubscriber:
    def __init__(self, name: str, *, max_message_bytes: int = 16 * 2**30, lock_timeout_s: float = 10.0):
        """Read channel `name` (attaches at the first `latest()` that finds the file, and again when it is
        replaced). A file of the other kind raises ShmKindError; a malformed one is logged, counted in
        `bad_frames` and skipped until the publisher replaces it."""
        _checked(name)
        self.name, self.path = name, _path(name)
        self.max_bytes, self.lock_timeout_s = max_message_bytes, lock_timeout_s
        self._fd, self._words = -1, None
        self._arrays: dict = {}
        self.block = None  # the whole block as one uint8 tensor (the arrays view it)
        self._layout: list | None = None
        self._meta: dict = {}
        self._bad: tuple | None = None  # (device, inode) of a malformed file, not read again
        self.last_version = -1
        self.stats = {"received": 0, "skipped_versions": 0, "bad_frames": 0, "attached": 0, "raced": 0}

    def _attach(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == self._bad:
                os.close(fd)
                return False
            mapped = self._map_file(fd, st.st_size)
        except FrameError as exc:
            os.close(fd)
            self._bad = (st.st_dev, st.st_ino)
            self.stats["bad_frames"] += 1
            log.warning("malformed in-place weight channel %s skipped: %s", self.path, exc)
            return False
        except BaseException:
            os.close(fd)
            raise
        if not mapped:
            os.close(fd)
            return False
        self.stats["attached"] += 1
        return True

    def _map_file(self, fd: int, size: int) -> bool:
        """Map the file and check it (FrameError if malformed); False if it was retired already."""
        if size < CONTROL_BYTES:
            raise FrameError(f"{size} bytes, shorter than the control page")
        mm = mmap.mmap(fd, size)
        words = memoryview(mm)[:CONTROL_BYTES].cast("q")
        magic, layout, header_bytes, block_bytes = (words[w] for w in (W_MAGIC, W_LAYOUT, W_HEADER_BYTES,
                                                                        W_BLOCK_BYTES))
        if magic == MAGIC:
            raise ShmKindError(self.path, "slots")
        if magic != INPLACE_MAGIC or layout != LAYOUT_VERSION:
            raise FrameError(f"not an in-place channel of layout {LAYOUT_VERSION} (magic {magic:#x}, layout {layout})")
        if words[W_RETIRED]:  # opened just as it was replaced
            return False
        header_span = _aligned(max(header_bytes, 0))
        if not (0 < header_bytes <= 1 << 24 and 0 < block_bytes <= self.max_bytes
                and size == CONTROL_BYTES + header_span + _aligned(block_bytes)):
            raise FrameError(f"inconsistent layout (header {header_bytes} bytes, block {block_bytes} bytes, file "
                             f"{size} bytes)")
        raw = bytes(mm[CONTROL_BYTES:CONTROL_BYTES + header_bytes])
        try:
            count = len(msgpack.unpackb(raw, raw=False, **_HEADER_LIMITS).get("a", []))
        except Exception as exc:
            raise FrameError(f"header is not valid msgpack ({type(exc).__name__})") from None
        header = _parse_header(raw, count)
        if header["t"] != "in_place":
            raise FrameError(f"header of type {header['t']!r}, not 'in_place'")
        specs = [_check_spec(spec) for spec in header["a"]]
        if len({spec[0] for spec in specs}) != len(specs):
            raise FrameError("two arrays share a name")
        offsets, span = packed_block_layout([spec[4] for spec in specs])
        if span != block_bytes:
            raise FrameError(f"the arrays span {span} bytes, the block has {block_bytes}")
        base = CONTROL_BYTES + header_span
        self._arrays = {name: _array(np.frombuffer(mm, dtype, nbytes // dtype.itemsize, base + off), name, dtype_name,
                                     shape, as_torch=True)
                        for (name, dtype_name, dtype, shape, nbytes), off in zip(specs, offsets)}
        self.block = _array(np.frombuffer(mm, np.uint8, block_bytes, base), "block", "uint8", [block_bytes], True)
        self._layout, self._meta = header["a"], {**header["m"], "in_place": True}
        self._fd, self._words = fd, words
        self._finalizer = weakref.finalize(self, os.close, fd)  # a subscriber dropped without close()
        return True

    def _detach(self) -> None:
        if self._fd >= 0:
            self._finalizer()
        self._fd, self._words, self._arrays, self._layout, self.block = -1, None, {}, None, None

    def latest(self, timeout: float = 0.0) -> Message | None:
        """A message for the newest version newer than the last one returned (waiting up to `timeout` for one), or
        None. Its arrays view the learner's tensors: copy them out inside `reading(msg)`."""
        deadline = time.monotonic() + timeout
        while True:
            if self._words is not None and self._words[W_RETIRED]:
                self._detach()  # the publisher replaced the file (or left)
            if self._words is None:
                self._attach()
            words = self._words
            if words is not None:
                seq = words[W_SEQ]
                if not seq & 1 and seq // 2 > self.last_version:
                    version, stats = seq // 2, self.stats
                    stats["received"] += 1
                    if self.last_version >= 0 and version > self.last_version + 1:
                        stats["skipped_versions"] += version - self.last_version - 1
                    self.last_version = version
                    return Message("update", version, self._meta, self._arrays, layout=self._layout)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(remaining, 0.0005 if words is not None else 0.01))

    def begin_read(self, msg: Message) -> int | None:
        """Take the shared lock for copying `msg`'s arrays out: returns the version they hold now (`msg.seq` or a
        newer one), or None, and no lock, when they are being changed or belong to a retired file (nothing may be
        copied then). `end_read()` once copied (try/finally)."""
        fd, words = self._fd, self._words
        if fd < 0 or msg.arrays is not self._arrays:
            return None
        if words[W_WANT]:  # the learner is waiting to write or publish: let it (poll again)
            self.stats["raced"] += 1
            return None
        if not _lock_soon(fd, LOCK_SH, self.lock_timeout_s):
            raise TransportTimeout(f"the in-place weight channel {self.path} stayed locked for "
                                   f"{self.lock_timeout_s} s")
        seq = words[W_SEQ]
        if seq & 1 or seq // 2 < msg.seq or words[W_RETIRED]:
            flock(fd, LOCK_UN)
            self.stats["raced"] += 1  # the learner wrote after `latest`: a copy now could be torn, none is made
            return None
        if seq // 2 > self.last_version:
            self.last_version = seq // 2
        return seq // 2

    def end_read(self) -> None:
        flock(self._fd, LOCK_UN)

    # the slot channel's holding calls: nothing is held here
    def release(self, msg: Message) -> None:
        pass

    def hold(self, tensors, msg: Message | None = None) -> None:
        pass

    def hold_only(self, msg: Message) -> None:
        pass

    def views(self, tensor) -> bool:
        return False

    def publisher_alive(self) -> bool:
        """Whether a publisher owns the channel now (probes its owner lock)."""
        return owner_alive(self.path)

    def close(self) -> None:
        self._detach()
