"""Robots over the network: a robot server dials out to the learner, the learner drives it as a gymnasium env.

Topology (NAT friendly): the learner side binds one `RobotHub` (ZMQ ROUTER); every `RobotServer` (DEALER, routing id =
`session/name`) connects to it, so a robot needs no inbound port (over the internet: an SSH tunnel, see the README).

    robot -> hub   announce {name, session, spec, protocol} every `heartbeat` s (the handshake, repeated, so a
                   restarted hub learns every robot again within one heartbeat); replies to requests (same seq)
    hub -> robot   ack | refuse {reason}; requests: reset {seed}, step [action], hold, estop, stats

Safety: a robot server that hears nothing from its hub (no request, no ack) for `hold_after` seconds while the arm
moves calls `env.hold()` and logs it: a silent learner never leaves the arm moving. After such an outage it refuses
`step` until the next `reset`: a step request that waited out the outage in a queue is stale (its caller may have
given up on it), and the episode it belongs to was cut by the hold; `RemoteRobotEnv.step` raises `RobotUnavailable`.
A hub with an `expected_spec` refuses robots whose obs/action spec or protocol differs, saying what differs, and the
robot server exits.

Outages: `RemoteRobotEnv.step` waits at most `step_timeout`; past it, it raises `RobotUnavailable`, counts the outage
and logs it, and refuses further steps until a reset (the unanswered step may still run on the robot: a retry would
move it twice); `reset()` waits (up to `reconnect_timeout`) for the robot to announce again, then starts a new episode.
A robot that restarted (new session) also raises `RobotUnavailable` on step: its episode is gone, reset; one that came
back with another obs/action spec than the env's spaces is refused at reset (`HandshakeError`, saying what differs);
one back with the same spaces and other settings (another `control_hz`) is taken as it is now, with a warning, and
a step deadline derived from its new rate.
A robot and a hub of different protocol versions refuse each other with both versions named.
A robot is never declared out while a request to it is pending (a homing reset may take a minute), and any reply
brings it back online.

Names are unique. The routing id carries the session, so two servers never collide in ZMQ (with one id per name,
ROUTER_HANDOVER would silently cut the older one off); handover still lets a session that reconnects take its id back
from a connection that died silently. A second session announcing a name that is online under another session is
held (not acked, sent nothing): if the known session goes silent for `peer_timeout` it was a restart and the newcomer
is accepted; if the known session announces again, the newcomer is refused ("pass a distinct --name") and exits.
Frames are `common.transport` messages (msgpack header + raw arrays; no pickle); bad frames are logged and dropped.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import gymnasium as gym
import msgpack
import numpy as np
import zmq

from common.transport import (DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, CurveConfig, FrameError, HandshakeError,
                              Message, ProtocolMismatch, TransportError, close_socket, decode, encode, make_socket,
                              spec_diff, spec_hash, wire_limit)
from robot_io.env import RobotEnv, flatten_obs, spaces_from_spec, unflatten_obs

log = logging.getLogger("robot_io.remote")
BEACON_PORT = 50555
BEACON_MAGIC = "robot_io/1"


class _NeedsReset(RuntimeError):
    """A robot server's refusal of a step after an outage (see Safety above)."""


class RobotUnavailable(TransportError):
    """The robot did not answer within the deadline, is not connected, or restarted (its episode is gone)."""


class RobotNoReply(RobotUnavailable):
    """A request was sent and no reply came within its deadline: it may still run on the robot."""


class RemoteRobotError(RuntimeError):
    """The robot answered with an error (e.g. it is emergency-stopped)."""


