"""``TCPStore``: torch's constructor and methods over our blocking client (and server).

Keys are sent as ``"/" + key``, exactly as torch's client does, so torch and
rdzv_store clients share keys on one server; ``init/`` (the worker count) is
unprefixed, as in torch. ``is_master=True`` runs a ``StoreServer`` on a
background thread of this process.

Faster than torch where the protocol allows it: ``get``/``multi_get`` of keys
that already exist take one round trip (CHECK and GET pipelined) instead of
torch's WAIT-then-GET. That relies on the libuv rule that a GET of a missing
key answers an empty value. torch's legacy server drops the connection
instead, so the connection's handshake carries a probe (``commands.PROBE_KEY``,
no extra round trip): on a legacy server, and with ``use_libuv=False``, we use
torch's two round trips.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta

from . import commands as cmd
from .args import Timeout, timeout_seconds
from .auth import coerce_secret
from .client import Connection
from .errors import queue_empty, StoreConnectionError, StoreTimeoutError
from .server import BackgroundServer, StoreServer
from .store import DEFAULT_TIMEOUT, Store

__all__ = ["TCPStore"]

log = logging.getLogger("rdzv_store.tcpstore")

# multi_tenant=True: one server per port per process, shared by reference count.
_tenants: dict[int, tuple[BackgroundServer, int]] = {}
_tenants_lock = threading.Lock()


def _wire(keys: list[bytes]) -> list[bytes]:
    """Keys as they go on the wire (torch's "/" prefix), for timeout messages."""
    return [cmd.PREFIX + k for k in keys]


def _nothing() -> None:
    return None


def _release_server(server: BackgroundServer | None, port: int, multi_tenant: bool) -> None:
    if server is None:
        return
    if multi_tenant:
        with _tenants_lock:
            entry = _tenants.get(port)
            if entry is not None and entry[0] is server:
                if entry[1] > 1:
                    _tenants[port] = (server, entry[1] - 1)
                    return
                del _tenants[port]
    server.stop()


class TCPStore(Store):
    """A client of a TCPStore server, optionally hosting that server (``is_master=True``).

    Same signature as ``torch.distributed.TCPStore``. Differences: the server
    binds only ``host_name``'s addresses; every read is bounded by the store
    timeout; errors name the address; a timeout <= 0 checks once instead of
    waiting (torch: "wait forever" for negative values); ``close()`` and the
    context manager stop an owned server deterministically.

    Extensions (keyword-only): ``secret`` turns on the shared-secret check
    (``rdzv_store.auth``) for this client and, with ``is_master``, for the
    server it hosts; ``allow_torch_clients`` lets that server also serve
    clients that skip the check. Without a secret the wire is torch's.

    Connection loss: when the server closes the connection (it refuses a
    request it cannot carry out, e.g. ``add`` on a value that is not an
    integer, as the protocol has no error reply; or it shut down or
    restarted), the call in flight raises ``StoreConnectionError`` saying which
    operation and key the server refused and why that usually happens, and the
    next call reconnects within the store timeout, with the full handshake
    (shared-secret check included) and without counting this client in
    ``init/`` again. A failed call is never retried (nothing is sent twice).
    After ``close()`` every call raises ``StoreConnectionError``.

    Raises:
        ValueError: ``world_size == 0``, ``port`` outside 0..65535, or a
            ``secret`` shorter than 16 bytes.
        TypeError: ``timeout`` is not a ``timedelta`` or seconds.
        StoreConnectionError: with ``is_master``, the port cannot be bound; the
            server cannot be reached within ``timeout`` (the message names the
            address and the timeout; connect attempts are logged at INFO).
        StoreAuthError: the shared-secret check failed, or the server requires
            a secret and none was given.
        StoreTimeoutError: with ``is_master`` and ``wait_for_workers``, fewer
            than ``world_size`` clients joined within ``timeout``.
        Each operation raises what ``Store`` documents, and
        ``StoreConnectionError`` when the server closes the connection.
    """

    def __init__(
        self,
        host_name: str,
        port: int,
        world_size: int | None = None,
        is_master: bool = False,
        timeout: Timeout = DEFAULT_TIMEOUT,
        wait_for_workers: bool = True,
        multi_tenant: bool = False,
        master_listen_fd: int | None = None,
        use_libuv: bool = True,
        *,
        secret: bytes | str | None = None,
        allow_torch_clients: bool = False,
    ) -> None:
        super().__init__(timeout)
        if world_size == 0:
            raise ValueError("TCPStore world size cannot be 0")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
        self.host = host_name
        self._use_libuv = bool(use_libuv)  # use_libuv=None selects torch's legacy rules, as in torch
        # One round trip per get (a bare GET; CHECK and MULTI_GET pipelined when it answers
        # empty) relies on libuv's empty reply for a missing key; off for legacy servers, by the
        # flag or by the connection's probe.
        self._missing_get_is_empty = self._use_libuv
        self._world_size = world_size
        self._server: BackgroundServer | None = None
        self._multi_tenant = multi_tenant
        self.port = port
        self._secret = coerce_secret(secret)  # the shared-secret check (auth); None: torch's protocol
        if is_master:
            self._server = self._start_server(
                host_name, port, multi_tenant, master_listen_fd, self._secret, allow_torch_clients
            )
            if self._server is not None:
                self.port = self._server.port
        # Stops (or releases, multi_tenant) the hosted server when this object goes away unclosed.
        # A plain client has nothing to release: no finalizer (a storm makes thousands of them).
        self._finalizer: Callable[[], object] = (
            weakref.finalize(self, _release_server, self._server, self.port, multi_tenant)
            if self._server is not None
            else _nothing
        )
        try:
            self._conn = Connection(host_name, self.port, self._timeout_s, secret=self._secret, probe=self._use_libuv)
            if self._use_libuv and not self._conn.libuv_rules:
                self._missing_get_is_empty = False
                log.warning(
                    "the store at %s dropped a GET of a missing key, as torch's legacy server does: "
                    "using WAIT then GET (pass use_libuv=False to skip this probe)",
                    self._conn.address,
                )
            if world_size is not None and wait_for_workers:
                self._conn.call(cmd.add_raw(cmd.INIT_KEY, 1), "add on key init/")
                if self._server is not None:
                    self._wait_for_workers(world_size)
        except BaseException:
            self._finalizer()
            raise

    # -- server ownership --------------------------------------------------------------------
    @staticmethod
    def _start_server(
        host: str,
        port: int,
        multi_tenant: bool,
        listen_fd: int | None,
        secret: bytes | None = None,
        allow_torch_clients: bool = False,
    ) -> BackgroundServer | None:
        if multi_tenant and port:
            with _tenants_lock:
                entry = _tenants.get(port)
                if entry is not None:
                    _tenants[port] = (entry[0], entry[1] + 1)
                    return entry[0]
        sock = socket.socket(fileno=listen_fd) if listen_fd is not None else None
        try:
            server = BackgroundServer(
                StoreServer(host, port, sock=sock, secret=secret, allow_torch_clients=allow_torch_clients)
            )
        except StoreConnectionError:
            # torch's agent-store rule: the elastic agent already hosts the store on MASTER_PORT.
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() in ("1", "true")
            if agent_store and os.environ.get("MASTER_PORT") == str(port):
                return None
            raise
        if multi_tenant and port:
            with _tenants_lock:
                _tenants[port] = (server, 1)
        return server

    def _wait_for_workers(self, world_size: int) -> None:
        deadline = time.monotonic() + self._timeout_s
        while True:
            joined = int(self._conn.call(cmd.get_raw(cmd.INIT_KEY)) or b"0")
            if joined >= world_size:
                return
            if time.monotonic() >= deadline:
                raise StoreTimeoutError(
                    f"Timed out after {int(self._timeout_s)} seconds waiting for clients. "
                    f"{joined}/{world_size} clients joined. (TCPStore at {self._conn.address})"
                )
            time.sleep(0.005)

    def close(self) -> None:
        """Close the connection and, if this object hosts the server, stop it. Idempotent;
        later calls on this object raise ``StoreConnectionError``.

        Raises:
            Nothing.
        """
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
        self._finalizer()

    # -- properties --------------------------------------------------------------------------
    @property
    def libuvBackend(self) -> bool:  # noqa: N802 - torch's name
        """Whether this client follows torch's libuv rules (``use_libuv``), as torch reports it.

        Raises:
            Nothing.
        """
        return self._use_libuv

    def has_extended_api(self) -> bool:
        """True: TCPStore has torch's extended API.

        Raises:
            Nothing.
        """
        return True

    def clone(self) -> TCPStore:
        """A new client of the same server (its own connection; not counted in ``init/``).

        Raises:
            StoreConnectionError: the server cannot be reached within the store timeout.
            StoreAuthError: the shared-secret check failed.
        """
        return TCPStore(
            self.host,
            self.port,
            timeout=timedelta(seconds=self._timeout_s),
            wait_for_workers=False,
            use_libuv=self._use_libuv,
            secret=self._secret,
        )

    def __repr__(self) -> str:
        role = "master" if self._server is not None else "client"
        return f"TCPStore(host={self.host!r}, port={self.port}, {role})"

    # -- hooks: each is one command from ``commands`` ----------------------------------------
    def _set(self, key: bytes, value: bytes) -> None:
        self._conn.call(cmd.set_(key, value), "set", key)

    def _get(self, key: bytes, timeout: float) -> bytes:
        if self._missing_get_is_empty:
            # One request, one reply for the common case. Empty is ambiguous under libuv's
            # rules (an empty value, or a missing key), so it takes the path that can tell.
            value: bytes = self._conn.call(cmd.get(key), "get", key)
            if value:
                return value
        return self._multi_get([key], timeout)[0]

    def _multi_get(self, keys: list[bytes], timeout: float) -> list[bytes]:
        if self._missing_get_is_empty:
            ready, values = self._conn.call_many(*cmd.check_then_multi_get(keys), "get", keys)
            if ready:
                return values  # type: ignore[no-any-return]
        self._wait(keys, timeout)
        return self._conn.call(cmd.multi_get(keys), "get", keys)  # type: ignore[no-any-return]

    def _add(self, key: bytes, amount: int) -> int:
        return self._conn.call(cmd.add(key, amount), "add", key)  # type: ignore[no-any-return]

    def _compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        return self._conn.call(cmd.compare_set(key, expected, desired), "compare_set", key)  # type: ignore[no-any-return]

    def _delete_key(self, key: bytes) -> bool:
        return self._conn.call(cmd.delete_key(key), "delete_key", key)  # type: ignore[no-any-return]

    def _check(self, keys: list[bytes]) -> bool:
        return self._conn.call(cmd.check(keys), "check", keys)  # type: ignore[no-any-return]

    def _wait(self, keys: list[bytes], timeout: float) -> None:
        self._conn.wait(cmd.wait(keys), timeout, _wire(keys), "wait", keys)

    def _num_keys(self) -> int:
        return self._conn.call(cmd.num_keys(), "num_keys")  # type: ignore[no-any-return]

    def _multi_set(self, keys: list[bytes], values: list[bytes]) -> None:
        self._conn.call(cmd.multi_set(keys, values), "multi_set", keys)

    def _append(self, key: bytes, value: bytes) -> None:
        self._conn.call(cmd.append(key, value), "append", key)

    def _list_keys(self) -> list[bytes]:
        return self._conn.call(cmd.list_keys(), "list_keys")  # type: ignore[no-any-return]

    def _barrier(self, key: bytes, world_size: int, timeout: float) -> None:
        self._conn.wait(cmd.barrier(key, world_size), timeout, [key], "barrier", key)

    def _queue_push(self, key: bytes, value: bytes) -> None:
        cmd.require_queues(self._use_libuv)
        self._conn.call(cmd.queue_push(key, value), "queue_push", key)

    def _queue_pop(self, key: bytes, block: bool, timeout: float) -> bytes:
        cmd.require_queues(self._use_libuv)
        if block:
            self._wait([key], timeout)
        value = self._conn.call(cmd.queue_pop(key), "queue_pop", key)
        if value is None:
            raise queue_empty(cmd.PREFIX + key, f"TCPStore at {self._conn.address}")
        return value

    def _queue_len(self, key: bytes) -> int:
        cmd.require_queues(self._use_libuv)
        return self._conn.call(cmd.queue_len(key), "queue_len", key)  # type: ignore[no-any-return]

    def set_timeout(self, timeout: Timeout) -> None:
        """Set the store timeout: default for waits, bound for every reply and reconnect.

        Raises:
            TypeError: ``timeout`` is neither a ``timedelta`` nor a number.
        """
        super().set_timeout(timeout)
        self._conn.set_reply_timeout(timeout_seconds(timeout))
