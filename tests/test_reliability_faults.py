"""Faults: clients killed while blocked, connect/wait/disconnect churn, servers killed or closed.

Figures are printed (run with ``-s``) and quoted in the README's Reliability section.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from reliability_helpers import ServerProcess, background_server, on_loop, ping, poll_until, raw_client, scale

from rdzv_store import StoreConnectionError, StoreTimeoutError, TCPStore
from rdzv_store import protocol as p
from rdzv_store.testing import FaultProxy

Q = p.QueryType

_BLOCKED_CLIENT = r"""
import sys
from datetime import timedelta
from rdzv_store import TCPStore
port, what = int(sys.argv[1]), sys.argv[2]
store = TCPStore("127.0.0.1", port, timeout=timedelta(seconds=60))
print("connected", flush=True)
if what == "wait":
    store.wait(["never"])
elif what == "get":
    store.get("never")
elif what == "barrier":
    store.barrier("never-complete", 1000)
elif what == "queue_pop":
    store.queue_pop("never-queue")
print("released", flush=True)
"""


def spawn_blocked(port: int, what: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_CLIENT, str(port), what], stdout=subprocess.PIPE, text=True
    )
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready and proc.stdout.readline().strip() == "connected"
    return proc


def test_clients_killed_while_blocked_leave_no_waiters():
    kinds = ["wait", "get", "barrier", "queue_pop"] * 2
    with ServerProcess() as server:
        procs = [spawn_blocked(server.port, what) for what in kinds]
        try:
            poll_until(lambda: server.stats()["waiters"] == len(kinds), 20)
            assert server.stats()["connections"] == len(kinds)
            for proc in procs:
                proc.kill()  # SIGKILL: no goodbye on the wire, the kernel closes the socket
            poll_until(lambda: server.stats() == {**server.stats(), "waiters": 0, "connections": 0}, 10)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(10)
                proc.stdout.close()
        # Releasing the keys now must not touch the dead connections.
        with TCPStore("127.0.0.1", server.port, timeout=timedelta(seconds=10)) as store:
            store.set("never", "now")
            store.queue_push("never-queue", "x")
            assert store.get("never") == b"now"
        assert server.alive()
        assert not [line for line in server.log_lines if "Traceback" in line or line.startswith("ERROR")]


def _cycle(port: int, i: int) -> None:
    sock = raw_client(port)
    key = b"/churn/%d" % (i % 97)
    if i % 3 == 0:
        sock.sendall(p.encode_key_int(Q.BARRIER, key + b"/b", 1 << 40))
    else:
        sock.sendall(p.encode_keys(Q.WAIT, [key, b"/never"]))
    ping(sock, i)  # the wait is registered before the ping is answered
    if i % 2:  # half leave with a reset, half with a FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_connect_wait_disconnect_cycles_leave_fds_and_memory_flat():
    cycles = scale(10_000, 100_000)
    warmup = 500
    with ServerProcess() as server:
        for i in range(warmup):  # let the allocator and the loop reach their working size
            _cycle(server.port, i)
        poll_until(lambda: server.stats()["connections"] == 0, 10)
        fds0, rss0 = server.fd_count(), server.rss_kib()
        started = time.monotonic()
        threads = [
            threading.Thread(target=lambda t=t: [_cycle(server.port, i) for i in range(t, cycles, 4)])
            for t in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.monotonic() - started
        stats = poll_until(lambda: (s := server.stats())["connections"] == 0 and s, 10)
        fds1, rss1 = server.fd_count(), server.rss_kib()
        print(
            f"\n{cycles} connect/wait/disconnect cycles in {elapsed:.1f} s: fds {fds0} -> {fds1}, "
            f"RSS {rss0} -> {rss1} KiB ({rss1 - rss0:+d}), waiters left {stats['waiters']}"
        )
        assert stats["waiters"] == 0
        assert fds1 == fds0
        assert rss1 - rss0 < 2048, "more than 2 MiB of growth: something per connection is kept"


# -- the server goes away while clients are blocked ---------------------------------------------


def start_cli_server() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv_store", "serve", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.startswith("rdzv-store listening on 127.0.0.1 port "):
        proc.kill()
        raise AssertionError(f"no readiness line: {line!r}")
    return proc, int(line.rsplit(" ", 1)[1])


class Blocked:
    """Clients blocked in wait, get, barrier and queue_pop (threads), with the outcome of each."""

    def __init__(self, port: int, timeout: float) -> None:
        self.results: dict[str, tuple[BaseException | None, float]] = {}
        self.stores = [TCPStore("127.0.0.1", port, timeout=timedelta(seconds=timeout)) for _ in range(4)]
        self.admin = TCPStore("127.0.0.1", port, timeout=timedelta(seconds=timeout))
        self.threads = []
        calls = {
            "wait": lambda s: s.wait(["never"]),
            "get": lambda s: s.get("never"),
            "barrier": lambda s: s.barrier("never-complete", 100),
            "queue_pop": lambda s: s.queue_pop("never-queue"),
        }
        for store, (name, call) in zip(self.stores, calls.items()):
            thread = threading.Thread(target=self._run, args=(name, call, store), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self, name, call, store) -> None:
        try:
            call(store)
            error = None
        except BaseException as exc:  # noqa: BLE001 - recorded
            error = exc
        self.results[name] = (error, time.monotonic())

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive()

    def close(self) -> None:
        for store in [*self.stores, self.admin]:
            store.close()


def _report(blocked: Blocked, since: float, address: str, what: str) -> dict[str, float]:
    latencies = {}
    for name, (error, at) in blocked.results.items():
        assert isinstance(error, StoreConnectionError), (name, error)
        assert address in str(error)
        latencies[name] = at - since
    print(f"\n{what}: blocked clients failed after " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in latencies.items()))
    return latencies


@pytest.mark.parametrize("how", ["sigkill", "close"])
def test_server_killed_or_closed_fails_blocked_clients_at_once(how):
    timeout = 30.0
    with ServerProcess() as server:
        blocked = Blocked(server.port, timeout)
        poll_until(lambda: server.stats()["waiters"] == 4, 10)  # all four are blocked
        since = time.monotonic()
        if how == "sigkill":
            server.kill()
        else:
            assert server.command("close") == "closed"  # StoreServer.close() in the server
        blocked.join(timeout + 5)
        latencies = _report(blocked, since, server.address, how)
        assert len(latencies) == 4
        assert max(latencies.values()) < 2.0  # at once, not after the 30 s timeout
        blocked.close()


def test_graceful_close_in_process_wakes_blocked_clients_at_once():
    with background_server() as bg:
        blocked = Blocked(bg.port, 30.0)
        poll_until(lambda: on_loop(bg, lambda: bg.server.engine.pending_waiters()) == 4, 10)
        since = time.monotonic()
        bg.stop()
        blocked.join(10)
        latencies = _report(blocked, since, f"127.0.0.1:{bg.port}", "BackgroundServer.stop()")
        for error, _ in blocked.results.values():
            assert "closed the connection" in str(error)
        assert max(latencies.values()) < 1.0
        blocked.close()


def test_cli_sigterm_closes_every_connection_and_exits_cleanly():
    proc, port = start_cli_server()
    try:
        socks = []
        for i in range(5):
            sock = raw_client(port)
            sock.sendall(p.encode_keys(Q.WAIT, [b"/never"]))
            ping(sock, i)  # answered after the WAIT: the waiter is registered
            socks.append(sock)
        since = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for sock in socks:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # EOF, not a timeout
            sock.close()
        latency = time.monotonic() - since
        assert proc.wait(10) == 0
        err = proc.stderr.read()
        assert "closing 5 connection(s)" in err, err
        print(f"\nCLI SIGTERM: 5 blocked connections saw EOF within {latency * 1000:.1f} ms")
        assert latency < 2.0
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_hung_server_fails_blocked_clients_within_their_bounds():
    """A server that stops answering (SIGSTOP: no FIN, no RST, as when its host hangs).

    A wait with timeout T gives up after T, sends CANCEL_WAIT and waits up to the
    store timeout for the acknowledgement, so it fails within T + store timeout
    with a StoreTimeoutError naming the address; torch's client never returns.
    """
    store_timeout = 1.0
    with ServerProcess() as server:
        store = TCPStore("127.0.0.1", server.port, timeout=timedelta(seconds=store_timeout))
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreTimeoutError) as info:
                store.wait(["never"], timedelta(seconds=0.5))
            elapsed = time.monotonic() - started
            assert server.address in str(info.value)
            assert 0.5 <= elapsed < 0.5 + store_timeout + 0.5, elapsed
            with pytest.raises(StoreConnectionError):
                store.get("anything")  # the poisoned connection is closed, and says so
        finally:
            os.kill(server.pid, signal.SIGCONT)
        store.close()


def test_client_reads_are_bounded_when_a_server_accepts_and_never_answers():
    """torch's client blocks forever on the PING reply of such a server; ours gives up."""
    with background_server() as bg, FaultProxy("127.0.0.1", bg.port) as proxy:
        proxy.black_hole()  # accepts, reads, never answers
        started = time.monotonic()
        with pytest.raises(StoreConnectionError) as info:
            TCPStore("127.0.0.1", proxy.port, timeout=timedelta(seconds=1))
        assert time.monotonic() - started < 3
        assert f"(127.0.0.1, {proxy.port})" in str(info.value)
        assert proxy.stats().dropped_to_server > 0  # the handshake went out, nothing came back


