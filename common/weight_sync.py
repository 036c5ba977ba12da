"""Versioned weight sync from a learner to actors over `common.transport`'s latest-only broadcast.

    pub = WeightPublisher("tcp://*:5556", learner_model, mode="trainable")   # learner side (binds)
    pub.publish()                      # after an update, at a point where the weights are consistent; non-blocking
    sub = WeightSubscriber("tcp://learner:5556", actor_model)               # actor side (connects)
    sub.poll(); sub.apply()            # between control steps, where the actor chooses

What travels: `mode="full"` sends the whole state dict (buffers included); `mode="trainable"` only parameters with
`requires_grad` (e.g. a VLA's action expert, not its frozen VLM); `only_changed=True` further drops tensors equal to
the last keyframe (a full message every `keyframe_every` publishes), so every message is complete on its own even
when latest-only delivery drops the ones before it.

Cost control, our analogue of RLinf's SM-aware sync: `publish` takes one snapshot (a copy into a reused send buffer;
on CUDA that copy is the device-to-host one, on a side stream, straight into a pinned send buffer) and returns. ZMQ sends the buffer zero-copy
from its own I/O thread, and its queues conflate: only the newest version waits for a slow link, so a backlog never
builds and training is never blocked. `max_bytes_per_s` caps the average bandwidth: then one sender thread paces the
sends, and a publish during a wait replaces the waiting snapshot (counted as coalesced). With `only_changed`, every
publish is a keyframe until the last keyframe has left (sent, or committed to shared memory): in the publisher a
delta never replaces the keyframe it is taken against, and a publish that failed is followed by a keyframe (ZMQ's
conflating queues may still drop one on the way: that subscriber waits for the next keyframe).
Counters: publisher `requested / sent / coalesced / bytes`; subscriber `received / applied / coalesced` (versions that
arrived or were published but were superseded before being applied).

Same host: `shm://NAME` endpoints (both sides) go through shared memory (`common.shm_broadcast`) instead of ZMQ:
`publish` packs straight into a free slot of a file in /dev/shm, and a `zero_copy` subscriber's parameters view that
slot, which stays held (never rewritten) while they do. One copy per update and no socket: for actors colocated
with the learner. `max_readers` (publisher) bounds the subscribers; no bandwidth cap or CurveZMQ there (no network;
the file is readable by the same user only). `in_place=True` (publisher; `common.shm_inplace`) puts the learner's CPU
tensors themselves in the shared file: `publish` copies nothing, each subscriber copies them out under a
reader-writer lock, and changes to them are announced first (optimizer steps, loads and training-mode forwards of
modules with sent buffers by hooks; anything else in `with pub.writing():`). A subscriber follows either kind.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import weakref
import threading
import time
import torch
import zmq
from torch.utils.hooks import RemovableHandle

from common.shm_broadcast import ShmKindError, ShmPublisher, ShmSubscriber, shm_name
from common.shm_inplace import InPlacePublisher, InPlaceSubscriber
from common.transport import (CurveConfig, Publisher, Subscriber, VersionedHeader, encode, encode_header, frame_spec,
                              frame_nbytes, pack_block, pack_frames, packed_block_layout, packed_size)

log = logging.getLogger("weight_sync")

MODES = ("full", "trainable")


def _tensors_to_send(model: torch.nn.Module, mode: str) -> dict[str, torch.Tensor]:
    if mode == "full":
        return {k: v for k, v in model.state_dict(keep_vars=True).items()}
    if mode == "trainable":
        return {k: p for k, p in model.named_parameters() if p.requires_grad}
    raise ValueError(f"unknown weight-sync mode {mode!r}; choose one of {MODES}")


# Bumped by torch's global registration hooks whenever a parameter, buffer or submodule is set on any module: the
# cheap part of telling that a model's tensors are still the ones found at an earlier publish.
_registrations = [0]
_hooks: list = []


def _count_registration(module, name, value) -> None:
    _registrations[0] += 1


def _watch_registrations() -> None:
    if not _hooks:
        from torch.nn.modules import module as nn_module

        _hooks.extend(register(_count_registration) for register in (
            nn_module.register_module_parameter_registration_hook, nn_module.register_module_buffer_registration_hook,
            nn_module.register_module_module_registration_hook))


# Publishers with in_place=True: a global optimizer pre-step hook tells them before any optimizer changes tensors
_IN_PLACE: "weakref.WeakSet[WeightPublisher]" = weakref.WeakSet()
_optimizer_hook: list = []


def _watch_optimizers() -> None:
    if not _optimizer_hook:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _optimizer_hook.append(register_optimizer_step_pre_hook(_before_optimizer_step))


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    for pub in list(_IN_PLACE):
        pub._before_step(optimizer)


def _announcer(pub_ref, training_only: bool = False):
    """A module hook that announces a change to the publisher's in-place tensors (in training mode only, if so)."""
    def hook(module, *args) -> None:
        pub = pub_ref()
        if pub is not None and (module.training or not training_only):
            pub.begin_write()
    return hook


