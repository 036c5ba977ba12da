"""Weight-sync benchmark: publish + apply time for 1M / 10M / 100M float32 parameters vs a plain memcpy of the
same bytes.

One publish+apply = `WeightPublisher.publish()` (snapshot into the send buffer) -> transport -> `WeightSubscriber`
receives -> `apply()` copies into the actor's parameters. Measured within one process over `inproc://` (learner and
actor threads sharing a process: the transport passes a pointer) and over TCP loopback (the bytes cross the kernel).
The reference is `torch.Tensor.copy_` of one flat tensor of the same size, preallocated. Median of `repeats`.

    python benchmarks/weight_sync.py        # writes benchmarks/results/weight_sync.{md,json,png}
    python benchmarks/weight_sync.py --learner-device cuda --sizes 10000000 100000000 315000000 1000000000
                                            # GPU learner -> CPU actor: weight_sync_cuda.{md,json,png}

With `--learner-device cuda` the learner's parameters live on the GPU: `publish()` first copies them device-to-host
into pinned memory on a side stream; the actor stays on the CPU (the USER topology: a GPU learner, CPU actors on the
robots). The reference is then the raw limit of that first hop, a D2H copy of the same bytes into pinned memory.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import tyro
import zmq

from benchmarks.report import RESULTS_DIR, pyplot, write_results
from common.weight_sync import WeightPublisher, WeightSubscriber


@dataclass
class Args:
    sizes: list[int] = field(default_factory=lambda: [1_000_000, 10_000_000, 100_000_000])
    """parameter counts (float32)"""
    tensors: int = 10
    """the parameters are split over this many tensors"""
    repeats: int = 5
    """timed repetitions per setting (median reported)"""
    seed: int = 0
    """seed of the parameter values"""
    learner_device: str = "cpu"
    """cpu, or cuda (the learner's weights on the GPU, the actor's on the CPU)"""
    out_dir: Path = RESULTS_DIR
    """where weight_sync.{md,json,png} go"""


def make_model(n: int, parts: int, seed: int, device: str = "cpu") -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    for i in range(parts):
        model.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(n // parts, generator=g).to(device)))
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_memcpy(n: int, repeats: int, device: str = "cpu") -> float:
    """A plain copy of n floats: CPU -> CPU, or GPU -> pinned host memory (the D2H limit) for a CUDA learner."""
    src = torch.randn(n, device=device)
    dst = torch.empty(n, pin_memory=device == "cuda")
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_raw_tcp(n: int, repeats: int, port: int) -> float:
    """The socket's own limit: raw pyzmq PUSH -> PULL of the same bytes over TCP loopback (one frame, zero-copy send,
    received into a ZMQ frame), no framing, no snapshot, no apply."""
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(f"tcp://127.0.0.1:{port}")
    pull.connect(f"tcp://127.0.0.1:{port}")
    payload = np.random.default_rng(0).integers(0, 255, n * 4, dtype=np.uint8)
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        push.send(payload, copy=False)
        if not pull.poll(120_000):
            raise TimeoutError("raw TCP payload never arrived")
        pull.recv(copy=False)
        if r:
            times.append(time.perf_counter() - start)
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()
    return float(np.median(times))


def time_sync(n: int, parts: int, endpoint: str, repeats: int, seed: int,
              zero_copy: bool = False, device: str = "cpu") -> tuple[float, float]:
    """(median publish+apply seconds, median seconds that publish() blocked the learner)."""
    ctx = zmq.Context()
    learner, actor = make_model(n, parts, seed, device), make_model(n, parts, seed + 1)
    pub = WeightPublisher(endpoint, learner, ctx=ctx)
    sub = WeightSubscriber(endpoint, actor, ctx=ctx, zero_copy=zero_copy)
    time.sleep(0.3)
    totals, blocks = [], []
    for r in range(repeats + 1):
        with torch.no_grad():
            learner.w0.add_(1.0)
        sync(device)
        start = time.perf_counter()
        pub.publish()
        blocked = time.perf_counter() - start
        while not sub.poll(timeout=0.001):
            if time.perf_counter() - start > 120:
                raise TimeoutError("weights never arrived")
        sub.apply()
        total = time.perf_counter() - start
        if r:  # the first round warms allocations up
            totals.append(total)
            blocks.append(blocked)
    last = f"w{parts - 1}"
    assert torch.equal(actor.w0, learner.w0.cpu()) and torch.equal(getattr(actor, last), getattr(learner, last).cpu())
    pub.close()
    sub.close()
    ctx.term()
    return float(np.median(totals)), float(np.median(blocks))


def main(args: Args) -> None:
    if args.learner_device not in ("cpu", "cuda"):
        raise SystemExit(f"--learner-device must be cpu or cuda, got {args.learner_device!r}")
    if args.learner_device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--learner-device cuda needs a CUDA GPU")
    device, cuda = args.learner_device, args.learner_device == "cuda"
    rows, port = [], 5850
    for n in args.sizes:
        copy_s = time_memcpy(n, args.repeats, device)
        row = {"params": f"{n / 1e6:g}M", "MB": round(n * 4 / 1e6, 1), "memcpy_ms": round(copy_s * 1e3, 2)}
        for name, endpoint, zero_copy in (("inproc", f"inproc://weights-{n}", False),
                                          ("inproc_zero_copy", f"inproc://weights-zc-{n}", True),
                                          ("tcp", f"tcp://127.0.0.1:{port}", False)):
            port += 1
            total, blocked = time_sync(n, args.tensors, endpoint, args.repeats, args.seed, zero_copy, device)
            row[f"{name}_publish_apply_ms"] = round(total * 1e3, 2)
            if name == "tcp":
                tcp_total = total
            row[f"{name}_vs_memcpy"] = round(total / copy_s, 2)
            if name != "inproc_zero_copy":
                row[f"{name}_publish_blocks_ms"] = round(blocked * 1e3, 2)
        raw_s = time_raw_tcp(n, args.repeats, port)
        port += 1
        row["tcp_raw_pyzmq_ms"] = round(raw_s * 1e3, 2)
        row["tcp_vs_raw"] = round(tcp_total / raw_s, 2)
        rows.append(row)
        print(row, flush=True)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    for off, key, label in ((-0.3, "memcpy_ms", "memcpy"), (-0.1, "inproc_publish_apply_ms", "ours, inproc"),
                            (0.1, "inproc_zero_copy_publish_apply_ms", "ours, inproc, zero-copy apply"),
                            (0.3, "tcp_publish_apply_ms", "ours, TCP loopback")):
        ax.bar(x + off, [r[key] for r in rows], 0.2, label=label)
    ax.set_xticks(x, [r["params"] + " fp32" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("weight sync: publish + apply vs " + ("D2H copy (GPU learner)" if cuda else "memcpy"))
    ax.legend()
    notes = ("publish+apply: from `publish()` on the learner to the end of `apply()` on the actor (snapshot copy, "
             "transport, copy into the actor's parameters: at least two copies of the bytes, so 2x memcpy is the "
             "floor for any sync that snapshots and then copies). `zero_copy`: the actor's `WeightSubscriber("
             "zero_copy=True)` points its CPU parameters at the received buffer instead of copying (inference-only "
             "CPU actors), leaving one copy, the snapshot. `publish_blocks_ms` is how long `publish()` held the "
             "learner. "
             f"{args.tensors} tensors per model, median of {args.repeats} after one warm-up. Target: <= 2x memcpy. "
             "Over TCP the bytes cross the kernel's loopback, whose own limit is `tcp_raw_pyzmq_ms` (raw pyzmq "
             "PUSH -> PULL of the same bytes, measured in the same run): `tcp_vs_raw` is our overhead over it.")
    if cuda:
        notes += (" Here the learner is on the GPU: `memcpy_ms` is a D2H copy of the same bytes into pinned host "
                  "memory, and publish+apply adds that D2H hop (side stream, pinned buffers) to the CPU-side copies.")
    path = write_results("weight_sync_cuda" if cuda else "weight_sync",
                         "Weight sync vs memcpy" + (": GPU learner, CPU actor" if cuda else ""),
                         ["params", "MB", "memcpy_ms", "inproc_publish_apply_ms", "inproc_vs_memcpy",
                          "inproc_publish_blocks_ms", "inproc_zero_copy_publish_apply_ms",
                          "inproc_zero_copy_vs_memcpy", "tcp_publish_apply_ms", "tcp_vs_memcpy",
                          "tcp_publish_blocks_ms", "tcp_raw_pyzmq_ms", "tcp_vs_raw"], rows, seeds=[args.seed],
                         notes=notes, out_dir=args.out_dir,
                         figure=fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
