"""TCPStore interop tier: real torch 2.13 clients and servers against ours (marker ``interop``).

1. A real ``torch.distributed.TCPStore`` client against OUR server (a
   ``python -m rdzv_store serve`` child process, and an in-process
   ``rdzv_store.TCPStore(is_master=True)``) for every operation, with keys
   shared between torch and our clients; world_size/wait_for_workers in both
   directions; ``init_process_group("gloo", "tcp://...")`` on our server.
2. Our clients (``TCPStore`` and ``AsyncTCPStore``) against a real torch
   server, libuv and legacy backends, for every operation each backend has.
3. Byte level: a torch client's conversation with our server and with
   torch's server, recorded by a relay, gives identical server->client bytes.

``list_keys()`` of a torch client holds the GIL, so it is only ever sent to a
server in another process. Run:
``/root/venv-torch/bin/python -m pytest tests/interop/test_tcpstore_interop.py -m interop -q``.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
from tcp_helpers import (  # noqa: E402
    HOST,
    AsyncFacade,
    RecordingProxy,
    ServerProcess,
    free_listening_socket,
    run_in_thread,
)
from torch.distributed import TCPStore as TorchTCPStore  # noqa: E402

from rdzv_store import AsyncTCPStore, QueueEmptyError, StoreConnectionError, StoreError, StoreTimeoutError, TCPStore  # noqa: E402

pytestmark = pytest.mark.interop

TIMEOUT = timedelta(seconds=5)  # every store in this file: nothing may hang for long
SHORT = timedelta(milliseconds=200)  # for the timeouts we provoke
MS = "200ms"  # SHORT as both libraries print it in their timeout messages
# Store timeout of our clients that must time out in get/multi_get/queue_pop. Longer than SHORT
# because our clients bound *every* reply by the store timeout, not only the wait step.
IMPATIENT = timedelta(milliseconds=500)
BLOCKED = 0.2  # how long a call must stay blocked before we release it
MiB = 1 << 20
LARGE = {
    "empty": b"",
    "binary": bytes(range(256)) * 3,
    "1MiB": random.Random(1).randbytes(MiB),
    "8MiB": random.Random(8).randbytes(8 * MiB),  # exactly torch libuv's limit, accepted
}


def torch_client(port: int, use_libuv: bool = True, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", TIMEOUT)
    return TorchTCPStore(HOST, port, is_master=False, use_libuv=use_libuv, **kwargs)


def flushed_set(store: Any, key: str, value: Any) -> None:
    """SET has no reply and nothing orders it across connections: a round trip on the
    writer's own connection makes it visible to every other client."""
    store.set(key, value)
    assert store.check([key])


def assert_blocked(call: Any) -> None:
    assert not call.done.wait(BLOCKED), "returned before it was released"


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def server_proc() -> Iterator[ServerProcess]:
    """Our server in a child process; SIGTERM at teardown must end it with status 0."""
    server = ServerProcess()
    try:
        yield server
    finally:
        rc = server.stop()
    assert rc == 0, f"server exited with {rc} on SIGTERM; stderr: {server.stderr()}"


@pytest.fixture(params=["subprocess", "in-process"])
def our_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A fresh server of ours: a child process, or ``TCPStore(is_master=True)`` in this process."""
    if request.param == "subprocess":
        server = ServerProcess()
        try:
            yield server.port
        finally:
            rc = server.stop()
        assert rc == 0, server.stderr()
    else:
        master = TCPStore(HOST, 0, is_master=True, timeout=TIMEOUT)
        try:
            yield master.port
        finally:
            master.close()


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Register stores to release at teardown (ours closed, torch's dropped), also on failure."""
    stores: list[Any] = []

    def register(store: Any) -> Any:
        stores.append(store)
        return store

    yield register
    for store in reversed(stores):
        if hasattr(store, "close"):
            store.close()
    stores.clear()
    gc.collect()  # torch stores close their sockets (and stop their servers) when collected


@pytest.fixture(params=[True, False], ids=["libuv", "legacy"])
def torch_server(request: pytest.FixtureRequest) -> Iterator[tuple[Any, bool]]:
    """A real torch 2.13 TCPStore server (and its own client) with the given backend."""
    use_libuv: bool = request.param
    server = TorchTCPStore(HOST, 0, is_master=True, timeout=TIMEOUT, use_libuv=use_libuv)
    assert server.libuvBackend is use_libuv
    yield server, use_libuv
    del server
    gc.collect()