# ------------------------------------------------------------------------------------------------ robot side
class RobotServer:
    """Exposes a RobotEnv to a learner's RobotHub. `serve()` runs until `stop()` (or `max_seconds`)."""

    def __init__(self, env: RobotEnv, learner: str, *, name: str | None = None, heartbeat: float = 1.0,
                 hold_after: float = 2.0, curve: CurveConfig | None = None, beacon: str | None = None):
        if not 0 < 2 * heartbeat <= hold_after:  # acks come once per heartbeat: slower reads a live learner as silent
            raise ValueError(f"heartbeat {heartbeat:g} s must be > 0 and at most half of hold_after {hold_after:g} s")
        self.env, self.learner = env, learner
        self.name = name or env.name
        self.heartbeat, self.hold_after = heartbeat, hold_after
        self.session = uuid.uuid4().hex[:12]
        self.spec = env.spec()
        self.spec["name"] = self.name
        self.beacon = _beacon_socket(beacon) if beacon else None
        try:
            self.sock = make_socket(zmq.DEALER, learner, bind=False, curve=curve, IMMEDIATE=1, SNDHWM=16,
                                    ROUTING_ID=f"{self.session}/{self.name}".encode()[:255],  # ZMQ's limit
                                    MAXMSGSIZE=wire_limit(DEFAULT_MAX_MESSAGE_BYTES))
        except BaseException:
            if self.beacon is not None:
                self.beacon[0].close()
            raise
        self.connected, self.moving, self.last_heard = False, False, time.monotonic()
        self.needs_reset = False  # after an outage: steps are refused until a reset
        self._next_announce = 0.0
        self.stats = {"requests": 0, "bad_frames": 0, "holds": 0, "outages": 0, "announces": 0}
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _send(self, frames) -> bool:
        try:
            self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected (IMMEDIATE): drop; announces repeat, the hub times out on replies
            return False

    def _announce(self) -> None:
        meta = {"name": self.name, "session": self.session, "protocol": PROTOCOL_VERSION, "spec": self.spec,
                "spec_hash": spec_hash(self.spec), "moving": self.moving, "stats": dict(self.env.stats)}
        self.stats["announces"] += int(self._send(encode("announce", meta)))
        if self.beacon is not None:
            sock, addr = self.beacon
            payload = {"magic": BEACON_MAGIC, "name": self.name, "type": self.spec.get("type"), "learner": self.learner,
                       "host": socket.gethostname(), "pid": os.getpid(), "spec_hash": spec_hash(self.spec),
                       "connected": self.connected, "control_hz": self.spec.get("control_hz"), "spec": self.spec}
            try:
                sock.sendto(msgpack.packb(payload), addr)
            except OSError as exc:
                log.debug("beacon to %s failed: %s", addr, exc)

    def _handle(self, msg: Message):
        if msg.type == "reset":
            obs, info = self.env.reset(seed=msg.meta.get("seed"))
            self.moving = self.needs_reset = False
            return {"info": info}, flatten_obs(obs)
        if msg.type == "step":
            if "action" not in msg.arrays:
                raise ValueError("step needs an 'action' array")
            if self.needs_reset:
                raise _NeedsReset(f"{self.name}: the learner went silent mid-episode and the arm was held; a step "
                                  f"is refused until the next reset")
            obs, reward, terminated, truncated, info = self.env.step(msg.arrays["action"])
            self.moving = not (terminated or truncated)
            meta = {"reward": reward, "terminated": terminated, "truncated": truncated,
                    **{k: v for k, v in info.items() if k != "executed_action"}}
            return meta, {**flatten_obs(obs), "executed_action": info["executed_action"]}
        if msg.type == "hold":
            self.env.hold()
            self.moving = False
            return {}, {}
        if msg.type == "estop":
            self.env.emergency_stop()
            self.moving = False
            return {}, {}
        if msg.type == "stats":
            return {"env": dict(self.env.stats), "server": dict(self.stats)}, {}
        raise ValueError(f"unknown request {msg.type!r}; known: reset, step, hold, estop, stats")

    def serve_once(self, timeout: float = 0.05) -> None:
        now = time.monotonic()
        if now >= self._next_announce:
            self._announce()
            self._next_announce = now + self.heartbeat
        silent = now - self.last_heard
        if self.connected and silent > self.hold_after:
            log.warning("%s: learner silent for %.1f s: %s; waiting for it to come back", self.name, silent,
                        "holding the arm" if self.moving else "idle")
            self.stats["outages"] += 1
            self.connected = False
            self.needs_reset = True
            if self.moving:
                self.env.hold()
                self.stats["holds"] += 1
                self.moving = False
        wait = max(0.0, min(timeout, self._next_announce - time.monotonic()))
        if not self.sock.poll(int(wait * 1000), zmq.POLLIN):
            return
        try:
            msg = decode(self.sock.recv_multipart(copy=False))
        except ProtocolMismatch as exc:  # (the hub's refusal of our announce comes in its own version too)
            raise HandshakeError(f"{self.name}: the learner speaks protocol version {exc.theirs!r}, this robot "
                                 f"{PROTOCOL_VERSION}: run the same version of this code on both sides") from None
        except FrameError as exc:
            self.stats["bad_frames"] += 1
            log.warning("%s: bad frame from the learner dropped: %s", self.name, exc)
            return
        self.last_heard = time.monotonic()
        if not self.connected:
            log.info("%s: connected to the learner at %s", self.name, self.learner)
            self.connected = True
        if msg.type == "ack":
            return
        if msg.type == "refuse":
            raise HandshakeError(f"{self.name}: the learner refused this robot: {msg.meta.get('reason')}")
        self.stats["requests"] += 1
        try:
            meta, arrays = self._handle(msg)
            reply = encode("ok", meta, arrays, msg.seq)
        except Exception as exc:
            log.warning("%s: request %s failed: %s", self.name, msg.type, exc)
            reply = encode("error", {"error": f"{type(exc).__name__}: {exc}",
                                     "needs_reset": isinstance(exc, _NeedsReset)}, None, msg.seq)
        self._send(reply)
        self.last_heard = time.monotonic()  # a slow call (a homing reset) is not learner silence

    def serve(self, max_seconds: float | None = None) -> None:
        end = None if max_seconds is None else time.monotonic() + max_seconds
        log.info("%s: serving to %s (session %s)", self.name, self.learner, self.session)
        try:
            while not self._stop.is_set() and (end is None or time.monotonic() < end):
                self.serve_once()
        finally:
            try:
                if self.moving:
                    self.env.hold()
            finally:  # a hold that fails (an arm in a reflex error) still closes the socket and the beacon
                close_socket(self.sock)
                if self.beacon is not None:
                    self.beacon[0].close()


