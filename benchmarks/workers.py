"""Forked load-generator processes with a common start signal, bounded in time, always reaped."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from typing import Any

_ctx = mp.get_context("fork")


class _Once:
    """``release()`` the shared semaphore at most once, so a failing worker can release it too."""

    def __init__(self, sem: Any) -> None:
        self._sem = sem
        self._done = False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._sem.release()


def _child(fn: Callable[..., Any], index: int, args: tuple, ready: Any, go: Any, results: Any) -> None:
    once = _Once(ready)
    try:
        out = fn(index, once, go, *args)
        results.put((index, out, None))
    except BaseException as exc:  # report, never hang the parent
        once.release()
        results.put((index, None, f"{type(exc).__name__}: {exc}"))


def run_forked(fn: Callable[..., Any], processes: int, args: tuple, timeout: float) -> tuple[float, list[Any]]:
    """Fork ``processes`` workers running ``fn(index, ready, go, *args)``.

    A worker sets up (connects, starts threads), calls ``ready.release()`` and
    then ``go.wait()``. Once every worker is ready the parent notes ``t0 =
    time.monotonic()`` and sets ``go``. Returns ``(t0, results by index)``; a
    worker that fails or does not finish within ``timeout`` is reported as an
    exception string in place of its result. Every child is killed and
    joined before returning.
    """
    ready = _ctx.Semaphore(0)
    go = _ctx.Event()
    results = _ctx.Queue()
    procs = [_ctx.Process(target=_child, args=(fn, i, args, ready, go, results), daemon=True)
             for i in range(processes)]
    out: list[Any] = [None] * processes
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        got_ready = 0
        while got_ready < processes:
            if not ready.acquire(timeout=max(0.01, deadline - time.monotonic())):
                raise TimeoutError(f"only {got_ready}/{processes} workers became ready")
            got_ready += 1
        t0 = time.monotonic()
        go.set()
        pending = processes
        while pending:
            try:
                index, value, error = results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{pending}/{processes} workers did not finish within {timeout} s") from None
            out[index] = value if error is None else RuntimeError(error)
            pending -= 1
        return t0, out
    finally:
        go.set()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        with contextlib.suppress(Exception):
            results.close()
