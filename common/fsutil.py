"""Crash-safe file writes: write a temp file, fsync it, rename it into place, fsync the directory. And the
single-owner lock files that keep a second writer off a directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exclusive_lock(path: Path) -> int | None:
    """An exclusive flock on the file `path` (created if missing): its fd, held until closed (a killed process's
    goes with it), or None when another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def atomic_write(path: Path, data: bytes | str) -> None:
    """After this returns, `path` holds `data` even across a crash; before, it holds the old content or nothing."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
