"""A ``StoreServer`` on its own event-loop thread, for tests (sync or asyncio)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from ..server import StoreServer

__all__ = ["ServerThread", "running_server"]

_T = TypeVar("_T")


class ServerThread:
    """``StoreServer(host, port, **options)`` started on a private loop in a daemon thread.

    ``server`` is the ``StoreServer``; ``call(fn)`` runs ``fn()`` on the server's loop
    (the engine is only touched there) and returns its result; ``stats()`` reports the
    connections, blocked waiters and keys. ``stop()`` (or leaving the ``with`` block)
    closes the server, so blocked clients fail at once. Every wait is bounded by
    ``timeout`` seconds.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 10.0, **options: Any) -> None:
        self.timeout = timeout
        self.server = StoreServer(host, port, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rdzv-store-test-server", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout)
        except BaseException:
            self._stop_loop()
            raise

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    def call(self, fn: Callable[[], _T]) -> _T:
        async def on_loop() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(self.timeout)

    def stats(self) -> dict[str, int]:
        """``connections``, ``waiters`` (blocked wait/get/barrier/queue_pop) and ``keys`` now."""
        s = self.server
        return self.call(
            lambda: {"connections": s.connection_count, "waiters": s.engine.pending_waiters(), "keys": len(s.engine.kv)}
        )

    def wait_until(self, predicate: Callable[[dict[str, int]], bool], timeout: float = 10.0) -> dict[str, int]:
        """Poll ``stats()`` (every 5 ms) until ``predicate(stats)`` holds; ``TimeoutError`` after
        ``timeout`` seconds. E.g. ``wait_until(lambda s: s["waiters"] == 3)``: three clients blocked."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() >= deadline:
                raise TimeoutError(f"server condition not met within {timeout} s; stats: {stats}")
            time.sleep(0.005)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(self.timeout)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def running_server(host: str = "127.0.0.1", port: int = 0, **options: Any) -> ServerThread:
    """A started ``ServerThread``; use it as a context manager (``with running_server() as srv``)."""
    return ServerThread(host, port, **options)
