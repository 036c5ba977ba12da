"""common.weight_sync: versions, coalescing, what travels in each mode, bandwidth cap."""

import time

import pytest
import torch
import zmq

from common.transport import PackedDecoder
from common.weight_sync import WeightPublisher, WeightSubscriber
from tests.test_transport import free_endpoint


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vlm = torch.nn.Linear(16, 16)  # frozen in "trainable" mode tests
        self.expert = torch.nn.Linear(16, 4)
        self.register_buffer("steps", torch.zeros(1))



def poll_until(sub, version: int, timeout: float = 5.0) -> bool:
    """Poll until `version` is the pending update: `poll` returns on whatever has arrived, which right after a burst
    of publishes may be an older version still ahead of the newest in the socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sub.poll(0.1) and sub._pending.seq >= version:
            return True
    return False

def pair(**kw):
    endpoint = free_endpoint()
    learner, actor = Policy(), Policy()
    pub = WeightPublisher(endpoint, learner, **kw)
    sub = WeightSubscriber(endpoint, actor)
    time.sleep(0.3)  # subscription handshake
    return learner, actor, pub, sub


def perturb(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.steps.fill_(value)


def test_full_sync_applies_exactly_and_versions_increase():
    learner, actor, pub, sub = pair()
    try:
        for v in (1, 2, 3):
            perturb(learner, float(v))
            assert pub.publish() == v
            assert pub.wait_sent()
            assert sub.poll(timeout=2) and sub.apply() == v
            for (k, a), b in zip(actor.state_dict().items(), learner.state_dict().values()):
                assert torch.equal(a, b), k
        pub.publish(version=2)  # an old version is never applied over a newer one
        pub.wait_sent()
        received = sub.sub.stats.received
        deadline = time.monotonic() + 5
        while sub.sub.stats.received == received:  # it did arrive, and was dropped
            assert not sub.poll(timeout=0.05) and time.monotonic() < deadline
        assert not sub.poll(timeout=0.1) and sub.version == 3 and sub.stats["received"] == 3
    finally:
        pub.close()
        sub.close()


def test_coalescing_counts():
    learner, actor, pub, sub = pair()
    try:
        perturb(learner, 1.0)
        pub.publish()
        pub.wait_sent()
        sub.poll(2)
        sub.apply()
        for v in range(2, 12):  # ten versions while the actor is busy
            perturb(learner, float(v))
            pub.publish()
        pub.wait_sent()
        assert poll_until(sub, 11) and sub.apply() == 11
        assert torch.equal(actor.expert.weight, learner.expert.weight)
        s = pub.stats
        assert s["requested"] == 11 and s["sent"] + s["coalesced"] == 11
        assert sub.stats["applied"] == 2 and sub.stats["coalesced"] == 9  # versions 2..10 were never applied
    finally:
        pub.close()
        sub.close()


def test_trainable_mode_sends_only_trainable_tensors():
    learner, actor, pub, sub = pair(mode="trainable")
    try:
        learner.vlm.requires_grad_(False)
        perturb(learner, 5.0)
        frozen_before = actor.vlm.weight.clone()
        pub.publish()
        pub.wait_sent()
        sub.poll(2)
        msg_keys = set(sub._pending.arrays)
        sub.apply()
        assert msg_keys == {"expert.weight", "expert.bias"}
        assert torch.equal(actor.expert.weight, learner.expert.weight)
        assert torch.equal(actor.vlm.weight, frozen_before) and actor.steps.item() == 0
    finally:
        pub.close()
        sub.close()


def test_only_changed_sends_changed_tensors():
    learner, actor, pub, sub = pair(only_changed=True)
    try:
        pub.publish()
        pub.wait_sent()
        sub.poll(2)
        assert len(sub._pending.arrays) == 5
        sub.apply()
        with torch.no_grad():
            learner.expert.bias.add_(1.0)
        pub.publish()
        pub.wait_sent()
        sub.poll(2)
        assert set(sub._pending.arrays) == {"expert.bias"}
        sub.apply()
        assert torch.equal(actor.expert.bias, learner.expert.bias)
    finally:
        pub.close()
        sub.close()


def test_bandwidth_cap_spaces_sends():
    learner, actor, pub, sub = pair(max_bytes_per_s=20_000)  # each message is ~1.5 kB -> ~75 ms apart
    try:
        start = time.monotonic()
        for _ in range(4):
            pub.publish()
            pub.wait_sent()
        assert time.monotonic() - start > 0.15
    finally:
        pub.close()
        sub.close()


def test_mismatched_model_is_refused():
    endpoint = free_endpoint()
    pub = WeightPublisher(endpoint, Policy())
    sub = WeightSubscriber(endpoint, torch.nn.Linear(3, 3))
    time.sleep(0.3)
    try:
        pub.publish()
        pub.wait_sent()
        assert sub.poll(2)
        with pytest.raises(ValueError, match="does not fit this model"):
            sub.apply()
    finally:
        pub.close()
        sub.close()


def test_bad_mode():
    with pytest.raises(ValueError, match="trainable"):
        WeightPublisher(free_endpoint(), Policy(), mode="delta-ish")


@pytest.mark.parametrize("transport", ["tcp", "inproc"])
def test_zero_copy_apply_points_parameters_at_the_received_buffer(transport):
    """inproc: the received frames are the publisher's own send buffers, so a reused buffer would rewrite the
    actor's weights; over TCP they are the subscriber's copies."""
    endpoint = free_endpoint() if transport == "tcp" else f"inproc://zero-copy-{time.monotonic_ns()}"

    def big_policy():  # > 64 kB a message: pyzmq copies smaller ones even when asked not to
        model = Policy()
        model.vlm, model.expert = torch.nn.Linear(16, 1100), torch.nn.Linear(1100, 4)
        return model

    learner, actor = big_policy(), big_policy()
    pub = WeightPublisher(endpoint, learner)
    sub = WeightSubscriber(endpoint, actor, zero_copy=True)
    time.sleep(0.3)
    try:
        for v in (1.0, 2.0, 3.0):  # the publisher must not overwrite a buffer the actor still uses
            perturb(learner, v)
            pub.publish()
            pub.wait_sent()
            assert sub.poll(2)
            received = sub._pending.arrays["vlm.weight"]
            assert sub.apply()
            assert torch.equal(actor.expert.weight, learner.expert.weight) and actor.expert.weight[0, 0] == v
            assert actor.vlm.weight.data_ptr() == received.data_ptr()  # viewed, not copied
            if transport == "inproc":  # ... and in-process, what it views is the publisher's own send buffer
                ptr = received.data_ptr()
                assert any(buf.ctypes.data <= ptr < buf.ctypes.data + buf.nbytes for buf, _ in pub._buffers)
        held = [p.clone() for p in actor.parameters()]
        for v in (9.0, 10.0, 11.0):  # new snapshots go into other buffers: the actor's weights stay as applied
            perturb(learner, v)
            pub.publish()
            pub.wait_sent()
            assert all(torch.equal(p, h) for p, h in zip(actor.parameters(), held)), v
        assert actor.expert(actor.vlm(torch.ones(1, 16))).shape == (1, 4)  # still runs on the swapped tensors
    finally:
        pub.close()
        sub.close()


def test_only_changed_survives_dropped_messages_and_late_subscribers():
    learner, actor, pub, sub = pair(only_changed=True, keyframe_every=3)
    try:
        pub.publish()  # v1: keyframe
        pub.wait_sent()
        sub.poll(2)
        sub.apply()
        with torch.no_grad():
            learner.expert.weight.add_(1.0)
        pub.publish()  # v2: never read by the actor (dropped by latest-only delivery)
        with torch.no_grad():
            learner.expert.bias.add_(1.0)
        pub.publish()  # v3: a delta against the keyframe, so it carries the weight change too
        pub.wait_sent()
        assert poll_until(sub, 3) and sub.apply() == 3
        assert torch.equal(actor.expert.weight, learner.expert.weight)
        assert torch.equal(actor.expert.bias, learner.expert.bias)

        pub.publish()  # v4: the next keyframe (every 3rd publish, the keyframe counted)
        pub.wait_sent()
        assert poll_until(sub, 4) and sub.apply() == 4
        late = WeightSubscriber(pub.pub.sock.getsockopt_string(zmq.LAST_ENDPOINT), Policy())
        time.sleep(0.3)
        pub.publish()  # v5: a delta; the late subscriber has no keyframe to apply it to
        pub.wait_sent()
        assert not late.poll(1) and late.stats["waiting_keyframe"] == 1
        pub.publish()  # v6: a delta against v4
        pub.wait_sent()
        assert not late.poll(1) and late.stats["waiting_keyframe"] == 2
        pub.publish()  # v7: the next keyframe (every 3rd publish: v1, v4, v7)
        pub.wait_sent()
        assert late.poll(2) and late.apply() == 7
        for a, b in zip(late.model.state_dict().values(), learner.state_dict().values()):
            assert torch.equal(a, b)
        late.close()
    finally:
        pub.close()
        sub.close()


def test_a_paced_link_never_drops_a_keyframe_its_deltas_need():
    """With a bandwidth cap, a message waiting for the link is replaced by the next publish. A keyframe must not be
    replaced by a delta against it (that keyframe would reach no one, nor would any delta until the next keyframe):
    while the last keyframe has not gone out, each publish is a keyframe. Publishing faster than the link allows,
    every delta sent is based on a keyframe sent before it, and the actor ends with the learner's weights."""
    torch.manual_seed(0)
    endpoint = free_endpoint()
    learner, actor = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    pub = WeightPublisher(endpoint, learner, only_changed=True, keyframe_every=4, max_bytes_per_s=100_000.0)
    sub = WeightSubscriber(endpoint, actor)
    sent, real_send = [], pub.pub.send_packed
    decoder = PackedDecoder()

    def record(packed):
        msg = decoder(packed)
        sent.append((msg.seq, msg.meta.get("keyframe", False), msg.meta.get("base")))
        return real_send(packed)

    pub.pub.send_packed = record
    time.sleep(0.3)
    try:
        for _ in range(30):  # ~17 KB messages at 100 KB/s: a send every ~0.17 s, a publish every 0.01 s
            with torch.no_grad():
                learner.weight.add_(0.01)
            pub.publish()
            sub.maybe_apply(0.01)
        assert pub.wait_sent(10)
        keyframes_sent = {seq for seq, key, _ in sent if key}
        assert len(sent) < 30 and pub.stats["coalesced"] > 0  # the link did coalesce
        assert all(base in keyframes_sent and base < seq for seq, key, base in sent if not key), sent
        deadline = time.monotonic() + 5
        while sub.version != pub.version and time.monotonic() < deadline:
            sub.maybe_apply(0.05)
        assert sub.version == pub.version and torch.equal(actor.weight, learner.weight)
    finally:
        pub.close()
        sub.close()


