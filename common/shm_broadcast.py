"""Same-host, latest-only broadcast through shared memory: the weight sync's path when the learner and its actors
share a machine (colocated simulator actors, several inference processes on one box). `WeightPublisher` /
`WeightSubscriber` use it for endpoints `shm://NAME`; the message format is `common.transport`'s packed one.

    pub = ShmPublisher("weights", max_readers=4)   # creates /dev/shm/rlx-weights (the publisher owns the name)
    out = pub.acquire(nbytes)                     # a free slot, as a uint8 array: pack the message into it
    pub.commit(version)                           # readers see it from now on
    sub = ShmSubscriber("weights")                # any process of the same user on this host; attaches lazily
    msg = sub.latest(timeout=0.0)                 # the newest message, its arrays viewing the shared slot (held)
    sub.release(msg)                              # done with it (copied out), or:
    sub.hold(tensors, msg)                        # keep exactly the slots these tensors view (zero-copy use)

Why: between processes ZMQ copies every update through the kernel (TCP or IPC); here the publisher packs straight into
a slot and the reader's tensors can view that slot, so an update is one copy of the bytes and a few
microsecond-scale lock operations, in another process as in the same one (benchmarks/weight_sync.py).

The file: a 4 KiB control page of little-endian int64 words, then `slots` data slots of `slot_bytes` each.
    0 magic, 1 layout version, 2 slots, 3 slot_bytes, 4 max_readers, 5 retired (1: a newer file replaced this one,
    or the publisher closed), 6 latest slot, 7 latest version, 8 heartbeat (ns since the epoch, at each commit),
    9 publisher pid; 16 + 2 s: slot s's version (-1 while written) and message length;
    16 + 2 slots + 3 r: reader entry r's pid (0: free), in-use slot bit mask, pending slot bit mask.
Every change of who holds what happens under an exclusive flock on the file (a system call, so also a memory barrier
between processes). The publisher writes only into a slot that is neither the latest nor held by a live reader; a
reader holds the slots of the messages `latest()` returned until it releases them (pending) and the slots its
tensors view (`hold`), so a slot is never rewritten under a reader. A weight subscriber holds at most three (the
slot its parameters view, the update waiting to be applied, a newer one arriving), so `3 max_readers + 2` slots
always leave one free. A reader whose process is gone holds nothing. Slots are sparse until first written (tmpfs
allocates pages on write), and reserved with fallocate then, so a full /dev/shm is an OSError, not a SIGBUS.

Lifetime: the publisher keeps an exclusive flock on `NAME.owner` while it lives: a second publisher of the same
name is refused while the first lives, and replaces the file of a dead one (marking it retired, so attached readers
move over). A message larger than the slots makes a new, larger file the same way. `ShmSubscriber.publisher_alive()`
probes the owner lock. Files are created 0600: only the same user can attach. A crashed publisher's file stays in
/dev/shm until the next publisher of that name (or a reboot) removes it. Readers are told apart from the dead by pid,
so all sides must share a PID namespace (one host or one container; containers sharing /dev/shm need `--pid=host`
too). One thread publishes; each subscriber is used from one thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import operator
import os
import re
import tempfile
import time
import weakref
from fcntl import LOCK_EX, LOCK_UN, flock
from pathlib import Path

import numpy as np

from common.transport import FrameError, Message, PackedDecoder, TransportError

log = logging.getLogger("transport")

MAGIC = 0x726C785F73686D31  # "rlx_shm1"
INPLACE_MAGIC = 0x726C785F696E7031  # "rlx_inp1": a channel of common.shm_inplace (the weights published in place)
LAYOUT_VERSION = 1
CONTROL_BYTES = 4096
W_MAGIC, W_LAYOUT, W_SLOTS, W_SLOT_BYTES, W_MAX_READERS, W_RETIRED, W_LATEST_SLOT, W_LATEST_VERSION, W_HEARTBEAT, \
    W_PID = range(10)
SLOT_BASE = 16
MAX_READERS = 20  # 3 * 20 + 2 = 62 slots: a slot mask fits one int64 word
SLOT_ALIGN = 4096
_DATA_PTR = operator.methodcaller("data_ptr")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class ShmError(TransportError):
    """A shared-memory channel that cannot be used: name taken, no free reader entry, a malformed file."""


class ShmKindError(ShmError):
    """The channel's file is of the other kind (slots here, weights published in place in `common.shm_inplace`):
    `kind` is the file's, "slots" or "in_place". `WeightSubscriber` switches reader on it."""

    def __init__(self, path: Path, kind: str):
        super().__init__(f"{path} is a shared-memory channel of kind {kind!r}")
        self.kind = kind


