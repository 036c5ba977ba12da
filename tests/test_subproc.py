"""Worker processes: answers, errors, deaths and deadlines are reported, never waited on forever."""

import os
import signal
import time

import pytest

from common.subproc import WorkerError, WorkerPool


class Echo:
    def __init__(self, fail_on_start=False):
        if fail_on_start:
            raise ValueError("no such task 'Foo'")

    def echo(self, x):
        return x

    def boom(self):
        raise RuntimeError("simulator exploded")

    def sleep(self, s):
        time.sleep(s)

    def pid(self):
        return os.getpid()

    def close(self):
        pass


def test_calls_run_on_every_worker():
    pool = WorkerPool(Echo, [{}, {}], timeout=10)
    try:
        assert pool.call([0, 1], "echo", [(1,), ("a",)]) == [1, "a"]
        assert len(set(pool.call([0, 1], "pid"))) == 2
    finally:
        pool.close()


def test_errors_in_construction_and_calls_are_reported():
    with pytest.raises(WorkerError, match="no such task 'Foo'"):
        WorkerPool(Echo, [{"fail_on_start": True}])
    pool = WorkerPool(Echo, [{}], timeout=10)
    try:
        with pytest.raises(WorkerError, match="simulator exploded"):
            pool.call([0], "boom")
        assert pool.call([0], "echo", [(3,)]) == [3]  # the worker keeps serving after an error
    finally:
        pool.close()


def test_dead_worker_and_deadline():
    pool = WorkerPool(Echo, [{}, {}], timeout=2)
    try:
        os.kill(pool.call([1], "pid")[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker 1 died during 'echo' \(exit code -9\)"):
            pool.call([1], "echo", [(1,)])
        assert time.monotonic() - start < 5
    finally:
        pool.close(timeout=2)
    pool = WorkerPool(Echo, [{}, {}], timeout=2)
    try:
        with pytest.raises(WorkerError, match="did not answer 'sleep' within 2 s"):
            pool.call([0, 1], "sleep", [(30,), (0,)])
        # the late answers are still in the pipes: the pool refuses further calls instead of returning them
        with pytest.raises(WorkerError, match="unusable after an earlier failure"):
            pool.call([0, 1], "echo", [(1,), (2,)])
        procs, start = list(pool.procs), time.monotonic()
        pool.close(timeout=20)  # the worker that missed its deadline is killed, not waited for
        assert time.monotonic() - start < 5 and not any(p.is_alive() for p in procs)
    finally:
        pool.close(timeout=2)


def test_a_worker_that_fails_to_construct_stops_the_others():
    import multiprocessing as mp

    with pytest.raises(WorkerError, match="no such task 'Foo'"):
        WorkerPool(Echo, [{}, {"fail_on_start": True}, {}], name="half")
    assert not [p for p in mp.active_children() if p.name.startswith("half-worker")]


def test_workers_exit_when_the_process_driving_them_is_killed():
    """kill -9 of the driving process (no close, no atexit): its workers notice (pipe closed, parent gone) and exit."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tests.test_subproc import Echo; "
            "from common.subproc import WorkerPool; pool = WorkerPool(Echo, [{}, {}], timeout=10); "
            "print(*pool.call([0, 1], 'pid'), flush=True); time.sleep(60)")
    root = str(Path(__file__).resolve().parents[1])
    driver = subprocess.Popen([sys.executable, "-c", code, root], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in driver.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "a worker outlived the process driving it"
    finally:
        if driver.poll() is None:
            driver.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its forkserver parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