@pytest.fixture(params=["sync", "async"])
def make_ours(request: pytest.FixtureRequest, closing: Callable[[Any], Any]) -> Callable[..., Any]:
    """Factory of our clients: ``TCPStore``, or ``AsyncTCPStore`` behind a blocking facade."""

    def make(port: int, use_libuv: bool = True, timeout: Any = TIMEOUT) -> Any:
        if request.param == "sync":
            return closing(TCPStore(HOST, port, timeout=timeout, use_libuv=use_libuv))
        return closing(AsyncFacade(HOST, port, timeout=timeout, use_libuv=use_libuv))

    return make


# == 1. torch client -> our server ================================================================


@pytest.mark.parametrize("setter", ["torch", "ours"])
def test_torch_set_get_and_get_blocks_until_another_client_sets(our_port: int, closing: Any, setter: str) -> None:
    t = closing(torch_client(our_port))
    writer = closing(torch_client(our_port) if setter == "torch" else TCPStore(HOST, our_port, timeout=TIMEOUT))

    t.set("k1", "v1")
    assert t.get("k1") == b"v1"
    t.set("k1", b"v2")  # overwrite
    assert t.get("k1") == b"v2"
    assert writer.get("k1") == b"v2"  # written by torch, read by the other client

    call = run_in_thread(t.get, "late")
    assert_blocked(call)
    writer.set("late", b"\x00late")
    assert call.result(5) == b"\x00late"


def test_torch_add_shares_counters_with_ours(our_port: int, closing: Any) -> None:
    t = closing(torch_client(our_port))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    assert t.add("cnt", 5) == 5  # missing key starts at 0
    assert ours.add("cnt", -7) == -2
    assert t.add("cnt", 0) == -2
    assert t.get("cnt") == ours.get("cnt") == b"-2"
    # The server parses like torch's (stoll): leading blanks, trailing junk, int64 wrap-around.
    flushed_set(ours, "junk", " 7x")
    assert t.add("junk", 1) == 8
    t.set("big", str(2**63 - 1))
    assert t.add("big", 1) == -(2**63)
    assert ours.get("big") == str(-(2**63)).encode()


def test_torch_compare_set_four_cases(our_port: int, closing: Any) -> None:
    t = closing(torch_client(our_port))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    # missing, expected empty: created
    assert t.compare_set("cs1", "", "A") == b"A"
    assert ours.get("cs1") == b"A"
    # missing, expected non-empty: nothing stored, the reply is `expected`
    assert t.compare_set("cs2", "X", "B") == b"X"
    assert not t.check(["cs2"]) and not ours.check(["cs2"])
    # present and equal: swapped
    assert t.compare_set("cs1", "A", b"\xffC") == b"\xffC"
    assert ours.get("cs1") == b"\xffC"
    # present and different: unchanged, the reply is the current value
    assert t.compare_set("cs1", "nope", "D") == b"\xffC"
    assert ours.get("cs1") == b"\xffC"
    # present-and-empty matches an empty `expected`; a non-empty value does not
    flushed_set(ours, "cs3", b"")
    assert t.compare_set("cs3", "", "E") == b"E"
    assert t.compare_set("cs3", "", "F") == b"E"


def test_torch_check_wait_and_wait_timeout(our_port: int, closing: Any) -> None:
    t = closing(torch_client(our_port))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    assert t.check([])
    assert not t.check(["c1"])
    flushed_set(ours, "c1", "x")
    assert t.check(["c1"])
    assert not t.check(["c1", "c2"])
    t.wait([])
    t.wait(["c1"])

    # WAIT on two keys is released by the second SET only.
    call = run_in_thread(t.wait, ["w1", "w2"])
    ours.set("w1", "1")
    assert_blocked(call)
    ours.set("w2", "2")
    call.result(5)

    # Timeout: torch's own error and message; the connection stays usable (CANCEL_WAIT answered).
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError, match=rf"^wait timeout after {MS}, keys: /nokey1, /c1$"):
        t.wait(["nokey1", "c1"], SHORT)
    assert time.monotonic() - start >= SHORT.total_seconds() * 0.9
    t.set_timeout(SHORT)
    with pytest.raises(dist.DistStoreError, match=rf"^wait timeout after {MS}, keys: /nokey2$"):
        t.get("nokey2")
    t.set_timeout(TIMEOUT)
    t.set("after", "ok")
    assert t.get("after") == b"ok"
    assert t.add("after-cnt", 2) == 2


