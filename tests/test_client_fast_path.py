"""The blocking client's fast path (issue 12): same bytes on the wire, same values as the
generator parsers, and the generic path still decides for partial or unusual replies.

``Connection.call``/``call_many`` on a connection in steady use send and receive in one frame
(``_steady``/``_exchange``); what that path cannot finish (a reply split across segments, an
end of stream, a timeout) must end exactly as the general reader ends it.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import pytest

from rdzv_store import StoreConnectionError, StoreTimeoutError
from rdzv_store import commands as c
from rdzv_store import protocol as p

Q = p.QueryType


@pytest.mark.parametrize("key", [b"", b"k", b"x" * 300])
def test_requests_are_the_protocol_encoders_bytes(key: bytes) -> None:
    v = b"value"
    raw = b"/" + key
    assert c.set_(key, v)[0] == p.encode_key_value(Q.SET, raw, v)
    assert c.append(key, v)[0] == p.encode_key_value(Q.APPEND, raw, v)
    assert c.queue_push(key, v)[0] == p.encode_key_value(Q.QUEUE_PUSH, raw, v)
    assert c.add(key, -5)[0] == p.encode_key_int(Q.ADD, raw, -5)
    assert c.barrier(key, 7)[0] == p.encode_key_int(Q.BARRIER, raw, 7)
    assert c.delete_key(key)[0] == p.encode_key(Q.DELETE_KEY, raw)
    assert c.get(key)[0] == p.encode_key(Q.GET, raw)
    assert c.queue_pop(key)[0] == p.encode_key(Q.QUEUE_POP, raw)
    assert c.queue_len(key)[0] == p.encode_key(Q.QUEUE_LEN, raw)
    for keys in ([key], [key, b"b"], []):
        wire = [b"/" + k for k in keys]
        assert c.check(keys)[0] == p.encode_keys(Q.CHECK, wire)
        assert c.wait(keys)[0] == p.encode_keys(Q.WAIT, wire)
        assert c.multi_get(keys)[0] == p.encode_keys(Q.MULTI_GET, wire)
        both = p.encode_keys(Q.CHECK, wire) + p.encode_keys(Q.MULTI_GET, wire)
        assert c.check_then_multi_get(keys)[0] == both


def _generic(parser: p.ReplyParser, data: bytes) -> object:
    decoder = p.StreamDecoder()
    decoder.feed(data)
    return decoder.decode(parser)


_V = struct.pack("<Q", 3) + b"abc"
CASES = [
    (c.check([b"k"])[1], b"\x00"),
    (c.check([b"k"])[1], b"\x01"),
    (c.add(b"k", 1)[1], struct.pack("<q", -42)),
    (c.delete_key(b"k")[1], struct.pack("<q", 1)),
    (c.get_raw(b"k")[1], _V),
    (c.get_raw(b"k")[1], struct.pack("<Q", 0)),
    (c.multi_get([b"a", b"b"])[1], _V + _V),
    (c.multi_get([b"a"])[1], _V),
    (c.queue_pop(b"q")[1], struct.pack("<q", 0)),
    (c.queue_pop(b"q")[1], struct.pack("<q", 2) + _V),
    (c.num_keys()[1], struct.pack("<q", 9)),
]


@pytest.mark.parametrize(("parser", "data"), CASES)
def test_fast_readers_agree_with_the_generators(parser: p.ReplyParser, data: bytes) -> None:
    assert isinstance(parser, c.Reply)
    buf = memoryview(bytearray(b"\xff" + data + b"\xee"))  # other bytes around the reply
    assert parser.fast(buf, 1, 1 + len(data)) == (_generic(parser, data), 1 + len(data))
    if data:  # incomplete: declined, for the generator to finish
        assert parser.fast(buf, 1, len(data)) is None


def test_fast_reader_declines_a_value_over_the_limit() -> None:
    parser = c.get_raw(b"k")[1]
    assert isinstance(parser, c.Reply)
    data = struct.pack("<Q", p.Limits.max_value + 1) + b"x" * 16
    assert parser.fast(memoryview(data), 0, len(data)) is None
    with pytest.raises(p.ProtocolError, match="exceeds the limit"):
        _generic(parser, data)


def test_an_empty_reply_is_never_waited_for() -> None:
    """MULTI_GET of no keys has an empty reply: its parser is a plain one, so no path receives
    (a receive would wait for bytes the server never sends)."""
    parser = c.multi_get([])[1]
    assert parser is not None and not isinstance(parser, c.Reply)
    assert _generic(parser, b"") == []


class _Trickle:
    """A socket whose every ``recv_into`` returns at most ``most`` bytes: replies split anywhere."""

    def __init__(self, sock: socket.socket, most: int) -> None:
        self._sock = sock
        self.most = most
        self.reads = 0

    def recv_into(self, buf: Any, nbytes: int = 0) -> int:
        self.reads += 1
        return self._sock.recv_into(buf, min(nbytes or len(buf), self.most))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _steady(store: Any) -> Any:
    """The store's connection with the idle check off, so every request may take the fast path."""
    conn = store._conn
    conn._IDLE_CHECK = float("inf")
    return conn