def test_a_failed_publish_makes_the_next_one_a_keyframe(monkeypatch):
    """A keyframe whose publish fails (here the send raises) never left: the next publish must be a keyframe again,
    not a delta against one no subscriber has."""
    learner, actor, pub, sub = pair(only_changed=True, keyframe_every=5)
    try:
        real_send = pub.pub.send_packed
        monkeypatch.setattr(pub.pub, "send_packed", lambda packed: (_ for _ in ()).throw(OSError("link down")))
        with pytest.raises(OSError):
            pub.publish()  # v1, a keyframe: lost
        monkeypatch.setattr(pub.pub, "send_packed", real_send)
        perturb(learner, 3.0)
        pub.publish()  # v2: a keyframe again
        pub.wait_sent()
        assert poll_until(sub, 2) and sub._pending.meta.get("keyframe") and sub.apply() == 2
        assert _same(actor, learner)
    finally:
        pub.close()
        sub.close()


def _net():
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))


def _same(actor, learner):
    return all(torch.equal(a, b) for a, b in zip(actor.state_dict().values(), learner.state_dict().values()))


def test_flatten_makes_one_buffer_and_training_goes_on():
    torch.manual_seed(0)
    endpoint = free_endpoint()
    learner, actor = _net(), _net()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    opt = torch.optim.Adam(learner.parameters(), lr=0.05)  # made before the flattening: it must not notice
    pub = WeightPublisher(endpoint, learner, flatten=True)
    sub = WeightSubscriber(endpoint, actor)
    time.sleep(0.3)
    try:
        pub.publish()
        pub.wait_sent()
        assert sub.poll(2) and sub.apply() == 1
        assert all(torch.equal(v, before[k]) for k, v in learner.state_dict().items())  # moved, not changed
        block = pub._flat.block
        inside = [block.data_ptr() <= t.data_ptr() < block.data_ptr() + block.numel()
                  for t in learner.state_dict().values()]
        assert all(inside) and _same(actor, learner)  # int64 num_batches_tracked included
        for step in range(3):  # the optimizer and BatchNorm's in-place updates write into the block
            loss = learner(torch.randn(8, 16)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert pub._flat.holds(dict(learner.state_dict(keep_vars=True)))
            pub.publish()
            pub.wait_sent()
            assert sub.poll(2) and sub.apply() == step + 2
            assert _same(actor, learner) and not torch.equal(learner[0].weight, before["0.weight"])
        learner[0].weight.data = torch.full_like(learner[0].weight, 7.0)  # a replaced tensor: flattened again
        pub.publish()
        pub.wait_sent()
        assert sub.poll(2) and sub.apply() == 5
        assert _same(actor, learner) and actor[0].weight[0, 0] == 7.0 and pub._flat.block is not block
    finally:
        pub.close()
        sub.close()


def test_flatten_leaves_tied_weights_on_the_per_tensor_path():
    endpoint = free_endpoint()
    shared, other = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    learner, actor = torch.nn.Sequential(shared, shared), torch.nn.Sequential(other, other)  # one weight, two names
    pub = WeightPublisher(endpoint, learner, flatten=True)
    sub = WeightSubscriber(endpoint, actor)
    time.sleep(0.3)
    try:
        with torch.no_grad():
            shared.weight.fill_(3.0)
        pub.publish()
        pub.wait_sent()
        assert sub.poll(2) and sub.apply() == 1
        assert pub._flat is None  # flattening would untie them
        assert learner[1].weight is learner[0].weight and actor[0].weight[0, 0] == 3.0
    finally:
        pub.close()
        sub.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (checked on the lent H100)")
@pytest.mark.parametrize("flatten", [False, True])
def test_cuda_learner_publishes_straight_from_the_gpu_to_a_cpu_actor(flatten):
    ctx = zmq.Context()
    endpoint = free_endpoint()
    learner = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).cuda()
    learner[1].to(torch.bfloat16)  # mixed precision travels as is
    actor = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    actor[1].to(torch.bfloat16)
    pub = WeightPublisher(endpoint, learner, ctx=ctx, flatten=flatten)
    sub = WeightSubscriber(endpoint, actor, ctx=ctx)
    try:
        time.sleep(0.2)
        for v in (1, 2, 3):
            with torch.no_grad():
                torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the adds: they are surely unfinished
                for p in learner.parameters():
                    p.add_(torch.randn_like(p))  # queued on the default stream, not yet finished: publish must wait
            assert pub.publish() == v and pub.wait_sent()
            assert sub.poll(timeout=2) and sub.apply() == v
            for (k, a), b in zip(actor.state_dict().items(), learner.state_dict().values()):
                assert a.dtype == b.dtype and torch.equal(a, b.cpu()), k
    finally:
        pub.close()
        sub.close()
        ctx.term()


