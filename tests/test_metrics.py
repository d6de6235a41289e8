"""Prometheus metrics of StoreServer: scraped over real HTTP, parsed with prometheus_client's parser.

Traffic is sent over raw sockets with the protocol's own encoders, so every expected
count and byte is known exactly; each check is a difference between two scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import prometheus_client.parser as prometheus_parser  # the test extra; a real Prometheus text parser

from rdzv_store import AsyncTCPStore, StoreAuthError, StoreConnectionError, StoreServer, TCPStore  # noqa: E402
from rdzv_store import metrics_http  # noqa: E402
from rdzv_store import protocol as p  # noqa: E402
from rdzv_store.metrics import CLOSE_REASONS, LATENCY_BUCKETS  # noqa: E402
from rdzv_store.server import BackgroundServer  # noqa: E402

Q = p.QueryType
REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- helpers ---------------------------------------------------------------------------------


def parse(text: str) -> Metrics:
    out: Metrics = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(port: int, path: str = "/metrics") -> Metrics:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(reply.read().decode())


def val(m: Metrics, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition (bounded): for state the server reaches without telling the client."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


class Raw:
    """A raw protocol connection: exact bytes out, exact replies in."""

    def __init__(self, port: int, handshake: bool = True) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.sent = 0
        if handshake:
            self.send(p.encode_validate())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, f"connection closed after {len(data)} of {n} reply bytes"
            data += chunk
        return data

    def sync(self) -> None:
        """A PING round trip: everything sent before it has been handled."""
        self.send(p.encode_ping(0x1234))
        assert self.recv(4) == struct.pack("<I", 0x1234)

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class Served:
    def __init__(self, **options: object) -> None:
        self.server = StoreServer(HOST, 0, metrics=0, **options)  # type: ignore[arg-type]
        self.bg = BackgroundServer(self.server)
        self.port = self.server.port
        mport = self.server.metrics_port
        assert mport is not None
        self.metrics_port = mport

    def scrape(self) -> Metrics:
        return scrape(self.metrics_port)

    def stop(self) -> None:
        self.bg.stop()


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(**options: object) -> Served:
        served = Served(**options)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def request_counts(s: Served) -> dict[str, float]:
    m = s.scrape()
    return {q.name.lower(): val(m, "rdzv_store_requests_total", type=q.name.lower()) for q in Q}


def requests_since(s: Served, before: dict[str, float]) -> dict[str, float]:
    """The request types counted since ``before`` (a ``request_counts``), and how many of each."""
    return {op: n - before[op] for op, n in request_counts(s).items() if n != before[op]}


def assert_connection_books_balance(m: Metrics) -> None:
    closed = sum(val(m, "rdzv_store_connections_closed_total", reason=r) for r in CLOSE_REASONS)
    assert val(m, "rdzv_store_connections_accepted_total") - closed == val(m, "rdzv_store_connections_open")


# -- requests, bytes, latency ----------------------------------------------------------------


def _exchange() -> list[tuple[int, bytes, int]]:
    """(type, request bytes, reply length) for a sequence of requests on a validated connection."""
    big = b"x" * 1000
    return [
        (Q.SET, p.encode_key_value(Q.SET, b"/k", b"hello"), 0),
        (Q.ADD, p.encode_key_int(Q.ADD, b"/n", 5), 8),
        (Q.GET, p.encode_key(Q.GET, b"/k"), 8 + 5),
        (Q.CHECK, p.encode_keys(Q.CHECK, [b"/k", b"/n"]), 1),
        (Q.COMPARE_SET, p.encode_compare_set(b"/c", b"", big), 8 + len(big)),
        (Q.MULTI_GET, p.encode_keys(Q.MULTI_GET, [b"/k", b"/c"]), 8 + 5 + 8 + len(big)),
        (Q.GETNUMKEYS, p.encode_bare(Q.GETNUMKEYS), 8),
        (Q.PING, p.encode_ping(7), 4),
    ]


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
def test_requests_bytes_and_histogram_move_by_exactly_the_traffic(serve, pipelined: bool) -> None:
    s = serve()
    before = s.scrape()
    raw = Raw(s.port)  # VALIDATE: 5 bytes, no reply
    exchange = _exchange()
    if pipelined:
        raw.send(b"".join(msg for _, msg, _ in exchange))
        raw.recv(sum(n for _, _, n in exchange))
    else:
        for _, msg, reply in exchange:
            raw.send(msg)
            raw.recv(reply)
    after = s.scrape()

    expected: dict[int, list[int]] = {Q.VALIDATE: [1, 5, 0]}
    for op, msg, reply in exchange:
        row = expected.setdefault(op, [0, 0, 0])
        row[0] += 1
        row[1] += len(msg)
        row[2] += reply
    for q in Q:
        label = q.name.lower()
        n, nbytes, nreply = expected.get(q, [0, 0, 0])

        def delta(name: str) -> float:
            return val(after, name, type=label) - val(before, name, type=label)

        assert delta("rdzv_store_requests_total") == n, label
        assert delta("rdzv_store_request_bytes_total") == nbytes, label
        assert delta("rdzv_store_reply_bytes_total") == nreply, label
        assert delta("rdzv_store_request_duration_seconds_count") == n, label
        if n:
            buckets = [val(after, "rdzv_store_request_duration_seconds_bucket", type=label, le=repr(b))
                       for b in LATENCY_BUCKETS]
            inf = val(after, "rdzv_store_request_duration_seconds_bucket", type=label, le="+Inf")
            assert buckets == sorted(buckets) and buckets[-1] <= inf == after[
                ("rdzv_store_request_duration_seconds_count", (("type", label),))]
            assert 0 < val(after, "rdzv_store_request_duration_seconds_sum", type=label) < n * 1.0
    sent = raw.sent
    assert val(after, "rdzv_store_received_bytes_total") - val(before, "rdzv_store_received_bytes_total") == sent
    assert val(after, "rdzv_store_connections_open") == 1
    raw.close()


def test_request_spanning_many_reads_counts_its_exact_size(serve) -> None:
    """A 600 KiB SET arrives in several reads (the generator parser): its size is still exact."""
    s = serve()
    raw = Raw(s.port)
    before = s.scrape()
    msg = p.encode_key_value(Q.SET, b"/big", b"v" * (600 * 1024))
    raw.send(msg)
    raw.sync()
    after = s.scrape()
    assert val(after, "rdzv_store_request_bytes_total", type="set") - val(before, "rdzv_store_request_bytes_total", type="set") == len(msg)
    assert val(after, "rdzv_store_requests_total", type="set") - val(before, "rdzv_store_requests_total", type="set") == 1
    assert val(after, "rdzv_store_value_bytes") == 600 * 1024
    raw.close()


def test_our_clients_requests_are_counted(serve) -> None:
    """What TCPStore operations cost on the wire, as an operator sees it."""
    s = serve()
    with TCPStore(HOST, s.port, timeout=10) as store:
        before = request_counts(s)
        for i in range(10):
            store.add("counter", 1)
        store.set("k", "v")
        assert store.get("k") == b"v"
        assert requests_since(s, before) == {"add": 10, "set": 1, "get": 1}  # a get of a non-empty value is one GET


def test_a_get_that_answers_empty_asks_again_in_a_way_that_can_tell(serve) -> None:
    """Under libuv's rules an empty GET reply is an empty value or a missing key: the client
    settles it with CHECK and MULTI_GET (pipelined), and waits only for a key that is missing."""
    s = serve()

    with TCPStore(HOST, s.port, timeout=10) as store, TCPStore(HOST, s.port, timeout=10) as writer:
        store.set("empty", b"")
        before = request_counts(s)
        assert store.get("empty") == b""  # an empty value is a value: no wait
        assert requests_since(s, before) == {"get": 1, "check": 1, "multi_get": 1}

        before = request_counts(s)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(store.get("later")))
        reader.start()
        eventually(lambda: val(s.scrape(), "rdzv_store_waiters") == 1)
        writer.set("later", b"now")
        reader.join(timeout=10)
        assert got == [b"now"]
        assert requests_since(s, before) == {"get": 1, "check": 1, "multi_get": 2, "wait": 1, "set": 1}


def test_the_asyncio_client_gets_the_same_way(serve) -> None:
    s = serve()

    async def main() -> None:
        store = AsyncTCPStore(HOST, s.port, timeout=10)
        try:
            await store.set("k", b"v")
            await store.set("empty", b"")
            before = request_counts(s)
            assert await store.get("k") == b"v"
            assert requests_since(s, before) == {"get": 1}
            before = request_counts(s)
            assert await store.get("empty") == b""
            assert requests_since(s, before) == {"get": 1, "check": 1, "multi_get": 1}
        finally:
            await store.close()

    asyncio.run(main())


# -- connections -----------------------------------------------------------------------------


def test_connections_accepted_and_closed_by_reason(serve) -> None:
    s = serve(max_buffered=100)
    m0 = s.scrape()
    assert_connection_books_balance(m0)

    def closed(reason: str) -> float:
        return val(s.scrape(), "rdzv_store_connections_closed_total", reason=reason)

    # eof: the client closes
    raw = Raw(s.port)
    raw.sync()
    raw.close()
    eventually(lambda: closed("eof") == 1)

    # reset: the client aborts (RST)
    raw = Raw(s.port)
    raw.sync()
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    eventually(lambda: closed("reset") == 1)

    # malformed: the first request is not VALIDATE
    raw = Raw(s.port, handshake=False)
    raw.send(p.encode_key(Q.GET, b"/x"))
    assert raw.closed_by_server()
    raw.close()
    eventually(lambda: closed("malformed") == 1)

    # malformed: an unknown request type after the handshake
    raw = Raw(s.port)
    raw.send(b"\xee")
    assert raw.closed_by_server()
    raw.close()
    eventually(lambda: closed("malformed") == 2)

    # invalid: ADD on a value that is not an integer
    raw = Raw(s.port)
    raw.send(p.encode_key_value(Q.SET, b"/text", b"abc") + p.encode_key_int(Q.ADD, b"/text", 1))
    assert raw.closed_by_server()
    raw.close()
    eventually(lambda: closed("invalid") == 1)

    # budget: an incomplete request larger than max_buffered (100 bytes)
    raw = Raw(s.port)
    raw.sync()
    raw.send(p.encode_key_value(Q.SET, b"/b", b"y" * 1000)[:300])
    assert raw.closed_by_server()
    raw.close()
    eventually(lambda: closed("budget") == 1)

    m = s.scrape()
    assert val(m, "rdzv_store_connections_accepted_total") - val(m0, "rdzv_store_connections_accepted_total") == 6
    assert val(m, "rdzv_store_connections_open") == 0
    assert_connection_books_balance(m)

    # shutdown: open connections when the server closes
    held = [Raw(s.port) for _ in range(2)]
    for raw in held:
        raw.sync()
    s.stop()
    for raw in held:
        assert raw.closed_by_server()
        raw.close()
    final = parse(s.server.render_metrics())  # the loop has stopped: safe to read from here
    assert val(final, "rdzv_store_connections_closed_total", reason="shutdown") == 2
    assert_connection_books_balance(final)


def test_stalled_connection_is_counted(serve) -> None:
    s = serve(request_timeout=0.1)
    raw = Raw(s.port)
    raw.send(p.encode_key_value(Q.SET, b"/s", b"z" * 100)[:20])
    assert raw.closed_by_server()  # between one and two timeouts later
    raw.close()
    eventually(lambda: val(s.scrape(), "rdzv_store_connections_closed_total", reason="stalled") == 1)


def test_refused_connections_are_counted_apart(serve) -> None:
    s = serve(max_connections=1)
    first = Raw(s.port)
    first.sync()
    second = Raw(s.port, handshake=False)
    assert second.closed_by_server()
    second.close()
    eventually(lambda: val(s.scrape(), "rdzv_store_connections_refused_total") == 1)
    m = s.scrape()
    assert val(m, "rdzv_store_connections_accepted_total") == 1
    assert val(m, "rdzv_store_connections_open") == 1
    assert_connection_books_balance(m)
    first.close()


def test_failed_shared_secret_check_is_counted(serve) -> None:
    s = serve(secret=b"a" * 32)
    with pytest.raises(StoreAuthError):
        TCPStore(HOST, s.port, timeout=5, secret=b"b" * 32)
    eventually(lambda: val(s.scrape(), "rdzv_store_connections_closed_total", reason="auth") == 1)
    with TCPStore(HOST, s.port, timeout=5, secret=b"a" * 32) as store:
        store.set("ok", "1")
        assert store.get("ok") == b"1"


# -- waiters, keys, values, the incomplete-request budget ------------------------------------


def test_waiters_rise_while_clients_block_and_fall_when_released(serve) -> None:
    s = serve()
    waiting = []
    for i in range(3):
        raw = Raw(s.port)
        raw.send(p.encode_keys(Q.WAIT, [b"/gate"]))
        raw.sync()  # the PING is answered after the WAIT was registered
        waiting.append(raw)
        assert val(s.scrape(), "rdzv_store_waiters") == i + 1
    # a waiter whose client goes away is dropped, not released
    quitter = Raw(s.port)
    quitter.send(p.encode_keys(Q.WAIT, [b"/never"]))
    quitter.sync()
    assert val(s.scrape(), "rdzv_store_waiters") == 4
    quitter.close()
    eventually(lambda: val(s.scrape(), "rdzv_store_waiters") == 3)
    released_before = val(s.scrape(), "rdzv_store_waiters_released_total")

    setter = Raw(s.port)
    setter.send(p.encode_key_value(Q.SET, b"/gate", b"open"))
    setter.sync()
    for raw in waiting:
        assert raw.recv(1) == bytes([p.STOP_WAITING])
    m = s.scrape()
    assert val(m, "rdzv_store_waiters") == 0
    assert val(m, "rdzv_store_waiters_released_total") - released_before == 3
    assert val(m, "rdzv_store_requests_total", type="wait") == 4
    for raw in [*waiting, setter]:
        raw.close()


def test_barrier_waiters(serve) -> None:
    s = serve()
    first = Raw(s.port)
    first.send(p.encode_key_int(Q.BARRIER, b"/b", 2))
    first.sync()
    assert val(s.scrape(), "rdzv_store_waiters") == 1
    last = Raw(s.port)
    last.send(p.encode_key_int(Q.BARRIER, b"/b", 2))
    assert last.recv(1) == bytes([p.STOP_WAITING])  # the last arrival is answered at once
    assert first.recv(1) == bytes([p.STOP_WAITING])
    m = s.scrape()
    assert val(m, "rdzv_store_waiters") == 0
    assert val(m, "rdzv_store_waiters_released_total") == 1
    first.close()
    last.close()


def test_keys_values_and_queues(serve) -> None:
    s = serve()
    raw = Raw(s.port)
    values = {b"/a": b"1", b"/b": b"22" * 10, b"/c": b"x" * 3000}
    raw.send(p.encode_multi_set(list(values), list(values.values())))
    raw.send(p.encode_key_value(Q.QUEUE_PUSH, b"/q", b"item-one"))
    raw.send(p.encode_key_value(Q.QUEUE_PUSH, b"/q", b"item-2"))
    raw.sync()
    m = s.scrape()
    assert val(m, "rdzv_store_keys") == 3
    assert val(m, "rdzv_store_value_bytes") == sum(map(len, values.values()))
    assert (val(m, "rdzv_store_queues"), val(m, "rdzv_store_queue_items"), val(m, "rdzv_store_queue_bytes")) == (1, 2, 14)
    assert val(m, "rdzv_store_request_bytes_total", type="multi_set") == len(
        p.encode_multi_set(list(values), list(values.values())))
    raw.send(p.encode_key(Q.DELETE_KEY, b"/c"))
    assert raw.recv(8) == struct.pack("<q", 1)
    raw.send(p.encode_key(Q.QUEUE_POP, b"/q"))
    raw.recv(8 + 8 + 8)
    m = s.scrape()
    assert (val(m, "rdzv_store_keys"), val(m, "rdzv_store_value_bytes")) == (2, 21)
    assert (val(m, "rdzv_store_queue_items"), val(m, "rdzv_store_queue_bytes")) == (1, 6)
    raw.close()


def test_incomplete_request_budget_in_use(serve) -> None:
    s = serve(max_buffered=10_000)
    assert val(s.scrape(), "rdzv_store_incomplete_request_bytes_limit") == 10_000
    raw = Raw(s.port)
    raw.sync()
    msg = p.encode_key_value(Q.SET, b"/half", b"h" * 1000)
    raw.send(msg[:400])
    eventually(lambda: val(s.scrape(), "rdzv_store_incomplete_request_bytes") == 400)
    raw.send(msg[400:])
    raw.sync()
    m = s.scrape()
    assert val(m, "rdzv_store_incomplete_request_bytes") == 0
    assert val(m, "rdzv_store_requests_total", type="set") == 1
    assert val(m, "rdzv_store_request_bytes_total", type="set") == len(msg)
    raw.close()


def test_process_metrics_and_every_family_typed(serve) -> None:
    s = serve()
    with urllib.request.urlopen(f"http://{HOST}:{s.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    families = {f.name: f.type for f in prometheus_parser.text_string_to_metric_families(text)}
    assert families["rdzv_store_request_duration_seconds"] == "histogram"
    assert families["rdzv_store_requests"] == "counter"
    assert families["rdzv_store_waiters"] == "gauge"
    if os.path.exists("/proc/self/stat"):
        m = parse(text)
        assert val(m, "process_resident_memory_bytes") > 1 << 20
        assert val(m, "process_open_fds") >= 3
        assert val(m, "process_start_time_seconds") <= time.time() + 1
    assert "unknown" not in families.values()


# -- the HTTP endpoint -----------------------------------------------------------------------


def _http(port: int, request: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_http_serves_metrics_only(serve) -> None:
    s = serve()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{HOST}:{s.metrics_port}/", timeout=5)
    assert info.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{HOST}:{s.metrics_port}/metrics/x", timeout=5)
    assert info.value.code == 404
    assert scrape(s.metrics_port, "/metrics?name[]=x")  # a query string is ignored
    post = _http(s.metrics_port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post
    head = _http(s.metrics_port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) > 1000  # type: ignore[union-attr]
    assert _http(s.metrics_port, b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    oversize = _http(s.metrics_port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (metrics_http.MAX_HEAD + 100))
    assert oversize.startswith(b"HTTP/1.1 400 ")
    # scrapes are not store connections
    m = s.scrape()
    assert val(m, "rdzv_store_connections_accepted_total") == 0


def test_http_request_time_is_bounded(serve, monkeypatch) -> None:
    monkeypatch.setattr(metrics_http, "TIMEOUT", 0.2)
    s = serve()
    with socket.create_connection((HOST, s.metrics_port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the head
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    assert scrape(s.metrics_port)


def test_http_concurrent_clients_are_bounded(serve, monkeypatch) -> None:
    monkeypatch.setattr(metrics_http, "MAX_CLIENTS", 2)
    s = serve()
    idle = [socket.create_connection((HOST, s.metrics_port), timeout=5) for _ in range(2)]
    try:
        for sock in idle:  # both are being served (they are sending their head slowly)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        extra = socket.create_connection((HOST, s.metrics_port), timeout=5)
        with extra:
            extra.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            try:
                assert extra.recv(100) == b""  # closed at once, unanswered
            except ConnectionResetError:
                pass
        for sock in idle:
            sock.sendall(b"\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in idle:
            sock.close()
    assert scrape(s.metrics_port)


# -- configuration ---------------------------------------------------------------------------


def test_metrics_off_by_default() -> None:
    server = StoreServer(HOST, 0)
    assert server.metrics is None and server.metrics_port is None
    with pytest.raises(RuntimeError, match="metrics are off"):
        server.render_metrics()


@pytest.mark.parametrize("bad", [-1, 65536, True, "9100", ("", 0), (None, 0), ("127.0.0.1", -5), ("127.0.0.1",)])
def test_bad_metrics_arguments(bad: object) -> None:
    with pytest.raises(ValueError, match="metrics"):
        StoreServer(HOST, 0, metrics=bad)  # type: ignore[arg-type]


def test_metrics_on_an_explicit_host(serve) -> None:
    server = StoreServer(HOST, 0, metrics=("localhost", 0))
    bg = BackgroundServer(server)
    try:
        hosts = {h for h, _ in server.metrics_addresses}
        assert "127.0.0.1" in hosts
        assert len({pt for _, pt in server.metrics_addresses}) == 1  # one port for every address
        assert scrape(server.metrics_port)  # type: ignore[arg-type]
    finally:
        bg.stop()


def test_metrics_port_in_use_fails_start_and_leaves_nothing_listening() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = StoreServer(HOST, 0, metrics=port)

        async def attempt() -> None:
            with pytest.raises(StoreConnectionError, match="metrics endpoint.*address already in use"):
                await server.start()
            assert server.addresses == [] and server.metrics_port is None

        asyncio.run(attempt())


# -- the command line ------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    return env


def _read_lines_until(proc: subprocess.Popen, pattern: str, timeout: float = 30.0) -> re.Match:
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    buf = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            rest = (proc.stdout.read() or b"").decode(errors="replace")
            raise AssertionError(f"serve exited with {proc.returncode}: {buf + rest}")
        chunk = proc.stdout.read()
        if chunk:
            buf += chunk.decode(errors="replace")
            found = re.search(pattern, buf)
            if found:
                return found
        else:
            time.sleep(0.01)
    raise AssertionError(f"no {pattern!r} within {timeout} s: {buf!r}")


def test_cli_serve_with_metrics_port_zero() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv_store", "serve", "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True,
    )
    try:
        found = _read_lines_until(proc, r"listening on \S+ port (\d+)\n(?:.*\n)*?.*metrics on http://127\.0\.0\.1:(\d+)/metrics")
        port, mport = int(found.group(1)), int(found.group(2))
        with TCPStore(HOST, port, timeout=10) as store:
            store.add("x", 2)
        m = scrape(mport)
        assert val(m, "rdzv_store_requests_total", type="add") == 1
        assert val(m, "rdzv_store_keys") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metrics-host", ""], "--metrics-host"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--metrics-port", "-1"], "--metrics-port"),
        (["--metrics-host", "127.0.0.1"], "--metrics-host"),  # without --metrics-port
    ],
)
def test_cli_rejects_bad_metrics_options(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rdzv_store", "serve", "--port", "0", *args],
        capture_output=True, text=True, env=_env(), timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("rdzv-store: error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_metrics_port_in_use_is_one_line_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "rdzv_store", "serve", "--port", "0", "--metrics-port", str(port)],
            capture_output=True, text=True, env=_env(), timeout=30,
        )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "metrics endpoint" in proc.stderr and "address already in use" in proc.stderr


# -- the README ------------------------------------------------------------------------------


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Metrics\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_readme_metrics_example_runs_as_shown(tmp_path: Path) -> None:
    section = _readme_section()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    shown = re.search(r"```\n(rdzv_store_.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    script = tmp_path / "readme_metrics.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == shown


def test_readme_documents_every_metric_and_the_alert_uses_real_ones(serve) -> None:
    section = _readme_section()
    documented = set(re.findall(r"^\| `([a-z_]+)`", section, re.M))
    s = serve()
    raw = Raw(s.port)
    raw.sync()  # so the histogram has a series
    with urllib.request.urlopen(f"http://{HOST}:{s.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    served = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    assert documented == served
    alert = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    used = set(re.findall(r"\b((?:rdzv_store|process)_[a-z_]+)", alert))
    assert used and used <= served
    raw.close()


# -- StoreServer's docstrings (the project's rule: a Raises: section on every public member) ---


@pytest.mark.parametrize("cls", [StoreServer, BackgroundServer], ids=lambda c: c.__name__)
def test_server_docstrings_say_what_they_raise(cls: type) -> None:
    import inspect

    members = {"": cls}
    for name, value in vars(cls).items():
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
            members[name] = value
    assert len(members) > 2
    for name, member in members.items():
        doc = inspect.cleandoc(member.__doc__ or "")
        assert "\nRaises:\n" in doc, f"{cls.__name__}.{name}: no Raises: section"
        entries = doc.split("\nRaises:\n", 1)[1].split("\n\n")[0].splitlines()
        first = [e.strip() for e in entries if len(e) - len(e.lstrip()) == 4]
        assert first, f"{cls.__name__}.{name}: empty Raises: section"
        for entry in first:
            head = re.match(r"[\w.]+", entry).group().rstrip(".")  # type: ignore[union-attr]
            assert head in {"Nothing", "ValueError", "TypeError", "RuntimeError", "TimeoutError",
                            "StoreConnectionError", "asyncio.CancelledError"}, (cls.__name__, name, entry)


# -- the benchmark (a smoke test, so that it cannot rot; it asserts nothing about speed) -----


def test_bench_metrics_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "metrics.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_metrics", "--tiny", "--reps", "5", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, env=_env(), timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = out.read_text()
    for heading in ("## 1. The update alone", "## 2. Server CPU per request, in process",
                    "## 3. Small-op round trips", "## 4. Pipelined load"):
        assert heading in report
    assert "Scrapes checked: 50 " in report  # 5 repetitions x 5 slices x (round trips, pipelined)