class _SentTensors:
    """`_tensors_to_send`, found once and reused while still valid. Walking the module tree (`state_dict`,
    `named_parameters`) costs ~2.5 ms per publish for a model with π0's 751 modules (`benchmarks/weight_sync.py
    --module-tree`); a model of a few modules hardly notices. Valid
    while: nothing was registered on any module since (the hooks above), each tensor is still the object its module
    holds under its name (`.to()` swaps buffers without a registration) and each module still its parent's (`del`
    neither), and, for "trainable", every parameter's `requires_grad` is as it was. Not cached: "full" with state-dict
    hooks on any module (they may add, rename or make tensors; a hook registered anywhere later, of any kind, moves
    `RemovableHandle.next_id` and so invalidates), or a tensor that no module holds (e.g. `get_extra_state`'s)."""

    def __init__(self, model: torch.nn.Module, mode: str):
        self.model, self.mode = model, mode
        self.tensors: dict[str, torch.Tensor] | None = None
        self.registrations = self.hooks = -1
        self.owners: tuple[list, list, list] = ([], [], [])  # (dicts, names, objects): each object held by its dict
        self.params: list[torch.Tensor] = []
        self.requires_grad: list[bool] = []
        _watch_registrations()

    def valid(self) -> bool:
        if self.tensors is None or _registrations[0] != self.registrations or RemovableHandle.next_id != self.hooks:
            return False
        dicts, keys, held = self.owners
        if not all(map(operator.is_, map(dict.get, dicts, keys), held)):  # (map: the loop runs in C)
            return False
        return not self.params or [p.requires_grad for p in self.params] == self.requires_grad

    def get(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """name -> tensor: a new dict each call (callers may replace its values), or with `copy=False` the kept one
        where it is valid (read only)."""
        if not self.valid():
            registrations, hooks = _registrations[0], RemovableHandle.next_id
            tensors = _tensors_to_send(self.model, self.mode)
            modules = list(self.model.modules())
            where = {}  # id -> (the dict that holds it, its name there); tied weights: the first holder
            for m in modules:
                for d in (m._parameters, m._buffers):
                    for k, t in d.items():
                        if t is not None:
                            where.setdefault(id(t), (d, k))
            owners = [where.get(id(t)) for t in tensors.values()]
            hooked = self.mode == "full" and any(m._state_dict_hooks or m._state_dict_pre_hooks for m in modules)
            self.tensors = None if hooked or None in owners else tensors
            # each tensor in its module's dict, and each module in its parent's (`del model.head` is no registration)
            triples = [(d, k, t) for (d, k), t in zip(owners, tensors.values())] + [
                (m._modules, k, child) for m in modules for k, child in m._modules.items()
                if child is not None] if self.tensors is not None else []
            self.owners = tuple(map(list, zip(*triples))) if triples else ([], [], [])  # dicts, names, objects
            self.params = list(self.model.parameters()) if self.mode == "trainable" else []
            self.requires_grad = [p.requires_grad for p in self.params]
            self.registrations, self.hooks = registrations, hooks
            return dict(tensors)
        return dict(self.tensors) if copy else self.tensors


class _FlatTensors:
    """The sent tensors moved into one contiguous buffer laid out as the packed message's array frames, each tensor
    a view of its slot (`.data` reassigned: same objects, same values, so the model and its optimizer go on as
    before). A snapshot is then one copy of the whole buffer instead of one per tensor."""

    def __init__(self, tensors: dict[str, torch.Tensor], mode: str, alloc=None):
        """`alloc(span, specs)`: where the buffer goes (a zeroed uint8 tensor of `span` bytes; default: a new
        tensor on the tensors' device)."""
        self.names, self.source = list(tensors), tensors  # (the kept dict of `_SentTensors`: its names never change)
        self.specs = [frame_spec(k, t) for k, t in tensors.items()]
        self.lengths = [t.numel() * t.element_size() for t in tensors.values()]
        offsets, span = packed_block_layout(self.lengths)
        device = next(iter(tensors.values())).device
        self.block = (torch.zeros(span, dtype=torch.uint8, device=device) if alloc is None
                      else alloc(span, self.specs))  # zeros: the padding travels too
        with torch.no_grad():
            for t, off, n in zip(tensors.values(), offsets, self.lengths):
                slot = self.block[off:off + n].view(t.dtype).view(t.shape)
                slot.copy_(t)
                t.data = slot
        self.pointers = [self.block.data_ptr() + off for off in offsets]
        self.on_gpu = self.block.is_cuda
        self.header = VersionedHeader("update", {"mode": mode}, self.specs)  # all but the version packed once
        self._sizes: dict[int, int] = {}  # header length -> packed message size

    @staticmethod
    def possible(tensors: dict[str, torch.Tensor]) -> bool:
        """One device, contiguous, no two overlapping in memory (tied weights): otherwise the per-tensor path."""
        values = list(tensors.values())
        if not values or len({t.device for t in values}) != 1 or not all(t.is_contiguous() for t in values):
            return False
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in values)
        return all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))

    def packed_size(self, header_bytes: int) -> int:
        """Size of the packed message with a header of this length (computed once per length)."""
        size = self._sizes.get(header_bytes)
        if size is None:
            size = self._sizes[header_bytes] = packed_size((header_bytes, *self.lengths))
        return size

    def holds(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether the model's tensors are still the views of this buffer (not replaced, e.g. by `.to()`)."""
        return ((tensors is self.source or list(tensors) == self.names)
                and list(map(torch.Tensor.data_ptr, tensors.values())) == self.pointers)


class WeightPublisher:
    def __init__(self, endpoint: str, model: torch.nn.Module, *, mode: str = "full", only_changed: bool = False,
                 keyframe_every: int = 20, max_bytes_per_s: float | None = None, curve: CurveConfig | None = None,
                 ctx: zmq.Context | None = None, flatten: bool = False, max_readers: int = 4,
                 in_place: bool = False, stall_s: float = 5.0):
        """`flatten=True` moves the sent tensors into one contiguous buffer (each stays a view of it; see
        `_FlatTensors`) so that every snapshot is one copy: for models with many small tensors. Replacing a tensor
        later (`.to()`, a new `.data`) is detected and flattens again. Not with `only_changed`. `max_readers`: how
        many subscribers an `shm://` endpoint admits.

        `in_place=True` (`shm://` endpoints, CPU weights; see `common.shm_inplace`): the sent tensors move into
        shared memory at the first publish and readers copy them from there; `publish()` copies nothing. Every
        change to them must be announced before it starts: `optimizer.step()` of any optimizer holding them,
        `load_state_dict()` of the model or a submodule and the training-mode forward of a module whose buffers are
        sent do it by themselves (hooks); anything else goes in `with pub.writing():`.
        `stall_s`: how long such a change waits for a reader's copy before the tensors move to a new file."""
        if mode not in MODES:
            raise ValueError(f"unknown weight-sync mode {mode!r}; choose one of {MODES}")
        name = shm_name(endpoint)
        if name is not None and (max_bytes_per_s is not None or curve is not None):
            raise ValueError("an shm:// endpoint has no network link: max_bytes_per_s and curve do not apply")
        if in_place and (name is None or only_changed):
            raise ValueError("in_place=True needs an shm:// endpoint and sends whole tensors (not only_changed)"
                             if name is None else "in_place=True publishes every tensor in place: not with "
                                                  "only_changed")
        self.model, self.mode, self.only_changed, self.max_bytes_per_s = model, mode, only_changed, max_bytes_per_s
        self.in_place = in_place
        self.flatten = (flatten or in_place) and not only_changed
        self._flat: _FlatTensors | None = None
        self._sent = _SentTensors(model, mode)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # a side stream per GPU the weights live on
        self.shm = (InPlacePublisher(name, stall_s=stall_s) if in_place else
                    ShmPublisher(name, max_readers=max_readers) if name is not None else None)
        self.pub = Publisher(endpoint, curve=curve, ctx=ctx) if name is None else None
        self._inproc = endpoint.startswith("inproc://")  # sends land in the receiver's queue at once, no I/O thread
        self.version = 0
        self.stats = {"requested": 0, "sent": 0, "coalesced": 0, "bytes": 0, "last_publish_s": 0.0}
        if in_place:
            self.stats.update(relocations=0, unguarded_writes=0)
            self._written_at: list[int] = []  # the tensors' torch version counters at the last publish
            self._overlaps: dict[int, tuple] = {}  # id(optimizer) -> (parameter count, id(param_groups), holds ours)
            _watch_optimizers()
            _IN_PLACE.add(self)
            self._hooks: list = []  # set at each move into a file (`_move_in_place`), with the model's modules then
        self.keyframe_every = keyframe_every
        self._base: dict[str, torch.Tensor] = {}  # what the last keyframe sent (only_changed)
        self._keyframe, self._since_keyframe = 0, 0
        self._keyframe_out = -1  # the last keyframe that left (sent to ZMQ, or committed to shared memory)
        self._changed: set[str] = set()  # tensors that differed from the keyframe in a delta since it
        self._pinned: dict[str, torch.Tensor] = {}
        self._pending: tuple | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._buffers: list[tuple] = []  # (send buffer, zmq MessageTracker) of past sends
        self._thread = None  # shared memory is written in publish() itself: nothing to send later (and no thread
        if self.shm is None:  # holding a reference to us, so that a dropped in-place publisher goes at once)
            self._thread = threading.Thread(target=self._sender, name="weight-sender", daemon=True)
            self._thread.start()

    # -------------------------------------------------------------------------------------------- snapshot
    @torch.no_grad()
    def _host_tensors(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        cuda = {k: t for k, t in tensors.items() if t.is_cuda}
        if cuda and not self.only_changed:
            return {k: t.detach() for k, t in tensors.items()}, {}  # publish copies D2H straight into the send buffer
        if cuda:
            # D2H on a side stream of each GPU into reusable pinned buffers; training's streams wait only for these
            def copy():
                for k, t in cuda.items():
                    buf = self._pinned.get(k)
                    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                        buf = self._pinned[k] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    buf.copy_(t.detach(), non_blocking=True)
                    tensors[k] = buf
            self._on_side_streams({t.device for t in cuda.values()}, copy)
        tensors = {k: t.detach() for k, t in tensors.items()}
        if not self.only_changed:
            return tensors, {}
        # Deltas are taken against the last keyframe, not the last message: latest-only delivery may drop any
        # message, and each delta must be complete on its own. A receiver that missed the keyframe waits for the next.
        # A keyframe also while the last one has not left: a paced link replaces a waiting message with a newer one,
        # and a failed publish sends nothing, so a delta against it could reach nobody who holds it.
        if not self._base or self._since_keyframe >= self.keyframe_every or self._keyframe != self._keyframe_out:
            self._base = {k: t.clone() for k, t in tensors.items()}
            self._keyframe, self._since_keyframe, self._changed = self.version, 1, set()  # (it counts: one in
            return tensors, {"keyframe": True}                                           # every keyframe_every)
        self._since_keyframe += 1
        # A tensor that changed once since the keyframe goes in every later delta, even when it is back to its
        # keyframe value: a receiver may hold an earlier delta's value of it.
        self._changed |= {k for k, t in tensors.items()
                          if k not in self._changed and (k not in self._base or not torch.equal(self._base[k], t))}
        return {k: t for k, t in tensors.items() if k in self._changed}, {"base": self._keyframe}

    def publish(self, version: int | None = None) -> int:
        """Snapshot the weights now and send them in the background; returns the version. Non-blocking."""
        start = time.perf_counter()
        self.version = self.version + 1 if version is None else int(version)
        tensors = self._sent.get(copy=not self.flatten)
        if self.in_place:
            return self._publish_in_place(tensors, start)
        if self.flatten and (self._flat is None or not self._flat.holds(tensors)):
            self._flat = _FlatTensors(tensors, self.mode) if _FlatTensors.possible(tensors) else None
        flat = self._flat
        if flat is not None and self.shm is not None and not flat.on_gpu:  # same host, CPU: straight into a slot
            header = flat.header(self.version)
            out = self.shm.acquire(flat.packed_size(len(header)))
            pack_block(header, flat.lengths, flat.block, out=out, views=self.shm.views)
            return self._committed(len(out), start)
        if flat is None and self.flatten:
            tensors = dict(tensors)  # the per-tensor path replaces values: not in the kept dict
        # Packing is the one host copy: the snapshot, taken here while the weights are consistent. It goes into a
        # send buffer that no receiver still holds (ZMQ tracks zero-copy sends), reused when the size fits.
        if flat is not None:
            gpus = {flat.block.device} if flat.on_gpu else set()
            header = flat.header(self.version)
            pack = lambda out, pinned=False: pack_block(header, flat.lengths, flat.block, out=out, pinned=pinned,
                                                        views=self.shm.views if self.shm is not None else None)
            size = lambda: flat.packed_size(len(header))
            key = None
        else:
            tensors, delta_meta = self._host_tensors(tensors)
            key = self.version if delta_meta.get("keyframe") else None  # (only_changed: a keyframe's version)
            gpus = {t.device for t in tensors.values() if t.is_cuda}
            frames = encode("update", {"version": self.version, "mode": self.mode, **delta_meta}, tensors,
                            self.version, device_frames=bool(gpus))
            pack = lambda out, pinned=False: pack_frames(frames, out=out, pinned=pinned)
            size = lambda: packed_size([frame_nbytes(f) for f in frames])
        if self.shm is not None:
            return self._publish_shm(pack, size(), gpus, start, key)
        with self._cond:  # the most recently sent free buffer: its pages are the warmest in the cache
            pending = self._pending[1] if self._pending else None
            free = [i for i, (buf, tracker) in enumerate(self._buffers)
                    if (tracker is None or tracker.done) and buf is not pending]
            reuse = self._buffers.pop(free[-1])[0] if free else None
        packed = self._snapshot(pack, reuse, gpus)
        with self._cond:
            self.stats["requested"] += 1
            if self.max_bytes_per_s is None and self._pending is None and not self._busy:
                self._send(packed, key)  # ZMQ sends zero-copy from its own I/O thread: no need to wake ours
            else:
                if self._pending is not None:
                    self.stats["coalesced"] += 1
                self._pending = (self.version, packed, key)
                self._cond.notify()
        self.stats["last_publish_s"] = time.perf_counter() - start
        return self.version

    # ------------------------------------------------------------------------------------------- in place
    def _publish_in_place(self, tensors: dict[str, torch.Tensor], start: float) -> int:
        flat = self._flat
        if flat is None or not flat.holds(tensors):
            self._move_in_place(tensors)  # the first publish, or the model's tensors were replaced (`.to()`, ...)
        else:
            self._check_guarded()
        if not self.shm.publish(self.version):  # a reader stuck in a copy of the version before a publish with no
            self._move_in_place(self._flat.source, stalled=True)  # write in between: leave it that file
            self.shm.publish(self.version)
        self._written_at = [t._version for t in self._flat.source.values()]
        stats = self.stats
        stats["requested"] += 1
        stats["sent"] += 1
        stats["bytes"] += self._flat.block.numel()
        stats["last_publish_s"] = time.perf_counter() - start
        return self.version

    def _move_in_place(self, tensors: dict[str, torch.Tensor], stalled: bool = False) -> None:
        """Move the tensors into a new shared file (readers of the old one move over once it is retired)."""
        if not tensors:
            raise ValueError(f"nothing to publish: the model has no tensors to send in mode {self.mode!r}")
        if not _FlatTensors.possible(tensors) or next(iter(tensors.values())).is_cuda:
            raise ValueError("in_place=True needs CPU tensors that are contiguous and do not share memory (no tied "
                             "weights); publish such a model with in_place=False")
        for other in list(_IN_PLACE):
            if other is not self and other._flat is not None and any(map(other._in_block, tensors.values())):
                raise ValueError(f"these tensors are published in place by another publisher already "
                                 f"({other.shm.path}): one in-place publisher per model")
        header = lambda specs: encode_header("in_place", {"mode": self.mode}, specs)
        old = self._flat
        if old is not None:  # tensors no longer sent (a shrinking trainable set) stop viewing the old file
            with torch.no_grad():
                for k, t in old.source.items():
                    if tensors.get(k) is not t and self._in_block(t):
                        t.data = t.data.clone()
        if stalled:
            log.warning("a reader of %s held its copy for over %.1f s: the weights move to a new file",
                        self.shm.path, self.shm.stall_s)
            self.stats["relocations"] += 1
        self._flat = _FlatTensors(tensors, self.mode, alloc=lambda span, specs: self.shm.create(header(specs), span))
        self._overlaps.clear()
        # load_state_dict on the model or any submodule announces itself; so does the forward of a module in training
        # mode that holds sent buffers (batch norm's running statistics change there). Weak: the model must not keep
        # the publisher alive
        for hook in self._hooks:
            hook.remove()
        sent, modules = {id(t) for t in tensors.values()}, list(self.model.modules())
        announce, in_training = _announcer(weakref.ref(self)), _announcer(weakref.ref(self), training_only=True)
        self._hooks = [m.register_load_state_dict_pre_hook(announce) for m in modules] + [
            m.register_forward_pre_hook(in_training) for m in modules
            if any(id(b) in sent for b in m._buffers.values() if b is not None)]

    def _in_block(self, t: torch.Tensor) -> bool:
        lo = self._flat.block.data_ptr()
        return lo <= t.data_ptr() < lo + self._flat.block.numel()

    def _check_guarded(self) -> None:
        """Warn about (and count) changes to the tensors since the last publish that torch's version counters show
        but nobody announced: readers may have copied them half-done."""
        if self._written_at and [t._version for t in self._flat.source.values()] != self._written_at:
            self.stats["unguarded_writes"] += 1
            log.warning("weights published in place were changed without optimizer.step() or pub.writing(): a "
                        "reader may have copied them half-changed")

    def begin_write(self) -> None:
        """Announce a change to the weights (in place: readers stop copying them until the next publish)."""
        if not self.in_place or self._flat is None or self.shm.writing:
            return
        self._check_guarded()
        if not self.shm.begin_write():  # a reader stopped inside its copy: leave it the old file, write a new one
            self._move_in_place(self._flat.source, stalled=True)
            self.shm.begin_write()
        self._written_at = []

    @contextlib.contextmanager
    def writing(self):
        """`with pub.writing(): ...` around changes to the weights other than `optimizer.step()` and
        `load_state_dict()` (no-op unless in_place)."""
        self.begin_write()
        yield

    def _before_step(self, optimizer) -> None:
        flat = self._flat
        if flat is None or self.shm.writing:
            return
        count = sum(len(group["params"]) for group in optimizer.param_groups)
        known = self._overlaps.get(id(optimizer))
        if known is None or known[0] != count or known[1] != id(optimizer.param_groups):
            holds = any(self._in_block(p) for group in optimizer.param_groups for p in group["params"])
            known = self._overlaps[id(optimizer)] = (count, id(optimizer.param_groups), holds)
        if known[2]:
            self.begin_write()

    def _snapshot(self, pack, out, gpus: set):
        """Run `pack(out)`, the one copy of the weights. From the GPUs `gpus` (empty: CPU weights): device-to-host
        straight into the (pinned) buffer, on side streams that wait for training's pending work; training's streams
        then wait only for these copies."""
        if not gpus:
            return pack(out)
        return self._on_side_streams(gpus, lambda: pack(out, pinned=True))

    def _on_side_streams(self, gpus: set, copy):
        """`copy()` with a side stream current on each GPU of `gpus` (a device-to-host copy runs on its source
        device's current stream, which need not be the current device's), after training's pending work there and
        before its next; returns once the copies are done."""
        sides = []
        for device in gpus:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device=device)
            sides.append((self._streams[device], torch.cuda.current_stream(device)))
        with contextlib.ExitStack() as current:
            for side, main in sides:
                side.wait_stream(main)
                current.enter_context(torch.cuda.stream(side))
            result = copy()
        for side, main in sides:
            done = side.record_event()
            main.wait_event(done)
            done.synchronize()
        return result

    def _publish_shm(self, pack, nbytes: int, gpus: set, start: float, key: int | None = None) -> int:
        out = self.shm.acquire(nbytes)  # a slot no reader holds: the snapshot goes straight into shared memory
        self._snapshot(pack, out, gpus)
        version = self._committed(nbytes, start)
        if key is not None:
            self._keyframe_out = key
        return version

    def _committed(self, nbytes: int, start: float) -> int:
        """Publish the slot just packed (shared memory) and count it."""
        self.shm.commit(self.version)
        stats = self.stats
        stats["requested"] += 1
        stats["sent"] += 1
        stats["bytes"] += nbytes
        stats["last_publish_s"] = time.perf_counter() - start
        return self.version

    def _sender(self) -> None:
        next_allowed = 0.0
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed and self._pending is None:
                    return
                version, packed, key = self._pending
                self._pending = None
                self._busy = True
            with self._cond:  # pace the link; close() cuts the wait short (the newest weights still go out)
                self._cond.wait_for(lambda: self._closed, max(0.0, next_allowed - time.monotonic()))
                if self._pending is not None:  # a newer snapshot came during the wait: it replaces this one (a
                    version, packed, key = self._pending  # keyframe is replaced only by a keyframe: see above)
                    self._pending = None
                    self.stats["coalesced"] += 1
                self._send(packed, key)
                self._busy = False
                self._cond.notify_all()
            if self.max_bytes_per_s:
                next_allowed = time.monotonic() + len(packed) / self.max_bytes_per_s

    def _send(self, packed, key: int | None) -> None:  # under self._cond; `key`: the keyframe's version, if one
        tracker = self.pub.send_packed(packed)
        if key is not None:
            self._keyframe_out = key
        self._buffers = (self._buffers + [(packed, tracker)])[-2:]  # keep two send buffers for reuse
        self.stats["sent"] += 1
        self.stats["bytes"] += len(packed)

    def wait_sent(self, timeout: float = 10.0) -> bool:
        """Block until nothing is waiting or being sent (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        if self.in_place and self.shm._fds[0] >= 0:
            _IN_PLACE.discard(self)
            for hook in self._hooks:
                hook.remove()
            if self._flat is not None:  # the learner's tensors get ordinary memory back; the file goes
                with torch.no_grad():
                    for t in self._flat.source.values():
                        t.data = t.data.clone()
                self._flat = None
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.shm is not None:
            self.shm.close()
        else:
            # The newest weights, just sent, must still go out. Wait (bounded) until ZMQ's I/O thread has taken the
            # last message off our hands, then let it linger: a linger alone can run out on a loaded machine before
            # the I/O thread even gets to the message. (In-process the tracker waits for the receiver instead, which
            # a zero-copy actor never lets go of, and there is nothing in flight to wait for.)
            if self._buffers and not self._inproc:
                try:
                    self._buffers[-1][1].wait(5.0)
                except zmq.NotDone:
                    log.warning("weight publisher closed before ZMQ sent the last version (5 s)")
            self.pub.close(linger_ms=1000)


class WeightSubscriber:
    def __init__(self, endpoint: str, model: torch.nn.Module, *, zero_copy: bool = False,
                 curve: CurveConfig | None = None, ctx: zmq.Context | None = None):
        """`zero_copy=True` (CPU, inference-only actors): `apply` points the parameters at the received buffer
        instead of copying into them. The publisher never reuses a buffer that a receiver still holds. Build the
        subscriber once the model has its final device and dtype: `.to()` / `.half()` replace buffer objects, and
        updates of those would go to the old ones."""
        self.model, self.zero_copy = model, zero_copy
        name = shm_name(endpoint)
        if name is not None and curve is not None:
            raise ValueError("an shm:// endpoint has no network link: curve does not apply")
        self.sub = (ShmSubscriber(name, as_torch=True) if name is not None
                    else Subscriber(endpoint, curve=curve, ctx=ctx, as_torch=True))
        self.shm, self._name = name is not None, name
        self._holder = [self.sub]  # (what the finalizer closes: the reader changes with the channel's kind)
        self.version = 0  # applied
        self._pending = None
        self.stats = {"received": 0, "applied": 0, "coalesced": 0, "waiting_keyframe": 0}
        self._keyframe = None  # version of the last keyframe applied (only_changed publishers)
        self._targets = dict(model.state_dict(keep_vars=True))
        self._fits = None  # the update layout last checked against the model
        self._plan: dict = {}  # for that layout: name -> (target tensor, apply by viewing the received bytes)
        self._views_only = self._views_all = False  # every tensor of that layout is applied by viewing (all tensors)
        self._in_order: list = []  # that layout's targets in the order of its arrays
        self._sent_targets: dict = {}  # (in place) the targets of that layout, by name
        self._flat_targets: _FlatTensors | None = None  # (in place) those moved into one buffer like the learner's
        # A zero-copy shared-memory subscriber dropped without close() would give its slots back while the model's
        # parameters still view one, which the publisher would then rewrite: first they get their own memory
        self._finalizer = weakref.finalize(self, _own_memory_then_close, list(self._targets.values()), self._holder) \
            if self.shm and zero_copy else None
        if self._finalizer is not None:
            self._finalizer.atexit = False  # (at exit nothing publishes into this process any more)

    def poll(self, timeout: float = 0.0) -> bool:
        """Take in what has arrived; keep only the newest. Returns whether an update is waiting to be applied."""
        try:
            msg = self.sub.latest(timeout)
        except ShmKindError as exc:  # the channel is of the other shared-memory kind (slots / in place): switch
            self._switch_reader(exc.kind)
            msg = self.sub.latest(timeout)
        if msg is not None and msg.seq > self.version:
            self.stats["received"] += 1
            base = msg.meta.get("base")
            if base is not None and base != self._keyframe:  # a delta against a keyframe we never applied
                self.stats["waiting_keyframe"] += 1
            else:
                msg, self._pending = self._pending, msg
        if msg is not None:  # superseded or unusable: its buffer may be reused
            self.sub.release(msg)
        return self._pending is not None

    @torch.no_grad()
    def _switch_reader(self, kind: str) -> None:
        old = self.sub
        for t in self._targets.values():  # nothing may view the old reader's slots once it lets them go
            if old.views(t):
                t.data = t.data.clone()
        if self._pending is not None:
            old.release(self._pending)
            self._pending = None
        old.close()
        self.sub = self._holder[0] = (InPlaceSubscriber(self._name) if kind == "in_place"
                                      else ShmSubscriber(self._name, as_torch=True))
        self._fits = None
        log.info("weight channel %s is of kind %s now", self._name, kind)

    def apply(self) -> int | None:
        """Copy the waiting update into the model (at a boundary the caller chose); returns its version. None if
        none is waiting, or (weights published in place) the learner started changing them after `poll()`: poll
        again."""
        msg, self._pending = self._pending, None
        if msg is None:
            return None
        if msg.meta.get("in_place"):
            return self._apply_in_place(msg)
        targets = self._targets
        if msg.layout is None or msg.layout is not self._fits:  # names and shapes checked once per layout
            problems = [k for k, v in msg.arrays.items()
                        if k not in targets or tuple(targets[k].shape) != tuple(v.shape)]
            if problems:
                self.sub.release(msg)  # (a shared-memory slot: back to the publisher, which would run out of them)
                raise ValueError(f"weight update v{msg.seq} does not fit this model: {problems[:5]} "
                                 f"(unknown names or other shapes)")
            if self.shm and self.zero_copy and "base" not in msg.meta:  # tensors a full update no longer sends (a
                # trainable set that shrank; a delta leaves unchanged ones out by design, viewing the keyframe's slot)
                # stop viewing the slots they were last sent in, which would stay held: each reader holds at most
                # three slots (see common.shm_broadcast)
                for k, t in targets.items():
                    if k not in msg.arrays and self.sub.views(t):
                        t.data = t.data.clone()
            self._fits = msg.layout
            # per name: the target, and whether it can view the received bytes (CPU, same dtype)
            self._plan = {k: (targets[k], self.zero_copy and targets[k].dtype == v.dtype
                              and targets[k].device.type == "cpu") for k, v in msg.arrays.items()}
            self._views_only = all(view for _, view in self._plan.values())
            # then every tensor that can view a slot views this update's: the shared-memory reader holds it alone
            self._views_all = self._views_only and len(self._plan) == len(targets)
            self._in_order = [target for target, _ in map(self._plan.__getitem__, msg.arrays)]  # (arrays' order)
        if self._views_only and not (self.shm and "base" in msg.meta):
            # re-pointing `.data` records nothing for autograd: no need for no_grad's cost. A layout keeps the
            # arrays' order, so the targets are zipped with them (on this path each Python step counts)
            for target, src in zip(self._in_order, msg.arrays.values()):
                target.data = src
        elif self._views_only:
            self._load(msg)
        else:
            with torch.no_grad():
                self._load(msg)
        if self.shm and self._views_all and "base" not in msg.meta:
            self.sub.hold_only(msg)
        else:
            self.sub.hold(targets.values() if self.zero_copy else (), msg)  # the buffers the parameters now view
        if self.version > 0:  # published versions never applied here: superseded in a queue or while waiting
            self.stats["coalesced"] += max(0, msg.seq - self.version - 1)
        self.stats["applied"] += 1
        self.version = msg.seq
        if msg.meta.get("keyframe"):
            self._keyframe = msg.seq
        return msg.seq

    def _check_layout(self, msg) -> None:
        """Names and shapes against the model, once per layout (ValueError if they do not fit)."""
        targets = self._targets
        problems = [k for k, v in msg.arrays.items() if k not in targets or tuple(targets[k].shape) != tuple(v.shape)]
        if problems:
            raise ValueError(f"weight update v{msg.seq} does not fit this model: {problems[:5]} "
                             f"(unknown names or other shapes)")
        self._fits = msg.layout
        self._in_order = [targets[k] for k in msg.arrays]

    def _apply_in_place(self, msg) -> int | None:
        """Copy from the learner's own tensors, under the channel's shared lock (never a view: they change). Where
        the model's tensors allow it (CPU, contiguous, the sent dtypes, no shared memory) they are first moved into
        one buffer laid out like the learner's block, so that every later update is a single copy of it."""
        if msg.layout is not self._fits:
            self._check_layout(msg)
            sent = {k: self._targets[k] for k in msg.arrays}
            self._sent_targets, self._flat_targets = sent, None
            if (all(t.device.type == "cpu" and t.dtype == v.dtype for t, v in zip(sent.values(), msg.arrays.values()))
                    and _FlatTensors.possible(sent)):
                self._flat_targets = _FlatTensors(sent, msg.meta.get("mode", "full"))
        flat, sub = self._flat_targets, self.sub
        version = sub.begin_read(msg)
        if version is None:
            return None
        try:
            if flat is not None and flat.holds(self._sent_targets) and flat.block.numel() == sub.block.numel():
                flat.block.copy_(sub.block)  # (a plain uint8 tensor: no autograd to switch off)
            else:
                with torch.no_grad():
                    for target, src in zip(self._in_order, msg.arrays.values()):
                        target.copy_(src)
        finally:
            sub.end_read()
        if self.version > 0:
            self.stats["coalesced"] += max(0, version - self.version - 1)
        self.stats["applied"] += 1
        self.version = version
        return version

    def _load(self, msg) -> None:
        plan = self._plan
        clone = self.shm and "base" in msg.meta
        for name, src in msg.arrays.items():  # torch tensors viewing the received buffer
            target, view = plan[name]
            if view:
                # the parameter now lives in the received buffer: no copy at all. A shared-memory delta is cloned
                # instead, so that the parameters view at most one slot (the keyframe's) and slots stay few.
                target.data = src.clone() if clone else src
            else:
                target.copy_(src)

    def maybe_apply(self, timeout: float = 0.0) -> int | None:
        return self.apply() if self.poll(timeout) else None

    @torch.no_grad()
    def close(self) -> None:
        """Zero-copy parameters get their own memory first: once closed, the buffer they viewed may be rewritten."""
        if self._finalizer is not None:
            self._finalizer()  # (shared memory: the same, once)
            return
        if self.zero_copy and self.version > 0:
            for target in self._targets.values():
                target.data = target.data.clone()
        self.sub.close()


@torch.no_grad()
def _own_memory_then_close(targets: list, holder: list) -> None:
    """A zero-copy shared-memory subscriber's end (its close(), or its garbage collection): the parameters that view
    a slot get their own memory, then the slots go back. `holder[0]`: the subscriber's reader."""
    sub = holder[0]
    for target in targets:
        if sub.views(target):
            target.data = target.data.clone()
    sub.close()
