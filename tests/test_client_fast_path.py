"""The blocking client's fast path (issue 12): same bytes on the wire, same values as the
generator parsers, and the generic path still decides for partial or unusual replies."""

from __future__ import annotations

import struct

import pytest

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
    (c.multi_get([])[1], b""),
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
