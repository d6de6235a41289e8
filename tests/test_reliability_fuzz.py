"""Fuzzing the server: hypothesis-generated request streams and a raw mutation campaign.

* ``test_valid_streams_match_a_model``: hypothesis builds sequences of valid
  requests, sends them cut at random points, and compares every reply byte
  with a model (``Engine`` plus the wire encoders), including the position of
  STOP_WAITING bytes released by later writes in the same stream.
* ``test_mutated_streams``: hypothesis mutates valid streams (bit flips,
  insertions, deletions, truncation, huge length prefixes).
* ``test_mutation_campaign``: high volume, plain ``random``: several
  connections at once blast mutated streams (10k requests; 100k+ with
  RDZV_LONG_TESTS=1) while an observer client does checked store operations.

After each: the server is alive and answering, the observer saw no error,
no waiter or connection is left behind, the server logged no error or
traceback, and its RSS grew by less than a fixed bound.
"""

from __future__ import annotations

import random
import selectors
import socket
import struct
import threading
import time
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import LONG, ServerProcess, ping, poll_until, raw_client, recv_exactly, scale

from rdzv_store import TCPStore
from rdzv_store import protocol as p
from rdzv_store.engine import Engine

Q = p.QueryType
U64 = struct.Struct("<Q")
I64 = struct.Struct("<q")

