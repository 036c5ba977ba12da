"""ZMQ transport: framing without pickle, and the three patterns the async scripts use.

Framing. A message is a multipart ZMQ message: frame 0 is a msgpack header
    {"v": protocol version, "t": message type, "s": sequence id, "m": small metadata (msgpack types),
     "a": [[name, dtype, shape], ...]}
followed by one raw frame per array (sent zero-copy from numpy / CPU torch memory). `decode` checks everything (version,
frame count, dtype allow-list, shape, byte counts, size cap) and raises `FrameError`; receivers log a bad frame, count
it and keep serving. A stream of one layout (a model's weights, version after version) can pack its header with
`VersionedHeader` (all but the version packed once), which `PackedDecoder` recognises by its bytes.

Patterns (the robot side always connects, the learner side binds, so a robot behind NAT needs no inbound port):
1. `DataSender` (DEALER) -> `DataReceiver` (ROUTER): items with (session, sequence id), acknowledged by the receiver and
   resent by the sender until acknowledged (also after either side restarts). The receiver drops duplicates, so
   delivery is at-least-once made idempotent. The receiver acknowledges when the consumer says an item is stored
   (`ack`), and a restarted consumer hands back what it had stored (`delivered=`), so nothing is delivered twice.
   An optional spool directory keeps a sender's unacknowledged items across its own restarts.
2. `Publisher` (PUB) -> `Subscriber` (SUB): versioned, latest-only broadcast (weights). `Subscriber.latest()` drains
   everything waiting and returns only the newest; the receiver applies it at a boundary it chooses.
3. `RpcServer` (ROUTER) <- `RpcClient` (DEALER): request/reply with deadlines, a hello handshake that compares the
   protocol version and a hash of the obs/action spec (a mismatch is refused with what differs), and heartbeats.

Security: pass `curve=CurveConfig(...)` to both sides to use CurveZMQ; the server accepts only the client public keys
in its allow-list directory. Make keys with `python -m common.transport keygen DIR NAME`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from common.fsutil import atomic_write, exclusive_lock

log = logging.getLogger("transport")

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
ALLOWED_DTYPES = {
    np.dtype(t).str: np.dtype(t)
    for t in ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
              "float16", "float32", "float64")
}
BFLOAT16 = "bfloat16"  # torch bf16 tensors travel as their raw 16-bit words


class TransportError(RuntimeError):
    """Base class of transport errors."""


class FrameError(TransportError):
    """A message that does not decode: truncated, wrong version, wrong dtype or shape, oversized, garbage."""


class ProtocolMismatch(FrameError):
    """A well-formed message of another protocol version: an RPC server answers it with a refusal that names both
    versions (instead of dropping it as garbage, which would leave the peer to time out)."""

    def __init__(self, theirs, seq):
        super().__init__(f"protocol version {theirs!r}, expected {PROTOCOL_VERSION}")
        self.theirs, self.seq = theirs, seq if isinstance(seq, int) and 0 <= seq < 2**63 else 0


class TransportTimeout(TransportError):
    """A blocking call ran past its deadline."""


class EndpointError(TransportError, ValueError):
    """An endpoint that ZMQ cannot bind or connect (a malformed address, a port in use)."""


class HandshakeError(TransportError):
    """The peer speaks another protocol version or another obs/action spec."""


@dataclass
class Message:
    type: str
    seq: int = 0
    meta: dict = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)
    peer: bytes | None = None  # ROUTER routing id of the sender, where there is one
    layout: list | None = None  # from a PackedDecoder: its validated array specs, the same object while they hold


# ------------------------------------------------------------------------------------------------------------ framing
def _as_frame(value, device_ok: bool = False) -> tuple[str, tuple, Any]:
    """(dtype name, shape, buffer) for a numpy array or CPU torch tensor, without copying when it is contiguous.
    With `device_ok` a GPU tensor stays a tensor: only `pack_frames` can take it (it copies it into the packed
    buffer, device to host)."""
    if type(value).__module__.startswith("torch"):
        import torch

        t = value.detach()
        if t.device.type != "cpu":
            if not device_ok:
                raise TypeError("only CPU tensors can be framed; copy to the host first (see common.weight_sync)")
            name = BFLOAT16 if t.dtype == torch.bfloat16 else torch.empty(0, dtype=t.dtype).numpy().dtype.str
            if name != BFLOAT16 and name not in ALLOWED_DTYPES:
                raise TypeError(f"dtype {t.dtype} cannot be framed")
            return name, tuple(t.shape), t.contiguous()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return BFLOAT16, tuple(t.shape), t.view(torch.int16).numpy()
        value = t.numpy()
    arr = np.asarray(value)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise TypeError(f"dtype {arr.dtype} cannot be framed; allowed: {sorted(ALLOWED_DTYPES)} and bfloat16")
    return arr.dtype.str, arr.shape, arr


def _frameable(value):
    """A numpy array (or a CPU bfloat16 tensor) that `encode` accepts; raises TypeError with the reason otherwise."""
    dtype, _, _ = _as_frame(value)
    if dtype == BFLOAT16:
        return value.detach().contiguous()
    if type(value).__module__.startswith("torch"):
        return value.detach().contiguous().numpy()
    return np.asarray(value)


def encode(msg_type: str, meta: dict | None = None, arrays: dict | None = None, seq: int = 0,
           device_frames: bool = False) -> list:
    """Message -> list of frames (header bytes, then array buffers, zero-copy). `device_frames`: GPU tensors stay
    on the GPU as frames for `pack_frames`, which copies them straight into the packed host buffer."""
    specs, frames = [], []
    for name, value in (arrays or {}).items():
        dtype, shape, buf = _as_frame(value, device_ok=device_frames)
        specs.append([name, dtype, list(shape)])
        frames.append(buf)
    return [encode_header(msg_type, meta, specs, seq), *frames]


def checked_meta(meta: dict | None) -> tuple[dict, int]:
    """(a copy of `meta` as a receiver will decode it, its packed size), or ValueError saying why a receiver would
    refuse it: a sender that queued it would resend a message that is dropped every time. msgpack types only (no
    numpy scalars), string keys, strings and bytes up to 1 MiB, lists and maps up to 65,536 entries."""
    try:
        packed = msgpack.packb(meta or {}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"meta cannot travel: {exc} (msgpack types only: convert numpy scalars with float() / "
                         f"int() / .tolist())") from None
    try:
        copy = msgpack.unpackb(packed, raw=False, **_HEADER_LIMITS)
    except Exception as exc:
        raise ValueError(f"meta a receiver would refuse: {type(exc).__name__}: {exc} (map keys must be strings; "
                         f"strings and bytes up to 1 MiB, lists and maps up to 65,536 entries)") from None
    if not isinstance(copy, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    return copy, len(packed)


def encode_header(msg_type: str, meta: dict | None, specs: list, seq: int = 0) -> bytes:
    """The header frame: protocol version, type, sequence id, meta, and [name, dtype, shape] per array frame."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": msg_type, "s": int(seq), "m": meta or {}, "a": specs},
                         use_bin_type=True)


_SEQ_KEY = msgpack.packb("s")
_UINT_MARKERS = {2: 0xCC, 3: 0xCD, 5: 0xCE, 9: 0xCF}  # encoded length -> msgpack's unsigned-int marker byte


