"""Blocking-socket client connection to a TCPStore server (ours or torch's).

One connection, one lock: requests from several threads are serialised, and
each reply is read before the next request goes out. Unlike torch's client,
*every* read is bounded: the wait step by its own timeout, all other replies
by the store timeout. A connection whose reply did not arrive in time is
closed, because its byte stream can no longer be trusted.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from . import commands
from . import auth
from . import protocol as p
from .args import reply_bound
from .errors import StoreConnectionError, StoreTimeoutError, barrier_timeout, format_ms, wait_timeout
from .retry import ConnectRetry

__all__ = ["Connection", "connect_with_retry"]

log = logging.getLogger("rdzv_store.client")

_monotonic = time.monotonic

# Replies are read with recv_into a per-connection buffer of this size. A plain
# ``recv(256 KiB)`` makes CPython allocate (glibc: mmap), shrink (mremap) and free
# (munmap) a buffer per read: three extra syscalls per small reply.
_RECV = 64 * 1024
_IN_PLACE = 64 * 1024  # reply values this big are received into their final buffer (StreamDecoder)
# A connection starts with a small buffer and grows it to _RECV once a read fills it: zeroing
# 64 KiB per connection was up to half of a connect's user-space instructions in a storm.
_RECV_FIRST = 4096

# I/O timeouts enforced by the kernel (SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket):
# one syscall per send or receive. Python's own socket timeouts poll() before every
# send and recv, and settimeout() issues an ioctl each call: 4 extra syscalls per
# request. Packing a struct timeval as two C longs is right on 64-bit Linux; other
# platforms keep Python's timeouts.
_KERNEL_TIMEOUTS = sys.platform.startswith("linux") and struct.calcsize("P") == 8
_TIMEVAL = struct.Struct("@ll")


def connect_with_retry(host: str, port: int, timeout: float, secret: bytes | None = None) -> socket.socket:
    """Connect and do torch's handshake (VALIDATE, PING with our pid), retrying until ``timeout``.

    With a ``secret``, the shared-secret check (``auth``) rides along with the
    handshake; its failure is raised at once (``StoreAuthError``), not retried.

    Retries follow ``retry.ConnectRetry``. One attempt is always made, even
    with ``timeout <= 0``. The socket returned has TCP_NODELAY set; on Linux it
    is blocking, its sends and receives bounded in the kernel (SO_SNDTIMEO,
    SO_RCVTIMEO) by the last attempt's bound; elsewhere by a Python timeout.
    """
    return _connect(host, port, timeout, secret)[0]


def _kernel_timeout(sock: socket.socket, seconds: float) -> float:
    """Bound each send and recv on ``sock`` by ``seconds`` in the kernel (never 0: "no timeout");
    returns the bound set."""
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    tv = _TIMEVAL.pack(whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    return seconds


def _open(host: str, port: int, bound: float) -> socket.socket:
    """A connected TCP socket with TCP_NODELAY, its connect, sends and receives bounded by ``bound``.

    With kernel timeouts, the socket stays blocking and the kernel bounds ``connect()`` too
    (Linux applies SO_SNDTIMEO to it, failing with EINPROGRESS). ``create_connection`` with a
    Python timeout makes it non-blocking and polls around the connect and every handshake
    read, then ``_adopt`` had to make it blocking again: 7 system calls per connect instead of
    14, which matters to thousands of clients connecting at once (the storm benchmark).
    """
    if not _KERNEL_TIMEOUTS:
        sock = socket.create_connection((host, port), timeout=bound)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    error: OSError | None = None
    for family, address in _addresses(host, port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            _kernel_timeout(sock, bound)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            timed_out = exc.errno in (errno.EINPROGRESS, errno.EAGAIN)
            error = socket.timeout(f"connect timed out after {format_ms(bound)}") if timed_out else exc
            continue
        return sock
    assert error is not None  # getaddrinfo returns at least one address or raises gaierror
    raise error


def _addresses(host: str, port: int) -> list[tuple[int, Any]]:
    """(family, address) pairs to try for ``host``: a numeric IPv4 or IPv6 address as it is.

    ``getaddrinfo`` releases the GIL even for a numeric address; in a process whose hundreds
    of client threads connect at once, every release is a handoff to another thread and back.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):  # ValueError: an embedded NUL
            continue
        return [(family, (host, port) if family == socket.AF_INET else (host, port, 0, 0))]
    return [(info[0], info[4]) for info in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)]


