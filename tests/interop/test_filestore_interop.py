"""FileStore interop with torch 2.13: torch's FileStore and ours on one file, both directions.

The other side always runs in its own process (a ``test_filestore_worker.py``
worker, started with ``sys.executable``, which has torch in the interop venv);
the test process itself uses the opposite library in-process. One worker per
library is shared by the whole module because importing torch costs a second.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from rdzv_store import FileStore, PrefixStore, StoreTimeoutError, filelog

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.interop

import torch.distributed as dist  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "filestore_interop_worker", Path(__file__).resolve().parent.parent / "test_filestore_worker.py"
)
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
Peer = worker.Peer

OTHER = {"torch": "ours", "ours": "torch"}


@pytest.fixture(scope="module")
def peers():
    started = {lib: Peer(sys.executable) for lib in ("torch", "ours")}
    try:
        for peer in started.values():
            assert peer.pid  # both ready
        yield started
    finally:
        for peer in started.values():
            peer.stop()


def local(lib: str, path: str, world_size: int = -1):
    """A store of ``lib`` in this process."""
    if lib == "torch":
        return dist.FileStore(path, world_size)
    return FileStore(path, world_size)


def release(store) -> None:
    if isinstance(store, FileStore):
        store.close()
    # torch's destructor runs when the last reference goes: the caller drops its own.


def short_timeout(lib: str, seconds: float):
    return timedelta(seconds=seconds) if lib == "torch" else seconds


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "shared")


# -- values written by one, read by the other ------------------------------------------------------
@pytest.mark.parametrize("writer", ["torch", "ours"])
def test_writes_of_one_are_read_by_the_other(peers, path, writer):
    reader_lib = OTHER[writer]
    peer = peers[writer]
    h = peer.open(writer, path)
    reader = local(reader_lib, path)

    peer.call("set", h, "k", "v\x00\xff")
    assert reader.get("k") == b"v\x00\xff"
    assert peer.call("add", h, "cnt", 5) == 5
    assert reader.add("cnt", 2) == 7  # a read-modify-write on top of the other's record
    assert peer.call("add", h, "cnt", -10) == -3
    assert reader.get("cnt") == b"-3"
    assert peer.call("compare_set", h, "cas", "", "first") == "first"
    assert reader.compare_set("cas", "first", "second") == b"second"
    assert peer.call("compare_set", h, "cas", "first", "third") == "second"
    peer.call("multi_set", h, ["m1", "m2"], ["x", "y"])
    assert reader.multi_get(["m1", "m2"]) == [b"x", b"y"]
    peer.call("append", h, "ap", "AB")
    peer.call("append", h, "ap", "CD")
    reader.append("ap", "EF")
    assert peer.call("get", h, "ap") == "ABCDEF"
    assert peer.call("delete_key", h, "m1") is True
    assert not reader.check(["m1"]) and reader.check(["m2"])
    reader.set("gone", "1")
    assert peer.call("check", h, ["gone"]) is True
    reader.delete_key("gone")
    assert peer.call("check", h, ["gone"]) is False
    # The same raw keys, the same count (refcount/ included) on both sides.
    assert reader.num_keys() == peer.call("num_keys", h) == 6
    user = ["ap", "cas", "cnt", "k", "m2"]
    ours_listed = reader.list_keys() if reader_lib == "ours" else peer.call("list_keys", h)
    assert sorted(ours_listed) == user  # torch's own list adds 'efcount/' (documented difference)
    peer.call("close", h)
    release(reader)
    del reader


def test_prefix_store_keys_agree(peers, path):
    theirs = dist.PrefixStore("job", dist.FileStore(path, -1))
    ours = PrefixStore("job", FileStore(path))
    theirs.set("a", "1")
    ours.set("b", "2")
    assert ours.get("a") == b"1" and theirs.get("b") == b"2"
    assert sorted(ours.list_keys()) == ["a", "b"]
    assert sorted(theirs.list_keys()) == ["a", "b"]  # torch's PrefixStore filters the mangled keys
    ours.underlying_store.close()


def test_torch_rendezvous_file_url_shares_the_store(path):
    theirs, rank, world_size = next(dist.rendezvous(f"file://{path}", rank=0, world_size=1))
    assert (rank, world_size) == (0, 1)
    ours = FileStore(path)
    ours.set("from-ours", "1")
    assert theirs.get("from-ours") == b"1"
    theirs.set("from-torch", "2")
    assert ours.get("from-torch") == b"2"
    ours.close()


# -- blocking ------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocked", ["torch", "ours"])
def test_get_blocks_until_the_other_writes(peers, path, blocked):
    peer = peers[blocked]
    h = peer.open(blocked, path)
    writer = local(OTHER[blocked], path)
    latencies = []
    for i in range(3):
        peer.send("get_notify", h, f"k{i}")
        assert "started" in peer.recv()
        assert peer.poll_line(0.05) is None  # really blocked
        writer.set(f"k{i}", f"v{i}")
        written = time.monotonic()
        reply = peer.result()
        assert reply["value"] == f"v{i}"
        latencies.append(reply["t"] - written)
    print(f"{blocked} woken by {OTHER[blocked]}: median {statistics.median(latencies) * 1e3:.2f} ms")
    assert max(latencies) < 0.5
    peer.call("close", h)
    release(writer)
    del writer


def test_wait_times_out_then_succeeds_across_libraries(peers, path):
    peer = peers["torch"]
    h = peer.open("torch", path)
    ours = FileStore(path)
    with pytest.raises(StoreTimeoutError, match="keys: never"):
        ours.wait(["never"], 0.05)
    peer.call("set", h, "never", "now")
    ours.wait(["never"], 1.0)
    peer.send("wait", h, ["late"], 10.0)
    assert peer.poll_line(0.05) is None
    ours.set("late", "1")
    assert peer.result() is None
    peer.call("close", h)
    ours.close()


# -- concurrency ---------------------------------------------------------------------------------
def test_concurrent_adds_from_torch_and_ours_total_correctly(peers, path):
    per_side = 400
    ours = FileStore(path)
    handles = {lib: peer.open(lib, path) for lib, peer in peers.items()}
    for lib, peer in peers.items():
        peer.send("adds", handles[lib], "cnt", per_side, "go")  # both start together
    deadline = time.monotonic() + 30
    while not (ours.check(["go"]) and ours.get("go") == b"2"):
        assert time.monotonic() < deadline, "workers did not reach the start line"
        time.sleep(0.001)
    ours.set("go/go", "1")
    mine = [ours.add("cnt", 1) for _ in range(per_side)]
    lasts = [peers[lib].result(60) for lib in handles]
    total = 3 * per_side
    assert ours.get("cnt") == str(total).encode() and max(lasts + mine) == total
    values = [int(v) for k, v in filelog.decode(Path(path).read_bytes())[0] if k == b"/cnt"]
    assert values == list(range(1, total + 1))  # every add saw every earlier one
    for lib, peer in peers.items():
        peer.call("close", handles[lib])
    ours.close()


# -- lifecycle -----------------------------------------------------------------------------------
@pytest.mark.parametrize("first", ["torch", "ours"])
def test_last_close_removes_the_file_whichever_library(peers, path, first):
    """world_size 2: the file goes when the second user leaves, whoever that is."""
    last = OTHER[first]
    h_first = peers[first].open(first, path, 2)
    h_last = peers[last].open(last, path, 2)
    assert filelog.decode(Path(path).read_bytes())[0][-1] == (b"refcount/", b"2")
    peers[first].call("close", h_first)
    assert os.path.exists(path)
    state: dict[bytes, bytes] = {}
    filelog.apply(state, filelog.decode(Path(path).read_bytes())[0])
    assert state[b"refcount/"] == b"1" and state[b"cleanup/"] == b"1"
    peers[last].call("close", h_last)
    assert not os.path.exists(path)


def test_mixed_refcount_in_one_process(path):
    theirs = dist.FileStore(path, 3)
    ours = FileStore(path, 3)
    clone = ours.clone()
    theirs.set("k", "v")
    ours.close()
    del theirs  # torch's destructor: cleanup 2, refcount 1
    assert os.path.exists(path) and clone.get("k") == b"v"
    clone.close()  # cleanup 3 >= 3, refcount 0
    assert not os.path.exists(path)


# -- files we repaired or compacted are valid torch files ------------------------------------------
def test_torch_reads_a_file_after_we_cut_a_torn_record(peers, path):
    ours = FileStore(path)
    ours.set("k", "v")
    with open(path, "ab") as f:
        f.write(filelog.encode(b"/t", b"value")[:7])  # torch alone would spin on this forever
    ours.set("t", "whole")  # cuts the torn record, then appends
    h = peers["torch"].open("torch", path)
    assert peers["torch"].call("get", h, "t", timeout=20) == "whole"
    peers["torch"].call("close", h)
    ours.close()


def test_torch_opens_a_compacted_file(peers, path):
    ours = FileStore(path, 2)
    for i in range(100):
        ours.set("hot", str(i))
    ours.delete_key("hot")
    ours.set("kept", "yes")
    ours.compact()  # no torch process has the file open
    h = peers["torch"].open("torch", path, 2)
    assert peers["torch"].call("get", h, "kept") == "yes"
    assert peers["torch"].call("check", h, ["hot"]) is False
    assert peers["torch"].call("num_keys", h) == ours.num_keys() == 2
    peers["torch"].call("close", h)
    ours.close()
    assert not os.path.exists(path)
