"""common.shm_inplace through WeightPublisher(in_place=True) / WeightSubscriber: the learner's own tensors in shared
memory, copied out by readers under the reader-writer lock; never half-changed, a stuck reader cannot hold the
learner for longer than stall_s, a reader follows the channel between kinds."""

import fcntl
import gc
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import numpy as np
import pytest
import torch

from common.shm_broadcast import CONTROL_BYTES, INPLACE_MAGIC, W_RETIRED, shm_dir
from common.shm_inplace import W_SEQ, InPlacePublisher
from common.weight_sync import WeightPublisher, WeightSubscriber
from tests.test_shm_broadcast import ROOT, name, same  # noqa: F401 (name: the fixture)
from tests.test_weight_sync import Policy, perturb


def in_block(pub: WeightPublisher, t: torch.Tensor) -> bool:
    lo = pub._flat.block.data_ptr()
    return lo <= t.data_ptr() < lo + pub._flat.block.numel()


def step_towards(model, optimizer, value: float) -> None:
    """One SGD step (lr 1) that sets every parameter to `value` (grad = p - value): exactly, from integer values."""
    for p in model.parameters():
        p.grad = p.detach() - value
    optimizer.step()


@pytest.mark.parametrize("zero_copy", [False, True])
def test_in_place_sync_is_exact_the_learner_never_copies_and_trains_on(name, zero_copy):
    learner, actor = Policy(), Policy()
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True)
    sub = WeightSubscriber(f"shm://{name}", actor, zero_copy=zero_copy)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    try:
        for version in range(1, 6):
            assert pub.publish() == version
            assert sub.poll(1.0) and sub.apply() == version and same(actor, learner)
            # the learner's tensors live in the shared file; the actor's own copy never views them
            assert all(in_block(pub, t) for t in learner.state_dict().values())
            assert not any(in_block(pub, t) for t in actor.state_dict().values())
            loss = learner.expert(learner.vlm(torch.ones(2, 16))).square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()  # the hook marks the tensors as changing: nothing is readable until the next publish
            assert not sub.poll(0.0)
        assert sub.stats["applied"] == 5 and pub.stats["unguarded_writes"] == 0
        path = shm_dir() / f"rlx-{name}"
        assert path.exists()
    finally:
        pub.close()
        sub.close()
    assert not path.exists()  # closed: the file goes, the learner's tensors have ordinary memory again
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in learner.state_dict().items())


def test_a_change_after_poll_is_never_copied(name):
    """poll() saw version 1; the optimizer then starts changing the tensors: apply() copies nothing (None) and the
    actor keeps what it had; the next publish is applied whole."""
    learner, actor = Policy(), Policy()
    perturb(learner, 0.0)
    perturb(actor, -1.0)
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True)
    sub = WeightSubscriber(f"shm://{name}", actor)
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    try:
        pub.publish()
        assert sub.poll(1.0)
        step_towards(learner, opt, 3.0)
        assert sub.apply() is None and sub.version == 0
        assert all((p == -1.0).all() for p in actor.parameters())
        assert sub.sub.stats["raced"] == 1
        assert pub.publish() == 2
        assert sub.poll(1.0) and sub.apply() == 2 and same(actor, learner)
        assert all((p == 3.0).all() for p in actor.parameters())
    finally:
        pub.close()
        sub.close()


def test_changes_are_announced_by_hooks_and_writing_and_the_others_are_counted(name):
    learner, other = Policy(), Policy()
    perturb(other, 0.0)
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True)
    try:
        pub.publish()
        other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
        step_towards(other, other_opt, 2.0)  # another model's optimizer: our channel stays readable
        assert not pub.shm.writing
        learner.load_state_dict(other.state_dict())  # load_state_dict announces itself
        assert pub.shm.writing and same(learner, other)
        pub.publish()
        with pub.writing():
            perturb(learner, 5.0)
        assert pub.shm.writing
        pub.publish()
        assert pub.stats["unguarded_writes"] == 0
        perturb(learner, 6.0)  # not announced: readers might have copied it half-done
        pub.publish()
        assert pub.stats["unguarded_writes"] == 1
    finally:
        pub.close()


