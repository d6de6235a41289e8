"""Shared helpers for the reliability and security tests (imported by name; not a conftest).

* ``ServerProcess``: a ``StoreServer`` in a child process (so its memory and
  descriptors can be measured from outside through ``/proc``), which prints a
  readiness line and answers ``stats`` on stdin with a JSON line (connections,
  pending waiters, keys). Its stderr is the server log.
* ``raw_client``: a validated raw socket, for sending hand-made bytes.
* ``LONG``: True when ``RDZV_LONG_TESTS=1``; long variants are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rdzv_store import protocol as p

__all__ = [
    "LONG",
    "long_only",
    "scale",
    "ServerProcess",
    "raw_client",
    "recv_exactly",
    "wait_closed",
    "poll_until",
    "rss_kib",
    "fd_count",
    "CollectLog",
]

LONG = os.environ.get("RDZV_LONG_TESTS") == "1"
long_only = pytest.mark.skipif(not LONG, reason="long variant: set RDZV_LONG_TESTS=1")


def scale(short: int, long: int) -> int:
    """The iteration count for the current variant."""
    return long if LONG else short


def poll_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.005) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- a server in a child process ---------------------------------------------------------------

_SERVER_SCRIPT = r"""
import asyncio, json, logging, sys, threading
from rdzv_store import protocol as p
from rdzv_store.server import StoreServer

opts = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
limits = p.Limits(**opts.pop("limits", {}))
auth = opts.pop("secret", None)
if auth is not None:
    opts["secret"] = auth.encode()

async def main():
    server = StoreServer("127.0.0.1", 0, limits=limits, **opts)
    await server.start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    def stats():
        e = server.engine
        return json.dumps({"connections": server.connection_count, "waiters": e.pending_waiters(),
                           "keys": len(e.kv), "queues": len(e.queues)})
    def reader():
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "stats":
                async def on_loop():
                    return stats()
                fut = asyncio.run_coroutine_threadsafe(on_loop(), loop)
                print(fut.result(), flush=True)
            elif cmd == "close":
                asyncio.run_coroutine_threadsafe(server.close(), loop).result()
                print("closed", flush=True)
        loop.call_soon_threadsafe(done.set)
    threading.Thread(target=reader, daemon=True).start()
    print(f"READY {server.port}", flush=True)
    await done.wait()
    await server.close()

asyncio.run(main())
"""


class ServerProcess:
    """A StoreServer in a child process on 127.0.0.1 with a random port.

    ``opts`` are StoreServer keyword arguments (JSON-able; ``limits`` as a dict,
    ``secret`` as str). ``stats()`` asks the child for its counters. The log
    (stderr) is collected in ``log_lines`` by a reader thread.
    """

    def __init__(self, **opts: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SCRIPT, json.dumps(opts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log_lines: list[str] = []
        self._log_thread = threading.Thread(target=self._read_log, daemon=True)
        self._log_thread.start()
        line = self._readline(20.0)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r} {self.log_lines}")
        self.port = int(line.split()[1])
        self.pid = self.proc.pid
        self.address = f"127.0.0.1:{self.port}"

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_lines.append(line.rstrip("\n"))

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"no line from the server within {timeout} s")
        return self.proc.stdout.readline().strip()

    def command(self, cmd: str, timeout: float = 10.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._readline(timeout)

    def stats(self) -> dict[str, int]:
        return json.loads(self.command("stats"))

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def fd_count(self) -> int:
        return fd_count(self.pid)

    def warnings(self, needle: str = "") -> list[str]:
        return [line for line in list(self.log_lines) if line.startswith("WARNING") and needle in line]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.proc.stdout.close()  # type: ignore[union-attr]
        self._log_thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.proc.stderr.close()  # type: ignore[union-attr]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- raw sockets -------------------------------------------------------------------------------


def raw_client(port: int, host: str = "127.0.0.1", validate: bool = True, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if validate:
        sock.sendall(p.encode_validate() + p.encode_ping(0x1234))
        assert recv_exactly(sock, 4) == (0x1234).to_bytes(4, "little")
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the peer closed ``sock`` (EOF or reset) within ``timeout``; drains data."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except OSError:
            return True


def ping(sock: socket.socket, nonce: int = 77) -> None:
    sock.sendall(p.encode_ping(nonce))
    assert recv_exactly(sock, 4) == nonce.to_bytes(4, "little")


class CollectLog:
    """Collect records of one logger in-process (for in-process servers)."""

    def __init__(self, name: str = "rdzv_store") -> None:
        import logging

        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger(name)
        self._handler = logging.Handler()
        self._handler.emit = self.records.append  # type: ignore[method-assign]

    def __enter__(self) -> CollectLog:
        self._logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._handler)

    def warnings(self, needle: str = "") -> list[str]:
        return [r.getMessage() for r in self.records if r.levelname == "WARNING" and needle in r.getMessage()]


@contextlib.contextmanager
def background_server(**kwargs: Any) -> Iterator[Any]:
    """An in-process StoreServer on its own loop thread (``BackgroundServer``)."""
    from rdzv_store.server import BackgroundServer, StoreServer

    bg = BackgroundServer(StoreServer("127.0.0.1", 0, **kwargs))
    try:
        yield bg
    finally:
        bg.stop()


def on_loop(bg: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the background server's loop thread and return its result."""
    import asyncio

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), bg._loop).result(timeout=10)
