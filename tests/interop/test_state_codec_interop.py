"""The state codec against torch 2.13 itself (needs torch; marker ``interop``).

torch is the reference here, and it is torch that runs pickle, not this file: bytes go through
torch's own ``_BackendRendezvousStateHolder.sync()`` (which calls ``pickle.loads`` /
``pickle.dumps``) with a capturing backend, or through torch's ``DynamicRendezvousHandler`` on a
real store. So the no-pickle check (tests/test_security_no_pickle.py) needs no exception for it.

* torch's ``pickle.loads`` of our bytes (protocols 2-5, random states, 1024/4096 nodes) gives
  ``vars()`` equal to the state we encoded, with torch's classes, real sets and ``timezone.utc``;
* we decode what torch pickles (random states, 1024/4096 nodes) and what torch's handler writes
  in a real rendezvous (three torch handlers on one store), and torch's handler obeys a state we
  wrote (a closed rendezvous).

Run: ``/work/venv-torch/bin/python -m pytest -m interop tests/interop/test_state_codec_interop.py``.
"""

from __future__ import annotations

import base64
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.distributed import HashStore as TorchHashStore  # noqa: E402
from torch.distributed.elastic.rendezvous import api as torch_api  # noqa: E402
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as tdr  # noqa: E402
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (  # noqa: E402
    C10dRendezvousBackend as TorchC10dBackend,
)

from rdzv_backend.state import NodeDesc, RendezvousState  # noqa: E402
from rdzv_backend.state_codec import decode_state, encode_state  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tcp_helpers import run_in_thread  # noqa: E402
from test_state_codec import big_state, nodes  # noqa: E402

pytestmark = pytest.mark.interop

# Heartbeats older than now - 30 years count as dead in torch's _sanitize; ours are after 2000.
SETTINGS = tdr.RendezvousSettings(
    run_id="codec",
    min_nodes=1,
    max_nodes=1,
    timeout=tdr.RendezvousTimeout(),
    keep_alive_interval=timedelta(days=3650),
    keep_alive_max_attempt=3,
)


class CaptureBackend(tdr.RendezvousBackend):
    """A torch RendezvousBackend holding one value and recording what torch writes."""

    def __init__(self, stored: bytes | None = None) -> None:
        self.stored = stored
        self.writes: list[bytes] = []

    @property
    def name(self) -> str:
        return "capture"

    def get_state(self) -> tuple[bytes, Any] | None:
        return None if self.stored is None else (self.stored, "token")

    def set_state(self, state: bytes, token: Any = None) -> tuple[bytes, Any, bool]:
        self.writes.append(state)
        self.stored = state
        return state, "token", True


def torch_loads(data: bytes) -> Any:
    """torch 2.13's holder reading ``data`` (its sync() runs pickle.loads)."""
    holder = tdr._BackendRendezvousStateHolder(CaptureBackend(data), SETTINGS, cache_duration=0)
    holder.sync()
    return holder.state


def torch_dumps(torch_state: Any) -> bytes:
    """What torch 2.13's holder writes for ``torch_state`` (its sync() runs pickle.dumps)."""
    backend = CaptureBackend()
    holder = tdr._BackendRendezvousStateHolder(backend, SETTINGS, cache_duration=0)
    vars(holder.state).clear()
    vars(holder.state).update(vars(torch_state))
    holder.mark_dirty()
    holder.sync()
    assert len(backend.writes) == 1
    return backend.writes[0]


def to_torch(state: RendezvousState) -> Any:
    """The same state in torch's classes."""
    made: dict[NodeDesc, Any] = {}

    def node(n: NodeDesc) -> Any:
        if n not in made:
            made[n] = tdr._NodeDesc(n.addr, n.pid, n.local_id)
        return made[n]

    out = tdr._RendezvousState()
    out.round = state.round
    out.complete = state.complete
    out.deadline = state.deadline
    out.closed = state.closed
    out.participants = {node(n): r for n, r in state.participants.items()}
    out.wait_list = {node(n) for n in state.wait_list}
    assert state.redundancy_list is not None
    out.redundancy_list = {node(n) for n in state.redundancy_list}
    out.last_heartbeats = {node(n): t for n, t in state.last_heartbeats.items()}
    return out


def assert_torch_equal(torch_state: Any, state: RendezvousState) -> None:
    assert type(torch_state) is tdr._RendezvousState
    assert vars(torch_state) == vars(to_torch(state))
    assert list(vars(torch_state)) == list(vars(tdr._RendezvousState()))  # attribute order too
    for name in ("wait_list", "redundancy_list"):
        assert type(getattr(torch_state, name)) is set
    for node in torch_state.participants:
        assert type(node) is tdr._NodeDesc
    for t in [torch_state.deadline, *torch_state.last_heartbeats.values()]:
        assert t is None or t.tzinfo is timezone.utc