def _connect(
    host: str,
    port: int,
    timeout: float,
    secret: bytes | None = None,
    probe: bool = False,
    io_timeout: float | None = None,
) -> tuple[socket.socket, bool | None, float]:
    """``connect_with_retry``, plus, with ``probe``, whether the server follows libuv's rules
    (see ``commands.PROBE_KEY``), ``None`` when not probed; and the bound the socket's sends
    and receives have (see ``_open``).

    ``io_timeout``: the bound the caller will set for its replies. When the attempt's bound is
    within 10 ms below it (the first attempt, nearly always), the attempt uses it instead, so
    the socket needs no second pair of ``setsockopt`` (the deadline may be passed by <= 10 ms).
    """
    retry = ConnectRetry(host, port, timeout)
    while True:
        bound = retry.attempt_timeout()
        if io_timeout is not None and 0.0 <= io_timeout - bound <= 0.01:
            bound = io_timeout
        try:
            sock = _open(host, port, bound)
        except OSError as exc:
            error: OSError = exc
        else:
            try:
                libuv_rules = _handshake(sock, secret, f"{host}:{port}", probe)
            except auth.StoreAuthError:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                error = exc
            else:
                if libuv_rules is not False:
                    return sock, libuv_rules, bound
                # torch's legacy server answered the handshake, then dropped us on the probe's
                # GET. Nothing else was sent: connect again at once, without the probe.
                sock.close()
                left = max(retry.deadline - time.monotonic(), 0.0)
                sock, _, bound = _connect(host, port, left, secret, io_timeout=io_timeout)
                return sock, False, bound
        time.sleep(retry.after_failure(error))


class _HandshakeReader:
    """Reads the handshake's replies with as few ``recv`` calls as the server's segments allow.

    ``exactly(n)`` returns the next ``n`` bytes; each ``recv`` asks for up to ``ahead`` bytes
    (the replies whose sizes are known in advance), never more, so no byte of a later reply
    is ever consumed here.
    """

    __slots__ = ("sock", "buf", "pos", "ahead")

    def __init__(self, sock: socket.socket, ahead: int) -> None:
        self.sock = sock
        self.buf = b""
        self.pos = 0
        self.ahead = ahead  # total bytes known to be due, counted from the start

    def exactly(self, n: int) -> bytes:
        end = self.pos + n
        self.ahead = max(self.ahead, end)
        while len(self.buf) < end:
            try:
                chunk = self.sock.recv(self.ahead - len(self.buf))
            except BlockingIOError:  # SO_RCVTIMEO expired (see _open)
                raise socket.timeout("no reply to the handshake in time") from None
            if not chunk:
                raise ConnectionResetError("the server closed the connection during the handshake")
            self.buf += chunk
        data = self.buf[self.pos : end]
        self.pos = end
        return data


_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def handshake_request(nonce: int, probe: bool = False, secret_key: bytes | None = None) -> tuple[bytes, int]:
    """The handshake's bytes, for one send, and how many reply bytes are known in advance.

    VALIDATE and PING (``nonce``); then the shared-secret check's GET of ``secret_key``, or,
    without a secret, the CHECK that tells whether the server requires one (see
    ``commands.secret_probe``); then, if ``probe``, the GET of ``commands.PROBE_KEY`` that tells
    libuv rules from legacy ones. Known reply bytes: PING's echo, then CHECK's byte and the probe's
    length field (no secret), or the secret reply's length field.
    """
    if secret_key is None:
        return _plain_handshake(nonce, probe)
    return _handshake_request(nonce, probe, secret_key)


def _handshake_request(nonce: int, probe: bool, secret_key: bytes | None) -> tuple[bytes, int]:
    # All in one send: torch's libuv server also accepts them merged in one segment.
    request = p.encode_validate() + p.encode_ping(nonce)
    if secret_key is not None:
        request += p.encode_key(p.QueryType.GET, secret_key)
        known = 4 + 8
    else:
        request += commands.secret_probe()[0]
        known = 4 + 1 + (8 if probe else 0)
    if probe:
        request += commands.get_raw(commands.PROBE_KEY)[0]
    return request, known


@functools.lru_cache(maxsize=8)
def _plain_handshake(nonce: int, probe: bool) -> tuple[bytes, int]:
    """The handshake without a secret: the same bytes for every connection of a process (its
    pid is the nonce), built once instead of once per connection."""
    return _handshake_request(nonce, probe, None)