def test_torch_num_keys_and_delete_key(our_port: int, closing: Any) -> None:
    t = closing(torch_client(our_port))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    assert t.num_keys() == 0
    t.set("a", "1")
    flushed_set(ours, "b", "2")
    assert t.num_keys() == ours.num_keys() == 2
    assert t.delete_key("a") is True
    assert t.delete_key("a") is False
    assert t.delete_key("never") is False
    assert not ours.check(["a"])
    assert ours.delete_key("b") is True
    assert t.num_keys() == 0
    assert not t.check(["b"])


def test_torch_append_mixes_with_ours(our_port: int, closing: Any) -> None:
    t = closing(torch_client(our_port))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    t.append("ap", "x")  # creates
    assert t.check(["ap"])
    ours.append("ap", b"y")
    assert ours.get("ap") == b"xy"
    t.append("ap", b"\xffz")
    assert t.get("ap") == ours.get("ap") == b"xy\xffz"


def test_torch_multi_set_multi_get(our_port: int, closing: Any) -> None:
    t = closing(torch_client(our_port))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    t.multi_set(["m1", "m2"], ["a", b"bb"])
    assert ours.multi_get(["m2", "m1"]) == [b"bb", b"a"]
    ours.multi_set(["m3", "m4"], [b"", b"\x00"])
    assert ours.check(["m3", "m4"])
    assert t.multi_get(["m1", "m3", "m4", "m1"]) == [b"a", b"", b"\x00", b"a"]
    assert t.multi_get([]) == []

    call = run_in_thread(t.multi_get, ["m1", "m5"])  # waits for every key first
    assert_blocked(call)
    ours.set("m5", "five")
    assert call.result(5) == [b"a", b"five"]


def test_torch_list_keys_filters_prefix(server_proc: ServerProcess, closing: Any) -> None:
    """Subprocess server only: torch's list_keys() holds the GIL while it waits for the reply."""
    port = server_proc.port
    t = closing(torch_client(port))
    ours = closing(TCPStore(HOST, port, timeout=TIMEOUT))
    closing(torch_client(port, world_size=2))  # a worker: ADD "init/" (unprefixed), returns at once

    t.set("a", "1")
    flushed_set(ours, "dir/b", "2")
    t.queue_push("queue", "q")  # queues are not keys
    assert t.queue_len("queue") == 1
    assert sorted(t.list_keys()) == ["a", "dir/b"]  # "init/" hidden: no "/" prefix
    assert sorted(ours.list_keys()) == ["a", "dir/b"]
    assert t.num_keys() == ours.num_keys() == 3  # but counted
    assert t.delete_key("a")
    assert t.list_keys() == ["dir/b"]


def test_torch_queues(server_proc: ServerProcess, closing: Any) -> None:
    """Subprocess server only: torch 2.13's queue_len(), like list_keys(), holds the GIL."""
    our_port = server_proc.port
    t = closing(torch_client(our_port))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    assert t.queue_len("q") == 0
    t.queue_push("q", "1")
    assert t.queue_len("q") == 1  # a round trip: our push below lands after torch's
    ours.queue_push("q", b"\x002")
    assert ours.queue_len("q") == 2
    assert t.queue_len("q") == 2
    assert t.queue_pop("q", block=False) == b"1"  # FIFO across clients
    assert t.queue_pop("q") == b"\x002"
    with pytest.raises(dist.QueueEmptyError):
        t.queue_pop("q", block=False)
    with pytest.raises(dist.QueueEmptyError):
        t.queue_pop("never", block=False)

    # A blocking pop (WAIT then QUEUE_POP) is woken by a later push from another client.
    call = run_in_thread(t.queue_pop, "q2")
    assert_blocked(call)
    ours.queue_push("q2", "late")
    assert call.result(5) == b"late"
    assert t.queue_len("q2") == 0

    # And the other direction: torch pushes, our blocking pop wakes.
    call = run_in_thread(ours.queue_pop, "q3")
    assert_blocked(call)
    t.queue_push("q3", "from torch")
    assert call.result(5) == b"from torch"

    # Separate namespace: a plain key of the same name is untouched.
    t.set("q", "plain")
    assert t.queue_len("q") == 0 and t.get("q") == b"plain"