FUZZ_SETTINGS = settings(
    max_examples=scale(150, 3000),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- requests as tuples, their encoding, and the model -----------------------------------------

KEYS = [b"/f/a", b"/f/b", b"/f/c", b"/f/n", b"/f/q", b"/f/bar"]
key_st = st.sampled_from(KEYS)
value_st = st.one_of(st.binary(max_size=24), st.integers(-(2**63), 2**63 - 1).map(lambda n: str(n).encode()))
int_st = st.one_of(st.integers(-5, 5), st.integers(-(2**63), 2**63 - 1))
keys_st = st.lists(key_st, min_size=0, max_size=4)

request_st = st.one_of(
    st.tuples(st.just(Q.SET), key_st, value_st),
    st.tuples(st.just(Q.GET), key_st),
    st.tuples(st.just(Q.ADD), key_st, int_st),
    st.tuples(st.just(Q.COMPARE_SET), key_st, value_st, value_st),
    st.tuples(st.just(Q.CHECK), keys_st),
    st.tuples(st.just(Q.WAIT), keys_st),
    st.tuples(st.just(Q.GETNUMKEYS)),
    st.tuples(st.just(Q.DELETE_KEY), key_st),
    st.tuples(st.just(Q.APPEND), key_st, value_st),
    st.tuples(st.just(Q.MULTI_GET), keys_st),
    st.lists(st.tuples(key_st, value_st), max_size=3).map(lambda kv: (Q.MULTI_SET, [k for k, _ in kv], [v for _, v in kv])),
    st.tuples(st.just(Q.CANCEL_WAIT)),
    st.tuples(st.just(Q.PING), st.binary(min_size=4, max_size=4)),
    st.tuples(st.just(Q.QUEUE_PUSH), key_st, value_st),
    st.tuples(st.just(Q.QUEUE_POP), key_st),
    st.tuples(st.just(Q.QUEUE_LEN), key_st),
    st.tuples(st.just(Q.LIST_KEYS)),
    st.tuples(st.just(Q.BARRIER), key_st, st.integers(-3, 6)),
)


def encode(req: tuple) -> bytes:
    op = req[0]
    if op in (Q.SET, Q.APPEND, Q.QUEUE_PUSH):
        return p.encode_key_value(op, req[1], req[2])
    if op in (Q.GET, Q.DELETE_KEY, Q.QUEUE_POP, Q.QUEUE_LEN):
        return p.encode_key(op, req[1])
    if op in (Q.CHECK, Q.WAIT, Q.MULTI_GET):
        return p.encode_keys(op, req[1])
    if op in (Q.ADD, Q.BARRIER):
        return p.encode_key_int(op, req[1], req[2])
    if op == Q.COMPARE_SET:
        return p.encode_compare_set(req[1], req[2], req[3])
    if op == Q.MULTI_SET:
        return p.encode_multi_set(req[1], req[2])
    if op == Q.PING:
        return bytes([Q.PING]) + req[1]
    return p.encode_bare(op)


def model(engine: Engine, requests: list[tuple]) -> tuple[bytes, bool]:
    """The reply bytes a correct server sends for ``requests`` on one connection, and whether
    it closes the connection (a failing ADD or BARRIER)."""
    out = bytearray()
    waiters = []

    def notify() -> None:
        out.extend(b"\x00")

    def register(waiter) -> None:
        if waiter is None:
            out.extend(b"\x00")
        else:
            waiters.append(waiter)

    closed = False
    for req in requests:
        op = req[0]
        try:
            if op == Q.SET:
                engine.set(req[1], req[2])
            elif op == Q.GET:
                out += p.reply_bytes(engine.get(req[1]) or b"")
            elif op == Q.ADD:
                out += p.reply_i64(engine.add(req[1], req[2]))
            elif op == Q.COMPARE_SET:
                out += p.reply_bytes(engine.compare_set(req[1], req[2], req[3]))
            elif op == Q.CHECK:
                out += p.reply_u8(p.READY if engine.check(req[1]) else p.NOT_READY)
            elif op == Q.WAIT:
                register(engine.wait(req[1], notify))
            elif op == Q.GETNUMKEYS:
                out += p.reply_i64(engine.num_keys())
            elif op == Q.DELETE_KEY:
                out += p.reply_i64(1 if engine.delete(req[1]) else 0)
            elif op == Q.APPEND:
                engine.append(req[1], req[2])
            elif op == Q.MULTI_GET:
                out += p.reply_list([v or b"" for v in engine.multi_get(req[1])])
            elif op == Q.MULTI_SET:
                engine.multi_set(req[1], req[2])
            elif op == Q.CANCEL_WAIT:
                for w in waiters:
                    engine.cancel(w)
                waiters.clear()
                out += p.reply_u8(p.WAIT_CANCELED)
            elif op == Q.PING:
                out += req[1]
            elif op == Q.QUEUE_PUSH:
                engine.queue_push(req[1], req[2])
            elif op == Q.QUEUE_POP:
                out += p.reply_queue_pop(*engine.queue_pop(req[1]))
            elif op == Q.QUEUE_LEN:
                out += p.reply_i64(engine.queue_len(req[1]))
            elif op == Q.LIST_KEYS:
                keys = engine.list_keys()
                out += p.reply_i64(len(keys)) + p.reply_list(keys)
            elif op == Q.BARRIER:
                register(engine.barrier(req[1], req[2], notify))
        except ValueError:
            closed = True
            break
    for w in waiters:  # the connection ends: its waiters are dropped
        engine.cancel(w)
    return bytes(out), closed


def send_in_pieces(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        if cut > last:
            sock.sendall(data[last:cut])
            last = cut


def read_to_eof(sock: socket.socket, timeout: float) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the server neither answered nor closed"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def assert_clean_log(server: ServerProcess) -> None:
    bad = [line for line in server.log_lines if line.startswith(("ERROR", "CRITICAL")) or "Traceback" in line]
    assert not bad, bad[:5]


# -- hypothesis: valid streams against the model -----------------------------------------------


def test_valid_streams_match_a_model():
    with ServerProcess() as server:
        engine = Engine()
        checked = [0]

        @FUZZ_SETTINGS
        @given(requests=st.lists(request_st, min_size=1, max_size=40), cuts=st.lists(st.integers(0, 10**6), max_size=6))
        def run(requests, cuts):
            expected, closes = model(engine, requests)
            stream = b"".join(encode(r) for r in requests)
            with raw_client(server.port) as sock:
                try:
                    send_in_pieces(sock, stream, cuts)
                except OSError:
                    assert closes  # the server closed a connection whose request failed
                if closes:
                    got = read_to_eof(sock, 10)
                    assert got == expected
                else:
                    assert recv_exactly(sock, len(expected)) == expected
                    ping(sock, 0xC0FFEE)  # nothing extra was sent before the echo
            checked[0] += len(requests)

        run()
        assert checked[0] > 0
        print(f"\nmodel check: {checked[0]} valid requests, replies byte-identical to the model")
        poll_until(lambda: server.stats()["waiters"] == 0 and server.stats()["connections"] == 0, 10)
        assert_clean_log(server)


# -- hypothesis: mutated streams ----------------------------------------------------------------

mutation_st = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 9)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("huge"), st.integers(0, 10**6), st.sampled_from([2**32, 2**40, 2**63, 2**64 - 1, 3 * 10**9])),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    return mutate_tracked(data, mutations)[0]


