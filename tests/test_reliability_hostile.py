"""Hostile input against the server: truncated, oversize and stalled requests, connection caps.

Every case checks the same three things: the offending connection is closed
(or kept, when it is merely slow) with exactly one log line naming the peer,
every other client is answered meanwhile, and no bytes stay accounted to a
connection that is gone.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import pytest
from reliability_helpers import (
    CollectLog,
    ServerProcess,
    background_server,
    on_loop,
    ping,
    poll_until,
    raw_client,
    recv_exactly,
    wait_closed,
)

from rdzv_store import protocol as p

Q = p.QueryType
U64 = struct.Struct("<Q")


def valid_requests() -> list[bytes]:
    """One well-formed request of every type a validated client may send."""
    return [
        p.encode_key_value(Q.SET, b"/k", b"value"),
        p.encode_key(Q.GET, b"/k"),
        p.encode_key_int(Q.ADD, b"/n", 5),
        p.encode_compare_set(b"/k", b"value", b"other"),
        p.encode_keys(Q.CHECK, [b"/k", b"/n"]),
        p.encode_keys(Q.WAIT, [b"/k"]),
        p.encode_bare(Q.GETNUMKEYS),
        p.encode_key(Q.DELETE_KEY, b"/gone"),
        p.encode_key_value(Q.APPEND, b"/k", b"tail"),
        p.encode_keys(Q.MULTI_GET, [b"/k", b"/n"]),
        p.encode_multi_set([b"/a", b"/b"], [b"1", b"2"]),
        p.encode_bare(Q.CANCEL_WAIT),
        p.encode_ping(99),
        p.encode_key_value(Q.QUEUE_PUSH, b"/q", b"item"),
        p.encode_key(Q.QUEUE_POP, b"/q"),
        p.encode_key(Q.QUEUE_LEN, b"/q"),
        p.encode_bare(Q.LIST_KEYS),
        p.encode_key_int(Q.BARRIER, b"/bar", 1000),
    ]


def server_buffered(bg) -> int:
    return on_loop(bg, lambda: bg.server.buffered)


def test_truncated_requests_cost_nothing_after_the_peer_leaves():
    with CollectLog() as logs, background_server() as bg:
        bystander = raw_client(bg.port)
        cases = 0
        for request in valid_requests():
            for cut in sorted({1, len(request) // 2, len(request) - 1}):
                if cut <= 0 or cut >= len(request):
                    continue
                sock = raw_client(bg.port)
                sock.sendall(request[:cut])
                ping(bystander)  # answered while a peer holds half a request
                sock.close()
                cases += 1
        assert cases > 40
        poll_until(lambda: on_loop(bg, lambda: bg.server.connection_count) == 1, 10)
        assert server_buffered(bg) == 0
        assert on_loop(bg, lambda: bg.server.engine.pending_waiters()) == 0
        ping(bystander)
        lost = logs.warnings("lost in the middle of a request")
        assert len(lost) == cases  # one line per truncated connection
        bystander.close()


@pytest.mark.parametrize(
    "name, request_bytes, reason",
    [
        ("key length 8 GiB", bytes([Q.SET]) + U64.pack(8 << 30), "key length of 8589934592 exceeds"),
        ("value length 1 TiB", bytes([Q.SET]) + U64.pack(2) + b"/k" + U64.pack(1 << 40), "value length"),
        ("length 2**64-1", bytes([Q.GET]) + U64.pack(2**64 - 1), "exceeds the limit"),
        ("compare_set desired 4 GiB", bytes([Q.COMPARE_SET]) + U64.pack(2) + b"/k" + U64.pack(0) + U64.pack(4 << 30), "value length"),
        ("WAIT of 3e9 keys", bytes([Q.WAIT]) + U64.pack(3_000_000_000), "key count of 3000000000"),
        ("CHECK of 2**63 keys", bytes([Q.CHECK]) + U64.pack(2**63), "key count"),
        ("MULTI_GET of 4e9 keys", bytes([Q.MULTI_GET]) + U64.pack(4_000_000_000), "key count"),
        ("MULTI_SET of 1e10 keys", bytes([Q.MULTI_SET]) + U64.pack(10_000_000_000), "key count"),
        ("unknown type", b"\xff", "unknown request type 255"),
        ("VALIDATE again", p.encode_validate(), "not allowed after the handshake"),
    ],
)
def test_impossible_lengths_and_counts_close_at_once_with_one_line(name, request_bytes, reason):
    with CollectLog() as logs, background_server() as bg:
        bystander = raw_client(bg.port)
        sock = raw_client(bg.port)
        sock.sendall(request_bytes)  # the length prefix alone: nothing is buffered for it
        assert wait_closed(sock, 5), name
        ping(bystander)
        lines = logs.warnings("closing connection from")
        assert len(lines) == 1 and reason in lines[0], lines
        assert f"127.0.0.1:{sock.getsockname()[1]}" in lines[0]
        assert server_buffered(bg) == 0
        sock.close()
        bystander.close()


def test_first_request_must_be_validate():
    with CollectLog() as logs, background_server() as bg:
        sock = raw_client(bg.port, validate=False)
        sock.sendall(p.encode_ping(5))
        assert wait_closed(sock, 5)
        assert len(logs.warnings("VALIDATE")) == 1
        sock.close()


def test_half_a_request_that_stalls_blocks_nobody_and_completes_later():
    with background_server() as bg:
        value = bytes(range(256)) * 4096 * 8  # 8 MiB, exactly the value limit
        request = p.encode_key_value(Q.SET, b"/slow", value)
        staller = raw_client(bg.port)
        staller.sendall(request[: len(request) // 3])
        poll_until(lambda: server_buffered(bg) > 0, 5)
        others = [raw_client(bg.port) for _ in range(4)]
        started = time.monotonic()
        for i in range(50):
            for sock in others:
                ping(sock, i)
        assert time.monotonic() - started < 5  # 200 round trips while one peer holds 2.7 MiB
        # A third (over an eighth) of the value has arrived, so the rest is received in place:
        # its final buffer is reserved, and counted in the budget, in full.
        assert server_buffered(bg) == len(request)
        staller.sendall(request[len(request) // 3 :])
        staller.sendall(p.encode_key(Q.GET, b"/slow"))
        assert recv_exactly(staller, 8 + len(value)) == U64.pack(len(value)) + value
        assert server_buffered(bg) == 0
        for sock in [staller, *others]:
            sock.close()


def test_stalled_mid_request_is_closed_after_the_timeout_idle_connections_are_not():
    timeout = 0.3
    with CollectLog() as logs, background_server(request_timeout=timeout) as bg:
        idle = raw_client(bg.port)  # validated, then silent for the whole test
        slow = raw_client(bg.port)  # sends a request in pieces, never stalling a whole timeout
        staller = raw_client(bg.port)
        request = p.encode_key_value(Q.SET, b"/k", b"v" * 1000)
        started = time.monotonic()
        staller.sendall(request[:500])
        slow_request = p.encode_key_value(Q.SET, b"/slow", b"s" * 10)
        for i, byte in enumerate(slow_request):  # ~20 pieces, one per 0.1 timeout
            slow.sendall(bytes([byte]))
            if i == 0:
                poll_until(lambda: server_buffered(bg) >= 501, 5)
            time.sleep(timeout / 10)  # pacing the slow sender, not synchronisation
        assert wait_closed(staller, 10 * timeout)
        elapsed = time.monotonic() - started
        assert timeout <= elapsed <= 2 * timeout + 1.0, elapsed
        ping(idle)  # silent since before the staller connected, still served
        slow.sendall(p.encode_key(Q.GET, b"/slow"))
        assert recv_exactly(slow, 18) == U64.pack(10) + b"s" * 10
        lines = logs.warnings("closing connection from")
        assert len(lines) == 1 and "incomplete request (500 bytes)" in lines[0], lines
        assert server_buffered(bg) == 0
        for sock in (idle, slow, staller):
            sock.close()


def test_one_request_is_capped_at_max_request():
    limits = p.Limits(max_request=1 << 20)
    with CollectLog() as logs, background_server(limits=limits) as bg:
        sock = raw_client(bg.port)
        big = p.encode_multi_set([b"/a", b"/b", b"/c"], [b"x" * (400 << 10)] * 3)  # 1.2 MiB
        with contextlib.suppress(OSError):  # the server may reset us before we finish sending
            sock.sendall(big)
        assert wait_closed(sock, 5)
        lines = logs.warnings("closing connection from")
        assert len(lines) == 1 and "message larger than 1048576 bytes" in lines[0]
        poll_until(lambda: server_buffered(bg) == 0, 5)
        sock.close()


def test_server_wide_budget_for_incomplete_requests():
    budget = 5 << 19  # 2.5 MiB
    with CollectLog() as logs, background_server(max_buffered=budget) as bg:
        request = p.encode_key_value(Q.SET, b"/k", b"y" * (1 << 20))
        first, second, third = (raw_client(bg.port) for _ in range(3))
        part = 900 << 10  # over an eighth of the value: its 1 MiB buffer is reserved, and counted
        first.sendall(request[:part])
        second.sendall(request[:part])
        poll_until(lambda: server_buffered(bg) == 2 * len(request), 5)
        third.sendall(request[:part])  # 3 MiB > 2.5 MiB: this one is refused
        assert wait_closed(third, 5)
        lines = logs.warnings("budget")
        assert len(lines) == 1 and f"127.0.0.1:{third.getsockname()[1]}" in lines[0], lines
        for sock in (first, second):  # the two within budget finish their requests
            sock.sendall(request[part:] + p.encode_key(Q.GET, b"/k"))
            assert recv_exactly(sock, 8 + (1 << 20))[:9] == U64.pack(1 << 20) + b"y"
        assert server_buffered(bg) == 0
        for sock in (first, second, third):
            sock.close()


def test_connection_cap_refuses_with_one_line_and_recovers():
    cap = 8
    with CollectLog() as logs, background_server(max_connections=cap) as bg:
        clients = [raw_client(bg.port) for _ in range(cap)]
        refused = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", bg.port), timeout=5)
            assert wait_closed(sock, 5)
            refused.append(sock)
        lines = logs.warnings("connection limit reached")
        assert len(lines) == 1 and f"({cap})" in lines[0], lines
        for sock in clients:
            ping(sock)
        clients.pop().close()
        poll_until(lambda: on_loop(bg, lambda: bg.server.connection_count) < cap, 5)
        clients.append(raw_client(bg.port))  # admitted again
        ping(clients[-1])
        for sock in clients + refused:
            sock.close()


def test_pipelined_big_replies_to_a_client_that_does_not_read_stay_bounded():
    """100 GETs of an 8 MiB value (800 MiB of replies) from 2 KiB of requests."""
    value = b"z" * (8 << 20)
    count = 100
    with ServerProcess() as server:
        sock = raw_client(server.port)
        sock.sendall(p.encode_key_value(Q.SET, b"/big", value))
        ping(sock)
        before = server.rss_kib()
        sock.sendall(p.encode_key(Q.GET, b"/big") * count + p.encode_ping(4242))
        assert recv_exactly(sock, 8 + len(value))[8:] == value  # the server got to work
        server.stats()
        server.stats()  # two loop round trips: the server is idle, waiting for us to read
        grown = server.rss_kib() - before
        assert grown < 80 * 1024, f"server grew by {grown} KiB"  # not 800 MiB
        for _ in range(count - 1):  # everything still arrives, in order
            assert recv_exactly(sock, 8 + len(value))[8:] == value
        assert recv_exactly(sock, 4) == (4242).to_bytes(4, "little")
        sock.close()


def test_multi_get_reply_is_capped():
    with CollectLog() as logs, background_server(limits=p.Limits(max_request=16 << 20)) as bg:
        sock = raw_client(bg.port)
        sock.sendall(p.encode_key_value(Q.SET, b"/big", b"m" * (4 << 20)))
        sock.sendall(p.encode_keys(Q.MULTI_GET, [b"/big"] * 4))  # 16 MiB: allowed
        assert len(recv_exactly(sock, 4 * (8 + (4 << 20)))) == 4 * (8 + (4 << 20))
        sock.sendall(p.encode_keys(Q.MULTI_GET, [b"/big"] * 1000))  # 4 GiB from 8 KiB
        assert wait_closed(sock, 5)
        lines = logs.warnings("closing connection from")
        assert len(lines) == 1 and "MULTI_GET reply of 4194304000 bytes exceeds" in lines[0]
        sock.close()


def test_accepted_sockets_use_tcp_keepalive_and_nodelay():
    # Set on the listening socket only; this checks that the accepted socket inherited them.
    with background_server() as bg:
        sock = raw_client(bg.port)
        opts = on_loop(
            bg,
            lambda: [
                (
                    c._sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    c._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
                    c._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                )
                for c in bg.server._connections
            ],
        )
        assert opts == [(1, True, 60)]
        sock.close()
