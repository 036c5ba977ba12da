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
        with pytest.raises(WorkerError, match="worker 1 died"):
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
    finally:
        pool.close(timeout=2)