def test_torch_barrier_with_ours(our_port: int, closing: Any) -> None:
    t = closing(torch_client(our_port))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    call = run_in_thread(t.barrier, "bar", 2)
    assert_blocked(call)
    ours.barrier("bar", 2)
    call.result(5)
    assert ours.get("bar") == t.get("bar") == b"2"  # the counter is an ordinary key

    call = run_in_thread(ours.barrier, "bar2", 2)  # ours first, torch releases
    assert_blocked(call)
    t.barrier("bar2", 2)
    call.result(5)

    with pytest.raises(dist.DistStoreError, match=rf"^barrier timeout after {MS}, key: lonely$"):
        t.barrier("lonely", 2, SHORT)
    assert t.add("still-usable", 1) == 1


def test_torch_clone(our_port: int, closing: Any) -> None:
    t = torch_client(our_port)
    c = closing(t.clone())
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    c.set("cl", "1")
    assert t.get("cl") == b"1"
    call = run_in_thread(c.get, "cl2")  # the clone blocks on its own connection ...
    assert t.add("cl-cnt", 1) == 1  # ... while the original keeps working
    t.set("cl2", "2")
    assert call.result(5) == b"2"
    del t
    gc.collect()
    assert c.get("cl") == b"1"  # the clone outlives the original
    assert ours.add("cl-cnt", 1) == 2


@pytest.mark.parametrize("name", list(LARGE))
def test_torch_values_empty_binary_large(our_port: int, closing: Any, name: str) -> None:
    value = LARGE[name]
    t = closing(torch_client(our_port))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))

    t.set("from-torch/ключ", value)
    assert ours.get("from-torch/ключ") == value
    ours.set("from-ours", value)
    assert t.get("from-ours") == value
    assert t.multi_get(["from-torch/ключ", "from-ours"]) == [value, value]
    assert t.compare_set("from-ours", value, b"swapped") == b"swapped"


def test_torch_workers_release_our_master(closing: Any) -> None:
    """world_size=3: our master blocks in its constructor until two torch workers ADD "init/"."""
    fd, port = free_listening_socket()  # so the port is known before the constructor returns
    master_call = run_in_thread(
        TCPStore, HOST, port, world_size=3, is_master=True, timeout=TIMEOUT, master_listen_fd=fd
    )
    try:
        closing(torch_client(port, world_size=3))
        assert_blocked(master_call)
        closing(torch_client(port, world_size=3))
    finally:  # whatever happened, the master (and its server thread) is closed at teardown
        master = closing(master_call.result(TIMEOUT.total_seconds() + 5))
    t = closing(torch_client(port))
    assert t.num_keys() == master.num_keys() == 1  # "init/" == 3, hidden from list_keys
    master.set("hello", "workers")
    assert t.get("hello") == b"workers"


@pytest.mark.parametrize("use_libuv", [True, False], ids=["libuv", "legacy"])
def test_our_workers_release_torch_master(closing: Any, use_libuv: bool) -> None:
    fd, port = free_listening_socket()
    master_call = run_in_thread(
        TorchTCPStore, HOST, port, world_size=3, is_master=True, timeout=TIMEOUT, master_listen_fd=fd, use_libuv=use_libuv
    )
    w1 = closing(TCPStore(HOST, port, world_size=3, timeout=TIMEOUT, use_libuv=use_libuv))
    assert_blocked(master_call)
    w2 = closing(TCPStore(HOST, port, world_size=3, timeout=TIMEOUT, use_libuv=use_libuv))
    master = closing(master_call.result(5))
    assert master.num_keys() == w1.num_keys() == 1
    master.set("go", "1")
    assert w2.get("go") == b"1"


@pytest.mark.parametrize("use_libuv", [True, False], ids=["libuv", "legacy"])
def test_torch_master_on_our_port(
    our_port: int, closing: Any, monkeypatch: pytest.MonkeyPatch, use_libuv: bool
) -> None:
    """A torch master cannot take a port our server holds (EADDRINUSE); under torchelastic's
    agent-store rule it becomes a plain client of our server instead."""
    with pytest.raises(dist.DistNetworkError, match="EADDRINUSE|Address already in use"):
        TorchTCPStore(HOST, our_port, is_master=True, timeout=TIMEOUT, use_libuv=use_libuv)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "1")
    monkeypatch.setenv("MASTER_PORT", str(our_port))
    t = closing(TorchTCPStore(HOST, our_port, world_size=2, is_master=True, timeout=TIMEOUT, use_libuv=use_libuv))
    ours = closing(TCPStore(HOST, our_port, timeout=TIMEOUT))
    assert ours.num_keys() == 1  # its ADD "init/" landed; it did not wait for a second worker
    t.set("agent", "store")
    assert ours.get("agent") == b"store"


