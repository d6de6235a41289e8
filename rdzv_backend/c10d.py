"""The c10d rendezvous backend: rendezvous state in one key of a c10d store.

Byte-compatible with torch 2.13's ``c10d_rendezvous_backend``: the state of
run ``<run_id>`` is stored, base64-encoded, under ``torch.rendezvous.<run_id>``
of a TCP or file store, and updated with ``compare_set``. A torch backend and
this one on the same store therefore read and fence each other's writes.

The backend treats the state as opaque bytes. It never unpickles (or
otherwise interprets) anything read from the store: it only base64-decodes.
What the bytes mean, and validating them, is the caller's business.
"""

from __future__ import annotations

import binascii
import contextlib
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from base64 import b64decode, b64encode
from datetime import timedelta
from typing import Any

from rdzv_store import FileStore, Store, TCPStore

from .api import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousParameters,
    RendezvousStateError,
)
from .utils import _matches_machine_hostname, parse_rendezvous_endpoint

__all__ = [
    "DEFAULT_PORT",
    "Token",
    "RendezvousBackend",
    "C10dRendezvousBackend",
    "create_backend",
]

logger = logging.getLogger(__name__)

#: The TCP store port used when the endpoint names none. Read at call time,
#: so tests (and embedders) can patch ``rdzv_backend.c10d.DEFAULT_PORT``.
DEFAULT_PORT = 29400

#: Default ``read_timeout`` (seconds) of a TCP store made by :func:`create_backend`.
DEFAULT_READ_TIMEOUT = 60

#: A fencing token: opaque to callers, only ever handed back to the backend that issued it.
Token = Any

_CONNECTION_FAILED = "The connection to the C10d store has failed. See inner exception for details."

#: What a store failure looks like. torch catches (ValueError, RuntimeError,
#: TimeoutError); our store errors are RuntimeError subclasses, and we add
#: OSError so that a raw socket or file error from a store is reported as a
#: connection failure (which callers retry) rather than escaping untranslated.
_STORE_FAILURES = (ValueError, RuntimeError, OSError)


class RendezvousBackend(ABC):
    """Where a rendezvous keeps its shared state: a compare-and-set register of bytes.

    Writes are fenced by a token: :meth:`set_state` only replaces the state
    if the caller's token is the current one, so nodes that read, modify and
    write the state concurrently never lose each other's updates silently;
    the loser gets the winner's state back and tries again.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The backend's name, as used in ``--rdzv-backend``."""

    @abstractmethod
    def get_state(self) -> tuple[bytes, Token] | None:
        """Return ``(state, token)``, or ``None`` if no state has been set.

        Raises:
            RendezvousConnectionError: The backend could not be reached.
            RendezvousStateError: The stored state is corrupt.
        """

    @abstractmethod
    def set_state(self, state: bytes, token: Token | None = None) -> tuple[bytes, Token, bool] | None:
        """Set the state conditionally; return ``(state, token, has_set)``.

        * ``token`` is the current token: ``state`` is written and returned
          with its new token, and ``has_set`` is True;
        * ``token`` is stale (or not a token of this backend): nothing is
          written; the current state and token are returned with False;
        * ``token`` is ``None``: ``state`` is written only if there is no
          state yet; otherwise as for a stale token.

        ``None`` means the backend holds no state after all.

        Raises:
            RendezvousConnectionError: The backend could not be reached.
            RendezvousStateError: The stored state is corrupt.
        """


