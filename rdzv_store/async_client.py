"""``AsyncTCPStore``: the TCPStore operations as coroutines, for asyncio launchers.

Same wire protocol and commands (``commands``) as the blocking ``TCPStore``.
Two kinds of connection:

* one *primary* connection carries every non-blocking request, pipelined:
  many coroutines may have requests in flight, and replies are matched to
  them in order (the protocol answers in request order);
* *blocking* requests (wait, barrier, get of a missing key, blocking
  queue_pop) each borrow a connection from a small pool, because a pending
  WAIT's late reply cannot be told apart from the replies of later requests
  on the same connection. So many waits can be in flight on one loop.

``get`` pipelines CHECK and GET (one round trip) when the primary
connection's handshake probe (``commands.PROBE_KEY``) shows that the server
answers a GET of a missing key with an empty value; on torch's legacy server,
which drops the connection instead, ``get`` uses WAIT then GET.

The protocol orders nothing across connections, and SET has no reply. So
before a blocking request goes out on a pooled connection, the primary is
flushed with a PING whenever it carries unacknowledged writes. Without that,
``await s.set(k, v); await s.wait([k])`` could wait for a write the server
has not seen yet.
"""

from __future__ import annotations

import asyncio
import logging
import collections
import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any

from . import auth
from . import commands as cmd
from . import protocol as p
from .args import Key, reply_bound, Timeout, Value, check_int64, key_bytes, key_list, same_length, timeout_seconds, value_bytes
from .errors import queue_empty, StoreConnectionError, StoreTimeoutError, barrier_timeout, format_ms, wait_timeout
from .retry import ConnectRetry
from .store import DEFAULT_TIMEOUT

__all__ = ["AsyncTCPStore"]

log = logging.getLogger("rdzv_store.async_client")

_IDLE_POOL = 8  # idle blocking connections kept for reuse


class _LegacyServerDetected(Exception):
    """The server dropped the connection on a GET of a missing key: torch's legacy server.
    (Deliberately not an OSError/StoreConnectionError: the connect loop must not retry it.)"""


