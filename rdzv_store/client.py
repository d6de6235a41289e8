"""Blocking-socket client connection to a TCPStore server (ours or torch's).

One connection, one lock: requests from several threads are serialised, and
each reply is read before the next request goes out. Unlike torch's client,
*every* read is bounded: the wait step by its own timeout, all other replies
by the store timeout. A connection whose reply did not arrive in time is
closed, because its byte stream can no longer be trusted.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from . import commands
from . import auth
from . import protocol as p
from .args import reply_bound
from .errors import StoreConnectionError, StoreTimeoutError, barrier_timeout, format_ms, wait_timeout
from .retry import ConnectRetry

__all__ = ["Connection", "connect_with_retry"]

# Replies are read with recv_into a per-connection buffer of this size. A plain
# ``recv(256 KiB)`` makes CPython allocate (glibc: mmap), shrink (mremap) and free
# (munmap) a buffer per read: three extra syscalls per small reply.
_RECV = 64 * 1024

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
    with ``timeout <= 0``.
    """
    return _connect(host, port, timeout, secret)[0]


def _connect(
    host: str, port: int, timeout: float, secret: bytes | None = None, probe: bool = False
) -> tuple[socket.socket, bool | None]:
    """``connect_with_retry``, plus, with ``probe``, whether the server follows libuv's rules
    (see ``commands.PROBE_KEY``); ``None`` when not probed."""
    retry = ConnectRetry(host, port, timeout)
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=retry.attempt_timeout())
        except OSError as exc:
            error: OSError = exc
        else:
            try:
                libuv_rules = _handshake(sock, retry.deadline, secret, f"{host}:{port}", probe)
            except auth.StoreAuthError:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                error = exc
            else:
                if libuv_rules is not False:
                    return sock, libuv_rules
                # torch's legacy server answered the handshake, then dropped us on the probe's
                # GET. Nothing else was sent: connect again at once, without the probe.
                sock.close()
                return _connect(host, port, max(retry.deadline - time.monotonic(), 0.0), secret)[0], False
        time.sleep(retry.after_failure(error))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("the server closed the connection during the handshake")
        data += chunk
    return data


