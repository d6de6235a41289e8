"""Concurrent adds and compare_sets from many client processes, checked for linearizability.

Each worker process records, for every operation, its invocation and response
times (``time.monotonic``: CLOCK_MONOTONIC, one clock for every process on the
host) and its result. The checker then proves that one serial order explains
every result and respects real time (an operation that finished before another
started comes first). Linearizability is local (Herlihy & Wing), so checking
the counter and the register separately checks them together.

* counter (``add``): every add returns the new total. With positive deltas the
  totals are distinct, so the serial order is "by total", and it must be a
  chain: each total equals the previous total plus that add's delta.
* register (``compare_set``): desired values are unique per operation, so a
  call succeeded iff it returned its own desired value. Winners must form one
  chain from the initial value (each winner's expected value is the previous
  winner's value); a loser is a read that must see some chain value.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import pytest
from reliability_helpers import ServerProcess, scale

from rdzv_store import TCPStore

_WORKER = r"""
import json, random, sys, time
from datetime import timedelta
from rdzv_store import TCPStore
port, wid, count, seed = (int(a) for a in sys.argv[1:5])
store = TCPStore("127.0.0.1", port, timeout=timedelta(seconds=60))
rng = random.Random(seed * 1000 + wid)
print("ready", flush=True)
store.wait(["go"])
history = []
seen = b"init"
for i in range(count):
    if rng.random() < 0.5:
        delta = rng.randrange(1, 1000)
        t0 = time.monotonic(); total = store.add("counter", delta); t1 = time.monotonic()
        history.append(["add", t0, t1, delta, total])
    else:
        desired = f"w{wid}-{i}".encode()
        t0 = time.monotonic(); got = store.compare_set("register", seen, desired); t1 = time.monotonic()
        history.append(["cas", t0, t1, seen.decode(), desired.decode(), got.decode()])
        seen = got  # a loser learns the current value; a winner wrote it
print(json.dumps(history), flush=True)
store.close()
"""


@dataclass
class Op:
    start: float
    end: float
    pos: int  # position in the serial order (see check_real_time)


def check_real_time(ops: list[Op]) -> None:
    """If a finished before b started, a must not come after b: pos(a) <= pos(b).

    Writes get even positions 2i (distinct); reads of the state after write i get
    2i + 1, so reads of one state may be ordered freely among themselves. Sweep b
    by start time, keeping the largest position among ops that ended before it.
    """
    by_end = sorted(ops, key=lambda o: o.end)
    j = 0
    latest = -1
    for b in sorted(ops, key=lambda o: o.start):
        while j < len(by_end) and by_end[j].end < b.start:
            latest = max(latest, by_end[j].pos)
            j += 1
        assert latest <= b.pos, f"real-time order violated: an op at position {latest} finished before {b}"


def check_counter(adds: list[list], final: int) -> None:
    adds = sorted(adds, key=lambda a: a[4])
    ops = []
    previous = 0
    for i, (_, t0, t1, delta, total) in enumerate(adds):
        assert total == previous + delta, f"add #{i} returned {total}, expected {previous} + {delta}"
        previous = total
        ops.append(Op(t0, t1, 2 * (i + 1)))
    assert previous == final
    check_real_time(ops)


def check_register(cases: list[list], final: str) -> None:
    winners = {c[3]: c for c in cases if c[5] == c[4]}  # expected value -> the winner from it
    assert len(winners) == sum(1 for c in cases if c[5] == c[4]), "two winners from one value"
    index = {"init": 0}
    chain = []
    value = "init"
    while value in winners:
        winner = winners.pop(value)
        chain.append(winner)
        value = winner[4]
        index[value] = len(chain)
    assert not winners, f"winners outside the chain: {list(winners.values())[:3]}"
    assert value == final
    ops = [Op(w[1], w[2], 2 * (i + 1)) for i, w in enumerate(chain)]
    for c in cases:
        if c[5] != c[4]:
            assert c[5] in index, f"a compare_set returned {c[5]!r}, which was never stored"
            ops.append(Op(c[1], c[2], 2 * index[c[5]] + 1))
    check_real_time(ops)


def run_workers(port: int, workers: int, count: int, seed: int) -> list[list]:
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(w), str(count), str(seed)], stdout=subprocess.PIPE, text=True)
        for w in range(workers)
    ]
    try:
        for proc in procs:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready and proc.stdout.readline().strip() == "ready"
        with TCPStore("127.0.0.1", port, timeout=timedelta(seconds=30)) as store:
            store.set("register", "init")
            store.set("go", "1")
        history = []
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0
            history += json.loads(out)
        return history
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("run", range(scale(2, 10)))
def test_adds_and_compare_sets_are_linearizable(run):
    workers, count = scale(6, 16), scale(300, 3000)
    with ServerProcess() as server:
        history = run_workers(server.port, workers, count, run)
        with TCPStore("127.0.0.1", server.port, timeout=timedelta(seconds=30)) as store:
            final_counter = int(store.get("counter"))
            final_register = store.get("register").decode()
    adds = [h for h in history if h[0] == "add"]
    cases = [h for h in history if h[0] == "cas"]
    check_counter(adds, final_counter)
    check_register(cases, final_register)
    won = sum(1 for c in cases if c[5] == c[4])
    print(f"\nrun {run}: {len(adds)} adds and {len(cases)} compare_sets ({won} won) from {workers} processes: linearizable")
    assert len(adds) + len(cases) == workers * count and won > 0


def test_checker_rejects_non_linearizable_histories():
    # Two adds whose totals contradict real time: the second started after the first ended,
    # yet it is ordered first.
    with pytest.raises(AssertionError, match="real-time"):
        check_counter([["add", 0.0, 1.0, 5, 10], ["add", 2.0, 3.0, 5, 5]], 10)
    with pytest.raises(AssertionError, match="expected"):
        check_counter([["add", 0.0, 1.0, 5, 5], ["add", 0.0, 1.0, 5, 11]], 11)
    # A lost update: two winners from the same value.
    with pytest.raises(AssertionError, match="two winners"):
        check_register([["cas", 0, 1, "init", "a", "a"], ["cas", 0, 1, "init", "b", "b"]], "b")
    # A stale read: a loser that saw "init" after "a" was known to be stored.
    with pytest.raises(AssertionError, match="real-time"):
        check_register([["cas", 0, 1, "init", "a", "a"], ["cas", 2, 3, "x", "y", "init"]], "a")
    # A value that was never stored.
    with pytest.raises(AssertionError, match="never stored"):
        check_register([["cas", 0, 1, "init", "a", "a"], ["cas", 2, 3, "x", "y", "zzz"]], "a")
