"""common.transport: framing, the three patterns, recovery from kill -9 on either side, CurveZMQ."""

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq

from common.transport import (
    PROTOCOL_VERSION, CurveConfig, DataReceiver, DataSender, EndpointError, FrameError, HandshakeError, PackedDecoder,
    Publisher,
    RpcClient, RpcServer, Subscriber, TransportError, TransportTimeout, VersionedHeader, decode, encode,
    encode_header, make_keypair, make_socket, pack_block, pack_frames, packed_block_layout,
    unpack_frames,
)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32",
          "float64"]
SHAPES = [(), (0,), (1,), (7,), (3, 0), (2, 3), (4, 5, 6), (2, 128, 128, 3)]


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def terminates(ctx: zmq.Context, within_s: float = 5.0) -> bool:
    """Whether `ctx.term()` returns within `within_s` (it waits for every socket of the context to close)."""
    done = threading.Thread(target=ctx.term, daemon=True)
    done.start()
    done.join(within_s)
    return not done.is_alive()


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype_and_shape(dtype):
    rng = np.random.default_rng(0)

    def any_bits(shape):  # every bit pattern: negatives, extremes, NaN payloads, infinities, -0; bools 0 / 1
        if dtype == "bool":
            return rng.integers(0, 2, shape).astype(bool)
        count = int(np.prod(shape))
        return np.frombuffer(rng.bytes(count * np.dtype(dtype).itemsize), dtype).reshape(shape).copy()

    arrays = {f"a{i}": any_bits(shape) for i, shape in enumerate(SHAPES)}
    arrays["strided"] = any_bits((6, 8))[::2, ::3]
    big = arrays["a7"]
    assert dtype == "bool" and big.any() and not big.all() or dtype != "bool" and np.unique(big).size > 1
    for frames in (encode("t", {"k": [1, "x"]}, arrays, seq=42),
                   unpack_frames(pack_frames(encode("t", {"k": [1, "x"]}, arrays, seq=42)))):
        msg = decode(frames)
        assert (msg.type, msg.seq, msg.meta) == ("t", 42, {"k": [1, "x"]})
        for name, value in arrays.items():
            assert msg.arrays[name].dtype == value.dtype and msg.arrays[name].shape == value.shape
            assert msg.arrays[name].tobytes() == value.tobytes()  # bit-exact (NaN payloads included)


def test_round_trip_torch_tensors_including_bfloat16():
    tensors = {"w": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "i": torch.arange(4)}
    msg = decode(encode("w", {}, tensors), as_torch=True)
    for name, t in tensors.items():
        assert msg.arrays[name].dtype == t.dtype and torch.equal(msg.arrays[name], t)


def malformed_messages(rng: random.Random, count: int) -> list[list[bytes]]:
    good = encode("data", {"session": "s", "sender": "r", "items": [[1, {}]]},
                  {"0.img": np.zeros((4, 4, 3), np.uint8), "0.x": np.zeros(3, np.float32)}, seq=1)
    header = msgpack.unpackb(good[0])
    body = [bytes(memoryview(f)) for f in good[1:]]

    def with_header(**changes):
        h = {**header, **changes}
        return [msgpack.packb(h)] + body

    makers = [
        lambda: [good[0], body[0][: rng.randrange(len(body[0]))], body[1]],  # truncated array frame
        lambda: [good[0], body[0]],  # missing frame
        lambda: [good[0], *body, b"extra"],  # extra frame
        lambda: with_header(a=[["0.img", "<c16", [4, 4, 3]], header["a"][1]]),  # dtype not allowed
        lambda: with_header(a=[["0.img", "|O", [4, 4, 3]], header["a"][1]]),  # object dtype
        lambda: with_header(a=[["0.img", "|u1", [4, 4, rng.randint(4, 9)]], header["a"][1]]),  # wrong shape
        lambda: with_header(a=[["0.img", "|u1", [-1, 4, 3]], header["a"][1]]),  # negative dim
        lambda: with_header(a=[["0.img", "|u1"], header["a"][1]]),  # spec too short
        lambda: with_header(v=PROTOCOL_VERSION + rng.randint(1, 9)),  # wrong schema version
        lambda: with_header(s="seven"),  # wrong field type
        lambda: [msgpack.packb({"v": PROTOCOL_VERSION, "t": "data"})] + body,  # missing fields
        lambda: [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))] + body,  # random header bytes
        lambda: [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 256)))],  # random bytes only
        lambda: [msgpack.packb([1, 2, 3])] + body,  # header not a map
        lambda: [good[0], np.zeros(2 * 2**20, np.uint8).tobytes(), body[1]],  # oversized
        lambda: with_header(t="ack"),  # valid frame, wrong message type for a data channel
        lambda: with_header(m={"session": "s", "items": [["one", {}]]}),  # bad item entry
        lambda: with_header(m={"session": "s", "items": []}),  # no items
        lambda: with_header(a=[["7.img", "|u1", [4, 4, 3]], header["a"][1]]),  # array of no item
        lambda: [bytes(pack_frames([good[0], *body]))[: rng.randint(1, 100)]],  # truncated packed batch
    ]
    return [makers[i % len(makers)]() for i in range(count)]


def test_decode_rejects_every_malformed_message_with_frame_error():
    rx = DataReceiver(free_endpoint())
    for frames in malformed_messages(random.Random(0), 1000):
        with pytest.raises(FrameError):
            if len(frames) == 1:
                frames = unpack_frames(frames[0])
            rx._split(decode(frames, max_bytes=2**20), b"peer")  # the data channel's checks on top of decode
    rx.close()