def _handshake(sock: socket.socket, secret: bytes | None = None, address: str = "", probe: bool = False) -> bool | None:
    """Send the handshake (``handshake_request``) and check the replies.
    Returns the probe's verdict: True for libuv rules, False for a legacy server, None unprobed.
    The socket's own bound (``_open``) bounds each send and receive."""
    nonce = _pid & 0xFFFFFFFF  # getpid(), refreshed after a fork
    key, proof = auth.client_request_key(secret) if secret is not None else (None, b"")
    request, known = handshake_request(nonce, probe, key)
    sock.sendall(request)
    reader = _HandshakeReader(sock, known)
    echo = reader.exactly(4)
    if echo != nonce.to_bytes(4, "little"):
        raise ConnectionError(f"PING failed: sent nonce {nonce}, got {echo.hex()}")
    if secret is None:
        try:
            reader.exactly(1)  # CHECK's reply: any server that does not require a secret answers it
        except ConnectionError:
            raise auth.StoreAuthError(auth.secret_required(address)) from None
    else:
        try:
            (length,) = struct.unpack("<Q", reader.exactly(8))
            reply = reader.exactly(length) if length <= 1024 else b"?"
        except ConnectionError:
            raise auth.StoreAuthError(
                f"the store at {address} closed the connection at the shared-secret check: wrong "
                "secret, clocks more than 5 minutes apart, or a replay (see the server log)"
            ) from None
        auth.check_server_reply(reply, proof, address)
    if not probe:
        return None
    try:
        (length,) = struct.unpack("<Q", reader.exactly(8))
    except ConnectionError:
        return False  # answered the PING, then dropped the GET of a missing key: legacy rules
    if length > 65536:
        raise ConnectionError(f"implausible reply of {length} bytes to the handshake probe")
    reader.exactly(length)
    return True