def shm_dir() -> Path:
    """Where the files live: /dev/shm (RAM) where it exists, else the temp directory (then the page cache)."""
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def shm_name(endpoint: str) -> str | None:
    """'shm://NAME' -> NAME (checked); None for other endpoints."""
    return _checked(endpoint[len("shm://"):]) if endpoint.startswith("shm://") else None


def _checked(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"bad shared-memory channel name {name!r}: the name must be 1-100 of A-Z a-z 0-9 _ . -")
    return name


def _path(name: str) -> Path:
    return shm_dir() / f"rlx-{name}"


def _first_free(order: list[int], busy: int) -> int:
    """The first slot of `order` whose bit is clear in `busy`, or -1."""
    for s in order:
        if not busy >> s & 1:
            return s
    return -1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reserve(fd: int, offset: int, length: int) -> None:
    """Back a range of the file with real pages now (where the OS can), so that running out of room is an OSError
    here rather than a SIGBUS on a later write into the mapping."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, offset, length)


class _Mapping:
    """One open channel file: its fd, the mapping, the control words and the layout read from them."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path
        size = os.fstat(fd).st_size
        if size < CONTROL_BYTES:
            raise ShmError(f"{path}: {size} bytes, shorter than the control page")
        self.mm = mmap.mmap(fd, size)
        self.ctl = np.frombuffer(self.mm, np.int64, count=CONTROL_BYTES // 8)
        # the same words as Python ints: on the per-message paths one word costs a tenth of a numpy scalar access
        self.words = memoryview(self.mm)[:CONTROL_BYTES].cast("q")
        magic, layout, slots, slot_bytes, readers = (int(self.ctl[w]) for w in
                                                     (W_MAGIC, W_LAYOUT, W_SLOTS, W_SLOT_BYTES, W_MAX_READERS))
        if magic == INPLACE_MAGIC:
            raise ShmKindError(path, "in_place")
        if magic != MAGIC or layout != LAYOUT_VERSION:
            raise ShmError(f"{path} is not a shared-memory channel of layout {LAYOUT_VERSION} "
                           f"(magic {magic:#x}, layout {layout})")
        if not (0 < readers <= MAX_READERS and slots == 3 * readers + 2 and slot_bytes > 0
                and slot_bytes % SLOT_ALIGN == 0 and size == CONTROL_BYTES + slots * slot_bytes):
            raise ShmError(f"{path}: inconsistent layout (slots {slots}, slot bytes {slot_bytes}, readers {readers}, "
                           f"file {size} bytes)")
        self.slots, self.slot_bytes, self.max_readers = slots, slot_bytes, readers
        self.reader_base = SLOT_BASE + 2 * slots
        self.entries = self.ctl[self.reader_base:self.reader_base + 3 * readers].reshape(readers, 3)
        # each reader entry's in-use and pending slot masks (free entries hold 0): their or is what readers hold
        self.mask_words = [self.reader_base + 3 * r + k for r in range(readers) for k in (1, 2)]
        self.data = np.frombuffer(self.mm, np.uint8, offset=CONTROL_BYTES)
        self.base_ptr = self.data.ctypes.data
        self.slot_arrays: dict[tuple[int, int], np.ndarray] = {}
        self.views: dict = {}  # kept by `pack_block` for the slot arrays, dropped with them (and with the mapping)

    def lock(self) -> "_Mapping":
        """`with m.lock():` holds an exclusive flock on the file for the block."""
        return self

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def slot(self, s: int, length: int) -> np.ndarray:
        """The first `length` bytes of slot `s`; the same array object while its length stays (callers such as
        `pack_block` keep per-buffer state, e.g. views, for an `out` they see again)."""
        key = (s, length)
        arr = self.slot_arrays.get(key)
        if arr is None:
            if len(self.slot_arrays) >= 4 * self.slots:
                self.slot_arrays.clear()
                self.views.clear()
            arr = self.slot_arrays[key] = self.data[s * self.slot_bytes:s * self.slot_bytes + length]
        return arr

    def held_mask(self, check_alive: bool) -> int:
        """Slots held by reader entries (under the lock); with `check_alive`, entries of dead processes are freed."""
        entries = self.entries
        if check_alive:
            for r in np.flatnonzero(entries[:, 0]):
                pid = int(entries[r, 0])
                if pid != os.getpid() and not _pid_alive(pid):
                    entries[r] = 0
        words, mask = self.words, 0
        for w in self.mask_words:
            mask |= words[w]
        return mask

    def close(self) -> None:
        # The mapping itself is not closed: tensors may still view it (zero-copy weights). It goes when they do.
        os.close(self.fd)
        self.fd = -1


class ShmPublisher:
    def __init__(self, name: str, *, max_readers: int = 4):
        """Own the channel `name` (see the module docstring). The file is made at the first `acquire`, sized for
        that message. Raises ShmError if a live publisher owns the name."""
        _checked(name)
        if not 0 < max_readers <= MAX_READERS:
            raise ValueError(f"max_readers must be in 1..{MAX_READERS}, got {max_readers}")
        self.name, self.path, self.max_readers = name, _path(name), max_readers
        self.slots = 3 * max_readers + 2
        self._owner = _lock_owner(Path(f"{self.path}.owner"), 1.0)
        if self._owner < 0:
            raise ShmError(f"shared-memory channel {name!r} ({self.path}) is owned by a live publisher")
        self._map: _Mapping | None = None
        self._reserved: set[int] = set()  # slots whose pages fallocate has reserved
        self._recent = list(range(self.slots))  # slots, the most recently written first: reuse the warmest
        self._writing = -1
        self.stats = {"committed": 0, "files": 0}

    def _create(self, slot_bytes: int) -> None:
        """A new file for messages up to `slot_bytes`, replacing (and retiring) any earlier one of this name."""
        slot_bytes = -(-slot_bytes // SLOT_ALIGN) * SLOT_ALIGN
        self._retire()
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, CONTROL_BYTES + self.slots * slot_bytes)  # sparse: pages come when written
            _reserve(fd, 0, CONTROL_BYTES)
            ctl = np.zeros(CONTROL_BYTES // 8, np.int64)
            ctl[[W_MAGIC, W_LAYOUT, W_SLOTS, W_SLOT_BYTES, W_MAX_READERS, W_LATEST_SLOT, W_LATEST_VERSION, W_PID]] = (
                MAGIC, LAYOUT_VERSION, self.slots, slot_bytes, self.max_readers, -1, -1, os.getpid())
            ctl[SLOT_BASE:SLOT_BASE + 2 * self.slots:2] = -1
            os.pwrite(fd, ctl.tobytes(), 0)
            os.replace(tmp, self.path)  # readers never see a half-initialised file
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._map = _Mapping(fd, self.path)
        self._reserved, self._recent, self._writing = set(), list(range(self.slots)), -1
        self.stats["files"] += 1

    def _retire(self) -> None:
        """Mark the current file (ours, or a dead publisher's left behind) retired, and unlink it."""
        old = self._map
        if old is None:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return
            try:
                old = _Mapping(fd, self.path)
            except ShmError:  # not ours to read (or the other kind's, whose readers are told): just replace it
                mark_retired(fd)
                os.close(fd)
                self.path.unlink(missing_ok=True)
                return
        with old.lock():
            old.ctl[W_RETIRED] = 1
        self.path.unlink(missing_ok=True)
        old.close()
        self._map = None

    def acquire(self, nbytes: int) -> np.ndarray:
        """A free slot of exactly `nbytes` (uint8) to write the next message into; `commit` publishes it."""
        if nbytes <= 0:
            raise ValueError("a message has at least one byte")
        if self._map is not None and self._map.words[W_RETIRED]:  # (before a larger file would replace the taker's)
            raise self._taken_over()
        if self._map is None or nbytes > self._map.slot_bytes:
            self._create(nbytes)  # also when a message outgrows the slots: readers move to the new file
        m = self._map
        words, fd = m.words, m.fd
        flock(fd, LOCK_EX)  # (not `with m.lock()`: on this path each Python call counts)
        try:
            if words[W_RETIRED]:  # another publisher replaced our file: its readers have moved on and released
                raise self._taken_over()
            latest = words[W_LATEST_SLOT]
            latest_bit = 1 << latest if latest >= 0 else 0
            busy = m.held_mask(check_alive=False) | latest_bit
            s = _first_free(self._recent, busy)
            if s < 0:  # a reader process that died still "holds" slots: free its entry and look again
                busy = m.held_mask(check_alive=True) | latest_bit
                s = _first_free(self._recent, busy)
            if s < 0:
                raise ShmError(f"all {m.slots} slots of {self.path} are held by readers")
            words[SLOT_BASE + 2 * s] = -1  # (version, length)
            words[SLOT_BASE + 2 * s + 1] = nbytes
        finally:
            flock(fd, LOCK_UN)
        if s not in self._reserved:
            try:
                _reserve(m.fd, CONTROL_BYTES + s * m.slot_bytes, m.slot_bytes)
            except OSError as exc:
                raise OSError(exc.errno, f"no room for a {m.slot_bytes}-byte slot in {shm_dir()} "
                                         f"({os.strerror(exc.errno)}); in Docker raise --shm-size, or use fewer "
                                         f"max_readers") from None
            self._reserved.add(s)
        self._writing = s
        return m.slot(s, nbytes)

    def _taken_over(self) -> ShmError:
        """The error of a publisher whose file another one retired (its readers moved on and released its slots)."""
        return ShmError(f"shared-memory channel {self.name!r} was taken over by another publisher (pid "
                        f"{_owner_pid(self.path)}): this one can no longer publish")

    @property
    def views(self) -> dict | None:
        """For `pack_block(..., views=)`: kept tensor views of the slots of the current file."""
        return self._map.views if self._map is not None else None

    def commit(self, version: int) -> None:
        """Publish the message written into the slot `acquire` returned, as `version`."""
        m, s = self._map, self._writing
        if m is None or s < 0:
            raise RuntimeError("commit() without acquire()")
        words, fd, now = m.words, m.fd, time.time_ns()
        flock(fd, LOCK_EX)
        try:
            words[SLOT_BASE + 2 * s] = version
            words[W_LATEST_SLOT], words[W_LATEST_VERSION], words[W_HEARTBEAT] = s, version, now
        finally:
            flock(fd, LOCK_UN)
        self._recent.remove(s)
        self._recent.insert(0, s)
        self._writing = -1
        self.stats["committed"] += 1

    def close(self) -> None:
        if self._owner < 0:
            return
        self._retire()
        Path(f"{self.path}.owner").unlink(missing_ok=True)
        os.close(self._owner)
        self._owner = -1


class ShmSubscriber:
    def __init__(self, name: str, *, max_message_bytes: int = 16 * 2**30, as_torch: bool = False):
        """Read channel `name` from any process of this user on this host. Attaches at the first `latest()` that
        finds the file (the publisher may start later), and again when the publisher replaces it."""
        _checked(name)
        self.name, self.path = name, _path(name)
        self._decode = PackedDecoder(max_message_bytes, as_torch)
        self._map: _Mapping | None = None
        self._entry = -1
        self._pending: dict[int, int] = {}  # version -> slot, of messages returned and not yet released
        self.last_version = -1
        self.stats = {"received": 0, "skipped_versions": 0, "bad_frames": 0, "attached": 0}
        self._finalizer = None

    # ------------------------------------------------------------------------------------------------ attach
    def _attach(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            m = _Mapping(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        entry, retired = -1, False
        with m.lock():  # (closing inside would leave the lock held: the mapping keeps its own handle on the file)
            retired = bool(m.ctl[W_RETIRED])
            if not retired:
                free = np.flatnonzero(m.entries[:, 0] == 0)
                if not len(free):
                    m.held_mask(check_alive=True)  # frees the entries of dead readers
                    free = np.flatnonzero(m.entries[:, 0] == 0)
                if len(free):
                    entry = int(free[0])
                    m.entries[entry] = (os.getpid(), 0, 0)
        if retired:  # opened just as it was replaced: try again next time
            m.close()
            return False
        if entry < 0:
            m.close()
            raise ShmError(f"all {m.max_readers} reader entries of {self.path} are taken; give the publisher "
                           f"a larger max_readers")
        self._map, self._entry, self._pending = m, entry, {}
        self._finalizer = weakref.finalize(self, _free_entry, m, entry)
        self.stats["attached"] += 1
        return True

    def _detach(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # frees our reader entry and closes the fd; tensors keep the mapping alive
            self._finalizer = None
        self._map, self._entry, self._pending = None, -1, {}
        self._decode = PackedDecoder(self._decode.max_bytes, self._decode.as_torch)  # its kept views: old file's

    def _pending_mask(self) -> int:
        mask = 0
        for s in self._pending.values():
            mask |= 1 << s
        return mask

    def _set_pending(self) -> None:  # under the lock
        self._map.words[self._map.reader_base + 3 * self._entry + 2] = self._pending_mask()

    def _set_held(self, in_use: int) -> None:
        """Record the slots our tensors view (`in_use`) and the pending ones, under the lock."""
        m = self._map
        words, at, pending = m.words, m.reader_base + 3 * self._entry + 1, self._pending_mask()
        flock(m.fd, LOCK_EX)
        try:
            words[at], words[at + 1] = in_use, pending
        finally:
            flock(m.fd, LOCK_UN)

    # ---------------------------------------------------------------------------------------------- reading
    def latest(self, timeout: float = 0.0) -> Message | None:
        """The newest message newer than the last one returned (waiting up to `timeout` for one), or None. Its
        slot stays held until `release(msg)` or `hold(..., msg)`."""
        deadline = time.monotonic() + timeout
        while True:
            m = self._map
            if m is not None and m.words[W_RETIRED]:
                self._detach()  # the publisher replaced the file (or left): messages taken from it stay valid
                m = None
            if m is None and self._attach():
                m = self._map
            if m is not None and m.words[W_LATEST_VERSION] > self.last_version:  # a plain read: the hint
                return self._take(m)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(remaining, 0.0005 if m is not None else 0.01))

    def _take(self, m: _Mapping) -> Message | None:
        words, pending = m.words, self._pending
        flock(m.fd, LOCK_EX)
        try:
            s, version = words[W_LATEST_SLOT], words[W_LATEST_VERSION]
            if not 0 <= s < m.slots:  # a corrupt control page: nothing to hold, nothing to read
                self.stats["bad_frames"] += 1
                log.warning("bad shared-memory control page dropped: latest slot %d of %d", s, m.slots)
                self.last_version = version
                return None
            length = words[SLOT_BASE + 2 * s + 1]
            pending[version] = s  # held from here on: the publisher will not rewrite it
            self._set_pending()
        finally:
            flock(m.fd, LOCK_UN)
        try:
            if not 0 < length <= m.slot_bytes:
                raise FrameError(f"slot {s} claims {length} bytes (slots have {m.slot_bytes})")
            msg = self._decode(m.slot(s, length), key=s)  # a slot stays put: its views are made once
            if msg.seq != version:
                raise FrameError(f"slot {s} holds version {msg.seq}, the control page says {version}")
        except FrameError as exc:
            self.stats["bad_frames"] += 1
            log.warning("bad shared-memory message dropped: %s", exc)
            self.last_version = version  # do not read the same bad slot again
            self._release(version)
            return None
        stats = self.stats
        stats["received"] += 1
        if self.last_version >= 0 and version > self.last_version + 1:
            stats["skipped_versions"] += version - self.last_version - 1
        self.last_version = version
        return msg

    def _release(self, version: int) -> None:
        if self._map is not None and self._pending.pop(version, None) is not None:
            with self._map.lock():
                self._set_pending()

    def release(self, msg: Message) -> None:
        """Done with `msg` (copied out of it, or dropped): its slot may be rewritten."""
        self._release(msg.seq)

    def hold(self, tensors, msg: Message | None = None) -> None:
        """Hold exactly the slots these tensors view (a zero-copy actor's parameters after applying `msg`), and
        release `msg`."""
        m = self._map
        if m is None:
            return
        lo, hi, size = m.base_ptr, m.base_ptr + m.slots * m.slot_bytes, m.slot_bytes
        mask = 0
        for ptr in map(_DATA_PTR, tensors):
            if lo <= ptr < hi:
                mask |= 1 << ((ptr - lo) // size)
        if msg is not None:
            self._pending.pop(msg.seq, None)
        self._set_held(mask)

    def hold_only(self, msg: Message) -> None:
        """`hold(tensors, msg)` where the tensors now all view `msg`'s slot (none views another): hold that slot
        alone, without looking at each tensor."""
        s = self._pending.pop(msg.seq, None)
        if self._map is not None and s is not None:
            self._set_held(1 << s)

    def views(self, tensor) -> bool:
        """Whether `tensor` views a slot of the file this subscriber reads now."""
        m = self._map
        return m is not None and m.base_ptr <= tensor.data_ptr() < m.base_ptr + m.slots * m.slot_bytes

    def publisher_alive(self) -> bool:
        """Whether a publisher owns the channel now (probes its owner lock)."""
        return owner_alive(self.path)

    def close(self) -> None:
        self._detach()


def owner_alive(path: Path) -> bool:
    """Whether a live publisher holds the owner lock of the channel file `path`."""
    try:
        fd = os.open(f"{path}.owner", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # closing drops our probe lock too
    return False


def mark_retired(fd: int, wait_s: float = 1.0) -> None:
    """Set the retired word of a channel file of either kind (both keep it at W_RETIRED), so that its readers move
    to the file that replaces it; files of neither kind are left as they are. `wait_s`: how long to wait for the
    file's lock (a memory barrier) before setting the word without it."""
    try:
        if os.fstat(fd).st_size < CONTROL_BYTES:
            return
        with mmap.mmap(fd, CONTROL_BYTES) as mm:
            words = memoryview(mm).cast("q")
            try:
                if words[W_MAGIC] in (MAGIC, INPLACE_MAGIC):
                    # (the lock is a memory barrier; a reader stuck holding it must not hold this up: after
                    # `wait_s` the word is set without it, which readers also read without the lock)
                    locked = _lock_within(fd, wait_s)
                    try:
                        words[W_RETIRED] = 1
                    finally:
                        if locked:
                            flock(fd, LOCK_UN)
            finally:
                words.release()
    except OSError:
        pass


def _free_entry(m: _Mapping, entry: int) -> None:
    """Give a reader entry back (on close, or when the subscriber is garbage-collected)."""
    if m.fd < 0:
        return
    try:
        # A garbage collection may run this in a thread that holds the file's lock through another mapping (inside
        # an acquire or a take), where waiting for it would never end: after a second without it, the entry is
        # cleared without the lock, which giving slots back allows (the publisher reads the masks only under it, and
        # a stale read just keeps them a moment longer); the masks go before the pid, which frees the entry
        locked = _lock_within(m.fd, 1.0)
        try:
            if m.entries[entry, 0] == os.getpid():
                m.entries[entry, 1:] = 0
                m.entries[entry, 0] = 0
        finally:
            if locked:
                flock(m.fd, LOCK_UN)
    finally:
        m.close()


def _lock_owner(path: Path, seconds: float) -> int:
    """Open and exclusively lock the owner file `path`, waiting up to `seconds`: the locked fd, or -1 if a live
    publisher holds it. The lock must be on the file that is at `path` when it is taken: a closing publisher unlinks
    its owner file, and a lock on that unlinked file would let a third publisher lock a new one beside ours."""
    deadline = time.monotonic() + seconds
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if not _lock_within(fd, max(0.0, deadline - time.monotonic())):
            os.close(fd)
            return -1
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # (our lock goes with it) the file was unlinked while we waited: lock the one there now


def _owner_pid(path: Path) -> int:
    """The pid recorded in a channel file's control page (0 if unreadable)."""
    try:
        with open(path, "rb") as f:
            return int.from_bytes(f.read(8 * (W_PID + 1))[8 * W_PID:], "little", signed=True)
    except OSError:
        return 0


def _lock_within(fd: int, seconds: float, mode: int = LOCK_EX) -> bool:
    """Take the lock on `fd` (exclusive, or `mode`) if it comes within `seconds`; whether it did."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