def _same_result(decoder, buf):
    """decoder(buf) and decode(unpack_frames(buf)) agree: both raise FrameError, or both give the same message."""
    try:
        want = decode(unpack_frames(buf), max_bytes=2**20, as_torch=decoder.as_torch)
    except FrameError:
        with pytest.raises(FrameError):
            decoder(buf)
        return None
    got = decoder(buf)
    assert (got.type, got.seq, got.meta, list(got.arrays)) == (want.type, want.seq, want.meta, list(want.arrays))
    for name, value in want.arrays.items():
        assert got.arrays[name].dtype == value.dtype and tuple(got.arrays[name].shape) == tuple(value.shape)
        assert (torch.equal if decoder.as_torch else np.array_equal)(got.arrays[name], value)
    return got


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("headers", ["encode", "versioned"])
def test_packed_decoder_agrees_with_decode_on_good_bad_and_look_alike_messages(as_torch, headers):
    """The weight broadcast's decoder remembers the last layout and skips per-array checks when the next message
    matches it: look-alikes (same frame lengths, other names / dtypes / shapes / version) must not slip through.
    `versioned`: the headers come from a `VersionedHeader` (the weight publisher's), which the decoder recognises by
    their bytes and does not parse at all; the look-alikes then keep its key order."""
    rng = np.random.default_rng(0)
    arrays = {"w0": rng.random((4, 6)).astype(np.float32), "w1": rng.random(5).astype(np.float32),
              "n": np.arange(3, dtype=np.int64)}
    if headers == "encode":
        good = lambda seq: pack_frames(encode("update", {"version": seq}, arrays, seq))
    else:
        specs = msgpack.unpackb(encode("update", {}, arrays)[0])["a"]
        header_of = VersionedHeader("update", {"mode": "full"}, specs)
        good = lambda seq: pack_frames([header_of(seq), *arrays.values()])
    decoder = PackedDecoder(max_bytes=2**20, as_torch=as_torch)
    first = _same_result(decoder, good(1))
    assert _same_result(decoder, good(2)).layout is first.layout  # the remembered layout served it
    assert (decoder._layout[-1] is not None) == (headers == "versioned")  # recognised (or not) as versioned
    header = msgpack.unpackb(bytes(unpack_frames(good(3))[0]))
    body = [bytes(f) for f in unpack_frames(good(3))[1:]]

    def look_alike(**changes):  # same header length and frame lengths as the good message: only the content differs
        frames = [msgpack.packb({**header, **changes}), *body]
        assert len(frames[0]) == len(unpack_frames(good(3))[0])
        return pack_frames(frames)

    cases = [look_alike(a=[["w9", "<f4", [4, 6]], *header["a"][1:]]),  # renamed
             look_alike(a=[["w0", "<i4", [4, 6]], *header["a"][1:]]),  # other dtype, same size
             look_alike(a=[["w0", "<f4", [6, 4]], *header["a"][1:]]),  # other shape, same size
             look_alike(a=[["w0", "<f4", [4, 7]], *header["a"][1:]]),  # shape that does not fit the frame
             look_alike(a=[["w0", "<c8", [4, 3]], *header["a"][1:]]),  # dtype not allowed
             look_alike(v=PROTOCOL_VERSION + 1),  # wrong protocol version
             look_alike(s=None),  # wrong field type
             look_alike(s=4, m={**header["m"], "version": 5}),  # sequence and version differ
             look_alike(t="upd8te"),  # another message type
             bytes(good(4))[:-1], bytes(good(4)) + b"\0"]  # truncated, trailing byte
    cases += [pack_frames(f) if len(f) > 1 else f[0] for f in malformed_messages(random.Random(2), 300)]
    for buf in cases:
        _same_result(decoder, buf)
        assert _same_result(decoder, good(5)) is not None  # and the good stream goes on
    corrupt = bytearray(good(6))
    corrupt[5] ^= 1  # the header length field: the prefix no longer matches, the full checks run
    _same_result(decoder, bytes(corrupt))
    for seq in (127, 128, 255, 256, 65535, 65536, 2**32, 2**63 - 1):  # versions whose encodings change length
        assert _same_result(decoder, good(seq)).seq == seq
    for seq in (2**64 - 2**40, 2**64 - 1):  # the stem's probe (seq + 2**40) would not pack: an OverflowError
        assert _same_result(PackedDecoder(max_bytes=2**20, as_torch=as_torch), good(seq)).seq == seq


@pytest.mark.parametrize("with_views", [False, True])
def test_pack_block_packs_like_pack_frames_into_reused_buffers(with_views):
    """`pack_block` (one copy of a block of frames) gives `pack_frames`' bytes, also into a reused `out` whose
    header grew and moved the frames, with the tensor views of kept `out`s reused (`views`)."""
    lengths = [24, 40, 8]
    rel, span = packed_block_layout(lengths)
    block = torch.zeros(span, dtype=torch.uint8)  # the padding between frames is zeros, as pack_frames writes it
    frames = [block[o:o + n].numpy() for o, n in zip(rel, lengths)]
    for i, f in enumerate(frames):
        f[:] = np.arange(len(f)) * (i + 3) % 251
    views = {} if with_views else None
    outs = {}
    for round_ in range(3):
        for header in (b"h" * 5, b"h" * 70, b"h" * 5):  # 70 bytes push the frames to the next 64-byte boundary
            for f in frames:
                f += 1
            want = pack_frames([header, *frames])
            out = outs.setdefault(len(header), np.zeros(len(want), np.uint8))
            got = pack_block(header, lengths, block, out=out, views=views)
            assert got is out and bytes(got) == bytes(want)
    assert (views is None) or len(views) == 2
    out[:12] = 0xFF  # a reused buffer whose prefix was overwritten (e.g. a slot scribbled on) is packed whole again
    assert bytes(pack_block(b"h" * 5, lengths, block, out=out, views=views)) == bytes(pack_frames([b"h" * 5, *frames]))


def test_versioned_header_is_encode_header_with_the_version_filled_in():
    specs = [["w", "<f4", [3, 2]], ["b", "<i8", []]]
    header_of = VersionedHeader("update", {"mode": "trainable", "version": -1}, specs)  # its version is replaced
    for seq in (0, 1, 127, 128, 2**16, 2**40):
        want = msgpack.unpackb(encode_header("update", {"mode": "trainable", "version": seq}, specs, seq))
        assert msgpack.unpackb(header_of(seq)) == want
        assert VersionedHeader.stem(header_of(seq), want) == header_of(seq)[:-2 * len(msgpack.packb(seq)) - 2]
    plain = encode_header("update", {"mode": "trainable", "version": 3}, specs, 3)
    assert VersionedHeader.stem(plain, msgpack.unpackb(plain)) is None  # (its "a" comes last)