utc_times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(timezone.utc))


@st.composite
def aware_states(draw: st.DrawFn) -> RendezvousState:
    pool = draw(st.lists(nodes, max_size=30, unique=True))
    pick = st.lists(st.sampled_from(pool), unique=True) if pool else st.just([])
    return RendezvousState(
        round=draw(st.integers(0, (1 << 63) - 1)),
        complete=draw(st.booleans()),
        deadline=draw(st.none() | utc_times),
        closed=draw(st.booleans()),
        participants={n: draw(st.integers(0, 1 << 40)) for n in draw(pick)},
        wait_list=set(draw(pick)),
        redundancy_list=set(draw(pick)),
        last_heartbeats={n: draw(utc_times) for n in draw(pick)},
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(aware_states(), st.sampled_from([2, 3, 4, 5]))
def test_torch_loads_our_bytes(state: RendezvousState, protocol: int) -> None:
    assert_torch_equal(torch_loads(encode_state(state, protocol)), state)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(aware_states())
def test_we_decode_what_torch_pickles(state: RendezvousState) -> None:
    data = torch_dumps(to_torch(state))
    assert decode_state(data) == state
    if len(state.wait_list) <= 1 and len(state.redundancy_list or ()) <= 1:
        assert encode_state(decode_state(data)) == data  # same layout (set order aside)


@pytest.mark.parametrize("n", [1024, 4096])
def test_large_states_both_ways(n: int) -> None:
    state = big_state(n, seed=n)
    ours = encode_state(state)
    assert_torch_equal(torch_loads(ours), state)
    theirs = torch_dumps(to_torch(state))
    assert decode_state(theirs) == state
    assert len(theirs) == len(ours)  # same layout and framing; only set order may differ
    assert theirs[: ours.index(b"wait_list")] == ours[: ours.index(b"wait_list")]


def _torch_handler(store: Any, run_id: str, n: int, addr: str) -> Any:
    params = torch_api.RendezvousParameters(
        backend="c10d", endpoint="", run_id=run_id, min_nodes=n, max_nodes=n, local_addr=addr, join_timeout=60
    )
    return tdr.create_handler(store, TorchC10dBackend(store, run_id), params)


def test_we_decode_what_torch_handlers_write_in_a_real_rendezvous() -> None:
    store = TorchHashStore()
    run_id = "codec-real"
    # one address (rank 0 hosts the bootstrap TCPStore there); the nodes differ by local_id
    handlers = [_torch_handler(store, run_id, 3, "127.0.0.1") for _ in range(3)]
    calls = [run_in_thread(h.next_rendezvous) for h in handlers]
    results = [call.result(60) for call in calls]  # re-raises a handler's error, fails on a hang

    state = decode_state(base64.b64decode(store.get(f"torch.rendezvous.{run_id}")), key=f"torch.rendezvous.{run_id}")
    assert state.complete and not state.closed and state.round == 0
    assert len(state.participants) == 3 and set(state.last_heartbeats) == set(state.participants)
    ranks = {(node.addr, node.pid, node.local_id): rank for node, rank in state.participants.items()}
    this = [h._this_node for h in handlers]
    assert ranks == {(n.addr, n.pid, n.local_id): results[i].rank for i, n in enumerate(this)}
    assert sorted(state.participants) == sorted(state.participants, key=lambda n: state.participants[n])
    now = datetime.now(timezone.utc)
    assert all(timedelta(0) <= now - t < timedelta(minutes=2) for t in state.last_heartbeats.values())

    handlers[0].set_closed()
    closed = decode_state(base64.b64decode(store.get(f"torch.rendezvous.{run_id}")))
    assert closed.closed and closed.round == state.round
    for h in handlers:
        h.shutdown()


def test_torch_handlers_obey_a_state_we_wrote() -> None:
    store = TorchHashStore()
    run_id = "codec-ours"
    utc = timezone.utc
    me = NodeDesc("10.2.0.1", 4242, 0)
    ours = RendezvousState(round=5, closed=True, participants={me: 0}, last_heartbeats={me: datetime.now(utc)})
    store.set(f"torch.rendezvous.{run_id}", base64.b64encode(encode_state(ours)))
    handler = _torch_handler(store, run_id, 1, "10.2.0.9")
    assert handler.is_closed()
    with pytest.raises(torch_api.RendezvousClosedError):
        handler.next_rendezvous()
    ours.closed = False
    ours.wait_list = {NodeDesc("10.2.0.2", 1, 0), NodeDesc("10.2.0.3", 2, 0)}
    ours.last_heartbeats.update({n: datetime.now(utc) for n in ours.wait_list})
    store.set(f"torch.rendezvous.{run_id}", base64.b64encode(encode_state(ours)))
    handler = _torch_handler(store, run_id, 1, "10.2.0.9")
    assert handler.num_nodes_waiting() == 2