class Connection:
    """A validated connection with request/reply helpers. Thread-safe.

    A connection that the server closed (it refused a request, or it shut down
    or restarted) is reopened by the next request, with the full handshake
    (including the shared-secret check), within the store timeout; the request
    that met the closed connection fails and says which operation the server
    refused. Nothing is sent twice: a failed request is never retried. Before a
    request goes out on a connection idle for more than ``_IDLE_CHECK`` seconds
    it is checked for an end-of-stream already received, so a write (which has
    no reply) after a server restart goes to the new server instead of being
    lost. Only ``close()`` ends the connection for good.
    """

    #: Idle time after which a send first checks (one ``poll``) that the server has not closed.
    _IDLE_CHECK = 0.002

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        limits: p.Limits = p.Limits(),
        secret: bytes | None = None,
        probe: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.limits = limits
        self.reply_timeout = 0.0
        self.connect_timeout = timeout
        self.set_reply_timeout(timeout)
        self.lock = threading.RLock()
        self._secret = secret
        self._closed = False  # close() was called: no reconnecting
        self.reconnects = 0
        self._sock: socket.socket | None = None
        self._poll: Any = None
        self._last_send = 0.0
        # The request in progress (for error messages) and the last one without a reply since
        # the last reply read: op name and wire keys.
        self._op = ""
        self._keys: commands.Keys = None
        self._unanswered: tuple[str, commands.Keys] | None = None
        sock, self.libuv_rules, bound = _connect(host, port, timeout, secret, probe, self.reply_timeout)
        self._adopt(sock, bound)

    def _adopt(self, sock: socket.socket, bound: float) -> None:
        self._sock = sock
        # The decoder of replies not read whole from the receive buffer, made on first need
        # (``_stream_decoder``): most connections never need one.
        self._decoder: p.StreamDecoder | None = None
        self._rbuf = memoryview(bytearray(_RECV_FIRST))
        # Received bytes not yet parsed, kept in _rbuf[_rpos:_rend] while the decoder is idle
        # (holds nothing): replies that arrive whole are read from there without it.
        self._rpos = self._rend = 0
        self._idle = True
        self._filled = False  # the last read filled the (first, small) buffer
        # The kernel timeout set on the socket (by _open), if any.
        self._io_timeout: float | None = bound if _KERNEL_TIMEOUTS else None
        self._unanswered = None
        self._last_send = time.monotonic()
        if hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def set_reply_timeout(self, timeout: float) -> None:
        """Bound for every reply read. A store timeout <= 0 means "do not wait" for waits,
        not "fail every reply", so it falls back to torch's default of 300 s here.
        Reconnecting is bounded by ``timeout`` itself (<= 0: one attempt)."""
        self.reply_timeout = reply_bound(timeout)
        self.connect_timeout = timeout

    def close(self) -> None:
        """Close for good: later requests raise ``StoreConnectionError`` instead of reconnecting."""
        with self.lock:
            self._closed = True
            self._drop()

    def _drop(self) -> None:
        """Forget the socket (lost or out of step); the next request reconnects."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._closed

    # -- primitives (caller holds self.lock) -------------------------------------------------
    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise StoreConnectionError(f"the connection to the store at {self.address} is closed")
        return self._sock

    def _socket_for_send(self, now: float) -> socket.socket:
        """The socket for a new request, after a long enough pause or a lost connection."""
        sock = self._sock
        if sock is not None and self._poll is not None and self._poll.poll(0):
            # Readable while no reply is due: the server closed (or reset) the connection
            # while it was idle, e.g. it restarted. Reconnect before sending anything.
            log.info("the store at %s had closed the idle connection", self.address)
            self._drop()
            sock = None
        if sock is None:
            if self._closed:
                raise StoreConnectionError(f"the connection to the store at {self.address} is closed")
            sock = self._reconnect()
        return sock

    def _reconnect(self) -> socket.socket:
        """Open a new connection with the full handshake (no probe: we know the server's rules).
        Raises ``StoreConnectionError`` (or ``StoreAuthError``) once the store timeout is spent."""
        sock, _, bound = _connect(self.host, self.port, self.connect_timeout, self._secret, io_timeout=self.reply_timeout)
        self._adopt(sock, bound)
        self.reconnects += 1
        log.info("reconnected to the store at %s", self.address)
        return sock

    def _what(self) -> str:
        return f" ({commands.describe(self._op, self._keys)})" if self._op else ""

    def _set_timeout(self, sock: socket.socket, seconds: float) -> None:
        """Bound the next send/recv by ``seconds`` (never 0: that means "no timeout" to the kernel)."""
        if not _KERNEL_TIMEOUTS:
            sock.settimeout(seconds)
            return
        current = self._io_timeout
        # Keep the current bound unless it is too short, or longer by more than 10 ms: a
        # setsockopt per read would cost what the kernel timeouts save.
        if current is not None and seconds <= current <= seconds + 0.01:
            return
        self._io_timeout = _kernel_timeout(sock, seconds)

    def send(self, data: bytes, fresh: bool = True) -> None:
        """Send ``data``. ``fresh``: a new request (may reconnect first); otherwise part of an
        exchange in progress (CANCEL_WAIT), which must go on the same connection."""
        sock = self._sock
        if fresh:
            now = _monotonic()
            if sock is None or now - self._last_send > self._IDLE_CHECK:
                sock = self._socket_for_send(now)
            self._last_send = now
        elif sock is None:
            sock = self._socket()
        try:
            if self._io_timeout != self.reply_timeout:  # only when the bound changes (or no kernel timeouts)
                self._set_timeout(sock, self.reply_timeout)
            sock.sendall(data)
        except OSError as exc:
            self._send_failed(exc)

    def _send_failed(self, exc: OSError) -> NoReturn:
        self._drop()
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):  # closed on us mid-request
            self._refused()
        raise StoreConnectionError(
            f"lost the connection to the store at {self.address}{self._what()}: {exc}. The next call reconnects"
        ) from None

    def _refused(self) -> NoReturn:
        """The server closed the connection with a request of ours unanswered: it refused one."""
        self._drop()
        raise StoreConnectionError(
            f"the store at {self.address} " + commands.refusal(self._op or "a request", self._keys, self._unanswered)
        ) from None

    def _recv(self, sock: socket.socket, deadline: float, into: memoryview | None = None) -> int:
        """One ``recv_into`` the receive buffer (or ``into``), bounded by ``deadline``; the byte count (> 0).
        Raises ``socket.timeout`` at the deadline, ``StoreConnectionError`` when the connection
        is lost or closed (the request was refused)."""
        remaining = deadline - _monotonic()
        if remaining <= 0:
            raise socket.timeout()
        current = self._io_timeout
        if current is None or not remaining <= current <= remaining + 0.01:
            self._set_timeout(sock, remaining)
        rbuf = self._rbuf if into is None else into
        if self._filled and into is None:  # the last read filled the small buffer: grow it (no unparsed bytes now)
            rbuf = self._rbuf = memoryview(bytearray(_RECV))
            self._filled = False
        try:
            nbytes = sock.recv_into(rbuf)
        except OSError as exc:
            nbytes = self._recv_failed(exc)
        if nbytes == len(rbuf) < _RECV and into is None:
            self._filled = True
        if not nbytes:
            self._refused()
        return nbytes

    def _recv_failed(self, exc: OSError) -> int:
        """What a failed ``recv_into`` means: ``socket.timeout`` at the bound, 0 (end of stream)
        for a reset (the server closed with our request unread, as on a refusal), otherwise
        ``StoreConnectionError``."""
        if isinstance(exc, (socket.timeout, BlockingIOError)):  # BlockingIOError: SO_RCVTIMEO expired
            raise socket.timeout() from None
        if isinstance(exc, ConnectionResetError):
            return 0
        self._drop()
        raise StoreConnectionError(
            f"lost the connection to the store at {self.address}{self._what()}: {exc}. The next call reconnects"
        ) from None

    def read(self, parser: p.ReplyParser, timeout: float | None = None, deadline: float | None = None) -> Any:
        """Read one reply by ``deadline`` (default: ``timeout`` from now, by default the reply
        timeout). On timeout raise ``socket.timeout`` (the caller decides what it means)."""
        sock = self._socket()
        if deadline is None:
            deadline = _monotonic() + (self.reply_timeout if timeout is None else timeout)
        if self._idle:
            fast = parser.fast if type(parser) is commands.Reply else None
            if fast is not None:
                # The reply is read straight from the receive buffer when it is whole there;
                # anything else (a partial or unusual reply) goes to the decoder below.
                pos = self._rpos
                end = self._rend
                found = fast(self._rbuf, pos, end)  # first from what is left: a reply may be empty
                if found is None and pos == end:
                    end = self._recv(sock, deadline)
                    pos = 0
                    found = fast(self._rbuf, pos, end)
                if found is not None:
                    self._rpos = found[1]
                    self._rend = end
                    self._unanswered = None  # a reply means every earlier request was processed
                    return found[0]
                self._stream_decoder().feed(self._rbuf[pos:end])
                self._rpos = self._rend = 0
            elif self._rpos < self._rend:
                self._stream_decoder().feed(self._rbuf[self._rpos : self._rend])
                self._rpos = self._rend = 0
            self._idle = False
        decoder = self._stream_decoder()
        while True:
            try:
                reply = decoder.decode(parser)
            except p.ProtocolError as exc:
                self._drop()
                raise StoreConnectionError(f"malformed reply from the store at {self.address}: {exc}") from None
            if reply is not p.NEED_DATA:
                self._unanswered = None  # a reply means every earlier request was processed
                self._idle = decoder.buffered == 0
                return reply
            slot = decoder.field_slot
            if slot is not None:
                decoder.filled(self._recv(sock, deadline, slot))
                continue
            nbytes = self._recv(sock, deadline)
            decoder.feed(self._rbuf[:nbytes])

    def _stream_decoder(self) -> p.StreamDecoder:
        decoder = self._decoder
        if decoder is None:
            # Big reply values (an 8 MiB get) are received straight into a buffer of their final size.
            decoder = self._decoder = p.StreamDecoder(self.limits.max_request, in_place=_IN_PLACE)
        return decoder

    def read_reply(self, parser: p.ReplyParser, deadline: float | None = None) -> Any:
        """Read a reply that must come promptly; a timeout poisons the connection."""
        try:
            return self.read(parser, deadline=deadline)
        except socket.timeout:
            self._timed_out()

    def _timed_out(self) -> NoReturn:
        self._drop()
        raise StoreTimeoutError(
            f"no reply from the store at {self.address} within {format_ms(self.reply_timeout)}{self._what()}"
        ) from None

    # -- request helpers ---------------------------------------------------------------------
    def call(self, command: tuple[bytes, p.ReplyParser | None], op: str = "", keys: commands.Keys = None) -> Any:
        """Send one command; read its reply unless it is fire-and-forget.

        ``op`` and ``keys`` (the user's keys: one, several or None) name the request in errors.
        """
        data, parser = command
        with self.lock:
            self._op = op
            self._keys = keys
            now = _monotonic()
            if type(parser) is commands.Reply and self._steady(now):
                nbytes = self._exchange(data, now)
                found = parser.fast(self._rbuf, 0, nbytes)
                if found is None:
                    return self._finish([parser], 0, nbytes, now)[0]
                self._rpos = found[1]
                self._rend = nbytes
                self._unanswered = None  # a reply means every earlier request was processed
                return found[0]
            self.send(data)
            if parser is None:
                self._unanswered = (op, keys)
                return None
            return self.read_reply(parser)

    def call_many(
        self, data: bytes, parsers: Sequence[p.ReplyParser], op: str = "", keys: commands.Keys = None
    ) -> list[Any]:
        """Send pipelined requests in one write and read their replies in order."""
        with self.lock:
            self._op = op
            self._keys = keys
            now = _monotonic()
            fast = self._steady(now)
            for parser in parsers:  # (a loop: cheaper than all() over a generator for 2 parsers)
                if type(parser) is not commands.Reply:
                    fast = False
                    break
            if fast:
                nbytes = self._exchange(data, now)
                replies: list[Any] = []
                pos = 0
                for parser in parsers:
                    found = parser.fast(self._rbuf, pos, nbytes)  # type: ignore[attr-defined]  # all Reply (checked)
                    if found is None:
                        return replies + self._finish(parsers[len(replies) :], pos, nbytes, now)
                    replies.append(found[0])
                    pos = found[1]
                self._rpos = pos
                self._rend = nbytes
                self._unanswered = None
                return replies
            self.send(data)
            return [self.read_reply(parser) for parser in parsers]

    # -- the fast path: what send() and read() do for a connection in steady use, minus their checks
    def _steady(self, now: float) -> bool:
        """Whether a request may take the fast path: a connection in use (no idle check due), its
        kernel bound the reply timeout, no received byte left unparsed, no buffer to grow."""
        return (
            self._sock is not None
            and now - self._last_send <= self._IDLE_CHECK
            and self._io_timeout == self.reply_timeout
            and self._idle
            and self._rpos == self._rend
            and not self._filled
        )

    def _exchange(self, data: bytes, now: float) -> int:
        """Send ``data``, then one ``recv_into`` the receive buffer, bounded by the reply timeout
        (the socket's kernel bound); the byte count, 0 at end of stream."""
        sock = self._sock
        assert sock is not None
        self._last_send = now
        try:
            sock.sendall(data)
        except OSError as exc:
            self._send_failed(exc)
        try:
            return sock.recv_into(self._rbuf)
        except OSError as exc:
            try:
                return self._recv_failed(exc)
            except socket.timeout:
                self._timed_out()

    def _finish(self, parsers: Sequence[p.ReplyParser], pos: int, nbytes: int, now: float) -> list[Any]:
        """Replies not whole in the receive buffer after ``_exchange``: read() goes on from ``pos``,
        by the deadline the request started with."""
        if not nbytes:
            self._refused()
        self._rpos = pos
        self._rend = nbytes
        self._filled = nbytes == len(self._rbuf) < _RECV
        deadline = now + self.reply_timeout
        return [self.read_reply(parser, deadline) for parser in parsers]

    def wait(
        self,
        command: tuple[bytes, p.ReplyParser | None],
        timeout: float,
        message_keys: Sequence[bytes],
        what: str = "wait",
        keys: commands.Keys = None,
    ) -> None:
        """Send WAIT or BARRIER and block for STOP_WAITING; on timeout, cancel as torch does.

        The cancel dance: send CANCEL_WAIT and read one byte. ``01`` means
        cancelled; a ``00`` first means the release raced the cancel, and the
        ``01`` follows. Either way the connection stays usable.
        """
        with self.lock:
            self._op = what
            self._keys = keys
            self.send(command[0])
            try:
                self.read(command[1] or p.parse_u8, timeout=max(timeout, 0.0))
                return
            except socket.timeout:
                pass
            cancel, u8 = commands.cancel_wait()
            assert u8 is not None
            self.send(cancel, fresh=False)
            released = self.read_reply(u8) == p.STOP_WAITING
            if released:
                self.read_reply(u8)  # the WAIT_CANCELED that follows
                return  # released right at the deadline: that counts as success
            where = f"TCPStore at {self.address}"
            if what == "barrier":
                raise barrier_timeout(message_keys[0], timeout, where)
            raise wait_timeout(message_keys, timeout, where)