def test_packed_decoder_keeps_views_per_place_only_while_the_layout_holds():
    """With a `key` (a shared-memory slot) the arrays of a place are made once and handed out again: they view the
    same bytes, so a new message written there reads through them. A look-alike (same lengths, other names) or a
    new layout at that place gets fresh, fully checked arrays."""
    rng = np.random.default_rng(1)
    place = np.zeros(4096, np.uint8)  # one fixed buffer, rewritten in place like a slot

    def write(arrays, seq):
        packed = pack_frames(encode("update", {}, arrays, seq))
        place[:len(packed)] = packed
        return place[:len(packed)]

    decoder = PackedDecoder(as_torch=True)
    a = {"w0": rng.random(8).astype(np.float32), "w1": rng.random(3).astype(np.float32)}
    first = decoder(write(a, 1), key=0)
    b = {k: v + 1 for k, v in a.items()}
    second = decoder(write(b, 2), key=0)
    assert second.seq == 2 and all(second.arrays[k] is first.arrays[k] for k in a)  # the kept views ...
    assert all(np.array_equal(second.arrays[k].numpy(), b[k]) for k in b)  # ... read the new bytes
    renamed = {"w9": b["w0"], "w1": b["w1"]}
    third = decoder(write(renamed, 3), key=0)
    assert list(third.arrays) == ["w9", "w1"] and third.arrays["w1"] is not first.arrays["w1"]
    other = decoder(write({"x": np.arange(5, dtype=np.int64)}, 4), key=0)
    assert other.arrays["x"].tolist() == [0, 1, 2, 3, 4]
    again = decoder(write(a, 5), key=0)  # back to the first layout: checked and made anew, then kept
    assert all(np.array_equal(again.arrays[k].numpy(), a[k]) for k in a)
    assert decoder(write(a, 6), key=0).arrays["w0"] is again.arrays["w0"]
    assert decoder(write(a, 7)).arrays["w0"] is not again.arrays["w0"]  # no key: nothing is kept


def test_receiver_rejects_1000_malformed_frames_and_keeps_serving():
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint, max_message_bytes=2**20, auto_ack=True)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(endpoint)
    try:
        # after each bad frame a good item of the same session (a fresh seq): the receiver still serves, and the bad
        # frame marked nothing as delivered
        for i, frames in enumerate(malformed_messages(random.Random(1), 1000)):
            raw.send_multipart(frames)
            raw.send_multipart(encode("data", {"session": "s", "items": [[100 + i, {"i": i}]]},
                                      {"0.x": np.arange(3) + i}))
            msg = rx.recv(timeout=20)  # one peer's messages arrive in order: the good one after the bad one
            assert msg is not None and (msg.seq, msg.meta["i"]) == (100 + i, i)
            assert (msg.arrays["x"] == np.arange(3) + i).all()
            assert rx.stats.bad_frames == i + 1, i
        # the seq the malformed frames carried was never taken for delivered
        raw.send_multipart(encode("data", {"session": "s", "items": [[1, {"hello": 1}]]}, {"0.x": np.arange(3)}))
        msg = rx.recv(timeout=20)
        assert msg is not None and msg.seq == 1 and msg.meta["hello"] == 1
        assert rx.stats.bad_frames == 1000 and rx.stats.received == 1001
        tx = DataSender(endpoint)
        seq = tx.send({"hello": 2}, {"x": np.arange(3)})
        assert rx.recv(timeout=5).seq == seq and tx.flush(5)
        tx.close()
    finally:
        raw.close(linger=0)
        rx.close()


def test_duplicates_are_acknowledged_but_delivered_once():
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint)
    tx = DataSender(endpoint, resend_after=0.05)
    tx.send({}, {"x": np.arange(3)})
    first = rx.recv(5)
    time.sleep(0.2)
    tx.poll(0)  # resends: the item is not acknowledged yet
    assert rx.recv(0.5) is None and rx.stats.duplicates == 1  # being stored: the resend is dropped, not acked
    tx.poll(0.3)  # (reads any ack the receiver sent: there must be none yet)
    assert tx.pending and tx.stats.acked == 0
    rx.ack(first)  # stored: acknowledged now, and any later copy is acknowledged again
    time.sleep(0.2)
    tx.poll(0.2)
    assert not tx.pending
    tx.close()
    rx.close()


def test_a_restarted_receiver_drops_what_its_consumer_had_stored():
    """`delivered`: a consumer that stored an item but died before acknowledging it tells the new receiver so; the
    sender's resend is acknowledged and never delivered a second time, and later items still are."""
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint)
    tx = DataSender(endpoint, resend_after=0.05)
    tx.send({}, {"x": np.arange(3)})
    stored = rx.recv(5)
    rx.close()  # the consumer stored it; the receiver died before its ack went out
    rx = DataReceiver(endpoint, delivered=[(stored.meta["session"], stored.seq)])
    try:
        deadline = time.monotonic() + 10
        while tx.pending and time.monotonic() < deadline:
            tx.poll(0.1)  # resends, and reads the new receiver's ack
            assert rx.recv(0.1) is None  # never the stored item again
        assert not tx.pending and rx.stats.duplicates >= 1
        tx.send({}, {"x": np.arange(3) + 1})
        assert int(rx.recv(5).arrays["x"][0]) == 1
    finally:
        tx.close()
        rx.close()


def test_a_released_item_is_delivered_again_on_its_resend():
    # a consumer that could not store an item (a full disk) releases it: the sender's resend is delivered anew,
    # not dropped as a duplicate, and items delivered around it are not
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint)
    tx = DataSender(endpoint, resend_after=0.05)
    for i in range(3):
        tx.send({"i": i}, {"x": np.arange(3) + i})
    tx.poll(0.01)  # items 1 and 2 wait in a batch while item 0 is unacknowledged: send it
    got = [rx.recv(5) for _ in range(3)]
    assert [m.meta["i"] for m in got] == [0, 1, 2]
    rx.ack(got[0])
    rx.ack(got[2])
    rx.release(got[1])
    time.sleep(0.2)
    tx.poll(0)  # resends item 1, the one not acknowledged
    again = rx.recv(5)
    assert again is not None and again.meta["i"] == 1 and (again.arrays["x"] == np.arange(3) + 1).all()
    rx.ack(again)
    assert rx.recv(0.3) is None  # the resent batch's copy of item 2: a duplicate (the acks go out meanwhile)
    tx.poll(0.5)
    assert not tx.pending and rx.stats.received == 4
    tx.close()
    rx.close()