class VersionedHeader:
    """`encode_header(msg_type, {**meta, version_key: seq}, specs, seq)` for a stream whose messages differ only in
    `seq` (one model's weights, version after version): everything but the number is packed once, and each message
    packs just the number (the map's keys come in another order than `encode_header`'s, which decoding ignores)."""

    def __init__(self, msg_type: str, meta: dict, specs: list, version_key: str = "version"):
        packer = msgpack.Packer(use_bin_type=True)
        pack, rest = packer.pack, {k: v for k, v in meta.items() if k != version_key}
        self._head = b"".join([packer.pack_map_header(5), pack("v"), pack(PROTOCOL_VERSION), pack("t"),
                               pack(msg_type), pack("a"), pack(specs), pack("m"),
                               packer.pack_map_header(len(rest) + 1), *(pack(k) + pack(v) for k, v in rest.items()),
                               pack(version_key)])

    def __call__(self, seq: int) -> bytes:
        number = msgpack.packb(int(seq))
        return self._head + number + _SEQ_KEY + number

    @staticmethod
    def stem(raw: bytes, header: dict) -> bytes | None:
        """For a validated header made by a `VersionedHeader`: its bytes but the trailing `number, "s", number`.
        A header that starts with these bytes and ends in another such triple is the same header with another
        version (checked here by decoding one such header built with another number). None for other headers."""
        seq, meta = header["s"], header["m"]
        if not (type(seq) is int and seq >= 0 and meta and list(meta)[-1] == "version" and meta["version"] == seq):
            return None
        number = msgpack.packb(seq)
        tail = number + _SEQ_KEY + number
        if not raw.endswith(tail):
            return None
        stem, other = raw[:-len(tail)], seq + 2**40
        try:  # (a version near 2**64 has no such neighbour: no stem, every check instead)
            probe = msgpack.packb(other)
            check = msgpack.unpackb(stem + probe + _SEQ_KEY + probe)
        except Exception:
            return None
        return stem if check == {**header, "s": other, "m": {**meta, "version": other}} else None


def frame_spec(name: str, value) -> list:
    """[name, dtype name, shape] of an array or tensor (any device) as `encode` would describe it."""
    dtype, shape, _ = _as_frame(value, device_ok=True)
    return [name, dtype, list(shape)]


def decode(frames: list, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, as_torch: bool = False) -> Message:
    """Frames -> Message, validating every field. Raises FrameError with the reason."""
    if not frames:
        raise FrameError("empty message")
    raw = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
    total = sum(memoryview(f).nbytes for f in raw)
    if total > max_bytes:
        raise FrameError(f"message of {total} bytes exceeds the {max_bytes}-byte limit")
    header = _parse_header(raw[0], len(raw) - 1)
    arrays = {}
    for spec, buf in zip(header["a"], raw[1:]):
        name, dtype_name, dtype, shape, nbytes = _check_spec(spec)
        if memoryview(buf).nbytes != nbytes:
            raise FrameError(f"array {name!r}: shape {shape} of {dtype_name} needs {nbytes} bytes, "
                             f"frame has {memoryview(buf).nbytes}")
        arrays[name] = _array(np.frombuffer(buf, dtype=dtype), name, dtype_name, shape, as_torch)
    return Message(header["t"], header["s"], header["m"], arrays)


_HEADER_LIMITS = dict(strict_map_key=True, max_bin_len=1 << 20, max_str_len=1 << 20, max_array_len=1 << 16,
                      max_map_len=1 << 16)


def _parse_header(raw0, array_frames: int) -> dict:
    try:
        header = msgpack.unpackb(bytes(raw0), raw=False, **_HEADER_LIMITS)
    except Exception as exc:
        raise FrameError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict) or not {"v", "t", "s", "m", "a"} <= header.keys():
        raise FrameError("header lacks the fields v, t, s, m, a")
    if header["v"] != PROTOCOL_VERSION:
        raise ProtocolMismatch(header["v"], header["s"])
    if not isinstance(header["t"], str) or not isinstance(header["s"], int) or not isinstance(header["m"], dict):
        raise FrameError("header fields have the wrong types")
    specs = header["a"]
    if not isinstance(specs, list) or len(specs) != array_frames:
        raise FrameError(f"header names {len(specs) if isinstance(specs, list) else '?'} arrays but "
                         f"{array_frames} array frames follow")
    return header


def _check_spec(spec) -> tuple[str, str, np.dtype, list, int]:
    """(name, dtype name, numpy dtype, shape, byte count) of a valid [name, dtype, shape] spec; FrameError if not."""
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], str)
            and isinstance(spec[2], list) and all(isinstance(d, int) and d >= 0 for d in spec[2])):
        raise FrameError(f"bad array spec {spec!r}")
    name, dtype_name, shape = spec
    if dtype_name == BFLOAT16:
        dtype = np.dtype("int16")
    elif dtype_name in ALLOWED_DTYPES:
        dtype = ALLOWED_DTYPES[dtype_name]
    else:
        raise FrameError(f"array {name!r}: dtype {dtype_name!r} is not allowed")
    return name, dtype_name, dtype, shape, math.prod(shape) * dtype.itemsize


def _array(flat: np.ndarray, name: str, dtype_name: str, shape: list, as_torch: bool):
    """The array (or torch tensor) of one frame, from its flat view of the right dtype and size."""
    try:
        arr = flat.reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a dimension too large for the platform
        raise FrameError(f"array {name!r}: shape {shape} cannot be used ({exc})") from None
    if dtype_name == BFLOAT16 or as_torch:
        import torch

        t = torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)
        arr = t.view(torch.bfloat16) if dtype_name == BFLOAT16 else t
    return arr