def test_only_changed_resends_a_tensor_that_went_back_to_its_keyframe_value():
    learner, actor, pub, sub = pair(only_changed=True)
    try:
        original = learner.expert.bias.detach().clone()
        for step in ("keyframe", "changed", "reverted"):
            with torch.no_grad():
                if step == "changed":
                    learner.expert.bias.add_(1.0)
                if step == "reverted":  # exactly the keyframe's value again (a rollback)
                    learner.expert.bias.copy_(original)
            pub.publish()
            pub.wait_sent()
            assert sub.poll(2) and sub.apply()
            assert torch.equal(actor.expert.bias, learner.expert.bias), step
    finally:
        pub.close()
        sub.close()


def test_close_during_a_bandwidth_wait_is_prompt_and_sends_the_newest():
    learner, actor, pub, sub = pair(max_bytes_per_s=200)  # ~1.5 kB messages: 7.5 s between sends
    try:
        perturb(learner, 1.0)
        pub.publish()
        pub.wait_sent()
        # take v1 in now: left queued, the final poll could return on it before v3 (sent by close) has arrived
        assert sub.poll(2) and sub.apply() == 1
        perturb(learner, 2.0)
        pub.publish()  # waits ~7.5 s for the link
        perturb(learner, 3.0)
        pub.publish()  # replaces it during the wait
        start = time.monotonic()
        pub.close()
        assert time.monotonic() - start < 2.0 and not pub._thread.is_alive()
        assert pub.stats["requested"] == 3 and (pub.stats["sent"], pub.stats["coalesced"]) == (2, 1)  # v2 superseded
        # the newest went out (and reached the actor: close lets ZMQ deliver it; generous wait for a loaded machine)
        assert sub.poll(5) and sub.apply() == 3 and actor.expert.weight[0, 0] == 3.0
    finally:
        sub.close()


