"""The namespace tier's scenarios, run by ``test_netns_faults.py`` with our clients and by
``tests/interop/test_netns_interop.py`` with torch 2.13's (same code, another client kind).

Each scenario asserts what must hold whichever client is used (it is our server), asserts
the client's own behaviour for our clients, and records what each client did. With
``RDZV_NETNS_RESULTS=path`` the records are merged into that JSON file at the end of the
module; ``netns_report.py`` renders the README's table from it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_helpers import Agent, NetnsServer, Topology, sweep_stale, why_unavailable
from real_components import unavailable

KEEPALIVE = (1, 1, 2)  # idle, interval, probes (s): the server gives a silent peer up after ~3 s
STORE_TIMEOUT = 1.0
WAIT_TIMEOUT = 1.5
LATENCIES = (0.0, 0.05, 0.2)  # one way, added by a FaultProxy on the slowed client's host
LABELS = {"tcp": "rdzv-store TCPStore", "async": "rdzv-store AsyncTCPStore", "torch": "torch 2.13 TCPStore"}
RESULTS_FILE = Path(__file__).resolve().parent / "results.json"

_records: dict[str, dict[str, Any]] = {}


def record(kind: str, key: str, value: Any) -> None:
    _records.setdefault(LABELS[kind], {})[key] = value


def write_records() -> None:
    path = os.environ.get("RDZV_NETNS_RESULTS")
    if not path or not _records:
        return
    target = Path(path)
    data = json.loads(target.read_text()) if target.exists() else {}
    data.setdefault("setup", {}).update(
        {
            "keepalive_s": list(KEEPALIVE),
            "store_timeout_s": STORE_TIMEOUT,
            "wait_timeout_s": WAIT_TIMEOUT,
            "latencies_ms": [round(x * 1000) for x in LATENCIES],
        }
    )
    for label, values in _records.items():
        data.setdefault("clients", {}).setdefault(label, {}).update(values)
    target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    """Three hosts and a switch, built for this module and deleted after it (also on failure)."""
    sweep_stale()
    reason = why_unavailable()
    if reason is not None:
        unavailable(reason)
    topo = Topology()
    try:
        yield topo
    finally:
        topo.destroy()
        write_records()
    assert not topo.exists(), "namespaces left behind"


@pytest.fixture
def hosts(topology: Topology) -> Iterator[tuple[Topology, NetnsServer, Agent, Agent]]:
    """Our server on srv (short keepalive) and an agent on each client host; links restored after."""
    started: list[Any] = []
    try:
        server = NetnsServer(topology, KEEPALIVE)
        started.append(server)
        c1, c2 = Agent(topology, "c1"), None
        started.append(c1)
        c2 = Agent(topology, "c2")
        started.append(c2)
        yield topology, server, c1, c2
    finally:
        topology.restore_all()
        for proc in reversed(started):
            proc.stop()


def _is_ours(kind: str) -> bool:
    return kind in ("tcp", "async")


def _outcome(answer: dict[str, Any] | None, address: str, waited: float) -> str:
    if answer is None:
        return f"still blocked after {waited:.0f} s"
    if answer["ok"]:
        return f"returned after {answer['elapsed']:.1f} s"
    named = "names the address" if address in answer["message"] else "does not name the address"
    return f"{answer['error']} after {answer['elapsed']:.1f} s, {named}"


def cut_mid_wait(hosts: tuple[Topology, NetnsServer, Agent, Agent], kinds: list[str]) -> None:
    """Clients on c1 blocked in wait and get; c1's link is cut (silent drops). Then restored."""
    topo, server, c1, c2 = hosts
    keys = [f"data/{i}" for i in range(50)]
    c2.call("open", name="keeper", kind="tcp", host=server.host, port=server.port, timeout=5)
    c2.call("call", name="keeper", method="multi_set", args=[keys, [f"v{i}" for i in range(50)]])
    assert c2.call("call", name="keeper", method="add", args=["ctr", 1]) == 1  # replied: all stored
    server.wait_until(lambda s: s["connections"] == 1, 10)
    fds0, rss0 = server.fds(), server.rss_kib()

    pending: dict[tuple[str, str], int] = {}
    for kind in kinds:
        for what in ("wait", "get"):
            name = f"{kind}-{what}"
            c1.call("open", name=name, kind=kind, host=server.host, port=server.port, timeout=STORE_TIMEOUT)
            args: list[Any] = [["never"], {"seconds": WAIT_TIMEOUT}] if what == "wait" else ["never"]
            pending[(kind, what)] = c1.start("call", name=name, method=what, args=args)
    server.wait_until(lambda s: s["waiters"] == len(pending), 10)

    topo.cut("c1")
    cut_at = time.monotonic()
    bound = WAIT_TIMEOUT + STORE_TIMEOUT + 3.0  # generous: wait timeout, then the reply bound
    answers: dict[tuple[str, str], dict[str, Any] | None] = {}
    for key, ident in pending.items():
        try:
            answers[key] = c1.reply(ident, max(bound - (time.monotonic() - cut_at), 0.1))
        except TimeoutError:
            answers[key] = None  # torch's client: blocked on the CANCEL_WAIT reply
    waited = time.monotonic() - cut_at
    for (kind, what), answer in answers.items():
        record(kind, f"{what}_cut", _outcome(answer, server.address, waited))
        if answer is not None and not answer["ok"]:
            record(kind, f"{what}_message", answer["message"][:160])
    # Other hosts are not affected by c1's partition.
    assert c2.call("call", name="keeper", method="add", args=["ctr", 1]) == 2

    # The server gives the silent peers up once keepalive does (~3 s after their last packet).
    stats = server.wait_until(lambda s: s["waiters"] == 0 and s["connections"] == 1, 15)
    dropped_after = time.monotonic() - cut_at
    assert stats["keys"] == 51
    fds1 = server.fds()
    rss1 = server.rss_kib()
    assert fds1 == fds0, (fds0, fds1)
    assert rss1 - rss0 < 2048, (rss0, rss1)

    topo.restore("c1")
    for kind in kinds:
        for what in ("wait", "get"):
            answer = answers[(kind, what)]
            if answer is None:  # does the restored link release it? (torch's client)
                try:
                    late = c1.reply(pending[(kind, what)], 3.0)
                    record(kind, f"{what}_after_restore", _outcome(late, server.address, 0))
                    record(kind, f"{what}_message", late["message"][:160])
                except TimeoutError:
                    record(kind, f"{what}_after_restore", "still blocked 3 s after the link came back")
        # A new client on the restored host works and sees everything stored before the cut.
        fresh = f"{kind}-fresh"
        c1.call("open", name=fresh, kind=kind, host=server.host, port=server.port, timeout=5)
        got = c1.call("call", name=fresh, method="multi_get", args=[keys])
        assert got == [f"v{i}" for i in range(50)], got
        c1.call("call", name=fresh, method="set", args=[f"after/{kind}", "yes"])
        assert c2.call("call", name="keeper", method="get", args=[f"after/{kind}"]) == "yes"
        c1.call("close", name=fresh)
        record(kind, "after_restore", "new client works, all 51 keys intact")
        record(kind, "server_drop_s", round(dropped_after, 1))
        record(kind, "server_fds", f"{fds0} → {fds1}")
        record(kind, "server_rss_kib", rss1 - rss0)

    for (kind, what), answer in answers.items():
        if _is_ours(kind):
            assert answer is not None, f"{kind} {what}: no error within {bound} s of the cut"
            assert not answer["ok"] and "StoreError" in answer["error_mro"], answer
            assert server.address in answer["message"], answer["message"]
            limit = (WAIT_TIMEOUT if what == "wait" else STORE_TIMEOUT) + STORE_TIMEOUT + 1.0
            assert answer["elapsed"] <= limit, (kind, what, answer["elapsed"], limit)