def test_a_reader_stuck_in_its_copy_holds_the_learner_up_for_stall_s_then_the_weights_move(name):
    learner, actor = Policy(), Policy()
    perturb(learner, 0.0)
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True, stall_s=0.3)
    sub = WeightSubscriber(f"shm://{name}", actor)
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    step_towards(learner, opt, 1.0)
    pub.publish()
    stuck = os.open(shm_dir() / f"rlx-{name}", os.O_RDWR)  # a reader stopped inside its copy: holds the shared lock
    try:
        old = mmap.mmap(stuck, os.fstat(stuck).st_size)
        old_words = memoryview(old)[:CONTROL_BYTES].cast("q")
        old_vlm = learner.vlm.weight.data  # a view of the old file
        fcntl.flock(stuck, fcntl.LOCK_SH)
        start = time.monotonic()
        step_towards(learner, opt, 2.0)
        waited = time.monotonic() - start
        assert 0.3 <= waited < 1.0, waited
        assert pub.stats["relocations"] == 1 and pub.shm.stats["stalls"] == 1
        assert old_words[W_RETIRED] == 1 and old_words[W_SEQ] == 2  # the old file: retired, version 1, whole
        assert (old_vlm == 1.0).all() and not in_block(pub, old_vlm)  # left whole to the stuck reader
        assert all((p == 2.0).all() and in_block(pub, p) for p in learner.parameters())
        pub.publish()
        assert sub.poll(1.0) and sub.apply() == 2 and same(actor, learner)
        step_towards(learner, opt, 3.0)  # the new file has no stuck reader: no wait
        assert pub.stats["relocations"] == 1
        del old_words
        old.close()
    finally:
        os.close(stuck)
        pub.close()
        sub.close()


READER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from common.weight_sync import WeightSubscriber
    torch.set_num_threads(1)
    actor = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    sub = WeightSubscriber("shm://{name}", actor)
    deadline = time.monotonic() + 90
    while sub.version < 1:
        if time.monotonic() > deadline:
            sys.exit("no first version")
        if sub.poll(0.05):
            sub.apply()
    print("READY", flush=True)
    applied = raced = 0
    while time.monotonic() < deadline and sub.version < {last}:
        if sub.poll(0.002):
            if sub.apply() is None:
                raced += 1
                continue
            applied += 1
            values = torch.cat([p.detach().reshape(-1) for p in actor.parameters()])
            if not (values == float(sub.version)).all():
                print("TORN", sub.version, values.unique()[:5].tolist(), flush=True)
                sys.exit(1)
    print("OK", sub.version, applied, raced, flush=True)
