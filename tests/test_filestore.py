"""FileStore without torch: the record codec, the file format, semantics, lifecycle,
processes, torn records and compaction.

Other processes are ``test_filestore_worker.py`` workers driven over pipes;
every wait has a deadline and every worker is reaped by the ``spawn`` fixture.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_filestore_worker import Peer

from rdzv_store import FileStore, PrefixStore, StoreError, StoreTimeoutError, filelog
from rdzv_store import filestore as filestore_module


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def store(path: str):
    s = FileStore(path)
    yield s
    s.close()


@pytest.fixture
def spawn():
    peers: list[Peer] = []

    def make() -> Peer:
        peer = Peer()
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


def replay(path: str) -> tuple[dict[bytes, bytes], int, int]:
    """(state, bytes of complete records, file size) of a store file, as torch would rebuild it."""
    data = Path(path).read_bytes()
    records, end = filelog.decode(data)
    state: dict[bytes, bytes] = {}
    filelog.apply(state, records)
    return state, end, len(data)


def records_of(path: str) -> list[tuple[bytes, bytes]]:
    return filelog.decode(Path(path).read_bytes())[0]


def raw_append(path: str, data: bytes) -> None:
    """Write bytes at the end of the file under LOCK_EX, as a (possibly dying) writer would."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


# -- the record codec (sans-I/O) ---------------------------------------------------------------
keys = st.binary(max_size=24)
values = st.binary(max_size=64)
record_lists = st.lists(st.tuples(keys, values), max_size=12)


@given(record_lists)
def test_codec_roundtrip(records):
    data = filelog.encode_many(records)
    assert filelog.decode(data) == (records, len(data))
    assert len(data) == sum(8 + len(k) + len(v) for k, v in records)


@given(record_lists, st.data())
def test_codec_stops_at_an_incomplete_record(records, data):
    blob = filelog.encode_many(records)
    cut = data.draw(st.integers(0, len(blob)))
    decoded, end = filelog.decode(blob[:cut])
    boundaries = [0]
    for k, v in records:
        boundaries.append(boundaries[-1] + 8 + len(k) + len(v))
    complete = max(i for i, b in enumerate(boundaries) if b <= cut)
    assert decoded == records[:complete]  # nothing of the torn record is read as data
    assert end == boundaries[complete]  # and the reader does not move past its start
    size = filelog.next_record_size(blob[:cut], end)
    if size is not None:
        assert size == boundaries[complete + 1] - boundaries[complete]


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([b"/a", b"/b", b"refcount/", b"/-a", b""]), values)))
def test_replay_matches_a_dict_and_snapshot_replays_to_the_same(ops):
    model: dict[bytes, bytes] = {}
    records = []
    for delete, key, value in ops:
        if delete:
            records.append((filelog.tombstone(key), b""))
            model.pop(key, None)
        else:
            records.append((key, value))
            model[key] = value
    cache: dict[bytes, bytes] = {}
    filelog.apply(cache, filelog.decode(filelog.encode_many(records))[0])
    assert cache == model
    again: dict[bytes, bytes] = {}
    filelog.apply(again, filelog.decode(filelog.snapshot(cache))[0])
    assert again == model


def test_codec_details(monkeypatch):
    assert filelog.encode(b"/k", b"v") == b"\x02\x00\x00\x00/k\x01\x00\x00\x00v"
    assert filelog.user_key(b"k") == b"/k" and filelog.tombstone(b"/k") == b"-/k"
    # The compaction mark deletes a key that never exists: a no-op for every replay, torch's too.
    cache = {b"compacted": b"x", b"/compacted/": b"y"}
    filelog.apply(cache, filelog.decode(filelog.COMPACTED_RECORD)[0])
    assert cache == {b"compacted": b"x", b"/compacted/": b"y"}
    monkeypatch.setattr(filelog, "MAX_FIELD", 3)
    with pytest.raises(ValueError, match="at most 3 bytes"):
        filelog.encode(b"/key", b"")


