"""DynamicRendezvousHandler's state machine, with a fake clock (no sleeps), torch-free.

* Validation and verbatim messages: ``RendezvousTimeout``, the handler constructor,
  ``create_handler`` config keys (reference ``dynamic-rendezvous.md`` §1, §1.2).
* Rule tables: every row of the Exit, Join, Close and Keep-alive decision tables (§2.6).
* The holder: read cache, conditional writes, dead-node removal and its epilogue (§2.3-§2.4),
  decode failures naming the key, the keep-alive tick surviving every exception.
* Simulated nodes (each its own backend, holder and executor over one HashStore, interleaved step
  by step with one fake clock): scenarios (max nodes, last call, wait list, redundancy, dead
  nodes, close, timeouts), and a hypothesis state machine that checks every transition against
  the model rules: disjoint lists, ranks in sorted order, deadlines, who may complete a round,
  who goes to which list, closed and timed-out nodes, agreement on each round's ranks.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from handler_helpers import FakeClock
from rdzv_backend import (
    C10dRendezvousBackend,
    DynamicRendezvousHandler,
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousParameters,
    RendezvousSettings,
    RendezvousStateError,
    RendezvousStoreInfo,
    RendezvousTimeout,
    RendezvousTimeoutError,
    create_handler,
)
from rdzv_backend import dynamic as dyn
from rdzv_backend.dynamic import (
    _Action,
    _BackendRendezvousStateHolder,
    _DistributedRendezvousOpExecutor,
    _PeriodicTimer,
    _RendezvousCloseOp,
    _RendezvousContext,
    _RendezvousExitOp,
    _RendezvousJoinOp,
    _RendezvousKeepAliveOp,
)
from rdzv_backend.state import NodeDesc, RendezvousState
from rdzv_backend.state_codec import decode_state, encode_state
from rdzv_store import HashStore

RUN = "model"
A = timedelta


def make_settings(min_nodes: int = 2, max_nodes: int = 3, **kw: Any) -> RendezvousSettings:
    return RendezvousSettings(
        RUN,
        min_nodes,
        max_nodes,
        kw.pop("timeout", RendezvousTimeout(join=A(seconds=600), last_call=A(seconds=30))),
        keep_alive_interval=kw.pop("keep_alive_interval", A(seconds=5)),
        keep_alive_max_attempt=kw.pop("keep_alive_max_attempt", 3),
    )


# -- §1: validation and messages --------------------------------------------------------------------


def test_timeout_defaults_and_messages() -> None:
    t = RendezvousTimeout()
    assert (t.join, t.last_call, t.close, t.heartbeat) == (A(seconds=600), A(seconds=30), A(seconds=30), A(seconds=5))
    with pytest.raises(ValueError, match=r"^The join timeout \(0:00:00\) must be positive\.$"):
        RendezvousTimeout(join=A(0), heartbeat=A(seconds=-1))
    with pytest.raises(ValueError, match=r"^The heartbeat timeout \(-1 day, 23:59:59\) must be positive\.$"):
        RendezvousTimeout(heartbeat=A(seconds=-1))
    with pytest.raises(ValueError, match=r"^The last_call timeout \(0:00:00\) must be positive\.$"):
        RendezvousTimeout(last_call=A(0), close=A(0))


def _handler(store: Any = None, **kw: Any) -> DynamicRendezvousHandler:
    store = store or HashStore()
    backend = C10dRendezvousBackend(store, kw.pop("run_id", RUN))
    return DynamicRendezvousHandler.from_backend(kw.pop("run_id_h", RUN), store, backend, **kw)


def test_constructor_messages_and_node_ids() -> None:
    before = DynamicRendezvousHandler._node_desc_generator._local_id
    with pytest.raises(ValueError, match=r"^The run id must be a non-empty string\.$"):
        _handler(run_id_h="", min_nodes=1, max_nodes=1)
    with pytest.raises(ValueError, match=r"^The minimum number of nodes \(0\) must be greater than zero\.$"):
        _handler(min_nodes=0, max_nodes=1)
    with pytest.raises(
        ValueError,
        match=r"^The maximum number of nodes \(1\) must be greater than or equal to the minimum number of nodes \(2\)\.$",
    ):
        _handler(min_nodes=2, max_nodes=1)
    # Each failed construction still took a local id (the node is generated first).
    h = _handler(min_nodes=1, max_nodes=2, local_addr="10.0.0.1")
    assert h._this_node.local_id == before + 3
    assert h._this_node.addr == "10.0.0.1"
    assert h.get_backend() == "c10d" and h.get_run_id() == RUN
    assert h.settings.keep_alive_interval == A(seconds=5) and h.settings.keep_alive_max_attempt == 3
    timeout = RendezvousTimeout(join=A(seconds=7))
    assert _handler(min_nodes=1, max_nodes=1, timeout=timeout).settings.timeout is timeout


def test_create_handler_config_keys() -> None:
    store = HashStore()
    backend = C10dRendezvousBackend(store, RUN)

    def make(**config: Any) -> DynamicRendezvousHandler:
        return create_handler(store, backend, RendezvousParameters("c10d", "", RUN, 1, 3, local_addr="h", **config))

    h = make(join_timeout="11", last_call_timeout=" 12 ", close_timeout=13, heartbeat_timeout="14",
             keep_alive_interval="2", keep_alive_max_attempt="4", heartbeat="99", timeout="900")
    t = h.settings.timeout
    assert (t.join, t.last_call, t.close, t.heartbeat) == (A(seconds=11), A(seconds=12), A(seconds=13), A(seconds=14))
    assert h.settings.keep_alive_interval == A(seconds=2) and h.settings.keep_alive_max_attempt == 4
    assert h._this_node.addr == "h"
    d = make().settings
    assert (d.timeout.join, d.timeout.heartbeat, d.keep_alive_interval, d.keep_alive_max_attempt) == (
        A(seconds=600), A(seconds=5), A(seconds=5), 3)
    with pytest.raises(ValueError, match=r"^The join timeout \(0:00:00\) must be positive\.$"):
        make(join_timeout="0")
    with pytest.raises(ValueError, match=r"^The close timeout \(-1 day, 23:59:59\) must be positive\.$"):
        make(close_timeout="-1")
    with pytest.raises(ValueError, match=r"^The rendezvous configuration option 'last_call_timeout' does not represent a valid integer value\.$"):
        make(last_call_timeout="abc")
    with pytest.raises(TypeError, match=r"^You passed 'keep_alive_interval=None' as a rendezvous configuration option$"):
        make(keep_alive_interval=None)
    with pytest.raises(TypeError, match=r"^You passed 'keep_alive_max_attempt=None' as a rendezvous configuration option$"):
        make(keep_alive_max_attempt=None)


def test_use_agent_store_reads_the_environment_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    h = _handler(min_nodes=1, max_nodes=1)
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    assert h.use_agent_store is True
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    assert h.use_agent_store is False
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "true")  # only "1" disables
    assert h.use_agent_store is True


def test_store_info_and_node_order() -> None:
    assert RendezvousStoreInfo("a", 1) == RendezvousStoreInfo("a", 1) != RendezvousStoreInfo("a", 2)
    assert (RendezvousStoreInfo.MASTER_ADDR_KEY, RendezvousStoreInfo.MASTER_PORT_KEY) == ("MASTER_ADDR", "MASTER_PORT")
    nodes = [NodeDesc("127.0.0.2", 1, 0), NodeDesc("127.0.0.10", 1, 0), NodeDesc("a", 1, 0), NodeDesc("B", 10, 0), NodeDesc("B", 9, 1)]
    assert [repr(n) for n in sorted(nodes)] == ["127.0.0.10_1_0", "127.0.0.2_1_0", "B_9_1", "B_10_0", "a_1_0"]


# -- §2.6: rule tables --------------------------------------------------------------------------------

ME, OTHER, THIRD = NodeDesc("me", 1, 0), NodeDesc("other", 2, 0), NodeDesc("third", 3, 0)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _ctx(clock: FakeClock, s: RendezvousSettings, **state: Any) -> _RendezvousContext:
    st_ = RendezvousState()
    for k, v in state.items():
        setattr(st_, k, v)
    return _RendezvousContext(ME, st_, s, clock)


FRESH = {ME: NOW}  # heartbeat not due (the clock starts at NOW)
DUE = {ME: NOW - A(seconds=5)}  # exactly keep_alive_interval old: due (non-strict)

# (state fields, seconds past the op deadline (None: before it), expected action or exception)
JOIN_ROWS: list[tuple[str, dict[str, Any], float | None, Any]] = [
    ("1 closed, in redundancy", dict(closed=True, redundancy_list={ME}), None, RendezvousGracefulExitError),
    ("2 closed", dict(closed=True, participants={ME: 0}), None, _Action.ERROR_CLOSED),
    ("3 redundant, full, due", dict(redundancy_list={ME}, participants={OTHER: 0, THIRD: 1, NodeDesc("x", 1, 1): 2}, last_heartbeats=DUE), 100.0, _Action.KEEP_ALIVE),
    ("3 redundant, full, not due", dict(redundancy_list={ME}, participants={OTHER: 0, THIRD: 1, NodeDesc("x", 1, 1): 2}, last_heartbeats=FRESH), None, _Action.SYNC),
    ("4 redundant, room", dict(redundancy_list={ME}, participants={OTHER: 0}, complete=True), 100.0, _Action.REMOVE_FROM_REDUNDANCY_LIST),
    ("5 complete participant", dict(complete=True, participants={ME: 0, OTHER: 1}), 100.0, _Action.FINISH),
    ("6 window, participant", dict(participants={ME: 0}), 3.0, _Action.REMOVE_FROM_PARTICIPANTS),
    ("7 window, waiting", dict(complete=True, participants={OTHER: 0}, wait_list={ME}), 5.0, _Action.REMOVE_FROM_WAIT_LIST),
    ("8 past the window", dict(participants={ME: 0}), 5.5, _Action.ERROR_TIMEOUT),
    ("8 timed out, not a member", dict(), 1.0, _Action.ERROR_TIMEOUT),
    ("9 complete, room", dict(complete=True, participants={OTHER: 0}), None, _Action.ADD_TO_WAIT_LIST),
    ("9' complete, room, already waiting", dict(complete=True, participants={OTHER: 0}, wait_list={ME}, last_heartbeats=FRESH), None, _Action.SYNC),
    ("10 complete, full", dict(complete=True, participants={OTHER: 0, THIRD: 1, NodeDesc("x", 1, 1): 2}), None, _Action.ADD_TO_REDUNDANCY_LIST),
    ("11 last call over", dict(participants={ME: 0, OTHER: 0}, deadline=NOW - A(microseconds=1), last_heartbeats=FRESH), None, _Action.MARK_RENDEZVOUS_COMPLETE),
    ("11' last call not over", dict(participants={ME: 0, OTHER: 0}, deadline=NOW, last_heartbeats=FRESH), None, _Action.SYNC),
    ("11'' too few", dict(participants={ME: 0}, deadline=NOW - A(seconds=1), last_heartbeats=DUE), None, _Action.KEEP_ALIVE),
    ("12 open round", dict(participants={OTHER: 0}), None, _Action.ADD_TO_PARTICIPANTS),
    ("13 waiting, due", dict(participants={ME: 0}, last_heartbeats=DUE), None, _Action.KEEP_ALIVE),
]


@pytest.mark.parametrize("name,state,past,expected", JOIN_ROWS, ids=[r[0] for r in JOIN_ROWS])
def test_join_table(name: str, state: dict[str, Any], past: float | None, expected: Any) -> None:
    clock = FakeClock(start=NOW)
    s = make_settings(2, 3)
    deadline = clock.monotonic() - past if past is not None else clock.monotonic() + 60
    ctx = _ctx(clock, s, **state)
    if isinstance(expected, type):
        with pytest.raises(expected, match=r"^The rendezvous 'model' is closed, terminating pending rendezvous\.$"):
            _RendezvousJoinOp()(ctx, deadline)
    else:
        assert _RendezvousJoinOp()(ctx, deadline) == expected


@pytest.mark.parametrize(
    "op,state,past,expected",
    [
        (_RendezvousExitOp(), dict(participants={ME: 0}), None, _Action.REMOVE_FROM_PARTICIPANTS),
        (_RendezvousExitOp(), dict(participants={ME: 0}), 0.1, _Action.ERROR_TIMEOUT),
        (_RendezvousExitOp(), dict(wait_list={ME}), 0.1, _Action.FINISH),
        (_RendezvousCloseOp(), dict(closed=True), 9.0, _Action.FINISH),
        (_RendezvousCloseOp(), dict(), 0.1, _Action.ERROR_TIMEOUT),
        (_RendezvousCloseOp(), dict(), None, _Action.MARK_RENDEZVOUS_CLOSED),
        (_RendezvousKeepAliveOp(), dict(last_heartbeats=FRESH), 9.0, _Action.FINISH),
        (_RendezvousKeepAliveOp(), dict(last_heartbeats=DUE), 0.1, _Action.ERROR_TIMEOUT),
        (_RendezvousKeepAliveOp(), dict(last_heartbeats=DUE), None, _Action.KEEP_ALIVE),
        (_RendezvousKeepAliveOp(), dict(), None, _Action.FINISH),  # declared dead: never re-adds itself
    ],
)
def test_other_op_tables(op: Any, state: dict[str, Any], past: float | None, expected: _Action) -> None:
    clock = FakeClock(start=NOW)
    deadline = clock.monotonic() - past if past is not None else clock.monotonic() + 60
    assert op(_ctx(clock, make_settings(), **state), deadline) == expected


# -- §2.3-§2.5: holder and executor -------------------------------------------------------------------


class Sim:
    """One simulated node: its own backend, holder and executor over the shared store."""

    def __init__(self, store: HashStore, s: RendezvousSettings, clock: FakeClock, node: NodeDesc) -> None:
        self.node = node
        self.backend = C10dRendezvousBackend(store, RUN)
        self.holder = _BackendRendezvousStateHolder(self.backend, s, 1, clock=clock)
        self.ex = _DistributedRendezvousOpExecutor(node, self.holder, s, clock)
        self.clock = clock
        self.settings = s
        self.phase = "idle"
        self.deadline = 0.0
        self.pending: _Action | None = None

    def update_deadline(self, t: timedelta) -> float:
        return self.clock.monotonic() + t.total_seconds()

    def begin(self) -> None:
        self.phase = "exit"
        self.deadline = self.update_deadline(self.settings.timeout.join)

    def step(self) -> _Action:
        op = _RendezvousExitOp() if self.phase == "exit" else _RendezvousJoinOp()
        action, self.deadline = self.ex.step(op, self.deadline, self.update_deadline)
        self.pending = action if action not in (_Action.SYNC, _Action.FINISH) else None
        if action == _Action.FINISH:
            self.phase = "join" if self.phase == "exit" else "member"
        return action

    def run_op(self, op: Any, timeout: timedelta, limit: int = 6) -> None:
        deadline = self.update_deadline(timeout)
        for _ in range(limit):
            action, deadline = self.ex.step(op, deadline)
            if action == _Action.FINISH:
                return
            if action == _Action.SYNC:
                self.clock.advance(1)
        raise AssertionError(f"{op} did not finish in {limit} steps")


def stored(store: HashStore) -> RendezvousState | None:
    raw = C10dRendezvousBackend(store, RUN).get_state()
    return None if raw is None else decode_state(raw[0])


def drive(sims: list[Sim], clock: FakeClock, limit: int = 400, settle: bool = True) -> None:
    """Round-robin steps over the sims that are in an op; 1 s passes after a pass of polls only.

    Members heartbeat whenever time passes, as their keep-alive timers would."""
    for _ in range(limit):
        active = [s for s in sims if s.phase in ("exit", "join")]
        if not active:
            return
        actions = [s.step() for s in active]
        if all(a in (_Action.SYNC, _Action.FINISH) for a in actions):
            clock.advance(1)
            for member in sims:  # what their keep-alive timers do meanwhile
                if member.phase == "member":
                    member.run_op(_RendezvousKeepAliveOp(), A(seconds=5))
    if settle:
        raise AssertionError("the simulation did not settle")


def make_sims(n: int, min_nodes: int, max_nodes: int, **kw: Any) -> tuple[HashStore, FakeClock, list[Sim]]:
    store, clock = HashStore(), FakeClock(start=NOW)
    s = make_settings(min_nodes, max_nodes, **kw)
    addrs = ["127.0.0.2", "127.0.0.10", "B", "a", "node-\u00e9", "127.0.0.1", "z", "10.0.0.1"]
    sims = [Sim(store, s, clock, NodeDesc(addrs[i % len(addrs)], 100 + i, i)) for i in range(n)]
    return store, clock, sims


def test_holder_cache_write_and_conflict() -> None:
    store, clock, (a, b) = make_sims(2, 2, 2)
    calls: list[str] = []
    for sim in (a, b):
        for name in ("get_state", "set_state"):
            real = getattr(sim.backend, name)
            setattr(sim.backend, name, lambda *args, _r=real, _n=name: (calls.append(_n), _r(*args))[1])
    assert a.holder.sync() is None and calls == ["get_state"]
    assert a.holder.sync() is None and calls == ["get_state"]  # served from the 1 s cache
    clock.advance(1.01)
    a.holder.sync()
    assert calls == ["get_state"] * 2
    # Both nodes mutate the same base; the first write wins, the second adopts the winner.
    b.holder.sync()
    a.holder.state.participants[a.node] = 0
    a.holder.mark_dirty()
    b.holder.state.participants[b.node] = 0
    b.holder.mark_dirty()
    assert a.holder.sync() is True
    assert b.holder.sync() is False
    assert set(b.holder.state.participants) == {a.node}
    assert set(stored(store).participants) == {a.node}  # type: ignore[union-attr]


@pytest.mark.parametrize(("contenders", "write_s", "ceiling"), [(2, 0.02, 1.0), (40, 0.02, 1.6), (200, 0.02, 5.0)])
def test_backoff_after_lost_writes_grows_with_contenders_and_write_time(
    contenders: int, write_s: float, ceiling: float
) -> None:
    # After k consecutive lost writes the pause is uniform(0, cap): cap doubles from 20 ms up to
    # max(1 s, 2 x contenders x write time), never past the 5 s keep-alive interval; a won write
    # starts over. (With 200 nodes whose writes take 20 ms, a 1 s cap meant 8 attempts per write
    # window: hardly any won.)
    _, clock, (a,) = make_sims(1, 1, 2, keep_alive_max_attempt=10_000)
    state = RendezvousState()
    for i in range(contenders):
        state.last_heartbeats[NodeDesc("10.0.0.9", 7, i)] = NOW
    bits = encode_state(state)
    outcome = [False]

    def set_state(new_bits: bytes, token: Any = None) -> tuple[bytes, Any, bool]:
        clock.advance(write_s)  # the write's round trip
        return (new_bits if outcome[0] else bits), "token", outcome[0]

    a.backend.set_state = set_state  # type: ignore[method-assign]
    a.backend.get_state = lambda: (bits, "token")  # type: ignore[method-assign]
    caps: list[float] = []
    real_uniform = clock.uniform
    clock.uniform = lambda low, high: (caps.append(high), real_uniform(low, high))[1]  # type: ignore[method-assign]

    def lose_once() -> None:
        a.holder.mark_dirty()
        a.ex.step(lambda ctx, deadline: _Action.FINISH, clock.monotonic() + 600)

    for _ in range(12):
        lose_once()
    assert caps == pytest.approx([min(ceiling, 0.01 * 2**k) for k in range(1, 13)])
    assert a.holder.last_write_seconds == pytest.approx(write_s)
    outcome[0] = True
    lose_once()  # won: no pause
    outcome[0] = False
    lose_once()
    assert len(caps) == 13 and caps[-1] == pytest.approx(0.02)


def test_sanitize_removes_dead_nodes_with_the_epilogue() -> None:
    store, clock, sims = make_sims(3, 2, 3, keep_alive_max_attempt=3)
    for sim in sims:
        sim.begin()
    drive(sims, clock)
    assert {s.phase for s in sims} == {"member"}
    state0 = stored(store)
    assert state0 is not None and state0.complete and len(state0.participants) == 3
    # Everyone is killed but sims[0]; 15 s (5 s x 3) after the last heartbeat they are dead: a
    # heartbeat exactly at the bound survives (strict <), a microsecond older does not.
    survivor = sims[0]
    clock.advance(5)
    survivor.run_op(_RendezvousKeepAliveOp(), A(seconds=5))
    last = max(stored(store).last_heartbeats[s.node] for s in sims[1:])  # type: ignore[union-attr]
    clock.advance((last + A(seconds=15) - clock.now()).total_seconds())
    clock.advance(1.01)  # beyond the read cache
    survivor.holder.sync()
    assert set(survivor.holder.state.participants) == {survivor.node}
    # Local only: not written until the survivor writes something.
    assert len(stored(store).participants) == 3  # type: ignore[union-attr]
    survivor.begin()
    assert survivor.step() == _Action.REMOVE_FROM_PARTICIPANTS  # Exit: the last participant leaves
    assert survivor.step() == _Action.FINISH and survivor.phase == "join"
    st_ = stored(store)
    assert st_ is not None and st_.round == 1 and not st_.complete and set(st_.participants) <= {survivor.node}


def test_corrupt_state_is_a_state_error_naming_the_key() -> None:
    store, clock, (a,) = make_sims(1, 1, 1)
    key = f"torch.rendezvous.{RUN}"
    store.set(key, "bm90IGEgcGlja2xl")  # base64 of b"not a pickle"
    with pytest.raises(RendezvousStateError, match=rf"Key '{key}'") as info:
        a.holder.sync()
    assert info.value.__cause__ is not None
    store.set(key, "!!!")  # not base64 at all (the backend's error)
    clock.advance(2)
    with pytest.raises(RendezvousStateError, match=rf"^The rendezvous state is corrupt\. See inner exception for details\. Key '{key}': ") as info2:
        a.holder.sync()
    assert info2.value.__cause__ is not None


def test_naive_and_old_states_are_read_as_utc() -> None:
    store, clock, (a,) = make_sims(1, 1, 2)
    naive = RendezvousState(deadline=datetime(2026, 12, 1, 12, 0), participants={ME: 0}, last_heartbeats={ME: datetime(2026, 12, 1, 11, 59)})
    decoded = dyn._normalise(naive)
    assert decoded.deadline == NOW and decoded.last_heartbeats[ME] == NOW - A(minutes=1)
    old = RendezvousState(redundancy_list=None)
    assert dyn._normalise(old).redundancy_list == set()


class _Boom(Exception):
    pass


def test_keep_alive_tick_survives_every_exception(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(start=NOW)
    store = HashStore()
    backend = C10dRendezvousBackend(store, RUN)
    h = DynamicRendezvousHandler.from_backend(RUN, store, backend, 1, 1, "n", _clock=clock)
    errors = [RendezvousConnectionError("down"), _Boom("codec bug"), KeyError("x")]

    def failing_sync() -> bool | None:
        raise errors.pop(0)

    real_sync = h._state_holder.sync
    h._state_holder.sync = failing_sync  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="rdzv_backend.dynamic"):
        for _ in range(3):
            h._keep_alive()  # never raises
    assert h._keep_alive_failures == 3 and isinstance(h._last_keep_alive_error, KeyError)
    assert "RendezvousConnectionError" in caplog.text and "_Boom: codec bug" in caplog.text
    h._state_holder.sync = real_sync  # type: ignore[method-assign]
    h._keep_alive()
    assert h._keep_alive_failures == 3


def test_periodic_timer_thread_survives_exceptions() -> None:
    calls: list[int] = []
    done = threading.Event()

    def tick() -> None:
        calls.append(1)
        if len(calls) == 3:
            done.set()
        if len(calls) < 3:
            raise RuntimeError("bad tick")

    timer = _PeriodicTimer(A(milliseconds=5), tick)
    timer.set_name("t")
    timer.start()
    try:
        assert done.wait(10), calls
    finally:
        timer.cancel()
    assert timer._thread is not None and not timer._thread.is_alive()
    with pytest.raises(RuntimeError, match=r"^The timer has already started\.$"):
        timer.start()


def test_removed_member_is_reported(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    clock = FakeClock(start=NOW)
    store = HashStore()
    h = DynamicRendezvousHandler.from_backend(RUN, store, C10dRendezvousBackend(store, RUN), 1, 2, "n", _clock=clock)
    h.next_rendezvous()
    h._stop_heartbeats()
    # Another node declares us dead and writes it.
    other = Sim(store, h.settings, clock, NodeDesc("o", 1, 9))
    clock.advance(16)
    other.begin()
    drive([other], clock)
    with caplog.at_level(logging.WARNING, logger="rdzv_backend.dynamic"):
        clock.advance(2)
        h._keep_alive()
        h._keep_alive()
    assert caplog.text.count("is no longer a member of the rendezvous 'model'") == 1


# -- the handler with a fake clock ------------------------------------------------------------------


def test_next_rendezvous_single_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    clock = FakeClock(start=NOW)
    store = HashStore()
    h = DynamicRendezvousHandler.from_backend(RUN, store, C10dRendezvousBackend(store, RUN), 1, 1, "127.0.0.1", _clock=clock)
    try:
        info = h.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        assert info.store._prefix == b"torch.rendezvous.model.0/"  # type: ignore[attr-defined]
        boot = info.bootstrap_store_info
        assert boot is not None and boot.master_addr == "127.0.0.1"
        assert boot.master_port == h._shared_tcp_store_server.port  # type: ignore[union-attr]
        assert store.get("torch.rendezvous.model.0/MASTER_PORT") == str(boot.master_port).encode()
        assert clock.sleeps[0] < 0.3  # the first-round jitter (skipped below 10 ms)
        assert h._keep_alive_timer is not None and h._keep_alive_timer.name == f"RendezvousKeepAliveTimer_{h._this_node.local_id}"
        # Round 1: same server, the keys are written again (every round, unlike torch).
        info1 = h.next_rendezvous()
        assert info1.store._prefix == b"torch.rendezvous.model.1/"  # type: ignore[attr-defined]
        assert store.get("torch.rendezvous.model.1/MASTER_PORT") == str(boot.master_port).encode()
        assert info1.bootstrap_store_info == boot
        assert h.num_nodes_waiting() == 0 and h.is_closed() is False
        assert h.shutdown() is True
        assert h.is_closed() is True
        with pytest.raises(RendezvousClosedError):
            h.next_rendezvous()
    finally:
        h._stop_heartbeats()
        if h._shared_tcp_store_server is not None:
            h._shared_tcp_store_server.close()


def test_join_times_out_after_the_join_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(start=NOW)
    store = HashStore()
    h = DynamicRendezvousHandler.from_backend(
        RUN, store, C10dRendezvousBackend(store, RUN), 2, 2, "n", RendezvousTimeout(join=A(seconds=60)), _clock=clock
    )
    t0 = clock.monotonic()
    with pytest.raises(RendezvousTimeoutError) as info:
        h.next_rendezvous()
    assert str(info.value) == ""
    assert 60 < clock.monotonic() - t0 <= 60 + 5 + 3
    st_ = stored(store)
    assert st_ is not None and h._this_node not in st_.participants  # rolled back within 5 s
    assert h._this_node not in st_.last_heartbeats


def test_shutdown_reports_rendezvous_errors_as_false() -> None:
    clock = FakeClock(start=NOW)
    store = HashStore()
    h = DynamicRendezvousHandler.from_backend(RUN, store, C10dRendezvousBackend(store, RUN), 1, 1, "n", _clock=clock)
    store.set(f"torch.rendezvous.{RUN}", "!!!")
    assert h.shutdown() is False
    with pytest.raises(RendezvousStateError):
        h.set_closed()


# -- scenarios with simulated nodes --------------------------------------------------------------------


@pytest.mark.parametrize("n,min_nodes,max_nodes", [(3, 2, 3), (4, 1, 3), (5, 2, 4), (2, 2, 8)])
def test_scenario_one_round_then_extra_nodes(n: int, min_nodes: int, max_nodes: int) -> None:
    store, clock, sims = make_sims(n, min_nodes, max_nodes, timeout=RendezvousTimeout(last_call=A(seconds=3)))
    for s in sims:
        s.begin()
    drive(sims, clock, limit=60, settle=False)  # the extra nodes never finish
    st_ = stored(store)
    assert st_ is not None and st_.complete
    world = min(n, max_nodes)
    members = [s for s in sims if s.phase == "member"]
    assert len(members) == len(st_.participants) == world
    assert [st_.participants[m] for m in sorted(st_.participants)] == list(range(world))
    extra = {s.node for s in sims if s.phase != "member"}
    # Late nodes: wait list while there is room (then they count in num_nodes_waiting), the
    # redundancy list when the round is full.
    if world == max_nodes:
        assert st_.redundancy_list == extra and not st_.wait_list
    else:
        assert st_.wait_list == extra


def test_scenario_last_call_then_late_joiner_and_rerendezvous() -> None:
    store, clock, sims = make_sims(3, 2, 3, timeout=RendezvousTimeout(last_call=A(seconds=10)))
    a, b, c = sims
    a.begin(), b.begin()
    t0 = clock.now()
    drive([a, b], clock)
    st_ = stored(store)
    assert st_ is not None and st_.complete and len(st_.participants) == 2
    assert clock.now() - t0 > A(seconds=10)  # nobody completed before the last call was over
    c.begin()
    for _ in range(5):
        c.step()
    assert stored(store).wait_list == {c.node}  # type: ignore[union-attr]
    for s in (a, b):
        s.begin()
    drive(sims, clock)
    st_ = stored(store)
    assert st_ is not None and st_.round == 1 and st_.complete and len(st_.participants) == 3
    assert not st_.wait_list and not st_.redundancy_list  # the waiter moved into the round
    assert {s.phase for s in sims} == {"member"}


def test_scenario_redundant_node_joins_when_room_opens() -> None:
    store, clock, sims = make_sims(3, 1, 2)
    for s in sims:
        s.begin()
    drive(sims, clock, limit=20, settle=False)
    extra = next(s for s in sims if s.phase != "member")
    assert stored(store).redundancy_list == {extra.node}  # type: ignore[union-attr]
    deadline_before = extra.deadline
    # A member leaves (its Exit); the round stays complete with room: the redundant node moves
    # to the wait list with a fresh join deadline.
    leaver = next(s for s in sims if s.phase == "member")
    clock.advance(3)
    leaver.begin()
    leaver.step(), leaver.step()
    for _ in range(6):
        extra.step()
    assert extra.deadline > deadline_before
    assert extra.node in stored(store).wait_list  # type: ignore[union-attr]


def test_scenario_close_releases_waiters() -> None:
    store, clock, sims = make_sims(3, 3, 3)
    sims[0].begin(), sims[1].begin()
    for _ in range(6):
        sims[0].step(), sims[1].step()
    sims[2].run_op(_RendezvousCloseOp(), A(seconds=30))
    assert stored(store).closed  # type: ignore[union-attr]
    clock.advance(1.01)
    for s in sims[:2]:
        with pytest.raises(RendezvousClosedError):
            for _ in range(3):
                s.step()


# -- the hypothesis state machine ------------------------------------------------------------------


class HandlerMachine(RuleBasedStateMachine):
    """Random interleavings of joins, heartbeats, deaths, closes and time, checked step by step."""

    @initialize(n=st.integers(2, 5), min_nodes=st.integers(1, 3), extra=st.integers(0, 2), last_call=st.sampled_from([1, 10, 30]))
    def setup(self, n: int, min_nodes: int, extra: int, last_call: int) -> None:
        self.max_nodes = min_nodes + extra
        self.min_nodes = min_nodes
        self.store, self.clock, self.sims = make_sims(
            n, min_nodes, self.max_nodes, timeout=RendezvousTimeout(join=A(seconds=120), last_call=A(seconds=last_call))
        )
        self.rounds: dict[int, dict[NodeDesc, int]] = {}
        self.last_round = 0
        self.closed = False

    def _stored(self) -> RendezvousState:
        return stored(self.store) or RendezvousState()

    @rule(i=st.integers(0, 4))
    def begin(self, i: int) -> None:
        s = self.sims[i % len(self.sims)]
        if s.phase in ("idle", "member", "timedout"):
            s.begin()

    @rule(i=st.integers(0, 4), repeat=st.integers(1, 4))
    def step(self, i: int, repeat: int) -> None:
        s = self.sims[i % len(self.sims)]
        for _ in range(repeat):
            if s.phase not in ("exit", "join"):
                return
            self._one_step(s)

    @rule(passes=st.integers(1, 40))
    def run_all(self, passes: int) -> None:
        """Everyone in an op steps in turn; time passes (members heartbeat) when all just poll."""
        for _ in range(passes):
            active = [s for s in self.sims if s.phase in ("exit", "join")]
            if not active:
                return
            actions = [self._one_step(s) for s in active]
            if all(a in (None, _Action.SYNC, _Action.FINISH) for a in actions):
                self.clock.advance(1)
                for s in self.sims:
                    if s.phase == "member":
                        self.heartbeat(self.sims.index(s))

    def _one_step(self, s: Sim) -> _Action | None:
        before = self._stored()
        phase = s.phase
        now = self.clock.monotonic()
        will_read = s.holder._dirty or now - s.holder._last_sync_time > 1
        pending = s.pending
        try:
            action = s.step()
        except RendezvousClosedError:
            assert phase == "join" and s.holder.state.closed
            s.phase = "closed"
            return None
        except RendezvousGracefulExitError:
            assert phase == "join" and s.holder.state.closed and s.node in (s.holder.state.redundancy_list or set())
            s.phase = "closed"
            return None
        except RendezvousTimeoutError:
            assert now > s.deadline, "timed out before the deadline"
            s.phase = "timedout"
            return None
        after = self._stored()
        if phase == "join" and self.closed and will_read:
            raise AssertionError(f"joined on after the close (action {action})")
        if phase == "join" and now > s.deadline + 5:
            redundant_full = s.node in (s.holder.state.redundancy_list or set())
            assert action == _Action.FINISH or redundant_full or action == _Action.REMOVE_FROM_REDUNDANCY_LIST, action
        self._check_transition(before, after, pending)
        if s.holder._last_sync_time == self.clock.monotonic():  # it did I/O: sanitized just now
            expire = self.clock.now() - s.settings.keep_alive_interval * s.settings.keep_alive_max_attempt
            assert all(hb >= expire for hb in s.holder.state.last_heartbeats.values())
        if s.phase == "member":
            st_ = s.holder.state
            assert st_.complete and s.node in st_.participants
            # The ranks given at completion, minus members that already left again (torch: a
            # slow member then sees a smaller world; nobody is renumbered within a round).
            formed = self.rounds.get(st_.round)
            assert formed is not None, "finished a round nobody completed"
            assert st_.participants.items() <= formed.items(), "two views of one round's ranks"
        return action

    def _check_transition(self, before: RendezvousState, after: RendezvousState, pending: _Action | None) -> None:
        if after.complete and (not before.complete or after.round != before.round):
            # One write may also carry the writer's sanitize: its own stale heartbeat ended the
            # old round (round + 1) and it completed the next one.
            if len(after.participants) < self.max_nodes:
                assert before.deadline is not None and before.deadline < self.clock.now(), "completed before the last call"
            assert self.min_nodes <= len(after.participants) <= self.max_nodes
            ranks = dict(after.participants)
            assert [ranks[n] for n in sorted(ranks)] == list(range(len(ranks))), "ranks not in node order"
            assert after.round not in self.rounds, "a round completed twice"
            self.rounds[after.round] = ranks
        if after.round == before.round and not before.closed:
            for node in after.wait_list - before.wait_list:
                assert before.complete, "wait-listed in an open round"
            for node in (after.redundancy_list or set()) - (before.redundancy_list or set()):
                assert before.complete and len(before.participants) >= self.max_nodes, "redundant with room"
        if after.closed and not before.closed:
            assert pending == _Action.MARK_RENDEZVOUS_CLOSED

    @rule(i=st.integers(0, 4))
    def heartbeat(self, i: int) -> None:
        s = self.sims[i % len(self.sims)]
        if s.phase in ("member", "idle", "timedout"):
            try:
                s.run_op(_RendezvousKeepAliveOp(), A(seconds=5))
            except RendezvousError:
                pass

    @rule(i=st.integers(0, 4))
    def close(self, i: int) -> None:
        s = self.sims[i % len(self.sims)]
        if s.phase in ("member", "idle", "timedout", "closed"):
            s.run_op(_RendezvousCloseOp(), A(seconds=30))
            assert self._stored().closed
            self.closed = True

    @rule(i=st.integers(0, 4))
    def kill(self, i: int) -> None:
        self.sims[i % len(self.sims)].phase = "dead"

    @rule(dt=st.sampled_from([0.2, 1.0, 1.5, 5.0, 11.0, 16.0, 31.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)

    @invariant()
    def stored_state_is_consistent(self) -> None:
        if not hasattr(self, "store"):
            return
        st_ = self._stored()
        parts, wait, red = set(st_.participants), st_.wait_list, st_.redundancy_list or set()
        assert not (parts & wait) and not (parts & red) and not (wait & red)
        assert parts | wait | red == set(st_.last_heartbeats)
        if st_.complete:
            # Members may have left since completion; the others keep their ranks.
            assert st_.participants.items() <= self.rounds[st_.round].items()
            assert 0 < len(parts) <= self.max_nodes and st_.deadline is None
        else:
            assert set(st_.participants.values()) <= {0} and len(parts) < self.max_nodes
            assert (st_.deadline is not None) == (len(parts) >= self.min_nodes)
        assert st_.round >= self.last_round
        self.last_round = st_.round
        assert st_.closed or not self.closed


TestHandlerMachine = HandlerMachine.TestCase
TestHandlerMachine.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
