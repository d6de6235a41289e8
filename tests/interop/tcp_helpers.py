"""Helpers for the TCPStore interop tier (``test_tcpstore_interop.py``); no torch import here.

* ``ServerProcess``: our server as a separate process (``python -m rdzv_store
  serve --port 0``), its port read from the first stdout line, stopped with
  SIGTERM (killed if it does not exit) and its exit code checked;
* ``RecordingProxy``: a loopback TCP relay that records both directions of
  every connection, for byte-for-byte comparisons of two servers;
* ``AsyncFacade``: an ``AsyncTCPStore`` driven from blocking code (its own
  event-loop thread), so one test body exercises both of our clients;
* ``run_in_thread``: a call on a daemon thread whose result or exception is
  collected with a bounded join.

Everything is bounded: each wait has a deadline, each thread is joined with a
timeout, and each process is terminated by whoever started it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import rdzv_store

HOST = "127.0.0.1"


class ServerProcess:
    """``python -m rdzv_store serve --host 127.0.0.1 --port 0`` in a child process."""

    def __init__(self, start_timeout: float = 15.0) -> None:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rdzv_store", "serve", "--host", HOST, "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            self.first_line = self._read_first_line(start_timeout)
            prefix = f"rdzv-store listening on {HOST} port "
            if not self.first_line.startswith(prefix):
                raise AssertionError(f"unexpected first stdout line {self.first_line!r}; stderr: {self.stderr()}")
            self.port = int(self.first_line[len(prefix) :])
        except BaseException:
            self.kill()
            raise

    def _read_first_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        data = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"server printed no line within {timeout}s; stderr: {self.stderr()}")
                if not sel.select(remaining):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(
                        f"server exited (rc={self.proc.wait(5)}) before printing its port; stderr: {self.stderr()}"
                    )
                data += chunk
        return data.split(b"\n", 1)[0].decode()

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; the CLI exits 0 on SIGTERM. Kill (and fail) if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"server ignored SIGTERM for {timeout}s; stderr: {self.stderr()}") from None
        self._close_files()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_files()

    def _close_files(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def free_listening_socket() -> tuple[int, int]:
    """A bound, listening loopback socket for ``master_listen_fd``: (fd, port).

    Ownership of the fd passes to the callee (torch closes it), so there is no
    race for the port between choosing it and binding it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    return sock.detach(), port


class ThreadCall:
    """``fn(*args)`` on a daemon thread; ``result(timeout)`` re-raises its exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.started = threading.Event()
        self.done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            self.started.set()
            try:
                self._value = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                self._error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(10), "thread did not start"

    def result(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"call still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._value

    def error(self, timeout: float = 10.0) -> BaseException:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"call still running after {timeout}s")
        assert self._error is not None, f"expected an exception, got {self._value!r}"
        return self._error


def run_in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ThreadCall:
    return ThreadCall(fn, *args, **kwargs)


class RecordingProxy:
    """Loopback relay to ``upstream_port`` that records both byte streams of each connection.

    ``streams[i] = (client_to_server, server_to_client)`` for the i-th accepted
    connection, in accept order. The recorded bytes are exactly what was
    forwarded, so once a client call that reads a reply has returned, every
    reply byte before it is already recorded.
    """

    def __init__(self, upstream_port: int, max_connections: int = 8) -> None:
        self.upstream_port = upstream_port
        self.streams: list[tuple[bytearray, bytearray]] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((HOST, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._max = max_connections
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        accepted = 0
        while not self._closed.is_set() and accepted < self._max:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            accepted += 1
            client.settimeout(None)
            upstream = socket.create_connection((HOST, self.upstream_port), timeout=10)
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c2s, s2c = bytearray(), bytearray()
            with self._lock:
                self.streams.append((c2s, s2c))
                self._sockets += [client, upstream]
                for src, dst, log in ((client, upstream, c2s), (upstream, client, s2c)):
                    t = threading.Thread(target=self._pump, args=(src, dst, log), daemon=True)
                    self._threads.append(t)
                    t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            log += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()
        self._listener.close()
        self._acceptor.join(timeout)
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in [self._acceptor, *threads]), "proxy threads did not stop"


class AsyncFacade:
    """An ``rdzv_store.AsyncTCPStore`` on its own event-loop thread, called like a blocking store.

    Every coroutine method becomes a blocking call bounded by ``call_timeout``.
    Calls from several threads run concurrently on the one loop, which is how
    the asyncio client is meant to be used (many coroutines, one store).
    """

    def __init__(self, host: str, port: int, timeout: Any, use_libuv: bool = True, call_timeout: float = 30.0) -> None:
        self._call_timeout = call_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.store = rdzv_store.AsyncTCPStore(host, port, timeout=timeout, use_libuv=use_libuv)
        try:
            self._run(self.store.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._call_timeout)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self._run(attr(*args, **kwargs))
        return attr

    def close(self) -> None:
        try:
            self._run(self.store.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