@pytest.mark.parametrize("most", [1, 3, 9])
def test_replies_split_across_reads_give_the_same_values(tcp_store_factory, most: int) -> None:
    store = tcp_store_factory()
    conn = _steady(store)
    big = bytes(range(256)) * 8
    store.set("v", big)
    store.set("c", b"old")
    conn._sock = trickle = _Trickle(conn._sock, most)
    for expected in (1, 2, 3):
        assert store.add("n", 1) == expected
    assert store.check(["v", "c"]) is True
    assert store.check(["v", "missing"]) is False
    assert store.get("v") == big
    assert store.multi_get(["v", "c"]) == [big, b"old"]
    assert store.compare_set("c", b"old", b"new") == b"new"
    assert store.delete_key("c") is True
    assert store.multi_get([]) == []
    assert trickle.reads > (8 + len(big)) // most  # the replies really came in pieces
    trickle.most = 1 << 16  # whole again: the connection is still in step
    assert store.add("n", 10) == 13
    assert store.get("v") == big


def test_a_reply_that_stops_coming_times_out_naming_the_request(fault_proxy, tcp_store_factory) -> None:
    store = tcp_store_factory(port=fault_proxy.port, timeout=0.5)
    _steady(store)
    assert store.add("n", 1) == 1
    fault_proxy.stall("to_client")
    started = time.monotonic()
    with pytest.raises(StoreTimeoutError) as info:
        store.add("n", 1)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert str(info.value) == f"no reply from the store at {fault_proxy.address} within 500ms (add on key /n)"
    assert store._conn._sock is None  # out of step: dropped, the next call reconnects


def test_a_connection_cut_while_a_reply_is_due_names_the_request(fault_proxy, tcp_store_factory) -> None:
    store = tcp_store_factory(port=fault_proxy.port, timeout=5)
    _steady(store)
    assert store.check(["k"]) is False
    fault_proxy.drop("to_server")  # the next request never reaches the server...
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: _record(outcome, lambda: store.check(["k"])))
    worker.start()
    fault_proxy.wait_until(lambda stats: stats.dropped_to_server > 0)
    fault_proxy.cut()  # ...and the connection is reset while the client waits for its reply
    worker.join(10)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], StoreConnectionError), outcome
    assert fault_proxy.address in str(outcome[0]) and "check" in str(outcome[0])


def _record(outcome: list[BaseException], call: Any) -> None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 (the test inspects it)
        outcome.append(exc)


def test_requests_on_a_busy_connection_take_the_one_frame_path(tcp_store_factory, monkeypatch) -> None:
    """The figures in CHANGELOG and pairs.md rest on it: once a connection is in use, no small
    request goes through send() and read() (the general path), and every reply is still right."""
    from rdzv_store.client import Connection

    store = tcp_store_factory()
    _steady(store)
    store.set("v", b"value")
    assert store.add("n", 1) == 1  # in use now
    general: list[str] = []
    for name in ("send", "read"):
        method = getattr(Connection, name)
        monkeypatch.setattr(Connection, name, lambda self, *a, _m=method, _n=name, **k: general.append(_n) or _m(self, *a, **k))
    assert store.add("n", 1) == 2
    assert store.check(["v"]) is True
    assert store.get("v") == b"value"
    assert store.compare_set("v", b"value", b"other") == b"other"
    assert store.multi_get(["v", "n"]) == [b"other", b"2"]
    assert store.delete_key("n") is True
    assert general == []
    store.set("w", b"x")  # no reply: the general path, as before
    assert general == ["send"]