def _peer(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.helpers.transport_peer", *map(str, args)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _check_delivery(log: Path, acked_path: Path, n: int) -> None:
    lines = [l.split() for l in log.read_text().splitlines() if l.endswith(" ok")]
    seqs = [int(p[1]) for p in lines]
    assert len(seqs) == len(set(seqs)), f"{len(seqs) - len(set(seqs))} items delivered twice"
    assert len({p[0] for p in lines}) == 1  # one sender session, resumed from its spool
    acked = {int(l) for l in acked_path.read_text().split()}
    assert acked <= set(seqs), "an acknowledged item is missing"
    assert set(seqs) == set(range(n))


@pytest.mark.parametrize("victim", ["receiver", "sender"])
def test_kill_9_either_side_loses_no_acked_item_and_duplicates_none(tmp_path, victim):
    endpoint, n = free_endpoint(), 400
    log, acked, spool = tmp_path / "consumer.log", tmp_path / "acked.txt", tmp_path / "spool"
    rx = _peer("receiver", endpoint, log)
    tx = _peer("sender", endpoint, spool, acked, n)
    progress_file = log if victim == "receiver" else acked  # items stored / acknowledged so far

    def progress() -> int:
        return progress_file.read_text().count("\n") if progress_file.exists() else 0

    try:
        rng = random.Random(victim)
        kills = []
        for target in sorted(rng.sample(range(n // 10, 8 * n // 10), 3)):  # mid-stream, at random points
            deadline = time.monotonic() + 120
            while progress() < target:
                assert time.monotonic() < deadline, f"stuck at {progress()} of {target} items"
                time.sleep(0.002)
            proc = rx if victim == "receiver" else tx
            assert proc.poll() is None, "the victim ended before its kill"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(progress())
            time.sleep(0.3)
            if victim == "receiver":
                rx = _peer("receiver", endpoint, log)
            else:
                tx = _peer("sender", endpoint, spool, acked, n)
        assert tx.wait(timeout=120) == 0
        assert len(kills) == 3 and all(0 < k < n for k in kills), kills  # three kills, each mid-stream
    finally:
        for p in (rx, tx):
            if p.poll() is None:
                p.kill()
                p.wait()
    _check_delivery(log, acked, n)


def test_latest_only_broadcast():
    endpoint = free_endpoint()
    pub, sub = Publisher(endpoint), Subscriber(endpoint)
    try:
        time.sleep(0.3)  # let the subscription reach the publisher
        for version in range(1, 51):
            pub.publish(version, {"note": "w"}, {"w": np.full(1000, version, np.float32)})
        time.sleep(0.5)  # the burst has arrived: one call must return the newest, not work through a backlog
        msg = sub.latest(1.0)
        assert msg.seq == 50 and msg.meta["version"] == 50 and msg.arrays["w"][0] == 50
        assert sub.latest(0.1) is None  # nothing newer
        skipped = sub.stats.skipped_versions
        pub.publish(51, {}, {"w": np.zeros(2, np.float32)})
        assert sub.latest(2).seq == 51 and sub.stats.skipped_versions == skipped
        received = sub.stats.received
        pub.publish(49, {}, {"w": np.zeros(2, np.float32)})  # an older version (e.g. a restarted publisher)
        deadline = time.monotonic() + 5
        while sub.stats.received == received:  # it did arrive, and was ignored
            assert sub.latest(0.05) is None and time.monotonic() < deadline
        assert sub.last_version == 51
    finally:
        pub.close()
        sub.close()


SPEC = {"obs": {"state": [8], "main": [128, 128, 3]}, "action": [7], "control_hz": 10}


def test_a_peer_of_another_protocol_version_is_refused_in_so_many_words():
    endpoint = free_endpoint()
    server = RpcServer(endpoint, SPEC).start()
    future = zmq.Context.instance().socket(zmq.DEALER)  # a client of the next protocol version
    future.setsockopt(zmq.LINGER, 0)
    future.connect(endpoint)
    try:
        header = msgpack.packb({"v": PROTOCOL_VERSION + 1, "t": "hello", "s": 7, "m": {}, "a": []})
        future.send_multipart([header])
        assert future.poll(5000), "no answer: the client would only see a timeout"
        reply = decode(future.recv_multipart())  # in our version: that itself tells the peer which we speak
        assert reply.type == "error" and reply.seq == 7 and reply.meta["protocol"] == PROTOCOL_VERSION
        assert f"protocol version {PROTOCOL_VERSION + 1}" in reply.meta["error"] and server.stats.refused == 1
    finally:
        future.close()
        server.close()
    old_server = zmq.Context.instance().socket(zmq.ROUTER)  # and a server of another version, seen by our client
    old_server.setsockopt(zmq.LINGER, 0)
    port = old_server.bind_to_random_port("tcp://127.0.0.1")
    client = RpcClient(f"tcp://127.0.0.1:{port}", SPEC)
    try:
        answer = threading.Thread(target=lambda: old_server.send_multipart(
            [old_server.recv_multipart()[0], msgpack.packb({"v": 0, "t": "ok", "s": 1, "m": {}, "a": []})]))
        answer.start()
        with pytest.raises(HandshakeError, match="server speaks protocol version 0"):
            client.hello(timeout=5.0)
        answer.join(5)
    finally:
        client.close()
        old_server.close()


def test_malformed_acks_are_dropped_and_the_sender_goes_on():
    rx = zmq.Context.instance().socket(zmq.ROUTER)
    rx.setsockopt(zmq.LINGER, 0)
    port = rx.bind_to_random_port("tcp://127.0.0.1")
    tx = DataSender(f"tcp://127.0.0.1:{port}")
    try:
        tx.send({"i": 0}, {"x": np.arange(3)})
        assert rx.poll(5000)
        peer = rx.recv_multipart()[0]
        for seqs in (5, [[0]], ["0"], [0]):  # the last one is good
            rx.send_multipart([peer, *encode("ack", {"session": tx.session, "seqs": seqs})])
        deadline = time.monotonic() + 5
        while tx.pending and time.monotonic() < deadline:
            tx.poll(0.05)
        assert not tx.pending and tx.stats.acked == 1
    finally:
        tx.close()
        rx.close()


def test_receivers_cap_the_frame_size_zmq_reads_into_memory():
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint, max_message_bytes=1 << 20)
    server = RpcServer(free_endpoint(), SPEC, max_message_bytes=1 << 20)
    sub = Subscriber(free_endpoint(), max_message_bytes=1 << 20)
    client = RpcClient(endpoint, SPEC, max_message_bytes=1 << 20)
    try:
        for sock in (rx.sock, server.sock, sub.sock, client.sock):
            assert sock.getsockopt(zmq.MAXMSGSIZE) == 3 << 20
    finally:
        for closable in (rx, server, sub, client):
            closable.close()


def test_rpc_handshake_calls_deadlines_and_heartbeats():
    endpoint = free_endpoint()
    server = RpcServer(endpoint, SPEC, {"double": lambda m: ({"y": m.meta["x"] * 2}, {"a": m.arrays["a"] * 2})},
                       peer_timeout=0.5).start()
    try:
        client = RpcClient(endpoint, SPEC, client_id="robot-1")
        assert client.hello()["protocol"] == PROTOCOL_VERSION
        reply = client.call("double", {"x": 3}, {"a": np.arange(3)})
        assert reply.meta["y"] == 6 and reply.arrays["a"].tolist() == [0, 2, 4]
        assert client.heartbeat() < 1.0 and server.peers() == ["robot-1"]
        with pytest.raises(Exception, match="unknown method 'nope'"):
            client.call("nope")
        other = RpcClient(endpoint, {**SPEC, "action": [6]}, client_id="robot-2")
        with pytest.raises(HandshakeError, match=r'"action": \{"server": \[7\], "client": \[6\]\}'):
            other.hello()
        time.sleep(0.8)
        assert server.peers() == [] and server.stats.peers_dropped >= 1  # silent peers are dropped
    finally:
        server.close()
    start = time.monotonic()
    with pytest.raises(TransportTimeout, match="within 0.5 s"):
        client.call("double", {"x": 1}, {"a": np.arange(1)}, timeout=0.5)
    assert time.monotonic() - start < 1.5


def test_curve_rejects_unknown_clients_and_accepts_known_ones(tmp_path):
    make_keypair(tmp_path / "server", "learner")
    make_keypair(tmp_path / "allowed", "robot")
    make_keypair(tmp_path / "strangers", "intruder")
    endpoint = free_endpoint()
    server = RpcServer(endpoint, SPEC, curve=CurveConfig(
        secret_key_file=str(tmp_path / "server/learner.key_secret"), allowed_clients_dir=str(tmp_path / "allowed")),
    ).start()
    try:
        def client(keydir, name, at=endpoint):
            return RpcClient(at, SPEC, curve=CurveConfig(
                secret_key_file=str(tmp_path / keydir / f"{name}.key_secret"),
                server_public_key_file=str(tmp_path / "server/learner.key")))

        with pytest.raises(TransportTimeout):
            client("strangers", "intruder").hello(timeout=1.0)
        assert client("allowed", "robot").hello(timeout=5.0)["protocol"] == PROTOCOL_VERSION
        with pytest.raises(TransportTimeout):  # and again now that the server is shown to answer
            client("strangers", "intruder").hello(timeout=1.0)
        with pytest.raises(TransportTimeout):  # no keys at all: plain TCP to a Curve server goes nowhere
            RpcClient(endpoint, SPEC).hello(timeout=1.0)
        # a second server in the same process with its own allow-list: each checks its own list
        make_keypair(tmp_path / "second_allowed", "other_robot")
        second_endpoint = free_endpoint()
        second = RpcServer(second_endpoint, SPEC, curve=CurveConfig(
            secret_key_file=str(tmp_path / "server/learner.key_secret"),
            allowed_clients_dir=str(tmp_path / "second_allowed"))).start()
        try:
            with pytest.raises(TransportTimeout):
                client("allowed", "robot", second_endpoint).hello(timeout=1.0)  # on the first server's list only
            assert client("second_allowed", "other_robot", second_endpoint).hello(timeout=5.0)["protocol"] == \
                PROTOCOL_VERSION
            with pytest.raises(TransportTimeout):
                client("second_allowed", "other_robot").hello(timeout=1.0)
            assert client("allowed", "robot").hello(timeout=5.0)["protocol"] == PROTOCOL_VERSION
        finally:
            second.close()
    finally:
        server.close()


def test_curve_weights_reach_known_subscribers_only(tmp_path):
    """The weight broadcast under CurveZMQ: a subscriber with an allowed key gets the versions, one with an unknown
    key (or none) gets nothing."""
    make_keypair(tmp_path / "server", "learner")
    make_keypair(tmp_path / "allowed", "robot")
    make_keypair(tmp_path / "strangers", "intruder")
    endpoint = free_endpoint()
    pub = Publisher(endpoint, curve=CurveConfig(secret_key_file=str(tmp_path / "server/learner.key_secret"),
                                                allowed_clients_dir=str(tmp_path / "allowed")))

    def subscriber(keydir, name):
        return Subscriber(endpoint, curve=CurveConfig(secret_key_file=str(tmp_path / keydir / f"{name}.key_secret"),
                                                      server_public_key_file=str(tmp_path / "server/learner.key")))

    known, stranger, plain = subscriber("allowed", "robot"), subscriber("strangers", "intruder"), Subscriber(endpoint)
    try:
        got = {"known": None, "stranger": None, "plain": None}
        deadline = time.monotonic() + 10
        version = 0
        while got["known"] is None and time.monotonic() < deadline:
            version += 1
            pub.publish(version, arrays={"x": np.arange(3)})
            got = {name: sub.latest(timeout=0.1) or got[name]
                   for name, sub in (("known", known), ("stranger", stranger), ("plain", plain))}
        assert got["known"] is not None and (got["known"].arrays["x"] == np.arange(3)).all()
        for _ in range(10):  # the others keep getting nothing while the known one is served
            version += 1
            pub.publish(version, arrays={"x": np.arange(3)})
            assert known.latest(timeout=0.2) is not None
            assert stranger.latest(timeout=0.05) is None and plain.latest(timeout=0.05) is None
        assert got["stranger"] is None and got["plain"] is None
    finally:
        for sub in (known, stranger, plain):
            sub.close()
        pub.close()


def test_a_context_that_hosted_curve_servers_terminates_once_they_are_closed(tmp_path):
    """The ZAP handler's thread holds a socket of the context: the last CurveZMQ server to close stops it, so
    `ctx.term()` returns (it waited forever), while a server still open keeps it (and its clients' checks) going."""
    make_keypair(tmp_path / "server", "learner")
    make_keypair(tmp_path / "allowed", "robot")
    curve = CurveConfig(secret_key_file=str(tmp_path / "server/learner.key_secret"),
                        allowed_clients_dir=str(tmp_path / "allowed"))
    ctx = zmq.Context()
    for _ in range(50):  # a handler's fixed inproc address is freed a moment after it stops: the next one waits for it
        Publisher(free_endpoint(), curve=curve, ctx=ctx).close()
    endpoint = free_endpoint()
    pub = Publisher(endpoint, curve=curve, ctx=ctx)  # a server opened after one closed: the handler serves it
    sub = Subscriber(endpoint, curve=CurveConfig(secret_key_file=str(tmp_path / "allowed/robot.key_secret"),
                                                 server_public_key_file=str(tmp_path / "server/learner.key")))
    try:
        msg, deadline = None, time.monotonic() + 10
        while msg is None and time.monotonic() < deadline:
            pub.publish(1, arrays={"x": np.arange(3)})
            msg = sub.latest(timeout=0.2)
        assert msg is not None and msg.seq == 1
    finally:
        sub.close()
        pub.close()
    assert terminates(ctx), "ctx.term() still waits for the ZAP handler"


def test_a_curve_server_dropped_without_close_socket_stops_its_handler_when_collected(tmp_path):
    """A server socket that is garbage-collected instead of closed through `close_socket` (pyzmq closes it then)
    leaves the bookkeeping too: the context's ZAP handler stops and `ctx.term()` returns, and its socket id, free
    for reuse, no longer names it."""
    import gc
    import warnings

    from common import transport

    make_keypair(tmp_path / "server", "learner")
    make_keypair(tmp_path / "allowed", "robot")
    curve = CurveConfig(secret_key_file=str(tmp_path / "server/learner.key_secret"),
                        allowed_clients_dir=str(tmp_path / "allowed"))
    ctx = zmq.Context()
    sock = make_socket(zmq.PUB, free_endpoint(), bind=True, curve=curve, ctx=ctx)
    key = id(sock)
    assert key in transport._curve_servers and id(ctx) in transport._authenticators
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # pyzmq's "unclosed socket": the point of this test
        del sock
        gc.collect()
    assert key not in transport._curve_servers and id(ctx) not in transport._authenticators
    assert terminates(ctx), "ctx.term() still waits for the ZAP handler of a collected server"


def test_a_server_refused_for_a_bad_key_leaves_no_socket_open(tmp_path):
    """A public key given where the secret one belongs is refused with a message, and the socket made for it is closed
    (left open, it would keep `ctx.term()` waiting)."""
    make_keypair(tmp_path / "server", "learner")
    make_keypair(tmp_path / "allowed", "robot")
    ctx = zmq.Context()
    bad = CurveConfig(secret_key_file=str(tmp_path / "server/learner.key"),  # the public half
                      allowed_clients_dir=str(tmp_path / "allowed"))
    with pytest.raises(ValueError, match="no secret key") as refused:  # held, as a caller that logs it would
        Publisher(free_endpoint(), curve=bad, ctx=ctx)
    assert terminates(ctx), f"a socket of the refused server is still open ({refused.value})"


def test_a_bad_or_taken_endpoint_is_refused_with_its_name_and_leaves_no_socket_open():
    ctx = zmq.Context()
    taken = free_endpoint()
    first = Publisher(taken, ctx=ctx)
    errors = []
    for make in (lambda: Publisher("tcp://127.0.0.1:notaport", ctx=ctx), lambda: Publisher(taken, ctx=ctx),
                 lambda: Subscriber("tpc://127.0.0.1:5555", ctx=ctx)):
        with pytest.raises(EndpointError, match="an endpoint looks like tcp://HOST:PORT") as refused:
            make()
        errors.append(refused)  # held, as a caller that logs them would
    assert "notaport" in str(errors[0].value) and taken in str(errors[1].value) and "tpc://" in str(errors[2].value)
    first.close()
    assert terminates(ctx), "a refused socket is still open"


def test_keygen_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "common.transport", "keygen", str(tmp_path), "robot1"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert (tmp_path / "robot1.key").exists() and (tmp_path / "robot1.key_secret").stat().st_mode & 0o777 == 0o600
    assert "public key" in out


def test_bursts_of_mixed_items_arrive_intact():
    """Under load items travel in batches: stacked when they share array shapes, one by one inside the batch when
    they do not. Either way each item comes out as it went in."""
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint, auto_ack=True)
    tx = DataSender(endpoint, resend_after=5.0)
    try:
        time.sleep(0.2)
        sent = {}
        for i in range(300):
            arrays = {"img": np.full((4, 4, 3), i % 256, np.uint8)} if i % 3 else {"v": np.arange(i % 7 + 1)}
            sent[tx.send({"i": i}, arrays)] = (i, arrays)
        got = {}
        deadline = time.monotonic() + 10
        while len(got) < 300 and time.monotonic() < deadline:
            tx.poll(0.001)  # the sender's loop: sends the lingering batch, reads acknowledgements
            msg = rx.recv(timeout=0.01)
            if msg is not None:
                got[msg.seq] = msg
        assert tx.flush(5) and tx.stats.batches < 300  # some items shared a message
        for seq, (i, arrays) in sent.items():
            assert got[seq].meta["i"] == i and got[seq].arrays.keys() == arrays.keys()
            for k, v in arrays.items():
                assert np.array_equal(got[seq].arrays[k], v)
    finally:
        tx.close()
        rx.close()


def test_hostile_shapes_and_floods_do_not_stop_servers():
    bad = msgpack.packb({"v": PROTOCOL_VERSION, "t": "hello", "s": 1, "m": {}, "a": [["x", "|u1", [2**63, 0]]]})
    with pytest.raises(FrameError):
        decode([bad, b""])
    endpoint = free_endpoint()
    server = RpcServer(endpoint, SPEC).start()
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(endpoint)
    try:
        raw.send_multipart([bad, b""])
        time.sleep(0.2)
        assert RpcClient(endpoint, SPEC).hello()["protocol"] == PROTOCOL_VERSION  # still serving
    finally:
        raw.close(linger=0)
        server.close()
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint)
    flood = zmq.Context.instance().socket(zmq.DEALER)
    flood.connect(endpoint)
    tx = None
    try:
        for _ in range(3000):
            flood.send_multipart([b"junk"])
        time.sleep(0.3)
        start = time.monotonic()
        assert rx.recv(timeout=0.05) is None
        assert time.monotonic() - start < 0.5  # the deadline holds under a flood of bad frames
        assert rx.stats.bad_frames > 0  # the flood did arrive
        tx = DataSender(endpoint)  # and a good sender is served behind it
        seq = tx.send({"after": "flood"}, {"x": np.arange(3)})
        deadline, msg = time.monotonic() + 20, None
        while msg is None and time.monotonic() < deadline:
            msg = rx.recv(timeout=0.5)
        assert msg is not None and msg.seq == seq and msg.meta["after"] == "flood"
    finally:
        flood.close(linger=0)
        if tx is not None:
            tx.close()
        rx.close()


def test_rpc_client_never_blocks_while_the_server_is_down():
    client = RpcClient(free_endpoint(), SPEC)
    start = time.monotonic()
    for _ in range(1200):  # more than ZMQ's default queue of 1000 unsent messages
        with pytest.raises(TransportTimeout):
            client.call("heartbeat", timeout=0.001)
    assert time.monotonic() - start < 30


def test_spool_recovers_next_seq_from_spooled_batches(tmp_path):
    endpoint = free_endpoint()
    tx = DataSender(endpoint, spool_dir=tmp_path)
    for i in range(3):
        tx.send({"i": i}, {"x": np.arange(2)})
    tx.close()
    (tmp_path / "session.json").write_text('{"session": "%s", "next_seq": 1}' % tx.session)  # as if torn
    again = DataSender(endpoint, spool_dir=tmp_path)
    assert set(again.pending) == {0, 1, 2} and again.next_seq == 3
    assert again.send({}, {"x": np.arange(2)}) == 3
    again.close()


def test_bad_items_fail_in_send_and_lose_nothing_queued():
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint, auto_ack=True, max_message_bytes=1 << 20)
    tx = DataSender(endpoint, max_message_bytes=1 << 20)
    try:
        time.sleep(0.2)
        tx.send({"i": 0}, {"x": np.arange(3)})
        with pytest.raises(ValueError, match="exceeds max_message_bytes"):
            tx.send({"i": 1}, {"x": np.zeros(1 << 20, np.uint8)})
        with pytest.raises(TypeError, match="cannot be framed"):
            tx.send({"i": 2}, {"x": np.array(["text"])})
        # meta the receiver would refuse (then every resend of its batch, and every item batched with it, is lost),
        # or that cannot be packed at all (which jammed the sender): refused in send, nothing queued
        for bad, said in (({"i": 4, "per_joint": {3: 0.5}}, "keys must be strings"),
                          ({"i": 5, "note": "x" * (1 << 20 | 1)}, "would refuse"),
                          ({"i": 6, "score": np.float32(0.5)}, "numpy scalars"),
                          ({"i": 7, "blob": b"x" * (1000 << 10)}, "bytes of meta exceeds")):
            with pytest.raises(ValueError, match=said):
                tx.send(bad, {"x": np.arange(3)})
        meta = {"i": 3}
        tx.send(meta, {"x": torch.ones(2, dtype=torch.bfloat16)})
        meta["i"] = 99  # the sender keeps its own copy
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            tx.poll(0.01)
            msg = rx.recv(0.01)
            if msg is not None:
                got.append(msg.meta["i"])
        assert got == [0, 3] and tx.flush(5) and rx.stats.bad_frames == 0
    finally:
        tx.close()
        rx.close()


