"""DynamicRendezvousHandler across real processes, on our TCP server and on a FileStore.

Each agent is a child process (``tests/handler_helpers.py agent``) with its own backend and
handler, driven by commands. Short timings through torch's config keys: heartbeat every 1 s, a
node is dead after 3 missed ones, last call 1 s. Every wait has a deadline and every process is
stopped in a ``finally`` (killed if it does not exit).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from handler_helpers import HOST, AgentProcess
from rdzv_backend import C10dRendezvousBackend, RendezvousParameters, create_backend, create_handler
from rdzv_store import FileStore, TCPStore

CONF = {
    "keep_alive_interval": "1",
    "keep_alive_max_attempt": "3",
    "last_call_timeout": "1",
    "join_timeout": "40",
    "read_timeout": "30",
    "is_host": "false",
}
DEAD_AFTER = 1 * 3  # keep_alive_interval * keep_alive_max_attempt (a loaded machine may miss 2)
# From a SIGKILL to the survivors' new round: the dead node's last heartbeat is at most one
# interval old, it is dead DEAD_AFTER later, seen at the next poll (1 s sleep + 1 s cache),
# then the last call (1 s) and a poll. Plus slack for a loaded 2-core machine.
REJOIN_BOUND = 1 + DEAD_AFTER + 2 + 1 + 1 + 6


@pytest.fixture(params=["tcp", "file"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(store_type, endpoint): our TCP server in this process, or a FileStore path."""
    if request.param == "tcp":
        server = TCPStore(HOST, 0, is_master=True, timeout=30)
        try:
            yield "tcp", f"{HOST}:{server.port}"
        finally:
            server.close()
    else:
        yield "file", str(tmp_path / "rdzv.store")


@contextmanager
def agents(where: tuple[str, str], n: int, run_id: str, min_nodes: int, max_nodes: int) -> Iterator[list[AgentProcess]]:
    store_type, endpoint = where
    procs: list[AgentProcess] = []
    try:
        for _ in range(n):
            procs.append(
                AgentProcess(
                    endpoint=endpoint, store_type=store_type, run_id=run_id, min_nodes=min_nodes, max_nodes=max_nodes, conf=CONF
                )
            )
        for p in procs:
            p.expect("ready", 30)
        yield procs
    finally:
        for p in procs:
            p.stop()


def _check_round(events: list[dict[str, Any]], expected_pids: set[int]) -> None:
    rounds = {e["round"] for e in events}
    assert len(rounds) == 1, events
    assert sorted(e["rank"] for e in events) == list(range(len(events)))
    assert {e["world"] for e in events} == {len(events)}
    # Ranks are the index in sorted (addr, pid, local_id) order, and everybody agrees.
    parts = events[0]["participants"]
    assert all(e["participants"] == parts for e in events)
    assert {p[1] for p in parts} == expected_pids
    assert [p[3] for p in sorted(parts)] == list(range(len(parts)))
    # One MASTER_ADDR/MASTER_PORT for the round, published by rank 0.
    assert len({tuple(e["master"]) for e in events}) == 1


def _closer(where: tuple[str, str], run_id: str) -> Any:
    store_type, endpoint = where
    params = RendezvousParameters("c10d", endpoint, run_id, 1, 8, local_addr=HOST, store_type=store_type, **CONF)
    backend, store = create_backend(params)
    return create_handler(store, backend, params), store


@pytest.mark.parametrize("n", [2, 5])
def test_agents_reach_one_round(where: tuple[str, str], n: int) -> None:
    with agents(where, n, f"one-round-{n}", min_nodes=n, max_nodes=n) as procs:
        for p in procs:
            p.send("next")
        events = [p.expect("round", 40) for p in procs]
        _check_round(events, {p.pid for p in procs})
        assert events[0]["round"] == 0
        # The round's store works for everyone (the workers' prefix store).
        procs[0].send("putget k0 k1")
        procs[1].send("putget k1 k0")
        assert procs[0].expect("putget", 20)["value"] == str(procs[1].pid)
        assert procs[1].expect("putget", 20)["value"] == str(procs[0].pid)


def test_eight_agents_on_tcp() -> None:
    server = TCPStore(HOST, 0, is_master=True, timeout=30)
    try:
        with agents(("tcp", f"{HOST}:{server.port}"), 8, "eight", min_nodes=8, max_nodes=8) as procs:
            for p in procs:
                p.send("next")
            events = [p.expect("round", 60) for p in procs]
            _check_round(events, {p.pid for p in procs})
    finally:
        server.close()


