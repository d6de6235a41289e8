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


def _quiet(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as retrieved: nobody may be left to await it."""
    if not future.cancelled():
        future.exception()


async def _wait_for(future: asyncio.Future[Any], timeout: float) -> Any:
    """``asyncio.wait_for`` that keeps cancellation a ``CancelledError`` on every Python.

    On 3.10 and 3.11, ``wait_for`` returns the inner result (or raises its exception)
    when the outer task is cancelled just as the inner future finishes, so a cancelled
    call could end as ``StoreConnectionError``, or not end at all. Here cancellation
    always wins. A plain future is left alone (as with ``shield``: it is one reply on a
    connection the caller cleans up); a task is cancelled, on timeout and on
    cancellation, and its outcome is then ignored quietly.

    Raises:
        asyncio.TimeoutError: ``future`` did not finish within ``timeout`` seconds.
        asyncio.CancelledError: the calling task was cancelled.
        Whatever ``future`` raises.
    """
    if not future.done():
        if timeout > 0:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_: object = None) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            timer = loop.call_later(timeout, wake)
            future.add_done_callback(wake)
            try:
                await waiter
            except BaseException:
                if isinstance(future, asyncio.Task):
                    future.cancel()
                    future.add_done_callback(_quiet)
                raise
            finally:
                timer.cancel()
                future.remove_done_callback(wake)
        if not future.done():
            if isinstance(future, asyncio.Task):
                future.cancel()
                future.add_done_callback(_quiet)
            raise asyncio.TimeoutError()
    return future.result()


class _AsyncConnection(asyncio.Protocol):
    """A validated connection whose replies resolve futures in request order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._decoder = p.StreamDecoder()
        # (future, parser, op, user keys): op and keys name the request in error messages.
        self._pending: collections.deque[tuple[asyncio.Future[Any], p.ReplyParser, str, cmd.Keys]] = (
            collections.deque()
        )
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None
        self.unacked_writes = False
        self._unanswered: tuple[str, cmd.Keys] | None = None  # the last request without a reply

    @classmethod
    async def open(
        cls, host: str, port: int, timeout: float, secret: bytes | None = None, probe: bool = False
    ) -> _AsyncConnection:
        """Connect (retrying per ``retry.ConnectRetry``) until ``timeout``, then do torch's handshake.

        ``probe``: also pipeline a GET of ``commands.PROBE_KEY`` (no extra round trip) and raise
        ``_LegacyServerDetected`` if the server drops the connection on it.

        Raises:
            StoreConnectionError: no connection and handshake within ``timeout``.
            StoreAuthError: the secret check failed, or the server requires a secret we lack.
            asyncio.CancelledError: the calling task was cancelled (the half-open connection is closed).
        """
        loop = asyncio.get_running_loop()
        retry = ConnectRetry(host, port, timeout)
        while True:
            conn = cls(f"{host}:{port}")
            try:
                connecting = asyncio.ensure_future(loop.create_connection(lambda: conn, host, port))
                await _wait_for(connecting, retry.attempt_timeout())
                nonce = os.getpid() & 0xFFFFFFFF
                conn.write(p.encode_validate())
                ping = conn.request(*cmd.ping(nonce))
                check = secret_probe = None
                if secret is not None:  # the shared-secret check, pipelined behind the PING
                    key, proof = auth.client_request_key(secret)
                    check = conn.request(*cmd.get_raw(key))
                else:  # does the server require a secret we lack? (commands.secret_probe)
                    secret_probe = conn.request(*cmd.secret_probe())
                probed = conn.request(*cmd.get_raw(cmd.PROBE_KEY)) if probe else None
                echo = await _wait_for(ping, retry.attempt_timeout())
                if echo != nonce.to_bytes(4, "little"):
                    raise ConnectionError(f"PING failed: sent nonce {nonce}, got {echo.hex()}")
                if check is not None:
                    await cls._check_secret(conn, check, proof, retry.attempt_timeout())
                if secret_probe is not None:
                    try:
                        await _wait_for(secret_probe, retry.attempt_timeout())
                    except StoreConnectionError:  # answered the PING, then refused a CHECK
                        raise auth.StoreAuthError(auth.secret_required(conn.address)) from None
                if probed is not None:
                    try:
                        await _wait_for(probed, retry.attempt_timeout())
                    except StoreConnectionError:
                        conn.close()  # the handshake was answered, then the GET dropped us
                        raise _LegacyServerDetected() from None
                return conn
            except (OSError, asyncio.TimeoutError, StoreConnectionError) as exc:
                conn.close()
                if isinstance(exc, auth.StoreAuthError):
                    raise
                error: BaseException = exc
            except BaseException:  # cancelled (or the legacy verdict): close quietly, propagate
                conn.close()
                raise
            await asyncio.sleep(retry.after_failure(error))

    @staticmethod
    async def _check_secret(conn: _AsyncConnection, reply: asyncio.Future[Any], proof: bytes, timeout: float) -> None:
        try:
            value = await _wait_for(reply, timeout)
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
        if self._lost is not None:
            return
        if self._pending:
            _, _, op, keys = self._pending[0]
            first: Exception = StoreConnectionError(
                f"the store at {self.address} " + cmd.refusal(op or "a request", keys, self._unanswered)
            )
        else:
            first = StoreConnectionError(
                f"the store at {self.address} closed the connection (server shut down or restarted, or it "
                "refused a request without reply: see the server log); the next call reconnects"
            )
        self._fail(
            StoreConnectionError(
                f"the store at {self.address} closed the connection before answering (it refused an earlier "
                "request, or shut down); the next call reconnects"
            ),
            first,
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

    def request(
        self, data: bytes, parser: p.ReplyParser | None, op: str = "", keys: cmd.Keys = None
    ) -> asyncio.Future[Any]:
        """Send; the returned future resolves with the parsed reply (``None`` if there is none).
        ``op`` and ``keys`` (the user's keys) name the request in error messages."""
        self.write(data)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if parser is None:
            self.unacked_writes = True
            self._unanswered = (op, keys)
            future.set_result(None)
        else:
            self.expect(parser, future, op, keys)
        return future

    def expect(
        self,
        parser: p.ReplyParser,
        future: asyncio.Future[Any] | None = None,
        op: str = "",
        keys: cmd.Keys = None,
    ) -> asyncio.Future[Any]:
        """Queue a reply to read without sending anything (the second byte of a cancel race)."""
        future = future or asyncio.get_running_loop().create_future()
        self._pending.append((future, parser, op, keys))
        self._resolve()
        return future

    def _resolve(self) -> None:
        try:
            while self._pending:
                reply = self._decoder.decode(self._pending[0][1])
                if reply is p.NEED_DATA:
                    return
                future = self._pending.popleft()[0]
                self.unacked_writes = False  # a reply means every earlier request was processed
                self._unanswered = None
                if not future.done():
                    future.set_result(reply)
        except p.ProtocolError as exc:
            self._fail(StoreConnectionError(f"malformed reply from the store at {self.address}: {exc}"))
            self.close()

    def _fail(self, exc: Exception, first: Exception | None = None) -> None:
        """Fail every pending reply (the first with ``first``, if given). Quietly: a caller that
        was cancelled meanwhile never awaits its future, and that is no error to report."""
        if self._lost is None:
            self._lost = exc
        while self._pending:
            future = self._pending.popleft()[0]
            if not future.done():
                future.set_exception(first or exc)
                future.exception()  # retrieved: no "exception was never retrieved" at exit
            first = None

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
    raise ``StoreTimeoutError`` naming the keys and address. The constructor
    does not connect: ``connect()`` (or ``async with``, or the first call) does.

    When the server closes the primary connection (it refused a request, or it
    restarted) the call in flight fails with a ``StoreConnectionError`` naming
    the operation, and the next call reconnects with the full handshake. A
    cancelled call raises ``CancelledError`` and closes the pooled connection
    it borrowed, quietly.

    Raises:
        TypeError: ``timeout`` is not a ``timedelta`` or seconds.
        ValueError: ``secret`` is shorter than 16 bytes.
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
        # One round trip per get (a bare GET; CHECK and MULTI_GET pipelined when it answers
        # empty) needs libuv's empty reply for a missing key; the primary connection's probe
        # turns it off on torch's legacy server.
        self._missing_get_is_empty = self._use_libuv
        self._primary: _AsyncConnection | None = None
        self._idle: list[_AsyncConnection] = []
        self._busy: set[_AsyncConnection] = set()
        self._connecting: asyncio.Lock | None = None  # made lazily: it must belong to the running loop

    @property
    def address(self) -> str:
        """``host:port`` of the server.

        Raises:
            Nothing.
        """
        return f"{self.host}:{self.port}"

    @property
    def timeout(self) -> timedelta:
        """The store timeout (connect, every reply, and waits without their own timeout).

        Raises:
            Nothing.
        """
        return timedelta(seconds=self._timeout_s)

    def set_timeout(self, timeout: Timeout) -> None:
        """Set the store timeout (``timedelta`` or seconds).

        Raises:
            TypeError: ``timeout`` is neither a ``timedelta`` nor a number.
        """
        self._timeout_s = timeout_seconds(timeout)

    async def connect(self) -> AsyncTCPStore:
        """Open the primary connection unless it is open and usable (also reconnects); return self.

        Raises:
            StoreConnectionError: the server could not be reached within the store timeout
                (the message names the address and the timeout).
            StoreAuthError: the shared-secret check failed, or the server requires a
                secret and this client has none.
            asyncio.CancelledError: the calling task was cancelled.
        """
        if self._primary is not None and self._primary.usable:
            return self
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # many first calls at once open one connection, not many
            if self._primary is None or not self._primary.usable:
                again = self._primary is not None
                self._primary = await self._open_primary()
                if again:
                    log.info("reconnected to the store at %s", self.address)
        return self

    async def _open(self) -> _AsyncConnection:
        return await _AsyncConnection.open(self.host, self.port, self._timeout_s, self._secret)

    async def _open_primary(self) -> _AsyncConnection:
        if not self._missing_get_is_empty:
            return await self._open()
        try:
            return await _AsyncConnection.open(self.host, self.port, self._timeout_s, self._secret, probe=True)
        except _LegacyServerDetected:
            # Nothing but the handshake went out on that connection, so nothing was lost.
            self._missing_get_is_empty = False
            log.warning(
                "the store at %s dropped the connection on a GET of a missing key, as torch's legacy "
                "server does: using WAIT then GET (pass use_libuv=False to skip this probe)",
                self.address,
            )
            return await self._open()

    async def close(self) -> None:
        """Close every connection; calls still in flight fail with ``StoreConnectionError``.
        Safe to call twice; a later call reconnects.

        Raises:
            Nothing.
        """
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
            return await _wait_for(future, self._reply_timeout())
        except asyncio.TimeoutError:
            conn.close()  # the byte stream is out of step now: nothing on it can be trusted
            raise StoreTimeoutError(
                f"no reply from the store at {conn.address} within {format_ms(self._reply_timeout())}"
            ) from None

    async def _call(self, command: cmd.Command, op: str, keys: cmd.Keys = None) -> Any:
        conn = await self._connected()
        return await self._await_reply(conn, conn.request(*command, op, keys))

    async def _connected(self) -> _AsyncConnection:
        await self.connect()
        assert self._primary is not None
        return self._primary

    async def _borrow(self) -> _AsyncConnection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:  # the server may have closed it while idle (restart)
                return conn
            conn.close()
        return await self._open()

    async def _blocking(
        self, command: cmd.Command, timeout: float, keys: Sequence[bytes], what: str, names: cmd.Keys
    ) -> None:
        """Run WAIT or BARRIER on a pooled connection; on timeout, cancel as torch does.
        ``keys``: for the timeout message; ``names``: the user's keys, for connection errors."""
        primary = await self._connected()
        if primary.unacked_writes:  # make our own earlier writes visible first (see module doc)
            await self._await_reply(primary, primary.request(*cmd.ping(0), "ping"))
        conn = await self._borrow()
        self._busy.add(conn)
        reusable = False
        try:
            future = conn.request(*command, what, names)
            try:
                await _wait_for(future, max(timeout, 0.0))  # the future is left alone on timeout
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
            # also drops its registration on the server; its futures fail quietly.
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
    # Every operation may also raise: StoreConnectionError (server unreachable within the
    # store timeout, or it closed the connection: the message names the operation),
    # StoreAuthError (secret check), StoreTimeoutError (no reply within the store timeout),
    # asyncio.CancelledError (the task was cancelled).
    async def set(self, key: Key, value: Value) -> None:
        """Store ``value`` at ``key`` (no reply, as in torch).

        Raises:
            TypeError: ``key`` or ``value`` has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        raw = key_bytes(key)
        await self._call(cmd.set_(raw, value_bytes(value)), "set", raw)

    async def get(self, key: Key) -> bytes:
        """Wait up to the store timeout for ``key``, then return its value.

        Raises:
            StoreTimeoutError: the key did not appear within the store timeout.
            TypeError: ``key`` has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        raw = key_bytes(key)
        conn = await self._connected()  # settles _missing_get_is_empty (the primary's probe)
        if self._missing_get_is_empty:
            # One request, one reply for the common case. Empty is ambiguous under libuv's
            # rules (an empty value, or a missing key), so it takes the path that can tell.
            value: bytes = await self._await_reply(conn, conn.request(*cmd.get(raw), "get", raw))
            if value:
                return value
        return (await self._multi_get(conn, [raw]))[0]

    async def multi_get(self, keys: Iterable[Key]) -> list[bytes]:
        """Wait up to the store timeout for every key, then return their values in order.

        Raises:
            StoreTimeoutError: some key did not appear within the store timeout.
            TypeError: ``keys`` is a single key or holds a key of the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        raw = key_list(keys)
        return await self._multi_get(await self._connected(), raw)

    async def _multi_get(self, conn: _AsyncConnection, raw: list[bytes]) -> list[bytes]:
        """``multi_get`` of checked keys on ``conn``, from ``_connected()`` (which settles
        ``_missing_get_is_empty``: the primary's probe)."""
        if self._missing_get_is_empty:
            data, (check_parser, get_parser) = cmd.check_then_multi_get(raw)
            conn.write(data)
            ready, values = await asyncio.gather(
                self._await_reply(conn, conn.expect(check_parser, None, "get", raw)),
                self._await_reply(conn, conn.expect(get_parser, None, "get", raw)),
            )
            if ready:
                return values  # type: ignore[no-any-return]
        await self.wait(raw)
        return await self._call(cmd.multi_get(raw), "get", raw)  # type: ignore[no-any-return]

    async def add(self, key: Key, amount: int) -> int:
        """Add ``amount`` to the integer at ``key`` (missing counts as 0); return the sum.

        Raises:
            StoreConnectionError: the server refused it (the stored value is not an
                integer: the server closes the connection, and the message says so),
                or cannot be reached.
            TypeError: ``amount`` is not an int or does not fit in 64 bits.
        """
        raw = key_bytes(key)
        return await self._call(cmd.add(raw, check_int64(amount)), "add", raw)  # type: ignore[no-any-return]

    async def compare_set(self, key: Key, expected: Value, desired: Value) -> bytes:
        """Store ``desired`` if the value equals ``expected``; return the value now stored
        (torch's rules for a missing key, see ``Store.compare_set``).

        Raises:
            TypeError: an argument has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        raw = key_bytes(key)
        command = cmd.compare_set(raw, value_bytes(expected), value_bytes(desired))
        return await self._call(command, "compare_set", raw)  # type: ignore[no-any-return]

    async def delete_key(self, key: Key) -> bool:
        """Delete ``key``; return whether it existed.

        Raises:
            TypeError: ``key`` has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        raw = key_bytes(key)
        return await self._call(cmd.delete_key(raw), "delete_key", raw)  # type: ignore[no-any-return]

    async def check(self, keys: Iterable[Key]) -> bool:
        """Return whether every key exists, without waiting.

        Raises:
            TypeError: ``keys`` is a single key or holds a key of the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        raw = key_list(keys)
        return await self._call(cmd.check(raw), "check", raw)  # type: ignore[no-any-return]

    async def wait(self, keys: Iterable[Key], timeout: Timeout | None = None) -> None:
        """Block until every key exists (up to ``timeout``, default the store timeout), on a
        pooled connection: many waits can be in flight at once.

        Raises:
            StoreTimeoutError: some key was still missing at the deadline (names keys and address).
            TypeError: ``keys`` is a single key, or an argument has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
            asyncio.CancelledError: the task was cancelled (the borrowed connection is closed).
        """
        raw = key_list(keys)
        seconds = self._timeout_s if timeout is None else timeout_seconds(timeout)
        await self._blocking(cmd.wait(raw), seconds, [cmd.PREFIX + k for k in raw], "wait", raw)

    async def num_keys(self) -> int:
        """Return the number of keys on the server, ``init/`` included (torch's count).

        Raises:
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        return await self._call(cmd.num_keys(), "num_keys")  # type: ignore[no-any-return]

    async def multi_set(self, keys: Sequence[Key], values: Sequence[Value]) -> None:
        """Store ``values[i]`` at ``keys[i]`` for every ``i`` (one request, no reply).

        Raises:
            ValueError: ``keys`` and ``values`` differ in length.
            TypeError: a key or value has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        raw_keys = key_list(keys)
        raw_values = [value_bytes(v) for v in values]
        same_length(raw_keys, raw_values)
        await self._call(cmd.multi_set(raw_keys, raw_values), "multi_set", raw_keys)

    async def append(self, key: Key, value: Value) -> None:
        """Append ``value`` to the value at ``key`` (no reply, as in torch).

        Raises:
            TypeError: ``key`` or ``value`` has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        raw = key_bytes(key)
        await self._call(cmd.append(raw, value_bytes(value)), "append", raw)

    async def list_keys(self) -> list[str]:
        """Return the keys written through the TCPStore API (``init/`` is hidden, as in torch).

        Raises:
            StoreConnectionError: the server cannot be reached or closed the connection.
            UnicodeDecodeError: a key is not valid UTF-8.
        """
        return [k.decode("utf-8") for k in await self._call(cmd.list_keys(), "list_keys")]

    async def barrier(self, key: Key, world_size: int, timeout: Timeout | None = None) -> None:
        """Block until ``world_size`` callers reached the barrier ``key`` (the server's native one).

        Raises:
            StoreTimeoutError: fewer than ``world_size`` arrived within ``timeout``
                (default: the store timeout).
            TypeError: an argument has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
            asyncio.CancelledError: the task was cancelled (the borrowed connection is closed).
        """
        raw = key_bytes(key)
        seconds = self._timeout_s if timeout is None else timeout_seconds(timeout)
        await self._blocking(cmd.barrier(raw, int(world_size)), seconds, [raw], "barrier", raw)

    async def queue_push(self, key: Key, value: Value) -> None:
        """Push ``value`` onto the queue at ``key`` (no reply).

        Raises:
            NotImplementedError: ``use_libuv=False`` (torch's legacy server has no queues).
            TypeError: ``key`` or ``value`` has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        cmd.require_queues(self._use_libuv)
        raw = key_bytes(key)
        await self._call(cmd.queue_push(raw, value_bytes(value)), "queue_push", raw)

    async def queue_pop(self, key: Key, block: bool = True) -> bytes:
        """Pop the head of the queue at ``key``; with ``block``, wait up to the store timeout.

        Raises:
            StoreTimeoutError: ``block`` and the queue stayed empty for the store timeout.
            QueueEmptyError: not ``block`` and the queue is empty.
            NotImplementedError: ``use_libuv=False``.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        cmd.require_queues(self._use_libuv)
        raw = key_bytes(key)
        if block:
            await self.wait([raw])
        value = await self._call(cmd.queue_pop(raw), "queue_pop", raw)
        if value is None:
            raise queue_empty(cmd.PREFIX + raw, f"TCPStore at {self.address}")
        return value  # type: ignore[no-any-return]

    async def queue_len(self, key: Key) -> int:
        """Return the length of the queue at ``key`` (0 if there is none).

        Raises:
            NotImplementedError: ``use_libuv=False``.
            TypeError: ``key`` has the wrong type.
            StoreConnectionError: the server cannot be reached or closed the connection.
        """
        cmd.require_queues(self._use_libuv)
        raw = key_bytes(key)
        return await self._call(cmd.queue_len(raw), "queue_len", raw)  # type: ignore[no-any-return]
