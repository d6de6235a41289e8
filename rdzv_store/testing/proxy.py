"""``FaultProxy``: a loopback TCP proxy that injects network faults while traffic flows.

Put it between a client and a server and drive it from the test::

    with FaultProxy("127.0.0.1", server.port) as proxy:
        store = TCPStore("127.0.0.1", proxy.port, timeout=2)
        proxy.set_latency(0.05)            # +50 ms each way
        proxy.stall("to_client")           # replies stop flowing (held, not lost)
        proxy.resume()
        proxy.cut("rst")                   # every open connection reset, both sides
        proxy.refuse()                     # new connections: ECONNREFUSED
        proxy.black_hole()                 # new connections: accepted, never answered
        proxy.heal()                       # all of the above undone
        print(proxy.stats().bytes_to_server)

The proxy runs its own asyncio loop in a daemon thread, and every control method is a
plain blocking call that returns once the change is in effect, bounded by
``control_timeout``. So the same object serves a synchronous test and an asyncio test
(whose loop it never touches; ``async with FaultProxy(...)`` works too). Every wait inside
it is bounded or cancelled by ``close()``, and ``close()`` itself is bounded.

Faults apply per *direction*: ``"to_server"`` (what clients send), ``"to_client"`` (the
replies) or ``"both"``; they affect open connections and new ones alike:

* ``set_latency(s, jitter=j)``: each chunk is delivered ``s`` (+ up to ``j``) seconds after it
  was read, in order, while reading goes on (a one-way delay, like netem's);
* ``stall()``: stop reading and forwarding; data in flight is held and flows on ``resume()``;
  the sender's kernel buffers fill and it blocks, as behind a hung peer;
* ``drop()``: read and discard (the sender sees its data acknowledged, no answer ever comes);
* ``set_bandwidth(bytes_per_second)``: pace delivery;
* ``cut("rst" | "fin")``: close every open connection on both sides, with a reset or a FIN;
* ``refuse(how="refuse" | "rst" | "fin")``: new connections are refused (the listener is
  closed and later re-bound on the same port), or accepted and at once reset or closed;
* ``black_hole()``: new connections are accepted and read, never connected upstream,
  never answered.

Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

__all__ = ["Direction", "FaultProxy", "ProxyStats"]

Direction = Literal["to_server", "to_client", "both"]
_T = TypeVar("_T")
_CHUNK = 65536
_EOF = object()


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of what the proxy has done since it started."""

    bytes_to_server: int  # delivered upstream
    bytes_to_client: int  # delivered back to clients
    dropped_to_server: int  # read and discarded (drop(), black-holed connections)
    dropped_to_client: int
    accepted: int  # connections accepted (black-holed and refused-by-reset ones included)
    refused: int  # connections reset or closed at once by refuse(how="rst"/"fin")
    active: int  # connections open now
    upstream_failures: int  # connections closed because the upstream could not be reached


