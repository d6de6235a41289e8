"""The asyncio TCPStore server: wire protocol (``protocol``) + semantics (``engine``).

One event loop; each connection is a non-blocking socket registered with the
loop's ``add_reader`` (``_Connection`` says why not asyncio's transports).
Each connection's requests are handled in order and each request atomically,
because the engine is only touched from the loop thread. A client that sends half a request holds
only its own buffer; nobody else waits for it (torch's legacy server blocks
everyone).

What we do differently from torch's servers, on purpose:

* bind only the addresses ``host`` resolves to (torch binds every interface,
  dual-stack ``[::]``, whatever host it is given);
* never resolve peer names (torch calls ``getnameinfo`` per connection, which
  stalls 5 s per connection where reverse DNS is slow);
* listen with a backlog of at least the system's ``somaxconn``;
* close a connection that sends a malformed, oversize or failing request with
  one warning naming the peer and the reason; everyone else carries on;
* cap connections (``max_connections``) and stop reading from a client that
  does not read its replies (write-buffer backpressure), so memory stays
  bounded.

Memory bounds, decided here (see ``StoreServer`` for the parameters):

* one incomplete request may hold at most ``limits.max_request`` bytes
  (checked as each length prefix is read, before anything is buffered); a
  field of 64 KiB or more is received into a buffer of its final size once an
  eighth of it has arrived, and that whole buffer counts as held;
* all incomplete requests together may hold at most ``max_buffered`` bytes;
  the connection whose bytes would cross that budget is closed (one warning);
* replies: a batch of pipelined requests is answered in slices of
  ``_REPLY_BATCH`` bytes, and reading stops as soon as the client's write
  buffer is over the high-water mark, so cheap requests with big replies
  (pipelined GETs of one large value) cannot pile up replies; a single
  MULTI_GET reply may not exceed ``max_reply`` bytes (its keys may repeat, so
  a 1 MiB request could otherwise ask for a terabyte);
* a connection stuck *in the middle of* a request (no byte for
  ``request_timeout`` seconds, while we are reading) is closed. Connections
  idle *between* requests are never timed out: torch workers legitimately
  sit idle for hours. Dead peers are found by TCP keepalive instead.

Metrics (``StoreServer(metrics=...)``, ``rdzv_store.metrics``): when off,
``_Connection._metrics`` is ``None`` and the hooks below cost one ``is None``
test per request. When on, the hooks are, and should stay, only these:

* ``_Connection._process``: per handled request, four increments of
  ``metrics.counts`` (the latency bucket, nanoseconds, request bytes, reply
  bytes; inline, as ``ServerMetrics.record`` would do them). Request bytes are
  the decoder's ``last_size`` (the wire size of the request it just returned);
  time is ``perf_counter_ns`` chained from request to request. Measured
  (``benchmarks/bench_metrics.py``) at 0.6-0.7 us per request;
* ``StoreServer._admit``: ``accepted`` / ``refused``;
* ``_Connection._lost``: ``closed(reason, bytes received)``, the
  reason set by ``close(..., why=)`` (or "eof"/"reset" when the peer ended it);
* ``_Connection._notify``: ``released`` per waiter released.

Everything else (open connections, keys, waiters, the incomplete-request
budget) is read from the server's own state at scrape time (``_sample``).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable
from time import perf_counter_ns
from typing import cast

from . import protocol as p
from .auth import AUTH_PREFIX, AuthVerifier, coerce_secret
from .engine import Engine, Waiter
from .errors import StoreConnectionError, format_keys
from .metrics import BUCKET_OF_BITS, CONTENT_TYPE, RX, SLOTS, SUM, TX, Sample, ServerMetrics
from .metrics_http import MetricsEndpoint

__all__ = ["StoreServer", "BackgroundServer", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_BUFFERED", "DEFAULT_REQUEST_TIMEOUT"]

log = logging.getLogger("rdzv_store.server")

DEFAULT_MAX_CONNECTIONS = 65536
DEFAULT_MAX_BUFFERED = 1 << 30  # 1 GiB of incomplete requests, all connections together
DEFAULT_REQUEST_TIMEOUT = 300.0  # torch's default store timeout: its client has given up by then
_READ_BUFFER = 256 * 1024  # one recv_into, shared by all connections (asyncio's own read size)
_REPLY_BATCH = 1 << 20  # flush replies (and check backpressure) every MiB of a pipelined batch
_IN_PLACE = 64 * 1024  # request fields this big are received into their final buffer (StreamDecoder)
_JOIN_BELOW = 64 * 1024  # pipelined replies smaller than this in all are joined into one send
_IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)
_HIGH_WATER = 64 * 1024  # unsent reply bytes above which we stop reading (asyncio's default too)
_ACCEPT_BATCH = 512  # connections accepted per wake-up of a listener
_ACCEPT_RETRY = 0.5  # seconds before accepting again after EMFILE/ENFILE/ENOBUFS/ENOMEM
# TCP keepalive on accepted sockets: a peer whose host died is dropped after ~2 min of silence
# (idle + interval * count), while a live idle peer answers the probes and is kept forever.
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))


# A reply: bytes, or for a big value [its length prefix, the value], sent as they are rather
# than joined (joining an 8 MiB value cost 4 ms of an 8 MiB compare_set on the server).
Reply = bytes | list[bytes]


_CHECK_REPLY = {True: p.reply_u8(p.READY), False: p.reply_u8(p.NOT_READY)}  # CHECK's two replies, made once


def _value_reply(value: bytes) -> Reply:
    n = len(value)
    return p.reply_u64(n) + value if n < _JOIN_BELOW else [p.reply_u64(n), value]


def _tune_listener(sock: socket.socket) -> None:
    """Keepalive and TCP_NODELAY, set once on the listening socket.

    Linux copies both to every accepted socket, which saves five setsockopt calls per
    connection in a connection storm (``tests/test_reliability_hostile.py`` checks that the
    accepted sockets have them). NODELAY: replies are single small writes that must not wait
    for the peer's delayed ACK (asyncio's transports set it per connection for the same reason).
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _KEEPALIVE:
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass  # both are optimisations and safety nets, not requirements
_Q = p.QueryType