class _AsyncConnection(asyncio.Protocol):
    """A validated connection whose replies resolve futures in request order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._decoder = p.StreamDecoder()
        self._pending: collections.deque[tuple[asyncio.Future[Any], p.ReplyParser]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None
        self.unacked_writes = False

    @classmethod
    async def open(
        cls, host: str, port: int, timeout: float, secret: bytes | None = None, probe: bool = False
    ) -> _AsyncConnection:
        """Connect (retrying per ``retry.ConnectRetry``) until ``timeout``, then do torch's handshake.

        ``probe``: also pipeline a GET of ``commands.PROBE_KEY`` (no extra round trip) and raise
        ``_LegacyServerDetected`` if the server drops the connection on it.
        """
        loop = asyncio.get_running_loop()
        retry = ConnectRetry(host, port, timeout)
        while True:
            conn = cls(f"{host}:{port}")
            try:
                await asyncio.wait_for(loop.create_connection(lambda: conn, host, port), retry.attempt_timeout())
                nonce = os.getpid() & 0xFFFFFFFF
                conn.write(p.encode_validate())
                ping = conn.request(*cmd.ping(nonce))
                check = None
                if secret is not None:  # the shared-secret check, pipelined behind the PING
                    key, proof = auth.client_request_key(secret)
                    check = conn.request(*cmd.get_raw(key))
                probed = conn.request(*cmd.get_raw(cmd.PROBE_KEY)) if probe else None
                echo = await asyncio.wait_for(ping, retry.attempt_timeout())
                if echo != nonce.to_bytes(4, "little"):
                    raise ConnectionError(f"PING failed: sent nonce {nonce}, got {echo.hex()}")
                if check is not None:
                    await cls._check_secret(conn, check, proof, retry.attempt_timeout())
                if probed is not None:
                    try:
                        await asyncio.wait_for(probed, retry.attempt_timeout())
                    except StoreConnectionError:
                        conn.close()  # the handshake was answered, then the GET dropped us
                        raise _LegacyServerDetected() from None
                return conn
            except auth.StoreAuthError:
                conn.close()
                raise
            except (OSError, asyncio.TimeoutError, StoreConnectionError) as exc:
                conn.close()
                error: BaseException = exc
            await asyncio.sleep(retry.after_failure(error))

    @staticmethod
    async def _check_secret(conn: _AsyncConnection, reply: asyncio.Future[Any], proof: bytes, timeout: float) -> None:
        try:
            value = await asyncio.wait_for(reply, timeout)
        except StoreConnectionError:
            raise auth.StoreAuthError(
                f"the store at {conn.address} closed the connection at the shared-secret check: wrong "
                "secret, clocks more than 5 minutes apart, or a replay (see the server log)"
            ) from None
        auth.check_server_reply(value, proof, conn.address)

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._resolve()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            StoreConnectionError(
                f"the store at {self.address} closed the connection (server shut down, or it rejected a request)"
            )
        )

    # -- requests ----------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return self._lost is None and self._transport is not None and not self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if self._lost is not None:
            raise self._lost
        assert self._transport is not None
        self._transport.write(data)

    def request(self, data: bytes, parser: p.ReplyParser | None) -> asyncio.Future[Any]:
        """Send; the returned future resolves with the parsed reply (``None`` if there is none)."""
        self.write(data)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if parser is None:
            self.unacked_writes = True
            future.set_result(None)
        else:
            self.expect(parser, future)
        return future

    def expect(self, parser: p.ReplyParser, future: asyncio.Future[Any] | None = None) -> asyncio.Future[Any]:
        """Queue a reply to read without sending anything (the second byte of a cancel race)."""
        future = future or asyncio.get_running_loop().create_future()
        self._pending.append((future, parser))
        self._resolve()
        return future

    def _resolve(self) -> None:
        try:
            while self._pending:
                reply = self._decoder.decode(self._pending[0][1])
                if reply is p.NEED_DATA:
                    return
                future, _ = self._pending.popleft()
                self.unacked_writes = False  # a reply means every earlier request was processed
                if not future.done():
                    future.set_result(reply)
        except p.ProtocolError as exc:
            self._fail(StoreConnectionError(f"malformed reply from the store at {self.address}: {exc}"))
            self.close()

    def _fail(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        self._fail(StoreConnectionError(f"the connection to the store at {self.address} is closed"))
        if self._transport is not None:
            self._transport.close()


class AsyncTCPStore:
    """asyncio client of a TCPStore server (ours or torch's).

    >>> async with AsyncTCPStore("127.0.0.1", port, timeout=30) as store:
    ...     await store.set("k", "v")
    ...     value = await store.get("k")

    Keys are shared with ``TCPStore`` and torch clients ("/"-prefixed on the
    wire). Every reply is awaited with the store timeout at most; timeouts
    raise ``StoreTimeoutError`` naming the keys and address.
    """

    def __init__(
        self,
        host_name: str,
        port: int,
        timeout: Timeout = DEFAULT_TIMEOUT,
        use_libuv: bool = True,
        *,
        secret: bytes | str | None = None,
    ) -> None:
        self.host = host_name
        self._secret = auth.coerce_secret(secret)  # the shared-secret check (auth); None: torch's protocol
        self.port = port
        self._timeout_s = timeout_seconds(timeout)
        self._use_libuv = bool(use_libuv)
        # One round trip per get (CHECK and GET pipelined) needs libuv's empty reply for a
        # missing key; the primary connection's probe turns it off on torch's legacy server.
        self._pipelined_get = self._use_libuv
        self._primary: _AsyncConnection | None = None
        self._idle: list[_AsyncConnection] = []
        self._busy: set[_AsyncConnection] = set()
        self._connecting: asyncio.Lock | None = None  # made lazily: it must belong to the running loop

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self._timeout_s)

    def set_timeout(self, timeout: Timeout) -> None:
        self._timeout_s = timeout_seconds(timeout)

    async def connect(self) -> AsyncTCPStore:
        if self._primary is not None and self._primary.usable:
            return self
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # many first calls at once open one connection, not many
            if self._primary is None or not self._primary.usable:
                self._primary = await self._open_primary()
        return self

    async def _open(self) -> _AsyncConnection:
        return await _AsyncConnection.open(self.host, self.port, self._timeout_s, self._secret)

    async def _open_primary(self) -> _AsyncConnection:
        if not self._pipelined_get:
            return await self._open()
        try:
            return await _AsyncConnection.open(self.host, self.port, self._timeout_s, self._secret, probe=True)
        except _LegacyServerDetected:
            # Nothing but the handshake went out on that connection, so nothing was lost.
            self._pipelined_get = False
            log.warning(
                "the store at %s dropped the connection on a GET of a missing key, as torch's legacy "
                "server does: using WAIT then GET (pass use_libuv=False to skip this probe)",
                self.address,
            )
            return await self._open()

    async def close(self) -> None:
        for conn in [self._primary, *self._idle, *self._busy]:
            if conn is not None:
                conn.close()
        self._primary = None
        self._idle.clear()
        self._busy.clear()

    async def __aenter__(self) -> AsyncTCPStore:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _reply_timeout(self) -> float:
        return reply_bound(self._timeout_s)

    async def _await_reply(self, conn: _AsyncConnection, future: asyncio.Future[Any]) -> Any:
        try:
            return await asyncio.wait_for(future, self._reply_timeout())
        except asyncio.TimeoutError:
            conn.close()  # the byte stream is out of step now: nothing on it can be trusted
            raise StoreTimeoutError(
                f"no reply from the store at {conn.address} within {format_ms(self._reply_timeout())}"
            ) from None

    async def _call(self, command: cmd.Command) -> Any:
        conn = await self._connected()
        return await self._await_reply(conn, conn.request(*command))

    async def _connected(self) -> _AsyncConnection:
        await self.connect()
        assert self._primary is not None
        return self._primary

    async def _blocking(self, command: cmd.Command, timeout: float, keys: Sequence[bytes], what: str) -> None:
        """Run WAIT or BARRIER on a pooled connection; on timeout, cancel as torch does."""
        primary = await self._connected()
        if primary.unacked_writes:  # make our own earlier writes visible first (see module doc)
            await self._await_reply(primary, primary.request(*cmd.ping(0)))
        conn = self._idle.pop() if self._idle else await self._open()
        self._busy.add(conn)
        reusable = False
        try:
            future = conn.request(*command)
            try:
                await asyncio.wait_for(asyncio.shield(future), max(timeout, 0.0))
                reusable = True
                return
            except asyncio.TimeoutError:
                pass
            released = await self._await_reply(conn, asyncio.ensure_future(self._cancel(conn, future)))
            reusable = True
            if released:
                return  # released right at the deadline: that counts as success
            if what == "barrier":
                raise barrier_timeout(keys[0], timeout, f"TCPStore at {self.address}")
            raise wait_timeout(keys, timeout, f"TCPStore at {self.address}")
        finally:
            # A connection with a wait still pending (task cancelled, error) is closed, which
            # also drops its registration on the server.
            self._busy.discard(conn)
            if reusable and conn.usable and len(self._idle) < _IDLE_POOL:
                self._idle.append(conn)
            else:
                conn.close()

    @staticmethod
    async def _cancel(conn: _AsyncConnection, wait_future: asyncio.Future[Any]) -> bool:
        """CANCEL_WAIT; True if the STOP_WAITING raced in first (then its ack follows)."""
        conn.write(cmd.cancel_wait()[0])
        if await wait_future == p.STOP_WAITING:
            await conn.expect(p.parse_u8)  # WAIT_CANCELED
            return True
        return False  # the one byte was WAIT_CANCELED itself

    # -- operations --------------------------------------------------------------------------
    async def set(self, key: Key, value: Value) -> None:
        await self._call(cmd.set_(key_bytes(key), value_bytes(value)))

    async def get(self, key: Key) -> bytes:
        return (await self.multi_get([key]))[0]

    async def multi_get(self, keys: Iterable[Key]) -> list[bytes]:
        raw = key_list(keys)
        conn = await self._connected()  # settles _pipelined_get (the primary's probe)
        if self._pipelined_get:
            data, (check_parser, get_parser) = cmd.check_then_multi_get(raw)
            conn.write(data)
            ready, values = await asyncio.gather(
                self._await_reply(conn, conn.expect(check_parser)), self._await_reply(conn, conn.expect(get_parser))
            )
            if ready:
                return values  # type: ignore[no-any-return]
        await self.wait(raw)
        return await self._call(cmd.multi_get(raw))  # type: ignore[no-any-return]

    async def add(self, key: Key, amount: int) -> int:
        return await self._call(cmd.add(key_bytes(key), check_int64(amount)))  # type: ignore[no-any-return]

    async def compare_set(self, key: Key, expected: Value, desired: Value) -> bytes:
        return await self._call(cmd.compare_set(key_bytes(key), value_bytes(expected), value_bytes(desired)))  # type: ignore[no-any-return]

    async def delete_key(self, key: Key) -> bool:
        return await self._call(cmd.delete_key(key_bytes(key)))  # type: ignore[no-any-return]

    async def check(self, keys: Iterable[Key]) -> bool:
        return await self._call(cmd.check(key_list(keys)))  # type: ignore[no-any-return]

    async def wait(self, keys: Iterable[Key], timeout: Timeout | None = None) -> None:
        raw = key_list(keys)
        seconds = self._timeout_s if timeout is None else timeout_seconds(timeout)
        await self._blocking(cmd.wait(raw), seconds, [cmd.PREFIX + k for k in raw], "wait")

    async def num_keys(self) -> int:
        return await self._call(cmd.num_keys())  # type: ignore[no-any-return]

    async def multi_set(self, keys: Sequence[Key], values: Sequence[Value]) -> None:
        raw_keys = key_list(keys)
        raw_values = [value_bytes(v) for v in values]
        same_length(raw_keys, raw_values)
        await self._call(cmd.multi_set(raw_keys, raw_values))

    async def append(self, key: Key, value: Value) -> None:
        await self._call(cmd.append(key_bytes(key), value_bytes(value)))

    async def list_keys(self) -> list[str]:
        return [k.decode("utf-8") for k in await self._call(cmd.list_keys())]

    async def barrier(self, key: Key, world_size: int, timeout: Timeout | None = None) -> None:
        raw = key_bytes(key)
        seconds = self._timeout_s if timeout is None else timeout_seconds(timeout)
        await self._blocking(cmd.barrier(raw, int(world_size)), seconds, [raw], "barrier")

    async def queue_push(self, key: Key, value: Value) -> None:
        cmd.require_queues(self._use_libuv)
        await self._call(cmd.queue_push(key_bytes(key), value_bytes(value)))

    async def queue_pop(self, key: Key, block: bool = True) -> bytes:
        cmd.require_queues(self._use_libuv)
        raw = key_bytes(key)
        if block:
            await self.wait([raw])
        value = await self._call(cmd.queue_pop(raw))
        if value is None:
            raise queue_empty(cmd.PREFIX + raw, f"TCPStore at {self.address}")
        return value  # type: ignore[no-any-return]

    async def queue_len(self, key: Key) -> int:
        cmd.require_queues(self._use_libuv)
        return await self._call(cmd.queue_len(key_bytes(key)))  # type: ignore[no-any-return]