class C10dRendezvousBackend(RendezvousBackend):
    """A rendezvous backend over any c10d :class:`~rdzv_store.Store` (TCP, file, hash, prefix).

    Args:
        store: The store to keep the state in. It is used, not owned: the
            caller closes it.
        run_id: Id of the rendezvous; the state lives under
            ``torch.rendezvous.<run_id>`` (not under any prefix).

    The token is the stored base64 value itself, so it is value-based: a
    state that goes A, B, then A again makes a token taken at the first A
    valid again. That is torch's behaviour and harmless for a rendezvous
    (the writer's view of the state is exactly what is stored).

    Raises:
        ValueError: ``run_id`` is empty.
        RendezvousConnectionError: The store failed while the "no state"
            sentinel was being initialised.
    """

    # Store.get blocks until a key exists, so the key must always exist for
    # get_state to answer "no state" without blocking. It is created holding
    # this sentinel (base64 of the palindrome "canimadam"), only if absent.
    _NULL_SENTINEL = "Y2FuaW1hZGFt"
    _NULL_SENTINEL_BYTES = _NULL_SENTINEL.encode("ascii")

    _store: Store
    _key: str

    def __init__(self, store: Store, run_id: str) -> None:
        if not run_id:
            raise ValueError("The run id must be a non-empty string.")

        self._store = store
        self._key = "torch.rendezvous." + run_id

        # compare_set with expected "" writes only when the key is absent, so a
        # second backend on the same run never wipes state already there.
        self._call_store("compare_set", self._key, "", self._NULL_SENTINEL)

    @property
    def name(self) -> str:
        """See base class."""
        return "c10d"

    def get_state(self) -> tuple[bytes, Token] | None:
        """See base class."""
        base64_state: bytes = self._call_store("get", self._key)
        return self._decode_state(base64_state)

    def set_state(self, state: bytes, token: Token | None = None) -> tuple[bytes, Token, bool] | None:
        """See base class.

        c10d's ``compare_set`` does not say whether it wrote, so success is
        judged as torch does: the value now stored equals what we wanted to
        store. Writing bytes identical to the current state therefore reports
        True whatever the token, and two writers racing to store the same
        bytes are both told they won. If that matters, make each writer's
        state distinct (the dynamic rendezvous state is: it names its nodes
        and carries their heartbeats).
        """
        base64_state = b64encode(state)

        expected: bytes
        if token:
            if not isinstance(token, bytes):
                # Not one of our tokens (they are bytes): it cannot match, so
                # skip the write and report the current state.
                result = self.get_state()
                if result is None:
                    return None
                return result[0], result[1], False
            # Passed as bytes, not decoded as torch does: a foreign token that
            # is not UTF-8 must lose the comparison, not raise.
            expected = token
        else:
            # No token: "create only if there is no state yet".
            expected = self._NULL_SENTINEL_BYTES

        current: bytes = self._call_store("compare_set", self._key, expected, base64_state)

        pair = self._decode_state(current)
        if pair is None:
            return None
        new_state, new_token = pair
        return new_state, new_token, new_state == state

    def _call_store(self, store_op: str, *args: Any) -> Any:
        try:
            return getattr(self._store, store_op)(*args)
        except _STORE_FAILURES as exc:
            raise RendezvousConnectionError(_CONNECTION_FAILED) from exc

    def _decode_state(self, base64_state: bytes) -> tuple[bytes, Token] | None:
        if base64_state == self._NULL_SENTINEL_BYTES:
            return None
        try:
            # Lenient decoding (non-alphabet characters are skipped), as torch:
            # both must agree on which stored values are corrupt.
            state = b64decode(base64_state)
        except binascii.Error as exc:
            raise RendezvousStateError(
                "The state object is corrupt. See inner exception for details."
            ) from exc
        return state, base64_state