# -- the file is torch's -----------------------------------------------------------------------
# store-semantics.md section 7.2: the file torch 2.13 wrote for a fixed sequence of calls.
TORCH_HEXDUMP = """
0900 0000 7265 6663 6f75 6e74 2f01 0000 0031 0500 0000 2f6b 6579 3006 0000 0076
616c 7565 3004 0000 002f 636e 7401 0000 0035 0400 0000 2f63 6e74 0100 0000 3705
0000 002f 6b65 7930 0200 0000 7631 0500 0000 2f6e 6577 6b02 0000 006e 7606 0000
002d 2f6b 6579 3000 0000 000d 0000 002d 2f6e 6f6e 6578 6973 7465 6e74 0000 0000
0400 0000 2f62 696e 0300 0000 0001 ff05 0000 002f 6b65 7930 0200 0000 4142 0500
0000 2f6b 6579 3004 0000 0041 4243 4403 0000 002f 6d31 0100 0000 7803 0000 002f
6d32 0100 0000 7909 0000 0072 6566 636f 756e 742f 0100 0000 3208 0000 0063 6c65
616e 7570 2f01 0000 0031 0900 0000 7265 6663 6f75 6e74 2f01 0000 0031
"""


def test_file_bytes_match_torch(path):
    expected = bytes.fromhex("".join(TORCH_HEXDUMP.split()))
    # The one intended difference: deleting a key that never existed writes no tombstone.
    tombstone = filelog.encode(b"-/nonexistent", b"")
    assert expected[0x6B:0x80] == tombstone
    expected = expected[:0x6B] + expected[0x80:]

    s = FileStore(path, 2)
    s.set("key0", "value0")
    assert s.add("cnt", 5) == 5 and s.add("cnt", 2) == 7
    assert s.compare_set("key0", "value0", "v1") == b"v1"
    assert s.compare_set("key0", "nope", "zz") == b"v1"
    assert s.compare_set("newk", "", "nv") == b"nv"
    assert s.compare_set("newk2", "x", "nv") == b"x"
    assert s.delete_key("key0") is True
    assert s.delete_key("nonexistent") is False
    s.set("bin", b"\x00\x01\xff")
    s.append("key0", "AB")
    s.append("key0", "CD")
    s.multi_set(["m1", "m2"], ["x", "y"])
    with pytest.raises(ValueError, match="bin"):
        s.add("bin", 1)
    s2 = FileStore(path, 2)
    s2.close()
    assert Path(path).read_bytes() == expected
    assert s.num_keys() == 8  # torch's count: 6 user keys + refcount/ + cleanup/
    assert sorted(s.list_keys()) == ["bin", "cnt", "key0", "m1", "m2", "newk"]
    s.close()  # cleanup/ = 2, refcount/ = 0, world_size 2: the file goes
    assert not os.path.exists(path)


# -- semantics ---------------------------------------------------------------------------------
def test_set_get_and_key_forms(store, path):
    store.set("k", "v")
    assert store.get("k") == b"v"
    store.set(b"k", bytearray(b"w"))
    assert store.get("k") == b"w"
    store.set("", b"")
    store.set("a\0b", b"\x00\xff")
    assert store.get("") == b"" and store.get(b"a\0b") == b"\x00\xff"
    assert replay(path)[0][b"/k"] == b"w"
    with pytest.raises(TypeError):
        store.set(1, "v")  # type: ignore[arg-type]


def test_add(store, path):
    assert store.add("c", 3) == 3
    assert store.add("c", -5) == -2
    assert store.get("c") == b"-2"
    store.set("e", "")
    assert store.add("e", 1) == 1  # empty counts as 0, as in torch's FileStore
    store.set("p", " +12abc")
    assert store.add("p", 1) == 13  # std::stoll prefix parsing
    store.add("w", 2**63 - 1)
    assert store.add("w", 1) == -(2**63)  # wraps like int64
    store.set("bad", "v1b")
    size = os.path.getsize(path)
    with pytest.raises(ValueError, match="bad"):
        store.add("bad", 1)
    assert os.path.getsize(path) == size  # a failed add writes nothing
    assert store.get("bad") == b"v1b"
    with pytest.raises(TypeError):
        store.add("c", 2**63)


