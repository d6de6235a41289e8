"""Rendezvous parameters and the rendezvous error hierarchy (torch 2.13's ``api`` module).

Launchers build a :class:`RendezvousParameters` from their command line
(``--rdzv-backend``, ``--rdzv-endpoint``, ``--rdzv-id``, ``--nnodes``,
``--rdzv-conf``) and hand it to a backend factory such as
:func:`rdzv_backend.c10d.create_backend`. Validation, defaults and error
messages are torch's, word for word, because launchers and tests match them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RendezvousError",
    "RendezvousClosedError",
    "RendezvousTimeoutError",
    "RendezvousConnectionError",
    "RendezvousStateError",
    "RendezvousGracefulExitError",
    "RendezvousParameters",
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