def _receive(tx: DataSender, rx: DataReceiver, n: int, seconds: float = 10.0) -> dict:
    got, deadline = {}, time.monotonic() + seconds
    while len(got) < n and time.monotonic() < deadline:
        tx.poll(0.001)
        msg = rx.recv(timeout=0.01)
        if msg is not None:
            got[msg.seq] = msg
    return got


def test_items_without_arrays_are_delivered_alone_and_in_batches():
    """A meta-only item is a header-only message: it must not be taken for a broken packed batch (it was dropped as a
    bad frame and resent for ever)."""
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint, auto_ack=True)
    tx = DataSender(endpoint, resend_after=5.0)
    try:
        time.sleep(0.2)
        seqs = [tx.send({"episode_done": i}) for i in range(20)]  # the first alone, the rest batched behind it
        got = _receive(tx, rx, 20)
        assert sorted(got) == seqs and [got[s].meta["episode_done"] for s in seqs] == list(range(20))
        assert all(not got[s].arrays for s in seqs) and rx.stats.bad_frames == 0 and tx.flush(5)
    finally:
        tx.close()
        rx.close()


def test_the_caller_may_refill_its_arrays_right_after_send():
    """Items that wait for a batch (something is unacknowledged) are copied in send, not when the batch leaves."""
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint, auto_ack=True)
    tx = DataSender(endpoint, resend_after=5.0, linger=10.0)
    try:
        time.sleep(0.2)
        buf, tensor = np.zeros(3, np.float32), torch.zeros(2)
        for i in range(6):  # item 0 goes out at once; 1..5 wait behind it (no ack read yet)
            buf[:] = i
            tensor[:] = i
            arrays = {"x": buf} if i != 4 else {"x": buf, "t": tensor}  # item 4: another layout mid-batch
            tx.send({"i": i}, arrays)
        buf[:], tensor[:] = -1, -1
        got = _receive(tx, rx, 6)
        assert [got[s].meta["i"] for s in sorted(got)] == list(range(6))
        for s in sorted(got):
            assert np.array_equal(got[s].arrays["x"], np.full(3, got[s].meta["i"], np.float32)), got[s].meta
        assert np.array_equal(got[4].arrays["t"], np.full(2, 4, np.float32)) and tx.flush(5)
    finally:
        tx.close()
        rx.close()


