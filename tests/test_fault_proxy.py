"""FaultProxy (rdzv_store.testing): each fault, observed from real clients and raw sockets.

Uses the kit's own fixtures (``store_server_thread``, ``fault_proxy``, ``tcp_store_factory``)
through the installed pytest plugin.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from reliability_helpers import poll_until, recv_exactly

from rdzv_store import AsyncTCPStore, StoreConnectionError, StoreTimeoutError, TCPStore
from rdzv_store import protocol as p
from rdzv_store.testing import FaultProxy

HANDSHAKE = p.encode_validate() + p.encode_ping(7)


def raw(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def handshake(sock: socket.socket, nonce: int = 7) -> None:
    sock.sendall(p.encode_validate() + p.encode_ping(nonce))
    assert recv_exactly(sock, 4) == nonce.to_bytes(4, "little")


def test_forwards_and_counts_bytes_exactly(fault_proxy, store_server_thread):
    with raw(fault_proxy) as sock:
        handshake(sock)
        fault_proxy.wait_until(lambda s: s.bytes_to_client == 4)
        stats = fault_proxy.stats()
        assert (stats.bytes_to_server, stats.bytes_to_client) == (len(HANDSHAKE), 4)
        assert stats.accepted == stats.active == 1
        assert store_server_thread.stats()["connections"] == 1
    fault_proxy.wait_until(lambda s: s.active == 0)
    store_server_thread.call(lambda: None)
    assert fault_proxy.bytes_to_server == len(HANDSHAKE)


def test_latency_delays_each_direction_and_keeps_order(fault_proxy, tcp_store_factory):
    store = tcp_store_factory(port=fault_proxy.port)
    fault_proxy.set_latency(0.05)
    started = time.monotonic()
    for i in range(3):
        assert store.add("n", 1) == i + 1
    elapsed = time.monotonic() - started
    assert elapsed >= 3 * 0.1, elapsed  # 50 ms each way, three round trips
    fault_proxy.set_latency(0.0, jitter=0.02, direction="to_server")
    store.multi_set([f"k{i}" for i in range(20)], [str(i) for i in range(20)])
    assert store.multi_get([f"k{i}" for i in range(20)]) == [str(i).encode() for i in range(20)]


def test_stall_holds_data_and_resume_delivers_it(fault_proxy):
    with raw(fault_proxy) as sock:
        handshake(sock)
        fault_proxy.stall("to_client")
        sock.sendall(p.encode_ping(99))
        fault_proxy.wait_until(lambda s: s.bytes_to_server == len(HANDSHAKE) + len(p.encode_ping(99)))
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recv(4)  # the reply is held by the proxy
        fault_proxy.resume()
        sock.settimeout(5)
        assert recv_exactly(sock, 4) == (99).to_bytes(4, "little")


def test_stalled_replies_fail_our_client_within_its_timeout(fault_proxy, tcp_store_factory):
    store = tcp_store_factory(port=fault_proxy.port, timeout=0.5)
    fault_proxy.stall("to_client")
    started = time.monotonic()
    with pytest.raises(StoreTimeoutError) as info:
        store.add("n", 1)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert fault_proxy.address in str(info.value)


def test_drop_discards_and_counts(fault_proxy):
    with raw(fault_proxy) as sock:
        handshake(sock)
        fault_proxy.drop("to_server")
        sock.sendall(p.encode_ping(5))
        fault_proxy.wait_until(lambda s: s.dropped_to_server == len(p.encode_ping(5)))
        fault_proxy.resume()
        sock.sendall(p.encode_ping(6))
        assert recv_exactly(sock, 4) == (6).to_bytes(4, "little")  # 5 never reached the server


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_cut_closes_both_sides(fault_proxy, store_server_thread, how):
    with raw(fault_proxy) as sock:
        handshake(sock)
        assert fault_proxy.cut(how) == 1
        if how == "rst":
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        else:
            assert sock.recv(1) == b""
    fault_proxy.wait_until(lambda s: s.active == 0)
    poll_until(lambda: store_server_thread.stats()["connections"] == 0, 5)  # the server closes its side too


def test_cut_fails_a_blocked_wait_at_once_naming_the_address(fault_proxy, tcp_store_factory, store_server_thread):
    store = tcp_store_factory(port=fault_proxy.port, timeout=30)
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(Exception, store.wait, ["never"]).value))
    thread.start()
    poll_until(lambda: store_server_thread.stats()["waiters"] == 1, 5)
    started = time.monotonic()
    fault_proxy.cut("rst")
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0
    assert isinstance(errors[0], StoreConnectionError)
    assert fault_proxy.address in str(errors[0])


def test_refuse_then_accept_again_on_the_same_port(fault_proxy, tcp_store_factory):
    port = fault_proxy.port
    fault_proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(StoreConnectionError, match="Connection refused"):
        TCPStore("127.0.0.1", port, timeout=0.3)
    fault_proxy.refuse(False)
    assert fault_proxy.port == port
    store = tcp_store_factory(port=port)
    store.set("k", "v")
    assert store.get("k") == b"v"


def test_refuse_by_reset(fault_proxy):
    fault_proxy.refuse(how="rst")
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        with raw(fault_proxy) as sock:  # the reset may even beat connect() back
            sock.sendall(HANDSHAKE)
            sock.recv(4)
    assert fault_proxy.wait_until(lambda s: s.refused == 1).active == 0
    fault_proxy.refuse(False)
    with raw(fault_proxy) as sock:
        handshake(sock)


def test_black_hole_accepts_and_never_answers(fault_proxy, store_server_thread):
    fault_proxy.black_hole()
    started = time.monotonic()
    with pytest.raises(StoreConnectionError, match="timed out"):
        TCPStore("127.0.0.1", fault_proxy.port, timeout=0.5)
    assert time.monotonic() - started < 3
    assert store_server_thread.stats()["connections"] == 0  # never connected upstream
    stats = fault_proxy.stats()
    assert stats.accepted >= 1 and stats.dropped_to_server >= len(HANDSHAKE) and stats.bytes_to_client == 0
    fault_proxy.heal()
    with TCPStore("127.0.0.1", fault_proxy.port, timeout=2) as store:
        store.set("k", "v")


def test_bandwidth_cap_paces_delivery(fault_proxy, tcp_store_factory):
    store = tcp_store_factory(port=fault_proxy.port)
    value = b"x" * 100_000
    fault_proxy.set_bandwidth(400_000, direction="to_server")
    started = time.monotonic()
    store.set("big", value)
    assert store.check(["big"])  # a reply: the set has gone through the proxy
    assert time.monotonic() - started >= 0.2
    fault_proxy.set_bandwidth(None)
    assert store.get("big") == value


def test_unreachable_upstream_resets_the_client():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]  # bound, not listening: connections are refused
        with FaultProxy("127.0.0.1", dead_port) as proxy:
            try:
                with raw(proxy) as sock:
                    sock.settimeout(5)
                    assert sock.recv(1) == b""
            except ConnectionResetError:
                pass  # the proxy's reset can beat connect() returning (seen in CI under load), or come at recv
            proxy.wait_until(lambda s: s.upstream_failures == 1 and s.active == 0)


def test_asyncio_client_behind_the_proxy(store_server_thread):
    async def main() -> None:
        async with FaultProxy("127.0.0.1", store_server_thread.port) as proxy:
            async with AsyncTCPStore("127.0.0.1", proxy.port, timeout=2) as store:
                proxy.set_latency(0.02)
                await store.set("k", "v")
                started = time.monotonic()
                assert await asyncio.gather(*(store.get("k") for _ in range(5))) == [b"v"] * 5
                assert time.monotonic() - started >= 0.04
                proxy.stall("to_client")
                with pytest.raises(StoreTimeoutError):
                    await asyncio.wait_for(store.add("n", 1), 5)

    asyncio.run(main())


def test_close_is_bounded_and_leaves_no_thread(store_server_thread):
    before = {t.ident for t in threading.enumerate()}
    proxy = FaultProxy("127.0.0.1", store_server_thread.port)
    socks = [raw(proxy) for _ in range(3)]
    for s in socks:
        handshake(s)
    proxy.stall()
    started = time.monotonic()
    proxy.close()
    proxy.close()  # idempotent
    assert time.monotonic() - started < 5
    assert {t.ident for t in threading.enumerate()} <= before
    for s in socks:
        s.settimeout(5)
        assert s.recv(1) == b""
        s.close()


def test_bad_arguments():
    with FaultProxy("127.0.0.1", 1) as proxy:
        with pytest.raises(ValueError):
            proxy.set_latency(-1)
        with pytest.raises(ValueError):
            proxy.set_bandwidth(0)
        with pytest.raises(ValueError):
            proxy.stall("sideways")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            proxy.cut("bang")  # type: ignore[arg-type]


def test_asyncio_test_hosting_the_server_on_its_own_loop():
    """Control calls block the caller only while the proxy's thread applies them, so a test whose
    own loop runs the server can call them without deadlocking."""
    from rdzv_store import StoreServer

    async def main() -> None:
        server = StoreServer("127.0.0.1", 0)
        await server.start()
        try:
            async with FaultProxy("127.0.0.1", server.port) as proxy:
                async with AsyncTCPStore("127.0.0.1", proxy.port, timeout=2) as store:
                    await store.set("k", "v")
                    proxy.set_latency(0.01)
                    assert await store.get("k") == b"v"
                    assert proxy.cut("fin") >= 1
                    with pytest.raises(StoreConnectionError):
                        await store.add("n", 1)
                    assert proxy.stats().active == 0
        finally:
            await server.close()

    asyncio.run(main())