class PackedDecoder:
    """`decode(unpack_frames(buf))` for a stream of packed messages (a weight broadcast), with the same results and
    errors, made cheap for the common case: a message laid out like the previous one (same frame lengths, same array
    specs: one model's weights, version after version) is checked against that remembered layout in two
    comparisons instead of field by field, and its arrays are sliced from one view of the buffer. At 1M parameters
    in 10 tensors the per-array checks cost as much as the bytes' copy."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, as_torch: bool = False):
        self.max_bytes, self.as_torch = max_bytes, as_torch
        # (packed prefix, total size, header slot, specs, [(name, dtype, shape, start, bytes)], versioned) where
        # versioned, for a `VersionedHeader` stream, is (header stem, type, meta but the version, number length)
        self._layout = None
        self._views: dict = {}  # key -> (specs, arrays)

    def __call__(self, buf, key=None) -> Message:
        """`key`: for buffers that stay at one place (a shared-memory slot), a name for that place: the arrays made
        for it are kept and handed out again while the layout holds, since they view the same bytes. Not for
        buffers that are freed and reallocated (the kept views would keep them alive)."""
        view = memoryview(buf).cast("B")
        layout = self._layout
        # (bytes, not memoryview, comparisons: a memoryview compares item by item, several times slower)
        head = b""
        if layout is not None and view.nbytes == layout[1]:
            head = view[:layout[2][0] + layout[2][1]].tobytes()  # prefix, padding, header
        if head and head.startswith(layout[0]):
            prefix, total, (start, length), specs, plan, versioned = layout
            raw = head[start:]
            seq = self._versioned_seq(raw, versioned) if versioned else None
            if seq is not None:  # the learned header but for its version: nothing else to check
                msg_type, meta, same_specs = versioned[1], {**versioned[2], "version": seq}, True
            else:
                header = _parse_header(raw, len(specs))
                msg_type, seq, meta, same_specs = header["t"], header["s"], header["m"], header["a"] == specs
            if same_specs:  # the same names, dtypes and shapes as the validated layout
                kept = self._views.get(key) if key is not None else None
                if kept is not None and kept[0] is specs:
                    arrays = kept[1]
                else:
                    whole = np.frombuffer(view, np.uint8)
                    arrays = {name: _array(whole[off:off + n].view(dtype), name, dtype_name, shape, self.as_torch)
                              for name, dtype_name, dtype, shape, off, n in plan}
                    if key is not None:
                        self._views[key] = (specs, arrays)
                return Message(msg_type, seq, meta, dict(arrays), layout=specs)
        frames = unpack_frames(view)
        msg = decode(frames, self.max_bytes, self.as_torch)  # every check; raises on anything wrong
        lengths = [f.nbytes for f in frames]
        offsets, total = _packed_offsets(lengths)
        header = _parse_header(frames[0], len(frames) - 1)
        specs, raw = header["a"], bytes(frames[0])
        plan = [(*_check_spec(spec)[:4], off, n) for spec, off, n in zip(specs, offsets[1:], lengths[1:])]
        stem = VersionedHeader.stem(raw, header)
        versioned = None if stem is None else (stem, header["t"], {k: v for k, v in header["m"].items()
                                                                    if k != "version"}, (len(raw) - len(stem) - 2) // 2)
        self._layout = (bytes(view[:4 + 8 * len(lengths)]), total, (offsets[0], lengths[0]), specs, plan, versioned)
        msg.layout = specs
        if key is not None:
            self._views[key] = (specs, msg.arrays)
            msg.arrays = dict(msg.arrays)
        return msg

    @staticmethod
    def _versioned_seq(raw: bytes, versioned) -> int | None:
        """The version, if `raw` is the learned stem followed by `number, "s", number` (the number's encoding as
        long as the learned one's: the layout fixed the header's length); else None (then it is parsed in full)."""
        stem, _, _, k = versioned
        if not raw.startswith(stem):
            return None
        tail = raw[len(stem):]  # number, "s", number: 2 k + 2 bytes
        if tail[k:k + 2] != _SEQ_KEY or tail[:k] != tail[k + 2:]:
            return None
        first = tail[0]
        if k == 1 and first < 0x80:  # msgpack's positive fixint
            return first
        if _UINT_MARKERS.get(k) == first:  # msgpack's uint 8 / 16 / 32 / 64: big-endian after the marker
            return int.from_bytes(tail[1:k], "big")
        try:
            seq = msgpack.unpackb(tail[:k])
        except Exception:
            return None
        return seq if type(seq) is int else None


_ALIGN = 64


def _raw(frame) -> memoryview:
    """A flat byte view of a frame (numpy array, bytes, memoryview), empty and 0-d arrays included."""
    if isinstance(frame, np.ndarray):
        return memoryview(frame.reshape(-1).view(np.uint8))
    view = memoryview(frame)
    return view.cast("B") if view.nbytes else memoryview(b"")


def frame_nbytes(frame) -> int:
    """Byte size of a frame: bytes, memoryview, numpy array or torch tensor (any device)."""
    if type(frame).__module__.startswith("torch"):
        return frame.numel() * frame.element_size()
    return memoryview(frame).nbytes


def _packed_offsets(lengths) -> tuple[tuple[int, ...], int]:
    """Where each frame of a packed message starts, and the total size."""
    return _packed_layout(tuple(lengths))[:2]


@functools.lru_cache(maxsize=256)
def _packed_layout(lengths: tuple[int, ...]) -> tuple[tuple[int, ...], int, bytes]:
    """(frame offsets, total size, prefix bytes) of a packed message: the same few layouts recur message after
    message (one model's weights), so they are computed once."""
    pos = 4 + 8 * len(lengths)
    offsets = []
    for n in lengths:
        pos = -(-pos // _ALIGN) * _ALIGN
        offsets.append(pos)
        pos += n
    return tuple(offsets), pos, len(lengths).to_bytes(4, "little") + np.asarray(lengths, "<u8").tobytes()


def _packed_buffer(lengths: tuple[int, ...] | list[int], out: np.ndarray | None,
                   pinned: bool) -> tuple[np.ndarray, list[int]]:
    """A buffer for a packed message (`out` reused when its size fits), its prefix and padding written."""
    offsets, total, prefix = _packed_layout(tuple(lengths))
    if out is not None and out.shape == (total,):
        buf = out
    elif pinned:
        import torch

        buf = torch.empty(total, dtype=torch.uint8, pin_memory=True).numpy()  # the array keeps the tensor alive
    else:
        buf = _aligned_empty(total)  # every byte is written
    if buf is out and buf[:len(prefix)].tobytes() == prefix:
        return buf, offsets  # a reused buffer packed with the same lengths: prefix and padding are in place
    buf[:len(prefix)] = np.frombuffer(prefix, np.uint8)
    end = len(prefix)
    for off, n in zip(offsets, lengths):
        buf[end:off] = 0  # alignment padding
        end = off + n
    return buf, offsets


def packed_size(lengths: list[int]) -> int:
    """Bytes of a packed message whose frames have these lengths (header frame first)."""
    return _packed_offsets(lengths)[1]


def packed_block_layout(lengths: list[int]) -> tuple[list[int], int]:
    """Offsets of frames relative to the first one, and the span from its start to the end of the last, when they
    are packed after a header: the layout of the block that `pack_block` copies in one piece."""
    offsets, total = _packed_offsets([0, *lengths])  # the header's length does not move the frames relative to
    return [o - offsets[1] for o in offsets[1:]], total - offsets[1]  # each other: the first starts 64-aligned


def pack_block(header: bytes, lengths: list[int], block, out: np.ndarray | None = None,
               pinned: bool = False, views: dict | None = None) -> np.ndarray:
    """`pack_frames([header, *frames])` when the frames already lie in one buffer `block` (a torch uint8 tensor on
    any device) laid out as `packed_block_layout(lengths)` says: one copy for all of them. A GPU block is copied
    device-to-host asynchronously on the current CUDA stream: synchronise it before sending. `views`: a dict the
    caller owns (and drops with its buffers) where the tensor view of an `out` seen again (a shared-memory slot) is
    kept: on this path each torch or numpy call is a sizeable part of a small model's sync."""
    size = len(header)
    # An `out` seen again with the same lengths keeps its prefix and padding (checked: the prefix is compared), so
    # only the header and the block are written: (out, lengths, header length, prefix, header offset, frames view)
    kept = views.get(id(out)) if views is not None and out is not None else None
    if (kept is None or kept[0] is not out or kept[2] != size or kept[1] != lengths
            or out[:len(kept[3])].tobytes() != kept[3]):
        buf, offsets = _packed_buffer((size, *lengths), out, pinned)
        prefix = _packed_layout((size, *lengths))[2]
        kept = (buf, list(lengths), size, prefix, offsets[0], sys.modules["torch"].from_numpy(buf[offsets[1]:]))
        if views is not None and buf is out:
            views[id(buf)] = kept
    buf, at, frames = kept[0], kept[4], kept[5]
    if block.numel() != frames.numel():  # the frames' span does not depend on where the header ends (see above)
        raise ValueError(f"block of {block.numel()} bytes, the layout needs {frames.numel()}")
    buf.data[at:at + size] = header
    frames.copy_(block, non_blocking=not block.is_cpu)  # torch: `block` is a tensor
    return buf


def pack_frames(frames: list, out: np.ndarray | None = None, pinned: bool = False) -> np.ndarray:
    """Frames -> one uint8 buffer: [u32 count][u64 length x count][frames, each 64-byte aligned]. Used where one ZMQ
    frame per message is needed: latest-only broadcast (ZMQ conflates only single frames), spooled batches.
    `out`, when it has exactly the right size, is reused (warm memory copies several times faster than fresh).
    GPU tensor frames (`encode(..., device_frames=True)`) are copied device-to-host straight into their slot,
    asynchronously on the current CUDA stream: synchronise it before sending. `pinned` allocates a new buffer in
    page-locked memory (fast, truly asynchronous D2H copies)."""
    lengths = [frame_nbytes(f) for f in frames]
    buf, offsets = _packed_buffer(lengths, out, pinned)
    for f, off, n in zip(frames, offsets, lengths):
        if type(f).__module__.startswith("torch") and f.device.type != "cpu":
            import torch

            torch.from_numpy(buf[off:off + n]).view(f.dtype).view(f.shape).copy_(f, non_blocking=True)
            continue
        # a numpy frame is viewed as bytes directly (writable stays writable: no read-only warning to suppress)
        src = f.reshape(-1).view(np.uint8) if isinstance(f, np.ndarray) else np.frombuffer(_raw(f), np.uint8)
        if n >= 1 << 16 and _torch_copy(buf[off:off + n], src):
            pass  # large frames: torch's multi-threaded copy
        else:
            buf[off:off + n] = src
    return buf


def _aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose start is 64-byte aligned, so that the 64-byte-aligned frame slots are
    cache-line aligned in memory too (numpy's own allocations are only 16-byte aligned: copies into them measured
    ~30% slower)."""
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes]


def _torch_copy(dst: np.ndarray, src: np.ndarray) -> bool:
    try:
        import torch
    except ImportError:
        return False
    if src.flags.writeable:
        torch.from_numpy(dst).copy_(torch.from_numpy(src))
        return True
    with warnings.catch_warnings():  # src is a read-only view; it is only read
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    return True


def unpack_frames(buf) -> list[memoryview]:
    """Inverse of pack_frames, as views into `buf` (no copy). Raises FrameError on inconsistent lengths."""
    view = memoryview(buf).cast("B")
    if view.nbytes < 4:
        raise FrameError("packed message shorter than its count field")
    count = int.from_bytes(view[:4], "little")
    pos = 4 + 8 * count
    if count == 0 or count > 1 << 16 or pos > view.nbytes:
        raise FrameError(f"packed message claims {count} frames")
    frames = []
    for i in range(count):
        n = int.from_bytes(view[4 + 8 * i:12 + 8 * i], "little")
        pos = -(-pos // _ALIGN) * _ALIGN
        if pos + n > view.nbytes:
            raise FrameError("packed message is truncated")
        frames.append(view[pos:pos + n])
        pos += n
    if pos != view.nbytes:
        raise FrameError("packed message has trailing bytes")
    return frames


def spec_hash(spec: dict) -> str:
    """A short, order-independent hash of an obs/action spec (a JSON-able dict)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_diff(ours: dict, theirs: dict, their_protocol=PROTOCOL_VERSION) -> dict:
    """What differs between two specs (and protocol versions), key by key: {key: {"server": ..., "client": ...}}."""
    diff = {}
    if their_protocol != PROTOCOL_VERSION:
        diff["protocol"] = {"server": PROTOCOL_VERSION, "client": their_protocol}
    for key in sorted(set(ours) | set(theirs)):
        if json.dumps(ours.get(key), sort_keys=True, default=str) != json.dumps(theirs.get(key), sort_keys=True,
                                                                                default=str):
            diff[key] = {"server": ours.get(key), "client": theirs.get(key)}
    return diff


# ------------------------------------------------------------------------------------------------------------ security
@dataclass
class CurveConfig:
    """CurveZMQ keys. Server: `secret_key_file` (its own) and `allowed_clients_dir` (public keys it accepts).
    Client: `secret_key_file` (its own) and `server_public_key_file`."""

    secret_key_file: str
    server_public_key_file: str | None = None
    allowed_clients_dir: str | None = None


_authenticators: dict[int, Any] = {}  # context id -> its ZAP handler thread
# socket id -> (weak reference to the socket, its context), of the CurveZMQ servers not yet closed. A server dropped
# without `close_socket` leaves when it is collected (pyzmq closes it then), before its id can be another socket's.
_curve_servers: dict[int, tuple[weakref.ref, zmq.Context]] = {}
# held while either dict changes: a collected server's callback runs in whichever thread drops it (re-entrant: also in
# the middle of our own bookkeeping, when that allocation triggers a garbage collection)
_curve_lock = threading.RLock()


def _unused_authenticator(ctx: zmq.Context):
    """The context's ZAP handler, taken out of the bookkeeping, once no CurveZMQ server of the context is left (under
    `_curve_lock`); the caller stops it after releasing the lock (the handler's thread may itself wait for the lock,
    in a collection callback, while `stop()` joins it). Its thread holds a socket of the context, so `ctx.term()`
    would wait for it forever."""
    if any(c is ctx for _, c in list(_curve_servers.values())):
        return None
    return _authenticators.pop(id(ctx), None)


def _forget_collected_server(key: int, ref: weakref.ref) -> None:
    """A CurveZMQ server garbage-collected without `close_socket`: drop its entry (if still its own) and stop the
    context's ZAP handler if it was the last."""
    with _curve_lock:
        entry = _curve_servers.get(key)
        auth = None
        if entry is not None and entry[0] is ref:
            del _curve_servers[key]
            auth = _unused_authenticator(entry[1])
    if auth is not None:
        auth.stop()


def _secure(sock: zmq.Socket, curve: CurveConfig | None, server: bool) -> None:
    if curve is None:
        return
    import zmq.auth

    public, secret = zmq.auth.load_certificate(curve.secret_key_file)
    if secret is None:
        raise ValueError(f"{curve.secret_key_file} holds no secret key (use the *.key_secret file)")
    sock.curve_publickey, sock.curve_secretkey = public, secret
    if server:
        if not curve.allowed_clients_dir:
            raise ValueError("a CurveZMQ server needs allowed_clients_dir (the client public keys it accepts)")
        ctx = sock.context
        # one ZAP domain per allow-list, so that servers of one process with different lists each check their own
        allowed = os.path.realpath(curve.allowed_clients_dir)
        domain = "allow-" + hashlib.sha256(allowed.encode()).hexdigest()[:16]
        with _curve_lock:  # (a handler found here is not stopped before this server is registered with it)
            # first, so that closing this socket after a failure below stops the handler
            _curve_servers[id(sock)] = (weakref.ref(sock, functools.partial(_forget_collected_server, id(sock))), ctx)
            if id(ctx) not in _authenticators:  # one ZAP handler per context
                _authenticators[id(ctx)] = _start_authenticator(ctx)
            _authenticators[id(ctx)].configure_curve(domain=domain, location=allowed)
        sock.zap_domain = domain.encode()
        sock.curve_server = True
    else:
        if not curve.server_public_key_file:
            raise ValueError("a CurveZMQ client needs server_public_key_file")
        sock.curve_serverkey, _ = zmq.auth.load_certificate(curve.server_public_key_file)


def _retry_while_address_taken(attempt: Callable[[], Any], wait_s: float, pause_s: float = 0.005):
    """`attempt()` (a bind) again while its address is taken, for up to `wait_s`: libzmq frees a closed socket's
    address in its reaper thread a moment after `close()` (an address another process holds is still refused)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return attempt()
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(pause_s)


def _start_authenticator(ctx: zmq.Context, deadline_s: float = 5.0):
    """Start the context's ZAP handler, on a fixed inproc address that an earlier handler of the context may not
    have released yet."""
    from zmq.auth.thread import ThreadAuthenticator

    def attempt():
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("transport.auth"))
        try:
            auth.start()
        except BaseException:
            auth.stop()  # closes the half-started handler's socket
            raise
        return auth

    return _retry_while_address_taken(attempt, deadline_s)


def close_socket(sock: zmq.Socket, linger_ms: int = 0) -> None:
    """Close a socket of `make_socket`. The last CurveZMQ server of a context also stops the context's ZAP handler:
    its thread holds a socket of the context, so `ctx.term()` would wait for it forever."""
    with _curve_lock:
        entry = _curve_servers.pop(id(sock), None)
        sock.close(linger=linger_ms)
        auth = _unused_authenticator(entry[1]) if entry is not None else None
    if auth is not None:
        auth.stop()


def make_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Writes NAME.key (public, share it) and NAME.key_secret (keep it) into `directory`."""
    import zmq.auth

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def wire_limit(max_message_bytes: int) -> int:
    """ZMQ's own cap on one incoming frame (MAXMSGSIZE) for a receiver of `max_message_bytes`: a frame over it is
    never read into memory (ZMQ drops the connection; the peer reconnects). Twice the limit plus 1 MiB, so that a
    message modestly over the limit still arrives and is refused, counted and logged as a bad frame."""
    return 2 * max_message_bytes + (1 << 20)


def make_socket(kind: int, endpoint: str, bind: bool, curve: CurveConfig | None, ctx: zmq.Context | None = None,
            **opts) -> zmq.Socket:
    sock = (ctx or zmq.Context.instance()).socket(kind)
    try:  # whatever fails below closes the socket: one left open would keep its context's term() waiting
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        for key, value in opts.items():
            sock.setsockopt(getattr(zmq, key), value)
        _secure(sock, curve, server=bind)
        try:
            if bind:  # (1 s: a port another process holds is refused a second later)
                _retry_while_address_taken(lambda: sock.bind(endpoint), 1.0, pause_s=0.01)
            else:
                sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise EndpointError(f"cannot {'bind' if bind else 'connect to'} {endpoint!r}: {exc} (an endpoint looks "
                                f"like tcp://HOST:PORT)") from None
    except BaseException:
        close_socket(sock)
        raise
    return sock


class _Counters:
    def __init__(self, *names):
        self.__dict__.update({n: 0 for n in names})

    def as_dict(self, prefix: str = "transport/") -> dict[str, float]:
        return {prefix + k: v for k, v in self.__dict__.items()}


# ------------------------------------------------------------------------------------------------ 1. data channel
class DataSender:
    """Sends items (meta + arrays) to a `DataReceiver`, keeps each until it is acknowledged, resends after
    `resend_after` seconds (also across reconnects). `max_pending` bounds the unacknowledged items; `send` waits at
    most `timeout` for room. With `spool_dir`, pending items and the session survive a restart of this process.

    Batching (Nagle-style, no timers): an item goes out at once when nothing sent is still unacknowledged; otherwise
    it joins a batch that leaves when it holds `max_batch` items, when acknowledgements come back, when it is older
    than `linger` seconds, or on `poll` / `flush`. Under load this packs many items into one ZMQ message; when idle,
    latency stays one round trip. With a spool every item goes out (and to disk) at once: an accepted item must
    survive a kill. `send` copies the item's arrays (the one copy: into the rows of its batch), so the caller may
    refill its buffers right after. The sender has no thread of its own: call `poll()` once per loop iteration (e.g.
    each control step) so that acknowledgements, resends and a lingering batch are handled."""

    def __init__(self, endpoint: str, *, sender_id: str = "robot", max_pending: int = 1024, resend_after: float = 2.0,
                 peer_timeout: float = 10.0, spool_dir: str | Path | None = None, curve: CurveConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_batch: int = 64, linger: float = 0.002):
        self.sock = make_socket(zmq.DEALER, endpoint, bind=False, curve=curve, SNDHWM=max_pending + 16,
                                MAXMSGSIZE=wire_limit(max_message_bytes))
        self.sender_id, self.max_pending, self.resend_after = sender_id, max_pending, resend_after
        self.peer_timeout, self.max_message_bytes = peer_timeout, max_message_bytes
        self.max_batch, self.linger = max_batch, linger
        self.pending: dict[int, int] = {}  # unacknowledged item seq -> its batch id
        self._batches: OrderedDict[int, list] = OrderedDict()  # batch id -> [sent_at, packed, unacked seqs]
        self._open: list[tuple[int, dict, dict]] = []  # items waiting to form a batch (their arrays are our copies)
        self._rows: dict[str, np.ndarray] | None = None  # while the open items' arrays are rows of one buffer each
        self._open_since = 0.0
        self._last_poll = 0.0
        self.stats = _Counters("sent", "batches", "resent", "acked", "outages")
        self.last_ack = time.monotonic()
        self._in_outage = False
        self.spool = Path(spool_dir) if spool_dir else None
        self._spool_lock: int | None = None
        self.session, self.next_seq = uuid.uuid4().hex, 0
        self._probe_after = resend_after  # during an outage: the interval between probes, growing
        if self.spool:
            try:
                self._load_spool()
            except BaseException:  # a failed start leaves no socket or spool lock behind (a retry may take it)
                close_socket(self.sock)
                if self._spool_lock is not None:
                    os.close(self._spool_lock)
                    self._spool_lock = None
                raise

    # spool: one file per unacknowledged batch plus session.json, each written atomically
    def _load_spool(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        # one sender per spool: two (an orphaned process and its restart) would share a session and sequence ids,
        # and the receiver would drop one's items as the other's duplicates
        self._spool_lock = exclusive_lock(self.spool / "lock")
        if self._spool_lock is None:
            raise TransportError(f"spool {self.spool} is in use by another DataSender (is an earlier process of "
                                 f"this sender still running?)") from None
        state = self.spool / "session.json"
        if state.exists():
            saved = json.loads(state.read_text())
            self.session, self.next_seq = saved["session"], saved["next_seq"]
        else:
            atomic_write(state, json.dumps({"session": self.session, "next_seq": 0}).encode())
        for path in self.spool.glob("*.tmp"):
            path.unlink()
        for path in sorted(self.spool.glob("*.msg")):  # zero-padded names: sorted = oldest first
            try:
                frames = [bytes(f) for f in unpack_frames(path.read_bytes())]
                seqs = {int(item[0]) for item in decode(frames).meta["items"]}
            except (FrameError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise TransportError(f"spool file {path} is unreadable ({exc}); its items were never acknowledged: "
                                     f"move it aside to start without them") from None
            self._batches[int(path.stem)] = [0.0, _wire(frames), seqs]
            self.pending.update({seq: int(path.stem) for seq in seqs})
        self.next_seq = max([self.next_seq, *[seq + 1 for seq in self.pending]])

    def send(self, meta: dict | None = None, arrays: dict | None = None, timeout: float = 10.0) -> int:
        """Queue one item; returns its sequence id. Raises TransportTimeout if the outbox stays full."""
        deadline = time.monotonic() + timeout
        while len(self.pending) + len(self._open) >= self.max_pending:
            self.poll(min(0.05, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline and len(self.pending) + len(self._open) >= self.max_pending:
                raise TransportTimeout(f"{len(self.pending)} items unacknowledged for {timeout:.1f} s "
                                       f"(receiver down or slow)")
        arrays = {k: _frameable(v) for k, v in (arrays or {}).items()}  # bad dtypes fail here, not in a later call
        meta, meta_bytes = checked_meta(meta)  # (our copy: the caller may change its dict after)
        size = sum(v.numel() * v.element_size() if hasattr(v, "numel") else v.nbytes for v in arrays.values())
        if size + meta_bytes + (1 << 16) > self.max_message_bytes:
            raise ValueError(f"item of {size} bytes and {meta_bytes} bytes of meta exceeds max_message_bytes="
                             f"{self.max_message_bytes}")
        seq = self.next_seq
        self.next_seq += 1
        if not self._open:
            self._open_since = time.monotonic()
        self._open.append((seq, meta, self._copy_in(arrays)))
        self.stats.sent += 1
        if self.spool or not self.pending or len(self._open) >= self.max_batch or \
                time.monotonic() - self._open_since >= self.linger:
            self._send_batch()
        if time.monotonic() - self._last_poll > 0.001:  # read acks now and then, not after every item
            self.poll(0)
        return seq

    def _copy_in(self, arrays: dict) -> dict:
        """Our copy of an item's arrays. The usual case (numpy arrays of the same names, shapes and dtypes in every
        item) copies them into the next row of buffers that hold the whole batch, which then goes out as is."""
        if not self._open:  # the first item of a batch: rows for as many items as the batch may take
            rows = 1 if self.spool or not self.pending else self.max_batch
            numpy = arrays and all(isinstance(v, np.ndarray) for v in arrays.values())
            self._rows = {k: np.empty((rows, *v.shape), v.dtype) for k, v in arrays.items()} if numpy else None
        j, rows = len(self._open), self._rows
        if rows is not None and j < len(next(iter(rows.values()))) and arrays.keys() == rows.keys() and all(
                isinstance(v, np.ndarray) and v.shape == rows[k].shape[1:] and v.dtype == rows[k].dtype
                for k, v in arrays.items()):
            for k, v in arrays.items():
                rows[k][j] = v
            return {k: rows[k][j, ...] for k in rows}  # views (0-d arrays included)
        self._rows = None  # items of other layouts: the batch goes out array by array (earlier rows stay ours)
        return {k: v.clone() if hasattr(v, "clone") else np.array(v, copy=True) for k, v in arrays.items()}

    def _send_batch(self) -> None:
        if not self._open:
            return
        items, rows = self._open, self._rows
        self._rows = None
        meta = {"session": self.session, "sender": self.sender_id, "items": [[seq, m] for seq, m, _ in items]}
        if rows is not None:  # every item's arrays are a row of these buffers: the batch is their first rows
            meta["stacked"] = True
            arrays = {k: r[:len(items)] for k, r in rows.items()}
        else:
            arrays = {f"{j}.{name}": value for j, (_, _, arrs) in enumerate(items) for name, value in arrs.items()}
        frames = encode("data", meta, arrays, items[0][0])
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self.max_message_bytes and len(items) > 1:  # too big together: one by one (each fits, see send)
            self._open = []
            for item in items:
                self._open = [item]
                self._send_batch()
            return
        self._open = []
        batch_id = items[0][0]
        if self.spool:  # the batch, then the session's next_seq (a reload also takes it from the spooled batches)
            atomic_write(self.spool / f"{batch_id:012d}.msg", pack_frames(frames))
            atomic_write(self.spool / "session.json",
                         json.dumps({"session": self.session, "next_seq": self.next_seq}).encode())
        if not self.pending:  # silence (an outage) is timed from the oldest unacknowledged send, not an idle spell
            self.last_ack = time.monotonic()
        frames = _wire(frames)
        self._batches[batch_id] = [time.monotonic(), frames, {seq for seq, _, _ in items}]
        self.pending.update({seq: batch_id for seq, _, _ in items})
        self.stats.batches += 1
        if self._room():  # else it goes out with the resends
            self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)

    def _room(self) -> bool:
        return bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)

    def poll(self, timeout: float = 0.0) -> None:
        """Read acknowledgements (waiting up to `timeout`), send the open batch, resend what is overdue, and track
        outages."""
        self._last_poll = time.monotonic()
        got_ack = False
        if self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            while self.sock.poll(0, zmq.POLLIN):
                try:
                    msg = decode(self.sock.recv_multipart(copy=False))
                except FrameError as exc:
                    log.warning("bad ack frame dropped: %s", exc)
                    continue
                seqs = msg.meta.get("seqs", [])
                if not (isinstance(seqs, list) and all(type(seq) is int for seq in seqs)):
                    log.warning("bad ack dropped: seqs %r", seqs if len(repr(seqs)) < 200 else type(seqs))
                    continue
                if msg.type == "ack" and msg.meta.get("session") == self.session:
                    got_ack = True
                    for seq in seqs:
                        batch_id = self.pending.pop(seq, None)
                        if batch_id is None:
                            continue
                        self.stats.acked += 1
                        batch = self._batches[batch_id]
                        batch[2].discard(seq)
                        if not batch[2]:
                            del self._batches[batch_id]
                            if self.spool:
                                (self.spool / f"{batch_id:012d}.msg").unlink(missing_ok=True)
                    self.last_ack = time.monotonic()
                    if self._in_outage:
                        log.warning("receiver is back after %.1f s", time.monotonic() - self._outage_start)
                        self._in_outage = False
                        self._probe_after = self.resend_after
        if self._open and (got_ack or timeout > 0 or time.monotonic() - self._open_since >= self.linger):
            self._send_batch()
        now = time.monotonic()
        if self.pending and now - self.last_ack > self.peer_timeout and not self._in_outage:
            self._in_outage, self._outage_start = True, self.last_ack
            self.stats.outages += 1
            log.warning("no acknowledgement for %.1f s: receiver unreachable, %d items pending",
                        now - self.last_ack, len(self.pending))
        if self._in_outage and self._batches and self._room():
            # What was sent waits in ZMQ's queue for the absent receiver and goes out when it is back: sending every
            # batch again each round would queue a flood of duplicates. Probe with the oldest batch, less and less
            # often (the receiver may have come back without it, e.g. after storing nothing before a crash).
            batch = next(iter(self._batches.values()))
            if now - batch[0] >= self._probe_after:
                self.sock.send_multipart(batch[1], copy=False, flags=zmq.NOBLOCK)
                batch[0] = now
                self._probe_after = min(2 * self._probe_after, 8 * self.resend_after)
                self.stats.resent += 1
            return
        while self._batches and self._room():  # oldest first; stop at the first that is not overdue
            batch_id, batch = next(iter(self._batches.items()))
            if now - batch[0] < self.resend_after:
                break
            self.sock.send_multipart(batch[1], copy=False, flags=zmq.NOBLOCK)
            batch[0] = now
            self._batches.move_to_end(batch_id)
            self.stats.resent += 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what is queued and wait until every item is acknowledged (True) or the deadline passes (False)."""
        deadline = time.monotonic() + timeout
        self._send_batch()
        while self.pending and time.monotonic() < deadline:
            self.poll(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self.pending

    def close(self) -> None:
        """Send the open batch (without waiting for acknowledgements; with a spool they survive) and close."""
        try:
            self._send_batch()
        finally:  # a full disk while spooling the batch still releases the socket and the spool
            close_socket(self.sock)
            if self.spool and self._spool_lock is not None:
                os.close(self._spool_lock)  # releases the spool
                self._spool_lock = None


def _wire(frames: list) -> list:
    """The frames a data batch travels as: a single frame means a packed message to the receiver, so a batch that is
    only a header (items without arrays) is sent packed."""
    return frames if len(frames) > 1 else [pack_frames(frames)]


class _SeqSet:
    """The sequence ids seen from one sender session, in bounded memory: every id below `low` plus the few above it
    (a sender numbers its items 0, 1, 2, ..., so the set stays small)."""

    def __init__(self):
        self.low, self.above = 0, set()

    def __contains__(self, seq: int) -> bool:
        return seq < self.low or seq in self.above

    def add(self, seq: int) -> None:
        if seq >= self.low:
            self.above.add(seq)
            while self.low in self.above:
                self.above.remove(self.low)
                self.low += 1

    def discard(self, seq: int) -> None:
        if seq < self.low:  # below the watermark: it moves down, the ids between go back to the set
            self.above.update(range(seq + 1, self.low))
            self.low = seq
        else:
            self.above.discard(seq)


class DataReceiver:
    """Receives items from any number of `DataSender`s. `recv` returns each item once; call `ack(msg)` once the
    consumer has stored it (or use `auto_ack=True` when losing an unstored item on a crash is acceptable), or
    `release(msg)` when it could not store it now (a full disk): its sender's next resend delivers it again.
    `delivered` lists (session, seq) pairs a restarted consumer already stored, so resends of them are dropped.
    Acknowledgements are batched while more items are waiting, and sent at once otherwise."""

    def __init__(self, endpoint: str, *, auto_ack: bool = False, delivered=(), curve: CurveConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, as_torch: bool = False):
        self.seen: dict[str, _SeqSet] = {}  # delivered to the consumer (stored, or being stored)
        for session, seq in delivered:  # (before the bind: a malformed pair raises with nothing to release)
            self.seen.setdefault(session, _SeqSet()).add(int(seq))
        self.sock = make_socket(zmq.ROUTER, endpoint, bind=True, curve=curve, ROUTER_HANDOVER=1,
                                MAXMSGSIZE=wire_limit(max_message_bytes))
        self.auto_ack, self.max_message_bytes, self.as_torch = auto_ack, max_message_bytes, as_torch
        self._unacked: set[tuple[str, int]] = set()
        self._acks: dict[tuple[bytes, str], list[int]] = {}
        self._n_acks, self._acks_since = 0, 0.0
        self._ready: list[Message] = []  # items of a received batch not yet handed out
        self.stats = _Counters("received", "duplicates", "bad_frames")

    def _split(self, msg: Message, peer: bytes) -> list[Message]:
        session, items = msg.meta.get("session"), msg.meta.get("items")
        if msg.type != "data" or not isinstance(session, str) or not isinstance(items, list) or not items:
            raise FrameError(f"expected a data batch with a session and items, got type {msg.type!r}")
        out, names = [], set(msg.arrays)
        stacked = msg.meta.get("stacked") is True
        if stacked and any(v.ndim == 0 or v.shape[0] != len(items) for v in msg.arrays.values()):
            raise FrameError(f"stacked arrays must have {len(items)} rows, one per item")
        for j, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                    and isinstance(item[1], dict)):
                raise FrameError(f"bad item entry {item!r}")
            if stacked:
                arrays = {k: v[j] for k, v in msg.arrays.items()}
                names = set()
            else:
                prefix = f"{j}."
                arrays = {k[len(prefix):]: v for k, v in msg.arrays.items() if k.startswith(prefix)}
                names -= {prefix + k for k in arrays}
            out.append(Message("data", item[0], {**item[1], "session": session, "sender": msg.meta.get("sender")},
                               arrays, peer))
        if names:
            raise FrameError(f"arrays that belong to no item: {sorted(names)[:5]}")
        return out

    def recv(self, timeout: float = 1.0) -> Message | None:
        """The next new item, or None after `timeout` seconds. Bad frames are logged, counted and skipped."""
        deadline = time.monotonic() + timeout
        while True:
            while self._ready:
                msg = self._ready.pop(0)
                session = msg.meta["session"]
                seen = self.seen.setdefault(session, _SeqSet())
                if msg.seq in seen:  # delivered before: deliver nothing; if already stored, tell the sender again
                    self.stats.duplicates += 1
                    if (session, msg.seq) not in self._unacked:
                        self._send_ack(msg.peer, session, [msg.seq])
                    continue
                seen.add(msg.seq)
                self._unacked.add((session, msg.seq))
                self.stats.received += 1
                if self.auto_ack:
                    self.ack(msg)
                return msg
            if self._acks and (not self.sock.poll(0, zmq.POLLIN) or self._n_acks >= 256
                               or time.monotonic() - self._acks_since > 0.01):
                self.flush_acks()
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not self._ready and not self.sock.poll(0, zmq.POLLIN) or remaining < -0.05:
                self.flush_acks()  # past the deadline (a flood of duplicates or junk cannot hold us past it)
                return None
            if not self.sock.poll(max(0, int(remaining * 1000)), zmq.POLLIN):
                self.flush_acks()
                return None
            parts = self.sock.recv_multipart(copy=False)
            peer, frames = parts[0].bytes, parts[1:]
            try:
                if len(frames) == 1:  # a packed batch (what DataSender sends)
                    if frames[0].buffer.nbytes > self.max_message_bytes:
                        raise FrameError(f"message of {frames[0].buffer.nbytes} bytes exceeds the "
                                         f"{self.max_message_bytes}-byte limit")
                    frames = unpack_frames(frames[0].buffer)
                self._ready = self._split(decode(frames, self.max_message_bytes, as_torch=self.as_torch), peer)
            except FrameError as exc:
                self.stats.bad_frames += 1
                log.warning("bad frame from peer %s dropped: %s", peer.hex(), exc)

    def ack(self, msg: Message) -> None:
        """The consumer has stored `msg`: acknowledge it to its sender."""
        session = msg.meta["session"]
        self._unacked.discard((session, msg.seq))
        self._send_ack(msg.peer, session, [msg.seq])

    def release(self, msg: Message) -> None:
        """The consumer could not store `msg` (yet): forget that it was delivered, so that its sender's next resend
        (after `resend_after`) is delivered again instead of being dropped as a duplicate."""
        session = msg.meta["session"]
        self._unacked.discard((session, msg.seq))
        if session in self.seen:
            self.seen[session].discard(msg.seq)

    def _send_ack(self, peer: bytes, session: str, seqs: list[int]) -> None:
        if not self._acks:
            self._acks_since = time.monotonic()
        self._acks.setdefault((peer, session), []).extend(seqs)
        self._n_acks += len(seqs)
        # While more items are waiting (in this batch or on the socket), batch; otherwise send at once.
        if self._n_acks >= 256 or time.monotonic() - self._acks_since > 0.01 or \
                (not self._ready and not self.sock.poll(0, zmq.POLLIN)):
            self.flush_acks()

    def flush_acks(self) -> None:
        for (peer, session), seqs in self._acks.items():
            try:
                self.sock.send_multipart([peer, *encode("ack", {"session": session, "seqs": seqs})],
                                         flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # the sender resends, and we acknowledge again then
        self._acks, self._n_acks = {}, 0

    def close(self) -> None:
        self.flush_acks()
        close_socket(self.sock)


# ------------------------------------------------------------------------------------------------ 2. latest-only broadcast
class Publisher:
    """Broadcasts versioned messages, latest only: each message is packed into one frame (one copy, which is also the
    snapshot of the arrays) and ZMQ's CONFLATE keeps only the newest in every queue, so a slow subscriber never
    works through a backlog."""

    def __init__(self, endpoint: str, *, curve: CurveConfig | None = None, ctx: zmq.Context | None = None):
        self.sock = make_socket(zmq.PUB, endpoint, bind=True, curve=curve, ctx=ctx, CONFLATE=1)
        self.published = 0

    def publish(self, version: int, meta: dict | None = None, arrays: dict | None = None) -> None:
        self.send_packed(pack_frames(encode("update", {"version": int(version), **(meta or {})}, arrays, version)))

    def send_packed(self, packed) -> zmq.MessageTracker:
        """Send an already packed update zero-copy; the tracker says when ZMQ (and, in-process, every receiver)
        has let go of `packed`, so the caller may reuse it."""
        tracker = self.sock.send(packed, copy=False, track=True)
        self.published += 1
        return tracker

    def close(self, linger_ms: int = 0) -> None:
        """`linger_ms`: how long ZMQ's I/O thread may still deliver what was sent last (close itself never waits)."""
        close_socket(self.sock, linger_ms)


class Subscriber:
    def __init__(self, endpoint: str, *, curve: CurveConfig | None = None, ctx: zmq.Context | None = None,
                 max_message_bytes: int = 16 * 2**30, as_torch: bool = False):
        self.sock = make_socket(zmq.SUB, endpoint, bind=False, curve=curve, ctx=ctx, CONFLATE=1, SUBSCRIBE=b"",
                                MAXMSGSIZE=wire_limit(max_message_bytes))
        self.max_message_bytes, self.as_torch = max_message_bytes, as_torch
        self._decode = PackedDecoder(max_message_bytes, as_torch)
        self.stats = _Counters("received", "superseded", "skipped_versions", "bad_frames")
        self.last_version = -1

    def latest(self, timeout: float = 0.0) -> Message | None:
        """Drain what has arrived (waiting up to `timeout` for the first) and return the newest, or None."""
        newest = None
        wait_ms = max(0, int(timeout * 1000))  # (ZMQ reads a negative wait as forever)
        deadline = time.monotonic() + timeout + 0.05
        while self.sock.poll(wait_ms, zmq.POLLIN) and time.monotonic() < deadline:
            wait_ms = 0
            try:
                frame = self.sock.recv(copy=False)
                msg = self._decode(frame.buffer)
            except FrameError as exc:
                self.stats.bad_frames += 1
                log.warning("bad broadcast frame dropped: %s", exc)
                continue
            self.stats.received += 1
            if newest is not None:
                self.stats.superseded += 1
            newest = msg
        if newest is not None and newest.seq <= self.last_version:
            return None  # an old version (e.g. a restarted publisher replaying): ignore
        if newest is not None:
            if self.last_version >= 0:  # versions that never reached us: conflated away in a queue
                self.stats.skipped_versions += max(0, newest.seq - self.last_version - 1)
            self.last_version = newest.seq
        return newest

    def release(self, msg: Message) -> None:
        """Done with `msg`. Nothing to do here: a ZMQ frame is freed when nothing views it any more (the same call
        on `common.shm_broadcast.ShmSubscriber` gives a shared-memory slot back)."""

    def hold(self, tensors, msg: Message | None = None) -> None:
        """Keep the buffers these tensors view. Nothing to do here: they keep their ZMQ frames alive themselves."""

    def close(self) -> None:
        close_socket(self.sock)


# ------------------------------------------------------------------------------------------------ 3. control RPC
class RpcServer:
    """Serves `handlers[name](msg) -> (meta, arrays) | meta | None` to `RpcClient`s. Built in: `hello` (protocol and
    spec check) and `heartbeat`. `peers()` lists clients heard from within `peer_timeout` seconds."""

    def __init__(self, endpoint: str, spec: dict, handlers: dict[str, Callable] | None = None, *,
                 peer_timeout: float = 10.0, curve: CurveConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.spec, self.spec_hash = spec, spec_hash(spec)  # (before the bind: a spec that cannot hash releases nothing)
        self.sock = make_socket(zmq.ROUTER, endpoint, bind=True, curve=curve, ROUTER_HANDOVER=1,
                                MAXMSGSIZE=wire_limit(max_message_bytes))
        self.handlers = dict(handlers or {})
        self.peer_timeout, self.max_message_bytes = peer_timeout, max_message_bytes
        self.last_seen: dict[str, float] = {}
        self.stats = _Counters("requests", "bad_frames", "refused", "peers_dropped")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _hello(self, msg: Message):
        theirs = msg.meta
        if theirs.get("protocol") != PROTOCOL_VERSION or theirs.get("spec_hash") != self.spec_hash:
            diff = spec_diff(self.spec, theirs.get("spec") or {}, theirs.get("protocol"))
            self.stats.refused += 1
            raise HandshakeError(f"refused: protocol/spec mismatch: {json.dumps(diff, default=str)}")
        return {"protocol": PROTOCOL_VERSION, "spec_hash": self.spec_hash}

    def serve_once(self, timeout: float = 0.1) -> bool:
        """Handle at most one request; returns whether one was handled."""
        self._drop_dead_peers()
        if not self.sock.poll(max(0, int(timeout * 1000)), zmq.POLLIN):  # (negative: forever to ZMQ)
            return False
        parts = self.sock.recv_multipart(copy=False)
        peer = parts[0].bytes
        try:
            msg = decode(parts[1:], self.max_message_bytes)
        except ProtocolMismatch as exc:  # refused in so many words (this reply's own version tells the peer ours)
            self.stats.refused += 1
            log.warning("RPC from %s refused: %s", peer.hex(), exc)
            self.sock.send_multipart([peer, *encode("error", {
                "error": f"HandshakeError: refused: protocol version {exc.theirs!r}; this server speaks "
                         f"{PROTOCOL_VERSION}", "protocol": PROTOCOL_VERSION}, None, exc.seq)], copy=False)
            return True
        except FrameError as exc:
            self.stats.bad_frames += 1
            log.warning("bad RPC frame from %s dropped: %s", peer.hex(), exc)
            return True
        client = str(msg.meta.get("client", peer.hex()))
        if client not in self.last_seen:
            log.info("peer %s connected", client)
        self.last_seen[client] = time.monotonic()
        self.stats.requests += 1
        try:
            if msg.type == "hello":
                result = self._hello(msg)
            elif msg.type == "heartbeat":
                result = {"time": time.time()}
            elif msg.type in self.handlers:
                result = self.handlers[msg.type](msg)
            else:
                raise TransportError(f"unknown method {msg.type!r}; known: {['hello', 'heartbeat', *self.handlers]}")
            meta, arrays = result if isinstance(result, tuple) else (result or {}, {})
            reply = encode("ok", meta, arrays, msg.seq)
        except Exception as exc:
            reply = encode("error", {"error": f"{type(exc).__name__}: {exc}"}, None, msg.seq)
        self.sock.send_multipart([peer, *reply], copy=False)
        return True

    def _drop_dead_peers(self) -> None:
        now = time.monotonic()
        for client, seen in list(self.last_seen.items()):
            if now - seen > self.peer_timeout:
                log.warning("peer %s silent for %.1f s: dropped", client, now - seen)
                del self.last_seen[client]
                self.stats.peers_dropped += 1

    def peers(self) -> list[str]:
        self._drop_dead_peers()
        return list(self.last_seen)

    def start(self) -> "RpcServer":
        """Serve in a background thread until `close()`."""
        def loop():
            try:
                while not self._stop.is_set():
                    try:
                        self.serve_once(0.05)
                    except Exception:  # never let one request end the service
                        log.exception("RPC server: request handling failed; still serving")
            finally:  # the thread that uses the socket closes it (ZMQ sockets are not thread-safe)
                close_socket(self.sock)

        self._thread = threading.Thread(target=loop, name="rpc-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is None:
            close_socket(self.sock)
            return
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            log.warning("RPC server: a request handler still runs after 5 s; the socket closes when it returns")


class RpcClient:
    """Calls an `RpcServer` with a deadline per call. `hello()` runs the handshake; `heartbeat()` keeps the
    server's view of this client alive and measures the round trip."""

    def __init__(self, endpoint: str, spec: dict, *, client_id: str | None = None, curve: CurveConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        # IMMEDIATE: requests are not queued for a server that is not connected, so an outage cannot pile them up
        # (and then block a later send); call() retries the send until its own deadline.
        self.sock = make_socket(zmq.DEALER, endpoint, bind=False, curve=curve, IMMEDIATE=1, SNDHWM=64,
                                MAXMSGSIZE=wire_limit(max_message_bytes))
        self.spec, self.client_id = spec, client_id or uuid.uuid4().hex[:8]
        self.max_message_bytes = max_message_bytes
        self._seq = 0
        self.stats = _Counters("calls", "timeouts", "stale_replies")

    def call(self, method: str, meta: dict | None = None, arrays: dict | None = None, timeout: float = 5.0) -> Message:
        self._seq += 1
        seq = self._seq
        self.stats.calls += 1
        frames = encode(method, {"client": self.client_id, **(meta or {})}, arrays, seq)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    self.stats.timeouts += 1
                    raise TransportTimeout(f"RPC {method!r} could not be sent within {timeout:.1f} s (no server)")
                time.sleep(0.005)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000), zmq.POLLIN):
                self.stats.timeouts += 1
                raise TransportTimeout(f"RPC {method!r} got no reply within {timeout:.1f} s (server down?)")
            try:
                reply = decode(self.sock.recv_multipart(copy=False), self.max_message_bytes)
            except ProtocolMismatch as exc:
                raise HandshakeError(f"{method}: the server speaks protocol version {exc.theirs!r}, this client "
                                     f"{PROTOCOL_VERSION}: run the same version of this code on both sides") from None
            except FrameError as exc:
                log.warning("bad RPC reply dropped: %s", exc)
                continue
            if reply.seq != seq:  # the late answer to a call that already timed out
                self.stats.stale_replies += 1
                continue
            if reply.type == "error":
                err = reply.meta.get("error", "")
                raise (HandshakeError if "HandshakeError" in err else TransportError)(f"{method}: {err}")
            return reply

    def hello(self, timeout: float = 5.0) -> dict:
        return self.call("hello", {"protocol": PROTOCOL_VERSION, "spec_hash": spec_hash(self.spec),
                                   "spec": self.spec}, timeout=timeout).meta

    def heartbeat(self, timeout: float = 2.0) -> float:
        start = time.monotonic()
        self.call("heartbeat", timeout=timeout)
        return time.monotonic() - start

    def close(self) -> None:
        close_socket(self.sock)


# ------------------------------------------------------------------------------------------------ helpers
def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m common.transport", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    keygen = sub.add_parser("keygen", help="create a CurveZMQ key pair: DIR/NAME.key (public), DIR/NAME.key_secret")
    keygen.add_argument("directory")
    keygen.add_argument("name")
    args = parser.parse_args(argv)
    public, secret = make_keypair(args.directory, args.name)
    print(f"public key (share it; servers list it in their allowed_clients_dir): {public}")
    print(f"secret key (keep it on this machine, mode 600): {secret}")


if __name__ == "__main__":
    main()