def _listen_backlog() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = int(f.read())
    except (OSError, ValueError):
        somaxconn = socket.SOMAXCONN
    return max(somaxconn, 4096)


class _Connection:
    """One client connection on a raw non-blocking socket: decode requests, run them, send replies.

    Why not asyncio's transports and protocols: per small request, the transport layer
    (``_read_ready``, ``get_buffer``/``buffer_updated``, ``write``'s buffering and flow control)
    costs about as much Python as decoding and running the request. Measured side by side on
    this machine kind (``benchmarks/floor_servers.py``), an asyncio ``BufferedProtocol`` echo
    server spends about twice the CPU per request of the same echo on ``loop.add_reader`` +
    ``recv_into`` + ``send``. The loop still owns readiness, so the server embeds in any running
    selector-based loop (asyncio's default on Unix, and uvloop).

    What the transport used to do for us, and where it went:

    * reading: ``_on_readable`` ``recv_into``s the server's one shared read buffer. A read that
      is one whole request, with nothing pending, is parsed from it and answered at once
      (``StreamDecoder.sole``); anything else is lent to this connection's decoder, which keeps
      a copy only of what is left incomplete (a fresh ``bytes`` per read would cost glibc an
      mmap/mremap/munmap per request at asyncio's 256 KiB read size), and answered as a batch
      (``_process``); a big field is received straight into its own final buffer instead;
    * writing: ``_send`` tries ``send`` at once (nearly always complete for small replies), and
      only what the kernel did not take is queued, as memoryviews, for ``_on_writable``;
    * flow control: when more than ``_HIGH_WATER`` bytes of replies are queued (a client that
      does not read them), reading stops until the queue drains, so replies cannot pile up;
    * teardown: a send error never tears the connection down in the middle of someone else's
      request (``_notify`` runs inside another connection's SET); ``_fail`` defers it to the
      next loop iteration, as asyncio's transports do.
    """

    __slots__ = (
        "_server", "_loop", "_engine", "_decoder", "_start", "_fast", "_handlers", "_magic", "_auth",
        "_waiters", "_sock", "_fd", "peer", "_paused", "_rx", "_held", "_stall", "_out", "_metrics",
        "_admitted", "_why", "_queue", "_queued", "_reading", "_writing", "_closing", "_closed",
    )  # fmt: skip

    def __init__(self, server: StoreServer, sock: _socket.socket | None = None, peer: str = "?") -> None:
        self._server = server
        # Set by StoreServer.start before any connection is accepted (None only for the
        # in-process benchmark's connection, which never touches the loop).
        self._loop = cast(asyncio.AbstractEventLoop, server._loop)
        self._engine = server.engine
        self._decoder = p.StreamDecoder(server.limits.max_request, in_place=_IN_PLACE, keep_bytearray=True)
        self._start = server._start_parser
        self._fast = server._fast_parser
        # Empty until the handshake is done (every request type may be served after _validate).
        self._handlers = _UNVALIDATED
        self._magic = False  # VALIDATE seen (with a secret, the check must follow)
        self._auth = server.auth
        self._waiters: list[Waiter] = []
        self._sock = sock  # None only for a connection built without one (never served)
        self._fd = -1 if sock is None else sock.fileno()
        self.peer = peer
        self._paused = False  # reading stopped because the client does not read its replies
        self._rx = 0  # bytes received, to tell a stalled request from a slow one
        self._held = 0  # bytes of an incomplete request, counted in server.buffered
        self._stall: asyncio.TimerHandle | None = None
        # The replies of the batch being processed; a STOP_WAITING released by a request of
        # this same batch must queue behind the replies before it, not jump ahead of them.
        self._out: list[bytes] | None = None
        self._metrics = server.metrics  # None: metrics off
        self._admitted = False
        self._why: str | None = None  # why we closed it (a metrics.CLOSE_REASONS key)
        self._queue: deque[bytes | memoryview] = deque()  # replies the kernel has not taken yet
        self._queued = 0  # their bytes
        self._reading = False  # registered with loop.add_reader
        self._writing = False  # registered with loop.add_writer
        self._closing = False  # no more requests; the socket closes once the queue is sent
        self._closed = False  # socket closed, waiters dropped, server forgot us

    # -- readiness callbacks -----------------------------------------------------------------
    def _on_readable(self) -> None:
        assert self._sock is not None
        decoder = self._decoder
        slot = decoder.field_slot  # a big field's final buffer, or None: the shared one
        try:
            nbytes = self._sock.recv_into(self._server._read_buffer if slot is None else slot)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # ECONNRESET and friends
            self._lost(exc)
            return
        if not nbytes:  # EOF: what was received has been answered; send the rest and close
            self._shutdown()
            return
        self._rx += nbytes
        if slot is not None:
            decoder.filled(nbytes)
            self._process()
            return
        read = self._server._read_bytes
        # The common case, one whole request in this read and nothing pending, is served here,
        # without _process's batch (list, try/finally, budget), lend/decode/keep and _send_all:
        # with the handler and parser trims beside it, the instructions our code adds per small
        # request to the event loop's own fell by a third to a half (bench_instructions.py). With
        # metrics on, requests go through _process, which times them.
        request = decoder.sole(read, nbytes, self._fast) if self._metrics is None else None
        if request is None:
            # Lent, not copied: _process hands it back (decode's NEED_DATA, or keep()) before
            # any other connection reads into the shared buffer.
            decoder.lend(read, nbytes)
            self._process()
            return
        handler = self._handlers.get(request[0])  # empty until validated: _handle
        try:
            reply = self._handle(request) if handler is None else handler(self, request)
        except (p.ProtocolError, ValueError) as exc:
            self._reject(exc)
            return
        # A STOP_WAITING this request released on this connection went out first (_notify,
        # with no batch in progress), as it would have been queued first in a batch.
        if reply is not None:
            if isinstance(reply, bytes):
                self._send(reply)
            else:  # [length prefix, big value]
                self._send_parts(reply)

    def _on_writable(self) -> None:
        assert self._sock is not None
        queue = self._queue
        try:
            while queue:
                first = queue[0]
                sent = self._sock.send(first)
                self._queued -= sent
                if sent < len(first):
                    queue[0] = memoryview(first)[sent:]
                    return
                queue.popleft()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        self._loop.remove_writer(self._fd)
        self._writing = False
        if self._closing:
            self._lost(None)
        elif self._paused:  # the client read its replies: serve what arrived meanwhile
            self._paused = False
            self._start_reading()
            if self._decoder.buffered or self._held:
                self._process()

    # -- requests ----------------------------------------------------------------------------
    def _process(self) -> None:
        decoder = self._decoder
        replies: list[bytes] = []
        self._out = replies
        size = 0
        metrics = self._metrics
        if metrics is not None:
            counts = metrics.counts
            t0 = perf_counter_ns()
        try:
            while True:
                request = decoder.decode(self._start, self._fast)
                if request is p.NEED_DATA:
                    break
                handler = self._handlers.get(request[0])  # empty until validated: _handle
                reply = self._handle(request) if handler is None else handler(self, request)
                if reply is not None:
                    if isinstance(reply, bytes):
                        replies.append(reply)
                        sent = len(reply)
                    else:  # [length prefix, big value]
                        replies += reply
                        sent = len(reply[0]) + len(reply[1])
                    size += sent
                if metrics is not None:  # ServerMetrics.record, inline
                    t1 = perf_counter_ns()
                    ns = t1 - t0
                    t0 = t1
                    base = request[0] * SLOTS
                    counts[base + BUCKET_OF_BITS[(ns - 1).bit_length()]] += 1
                    counts[base + SUM] += ns
                    counts[base + RX] += decoder.last_size
                    if reply is not None:
                        counts[base + TX] += sent
                if reply is not None:
                    if size >= _REPLY_BATCH:
                        self._out = None
                        self._send_all(replies, size)  # may pause reading
                        replies = self._out = []
                        size = 0
                        if self._paused or self._closing:
                            break  # the rest stays in the decoder until the client reads
        except (p.ProtocolError, ValueError) as exc:
            self._out = None
            self._send_all(replies, size)
            self._reject(exc)
            return
        finally:
            # The shared read buffer is the next connection's after we return. ``held``: bytes
            # of an incomplete request (the decoder's buffer plus the fields its parser already
            # consumed); zero after every complete request, so one check then.
            held = decoder.keep()
        self._out = None
        if replies:
            self._send_all(replies, size)
        if held or self._held:
            self._account(held)

    def _reject(self, exc: Exception) -> None:
        """A malformed request (``ProtocolError``) or one the engine refused (``ValueError``):
        close this connection, after the replies to the requests before it."""
        self.close(str(exc), why="malformed" if isinstance(exc, p.ProtocolError) else "invalid")

    # -- replies -----------------------------------------------------------------------------
    def _send_all(self, replies: list[bytes], size: int) -> None:
        if not replies:
            return
        if len(replies) == 1:
            self._send(replies[0])
        elif size < _JOIN_BELOW:
            self._send(b"".join(replies))  # one small copy beats one iovec per reply
        else:
            self._send_parts(replies)

    def _send_parts(self, parts: list[bytes]) -> None:
        """Big replies: one ``sendmsg`` of them as they are (no joined copy), the rest queued."""
        if self._closed or self._sock is None:
            return
        if not self._queue:
            try:
                sent = self._sock.sendmsg(parts[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            done = 0
            while done < len(parts) and sent >= len(parts[done]):
                sent -= len(parts[done])
                done += 1
            if done == len(parts):
                return
            parts = [memoryview(parts[done])[sent:], *parts[done + 1 :]]  # type: ignore[list-item]
        for part in parts:  # the kernel took what it could: queue the rest, no second try
            self._enqueue(part)

    def _send(self, data: bytes | memoryview) -> None:
        if self._closed or self._sock is None:
            return
        if not self._queue:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._enqueue(data)

    def _enqueue(self, data: bytes | memoryview) -> None:
        """Queue unsent reply bytes for ``_on_writable`` (in order, after what is queued)."""
        if not self._queue:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > _HIGH_WATER and not self._paused:
            self._paused = True  # the client is not reading its replies: stop reading its requests
            self._stop_reading()

    # -- incomplete requests: server-wide budget and stall timeout ---------------------------
    def _account(self, held: int) -> None:
        server = self._server
        server.buffered += held - self._held
        self._held = held
        if not held:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            return
        if server.buffered > server.max_buffered:
            self.close(
                f"server-wide budget for incomplete requests ({server.max_buffered} bytes) exhausted; "
                f"this connection holds {held} bytes of an incomplete request",
                why="budget",
            )
            return
        if self._stall is None and server.request_timeout is not None and not self._closing:
            self._stall = self._loop.call_later(server.request_timeout, self._check_stall, self._rx)

    def _check_stall(self, rx_then: int) -> None:
        self._stall = None
        if not self._held or self._closing:
            return
        timeout = self._server.request_timeout
        assert timeout is not None
        if self._paused or self._rx != rx_then:  # our fault, or the client is still sending
            self._stall = self._loop.call_later(timeout, self._check_stall, self._rx)
            return
        self.close(f"incomplete request ({self._held} bytes) and nothing received for {timeout:g} s", why="stalled")

    def _release(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._held:
            self._server.buffered -= self._held
            self._held = 0

    # -- lifetime ----------------------------------------------------------------------------
    def _start_reading(self) -> None:
        if not self._reading and not self._closing and self._sock is not None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def close(self, reason: str | None = None, why: str = "shutdown") -> None:
        """Close this connection once its queued replies are sent; ``reason`` is logged, ``why`` is the metrics' close reason."""
        if self._why is None:
            self._why = why
        if reason is not None:
            log.warning("closing connection from %s: %s", self.peer, reason)
        self._drop_waiters()
        self._release()
        self._shutdown()

    def _shutdown(self) -> None:
        """Read no more; close the socket now, or once the queued replies are sent."""
        self._closing = True
        self._stop_reading()
        if not self._queue:
            self._lost(None)

    def _fail(self, exc: OSError) -> None:
        """A send failed: stop now, tear down on the next loop iteration (we may be inside another
        connection's request, e.g. releasing its waiters)."""
        if not self._closing:
            self._closing = True
            self._stop_reading()
            self._loop.call_soon(self._lost, exc)

    def _lost(self, exc: Exception | None) -> None:
        """Tear down: unregister, close the socket, drop waiters, forget us. Idempotent."""
        if self._closed:
            return
        self._closed = self._closing = True
        self._stop_reading()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._queue.clear()
        self._queued = 0
        if self._sock is not None:
            self._sock.close()
        if self._held:
            log.warning("connection from %s lost in the middle of a request (%d bytes received)", self.peer, self._held)
        self._drop_waiters()
        self._release()
        self._server._forget(self)
        if self._metrics is not None and self._admitted:
            self._metrics.closed(self._why or ("eof" if exc is None else "reset"), self._rx)

    def _handle(self, request: p.Request) -> Reply | None:
        """A request no handler of ``_handlers`` takes: the handshake's, or one not allowed."""
        if self._handlers is _UNVALIDATED:
            return self._handshake(request)
        handler = self._handlers.get(request[0])
        if handler is None:
            raise p.ProtocolError(f"request type {request[0]} is not allowed after the handshake")
        return handler(self, request)

    def _validate(self) -> None:
        """Every request type may be served from now on (GET checks for the secret's key)."""
        self._handlers = _HANDLERS if self._auth is None else _HANDLERS_WITH_AUTH

    def _handshake(self, request: p.Request) -> Reply | None:
        op = request[0]
        if not self._magic:
            if op != _Q.VALIDATE or request[1] != p.MAGIC:
                raise p.ProtocolError("the first request must be VALIDATE with torch's magic number")
            self._magic = True
            if self._auth is None:
                self._validate()
            return None
        # A server with a shared secret (``auth``), before the client passed the check.
        assert self._auth is not None
        if op == _Q.PING:
            return request[1]  # part of every client's handshake
        if op == _Q.GET and request[1].startswith(AUTH_PREFIX):
            return self._get_or_auth(request)
        if self._auth.allow_torch_clients:
            self._validate()  # a client that skips the check (torch's): allowed
            return self._handle(request)
        raise p.ProtocolError(
            f"request type {op} before the shared-secret check; this server requires the secret "
            "(a torch client? the operator can allow them with allow_torch_clients)"
        )

    def _get_or_auth(self, r: p.Request) -> Reply:
        """GET, when the server has a secret: a key with the auth prefix is the check."""
        if r[1].startswith(AUTH_PREFIX):
            assert self._auth is not None
            try:
                proof = self._auth.verify(r[1])  # ValueError: one warning, connection closed
            except ValueError:
                self._why = "auth"
                raise
            self._validate()
            return p.reply_bytes(proof)
        return self._get(r)

    def _notify(self) -> None:
        if self._metrics is not None:
            self._metrics.released += 1
        if self._out is not None:
            self._out.append(b"\x00")  # released by a request of our own batch: keep the order
        elif not self._closing:
            self._send(b"\x00")  # STOP_WAITING

    def _register(self, waiter: Waiter | None) -> bytes | None:
        if waiter is None:
            return p.reply_u8(p.STOP_WAITING)
        self._waiters = [w for w in self._waiters if not w.done]
        self._waiters.append(waiter)
        return None

    def _drop_waiters(self) -> None:
        for waiter in self._waiters:
            self._engine.cancel(waiter)
        self._waiters.clear()

    # -- handlers ----------------------------------------------------------------------------
    def _set(self, r: p.Request) -> None:
        self._engine.set(r[1], r[2])

    def _get(self, r: p.Request) -> Reply:
        value = self._engine.get(r[1])
        return _value_reply(b"" if value is None else value)  # libuv: missing -> empty

    def _add(self, r: p.Request) -> bytes:
        try:
            return p.reply_i64(self._engine.add(r[1], r[2]))
        except ValueError as exc:
            raise ValueError(f"ADD on key {format_keys([r[1]])}: stored value is {exc}") from None

    def _compare_set(self, r: p.Request) -> Reply:
        return _value_reply(self._engine.compare_set(r[1], r[2], r[3]))

    def _check(self, r: p.Request) -> bytes:
        return _CHECK_REPLY[self._engine.check(r[1])]

    def _wait(self, r: p.Request) -> bytes | None:
        return self._register(self._engine.wait(r[1], self._notify))

    def _num_keys(self, r: p.Request) -> bytes:
        return p.reply_i64(self._engine.num_keys())

    def _delete_key(self, r: p.Request) -> bytes:
        return p.reply_i64(1 if self._engine.delete(r[1]) else 0)

    def _append(self, r: p.Request) -> None:
        self._engine.append(r[1], r[2])

    def _multi_get(self, r: p.Request) -> bytes:
        values = [b"" if v is None else v for v in self._engine.multi_get(r[1])]
        if len(values) > 1:
            size = sum(map(len, values))
            if size > self._server.max_reply:
                raise ValueError(f"MULTI_GET reply of {size} bytes exceeds the limit of {self._server.max_reply}")
        return p.reply_list(values)

    def _multi_set(self, r: p.Request) -> None:
        self._engine.multi_set(r[1], r[2])

    def _cancel_wait(self, r: p.Request) -> bytes:
        self._drop_waiters()
        return p.reply_u8(p.WAIT_CANCELED)

    def _ping(self, r: p.Request) -> bytes:
        return r[1]

    def _queue_push(self, r: p.Request) -> None:
        self._engine.queue_push(r[1], r[2])

    def _queue_pop(self, r: p.Request) -> bytes:
        return p.reply_queue_pop(*self._engine.queue_pop(r[1]))

    def _queue_len(self, r: p.Request) -> bytes:
        return p.reply_i64(self._engine.queue_len(r[1]))

    def _list_keys(self, r: p.Request) -> bytes:
        keys = self._engine.list_keys()
        return p.reply_i64(len(keys)) + p.reply_list(keys)

    def _barrier(self, r: p.Request) -> bytes | None:
        try:
            return self._register(self._engine.barrier(r[1], r[2], self._notify))
        except ValueError as exc:
            raise ValueError(f"BARRIER on key {format_keys([r[1]])}: stored value is {exc}") from None


# One dispatch table for every connection (a per-connection dict of bound methods costs
# 18 objects per connection, which shows in connection storms). Keyed by plain ints: a request
# type is ``buf[pos]``, a cached small int, so a lookup matches by identity (an IntEnum key
# would make every lookup a rich comparison).
_Handler = Callable[[_Connection, p.Request], "Reply | None"]
_UNVALIDATED: dict[int, _Handler] = {}  # before the handshake, every request goes to _handle
_HANDLERS: dict[int, _Handler] = {
    _Q.SET: _Connection._set,
    _Q.GET: _Connection._get,
    _Q.ADD: _Connection._add,
    _Q.COMPARE_SET: _Connection._compare_set,
    _Q.CHECK: _Connection._check,
    _Q.WAIT: _Connection._wait,
    _Q.GETNUMKEYS: _Connection._num_keys,
    _Q.DELETE_KEY: _Connection._delete_key,
    _Q.APPEND: _Connection._append,
    _Q.MULTI_GET: _Connection._multi_get,
    _Q.MULTI_SET: _Connection._multi_set,
    _Q.CANCEL_WAIT: _Connection._cancel_wait,
    _Q.PING: _Connection._ping,
    _Q.QUEUE_PUSH: _Connection._queue_push,
    _Q.QUEUE_POP: _Connection._queue_pop,
    _Q.QUEUE_LEN: _Connection._queue_len,
    _Q.LIST_KEYS: _Connection._list_keys,
    _Q.BARRIER: _Connection._barrier,
}
_HANDLERS = {int(op): handler for op, handler in _HANDLERS.items()}
# With a shared secret, a GET may be the secret's check (once validated, it is a plain GET).
_HANDLERS_WITH_AUTH: dict[int, _Handler] = {**_HANDLERS, int(_Q.GET): _Connection._get_or_auth}


def _refuse_wildcard(host: object, what: str) -> None:
    """Refuse an empty host: getaddrinfo("") with AI_PASSIVE is the wildcard, so an unset
    $MASTER_ADDR would silently expose a listener on every interface. That must be asked for."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"{what} must be a non-empty address, not {host!r} (ask for 0.0.0.0 or :: to bind every interface)")


def _bind_sockets(host: str, port: int, failure: Callable[[str], str]) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address ``host`` resolves to, one port for all.

    Raises ``StoreConnectionError`` when ``host`` does not resolve or an address cannot be
    bound (``failure(reason)`` words the message).
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StoreConnectionError(f"cannot resolve the server host {host!r}: {exc}") from None
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # With port 0, every address must share the port the first bind picked.
            sock.bind((addr[0], port, *addr[2:]))
            port = sock.getsockname()[1]
    except OSError as exc:
        for sock in socks:
            sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else str(exc.strerror)
        raise StoreConnectionError(failure(reason)) from exc
    return socks


def _metrics_address(metrics: int | tuple[str, int] | None) -> tuple[str, int] | None:
    """Validate ``StoreServer(metrics=...)``: ``None``, a port (loopback) or ``(host, port)``."""
    if metrics is None:
        return None
    host: object
    port: object
    if isinstance(metrics, tuple) and len(metrics) == 2:
        host, port = metrics
    else:
        host, port = "127.0.0.1", metrics
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"metrics port must be an integer in 0..65535, not {port!r}")
    _refuse_wildcard(host, "metrics host")
    return host, port


class StoreServer:
    """The TCPStore server, to embed in a running asyncio loop.

    >>> server = StoreServer("127.0.0.1", 0)
    >>> await server.start()          # binds; server.port is the bound port
    >>> await server.close()          # blocked clients get StoreConnectionError at once

    ``host`` is resolved and *only* its addresses are bound ("localhost" binds
    127.0.0.1 and ::1; "0.0.0.0"/"::" bind every interface, which you must
    ask for). ``sock`` adopts an already-bound socket instead (torch's
    ``master_listen_fd``).

    Resource bounds (each violation closes only the offending connection, with
    one warning naming the peer):

    * ``limits``: sizes of keys, values, key counts and one request;
    * ``max_connections``: further connections are accepted and closed at
      once, with one warning each time the cap is first hit;
    * ``max_buffered`` (default 1 GiB): bytes of incomplete requests over all
      connections; with ``limits.max_request`` this bounds what half-sent
      requests can pin, whatever the number of connections;
    * ``max_reply`` (default ``limits.max_request``): one MULTI_GET reply;
    * ``secret`` (default ``None``: torch's protocol, byte for byte): require
      our clients' shared-secret check (``auth``) before any other request;
      ``allow_torch_clients=True`` also serves connections that skip it;
    * ``request_timeout`` (default 300 s, ``None`` disables): a connection
      that has sent part of a request and then nothing for that long is
      closed (it is checked at that interval, so the close comes between one
      and two timeouts after the last byte). Idle connections between
      requests are never closed.

    ``metrics`` (default ``None``: off, nothing counted): serve Prometheus
    metrics over HTTP at ``/metrics`` on this port of 127.0.0.1 (``0`` picks
    one; see ``metrics_port``), or on ``(host, port)``; the README's "Metrics"
    section lists them. ``self.metrics`` holds the counters (``None`` when off)
    and ``render_metrics()`` the text, for embedders with their own HTTP server.

    Binding happens in ``start()``, so constructing one does no I/O.

    Raises:
        ValueError: ``metrics`` is not a port in 0..65535 or a ``(non-empty host, port)``
            pair; ``secret`` is shorter than 16 bytes.
        TypeError: ``secret`` is neither ``str`` nor convertible to ``bytes``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: p.Limits = p.Limits(),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        sock: socket.socket | None = None,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_reply: int | None = None,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
        secret: bytes | str | None = None,
        allow_torch_clients: bool = False,
        metrics: int | tuple[str, int] | None = None,
    ) -> None:
        if sock is None:
            _refuse_wildcard(host, "host")
        self.host = host
        self._requested_port = port
        self.limits = limits
        self.max_connections = max_connections
        self.max_buffered = max_buffered
        self.max_reply = limits.max_request if max_reply is None else max_reply
        self.request_timeout = request_timeout
        self.buffered = 0  # bytes held by incomplete requests, all connections
        key = coerce_secret(secret)
        self.auth = None if key is None else AuthVerifier(key, allow_torch_clients)
        self._read_bytes = bytearray(_READ_BUFFER)  # see _Connection._on_readable and _received
        self._read_buffer = memoryview(self._read_bytes)
        self._fast_parser = p.fast_request_parser(limits)  # complete requests, without generators
        self._start_parser = lambda: p.read_request(limits)  # the general (generator) parser
        self.engine = Engine()
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None  # the serving loop, set by start()
        self._listeners: list[socket.socket] = []
        self._stopped: asyncio.Future[None] | None = None  # serve_forever waits on it
        self._connections: set[_Connection] = set()
        self._cap_warned = False
        self.port = port
        self._metrics_address = _metrics_address(metrics)
        self.metrics: ServerMetrics | None = None if self._metrics_address is None else ServerMetrics()
        self._metrics_endpoint: MetricsEndpoint | None = None

    @property
    def connection_count(self) -> int:
        """Store connections open now (admitted, not yet lost).

        Raises:
            Nothing.
        """
        return len(self._connections)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every listening store socket; empty before ``start`` and after ``close``.

        Raises:
            Nothing.
        """
        return [s.getsockname()[:2] for s in self._listeners]

    @property
    def metrics_addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every listening metrics socket; empty when metrics are off or not started.

        Raises:
            Nothing.
        """
        return [] if self._metrics_endpoint is None else self._metrics_endpoint.addresses

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port once started (``None`` when metrics are off or not started).

        Raises:
            Nothing.
        """
        addresses = self.metrics_addresses
        return addresses[0][1] if addresses else None

    async def start(self) -> None:
        """Bind and listen (the store, then the metrics endpoint if asked for); ``port`` becomes the bound port.

        Must run in the event loop that will serve the connections. On failure
        nothing is left listening.

        Raises:
            StoreConnectionError: ``host`` (or the metrics host) does not resolve, or an
                address cannot be bound (port in use, address not on this machine,
                permission denied); the message says which listener failed.
            RuntimeError: no event loop is running.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        socks = [self._sock] if self._sock is not None else self._bind()
        backlog = _listen_backlog()
        try:
            for sock in socks:
                sock.setblocking(False)
                _tune_listener(sock)
                sock.listen(backlog)
                loop.add_reader(sock.fileno(), self._on_acceptable, sock)
                self._listeners.append(sock)
            self.port = socks[0].getsockname()[1]
            if self._metrics_address is not None:
                await self._start_metrics(*self._metrics_address)
        except BaseException:
            await self.close()
            if self._sock is None:
                for sock in socks:
                    sock.close()
            raise
        log.info("store server listening on %s", ", ".join(f"{h}:{pt}" for h, pt in self.addresses))
        if self._metrics_endpoint is not None:
            log.info(
                "metrics at %s", ", ".join(f"http://{_url_host(h)}:{pt}/metrics" for h, pt in self.metrics_addresses)
            )
        if self.auth is not None:
            log.info(
                "shared-secret check required%s",
                "; torch clients (which skip it) are allowed" if self.auth.allow_torch_clients else "",
            )

    async def _start_metrics(self, host: str, port: int) -> None:
        socks = _bind_sockets(
            host,
            port,
            lambda reason: f"The metrics endpoint has failed to listen on {host}, port {port}: {reason}",
        )
        endpoint = MetricsEndpoint(lambda: (self.render_metrics(), CONTENT_TYPE))
        try:
            await endpoint.start(socks)
        except BaseException:
            await endpoint.close()
            for sock in socks:
                sock.close()
            raise
        self._metrics_endpoint = endpoint

    def _bind(self) -> list[socket.socket]:
        return _bind_sockets(
            self.host,
            self._requested_port,
            lambda reason: "The server socket has failed to listen on any local network address. "
            f"host: {self.host}, port: {self._requested_port}: {reason}",
        )

    async def close(self) -> None:
        """Stop listening and close every connection; blocked clients see EOF immediately.

        Replies the kernel has not yet taken are dropped (a client that does not read them
        must not hold up a shutdown). Also closes the metrics endpoint. Idempotent.

        Raises:
            Nothing of its own.
        """
        for listener in self._listeners:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()
        for conn in list(self._connections):
            conn.close()
            conn._lost(None)
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.close()
            self._metrics_endpoint = None
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def serve_forever(self) -> None:
        """``start()`` if not started, then serve until ``close()`` (from another task) or cancelled.

        Cancelling it closes the server, as ``close()`` does.

        Raises:
            StoreConnectionError: as ``start()``, when it had not been started.
            asyncio.CancelledError: the task was cancelled (the way to stop it).
        """
        if not self._listeners:
            await self.start()
        if self._stopped is None or self._stopped.done():
            self._stopped = asyncio.get_running_loop().create_future()
        try:
            await asyncio.shield(self._stopped)
        except asyncio.CancelledError:
            await self.close()
            raise

    def _on_acceptable(self, listener: socket.socket) -> None:
        # A batch per wake-up: in a storm thousands of connections wait in the backlog, and an
        # epoll round trip per connection would double the cost of each. Bounded, so that a
        # storm cannot starve the connections already being served.
        # The C socket type, not socket.socket: its accept() wraps each descriptor in the Python
        # subclass, whose __init__ and enum-valued family/type cost about 3 us of an 8 us accept
        # (measured on 3.11); the connection needs only recv_into, send, sendmsg and close.
        accept = listener._accept  # type: ignore[attr-defined]  # the C method socket.accept calls
        family, kind, proto = int(listener.family), int(listener.type), listener.proto
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the connections wait in the backlog meanwhile.
                    log.warning(
                        "cannot accept connections on %s:%s: %s; accepting again in %g s",
                        *listener.getsockname()[:2],
                        exc.strerror,
                        _ACCEPT_RETRY,
                    )
                    assert self._loop is not None
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(_ACCEPT_RETRY, self._resume_accepting, listener)
                    return
                continue  # ECONNABORTED and the like: that one connection is gone, not the listener
            sock = _socket.socket(family, kind, proto, fd)
            sock.setblocking(False)  # Linux's accept does not pass O_NONBLOCK on from the listener
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            conn = _Connection(self, sock, peer)
            if self._admit(conn):
                conn._start_reading()
            else:
                sock.close()

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener in self._listeners and self._loop is not None:
            self._loop.add_reader(listener.fileno(), self._on_acceptable, listener)

    def render_metrics(self) -> str:
        """The metrics in Prometheus's text format (0.0.4), as ``/metrics`` serves them.

        Call it from the server's event loop (or once that loop has stopped).

        Raises:
            RuntimeError: metrics are off (constructed without ``metrics=``).
        """
        if self.metrics is None:
            raise RuntimeError("metrics are off: construct the StoreServer with metrics=PORT or (HOST, PORT)")
        return self.metrics.render(self._sample())

    def _sample(self) -> Sample:
        engine = self.engine
        queue_items = 0
        queue_bytes = 0
        for queue in engine.queues.values():
            queue_items += len(queue)
            queue_bytes += sum(map(len, queue))
        return Sample(
            connections_open=len(self._connections),
            connections_max=self.max_connections,
            received_open=sum(conn._rx for conn in self._connections),
            waiters=engine.pending_waiters(),
            keys=engine.num_keys(),
            value_bytes=sum(map(len, engine.kv.values())),
            queues=len(engine.queues),
            queue_items=queue_items,
            queue_bytes=queue_bytes,
            incomplete_bytes=self.buffered,
            incomplete_limit=self.max_buffered,
        )

    def _admit(self, conn: _Connection) -> bool:
        if len(self._connections) >= self.max_connections:
            if self.metrics is not None:
                self.metrics.refused += 1
            if not self._cap_warned:
                log.warning(
                    "connection limit reached (%d): refusing %s and further connections until some close",
                    self.max_connections,
                    conn.peer,
                )
                self._cap_warned = True
            return False
        self._cap_warned = False
        self._connections.add(conn)
        conn._admitted = True
        if self.metrics is not None:
            self.metrics.accepted += 1
        return True

    def _forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class BackgroundServer:
    """A ``StoreServer`` on its own event-loop thread, for ``TCPStore(is_master=True)``.

    The constructor starts the thread and the server.

    Raises:
        StoreConnectionError: as ``StoreServer.start`` (the thread is stopped first).
    """

    def __init__(self, server: StoreServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rdzv-store-server", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(server.start(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise

    @property
    def port(self) -> int:
        """The server's bound port.

        Raises:
            Nothing.
        """
        return self.server.port

    def stop(self) -> None:
        """Close the server and stop its thread. Idempotent.

        Raises:
            TimeoutError: closing took over 10 s (the loop is stopped all the same).
        """
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(timeout=10)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