class _DirectionState:
    """The faults in force in one direction."""

    def __init__(self) -> None:
        self.latency = 0.0
        self.jitter = 0.0
        self.rate: float | None = None
        self.mode = "flow"  # flow | stall | drop
        self.flowing = asyncio.Event()
        self.flowing.set()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "stall":
            self.flowing.clear()
        else:
            self.flowing.set()


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a RST (SO_LINGER 0), not a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: client side, upstream side, a pump per direction."""

    def __init__(self, proxy: FaultProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.eofs = 0

    def close(self, how: str = "fin") -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for writer in (self.client_writer, self.upstream_writer):
            if writer is None:
                continue
            if how == "rst":
                _reset(writer)
            else:
                writer.transport.close()
        self.proxy._forget(self)

    async def pump(
        self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        state = self.proxy._state[direction]
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
        deliver = asyncio.ensure_future(self._deliver(direction, state, queue, writer))
        self.tasks.append(deliver)
        last = 0.0
        try:
            while True:
                await state.flowing.wait()
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    self.close("rst")  # the peer reset: reset the other side too
                    return
                if not data:
                    await queue.put(_EOF)
                    return
                if state.mode == "drop":
                    self.proxy._count_dropped(direction, len(data))
                    continue
                delay = state.latency + (random.uniform(0.0, state.jitter) if state.jitter else 0.0)
                last = max(last, loop.time() + delay)
                await queue.put((last, data))
        except asyncio.CancelledError:
            deliver.cancel()
            raise

    async def _deliver(
        self, direction: str, state: _DirectionState, queue: asyncio.Queue[Any], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if item is _EOF:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                self.eofs += 1
                if self.eofs == 2:
                    self.close("fin")
                return
            deliver_at, data = item
            delay = deliver_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await state.flowing.wait()
            if state.mode == "drop":
                self.proxy._count_dropped(direction, len(data))
                continue
            try:
                view = memoryview(data)
                while view:
                    rate = state.rate
                    piece = view if rate is None else view[: max(1, int(rate / 50))]
                    writer.write(piece)
                    await writer.drain()
                    self.proxy._count_delivered(direction, len(piece))
                    view = view[len(piece) :]
                    if rate is not None:
                        await asyncio.sleep(len(piece) / rate)
                    await state.flowing.wait()
            except OSError:
                self.close("rst")
                return


class FaultProxy:
    """A TCP proxy from ``host:port`` (default: loopback, an ephemeral port) to ``upstream``.

    Started by the constructor; ``port``/``address`` are where clients connect. Use it as
    a context manager (sync or async) or call ``close()``.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 5.0,
        control_timeout: float = 10.0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.connect_timeout = connect_timeout
        self.control_timeout = control_timeout
        self._links: set[_Link] = set()
        self._held: set[asyncio.StreamWriter] = set()  # black-holed client connections
        self._cond = threading.Condition()
        self._counts = {"to_server": 0, "to_client": 0, "drop_to_server": 0, "drop_to_client": 0}
        self._accepted = self._refused = self._upstream_failures = 0
        self._black_hole = False
        self._refuse_how: str | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rdzv-fault-proxy", daemon=True)
        self._thread.start()
        try:
            self._state = self._call_sync(lambda: {"to_server": _DirectionState(), "to_client": _DirectionState()})
            self.port = port
            self._run(self._listen())
        except BaseException:
            self._stop_loop()
            raise

    # -- plumbing ---------------------------------------------------------------------------
    def _run(self, coro: Awaitable[_T]) -> _T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy's control methods are for the test, not for its own loop")

        async def wrapper() -> _T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(self.control_timeout)

    def _call_sync(self, fn: Callable[[], _T]) -> _T:
        async def on_loop() -> _T:
            return fn()

        return self._run(on_loop())

    def _directions(self, direction: Direction) -> list[_DirectionState]:
        if direction == "both":
            return [self._state["to_server"], self._state["to_client"]]
        if direction not in self._state:
            raise ValueError(f"direction must be 'to_server', 'to_client' or 'both', not {direction!r}")
        return [self._state[direction]]

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _count_delivered(self, direction: str, n: int) -> None:
        with self._cond:
            self._counts[direction] += n
            self._cond.notify_all()

    def _count_dropped(self, direction: str, n: int) -> None:
        with self._cond:
            self._counts["drop_" + direction] += n
            self._cond.notify_all()

    def _forget(self, link: _Link) -> None:
        self._links.discard(link)
        self._notify()

    async def _listen(self) -> None:
        self._listener = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True, backlog=512
        )
        self.port = self._listener.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._cond:
            self._accepted += 1
            self._cond.notify_all()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._refuse_how is not None:
            with self._cond:
                self._refused += 1
            _reset(writer) if self._refuse_how == "rst" else writer.close()
            return
        if self._black_hole:
            await self._swallow(reader, writer)
            return
        link = _Link(self, (reader, writer))
        self._links.add(link)
        self._notify()
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError):
            with self._cond:
                self._upstream_failures += 1
            link.close("rst")
            return
        link.upstream_writer = up_writer
        if link.closed:  # cut while we were connecting
            _reset(up_writer)
            return
        up_sock = up_writer.get_extra_info("socket")
        if up_sock is not None:
            with contextlib.suppress(OSError):
                up_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.tasks += [
            asyncio.ensure_future(link.pump("to_server", reader, up_writer)),
            asyncio.ensure_future(link.pump("to_client", up_reader, writer)),
        ]

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.add(writer)
        self._notify()
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                self._count_dropped("to_server", len(data))
        except OSError:
            pass
        finally:
            self._held.discard(writer)
            writer.transport.close()
            self._notify()

    # -- faults -----------------------------------------------------------------------------
    def set_latency(self, seconds: float, jitter: float = 0.0, direction: Direction = "both") -> None:
        """Deliver each chunk ``seconds`` (plus a uniform 0..``jitter``) after it was read."""
        if seconds < 0 or jitter < 0:
            raise ValueError("latency and jitter must be >= 0")

        def apply() -> None:
            for state in self._directions(direction):
                state.latency, state.jitter = seconds, jitter

        self._call_sync(apply)

    def set_bandwidth(self, bytes_per_second: float | None, direction: Direction = "both") -> None:
        """Cap delivery at ``bytes_per_second`` (``None``: no cap)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bandwidth must be > 0 bytes per second, or None")

        def apply() -> None:
            for state in self._directions(direction):
                state.rate = bytes_per_second

        self._call_sync(apply)

    def _set_mode(self, mode: str, direction: Direction) -> None:
        def apply() -> None:
            for state in self._directions(direction):
                state.set_mode(mode)

        self._call_sync(apply)

    def stall(self, direction: Direction = "both") -> None:
        """Stop reading and forwarding in ``direction``; nothing is lost, ``resume()`` lets it flow."""
        self._set_mode("stall", direction)

    def drop(self, direction: Direction = "both") -> None:
        """Read and discard everything in ``direction`` (open connections too)."""
        self._set_mode("drop", direction)

    def resume(self, direction: Direction = "both") -> None:
        """Undo ``stall()``/``drop()`` in ``direction``."""
        self._set_mode("flow", direction)

    def cut(self, how: Literal["rst", "fin"] = "rst") -> int:
        """Close every open connection (both sides) with a reset or a FIN; returns how many."""
        if how not in ("rst", "fin"):
            raise ValueError("how must be 'rst' or 'fin'")

        def apply() -> int:
            links, held = list(self._links), list(self._held)
            for link in links:
                link.close(how)
            for writer in held:
                _reset(writer) if how == "rst" else writer.transport.close()
            return len(links) + len(held)

        return self._call_sync(apply)

    def black_hole(self, enabled: bool = True) -> None:
        """New connections are accepted and read but never connected upstream nor answered."""

        def apply() -> None:
            self._black_hole = enabled

        self._call_sync(apply)

    def refuse(self, enabled: bool = True, how: Literal["refuse", "rst", "fin"] = "refuse") -> None:
        """New connections: ``"refuse"`` stops listening (clients get ECONNREFUSED; the port is
        bound again on ``refuse(False)``), ``"rst"``/``"fin"`` accept and reset/close at once."""
        if how not in ("refuse", "rst", "fin"):
            raise ValueError("how must be 'refuse', 'rst' or 'fin'")
        self._run(self._refuse(enabled, how))

    async def _refuse(self, enabled: bool, how: str) -> None:
        if not enabled:
            self._refuse_how = None
            if self._listener is None:
                await self._listen()
            return
        if how == "refuse":
            self._refuse_how = None
            if self._listener is not None:
                self._listener.close()  # listening socket closed now; open connections stay
                self._listener = None
        else:
            self._refuse_how = how
            if self._listener is None:
                await self._listen()

    def heal(self) -> None:
        """No latency, no bandwidth cap, everything flowing, accepting and answering again."""
        self.set_latency(0.0)
        self.set_bandwidth(None)
        self.resume()
        self.black_hole(False)
        self.refuse(False)

    # -- observing --------------------------------------------------------------------------
    def stats(self) -> ProxyStats:
        with self._cond:
            return self._stats_locked()

    @property
    def bytes_to_server(self) -> int:
        return self.stats().bytes_to_server

    @property
    def bytes_to_client(self) -> int:
        return self.stats().bytes_to_client

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_until(self, predicate: Callable[[ProxyStats], bool], timeout: float = 10.0) -> ProxyStats:
        """Block until ``predicate(stats())`` holds; ``TimeoutError`` after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._stats_locked()), timeout):
                raise TimeoutError(f"proxy condition not met within {timeout} s; stats: {self._stats_locked()}")
            return self._stats_locked()

    def _stats_locked(self) -> ProxyStats:
        return ProxyStats(
            bytes_to_server=self._counts["to_server"],
            bytes_to_client=self._counts["to_client"],
            dropped_to_server=self._counts["drop_to_server"],
            dropped_to_client=self._counts["drop_to_client"],
            accepted=self._accepted,
            refused=self._refused,
            active=len(self._links) + len(self._held),
            upstream_failures=self._upstream_failures,
        )

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> ProxyStats:
        """Block until at least ``n`` connections are open through the proxy."""
        return self.wait_until(lambda s: s.active >= n, timeout)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close the listener and every connection (with a FIN), stop the thread. Idempotent."""
        if not self._thread.is_alive():
            return
        try:
            self._run(self._close())
        finally:
            self._stop_loop()

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        tasks = [t for link in list(self._links) for t in link.tasks]
        for link in list(self._links):
            link.close("fin")
        for writer in list(self._held):
            writer.transport.close()
        if tasks:
            await asyncio.wait(tasks, timeout=self.control_timeout / 2)
        await asyncio.sleep(0)  # let the transports' close callbacks run

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.control_timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> FaultProxy:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        return f"FaultProxy({self.address} -> {self.upstream[0]}:{self.upstream[1]})"