def test_compare_set_follows_torch(store):
    assert store.compare_set("m", "", "d") == b"d"  # missing, expected "" -> created
    assert store.compare_set("n", "x", "d") == b"x"  # missing, expected non-empty -> "lies"
    assert not store.check(["n"])
    assert store.compare_set("m", "d", "e") == b"e"
    assert store.compare_set("m", "zz", "f") == b"e"
    store.set("empty", "")
    assert store.compare_set("empty", "", "now") == b"now"
    assert store.compare_set("empty", "", "again") == b"now"


def test_delete_key_reports_existence(store, path):
    store.set("k", "v")
    assert store.delete_key("k") is True
    assert store.delete_key("k") is False
    size = os.path.getsize(path)
    assert store.delete_key("never") is False
    assert os.path.getsize(path) == size  # nothing to delete, nothing written
    assert records_of(path)[-1] == (b"-/k", b"")
    assert not store.check(["k"])
    store.set("-k", "1")  # user keys cannot collide with tombstones
    assert store.get("-k") == b"1" and store.delete_key("-k")


def test_counts_and_listing(path):
    s = FileStore(path)
    assert s.num_keys() == 1  # refcount/
    s.set("a", "1")
    s.set("b/c", "2")
    other = s.clone()
    other.close()
    assert s.num_keys() == 4  # + cleanup/, as in torch
    assert sorted(s.list_keys()) == ["a", "b/c"]  # internal keys are skipped, not mangled
    raw_append(path, filelog.encode(b"odd-raw-key", b"x"))  # neither user nor tombstone
    assert sorted(s.list_keys()) == ["a", "b/c"]
    s.close()


def test_multi_set_multi_get_append_check_wait(store, path):
    size = os.path.getsize(path)
    store.multi_set(["a", "b", "a"], ["1", "2", "3"])
    written = filelog.encode_many([(b"/a", b"1"), (b"/b", b"2"), (b"/a", b"3")])
    assert Path(path).read_bytes()[size:] == written  # all records, in order, in one append
    assert store.multi_get(["a", "b"]) == [b"3", b"2"]
    assert store.multi_get([]) == []
    store.multi_set([], [])
    with pytest.raises(ValueError):
        store.multi_set(["a"], [])
    store.append("ap", "x")
    store.append("ap", b"yz")
    assert store.get("ap") == b"xyz"
    assert store.check([]) and store.check(["a", "b"]) and not store.check(["a", "zz"])
    store.wait([])
    store.wait(["a", "b"], 0)


def test_api_surface(store):
    assert store.has_extended_api() is False
    with pytest.raises(NotImplementedError, match="queue support is not implemented."):
        store.queue_push("q", "v")
    with pytest.raises(NotImplementedError):
        store.queue_pop("q", block=False)
    with pytest.raises(NotImplementedError):
        store.queue_len("q")
    assert store.timeout.total_seconds() == 300
    assert "FileStore(path=" in repr(store)


def test_timeouts_are_exact_and_name_the_missing_keys(store, path):
    store.set("present", "1")
    for timeout in (0, -1.0):
        start = time.monotonic()
        with pytest.raises(StoreTimeoutError):
            store.wait(["missing"], timeout)  # <= 0: check once, do not wait
        assert time.monotonic() - start < 0.1
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError) as info:
        store.wait(["present", "m1", "m2"], 0.2)
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 0.6
    message = str(info.value)
    assert "wait timeout after 200ms" in message and "keys: m1, m2" in message and path in message
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, RuntimeError)
    store.set_timeout(0.1)
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="keys: nothing"):
        store.get("nothing")
    with pytest.raises(StoreTimeoutError, match="keys: m3"):
        store.multi_get(["present", "m3"])
    assert time.monotonic() - start < 0.6


def test_prefix_store_over_file_store(store, path):
    p = PrefixStore("pfx", store)
    p.set("k", "v")
    assert p.add("n", 2) == 2
    assert replay(path)[0][b"/pfx/k"] == b"v"
    assert sorted(p.list_keys()) == ["k", "n"]
    with pytest.raises(StoreTimeoutError, match="keys: pfx/missing"):
        p.wait(["missing"], 0.01)