def slow_client_does_not_slow_others(hosts: tuple[Topology, NetnsServer, Agent, Agent], kind: str) -> None:
    """c1's clients go through a FaultProxy adding 0-200 ms each way; c2's round trips are timed."""
    _, server, c1, c2 = hosts
    c2.call("open", name="probe", kind=kind, host=server.host, port=server.port, timeout=10)
    c2.call("bench", name="probe", n=100)  # warm up
    baseline = c2.call("bench", name="probe", n=300, within=60)
    c1.call("proxy", name="px", method="start", upstream=[server.host, server.port])
    names = [f"slow{i}" for i in range(4)]
    for name in names:
        c1.call("open", name=name, kind=kind, via="px", host=server.host, port=server.port, timeout=10)
    c1.call("open", name="slowbench", kind=kind, via="px", host=server.host, port=server.port, timeout=10)
    figures = {"alone": baseline}
    for latency in LATENCIES:
        c1.call("proxy", name="px", method="set_latency", args=[latency])
        c1.call("load", action="start", load="l", names=names, threads=8)
        slowed = c1.start("bench", name="slowbench", n=3)  # the slowed client's own round trips
        other = c2.call("bench", name="probe", n=300, within=60)
        own = c1.reply(slowed, 30)
        load = c1.call("load", action="stop", load="l")
        assert own["ok"] and own["value"]["p50"] >= 2 * latency * 1000 * 0.9, own
        assert load["stuck"] == 0 and load["ops"] > 0, load
        figures[f"{round(latency * 1000)}ms"] = other
        # Not slowed: the median stays near the baseline, and no round trip waits for the
        # slowed client's 2 x latency.
        assert other["p50"] <= max(3 * baseline["p50"], baseline["p50"] + 1.0), (latency, baseline, other)
        if latency:
            assert other["p99"] < 1000 * latency, (latency, other)
    record(kind, "others_round_trip_ms", {k: [round(v["p50"], 2), round(v["p99"], 2)] for k, v in figures.items()})
