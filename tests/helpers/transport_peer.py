"""A sender or a receiver process for the kill -9 tests of common.transport.

receiver ENDPOINT LOG: stores every new item as a line "session seq" in LOG (flushed and fsynced) and only then
    acknowledges it; on start it reads LOG back (dropping a torn last line) and tells the receiver what it had stored.
sender ENDPOINT SPOOL ACKED N: sends items 0..N-1 (payload = a 64x64x3 image filled from the seq id), spooled in SPOOL,
    appends each acknowledged seq to ACKED, exits 0 once all N are acknowledged.
"""

import os
import sys
import time

import numpy as np

from common.transport import DataReceiver, DataSender


def receiver(endpoint: str, log_path: str) -> None:
    stored = []
    if os.path.exists(log_path):
        for line in open(log_path).read().split("\n"):
            parts = line.split()
            if len(parts) == 3 and parts[2] == "ok":  # complete lines only
                stored.append((parts[0], int(parts[1])))
    rx = DataReceiver(endpoint, delivered=stored)
    with open(log_path, "a") as log:
        while True:
            msg = rx.recv(timeout=1.0)
            if msg is None:
                continue
            img = msg.arrays["img"]
            assert img.shape == (64, 64, 3) and int(img[0, 0, 0]) == msg.seq % 251, "payload corrupted"
            log.write(f"{msg.meta['session']} {msg.seq} ok\n")
            log.flush()
            os.fsync(log.fileno())
            rx.ack(msg)


def sender(endpoint: str, spool: str, acked_path: str, n: int) -> None:
    tx = DataSender(endpoint, spool_dir=spool, resend_after=0.5, max_pending=64)
    acked = open(acked_path, "a")
    before = set(tx.pending)
    while tx.next_seq < n:
        tx.send({"i": tx.next_seq}, {"img": np.full((64, 64, 3), tx.next_seq % 251, np.uint8)})
        time.sleep(0.003)
        _record(tx, before, acked)
        before = set(tx.pending)
    while tx.pending:
        tx.poll(0.05)
        _record(tx, before, acked)
        before = set(tx.pending)


def _record(tx, before, acked) -> None:
    for seq in before - set(tx.pending):
        acked.write(f"{seq}\n")
    acked.flush()


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "receiver":
        receiver(sys.argv[2], sys.argv[3])
    else:
        sender(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
