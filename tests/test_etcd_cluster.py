"""EtcdStore and the etcd-v3 backend on a real 3-member etcd cluster, with members killed,
stopped (SIGSTOP: a partition whose TCP still connects) and quorum lost.

* the leader SIGKILLed while 4 processes run adds, compare_sets and two rendezvous rounds:
  every acknowledged write is there, the history is linearizable (the checker of
  test_reliability_linearizability), every client fails over within its timeout and both
  rendezvous rounds complete;
* a SIGSTOPped member (follower or leader) serves no stale read to our clients;
* quorum lost: a clear EtcdNoLeaderError within the timeout, nothing half applied;
* a waiter whose watch's member dies carries on elsewhere.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import time
import uuid

import pytest
from etcd_helpers import EtcdCluster, etcd_binary
from test_reliability_linearizability import check_counter, check_register

from rdzv_store import EtcdNoLeaderError, EtcdStore, EtcdUnavailableError

_WORKER = r"""
import json, random, sys, time
from rdzv_store import EtcdStore
from rdzv_backend.etcd import EtcdRendezvousBackend
eps = sys.argv[1].split(",")
wid, count, seed, n = (int(a) for a in sys.argv[2:6])
prefix, run_id = sys.argv[6], sys.argv[7]
eps = eps[wid % len(eps):] + eps[:wid % len(eps)]  # workers start on different members
store = EtcdStore(eps, prefix=prefix, timeout=30)
rng = random.Random(seed * 1000 + wid)
worst = 0.0

def rendezvous(round_id):
    # Join by compare-and-set of one state (the backend's contract), then a store barrier.
    global worst
    backend = EtcdRendezvousBackend(store.client, f"{run_id}-{round_id}")
    t0 = time.monotonic()
    current = backend.get_state()
    while True:
        members = json.loads(current[0]) if current else []
        if wid in members:
            break
        result = backend.set_state(json.dumps(sorted(members + [wid])).encode(), current[1] if current else None)
        if result is None:
            current = None
        elif result[2]:
            break
        else:
            current = result[0], result[1]
    store.barrier(f"rdzv-{round_id}", n)
    final = backend.get_state()
    worst = max(worst, time.monotonic() - t0)
    return json.loads(final[0])

print("ready", flush=True)
store.wait(["go"])
first = rendezvous(1)
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
        seen = got
    worst = max(worst, t1 - t0)