def test_sigkill_one_the_others_rerendezvous(where: tuple[str, str]) -> None:
    with agents(where, 3, "kill", min_nodes=2, max_nodes=3) as procs:
        for p in procs:
            p.send("next")
        first = [p.expect("round", 40) for p in procs]
        _check_round(first, {p.pid for p in procs})

        victim, survivors = procs[1], [procs[0], procs[2]]
        victim.kill()
        killed_at = time.monotonic()
        for p in survivors:
            p.send("next")
        second = [p.expect("round", REJOIN_BOUND + 10) for p in survivors]
        took = time.monotonic() - killed_at
        _check_round(second, {p.pid for p in survivors})
        assert second[0]["round"] > first[0]["round"]
        assert took < REJOIN_BOUND, f"re-rendezvous took {took:.1f}s (bound {REJOIN_BOUND}s)"


def test_closing_ends_every_next_rendezvous(where: tuple[str, str]) -> None:
    # Three agents wait for a fourth that never comes; closing releases all of them.
    with agents(where, 3, "close", min_nodes=4, max_nodes=4) as procs:
        for p in procs:
            p.send("next")
        handler, store = _closer(where, "close")
        try:
            # Until everyone is waiting in the round, the close could race their first join.
            deadline = time.monotonic() + 30
            while True:
                handler._state_holder.sync()
                if len(handler._state_holder.state.participants) == 3:
                    break
                assert time.monotonic() < deadline, "the agents never all joined"
                time.sleep(0.1)
            handler.set_closed()
            assert handler.is_closed()
            for p in procs:
                err = p.expect("error", 15)
                assert err["kind"] == "RendezvousClosedError", err
                assert err["message"] == ""
            procs[0].send("closed")
            assert procs[0].expect("is_closed", 10)["value"] is True
        finally:
            handler._stop_heartbeats()
            store.close()


def test_late_joiner_waits_for_the_next_round(where: tuple[str, str]) -> None:
    with agents(where, 3, "late", min_nodes=2, max_nodes=3) as procs:
        early, late = procs[:2], procs[2]
        for p in early:
            p.send("next")
        first = [p.expect("round", 40) for p in early]
        _check_round(first, {p.pid for p in early})

        late.send("next")
        # The late joiner is parked in the wait list; the members see it and re-rendezvous.
        deadline = time.monotonic() + 20
        while True:
            early[0].send("waiting")
            if early[0].expect("waiting", 10)["value"] == 1:
                break
            assert time.monotonic() < deadline, "the late joiner never showed up in the wait list"
            time.sleep(0.2)
        assert not [e for e in late.events if e["event"] == "round"], "the late joiner joined a complete round"
        for p in early:
            p.send("next")
        second = [p.expect("round", 40) for p in procs]
        _check_round(second, {p.pid for p in procs})
        assert second[0]["round"] == first[0]["round"] + 1
        # Whatever its rank, the late joiner got this round's bootstrap info (rank 0 publishes it
        # every round), the same as everyone else's.
        assert second[2]["master"] == second[0]["master"]


def test_backend_bytes_are_torch_shaped(tmp_path: Path) -> None:
    # What our handler stores is a base64 pickle naming torch's classes (so torch agents read it).
    path = str(tmp_path / "s")
    with agents(("file", path), 2, "bytes", min_nodes=2, max_nodes=2) as procs:
        for p in procs:
            p.send("next")
        [p.expect("round", 40) for p in procs]
        store = FileStore(path)
        try:
            backend = C10dRendezvousBackend(store, "bytes")
            got = backend.get_state()
            assert got is not None
            raw = got[0]
            assert raw[:2] == b"\x80\x04"
            assert b"torch.distributed.elastic.rendezvous.dynamic_rendezvous" in raw
            assert b"_RendezvousState" in raw and b"_NodeDesc" in raw
        finally:
            store.close()


def test_rendezvous_benchmark_smoke(tmp_path: Path) -> None:
    # The benchmark runs (ours only, 8 agents, once) and writes its report; it times nothing here.
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_rendezvous", "--no-torch", "--sizes", "8", "--reps", "1", "--out", str(tmp_path)],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cell = json.loads((tmp_path / "rendezvous.json").read_text())["summary"]["8"]["ours/ours"]
    assert cell["failed"] == 0 and cell["compare_set"]["median"] >= 16  # 8 sentinels + 8 joins at least
    assert "| 8 | ours/ours |" in (tmp_path / "rendezvous.md").read_text()