""")


def test_readers_in_other_processes_never_copy_a_half_changed_update(name):
    """The learner steps as fast as it can (an SGD step sets every value to the next version's number, 0.5M of
    them, so a step takes a while) and publishes after each; two reader processes copy whenever they see a new
    version and check that every value they got is that version's. Checked against two planted bugs, once each: a
    reader that ignores the lock and the sequence word got a half-changed version (TORN at version 201), and so did
    one whose learner's optimizer hook was off (TORN at 13)."""
    learner = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    with torch.no_grad():
        for p in learner.parameters():
            p.zero_()
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True)
    last = 300
    step_towards(learner, opt, 1.0)
    pub.publish(version=1)
    readers = [subprocess.Popen([sys.executable, "-c", READER.format(root=str(ROOT), name=name, last=last)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for r in readers:
            assert r.stdout.readline().startswith("READY"), r.communicate(timeout=30)
        for v in range(2, last + 5000):
            if v > last and all(r.poll() is not None for r in readers):
                break
            step_towards(learner, opt, float(v))
            pub.publish(version=v)
        outs = [r.communicate(timeout=120) for r in readers]
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()
        pub.close()
    for r, (out, err) in zip(readers, outs):
        assert r.returncode == 0 and out.startswith("OK"), (out, err[-2000:])
        _, version, applied, _ = out.split()
        assert int(version) >= last and int(applied) >= 10, out
    assert pub.stats["unguarded_writes"] == 0


def test_the_reader_follows_the_channel_between_kinds_and_past_a_killed_publisher(name):
    actor = Policy()
    sub = WeightSubscriber(f"shm://{name}", actor, zero_copy=True)
    try:
        learner = Policy()
        perturb(learner, 1.0)
        pub = WeightPublisher(f"shm://{name}", learner)  # slots: the actor's parameters view one
        pub.publish(version=1)
        assert sub.poll(1.0) and sub.apply() == 1 and same(actor, learner) and sub.sub.views(actor.vlm.weight)
        pub.close()
        perturb(learner, 2.0)
        pub = WeightPublisher(f"shm://{name}", learner, in_place=True)
        pub.publish(version=2)
        assert sub.poll(1.0) and sub.apply() == 2 and same(actor, learner)
        assert not in_block(pub, actor.vlm.weight)
        pub.close()
        # an in-place publisher killed with -9 leaves its file: the reader keeps its weights and the version it
        # saw; the next publisher (slots again) replaces the file and the reader follows
        code = textwrap.dedent(f"""
            import os, signal, sys, torch
            sys.path.insert(0, {str(ROOT)!r})
            from common.weight_sync import WeightPublisher
            from tests.test_weight_sync import Policy, perturb
            learner = Policy(); perturb(learner, 3.0)
            pub = WeightPublisher("shm://{name}", learner, in_place=True)
            pub.publish(version=3)
            print("published", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "published" in out.stdout and out.returncode == -signal.SIGKILL, out.stderr
        assert sub.poll(1.0) and sub.apply() == 3 and all((p == 3.0).all() for p in actor.parameters())
        assert not sub.sub.publisher_alive()
        perturb(learner, 4.0)
        pub = WeightPublisher(f"shm://{name}", learner)
        pub.publish(version=4)
        assert sub.poll(1.0) and sub.apply() == 4 and same(actor, learner)
        pub.close()
    finally:
        sub.close()


def test_a_malformed_in_place_file_is_skipped_until_replaced(name, caplog):
    path = shm_dir() / f"rlx-{name}"
    words = np.zeros(CONTROL_BYTES // 8, np.int64)
    words[[0, 1, 2, 3, W_SEQ]] = INPLACE_MAGIC, 1, 20, 64, 2
    header = msgpack.packb({"v": 1, "t": "in_place", "s": 0, "m": {}, "a": [["w", "float32", [99]]]})[:20]
    path.write_bytes(words.tobytes() + header.ljust(4096, b"\0") + b"\0" * 4096)
    os.chmod(path, 0o600)
    actor = Policy()
    sub = WeightSubscriber(f"shm://{name}", actor)
    try:
        for _ in range(3):  # logged and counted once, the reader keeps serving
            assert not sub.poll(0.0)
        assert sub.sub.stats["bad_frames"] == 1 and "malformed in-place weight channel" in caplog.text
        learner = Policy()
        pub = WeightPublisher(f"shm://{name}", learner, in_place=True)  # no live owner: the file is replaced
        pub.publish()
        assert sub.poll(1.0) and sub.apply() == 1 and same(actor, learner)
        pub.close()
    finally:
        sub.close()


def test_in_place_refusals(name):
    with pytest.raises(ValueError, match="shm:// endpoint"):
        WeightPublisher("tcp://127.0.0.1:5999", Policy(), in_place=True)
    with pytest.raises(ValueError, match="not with only_changed"):
        WeightPublisher(f"shm://{name}", Policy(), in_place=True, only_changed=True)
    with pytest.raises(ValueError, match="stall_s"):
        InPlacePublisher(name, stall_s=0)
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    pub = WeightPublisher(f"shm://{name}", tied, in_place=True, mode="full")
    try:
        with pytest.raises(ValueError, match="no tied weights"):
            pub.publish()
    finally:
        pub.close()


def test_a_publisher_dropped_without_close_retires_its_file(name):
    """Once the publisher is gone nobody announces the optimizer's changes: its file must be retired, so that a
    reader does not copy them under the last version's label, and the name must be free again."""
    learner, actor = Policy(), Policy()
    perturb(learner, 0.0)
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True)
    sub = WeightSubscriber(f"shm://{name}", actor)
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    try:
        pub.publish()
        assert sub.poll(1.0)  # version 1 waiting to be applied
        gc.disable()  # nothing may hold the publisher in a reference cycle: it goes when its last reference does
        try:
            del pub
        finally:
            gc.enable()
        step_towards(learner, opt, 2.0)
        assert sub.apply() is None and not sub.poll(0.0) and sub.version == 0
        pub = WeightPublisher(f"shm://{name}", learner, in_place=True)  # the name is free
        assert pub.publish() == 1
        pub.close()
    finally:
        sub.close()


def test_batch_norm_statistics_and_submodule_loads_are_announced(name):
    learner = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True)  # mode "full": the running statistics go too
    try:
        pub.publish()
        learner.eval()
        learner(torch.randn(5, 4))  # eval: the statistics stay
        assert not pub.shm.writing
        learner.train()
        learner(torch.randn(5, 4))  # training: the forward changes them, announced first
        assert pub.shm.writing
        pub.publish()
        learner[2].load_state_dict(torch.nn.Linear(8, 2).state_dict())  # a submodule's load
        assert pub.shm.writing
        pub.publish()
        learner.append(torch.nn.Linear(2, 2))  # a submodule added later: its loads are announced too
        pub.publish()
        learner[3].load_state_dict(torch.nn.Linear(2, 2).state_dict())
        assert pub.shm.writing
        pub.publish()
        assert pub.stats["unguarded_writes"] == 0
    finally:
        pub.close()


def test_readers_start_no_copy_while_the_learner_waits_to_write(name):
    """A reader stuck in its copy holds the learner's announcement; meanwhile another reader must not start a copy
    (overlapping copies could keep the learner out for ever); once the stuck one lets go, the learner goes on at once,
    without moving the weights."""
    learner, actor = Policy(), Policy()
    perturb(learner, 0.0)
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True, stall_s=5.0)
    sub = WeightSubscriber(f"shm://{name}", actor)
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    pub.publish()
    stuck = os.open(shm_dir() / f"rlx-{name}", os.O_RDWR)
    try:
        assert sub.poll(1.0)
        fcntl.flock(stuck, fcntl.LOCK_SH)
        stepper = threading.Thread(target=step_towards, args=(learner, opt, 2.0))
        stepper.start()
        time.sleep(0.3)  # the learner waits for the stuck reader
        assert stepper.is_alive() and sub.apply() is None and sub.sub.stats["raced"] == 1
        fcntl.flock(stuck, fcntl.LOCK_UN)
        stepper.join(timeout=2.0)
        assert not stepper.is_alive() and pub.stats["relocations"] == 0
        pub.publish()
        assert sub.poll(1.0) and sub.apply() == 2 and same(actor, learner)
    finally:
        os.close(stuck)
        pub.close()
        sub.close()


def test_a_reader_stuck_at_a_publish_with_no_change_before_it_gets_the_old_file(name):
    learner, actor = Policy(), Policy()
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True, stall_s=0.2)
    sub = WeightSubscriber(f"shm://{name}", actor)
    pub.publish()
    stuck = os.open(shm_dir() / f"rlx-{name}", os.O_RDWR)
    try:
        fcntl.flock(stuck, fcntl.LOCK_SH)
        assert pub.publish() == 2  # no change in between, but the version number must still move under the lock
        assert pub.stats["relocations"] == 1
        assert sub.poll(1.0) and sub.apply() == 2 and same(actor, learner)
    finally:
        os.close(stuck)
        pub.close()
        sub.close()


