"""Rendezvous parameters and the rendezvous error hierarchy (torch 2.13's ``api`` module).

Launchers build a :class:`RendezvousParameters` from their command line
(``--rdzv-backend``, ``--rdzv-endpoint``, ``--rdzv-id``, ``--nnodes``,
``--rdzv-conf``) and hand it to a backend factory such as
:func:`rdzv_backend.c10d.create_backend`. Validation, defaults and error
messages are torch's, word for word, because launchers and tests match them.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from rdzv_store import Store

__all__ = [
    "RendezvousError",
    "RendezvousClosedError",
    "RendezvousTimeoutError",
    "RendezvousConnectionError",
    "RendezvousStateError",
    "RendezvousGracefulExitError",
    "RendezvousParameters",
    "RendezvousStoreInfo",
    "RendezvousInfo",
    "RendezvousHandler",
]


class RendezvousError(Exception):
    """Base type of every rendezvous error.

    Like torch's, these classes take whatever message they are given (often
    none), so ``except RendezvousError`` is the one place a caller handles
    "the rendezvous layer failed" without caring how.
    """


class RendezvousClosedError(RendezvousError):
    """The rendezvous has been closed; no new rounds will form."""


class RendezvousTimeoutError(RendezvousError):
    """The rendezvous did not complete in time."""


class RendezvousConnectionError(RendezvousError):
    """The connection to the rendezvous backend (the store) failed.

    The store's own exception is always chained as ``__cause__``: the message
    itself is fixed, so the cause is where the address and reason live.
    """


class RendezvousStateError(RendezvousError):
    """The state held by the backend is corrupt (for example, not base64)."""


class RendezvousGracefulExitError(RendezvousError):
    """This node was not admitted and should exit quietly.

    Not a failure: elastic agents catch this type specifically and exit 0.
    """


_TRUE_STRINGS = ("1", "true", "t", "yes", "y")
_FALSE_STRINGS = ("0", "false", "f", "no", "n")


class RendezvousParameters:
    """The parameters a rendezvous backend is built from.

    Args:
        backend: Name of the backend (``"c10d"``); must be non-empty.
        endpoint: Usually ``<host>[:<port>]`` (tcp) or a file path (file).
            Not validated here: each backend parses it its own way, and an
            empty endpoint is meaningful (a default host, or a temp file).
        run_id: Id of the rendezvous (the job). Validated by the backend.
        min_nodes: Minimum number of nodes; must be at least 1.
        max_nodes: Maximum number of nodes; must be at least ``min_nodes``.
        local_addr: Address of this node, kept apart from ``config``.
        **kwargs: Backend options (``store_type``, ``read_timeout``,
            ``is_host``, ...), usually strings from ``--rdzv-conf``. They are
            kept as given in the mutable dict :attr:`config` and converted on
            read with :meth:`get_as_bool` / :meth:`get_as_int`.

    Raises:
        ValueError: With torch's messages, checked in torch's order (backend,
            then ``min_nodes``, then ``max_nodes``).
    """

    backend: str
    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    local_addr: str | None
    config: dict[str, Any]

    def __init__(
        self,
        backend: str,
        endpoint: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not backend:
            raise ValueError("The rendezvous backend name must be a non-empty string.")
        if min_nodes < 1:
            raise ValueError(
                f"The minimum number of rendezvous nodes ({min_nodes}) must be greater than zero."
            )
        if max_nodes < min_nodes:
            raise ValueError(
                f"The maximum number of rendezvous nodes ({max_nodes}) must be greater than or "
                f"equal to the minimum number of rendezvous nodes ({min_nodes})."
            )

        self.backend = backend
        self.endpoint = endpoint
        self.run_id = run_id
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.config = kwargs
        self.local_addr = local_addr

    def get(self, key: str, default: Any = None) -> Any:
        """Return the option ``key`` as stored, or ``default`` if it is absent.

        A key that is present with the value ``None`` returns ``None``.
        """
        return self.config.get(key, default)

    def get_as_bool(self, key: str, default: bool | None = None) -> bool | None:
        """Return the option ``key`` as a ``bool`` (``None`` when absent and no default).

        Accepted: real bools; the ints 1 and 0; the strings ``1 true t yes y``
        and ``0 false f no n`` in any case (not stripped). Anything else is a
        ``ValueError`` naming the key. The default goes through the same rules.
        """
        value = self.get(key, default)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if value == 1:
                return True
            if value == 0:
                return False
        elif isinstance(value, str):
            lowered = value.lower()
            if lowered in _TRUE_STRINGS:
                return True
            if lowered in _FALSE_STRINGS:
                return False
        raise ValueError(
            f"The rendezvous configuration option '{key}' does not represent a valid boolean value."
        )

    def get_as_int(self, key: str, default: int | None = None) -> int | None:
        """Return the option ``key`` converted with ``int()`` (``None`` when absent).

        As in torch, only the ``ValueError`` of ``int()`` becomes the
        "valid integer value" message; a value of a type ``int()`` refuses
        (a list, a ``timedelta``) raises its ``TypeError`` unchanged, and
        floats are truncated (``3.9`` gives 3).
        """
        value = self.get(key, default)
        if value is None:
            return value
        try:
            return int(value)
        except ValueError as exc:
            raise ValueError(
                f"The rendezvous configuration option '{key}' does not represent a valid integer "
                "value."
            ) from exc


def _get_free_port() -> int:
    """A port that was free on ``localhost`` a moment ago (torch's ``get_free_port``; racy by nature).

    Raises:
        RuntimeError: No socket could be bound (``Failed to create a socket``, as torch).
    """
    for family, kind, proto, _, _ in socket.getaddrinfo("localhost", None, socket.AF_UNSPEC, socket.SOCK_STREAM):
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind(("localhost", 0))
                sock.listen(0)
                return int(sock.getsockname()[1])
        except OSError:
            continue
    raise RuntimeError("Failed to create a socket")


@dataclass
class RendezvousStoreInfo:
    """Where workers find the store to bootstrap their own communication (torch's class).

    ``master_addr``/``master_port`` are published under the keys :attr:`MASTER_ADDR_KEY` and
    :attr:`MASTER_PORT_KEY` of the round's prefix store; equality is the dataclass's.
    """

    MASTER_ADDR_KEY: ClassVar[str] = "MASTER_ADDR"
    MASTER_PORT_KEY: ClassVar[str] = "MASTER_PORT"
    master_addr: str
    master_port: int

    @staticmethod
    def build(rank: int, store: Store, local_addr: str | None, server_port: int | None = None) -> RendezvousStoreInfo:
        """Publish (rank 0) and read (every rank) ``MASTER_ADDR``/``MASTER_PORT``, as torch does.

        Rank 0 writes ``local_addr or socket.getfqdn()`` and ``server_port`` (a falsy port: a port
        free right now); then every rank blocking-``get``s both keys.

        Raises:
            Whatever the store raises: a non-zero rank waits up to the store's timeout for rank 0.
        """
        if rank == 0:
            addr = local_addr or socket.getfqdn()
            port = server_port or _get_free_port()
            store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, addr.encode("UTF-8"))
            store.set(RendezvousStoreInfo.MASTER_PORT_KEY, str(port).encode("UTF-8"))
        addr = store.get(RendezvousStoreInfo.MASTER_ADDR_KEY).decode("UTF-8")
        port = int(store.get(RendezvousStoreInfo.MASTER_PORT_KEY).decode("UTF-8"))
        return RendezvousStoreInfo(master_addr=addr, master_port=port)


class RendezvousInfo:
    """What a completed rendezvous gives a node: its store, rank, world size and bootstrap info."""

    def __init__(self, store: Store, rank: int, world_size: int, bootstrap_store_info: RendezvousStoreInfo) -> None:
        self._store = store
        self._rank = rank
        self._world_size = world_size
        self._bootstrap_store_info = bootstrap_store_info

    @property
    def store(self) -> Store:
        """The store of this round (a ``PrefixStore`` for the dynamic handler)."""
        return self._store

    @property
    def rank(self) -> int:
        """This node's rank in the round."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of nodes in the round."""
        return self._world_size

    @property
    def bootstrap_store_info(self) -> RendezvousStoreInfo | None:
        """Where the workers' store is (``MASTER_ADDR``/``MASTER_PORT``)."""
        return self._bootstrap_store_info


class RendezvousHandler(ABC):
    """The rendezvous interface a launcher drives (torch's ABC, same members)."""

    @abstractmethod
    def get_backend(self) -> str:
        """The name of the rendezvous backend."""

    @property
    def use_agent_store(self) -> bool:
        """Whether workers should use the store published in the bootstrap info (default False)."""
        return False

    @abstractmethod
    def next_rendezvous(self) -> RendezvousInfo:
        """Block until this node is in a completed round; return its :class:`RendezvousInfo`."""

    @abstractmethod
    def is_closed(self) -> bool:
        """Whether the rendezvous has been closed (eventually consistent)."""

    @abstractmethod
    def set_closed(self) -> None:
        """Close the rendezvous: no further rounds."""

    @abstractmethod
    def num_nodes_waiting(self) -> int:
        """Nodes waiting to join the next round (they join when members re-rendezvous)."""

    @abstractmethod
    def get_run_id(self) -> str:
        """The run id of the rendezvous."""

    @abstractmethod
    def shutdown(self) -> bool:
        """Stop this handler and close the rendezvous; True on success."""