def mutate_tracked(data: bytes, mutations: list[tuple]) -> tuple[bytes, int]:
    """Apply ``mutations`` in turn; also return how many leading bytes none of them touched
    (each changes or shifts only bytes at or after its own position)."""
    buf = bytearray(data)
    untouched = len(buf)
    for kind, pos, arg in mutations:
        if not buf:
            break
        pos %= len(buf)
        untouched = min(untouched, pos)
        if kind == "flip":
            buf[pos] ^= 1 << arg
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos : pos + arg]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "huge":
            buf[pos : pos + 8] = U64.pack(arg)
    return bytes(buf), untouched


class Observer:
    """A well-behaved TCPStore client doing checked operations until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.errors: list[BaseException] = []
        self.ops = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            store = TCPStore("127.0.0.1", self.port, timeout=timedelta(seconds=30))
            i = 0
            while not self._stop.is_set() and i < 10**7:
                store.set(f"obs/{i % 7}", f"value {i}")
                assert store.get(f"obs/{i % 7}") == f"value {i}".encode()
                assert store.add("obs/count", 1) == i + 1
                assert store.compare_set("obs/cas", b"" if i == 0 else f"{i - 1}", f"{i}") == f"{i}".encode()
                store.wait([f"obs/{i % 7}"], timedelta(seconds=10))
                i += 1
                self.ops += 5
            store.close()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()
        assert not self.errors, self.errors
        assert self.ops > 0


def test_mutated_streams():
    with ServerProcess(request_timeout=5) as server:
        observer = Observer(server.port)
        base_rss = server.rss_kib()
        count = [0]

        @FUZZ_SETTINGS
        @given(
            requests=st.lists(request_st, min_size=1, max_size=30),
            mutations=st.lists(mutation_st, min_size=1, max_size=4),
            validate=st.booleans(),
        )
        def run(requests, mutations, validate):
            stream = mutate(b"".join(encode(r) for r in requests), mutations)
            if not validate:  # mutate the handshake too
                stream = mutate(p.encode_validate(), mutations[:1]) + stream
            with raw_client(server.port, validate=validate) as sock:
                try:
                    sock.sendall(stream)
                    sock.shutdown(socket.SHUT_WR)  # a truncated request must not hang us
                except OSError:
                    pass  # closed by the server while we sent: fine
                read_to_eof(sock, 10)
            count[0] += len(requests)

        run()
        observer.stop()
        print(f"\nhypothesis mutations: {count[0]} requests in mutated streams")
        poll_until(lambda: server.stats()["waiters"] == 0 and server.stats()["connections"] == 0, 10)
        assert server.alive()
        assert server.rss_kib() - base_rss < 64 * 1024
        assert_clean_log(server)


# -- raw mutation campaign ----------------------------------------------------------------------


VALUE_KEYS = [b"/v/a", b"/v/b", b"/v/c", b"/v/q"]
COUNTER_KEYS = [b"/c/n", b"/c/m"]  # only ADD and BARRIER write these, so a valid ADD never fails


def random_request(rng: random.Random) -> bytes:
    keys = VALUE_KEYS + [b"/v/" + bytes([rng.randrange(256)])]
    key = rng.choice(keys)
    value = rng.randbytes(rng.choice((0, 1, 8, 24, 100)))
    op = rng.randrange(1, 19)
    if op in (Q.SET, Q.APPEND, Q.QUEUE_PUSH):
        return p.encode_key_value(op, key, value)
    if op in (Q.GET, Q.DELETE_KEY, Q.QUEUE_POP, Q.QUEUE_LEN):
        return p.encode_key(op, rng.choice((key, rng.choice(COUNTER_KEYS))))
    if op in (Q.CHECK, Q.WAIT, Q.MULTI_GET):
        return p.encode_keys(op, rng.sample(keys + COUNTER_KEYS, rng.randrange(0, 4)))
    if op == Q.ADD:
        return p.encode_key_int(op, rng.choice(COUNTER_KEYS), rng.choice((1, -1, 2**62, rng.randrange(-(2**63), 2**63))))
    if op == Q.BARRIER:
        return p.encode_key_int(op, rng.choice(COUNTER_KEYS), rng.randrange(-2, 5))
    if op == Q.COMPARE_SET:
        return p.encode_compare_set(key, rng.choice((b"", value)), value)
    if op == Q.MULTI_SET:
        n = rng.randrange(0, 4)
        return p.encode_multi_set(rng.sample(keys, n), [value] * n)
    if op == Q.PING:
        return p.encode_ping(rng.randrange(2**32))
    return p.encode_bare(op)


def random_mutations(rng: random.Random) -> list[tuple]:
    """None for a third of the streams, else one to three of the ``mutate`` kinds."""
    kinds = ["flip", "insert", "delete", "truncate", "huge"]
    mutations = []
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        kind = rng.choice(kinds)
        arg = {
            "flip": rng.randrange(8),
            "insert": rng.randbytes(rng.randrange(1, 9)),
            "delete": rng.randrange(1, 9),
            "truncate": 0,
            "huge": rng.choice([2**32, 2**40, 2**63, 2**64 - 1, 3 * 10**9]),
        }[kind]
        mutations.append((kind, rng.randrange(10**6), arg))
    return mutations


def intact_requests(requests: list[bytes], untouched: int) -> int:
    """How many leading requests lie wholly in the untouched prefix (so the server ran them)."""
    done = offset = 0
    for r in requests:
        offset += len(r)
        if offset > untouched:
            break
        done += 1
    return done


def blast(port: int, stream: bytes, timeout: float) -> None:
    """Send ``stream`` on a validated connection while draining replies, then half-close
    and drain to EOF. Never blocks longer than ``timeout``."""
    sock = raw_client(port)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view = memoryview(stream)
    if not view:  # mutated down to nothing: an idle connection, which the server keeps
        sock.shutdown(socket.SHUT_WR)
        sel.modify(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "fuzz connection neither finished nor was closed"
            for _, events in sel.select(remaining):
                if events & selectors.EVENT_READ:
                    try:
                        if not sock.recv(1 << 20):
                            return  # closed by the server (or after our FIN)
                    except (ConnectionResetError, BlockingIOError):
                        if not view:
                            return
                if events & selectors.EVENT_WRITE and view:
                    try:
                        view = view[sock.send(view) :]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    if not view:
                        sock.shutdown(socket.SHUT_WR)
                        sel.modify(sock, selectors.EVENT_READ)
    finally:
        sel.close()
        sock.close()


def test_mutation_campaign():
    target = scale(10_000, 500_000)
    workers = 4
    seed = random.randrange(2**32)
    with ServerProcess(request_timeout=5) as server:
        observer = Observer(server.port)
        base_rss = server.rss_kib()
        peak_rss = base_rss
        totals = [0] * workers  # requests that reached the server intact (and so were run)
        sent = [0] * workers
        errors: list[BaseException] = []

        def worker(w: int) -> None:
            rng = random.Random(seed + w)
            try:
                while totals[w] < target // workers:
                    requests = [random_request(rng) for _ in range(rng.randrange(1, 400))]
                    mutations = random_mutations(rng)
                    stream, untouched = mutate_tracked(b"".join(requests), mutations)
                    blast(server.port, stream, 30)
                    sent[w] += len(requests)
                    totals[w] += intact_requests(requests, untouched)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
        started = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak_rss = max(peak_rss, server.rss_kib())
            for t in threads:
                t.join(timeout=0.2)
        elapsed = time.monotonic() - started
        assert not errors, (seed, errors[:3])
        observer.stop()
        poll_until(lambda: server.stats()["connections"] == 0, 10)
        stats = server.stats()
        assert stats["waiters"] == 0
        assert server.alive()
        grown = max(peak_rss, server.rss_kib()) - base_rss
        print(
            f"\nfuzz campaign: {sum(totals)} intact requests run ({sum(sent)} sent) in {elapsed:.1f} s (seed {seed}), "
            f"{len(server.warnings('closing connection'))} connections closed by the server, "
            f"observer did {observer.ops} ops, RSS {base_rss} KiB -> peak {peak_rss} KiB "
            f"(+{grown} KiB), keys {stats['keys']}"
        )
        assert sum(totals) >= target
        assert grown < 64 * 1024, (seed, grown)
        assert_clean_log(server)
        if LONG:
            assert sum(totals) >= 100_000