def test_path_forms(tmp_path, monkeypatch):
    s = FileStore(os.fsencode(tmp_path / "b"))
    assert s.path == str(tmp_path / "b")
    t = FileStore(tmp_path / "p", world_size=1)
    assert t.path == str(tmp_path / "p")
    monkeypatch.chdir(tmp_path)
    r = FileStore("rel")
    monkeypatch.chdir("/")
    r.set("k", "v")  # resolved once, at construction
    assert r.path == "rel" and replay(str(tmp_path / "rel"))[0][b"/k"] == b"v"
    for bad in (1, None):
        with pytest.raises(TypeError):
            FileStore(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FileStore(str(tmp_path / "x"), "2")  # type: ignore[arg-type]
    for x in (s, t, r):
        x.close()


def test_missing_directory_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(StoreError, match="does not exist") as info:
        FileStore(str(tmp_path / "no" / "such" / "dir" / "store"))
    assert time.monotonic() - start < 1.0  # torch: 300 s
    assert str(tmp_path / "no" / "such" / "dir") in str(info.value)
    with pytest.raises(StoreError, match="Is a directory"):
        FileStore(str(tmp_path))


def test_clone_close_and_context_manager(path):
    with FileStore(path, 1) as s:
        s.set_timeout(7.5)
        c = s.clone()
        assert c.timeout.total_seconds() == 7.5 and c.path == s.path
        assert replay(path)[0][b"refcount/"] == b"2"
        c.set("from-clone", "1")
        assert s.get("from-clone") == b"1"
        c.close()
        c.close()  # idempotent
        assert c.closed
        with pytest.raises(StoreError, match="closed"):
            c.get("from-clone")
    assert not os.path.exists(path)  # world_size 1: the last close removed it
    s.close()


def test_file_removed_or_replaced_behind_our_back(tmp_path):
    path = str(tmp_path / "gone")
    s = FileStore(path)
    s.set("k", "v")
    os.unlink(path)
    with pytest.raises(StoreError, match="removed while the store was open"):
        s.set("k", "w")  # torch silently recreates an empty file here
    with pytest.raises(StoreError, match="removed"):
        s.get("k")
    s.close()  # nothing to clean up; does not raise
    assert not os.path.exists(path)

    path = str(tmp_path / "replaced")
    s = FileStore(path)
    os.unlink(path)
    Path(path).write_bytes(filelog.encode(b"/x", b"1"))
    with pytest.raises(StoreError, match="replaced by a different file"):
        s.get("x")
    s.close()
    assert replay(path)[0] == {b"/x": b"1"}  # close leaves a stranger's file alone


# -- lifecycle: refcount/, cleanup/ and deletion at the last close -------------------------------
def test_refcount_and_delete_at_last_close(path):
    a = FileStore(path, 1)
    b = FileStore(path, 1)
    assert replay(path)[0][b"refcount/"] == b"2"
    a.close()
    state = replay(path)[0]
    assert state[b"refcount/"] == b"1" and state[b"cleanup/"] == b"1"
    assert records_of(path)[-2:] == [(b"cleanup/", b"1"), (b"refcount/", b"1")]
    b.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("world_size, removed_after", [(2, 2), (0, 1), (-1, None)])
def test_world_size_rule(tmp_path, world_size, removed_after):
    path = str(tmp_path / f"ws{world_size}")
    for closed in (1, 2, 3):
        FileStore(path, world_size).close()  # created and destroyed one after the other
        gone = removed_after is not None and closed >= removed_after
        assert os.path.exists(path) != gone, (closed, world_size)
        if gone:
            break


def test_garbage_collection_and_interpreter_exit_release(tmp_path):
    path = str(tmp_path / "gc")
    s = FileStore(path, 1)
    del s
    gc.collect()
    assert not os.path.exists(path)
    # A store in a module global is released at interpreter exit (torch never releases it).
    path = str(tmp_path / "global")
    code = "from rdzv_store import FileStore\nSTORE = FileStore(%r, 1)\nSTORE.set('k', 'v')\n" % path
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert not os.path.exists(path)


def test_killed_process_keeps_its_reference(path, spawn):
    peer = spawn()
    peer.open("ours", path, 1)
    s = FileStore(path, 1)
    peer.proc.kill()
    peer.proc.wait(10)
    s.close()
    assert replay(path)[0][b"refcount/"] == b"1"  # the dead peer's reference stays


def test_forked_child_does_not_count(path):
    s = FileStore(path, 1)
    s.set("before", "1")
    pid = os.fork()
    if pid == 0:  # child: use the inherited instance, then close it
        code = 1
        try:
            s.set("child", "1")
            code = 0 if s.get("before") == b"1" else 2
            s.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.get("child") == b"1"
    assert replay(path)[0][b"refcount/"] == b"1" and b"cleanup/" not in replay(path)[0]
    s.close()
    assert not os.path.exists(path)


# -- processes and threads ---------------------------------------------------------------------
def test_adds_from_several_processes_total_correctly(path, spawn):
    per_peer, peers = 300, [spawn() for _ in range(3)]
    s = FileStore(path)
    for peer in peers:
        handle = peer.open("ours", path)
        peer.send("adds", handle, "cnt", per_peer, "go")
    wait_until(lambda: s.check(["go"]) and s.get("go") == b"3", what="peers at the start line")
    s.set("go/go", "1")
    mine = [s.add("cnt", 1) for _ in range(per_peer)]
    lasts = [peer.result(60) for peer in peers]
    total = per_peer * (len(peers) + 1)
    assert s.get("cnt") == str(total).encode()
    assert max(lasts + mine) == total
    # Every add appended the next total: the /cnt records are exactly 1..total, in order.
    assert [int(v) for k, v in records_of(path) if k == b"/cnt"] == list(range(1, total + 1))
    s.close()


def test_blocking_get_woken_by_another_process(path, spawn):
    peer = spawn()
    handle = peer.open("ours", path)
    s = FileStore(path)
    latencies = []
    for i in range(5):
        peer.send("get_notify", handle, f"k{i}")
        assert "started" in peer.recv()
        assert peer.poll_line(0.05) is None  # really blocked
        s.set(f"k{i}", f"v{i}")
        written = time.monotonic()
        reply = peer.result()
        assert reply["value"] == f"v{i}"
        latencies.append(reply["t"] - written)
    print(f"wake-up latency, ms: median {statistics.median(latencies) * 1e3:.2f}, max {max(latencies) * 1e3:.2f}")
    assert max(latencies) < 0.5  # a few ms when the machine is quiet; generous for CI
    s.close()


def test_get_woken_by_another_thread_and_instance(path):
    a, b = FileStore(path), FileStore(path)
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(a.get("later")))
    thread.start()
    b.set("later", "x")
    thread.join(10)
    assert got == [b"x"]
    a.close()
    b.close()