second = rendezvous(2)
print(json.dumps({"history": history, "worst": worst, "rounds": [first, second]}), flush=True)
store.close()
"""


@pytest.fixture(scope="module")
def cluster():
    etcd_binary()
    with EtcdCluster(3) as c:
        yield c


@pytest.fixture
def healthy(cluster):
    """Every member running and healthy before and after the test (killed ones restarted)."""
    yield cluster
    for m in cluster.members:
        if m.stopped:
            m.sigcont()
        if not m.alive():
            cluster.restart(m)
    deadline = time.monotonic() + 30
    while not all(m.healthy() for m in cluster.members):
        assert time.monotonic() < deadline, "cluster did not recover"
        time.sleep(0.05)


def _prefix() -> str:
    return f"/c-{uuid.uuid4().hex}/"


@pytest.mark.parametrize("kill_during", ["operations", "rendezvous"])
def test_leader_sigkill_loses_nothing_and_stays_linearizable(healthy, kill_during):
    cluster = healthy
    workers, count = 4, 250
    prefix, run_id = _prefix(), "run-" + uuid.uuid4().hex
    eps = ",".join(cluster.endpoints)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, eps, str(w), str(count), "7", str(workers), prefix, run_id],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    control = EtcdStore(cluster.endpoints, prefix=prefix, timeout=30)
    try:
        for proc in procs:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready and proc.stdout.readline().strip() == "ready"
        control.set("register", "init")
        leader = cluster.leader()
        control.set("go", "1")
        if kill_during == "operations":
            # Wait (bounded) until the workers are well into their operations.
            deadline = time.monotonic() + 30
            while not control.check(["counter"]) or int(control.get("counter")) < 20000:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        killed_at = time.monotonic()
        leader.kill()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, "a worker failed (an operation raised)"
            results.append(json.loads(out))
        elapsed = time.monotonic() - killed_at
        final_counter = int(control.get("counter"))
        final_register = control.get("register").decode()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        control.close()
    history = [h for r in results for h in r["history"]]
    adds = [h for h in history if h[0] == "add"]
    cases = [h for h in history if h[0] == "cas"]
    check_counter(adds, final_counter)  # every acknowledged add is in the total, none twice
    check_register(cases, final_register)
    assert len(history) == workers * count
    worst = max(r["worst"] for r in results)
    assert worst < 15, f"an operation took {worst:.1f} s: failover too slow"
    for r in results:
        assert r["rounds"][0] == list(range(workers)) and r["rounds"][1] == list(range(workers))
    print(f"\nleader killed during {kill_during}: {len(adds)} adds, {len(cases)} compare_sets linearizable; "
          f"worst op/rendezvous {worst:.2f} s; workers done {elapsed:.1f} s after the kill")


def test_stopped_follower_serves_no_stale_reads(healthy):
    cluster = healthy
    leader = cluster.leader()
    follower = next(m for m in cluster.members if m is not leader)
    others = [m.client_url for m in cluster.members if m is not follower]
    prefix = _prefix()
    reader = EtcdStore([follower.client_url] + others, prefix=prefix, timeout=20, attempt_timeout=1)
    writer = EtcdStore(others, prefix=prefix, timeout=20)
    try:
        writer.set("k", "v1")
        assert reader.get("k") == b"v1"  # the reader now holds a connection to the follower
        follower.sigstop()
        writer.set("k", "v2")
        start = time.monotonic()
        assert reader.get("k") == b"v2"
        assert time.monotonic() - start < 5
        assert reader.compare_set("k", "v1", "nope") == b"v2"
        # A waiter that started on the stopped member still sees the write made elsewhere.
        t = threading.Thread(target=writer.set, args=("later", "x"))
        t.start()
        assert reader.get("later") == b"x"
        t.join(10)
    finally:
        follower.sigcont()
        reader.close()
        writer.close()


def test_stopped_leader_serves_no_stale_reads_before_or_after_it_resumes(healthy):
    cluster = healthy
    old = cluster.leader()
    rest = [m for m in cluster.members if m is not old]
    prefix = _prefix()
    writer = EtcdStore([m.client_url for m in rest], prefix=prefix, timeout=20)
    writer.set("k", "v1")
    only_old = EtcdStore([old.client_url], prefix=prefix, timeout=3, attempt_timeout=1)
    assert only_old.get("k") == b"v1"
    old.sigstop()
    try:
        cluster.wait_leader_among(rest)
        writer.set("k", "v2")
        with pytest.raises(EtcdUnavailableError):
            only_old.get("k")  # it cannot answer: an error, never the stale v1
    finally:
        old.sigcont()
    # Right after it resumes (it may still believe it leads), its reads are current.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert only_old.get("k") == b"v2"
            break
        except EtcdUnavailableError:
            assert time.monotonic() < deadline
    writer.close()
    only_old.close()


def test_quorum_loss_is_a_clear_error_and_nothing_is_half_applied(healthy):
    cluster = healthy
    survivor, *gone = cluster.members
    prefix = _prefix()
    store = EtcdStore(cluster.endpoints, prefix=prefix, timeout=3, attempt_timeout=1)
    store.set("before", "1")
    for m in gone:
        m.sigstop()
    try:
        # The survivor notices it has no leader after an election timeout.
        deadline = time.monotonic() + 10
        while "no leader" not in json.dumps(survivor.status() or {}):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(EtcdNoLeaderError, match="no leader") as info:
            store.multi_set([f"m{i}" for i in range(200)], ["v"] * 200)
        assert time.monotonic() - start < 5
        assert "key m0" in str(info.value) and "etcd http://127.0.0.1" in str(info.value)
        with pytest.raises(EtcdUnavailableError):
            store.get("before")  # linearizable: no answer without quorum, not a stale one
        with pytest.raises(EtcdUnavailableError):
            store.wait(["never"], timeout=1)
    finally:
        for m in gone:
            m.sigcont()
    store.set_timeout(20)
    assert store.get("before") == b"1"
    # The multi_set's first transaction either fully applied or not at all, read at one revision
    # (list_keys: one range request). Key by key would race it: the request a stopped member had
    # buffered is served when it resumes, so the transaction may land between two reads (CI saw
    # m0 missing and m1..m126 present that way): late, as a write that failed with
    # EtcdUnavailableError may be (its outcome is unknown, README), but whole.
    first = {f"m{i}" for i in range(127)}
    present = first & set(store.list_keys())
    assert present in (first, set()), sorted(present)[:5]
    store.close()


def test_a_waiter_moves_on_when_its_watch_member_dies(healthy):
    cluster = healthy
    victim = cluster.members[1]
    others = [m.client_url for m in cluster.members if m is not victim]
    prefix = _prefix()
    waiter = EtcdStore([victim.client_url] + others, prefix=prefix, timeout=20)
    writer = EtcdStore(others, prefix=prefix, timeout=20)
    got: list[bytes] = []
    opened = threading.Event()
    real_watch = waiter.client.watch

    def watch(*args, **kwargs):
        w = real_watch(*args, **kwargs)
        opened.set()
        return w

    waiter.client.watch = watch  # type: ignore[method-assign]
    t = threading.Thread(target=lambda: got.append(waiter.get("k")))
    t.start()
    assert opened.wait(10)  # the waiter's watch is open on the victim
    victim.kill()
    writer.set("k", "after-kill")
    t.join(15)
    assert got == [b"after-kill"]
    waiter.close()
    writer.close()