def test_a_spooled_item_survives_a_kill_right_after_send(tmp_path):
    """With a spool, send() returning means the item is on disk: a sender that dies before its next poll (here: never
    closed) loses nothing it accepted."""
    endpoint = free_endpoint()
    sender = (f"import os, signal, sys, numpy as np; sys.path.insert(0, {str(ROOT)!r})\n"
              "from common.transport import DataSender\n"
              f"tx = DataSender({endpoint!r}, spool_dir={str(tmp_path)!r})  # no receiver: nothing is acknowledged\n"
              "for i in range(4): tx.send({'i': i}, {'x': np.arange(3) + i})\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", sender], timeout=60).returncode == -signal.SIGKILL
    again = DataSender(endpoint, spool_dir=tmp_path)  # what a restart after kill -9 finds
    assert sorted(again.pending) == [0, 1, 2, 3] and again.next_seq == 4
    with pytest.raises(TransportError, match="in use by another DataSender"):  # one sender per spool
        DataSender(endpoint, spool_dir=tmp_path)
    rx = DataReceiver(endpoint, auto_ack=True)
    try:
        got = _receive(again, rx, 4, seconds=10.0)  # resent from the spool
        assert sorted(got) == [0, 1, 2, 3] and all(np.array_equal(got[s].arrays["x"], np.arange(3) + s) for s in got)
    finally:
        again.close()
        rx.close()
    DataSender(endpoint, spool_dir=tmp_path).close()  # closed: the spool is free again