def _create_tcp_store(params: RendezvousParameters) -> Store:
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_PORT)

    cfg_is_host = params.get_as_bool("is_host")
    # Respect an explicit choice; otherwise guess from the endpoint's host.
    is_host = cfg_is_host if cfg_is_host is not None else _matches_machine_hostname(host)

    read_timeout = params.get_as_int("read_timeout", DEFAULT_READ_TIMEOUT)
    if read_timeout is None or read_timeout <= 0:
        raise ValueError("The read timeout must be a positive integer.")

    # At most two attempts: as guessed, then as a client. Several processes of
    # one job can run on the host machine; all of them guess "host", one wins
    # the port and the others must fall back to connecting to it.
    for is_server in (is_host, False):
        try:
            store = TCPStore(
                host,
                port,
                is_master=is_server,
                multi_tenant=True,
                timeout=timedelta(seconds=read_timeout),
            )
        except _STORE_FAILURES as exc:
            # A client that cannot connect, or an explicit host that cannot
            # serve, is final: guessing again would only hide the problem.
            if not is_server or cfg_is_host is not None:
                raise RendezvousConnectionError(_CONNECTION_FAILED) from exc
            logger.debug(
                "Could not host the TCP store on %s:%d (%s); connecting to it as a client.",
                host,
                port,
                exc,
            )
            continue
        if is_server:
            logger.info(
                "Process %d hosts the TCP store for the C10d rendezvous backend.", os.getpid()
            )
        return store

    raise AssertionError("unreachable: the last attempt is a client, which returns or raises")


def _create_file_store(params: RendezvousParameters) -> Store:
    made_temp_file = not params.endpoint
    if params.endpoint:
        # The endpoint of a file store is the path of its file, verbatim.
        path = params.endpoint
    else:
        # A private temp file (mode 0600). Only this process knows its name,
        # so this is for single-process use (tests). Unlike torch we close the
        # descriptor mkstemp opened: the store opens the file itself.
        try:
            fd, path = tempfile.mkstemp()
            os.close(fd)
        except OSError as exc:
            raise RendezvousError(
                "The file creation for C10d store has failed. See inner exception for details."
            ) from exc

    try:
        return FileStore(path)
    except _STORE_FAILURES as exc:
        if made_temp_file:
            # Nobody else knows the name: do not leave it behind.
            with contextlib.suppress(OSError):
                os.remove(path)
        raise RendezvousConnectionError(_CONNECTION_FAILED) from exc


def create_backend(params: RendezvousParameters) -> tuple[C10dRendezvousBackend, Store]:
    """Create a :class:`C10dRendezvousBackend` and its store from launcher parameters.

    Config options (``params.config``):

    ``store_type``
        ``"tcp"`` (default) or ``"file"``, any case, surrounding blanks ignored.
    ``read_timeout``
        TCP only: the store timeout in seconds (default 60); must be positive.
    ``is_host``
        TCP only: whether this process serves the store. When absent, it is
        guessed by matching the endpoint against this machine's names and
        addresses; a wrong "yes" (the port is already served, typically by
        another process of the job on this machine) falls back once to
        connecting as a client.

    For ``"tcp"`` the endpoint is ``<host>[:<port>]`` (port 29400 by
    default). For ``"file"`` it is the store file's path; an empty endpoint
    makes a private temp file, which only this process can use.

    Returns:
        ``(backend, store)``. The caller owns the store: close it when done.

    Raises:
        ValueError: Bad store type, endpoint, ``read_timeout``, ``is_host``
            value, or an empty run id.
        RendezvousConnectionError: The store could not be created or reached.
        RendezvousError: The temp file for a file store could not be made.
    """
    # Only the TCP and file stores are offered, as in torch; what the backend
    # needs (compare_set) is available in all stores, but those are the two a
    # launcher can point several processes at.
    store_type = params.get("store_type", "tcp").strip().lower()

    try:
        if store_type == "file":
            store = _create_file_store(params)
        elif store_type == "tcp":
            store = _create_tcp_store(params)
        else:
            raise ValueError("Invalid store type given. Currently only supports file and tcp.")
    except Exception as exc:
        _log_failure(exc)
        raise

    try:
        backend = C10dRendezvousBackend(store, params.run_id)
    except Exception as exc:
        _log_failure(exc)
        # torch leaves the store it made (possibly a running server) to the
        # garbage collector; we release it now.
        with contextlib.suppress(Exception):
            store.close()
        raise

    return backend, store


def _log_failure(exc: Exception) -> None:
    # torch records a FAILED rendezvous event here; we have no event system, so we log.
    logger.debug("Creating the C10d rendezvous backend failed: %s: %s", type(exc).__name__, exc)
