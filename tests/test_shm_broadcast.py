"""Weight sync through shared memory (`shm://` endpoints, common.shm_broadcast): exact values, slots never rewritten
under a reader (in-process and from another process, also while a publisher hammers the channel), dead readers and
publishers, a message that outgrows the slots, malformed slots, refused configurations."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from common.shm_broadcast import ShmError, ShmPublisher, ShmSubscriber, W_LATEST_SLOT, shm_dir
from common.weight_sync import WeightPublisher, WeightSubscriber
from tests.test_weight_sync import Policy, perturb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def name():
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    for suffix in ("", ".owner"):
        (shm_dir() / f"rlx-{name}{suffix}").unlink(missing_ok=True)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def held_slots(pub: WeightPublisher) -> int:
    m = pub.shm._map
    with m.lock():
        return bin(m.held_mask(check_alive=True) | 1 << int(m.ctl[W_LATEST_SLOT])).count("1")


@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("flatten", [False, True])
def test_shm_sync_is_exact_and_zero_copy_views_the_slot(name, zero_copy, flatten):
    learner, actor = Policy(), Policy()
    pub = WeightPublisher(f"shm://{name}", learner, flatten=flatten)
    sub = WeightSubscriber(f"shm://{name}", actor, zero_copy=zero_copy)
    try:
        assert not sub.poll(0.0)  # nothing published yet, no file yet: no error
        # versions whose encodings differ in length: the header, and maybe where the arrays start, move
        versions = (1, 2, 3, 127, 128, 255, 256, 65535, 65536, 2**32)
        for i, v in enumerate(versions):
            perturb(learner, float(i))
            assert pub.publish(version=v) == v
            assert sub.poll(1.0) and sub.apply() == v
            assert same(actor, learner)
        in_slots = sub.sub._map is not None and all(
            sub.sub._map.base_ptr <= p.data_ptr() < sub.sub._map.base_ptr + sub.sub._map.data.nbytes
            for p in actor.parameters())
        assert in_slots == zero_copy
        assert held_slots(pub) <= 2  # the latest and, zero-copy, the one the actor views (the same here)
        pub.publish(version=3)  # an old version is never applied over a newer one
        assert not sub.poll(0.2) and sub.version == 2**32
    finally:
        pub.close()
        sub.close()


def test_a_held_slot_is_never_rewritten(name):
    """The actor keeps using version 1 (zero-copy) while 50 newer versions go by, and an update it took but has
    not applied stays intact: the publisher only ever writes the other slots."""
    learner, actor = Policy(), Policy()
    pub = WeightPublisher(f"shm://{name}", learner, flatten=True)
    sub = WeightSubscriber(f"shm://{name}", actor, zero_copy=True)
    try:
        perturb(learner, 1.0)
        pub.publish()
        assert sub.poll(1.0) and sub.apply() == 1
        perturb(learner, 2.0)
        pub.publish()
        assert sub.poll(1.0)  # version 2 taken, not applied
        for v in range(3, 53):
            perturb(learner, float(v))
            pub.publish()
            assert all((p == 1.0).all() for p in actor.parameters())
            assert all((t == 2.0).all() for t in sub._pending.arrays.values())
        assert held_slots(pub) == 3 and pub.shm.slots == 14
        sub.apply()  # version 2, then the newest
        assert all((p == 2.0).all() for p in actor.parameters())
        assert sub.poll(1.0) and sub.apply() == 52 and same(actor, learner)
        assert sub.stats["coalesced"] == 49
    finally:
        pub.close()
        sub.close()


def test_only_changed_deltas_over_shm_keep_few_slots(name):
    learner, actor = Policy(), Policy()
    pub = WeightPublisher(f"shm://{name}", learner, mode="trainable", only_changed=True, keyframe_every=5)
    sub = WeightSubscriber(f"shm://{name}", actor, zero_copy=True)
    learner.vlm.requires_grad_(False)
    try:
        for v in range(1, 23):
            with torch.no_grad():
                learner.expert.weight.add_(1.0)
            pub.publish()
            assert sub.poll(1.0) and sub.apply() == v
            assert torch.equal(actor.expert.weight, learner.expert.weight)
            assert torch.equal(actor.expert.bias, learner.expert.bias)
            assert held_slots(pub) <= 2  # deltas are cloned: the parameters view at most the keyframe's slot
            # the unchanged bias, left out of every delta, still views its keyframe's slot (zero-copy, no clone)
            assert sub.sub.views(actor.expert.bias)
    finally:
        pub.close()
        sub.close()


def test_second_publisher_is_refused_and_a_dead_ones_file_is_replaced(name):
    pub = WeightPublisher(f"shm://{name}", Policy())
    try:
        with pytest.raises(ShmError, match="owned by a live publisher"):
            WeightPublisher(f"shm://{name}", Policy())
    finally:
        pub.close()
    # a publisher killed with -9 leaves its file; the next one of that name replaces it and readers follow
    code = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from common.weight_sync import WeightPublisher
        from tests.test_weight_sync import Policy, perturb
        learner = Policy(); perturb(learner, 7.0)
        pub = WeightPublisher("shm://{name}", learner)
        pub.publish(version=7)
        print("published", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "published" in out.stdout and out.returncode == -signal.SIGKILL, out.stderr
    actor = Policy()
    sub = WeightSubscriber(f"shm://{name}", actor, zero_copy=True)
    try:
        assert sub.poll(1.0) and sub.apply() == 7 and all((p == 7.0).all() for p in actor.parameters())
        assert not sub.sub.publisher_alive()
        learner = Policy()
        pub = WeightPublisher(f"shm://{name}", learner)
        assert sub.sub.publisher_alive()
        perturb(learner, 9.0)
        pub.publish(version=9)
        assert sub.poll(1.0) and sub.apply() == 9 and same(actor, learner)
        assert sub.sub.stats["attached"] == 2
    finally:
        pub.close()
        sub.close()


def test_a_publisher_waiting_for_a_closing_one_owns_the_name_alone(name):
    """B waits for the owner lock while A closes (A unlinks its owner file as it goes): B must end up holding the
    lock of the file at the path, so that a third publisher C is refused while B lives and readers see B alive.
    Before, B locked A's unlinked file: C was accepted, retired B's file, and B went on writing into it, over a slot
    a zero-copy reader still viewed."""
    import threading

    a = ShmPublisher(name, max_readers=1)
    got = {}
    waiter = threading.Thread(target=lambda: got.__setitem__("b", ShmPublisher(name, max_readers=1)))
    waiter.start()
    time.sleep(0.2)  # B is waiting for the lock
    a.close()
    waiter.join(10)
    b = got["b"]
    sub = ShmSubscriber(name)
    try:
        assert sub.publisher_alive()
        with pytest.raises(ShmError, match="owned by a live publisher"):
            ShmPublisher(name, max_readers=1)
    finally:
        sub.close()
        b.close()


def test_a_publisher_whose_file_was_taken_over_stops_publishing(name):
    """A publisher whose file another one has retired (its readers moved to the new file and let go of their
    slots) must not write into it again: acquire refuses, naming the takeover."""
    pub = ShmPublisher(name, max_readers=1)
    try:
        pub.acquire(64)[:] = 0
        pub.commit(1)
        with pub._map.lock():  # what a publisher replacing this one does to the old file
            pub._map.ctl[5] = 1  # W_RETIRED
        with pytest.raises(ShmError, match="taken over by another publisher"):
            pub.acquire(64)
        with pytest.raises(ShmError, match="taken over by another publisher"):  # nor a larger file over the taker's
            pub.acquire(1 << 20)
    finally:
        pub.close()


def test_a_message_that_outgrows_the_slots_moves_readers_to_a_new_file(name):
    pub = ShmPublisher(name, max_readers=1)
    sub = ShmSubscriber(name)
    try:
        from common.transport import encode, pack_frames

        for version, size in ((1, 10), (2, 100_000), (3, 20)):
            packed = pack_frames(encode("update", {}, {"x": np.full(size, version, np.int32)}, version))
            pub.acquire(len(packed))[:] = packed
            pub.commit(version)
            msg = sub.latest(1.0)
            assert msg.seq == version and (msg.arrays["x"] == version).all() and len(msg.arrays["x"]) == size
            sub.release(msg)
        assert pub.stats["files"] == 2 and sub.stats["attached"] == 2
    finally:
        pub.close()
        sub.close()


def test_malformed_slots_are_dropped_and_the_reader_keeps_serving(name):
    from common.transport import encode, pack_frames

    pub = ShmPublisher(name)
    sub = ShmSubscriber(name)
    rng = np.random.default_rng(0)
    try:
        version = 0
        for trial in range(200):
            version += 1
            bad = pack_frames(encode("update", {}, {"x": np.arange(1000, dtype=np.float32)}, version)).copy()
            kind = trial % 4
            if kind == 0:
                bad[:] = rng.integers(0, 256, len(bad), dtype=np.uint8)  # garbage
            elif kind == 1:
                bad = bad[:rng.integers(1, len(bad))]  # truncated
            elif kind == 2:
                bad[rng.integers(4, 200)] ^= 0xFF  # a flipped byte in the counts or the header
            else:
                bad = pack_frames(encode("update", {}, {"x": np.arange(1000, dtype=np.float32)}, version + 1000))
            pub.acquire(len(bad))[:] = bad
            pub.commit(version)
            msg = sub.latest(0.5)
            if msg is not None:  # a flipped byte may land in padding or data: then the message is still valid
                assert kind == 2 and msg.seq == version
                sub.release(msg)
            version += 1
            packed = pack_frames(encode("update", {}, {"x": np.arange(1000, dtype=np.float32)}, version))
            pub.acquire(len(packed))[:] = packed
            pub.commit(version)
            msg = sub.latest(0.5)
            assert msg is not None and msg.seq == version and np.array_equal(msg.arrays["x"], np.arange(1000))
            sub.release(msg)
        assert sub.stats["bad_frames"] >= 150
        for bad_slot in (-1, pub.slots, 99):  # a corrupt control page: dropped, and the reader goes on
            version += 1
            packed = pack_frames(encode("update", {}, {"x": np.arange(4, dtype=np.float32)}, version))
            pub.acquire(len(packed))[:] = packed
            pub.commit(version)
            pub._map.ctl[W_LATEST_SLOT] = bad_slot
            before = sub.stats["bad_frames"]
            assert sub.latest(0.5) is None and sub.stats["bad_frames"] == before + 1
        version += 1
        pub.acquire(len(packed))[:] = pack_frames(encode("update", {}, {"x": np.ones(4, np.float32)}, version))
        pub.commit(version)
        msg = sub.latest(0.5)
        assert msg is not None and msg.seq == version
        sub.hold([], msg)
    finally:
        pub.close()
        sub.close()


READER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from common.weight_sync import WeightSubscriber
    from tests.test_weight_sync import Policy
    actor = Policy()
    sub = WeightSubscriber("shm://{name}", actor, zero_copy=True)
    deadline = time.monotonic() + 90
    while sub.version < 1:  # attached: the publisher's burst starts once every reader says so
        if time.monotonic() > deadline:
            sys.exit("no first version")
        if sub.poll(0.05):
            sub.apply()
    print("READY", flush=True)
    applied = checks = 0
    while time.monotonic() < deadline:
        if sub.poll(0.01):
            sub.apply()
            applied += 1
        for _ in range(3):  # the applied weights are whole (every value is the version's) and stay so while used
            values = torch.cat([p.reshape(-1) for p in actor.parameters()])
            if not (values == float(sub.version)).all():
                print("TORN", sub.version, values.unique()[:5].tolist(), flush=True)
                sys.exit(1)
            checks += 1
        if sub.version >= {last}:
            break
        if {hold_s}:
            time.sleep({hold_s})
    print("OK", sub.version, applied, checks, flush=True)
""")