def test_an_idle_spell_longer_than_peer_timeout_is_not_an_outage():
    endpoint = free_endpoint()
    rx = DataReceiver(endpoint, auto_ack=True)
    tx = DataSender(endpoint, peer_timeout=0.5)
    try:
        time.sleep(0.2)
        tx.send({"i": 0}, {"x": np.arange(2)})
        assert len(_receive(tx, rx, 1)) == 1 and tx.flush(5)
        time.sleep(0.8)  # nothing to send for longer than peer_timeout: the receiver is fine
        tx.send({"i": 1}, {"x": np.arange(2)})
        tx.poll(0)
        assert tx.stats.outages == 0
        assert len(_receive(tx, rx, 1)) == 1 and tx.flush(5) and tx.stats.outages == 0
    finally:
        tx.close()
        rx.close()


def test_an_outage_does_not_queue_a_flood_of_resends_and_a_spool_error_names_its_file(tmp_path):
    # While the receiver is away, what was sent waits in ZMQ's queue: once the outage is declared the sender probes
    # with its oldest batch, less and less often, instead of queueing every batch again each round (which arrived as
    # hundreds of duplicates when the receiver came back). Every item still arrives.
    endpoint = free_endpoint()
    tx = DataSender(endpoint, resend_after=0.05, peer_timeout=0.2)
    for i in range(5):
        tx.send({"i": i}, {"x": np.arange(2) + i})
    end = time.monotonic() + 3.0
    while time.monotonic() < end:  # 3 s with nobody there: 60 resend rounds
        tx.poll(0.01)
    assert tx.stats.outages == 1 and tx.stats.resent <= 20, tx.stats.resent  # (every batch each round: ~120)
    rx = DataReceiver(endpoint, auto_ack=True)
    try:
        got = _receive(tx, rx, 5)
        assert sorted(m.meta["i"] for m in got.values()) == list(range(5))
        deadline = time.monotonic() + 5
        while tx.pending and time.monotonic() < deadline:  # the queued copies drain, every item is acknowledged
            tx.poll(0.01)
            rx.recv(0.01)
        assert not tx.pending and rx.stats.duplicates <= 40, rx.stats.duplicates  # (was ~300)
    finally:
        tx.close()
        rx.close()
    # a spool file that does not decode: the error names it, and the failed start leaves the spool free
    spool = tmp_path / "spool"
    DataSender(endpoint, spool_dir=spool).close()
    (spool / "000000000000.msg").write_bytes(b"garbage")
    for _ in range(2):
        with pytest.raises(TransportError, match="000000000000.msg is unreadable"):
            DataSender(endpoint, spool_dir=spool)


def test_construction_errors_leave_the_endpoint_free_and_negative_waits_return():
    """A malformed `delivered` list or an unhashable spec is refused before the socket binds (the endpoint stays
    free for the next try); a negative timeout is a zero wait, where ZMQ would read it as forever."""
    endpoint = free_endpoint()
    with pytest.raises(TypeError):
        DataReceiver(endpoint, delivered=[("session", None)])
    with pytest.raises(TypeError):
        RpcServer(endpoint, spec={1: "a", "b": 2})
    rx = DataReceiver(endpoint)
    rx.close()
    server, sub = RpcServer(free_endpoint(), spec={"a": 1}), Subscriber(free_endpoint())
    results = []
    waiter = threading.Thread(target=lambda: results.extend([server.serve_once(timeout=-1), sub.latest(timeout=-1)]),
                              daemon=True)
    waiter.start()
    waiter.join(5.0)
    server.close()
    sub.close()
    assert results == [False, None], "a negative timeout waited"