def test_threads_share_one_instance(path):
    a, b = FileStore(path), FileStore(path)
    threads = [threading.Thread(target=lambda s=s: [s.add("n", 1) for _ in range(200)]) for s in (a, a, a, b, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert a.get("n") == b"1000" and b.get("n") == b"1000"
    assert [int(v) for k, v in records_of(path) if k == b"/n"] == list(range(1, 1001))
    a.close()
    b.close()


@pytest.mark.parametrize("held, blocked", [(fcntl.LOCK_EX, {"set", "check"}), (fcntl.LOCK_SH, {"set"})])
def test_takes_torchs_flock(path, held, blocked):
    """Writes need LOCK_EX and reads LOCK_SH on the data file itself, as torch takes them."""
    writer, reader = FileStore(path), FileStore(path)  # one each: an instance runs one op at a time
    ops = {"set": lambda: writer.set("k", "v"), "check": lambda: reader.check(["k"])}
    fd = os.open(path, os.O_RDONLY)
    threads = {}
    try:
        fcntl.flock(fd, held)
        for name, op in ops.items():
            threads[name] = threading.Thread(target=op)
            threads[name].start()
            threads[name].join(0.2 if name in blocked else 10)
            assert threads[name].is_alive() == (name in blocked), name
    finally:
        os.close(fd)  # releases the lock
    for thread in threads.values():
        thread.join(10)
        assert not thread.is_alive()
    writer.close()
    reader.close()


# -- torn records ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "torn",
    [
        filelog.encode(b"/t", b"value")[:3],  # part of the key length
        filelog.encode(b"/t", b"value")[:5],  # part of the key (torch's "u32 5, /pa" case)
        filelog.encode(b"/t", b"value")[:10],  # the key, part of the value length
        filelog.encode(b"/t", b"value")[:-2],  # the value, short by two bytes
    ],
    ids=["in-key-length", "in-key", "in-value-length", "in-value"],
)
def test_torn_tail(path, torn):
    reader = FileStore(path)
    reader.set("k", "v")
    boundary = os.path.getsize(path)
    raw_append(path, torn)  # a writer killed in the middle of a record
    cpu = time.thread_time()
    with pytest.raises(StoreTimeoutError):
        reader.set_timeout(0.3)
        reader.get("t")
    assert time.thread_time() - cpu < 0.15  # polling, not spinning (torch: 100% CPU forever)
    assert reader._log.pos == boundary  # stopped at the torn record, not past it
    assert not reader.check(["t"]) and reader.num_keys() == 2 and reader.get("k") == b"v"
    # The next writer of ours cuts the torn record off before appending.
    writer = FileStore(path)
    assert os.path.getsize(path) == boundary + len(filelog.encode(b"refcount/", b"2"))
    writer.set("t", "whole")
    assert reader.get("t") == b"whole"
    state, end, size = replay(path)
    assert end == size and state[b"/t"] == b"whole"
    reader.close()
    writer.close()


def test_short_write_leaves_no_partial_record(store, path, monkeypatch):
    store.set("k", "v")
    size = os.path.getsize(path)
    real_write = os.write

    def failing_write(fd, data):
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filestore_module.os, "write", failing_write)
    with pytest.raises(StoreError, match="set failed: No space left on device"):
        store.set("big", "x" * 100)
    monkeypatch.undo()
    assert os.path.getsize(path) == size
    store.set("k", "w")
    state, end, size = replay(path)
    assert end == size and state[b"/k"] == b"w" and b"/big" not in state