def test_a_change_between_a_readers_check_and_its_lock_is_never_copied(name, monkeypatch):
    """The learner announces and makes a change right before the reader's shared lock is granted (forced by
    wrapping the lock call): the reader must read the sequence word under the lock, find it odd, copy nothing."""
    import common.shm_inplace as shm_inplace

    learner, actor = Policy(), Policy()
    perturb(learner, 0.0)
    perturb(actor, -1.0)
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True)
    sub = WeightSubscriber(f"shm://{name}", actor)
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    try:
        step_towards(learner, opt, 1.0)
        pub.publish()
        assert sub.poll(1.0)
        real = shm_inplace._lock_soon

        def learner_first(fd, mode, seconds):
            if mode == fcntl.LOCK_SH:
                step_towards(learner, opt, 2.0)
            return real(fd, mode, seconds)

        monkeypatch.setattr(shm_inplace, "_lock_soon", learner_first)
        assert sub.apply() is None and all((p == -1.0).all() for p in actor.parameters())
        monkeypatch.setattr(shm_inplace, "_lock_soon", real)
        pub.publish()
        assert sub.poll(1.0) and sub.apply() == 2 and all((p == 2.0).all() for p in actor.parameters())
    finally:
        pub.close()
        sub.close()


def test_an_actor_parameter_replaced_after_an_apply_still_gets_the_updates(name):
    learner, actor = Policy(), Policy()
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True)
    sub = WeightSubscriber(f"shm://{name}", actor)
    try:
        pub.publish()
        assert sub.poll(1.0) and sub.apply() == 1 and same(actor, learner)
        actor.expert.weight.data = torch.zeros_like(actor.expert.weight)  # no longer a view of the actor's buffer
        with pub.writing():
            perturb(learner, 4.0)
        pub.publish()
        assert sub.poll(1.0) and sub.apply() == 2 and same(actor, learner)
    finally:
        pub.close()
        sub.close()