def _beacon_socket(target: str):
    host, _, port = target.rpartition(":")
    port = int(port or BEACON_PORT)  # (a malformed port raises before the socket)
    try:  # resolved once, here: a name looked up at every beacon would put DNS (no deadline) in the control loop
        address = (socket.gethostbyname(host or "255.255.255.255"), port)
    except OSError as exc:
        raise ValueError(f"beacon host {host!r} does not resolve ({exc}); give an IP address") from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    return sock, address


def listen_beacons(seconds: float, port: int = BEACON_PORT) -> list[dict]:
    """Robot servers that announced themselves by UDP beacon within `seconds` (latest beacon per name)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    found: dict[str, dict] = {}
    end = time.monotonic() + seconds
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", port))
        sock.settimeout(0.1)
        while time.monotonic() < end:
            try:
                data, addr = sock.recvfrom(65536)
                beacon = msgpack.unpackb(data, raw=False)
            except socket.timeout:
                continue
            except (ValueError, msgpack.UnpackException):
                continue  # not ours, or garbage
            # a beacon is a map of text keys with a name and, if any, a spec map; anything else on the port is
            # dropped (a foreign or malformed packet must not stop the listing)
            if isinstance(beacon, dict) and beacon.get("magic") == BEACON_MAGIC and all(
                    isinstance(k, str) for k in beacon) and isinstance(beacon.get("name"), str) and isinstance(
                    beacon.get("spec", {}), dict):
                found[beacon["name"]] = {**beacon, "address": addr[0]}
    finally:
        sock.close()
    return list(found.values())


# ------------------------------------------------------------------------------------------------ learner side
@dataclass
class RobotRecord:
    name: str
    session: str
    spec: dict
    last_seen: float
    address: bytes = b""  # routing id of the accepted session's connection
    online: bool = True
    outage_start: float | None = None
    stats: dict = field(default_factory=dict)
    contender: str | None = None  # another session announcing this name while this one is online
    contender_since: float | None = None
    duplicates: set = field(default_factory=set)  # sessions refused: a second robot under this name


class _Pending:
    def __init__(self, robot: str):
        self.robot, self.event, self.reply, self.unsent = robot, threading.Event(), None, False


class RobotHub:
    """Binds `endpoint`; robot servers connect and announce. Thread-safe `request()`; a background thread owns the
    socket. `expected_spec` (optional): robots with a different spec or protocol are refused with the difference."""

    def __init__(self, endpoint: str, *, expected_spec: dict | None = None, peer_timeout: float = 3.0,
                 curve: CurveConfig | None = None):
        self.sock = make_socket(zmq.ROUTER, endpoint, bind=True, curve=curve, ROUTER_HANDOVER=1, ROUTER_MANDATORY=1,
                                MAXMSGSIZE=wire_limit(DEFAULT_MAX_MESSAGE_BYTES))
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.expected_spec, self.peer_timeout = expected_spec, peer_timeout
        self.records: dict[str, RobotRecord] = {}
        self.stats = {"bad_frames": 0, "refused": 0, "outages": 0, "reconnects": 0, "restarts": 0, "duplicates": 0}
        self._outbox: queue.Queue = queue.Queue()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="robot-hub", daemon=True)
        self._thread.start()

    # -- the socket thread
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._pump()
                except Exception:  # one bad message must never end the hub
                    log.exception("robot hub: handling failed; still serving")
        finally:  # the thread that uses the socket closes it (ZMQ sockets are not thread-safe)
            close_socket(self.sock)

    def _pump(self) -> None:
        while True:
            try:
                address, frames, pending = self._outbox.get_nowait()
            except queue.Empty:
                break
            try:  # never blocks this thread (every robot's): a robot that stops reading fills its queue
                self.sock.send_multipart([address, *frames], copy=False, flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # ROUTER_MANDATORY: that robot is not connected, or its queue is full
                if pending is not None:
                    pending.unsent = True
                    pending.event.set()
        self._check_outages()
        if not self.sock.poll(5, zmq.POLLIN):
            return
        address, *frames = self.sock.recv_multipart(copy=False)
        try:
            msg = decode(frames)
        except ProtocolMismatch as exc:  # refused in so many words (the refusal's own version tells the robot ours)
            self.stats["refused"] += 1
            reason = f"protocol version {exc.theirs!r}; this learner speaks {PROTOCOL_VERSION}"
            log.warning("robot hub: refused %r: %s", address.bytes, reason)
            self._send_to(address.bytes, "refuse", {"reason": reason})
            return
        except FrameError as exc:
            self.stats["bad_frames"] += 1
            log.warning("robot hub: bad frame from %r dropped: %s", address.bytes, exc)
            return
        if msg.type == "announce":
            self._on_announce(address.bytes, msg)
        else:
            with self._lock:
                pending = self._pending.pop(msg.seq, None)
            if pending is not None:
                pending.reply = msg
                pending.event.set()
            rec = next((r for r in list(self.records.values()) if r.address == address.bytes), None)
            if rec is not None:  # an answer proves the robot is there, outage or not
                self._heard(rec, time.monotonic())

    def _heard(self, rec: RobotRecord, now: float) -> None:
        rec.last_seen = now
        if not rec.online:
            log.info("robot hub: robot %s back after %.1f s", rec.name, now - (rec.outage_start or now))
            self.stats["reconnects"] += 1
            rec.online, rec.outage_start = True, None

    def _send_to(self, address: bytes, msg_type: str, meta: dict) -> None:
        try:
            self.sock.send_multipart([address, *encode(msg_type, meta)], copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: that connection is gone (or not reading)
            log.debug("robot hub: %s to %r not sent: %s", msg_type, address, exc)

    def _on_announce(self, address: bytes, msg: Message) -> None:
        meta = msg.meta
        name, session = str(meta.get("name")), str(meta.get("session"))
        if self.expected_spec is not None:
            diff = spec_diff(self.expected_spec, meta.get("spec") or {}, meta.get("protocol"))
            diff.pop("name", None)
            if diff:
                self.stats["refused"] += 1
                reason = f"spec/protocol differs from what this learner expects: {diff}"
                log.warning("robot hub: refused %s: %s", name, reason)
                self._send_to(address, "refuse", {"reason": reason})
                return
        elif meta.get("protocol") != PROTOCOL_VERSION:
            self.stats["refused"] += 1
            reason = f"protocol {meta.get('protocol')} != {PROTOCOL_VERSION}"
            self._send_to(address, "refuse", {"reason": reason})
            return
        now = time.monotonic()
        rec = self.records.get(name)
        if rec is None:
            log.info("robot hub: robot %s connected (%s)", name, meta.get("spec", {}).get("type"))
            rec = self.records[name] = RobotRecord(name, session, meta.get("spec") or {}, now, address)
        elif rec.session != session and session in rec.duplicates:
            self._refuse_duplicate(address, rec, session)
            return
        elif rec.session != session and rec.online:
            # a restart whose old session has not timed out yet, or a second robot under this name: the known
            # session's liveness decides (see _on_announce of the known session below, and _check_outages)
            if rec.contender != session:
                rec.contender, rec.contender_since = session, now
                log.warning("robot hub: a new session of robot %s announced while the known one is online: waiting "
                            "up to %.1f s to tell a restart from a second robot with the same name", name,
                            self.peer_timeout)
            return  # not acked: it serves nothing meanwhile
        else:
            if rec.session != session:
                log.warning("robot hub: robot %s restarted (new session)", name)
                self.stats["restarts"] += 1
                rec.contender = None
            elif rec.contender is not None and now > rec.contender_since:
                rec.duplicates.add(rec.contender)  # the known session is alive: the other one is a second robot
                self.stats["duplicates"] += 1
                log.error("robot hub: two robot servers are named %s (sessions %s and %s); refusing the newer one",
                          name, session, rec.contender)
                rec.contender = None
            self._heard(rec, now)
            rec.session, rec.spec, rec.address = session, meta.get("spec") or {}, address
        rec.stats = meta.get("stats") or {}
        self._send_to(address, "ack", {"time": time.time()})

    def _refuse_duplicate(self, address: bytes, rec: RobotRecord, session: str) -> None:
        reason = (f"another robot named {rec.name!r} is already connected to this learner (session {rec.session}); "
                  f"every robot needs its own name: restart this one with `python -m robot_io.serve --name "
                  f"{rec.name}-2 ...` (or name=... in --robot)")
        log.error("robot hub: refused session %s: %s", session, reason)
        self._send_to(address, "refuse", {"reason": reason})

    def _check_outages(self) -> None:
        now = time.monotonic()
        with self._lock:
            busy = {p.robot for p in self._pending.values()}  # a long call (a homing reset) is not an outage
        for rec in self.records.values():
            if rec.online and rec.name not in busy and now - rec.last_seen > self.peer_timeout:
                rec.online, rec.outage_start = False, rec.last_seen
                self.stats["outages"] += 1
                log.warning("robot hub: robot %s silent for %.1f s: outage", rec.name, now - rec.last_seen)

    # -- callers (any thread)
    def robots(self, online_only: bool = True) -> list[RobotRecord]:
        return [r for r in list(self.records.values()) if r.online or not online_only]

    def wait_for(self, name: str | None = None, timeout: float = 30.0) -> RobotRecord:
        """The named robot (or the first one to connect) once it is online; RobotUnavailable past the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            live = [r for r in self.robots() if name is None or r.name == name]
            if live:
                return live[0]
            if time.monotonic() >= deadline:
                known = ", ".join(r.name for r in self.robots()) or "none"
                raise RobotUnavailable(f"robot {name or '(any)'} did not connect to {self.endpoint} within "
                                       f"{timeout:.1f} s (online: {known}); is `python -m robot_io.serve --learner "
                                       f"tcp://<this host>:<port>` running on the robot?")
            time.sleep(0.02)

    def request(self, name: str, method: str, meta: dict | None = None, arrays: dict | None = None,
                timeout: float = 5.0) -> Message:
        rec = self.records.get(name)
        if rec is None or not rec.online:
            raise RobotUnavailable(f"robot {name} is not connected")
        with self._lock:
            self._seq += 1
            seq = self._seq
        try:  # before the request is registered: a pending entry that is never sent would hold off outages forever
            frames = encode(method, meta, arrays, seq)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"robot {name}: {method!r} request cannot be sent: {exc} (meta: {meta!r})") from None
        pending = _Pending(name)
        with self._lock:
            self._pending[seq] = pending
        self._outbox.put((rec.address, frames, pending))
        if not pending.event.wait(timeout) or pending.reply is None:
            with self._lock:
                self._pending.pop(seq, None)
            if pending.unsent:
                raise RobotUnavailable(f"robot {name}: {method!r} could not be sent (the robot is not connected, or "
                                       f"its queue is full)")
            raise RobotNoReply(f"robot {name}: no reply to {method!r} within {timeout:.1f} s")
        reply = pending.reply
        if reply.type == "error":
            if reply.meta.get("needs_reset"):  # an outage cut the episode on the robot's side
                raise RobotUnavailable(f"robot {name}: {reply.meta.get('error')}")
            raise RemoteRobotError(f"robot {name}: {reply.meta.get('error')}")
        return reply

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._thread.is_alive():
            log.warning("robot hub: its thread still runs after 2 s; the socket closes when it stops")


