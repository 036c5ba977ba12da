"""Transport benchmark: our acknowledged data channel vs raw pyzmq PUSH/PULL of the same bytes.

Items are 128x128x3 uint8 image transitions (+ 8-D state, 7-D action, reward), sent from one process to another over
TCP loopback. Two runs per transport: as fast as possible (throughput) and paced at a fixed rate (latency p50/p99, the
send-to-receive time; `time.monotonic` is one clock for all processes on Linux). Ours frames with msgpack + raw array
frames, copies each item once so the sender may reuse its arrays, keeps it until acknowledged, and the receiver
validates, deduplicates and acknowledges every item. Raw PUSH/PULL sends the same bytes with none of that.

    python benchmarks/transport.py        # writes benchmarks/results/transport.{md,json,png}
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tyro
import zmq

from benchmarks.report import RESULTS_DIR, free_port, pyplot, write_results


@dataclass
class Args:
    items: int = 5120
    """items in the throughput run"""
    latency_items: int = 1000
    """items in the paced latency run"""
    latency_rate: float = 200.0
    """items per second in the latency run"""
    repeats: int = 3
    """throughput runs per transport (the median is reported)"""
    port: int = 0
    """first TCP port to use on 127.0.0.1, one more per run (0: a free port for each, chosen by the OS)"""
    seed: int = 0
    """seed of the payload"""
    out_dir: Path = RESULTS_DIR
    """where transport.{md,json,png} go"""


BATCH = 64  # items per message in the batched raw baseline (= DataSender's max_batch)


def payload(rng):
    return {"image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
            "state": rng.standard_normal(8).astype(np.float32), "action": rng.standard_normal(7).astype(np.float32),
            "reward": np.float32(rng.standard_normal())}


def raw_receiver(endpoint, n, result):
    sock = zmq.Context().socket(zmq.PULL)
    sock.bind(endpoint)
    lat = []
    first = None
    while len(lat) < n:
        frames = sock.recv_multipart(copy=False)
        now = time.monotonic()
        first = first or now
        stamps = np.frombuffer(frames[0].buffer, np.float64)
        lat += (now - stamps).tolist()  # a batched message carries one stamp per item
    result.put((time.monotonic() - first, lat))


def raw_sender(endpoint, n, rate, seed, batch=1):
    """One message per item (batch=1), or `batch` items stacked per message: the same bytes, no framing."""
    sock = zmq.Context().socket(zmq.PUSH)
    sock.connect(endpoint)
    rng = np.random.default_rng(seed)
    item = payload(rng)
    time.sleep(0.3)
    for _ in range(-(-n // batch)):  # ceil: at least n items
        ts = np.full(batch, time.monotonic(), np.float64)
        if batch == 1:
            arrays = [item["image"], item["state"], item["action"], np.atleast_1d(item["reward"])]
        else:  # stacking is the copy a real sender needs to batch items it produced one by one
            arrays = [np.stack([item[k]] * batch) for k in ("image", "state", "action", "reward")]
        sock.send_multipart([ts, *arrays], copy=False)
        if rate:
            time.sleep(1 / rate)
    sock.close(linger=-1)


def our_receiver(endpoint, n, result):
    from common.transport import DataReceiver

    rx = DataReceiver(endpoint)
    lat = []
    first = None
    while len(lat) < n:
        msg = rx.recv(timeout=30)
        if msg is None:
            break
        now = time.monotonic()
        first = first or now
        lat.append(now - msg.meta["t"])
        rx.ack(msg)
    rx.flush_acks()
    time.sleep(0.5)  # let the last acknowledgements out
    result.put((time.monotonic() - 0.5 - first, lat))


def our_sender(endpoint, n, rate, seed):
    from common.transport import DataSender

    tx = DataSender(endpoint, max_pending=4096)
    rng = np.random.default_rng(seed)
    item = payload(rng)
    time.sleep(0.3)
    for _ in range(n):
        tx.send({"t": time.monotonic()}, item)
        if rate:
            time.sleep(1 / rate)
    assert tx.flush(60), "not all items were acknowledged"
    tx.close()


def run(kind: str, endpoint: str, n: int, rate: float, seed: int) -> tuple[float, list[float]]:
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    recv, send = (raw_receiver, raw_sender) if kind.startswith("raw") else (our_receiver, our_sender)
    rp = ctx.Process(target=recv, args=(endpoint, n, result))
    rp.start()
    extra = (BATCH,) if kind == "raw_batched" else ()
    sp = ctx.Process(target=send, args=(endpoint, n, rate, seed, *extra))
    sp.start()
    elapsed, lat = result.get(timeout=300)
    sp.join(60)
    rp.join(60)
    return elapsed, lat


def main(args: Args) -> None:
    small = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("items", "latency_items", "repeats")
             if getattr(args, k) < 1]
    if small:
        raise SystemExit(f"{', '.join(small)}: must be >= 1")
    item_bytes = sum(np.asarray(v).nbytes for v in payload(np.random.default_rng(0)).values())
    rows, port = [], args.port

    def next_port() -> int:
        nonlocal port
        if not args.port:
            return free_port()
        port += 1
        return port

    kinds = (("raw", "raw pyzmq PUSH/PULL, one message per item"),
             ("raw_batched", f"raw pyzmq PUSH/PULL, {BATCH} items stacked per message"),
             ("ours", "ours: DataSender -> DataReceiver (acked, dedup)"))
    for kind, label in kinds:
        tputs = []
        for _ in range(args.repeats):
            elapsed, lat = run(kind, f"tcp://127.0.0.1:{next_port()}", args.items, 0.0, args.seed)
            tputs.append((len(lat) - 1) / elapsed)
        tput = float(np.median(tputs))
        row = {"transport": label, "items_per_s": round(tput, 1), "MB_per_s": round(tput * item_bytes / 1e6, 1),
               "p50_latency_ms": None, "p99_latency_ms": None}
        if kind != "raw_batched":  # paced latency: one item at a time, batching plays no part
            _, lat = run(kind, f"tcp://127.0.0.1:{next_port()}", args.latency_items, args.latency_rate, args.seed)
            lat_ms = np.array(lat) * 1e3
            row.update(p50_latency_ms=round(float(np.percentile(lat_ms, 50)), 3),
                       p99_latency_ms=round(float(np.percentile(lat_ms, 99)), 3))
        rows.append(row)
        print(rows[-1], flush=True)
    ratio, ratio_batched = (rows[2]["items_per_s"] / rows[0]["items_per_s"],
                            rows[2]["items_per_s"] / rows[1]["items_per_s"])
    for r in rows:
        r["vs_raw"] = round(r["items_per_s"] / rows[0]["items_per_s"], 2)

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = ["raw, 1/msg", f"raw, {BATCH}/msg", "ours"]
    a.bar(names, [r["items_per_s"] for r in rows], color=["tab:gray", "silver", "tab:blue"])
    a.set_ylabel("items / s")
    a.set_title("throughput, 128x128x3 transitions")
    lat_rows = [rows[0], rows[2]]
    x = np.arange(2)
    b.bar(x - 0.2, [r["p50_latency_ms"] for r in lat_rows], 0.4, label="p50")
    b.bar(x + 0.2, [r["p99_latency_ms"] for r in lat_rows], 0.4, label="p99")
    b.set_xticks(x, ["raw, 1/msg", "ours"])
    b.set_ylabel("ms")
    b.set_title(f"latency at {args.latency_rate:.0f} items/s")
    b.legend()
    notes = (f"Item: 128x128x3 uint8 image + 8-D state + 7-D action + reward = {item_bytes} bytes. Sender and receiver "
             f"are separate processes on TCP loopback. Throughput: median of {args.repeats} runs of {args.items} "
             f"items sent as fast as possible (ours: until the last one is acknowledged). Latency: "
             f"{args.latency_items} items at {args.latency_rate:.0f}/s, send to receive. Ours batches under load "
             f"(Nagle-style: items that arrive while earlier ones await acknowledgement travel together, up to 64) "
             f"and sends one at a time when idle; the stacked raw row is the raw limit for batched sending. "
             f"**Ours / raw one-per-message: {ratio:.2f}** (target >= 0.8); ours / raw batched: {ratio_batched:.2f}.")
    path = write_results("transport", "Transport: data channel vs raw PUSH/PULL",
                         ["transport", "items_per_s", "MB_per_s", "vs_raw", "p50_latency_ms", "p99_latency_ms"], rows,
                         seeds=[args.seed], notes=notes, out_dir=args.out_dir, figure=fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