def test_readers_in_other_processes_never_see_a_torn_update(name):
    """A publisher publishes as fast as it can, each version's values equal to its number; two reader processes
    (one slow, holding each version for a while), attached before the burst, check that the weights they apply are
    whole and do not change under them, over many versions each."""
    learner = Policy()
    pub = WeightPublisher(f"shm://{name}", learner, flatten=True, max_readers=2)
    last = 400
    perturb(learner, 1.0)
    pub.publish(version=1)
    readers = [subprocess.Popen([sys.executable, "-c", READER.format(root=str(ROOT), name=name, last=last,
                                                                       hold_s=hold)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for hold in (0, 0.02)]
    try:
        for r in readers:  # (a reader that cannot attach exits on its own deadline: readline returns)
            assert r.stdout.readline().startswith("READY"), r.communicate(timeout=30)
        for v in range(2, last + 2000):  # then keep the newest coming until both readers are done
            if v > last and all(r.poll() is not None for r in readers):
                break
            perturb(learner, float(v))
            pub.publish(version=v)
            time.sleep(0.001 if v < last else 0.005)
        outs = [r.communicate(timeout=120) for r in readers]
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()
        pub.close()
    for r, (out, err) in zip(readers, outs):
        assert r.returncode == 0 and out.startswith("OK"), (out, err[-2000:])
        _, version, applied, checks = out.split()
        assert int(version) >= last and int(applied) >= 10 and int(checks) >= 30, out


def test_a_reader_killed_while_holding_slots_frees_them(name):
    learner = Policy()
    pub = WeightPublisher(f"shm://{name}", learner, max_readers=1)
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from common.weight_sync import WeightSubscriber
        from tests.test_weight_sync import Policy
        sub = WeightSubscriber("shm://{name}", Policy(), zero_copy=True)
        assert sub.poll(60.0) and sub.apply() == 1
        print("applied", flush=True)
        assert sub.poll(60.0)  # takes version 2 too: two slots held
        print("holding", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    try:
        perturb(learner, 1.0)
        pub.publish()
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "applied"
        perturb(learner, 2.0)
        pub.publish()
        out, _ = child.communicate(timeout=120)
        assert "holding" in out and child.returncode == -signal.SIGKILL
        m = pub.shm._map
        with m.lock():
            assert bin(m.held_mask(check_alive=False)).count("1") == 2  # what the dead reader left held
        for v in range(3, 40):  # publishing goes on around them (5 slots: 2 held, the latest, 2 free)
            perturb(learner, float(v))
            pub.publish()
        actor = Policy()
        sub = WeightSubscriber(f"shm://{name}", actor)  # max_readers=1: the dead reader's entry is taken back
        assert sub.poll(1.0) and sub.apply() == 39 and same(actor, learner)
        with m.lock():
            assert m.held_mask(check_alive=False) == 0  # and with it the slots it held
        sub.close()
    finally:
        pub.close()


def test_too_many_readers_and_bad_configurations_are_refused(name):
    learner = Policy()
    pub = WeightPublisher(f"shm://{name}", learner, max_readers=1)
    try:
        pub.publish()
        first = WeightSubscriber(f"shm://{name}", Policy())
        assert first.poll(1.0)
        second = WeightSubscriber(f"shm://{name}", Policy())
        with pytest.raises(ShmError, match="all 1 reader entries .* larger max_readers"):
            second.poll(0.0)
        first.close()
        assert second.poll(1.0) and second.apply() == 1  # the entry first gave back
        second.close()
    finally:
        pub.close()
    with pytest.raises(ValueError, match="name must be"):
        WeightPublisher("shm://bad/name", learner)
    with pytest.raises(ValueError, match="no network link"):
        WeightPublisher(f"shm://{name}", learner, max_bytes_per_s=1e6)
    with pytest.raises(ValueError, match="max_readers"):
        ShmPublisher(name, max_readers=0)
    assert not (shm_dir() / f"rlx-{name}").exists()  # close() removed the file


def test_a_file_that_is_not_a_channel_is_refused(name):
    path = shm_dir() / f"rlx-{name}"
    path.write_bytes(b"\0" * 8192)
    os.chmod(path, 0o600)
    sub = ShmSubscriber(name)
    with pytest.raises(ShmError, match="not a shared-memory channel"):
        sub.latest(0.0)
    pub = ShmPublisher(name)  # no live owner: the stray file is replaced
    try:
        pub.acquire(100)[:] = 0
        pub.commit(1)
        assert path.exists() and pub.stats["files"] == 1
    finally:
        pub.close()


@pytest.mark.parametrize("ending", ["close", "garbage_collected"])
def test_a_zero_copy_reader_that_ends_keeps_its_weights(name, ending):
    """Once the reader ends, the slot its parameters viewed is free for the publisher again: the parameters must not
    view it. Closed, or garbage-collected without close() (its entry is freed by a finalizer): either way they get
    their own memory first."""
    import gc

    learner, actor = Policy(), Policy()
    pub = WeightPublisher(f"shm://{name}", learner)
    sub = WeightSubscriber(f"shm://{name}", actor, zero_copy=True)
    try:
        perturb(learner, 1.0)
        pub.publish()
        assert sub.poll(2) and sub.apply() == 1
        if ending == "close":
            sub.close()
        else:
            del sub
            gc.collect()
        for v in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0):  # more publishes than there are slots
            perturb(learner, v)
            pub.publish()
        assert all(bool((p == 1.0).all()) for p in actor.parameters())
    finally:
        pub.close()


def test_a_misfit_update_and_a_shrinking_trainable_set_give_their_slots_back(name):
    """A reader whose model does not fit an update (apply raises, the actor may go on) and one whose trainable set
    shrinks (the tensors no longer sent kept viewing old slots) must not starve the publisher of slots."""
    learner, actor = Policy(), Policy()
    pub = WeightPublisher(f"shm://{name}", learner, mode="trainable", max_readers=1)
    misfit = Policy()
    misfit.expert = torch.nn.Linear(16, 5)
    bad = WeightSubscriber(f"shm://{name}", misfit, zero_copy=True)
    try:
        for v in range(1, 12):  # 5 slots for one reader
            perturb(learner, float(v))
            pub.publish()
            assert bad.poll(2)
            with pytest.raises(ValueError, match="does not fit"):
                bad.apply()
    finally:
        bad.close()
    sub = WeightSubscriber(f"shm://{name}", actor, zero_copy=True)
    try:
        for v, frozen in enumerate(("", "vlm.weight", "vlm.bias", "expert.weight", "", ""), start=20):
            if frozen:
                learner.get_parameter(frozen).requires_grad_(False)
            perturb(learner, float(v))
            pub.publish()
            assert sub.poll(2) and sub.apply() == pub.version
            assert held_slots(pub) <= 2
        assert [float(actor.vlm.weight[0, 0]), float(actor.vlm.bias[0]), float(actor.expert.weight[0, 0]),
                float(actor.expert.bias[0])] == [20.0, 21.0, 22.0, 25.0]  # each as last sent
    finally:
        sub.close()
        pub.close()


def test_a_publisher_starts_while_a_reader_probes_it(name):
    """publisher_alive() takes the owner lock shared for a moment: a publisher starting then is not refused."""
    import fcntl
    import threading

    probe = os.open(shm_dir() / f"rlx-{name}.owner", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.05, lambda: os.close(probe)).start()  # (closing drops the probe's lock)
    ShmPublisher(name).close()


def test_freeing_a_reader_entry_never_waits_forever_on_its_own_lock(name):
    """A garbage collection can free a reader's entry inside a locked section of the same thread (through another
    mapping of the file); the entry is then cleared without the lock, after a bounded wait."""
    from common.shm_broadcast import _free_entry

    pub = ShmPublisher(name)
    pub.acquire(64)
    pub.commit(1)
    sub = ShmSubscriber(name)
    try:
        assert sub._attach()  # (what a first latest() does)
        m, entry = sub._map, sub._entry
        assert pub._map.entries[entry, 0] == os.getpid()
        with pub._map.lock():  # held through the publisher's mapping (a flock of another open file: so in any
            # thread of this process, as in this one); a regression would wait, not hang the test run
            import threading

            freeing = threading.Thread(target=_free_entry, args=(m, entry), daemon=True)
            freeing.start()
            freeing.join(5.0)
            assert not freeing.is_alive(), "freeing the entry waits for a lock its own thread holds"
        sub._finalizer.detach()
        with pub._map.lock():
            assert pub._map.entries[entry].tolist() == [0, 0, 0]
    finally:
        pub.close()