def test_connect_is_bounded_when_the_servers_backlog_is_full():
    """A listener whose accept queue is full drops SYNs: connect() itself must time out (the
    client sets the kernel's SO_SNDTIMEO before connecting, which bounds connect on Linux)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # more than the queue holds; never accepted
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        started = time.monotonic()
        with pytest.raises(StoreConnectionError) as info:
            TCPStore("127.0.0.1", port, timeout=timedelta(seconds=1))
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 4.0, elapsed
        assert f"(127.0.0.1, {port})" in str(info.value)
        assert "timed out" in str(info.value)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_connections_cut_under_blocked_clients_fail_them_at_once(how):
    """A middlebox (or a dying peer's kernel) resets or closes the connections of clients blocked
    in wait, get, barrier and queue_pop: each fails at once, naming the address it used."""
    with background_server() as bg, FaultProxy("127.0.0.1", bg.port) as proxy:
        blocked = Blocked(proxy.port, 30.0)
        poll_until(lambda: on_loop(bg, lambda: bg.server.engine.pending_waiters()) == 4, 10)
        since = time.monotonic()
        assert proxy.cut(how) == 5  # the four blocked clients and the admin connection
        blocked.join(10)
        latencies = _report(blocked, since, proxy.address, f"proxy cut ({how})")
        assert len(latencies) == 4 and max(latencies.values()) < 2.0
        poll_until(lambda: on_loop(bg, lambda: bg.server.engine.pending_waiters()) == 0, 10)
        blocked.close()