def _sent_arrays(pub, sub):
    """Publish, and return the arrays of the message the subscriber got (without applying it)."""
    version = pub.publish()
    assert pub.wait_sent() and poll_until(sub, version)
    msg, sub._pending = sub._pending, None
    return msg.arrays


def test_the_sent_tensors_are_found_again_when_the_model_changes():
    # The tensor list is cached between publishes (walking a π0-sized module tree costs ~2.5 ms per publish);
    # every way a model can change what it holds must still reach the actor.
    learner, actor, pub, sub = pair(mode="full")
    try:
        _sent_arrays(pub, sub)
        assert pub._sent.valid()  # nothing changed: the next publish reuses the list
        learner.expert.weight = torch.nn.Parameter(torch.full((4, 16), 9.0))  # replaced through setattr
        assert (_sent_arrays(pub, sub)["expert.weight"] == 9.0).all()
        learner._apply(lambda t: t.clone())  # .to()'s path: buffers replaced in their dict, no registration
        learner.steps.fill_(4.0)
        assert _sent_arrays(pub, sub)["steps"].item() == 4.0
        learner.extra = torch.nn.Linear(2, 2)  # a new submodule
        assert {"extra.weight", "extra.bias"} <= set(_sent_arrays(pub, sub))
        del learner.extra
        assert "extra.weight" not in _sent_arrays(pub, sub)
        # a state-dict hook that makes a tensor no module holds: never cached, so always current
        learner._register_state_dict_hook(lambda m, sd, prefix, local: sd.__setitem__("double", m.expert.bias * 2))
        perturb(learner, 1.0)
        assert (_sent_arrays(pub, sub)["double"] == 2.0).all()
        perturb(learner, 3.0)
        assert (_sent_arrays(pub, sub)["double"] == 6.0).all()
    finally:
        pub.close()
        sub.close()


def test_trainable_mode_follows_requires_grad_between_publishes():
    learner, actor, pub, sub = pair(mode="trainable")
    try:
        assert set(_sent_arrays(pub, sub)) == {"vlm.weight", "vlm.bias", "expert.weight", "expert.bias"}
        learner.vlm.requires_grad_(False)
        assert set(_sent_arrays(pub, sub)) == {"expert.weight", "expert.bias"}
        learner.vlm.weight.requires_grad_(True)
        assert set(_sent_arrays(pub, sub)) == {"vlm.weight", "expert.weight", "expert.bias"}
    finally:
        pub.close()
        sub.close()