class RemoteRobotEnv(gym.Env):
    """A robot on the network as a gymnasium env. `hub` is a RobotHub or an endpoint to bind (e.g. tcp://*:5600)."""

    metadata = {"render_modes": []}

    def __init__(self, hub: RobotHub | str, name: str | None = None, *, connect_timeout: float = 30.0,
                 reconnect_timeout: float = 30.0, step_timeout: float | None = None, reset_timeout: float = 60.0):
        self.owns_hub = isinstance(hub, str)
        self.hub = RobotHub(hub) if isinstance(hub, str) else hub
        try:  # a robot that never comes (or sends a bad spec) must not leave our hub bound with its thread running
            rec = self.hub.wait_for(name, connect_timeout)
            self.observation_space = spaces_from_spec(rec.spec["observation"])
            self.action_space = spaces_from_spec(rec.spec["action"])
        except BaseException:
            if self.owns_hub:
                self.hub.close()
            raise
        self.name, self.spec = rec.name, rec.spec
        self._step_timeout_given = step_timeout
        self.step_timeout = self._step_timeout_for(rec.spec)
        self.reconnect_timeout, self.reset_timeout = reconnect_timeout, reset_timeout
        self.session: str | None = None
        self.stats = {"outages": 0, "outage_seconds": 0.0, "steps": 0}
        self._outage_since: float | None = None
        self._unanswered_step = False  # a step timed out: it may still run on the robot, so none until a reset

    def _step_timeout_for(self, spec: dict) -> float:
        """The given step timeout, else five control periods of the robot's spec (at least 2 s)."""
        hz = float(spec.get("control_hz") or 0)
        return self._step_timeout_given or max(2.0, 5.0 / hz if hz else 0.0)

    def _outage(self, exc: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self.stats["outages"] += 1
            log.warning("robot %s: outage: %s", self.name, exc)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rec = self.hub.wait_for(self.name, self.reconnect_timeout)
        diff = spec_diff(self.spec, rec.spec)
        spaces = {k: v for k, v in diff.items() if k in ("observation", "action")}
        if spaces:  # a robot restarted under this name may not be the one our spaces were made for
            raise HandshakeError(f"robot {self.name} came back with another spec than this env's spaces: {spaces}; "
                                 f"make a new RemoteRobotEnv for it")
        if diff:  # the same spaces, other settings (a restart at another control rate): those of the robot now
            log.warning("robot %s came back with other settings: %s", self.name,
                        {k: (v["server"], v["client"]) for k, v in diff.items()})
            self.spec, self.step_timeout = rec.spec, self._step_timeout_for(rec.spec)
        reply = self.hub.request(self.name, "reset", {"seed": seed}, timeout=self.reset_timeout)
        if self._outage_since is not None:
            self.stats["outage_seconds"] += time.monotonic() - self._outage_since
            log.info("robot %s: back after %.1f s", self.name, time.monotonic() - self._outage_since)
            self._outage_since = None
        self.session, self._unanswered_step = rec.session, False
        return unflatten_obs(reply.arrays), dict(reply.meta.get("info") or {})

    def step(self, action):
        rec = self.hub.records.get(self.name)
        if rec is None or rec.session != self.session:
            exc = RobotUnavailable(f"robot {self.name} restarted since the last reset: call reset()")
            self._outage(exc)
            raise exc
        if self._unanswered_step:  # retrying would send a second action computed from the same stale observation
            raise RobotUnavailable(f"robot {self.name}: the last step got no reply and may still have run: steps are "
                                   f"refused until the next reset")
        try:
            reply = self.hub.request(self.name, "step", arrays={"action": np.asarray(action, np.float32)},
                                     timeout=self.step_timeout)
        except RobotUnavailable as exc:
            self._unanswered_step = isinstance(exc, RobotNoReply)  # (not sent at all: nothing can still run)
            self._outage(exc)
            raise
        arrays = dict(reply.arrays)
        info = dict(reply.meta)
        info["executed_action"] = arrays.pop("executed_action")
        reward, terminated, truncated = info.pop("reward"), info.pop("terminated"), info.pop("truncated")
        self.stats["steps"] += 1
        return unflatten_obs(arrays), float(reward), bool(terminated), bool(truncated), info

    def hold(self) -> None:
        self.hub.request(self.name, "hold", timeout=self.step_timeout)

    def emergency_stop(self) -> None:
        self.hub.request(self.name, "estop", timeout=self.step_timeout)

    def close(self) -> None:
        if self.owns_hub:
            self.hub.close()