def test_a_shrinking_trainable_set_and_a_second_publisher(name):
    learner = Policy()
    pub = WeightPublisher(f"shm://{name}", learner, in_place=True, mode="trainable")
    try:
        pub.publish()
        assert in_block(pub, learner.vlm.weight)
        learner.vlm.requires_grad_(False)  # no longer sent: must not stay a view of the old file
        pub.publish()
        assert in_block(pub, learner.expert.weight) and not in_block(pub, learner.vlm.weight)
        assert pub.shm.stats["files"] == 2
        with pytest.raises(ValueError, match="another publisher"):
            WeightPublisher(f"shm://{name}-b", learner, in_place=True, mode="trainable").publish()
        learner.expert.requires_grad_(False)
        with pytest.raises(ValueError, match="nothing to publish"):
            pub.publish()
    finally:
        pub.close()
        (shm_dir() / f"rlx-{name}-b.owner").unlink(missing_ok=True)


def test_a_forked_child_that_exits_leaves_the_learners_file(name):
    code = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from common.weight_sync import WeightPublisher
        from common.shm_broadcast import shm_dir
        from tests.test_weight_sync import Policy
        pub = WeightPublisher("shm://{name}", Policy(), in_place=True)
        pub.publish()
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a normal interpreter exit in the child: finalizers run there
        os.waitpid(child, 0)
        path = str(shm_dir() / "rlx-{name}")
        print("file", os.path.exists(path), "owner", os.path.exists(path + ".owner"), "version", pub.publish())
        pub.close()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "file True owner True version 2" in out.stdout, (out.stdout, out.stderr[-2000:])