# -- compaction --------------------------------------------------------------------------------
def test_compact_keeps_state_and_live_instances_follow(path):
    a, b = FileStore(path, 2), FileStore(path, 2)
    for i in range(200):
        a.set("hot", str(i))
        a.add("n", 1)
    a.set("gone", "x")
    a.delete_key("gone")
    before = replay(path)[0]
    old_size = os.path.getsize(path)
    assert b.get("hot") == b"199"
    new_size = a.compact()
    assert new_size == os.path.getsize(path) < old_size / 10
    assert replay(path)[0] == before
    # b holds the old, unlinked file: it notices after locking and moves to the new one.
    assert b.get("hot") == b"199" and b.add("n", 1) == 201
    b.set("from-b", "1")
    assert a.get("from-b") == b"1" and a.num_keys() == b.num_keys() == 4
    a.close()
    b.close()
    assert not os.path.exists(path)  # the refcount survived compaction too


def test_no_write_lost_while_another_process_compacts(path, spawn):
    writer, waiter = spawn(), spawn()
    s = FileStore(path)
    handle = writer.open("ours", path)
    waiting = waiter.open("ours", path)
    waiter.send("get_notify", waiting, "late")
    assert "started" in waiter.recv()
    writer.send("adds", handle, "cnt", 1500, "")
    compactions = 0
    deadline = time.monotonic() + 60
    reply = None
    while reply is None and time.monotonic() < deadline:
        s.add("mine", 1)
        s.compact()
        compactions += 1
        reply = writer.poll_line(0)
    assert reply == {"ok": 1500}, reply
    assert s.get("cnt") == b"1500" and s.get("mine") == str(compactions).encode()
    s.set("late", "here")  # the waiter blocked across all those compactions
    assert waiter.result()["value"] == "here"
    assert compactions > 1
    s.close()


def test_automatic_compaction_bounds_the_file(path):
    auto = FileStore(path, compact_threshold=8192)
    plain = FileStore(path)
    biggest = 0
    for i in range(1000):
        auto.set("heartbeat", f"{i:0100d}")
        plain.add("beats", 1)
        biggest = max(biggest, os.path.getsize(path))
    assert biggest < 3 * 8192
    assert plain.get("heartbeat") == f"{999:0100d}".encode() and auto.get("beats") == b"1000"
    auto.close()
    plain.close()


def test_compaction_arguments(path):
    for bad in (0, -5):
        with pytest.raises(ValueError):
            FileStore(path, compact_threshold=bad)
    with pytest.raises(TypeError):
        FileStore(path, compact_threshold="1k")  # type: ignore[arg-type]