_GLOO_WORKER = """
import sys
from datetime import timedelta
import torch
import torch.distributed as dist

port, rank, world_size = (int(a) for a in sys.argv[1:4])
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
    timeout=timedelta(seconds=15),
)
t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
dist.all_reduce(t)
print("RESULT", rank, t.tolist(), flush=True)
dist.destroy_process_group()
"""


def test_init_process_group_gloo_on_our_server(server_proc: ServerProcess, tmp_path: Path) -> None:
    """Two ranks, each its own process, rendezvous over our server and all_reduce with gloo.

    With ``tcp://`` torch makes rank 0 host the store; our server already holds the
    port, so the ranks run with torchelastic's agent-store convention
    (``TORCHELASTIC_USE_AGENT_STORE``), under which every rank is a plain client.
    """
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    script = tmp_path / "gloo_worker.py"
    script.write_text(_GLOO_WORKER)
    env = dict(
        os.environ,
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT="0",
        GLOO_SOCKET_IFNAME="lo",
        MASTER_ADDR=HOST,
        MASTER_PORT=str(server_proc.port),
    )
    world_size = 2
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(server_proc.port), str(rank), str(world_size)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            outputs.append((proc.returncode, out, err[-3000:]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for rank, (rc, out, err) in enumerate(outputs):
        assert rc == 0, f"rank {rank} failed: {err}"
        assert f"RESULT {rank} [3.0, 30.0]" in out, (out, err)

    ours = TCPStore(HOST, server_proc.port, timeout=TIMEOUT)
    try:
        keys = ours.list_keys()  # the process group's own keys, e.g. "default_pg/0//cpu//0/1"
        assert len(keys) >= world_size and all(k.startswith("default_pg/") for k in keys), keys
        assert ours.num_keys() > len(keys)  # plus the unprefixed "init/" of the two ranks
    finally:
        ours.close()


# == 2. our clients -> torch server ===============================================================


def test_ours_set_get_against_torch_server(torch_server: tuple[Any, bool], make_ours: Any) -> None:
    server, use_libuv = torch_server
    ours = make_ours(server.port, use_libuv)

    ours.set("k", "v")
    assert ours.get("k") == b"v"
    assert server.get("k") == b"v"  # written by us, read by torch
    flushed_set(server, "t", b"\x00\xfft")
    assert ours.get("t") == b"\x00\xfft"  # written by torch, read by us

    call = run_in_thread(ours.get, "late")
    assert_blocked(call)
    server.set("late", "now")
    assert call.result(5) == b"now"


def test_ours_add_compare_set_against_torch_server(torch_server: tuple[Any, bool], make_ours: Any) -> None:
    server, use_libuv = torch_server
    ours = make_ours(server.port, use_libuv)

    assert ours.add("cnt", 5) == 5
    assert server.add("cnt", 2) == 7
    assert ours.add("cnt", -10) == -3
    assert server.get("cnt") == b"-3"

    assert ours.compare_set("cs1", "", "A") == b"A"  # missing, expected empty: created
    assert server.get("cs1") == b"A"
    assert ours.compare_set("cs2", "X", "B") == b"X"  # missing, expected set: nothing stored
    assert not server.check(["cs2"])
    assert ours.compare_set("cs1", "A", "C") == b"C"  # equal: swapped
    assert ours.compare_set("cs1", "A", "D") == b"C"  # different: unchanged
    assert server.get("cs1") == b"C"


def test_ours_check_delete_num_keys_append_against_torch_server(
    torch_server: tuple[Any, bool], make_ours: Any
) -> None:
    server, use_libuv = torch_server
    ours = make_ours(server.port, use_libuv)

    assert ours.num_keys() == 0
    assert ours.check([])
    assert not ours.check(["a"])
    flushed_set(server, "a", "1")
    assert ours.check(["a"])
    ours.append("a", "2")
    ours.append("new", b"\x00")
    assert ours.num_keys() == server.num_keys() == 2
    assert server.get("a") == b"12" and server.get("new") == b"\x00"
    assert ours.delete_key("a") is True
    assert ours.delete_key("a") is False
    assert not server.check(["a"])
    assert ours.num_keys() == 1


def test_ours_multi_set_multi_get_list_keys_against_torch_server(
    torch_server: tuple[Any, bool], make_ours: Any, closing: Any
) -> None:
    server, use_libuv = torch_server
    ours = make_ours(server.port, use_libuv)
    closing(TCPStore(HOST, server.port, world_size=2, timeout=TIMEOUT, use_libuv=use_libuv))  # ADD "init/"

    ours.multi_set(["m1", "m2"], ["a", b""])
    assert server.multi_get(["m2", "m1"]) == [b"", b"a"]
    server.multi_set(["m3", "dir/m4"], ["c", "d"])
    assert ours.multi_get(["m1", "m3", "dir/m4"]) == [b"a", b"c", b"d"]
    assert ours.multi_get([]) == []
    assert sorted(ours.list_keys()) == ["dir/m4", "m1", "m2", "m3"]  # "init/" hidden
    assert ours.num_keys() == 5  # ... but counted

    call = run_in_thread(ours.multi_get, ["m1", "m5"])
    assert_blocked(call)
    server.set("m5", "five")
    assert call.result(5) == [b"a", b"five"]


def test_ours_wait_and_timeouts_against_torch_server(torch_server: tuple[Any, bool], make_ours: Any) -> None:
    server, use_libuv = torch_server
    ours = make_ours(server.port, use_libuv)
    impatient = make_ours(server.port, use_libuv, timeout=IMPATIENT)
    address = f"{HOST}:{server.port}"

    ours.wait([])
    call = run_in_thread(ours.wait, ["w1", "w2"])
    server.set("w1", "1")
    assert_blocked(call)
    server.set("w2", "2")
    call.result(5)

    start = time.monotonic()
    with pytest.raises(StoreTimeoutError) as info:
        ours.wait(["nokey", "w1"], SHORT)
    assert time.monotonic() - start >= SHORT.total_seconds() * 0.9
    err = info.value
    assert isinstance(err, TimeoutError) and isinstance(err, RuntimeError) and isinstance(err, StoreError)
    assert str(err).startswith(f"wait timeout after {MS}, keys: /nokey, /w1")
    assert address in str(err)

    for op in (lambda: impatient.get("nokey"), lambda: impatient.multi_get(["w1", "nokey"])):
        with pytest.raises(StoreTimeoutError, match=r"^wait timeout after 500ms, keys: .*/nokey") as info:
            op()
        assert address in str(info.value)

    # The cancelled connections are still in step with the server.
    assert ours.add("after", 1) == 1
    assert impatient.get("w1") == b"1"
    server.set("nokey", "late")
    assert impatient.get("nokey") == b"late"


def test_ours_queues_against_torch_server(torch_server: tuple[Any, bool], make_ours: Any) -> None:
    server, use_libuv = torch_server
    ours = make_ours(server.port, use_libuv)

    if not use_libuv:
        # torch's legacy server drops the connection on a queue command: refuse before sending.
        for op in (lambda: ours.queue_push("q", "x"), lambda: ours.queue_pop("q"), lambda: ours.queue_len("q")):
            with pytest.raises(NotImplementedError, match="^queues not implemented on legacy TCPStore backend$"):
                op()
        assert ours.add("still-connected", 1) == 1
        return

    ours.queue_push("q", "1")
    assert ours.queue_len("q") == 1
    server.queue_push("q", "2")
    assert server.queue_len("q") == 2
    assert server.queue_pop("q", block=False) == b"1"  # pushed by us, popped by torch
    assert ours.queue_pop("q", block=False) == b"2"  # pushed by torch, popped by us
    with pytest.raises(QueueEmptyError):
        ours.queue_pop("q", block=False)

    call = run_in_thread(ours.queue_pop, "q2")  # blocking: woken by a later torch push
    assert_blocked(call)
    server.queue_push("q2", b"\x00late")
    assert call.result(5) == b"\x00late"

    impatient = make_ours(server.port, use_libuv, timeout=IMPATIENT)
    with pytest.raises(StoreTimeoutError, match=r"^wait timeout after 500ms, keys: /q2"):
        impatient.queue_pop("q2")


def test_ours_barrier_with_torch_participant(torch_server: tuple[Any, bool], make_ours: Any) -> None:
    server, use_libuv = torch_server
    ours = make_ours(server.port, use_libuv)

    call = run_in_thread(ours.barrier, "bar", 2)
    assert_blocked(call)
    server.barrier("bar", 2)
    call.result(5)

    call = run_in_thread(server.barrier, "bar2", 2)
    assert_blocked(call)
    ours.barrier("bar2", 2)
    call.result(5)
    assert server.get("bar2") == b"2"

    with pytest.raises(StoreTimeoutError, match=rf"^barrier timeout after {MS}, key: lonely") as info:
        ours.barrier("lonely", 2, SHORT)
    assert isinstance(info.value, TimeoutError) and f"{HOST}:{server.port}" in str(info.value)
    assert ours.add("after", 1) == 1


def test_our_clone_against_torch_server(torch_server: tuple[Any, bool], closing: Any) -> None:
    server, use_libuv = torch_server
    ours = closing(TCPStore(HOST, server.port, timeout=TIMEOUT, use_libuv=use_libuv))
    clone = closing(ours.clone())
    assert clone.libuvBackend is use_libuv and clone.port == server.port

    call = run_in_thread(clone.get, "k")  # blocks on the clone's own connection
    assert ours.add("n", 1) == 1
    flushed_set(ours, "k", "v")
    assert call.result(5) == b"v"
    ours.close()
    assert clone.get("n") == b"1"


@pytest.mark.parametrize("name", list(LARGE))
def test_our_values_against_torch_server(torch_server: tuple[Any, bool], make_ours: Any, name: str) -> None:
    server, use_libuv = torch_server
    value = LARGE[name]
    ours = make_ours(server.port, use_libuv)

    ours.set("ours/ключ", value)
    assert server.get("ours/ключ") == value
    server.set("theirs", value)
    assert ours.get("theirs") == value
    assert ours.multi_get(["ours/ключ", "theirs"]) == [value, value]


def test_ours_default_flag_get_blocks_on_legacy_torch_server(make_ours: Any, closing: Any) -> None:
    """torch: the client's use_libuv flag matters only for queues; key ops work on either server."""
    server = closing(TorchTCPStore(HOST, 0, is_master=True, timeout=TIMEOUT, use_libuv=False))
    t = closing(torch_client(server.port, use_libuv=True))
    call = run_in_thread(t.get, "late")  # control: torch's own client, same flag, same server
    assert_blocked(call)
    server.set("late", "x")
    assert call.result(5) == b"x"

    ours = make_ours(server.port)  # default use_libuv=True, as torch's default
    call = run_in_thread(ours.get, "late2")
    assert_blocked(call)
    server.set("late2", "y")
    assert call.result(5) == b"y"


def test_default_flag_clients_detect_a_legacy_server_once(
    make_ours: Any, closing: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The handshake's probe finds the legacy server; one warning, and the client carries on."""
    server = closing(TorchTCPStore(HOST, 0, is_master=True, timeout=TIMEOUT, use_libuv=False))
    with caplog.at_level("WARNING", logger="rdzv_store"):
        ours = make_ours(server.port)
        ours.set("before", "1")
        assert ours.get("before") == b"1"
        assert ours.add("n", 1) == 1
    assert sum("legacy server" in r.getMessage() for r in caplog.records) == 1


def test_default_flag_clients_keep_one_round_trip_gets_on_libuv(our_port: int, closing: Any) -> None:
    torch_libuv = closing(TorchTCPStore(HOST, 0, is_master=True, timeout=TIMEOUT, use_libuv=True))
    for port in (our_port, torch_libuv.port):
        ours = closing(TCPStore(HOST, port, timeout=TIMEOUT))
        assert ours._missing_get_is_empty, f"probe misread the server on port {port}"


def test_async_client_concurrent_ops_against_torch_server(torch_server: tuple[Any, bool]) -> None:
    """Many coroutines on one AsyncTCPStore: pipelined requests and pooled waits, released by torch."""
    server, use_libuv = torch_server

    async def main() -> None:
        async with AsyncTCPStore(HOST, server.port, timeout=TIMEOUT, use_libuv=use_libuv) as ours:
            adds = await asyncio.gather(*(ours.add("cnt", 1) for _ in range(50)))
            assert sorted(adds) == list(range(1, 51))
            waiters = [asyncio.ensure_future(ours.get(f"w{i}")) for i in range(5)]
            done, _ = await asyncio.wait(waiters, timeout=BLOCKED)
            assert not done
            await asyncio.to_thread(server.multi_set, [f"w{i}" for i in range(5)], [str(i) for i in range(5)])
            values = await asyncio.wait_for(asyncio.gather(*waiters), 5)
            assert values == [str(i).encode() for i in range(5)]

    asyncio.run(asyncio.wait_for(main(), 30))
    assert server.get("cnt") == b"50"


# == 3. byte level: our replies are torch's replies ===============================================

# One torch client per port, all in one child process (so the PING nonce, the pid, is the same
# for both servers, and torch's GIL-holding calls cannot stall the recording relay in this
# process). Only deterministic ops: no list_keys (hash-map order).
_CONVERSATION = """
import sys
from datetime import timedelta
import torch.distributed as dist

def conversation(port, queues):
    t = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
    out = []
    t.set("k1", "v1")
    out.append(t.get("k1"))
    t.set("empty", b"")
    out.append(t.get("empty"))
    out += [t.add("cnt", 5), t.add("cnt", -7), t.add("cnt", 0)]
    t.set("junk", " 7x")
    t.set("big", str(2**63 - 1))
    out += [t.add("junk", 1), t.add("big", 1)]  # stoll parsing, int64 wrap-around
    t.set("large", bytes(range(256)) * 20)
    out.append(t.get("large"))
    out += [
        t.compare_set("cs1", "", "A"),
        t.compare_set("cs2", "X", "B"),
        t.compare_set("cs1", "A", "C"),
        t.compare_set("cs1", "A", "D"),
    ]
    out += [t.check(["k1", "nope"]), t.check(["k1"]), t.check([])]
    t.multi_set(["m1", "m2"], ["a", b"\\x00bb"])
    out.append(t.multi_get(["m2", "m1", "k1"]))
    out.append(t.multi_get([]))
    t.append("ap", "x")
    t.append("ap", "y")
    out.append(t.get("ap"))
    t.wait(["k1", "m1"])
    try:
        t.wait(["nope"], timedelta(milliseconds=100))  # WAIT, silence, CANCEL_WAIT -> 01
    except dist.DistStoreError as exc:
        out.append(str(exc))
    t.barrier("bar", 1)
    out.append(t.get("bar"))
    out += [t.delete_key("k1"), t.delete_key("k1"), t.delete_key("nope")]
    if queues:
        t.queue_push("q", "p1")
        t.queue_push("q", "p2")
        out.append(t.queue_len("q"))
        out.append(t.queue_pop("q", block=False))
        out.append(t.queue_pop("q"))
        try:
            t.queue_pop("q", block=False)
        except dist.QueueEmptyError as exc:
            out.append(type(exc).__name__)
        out.append(t.queue_len("q"))
        t.queue_push("qonly", "v")
        out += [t.check(["qonly"]), t.get("qonly")]  # a non-empty queue counts as present
    out.append(t.num_keys())
    return out

queues = sys.argv[1] == "1"
print("PID", __import__("os").getpid(), flush=True)
for port in sys.argv[2:]:
    print("RESULT", repr(conversation(int(port), queues)), flush=True)
"""


def _first_difference(a: bytes, b: bytes) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (
        f"lengths {len(a)} vs {len(b)}, first difference at byte {i}:\n"
        f"  ours : {a[max(0, i - 24) : i + 24].hex(' ')}\n"
        f"  torch: {b[max(0, i - 24) : i + 24].hex(' ')}"
    )


def test_our_replies_are_byte_identical_to_torch(
    server_proc: ServerProcess, torch_server: tuple[Any, bool], tmp_path: Path
) -> None:
    server, use_libuv = torch_server
    queues = use_libuv  # torch's legacy server has no queues
    script = tmp_path / "conversation.py"
    script.write_text(_CONVERSATION)
    proxies = [RecordingProxy(server_proc.port), RecordingProxy(server.port)]
    try:
        proc = subprocess.Popen(
            [sys.executable, str(script), "1" if queues else "0", *(str(p.port) for p in proxies)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        for proxy in proxies:
            proxy.close()
    assert proc.returncode == 0, err[-3000:]
    lines = out.splitlines()
    pid = int(lines[0].split()[1])
    ours_results, torch_results = (ast.literal_eval(line.split(" ", 1)[1]) for line in lines[1:3])
    assert ours_results == torch_results

    assert [len(p.streams) for p in proxies] == [1, 1], "one connection per conversation"
    (ours_c2s, ours_s2c), (torch_c2s, torch_s2c) = ((bytes(a), bytes(b)) for p in proxies for a, b in p.streams)
    # Same client, same pid, same ops: the requests match, or the comparison would be moot.
    assert ours_c2s == torch_c2s, _first_difference(ours_c2s, torch_c2s)
    nonce = (pid & 0xFFFFFFFF).to_bytes(4, "little")
    assert ours_c2s.startswith(b"\x00\xce\xf7\x85\x3c\x0d" + nonce)
    assert ours_s2c == torch_s2c, _first_difference(ours_s2c, torch_s2c)
    assert ours_s2c.startswith(nonce)  # the PING echo
    assert (-2).to_bytes(8, "little", signed=True) in ours_s2c and len(ours_s2c) > 150  # not vacuous