def _handshake(
    sock: socket.socket, deadline: float, secret: bytes | None = None, address: str = "", probe: bool = False
) -> bool | None:
    """Send VALIDATE and PING (plus the secret check and the probe, pipelined); check the replies.
    Returns the probe's verdict: True for libuv rules, False for a legacy server, None unprobed."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    nonce = os.getpid() & 0xFFFFFFFF
    # Both in one send: torch's libuv server also accepts them merged in one segment.
    sock.settimeout(max(deadline - time.monotonic(), 0.5))
    request = p.encode_validate() + p.encode_ping(nonce)
    proof = b""
    if secret is not None:  # the shared-secret check, pipelined: no extra round trip
        key, proof = auth.client_request_key(secret)
        request += p.encode_key(p.QueryType.GET, key)
    if probe:
        request += commands.get_raw(commands.PROBE_KEY)[0]
    sock.sendall(request)
    echo = _recv_exactly(sock, 4)
    if echo != nonce.to_bytes(4, "little"):
        raise ConnectionError(f"PING failed: sent nonce {nonce}, got {echo.hex()}")
    if secret is not None:
        try:
            (length,) = struct.unpack("<Q", _recv_exactly(sock, 8))
            reply = _recv_exactly(sock, length) if length <= 1024 else b"?"
        except ConnectionError:
            raise auth.StoreAuthError(
                f"the store at {address} closed the connection at the shared-secret check: wrong "
                "secret, clocks more than 5 minutes apart, or a replay (see the server log)"
            ) from None
        auth.check_server_reply(reply, proof, address)
    if not probe:
        return None
    try:
        (length,) = struct.unpack("<Q", _recv_exactly(sock, 8))
    except ConnectionError:
        return False  # answered the PING, then dropped the GET of a missing key: legacy rules
    if length > 65536:
        raise ConnectionError(f"implausible reply of {length} bytes to the handshake probe")
    _recv_exactly(sock, length)
    return True


class Connection:
    """A validated connection with request/reply helpers. Thread-safe."""

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
        self.set_reply_timeout(timeout)
        self.lock = threading.RLock()
        self._decoder = p.StreamDecoder(limits.max_request)
        self._rbuf = memoryview(bytearray(_RECV))
        sock, self.libuv_rules = _connect(host, port, timeout, secret, probe)
        self._sock: socket.socket | None = sock
        self._io_timeout: float | None = None  # the kernel timeout set on the socket, if any
        if _KERNEL_TIMEOUTS:
            self._sock.settimeout(None)  # blocking; the kernel times out each send/recv

    def set_reply_timeout(self, timeout: float) -> None:
        """Bound for every reply read. A store timeout <= 0 means "do not wait" for waits,
        not "fail every reply", so it falls back to torch's default of 300 s here."""
        self.reply_timeout = reply_bound(timeout)

    def close(self) -> None:
        with self.lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    # -- primitives (caller holds self.lock) -------------------------------------------------
    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise StoreConnectionError(f"the connection to the store at {self.address} is closed")
        return self._sock

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
        seconds = max(seconds, 0.001)
        whole = int(seconds)
        tv = _TIMEVAL.pack(whole, int((seconds - whole) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._io_timeout = seconds

    def send(self, data: bytes) -> None:
        sock = self._socket()
        try:
            self._set_timeout(sock, self.reply_timeout)
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise StoreConnectionError(f"lost the connection to the store at {self.address}: {exc}") from None

    def read(self, parser: p.ReplyParser, timeout: float | None = None) -> Any:
        """Read one reply. On timeout raise ``socket.timeout`` (the caller decides what it means)."""
        sock = self._socket()
        deadline = time.monotonic() + (self.reply_timeout if timeout is None else timeout)
        while True:
            try:
                reply = self._decoder.decode(parser)
            except p.ProtocolError as exc:
                self.close()
                raise StoreConnectionError(f"malformed reply from the store at {self.address}: {exc}") from None
            if reply is not p.NEED_DATA:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            try:
                self._set_timeout(sock, remaining)
                nbytes = sock.recv_into(self._rbuf)
            except (socket.timeout, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
                raise socket.timeout() from None
            except OSError as exc:
                self.close()
                raise StoreConnectionError(f"lost the connection to the store at {self.address}: {exc}") from None
            if not nbytes:
                self.close()
                raise StoreConnectionError(
                    f"the store at {self.address} closed the connection (server shut down, or it "
                    "rejected a request: see the server log)"
                )
            self._decoder.feed(self._rbuf[:nbytes])

    def read_reply(self, parser: p.ReplyParser) -> Any:
        """Read a reply that must come promptly; a timeout poisons the connection."""
        try:
            return self.read(parser)
        except socket.timeout:
            self.close()
            raise StoreTimeoutError(
                f"no reply from the store at {self.address} within {format_ms(self.reply_timeout)}"
            ) from None

    # -- request helpers ---------------------------------------------------------------------
    def call(self, command: tuple[bytes, p.ReplyParser | None]) -> Any:
        """Send one command; read its reply unless it is fire-and-forget."""
        data, parser = command
        with self.lock:
            self.send(data)
            return None if parser is None else self.read_reply(parser)

    def call_many(self, data: bytes, parsers: Sequence[p.ReplyParser]) -> list[Any]:
        """Send pipelined requests in one write and read their replies in order."""
        with self.lock:
            self.send(data)
            return [self.read_reply(parser) for parser in parsers]

    def wait(
        self, command: tuple[bytes, p.ReplyParser | None], timeout: float, message_keys: Sequence[bytes], what: str = "wait"
    ) -> None:
        """Send WAIT or BARRIER and block for STOP_WAITING; on timeout, cancel as torch does.

        The cancel dance: send CANCEL_WAIT and read one byte. ``01`` means
        cancelled; a ``00`` first means the release raced the cancel, and the
        ``01`` follows. Either way the connection stays usable.
        """
        with self.lock:
            self.send(command[0])
            try:
                self.read(p.parse_u8, timeout=max(timeout, 0.0))
                return
            except socket.timeout:
                pass
            self.send(commands.cancel_wait()[0])
            released = self.read_reply(p.parse_u8) == p.STOP_WAITING
            if released:
                self.read_reply(p.parse_u8)  # the WAIT_CANCELED that follows
                return  # released right at the deadline: that counts as success
            where = f"TCPStore at {self.address}"
            if what == "barrier":
                raise barrier_timeout(message_keys[0], timeout, where)
            raise wait_timeout(message_keys, timeout, where)
