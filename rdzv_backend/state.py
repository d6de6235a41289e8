"""The elastic rendezvous state as plain data: torch 2.13's ``_NodeDesc`` and ``_RendezvousState``.

These are the two classes whose instances torch's ``DynamicRendezvousHandler`` pickles into the
c10d backend's cell (``../shared/reference/dynamic-rendezvous.md`` §2.1-§2.2). Here they are
ordinary dataclasses: the bytes are read and written by :mod:`rdzv_backend.state_codec`, which
never runs pickle, so nothing in this module is ever reconstructed from untrusted input by name.

Field names, field order and ordering rules are torch's, because they are observable: the rank of
a node is its index in ``sorted(participants)``, and torch agents sort the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["NodeDesc", "RendezvousState"]


@dataclass(eq=True, order=True, frozen=True)
class NodeDesc:
    """One rendezvous member: ``(addr, pid, local_id)``, ordered as a tuple (torch's rank order).

    ``addr`` sorts by code point (``"127.0.0.10" < "127.0.0.2"``, ``"B" < "a"``), then ``pid``,
    then ``local_id``, exactly like torch's generated dataclass ordering.
    """

    addr: str
    pid: int
    local_id: int

    def __repr__(self) -> str:
        return f"{self.addr}_{self.pid}_{self.local_id}"

    __str__ = __repr__


@dataclass
class RendezvousState:
    """The whole shared state of one rendezvous, attribute for attribute torch's ``_RendezvousState``.

    ``deadline`` and heartbeats are aware UTC datetimes when torch 2.13 (or we) wrote them; states
    from older torch versions may carry naive ones, which the codec preserves so a reader can tell.
    ``redundancy_list`` is ``None`` only for a state decoded from a torch version that predates it.
    """

    round: int = 0
    complete: bool = False
    deadline: datetime | None = None
    closed: bool = False
    participants: dict[NodeDesc, int] = field(default_factory=dict)
    wait_list: set[NodeDesc] = field(default_factory=set)
    redundancy_list: set[NodeDesc] | None = field(default_factory=set)
    last_heartbeats: dict[NodeDesc, datetime] = field(default_factory=dict)
