"""The sans-I/O codec: requests and replies survive any split or merge of the byte stream."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdzv_store import commands as cmd
from rdzv_store import protocol as p

Q = p.QueryType
keys_st = st.binary(max_size=40)
values_st = st.binary(max_size=300)
key_lists = st.lists(keys_st, max_size=6)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, tuple]:
    """A request as (wire bytes from the client encoders, the tuple the server must parse)."""
    op = draw(st.sampled_from(list(Q)))
    if op in (Q.SET, Q.APPEND, Q.QUEUE_PUSH):
        k, v = draw(keys_st), draw(values_st)
        return p.encode_key_value(op, k, v), (op, k, v)
    if op in (Q.GET, Q.DELETE_KEY, Q.QUEUE_POP, Q.QUEUE_LEN):
        k = draw(keys_st)
        return p.encode_key(op, k), (op, k)
    if op in (Q.CHECK, Q.WAIT, Q.MULTI_GET):
        ks = draw(key_lists)
        return p.encode_keys(op, ks), (op, ks)
    if op in (Q.ADD, Q.BARRIER):
        k, n = draw(keys_st), draw(st.integers(-(2**63), 2**63 - 1))
        return p.encode_key_int(op, k, n), (op, k, n)
    if op == Q.COMPARE_SET:
        k, e, d = draw(keys_st), draw(values_st), draw(values_st)
        return p.encode_compare_set(k, e, d), (op, k, e, d)
    if op == Q.MULTI_SET:
        ks = draw(key_lists)
        vs = [draw(values_st) for _ in ks]
        return p.encode_multi_set(ks, vs), (op, ks, vs)
    if op == Q.PING:
        nonce = draw(st.integers(0, 2**32 - 1))
        return p.encode_ping(nonce), (op, struct.pack("<I", nonce))
    if op == Q.VALIDATE:
        return p.encode_validate(), (op, p.MAGIC)
    return p.encode_bare(op), (op,)


def decode_all(chunks: list[bytes], limits: p.Limits = p.Limits()) -> list[tuple]:
    decoder = p.StreamDecoder(limits.max_request)
    out = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (request := decoder.decode(lambda: p.read_request(limits))) is not p.NEED_DATA:
            out.append(request)
    assert not decoder.in_message, "bytes left over after the last complete request"
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=300, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_pipelined_requests_parse_identically_under_any_split(reqs, cuts):
    stream = b"".join(wire for wire, _ in reqs)
    assert decode_all(split(stream, cuts)) == [expected for _, expected in reqs]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(requests(), min_size=1, max_size=8),
    st.lists(st.integers(0, 10_000), max_size=12),
    st.lists(st.integers(0, 3), max_size=12),
    st.booleans(),
)
def test_lent_buffer_parses_identically_and_is_never_read_after_it_is_handed_back(reqs, cuts, stops, use_sole):
    # The server's way: every chunk is received into ONE shared buffer; a chunk that is one
    # whole request with nothing pending is taken by sole(), anything else is lent to the
    # decoder, which parses complete requests (fast parser) straight out of it. After NEED_DATA,
    # or keep() when the server stops early (backpressure), the buffer is scribbled over, as the
    # next connection's recv_into would: any byte read after that would corrupt a request.
    limits = p.Limits()
    start = lambda: p.read_request(limits)  # noqa: E731
    fast = p.fast_request_parser(limits)
    decoder = p.StreamDecoder(limits.max_request)
    shared = bytearray(20_000)
    stream = b"".join(wire for wire, _ in reqs)
    out = []
    for index, chunk in enumerate(split(stream, cuts)):
        shared[: len(chunk)] = chunk
        sole = decoder.sole(shared, len(chunk), fast) if use_sole else None
        if sole is not None:
            assert decoder.last_size == len(chunk)
            out.append(sole)
            shared[:] = b"\xee" * len(shared)
            continue
        decoder.lend(shared, len(chunk))
        budget = stops[index] if index < len(stops) and stops[index] else None  # requests before an early stop
        while budget is None or budget > 0:
            request = decoder.decode(start, fast)
            if request is p.NEED_DATA:
                break
            out.append(request)
            budget = None if budget is None else budget - 1
        decoder.keep()
        shared[:] = b"\xee" * len(shared)
    while (request := decoder.decode(start, fast)) is not p.NEED_DATA:  # what the early stops left
        out.append(request)
    assert out == [expected for _, expected in reqs]
    assert not decoder.in_message


def test_sole_takes_only_a_whole_single_request_with_nothing_pending():
    limits = p.Limits()
    fast = p.fast_request_parser(limits)
    add = p.encode_key_int(Q.ADD, b"/k", 1)
    buf = bytearray(add + add)
    decoder = p.StreamDecoder(limits.max_request)
    assert decoder.sole(buf, len(add), fast) == (Q.ADD, b"/k", 1)
    assert decoder.sole(buf, len(add) - 1, fast) is None  # incomplete
    assert decoder.sole(buf, 2 * len(add), fast) is None  # two requests: lend() takes them
    decoder.feed(add[:3])  # part of a request pending: the next bytes belong to it
    assert decoder.sole(buf, len(add), fast) is None
    assert decoder.buffered == 3  # declining consumed nothing
    small = p.StreamDecoder(len(add) - 1)  # over the message bound: decode() raises, not sole()
    assert small.sole(buf, len(add), fast) is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(requests(), min_size=1, max_size=8),
    st.lists(st.integers(0, 10_000), max_size=12),
    st.lists(st.booleans(), max_size=40),
)
def test_fields_received_in_place_parse_identically(reqs, cuts, use_slot):
    # The server's way for big fields (in_place=16 here, so the small generated values qualify):
    # once an eighth of a field is buffered, the rest is received into field_slot, a buffer of the
    # field's final size. Bytes may also arrive by feed meanwhile; both must end up in the field.
    limits = p.Limits()
    decoder = p.StreamDecoder(limits.max_request, in_place=16)
    stream = b"".join(wire for wire, _ in reqs)
    chunks = split(stream, cuts)
    out = []
    i = 0
    while i < len(chunks):
        chunk = chunks[i]
        slot = decoder.field_slot
        if slot is not None and (use_slot[i % len(use_slot)] if use_slot else True):
            n = min(len(slot), len(chunk))
            slot[:n] = chunk[:n]
            decoder.filled(n)
            chunks[i] = chunk[n:]
            if not chunks[i]:
                i += 1
        else:
            decoder.feed(chunk)
            i += 1
        while (request := decoder.decode(lambda: p.read_request(limits))) is not p.NEED_DATA:
            out.append(request)
    assert out == [expected for _, expected in reqs]
    assert not decoder.in_message and decoder.field_slot is None


@settings(max_examples=100, deadline=None)
@given(requests())
def test_byte_at_a_time_is_the_same_as_all_at_once(req):
    wire, expected = req
    assert decode_all([wire[i : i + 1] for i in range(len(wire))]) == [expected]


def test_set_is_torchs_bytes():
    # Captured from a torch 2.13 client (tcpstore-wire.md §4): set("k1", "v1") with the "/" prefix.
    expected = bytes.fromhex("01 0300000000000000 2f6b31 0200000000000000 7631")
    assert cmd.set_(b"k1", b"v1")[0] == expected


def test_handshake_is_torchs_bytes():
    assert p.encode_validate() == bytes.fromhex("00 cef7853c")
    assert p.encode_ping(0x5313) == bytes.fromhex("0d 13530000")


def test_multi_set_is_torchs_bytes():
    # tcpstore-wire.md §4 MULTI_SET example: multi_set(["m1","m2"],["a","bb"])
    expected = bytes.fromhex(
        "0b 0200000000000000 0300000000000000 2f6d31 0100000000000000 61"
        " 0300000000000000 2f6d32 0200000000000000 6262"
    )
    assert cmd.multi_set([b"m1", b"m2"], [b"a", b"bb"])[0] == expected


def run_reply(parser: p.ReplyParser, chunks: list[bytes]):
    """Feed chunks until one reply is complete; the stream must hold nothing else."""
    decoder = p.StreamDecoder()
    result = p.NEED_DATA
    for chunk in chunks:
        decoder.feed(chunk)
        if result is p.NEED_DATA:
            result = decoder.decode(parser)
    assert not decoder.in_message
    return result


@settings(max_examples=200, deadline=None)
@given(st.lists(values_st, max_size=6), st.lists(st.integers(0, 5000), max_size=8))
def test_reply_round_trips(values, cuts):
    wire = p.reply_list(values)
    assert run_reply(lambda: p.parse_values(len(values)), split(wire, cuts)) == values
    keys_wire = p.reply_i64(len(values)) + p.reply_list(values)
    assert run_reply(p.parse_key_list, split(keys_wire, cuts)) == values


@given(st.integers(0, 10), values_st)
def test_queue_pop_reply(available, value):
    if available == 0:
        assert run_reply(p.parse_queue_pop, [p.reply_queue_pop(0, None)]) is None
    else:
        assert run_reply(p.parse_queue_pop, [p.reply_queue_pop(available, value)]) == value


def test_delete_and_check_commands_post_process_replies():
    assert run_reply(cmd.delete_key(b"k")[1], [p.reply_i64(1)]) is True
    assert run_reply(cmd.delete_key(b"k")[1], [p.reply_i64(0)]) is False
    assert run_reply(cmd.check([b"k"])[1], [p.reply_u8(p.READY)]) is True
    assert run_reply(cmd.check([b"k"])[1], [p.reply_u8(p.NOT_READY)]) is False
    listed = p.reply_i64(3) + p.reply_list([b"/a", b"init/", b"/b"])
    assert run_reply(cmd.list_keys()[1], [listed]) == [b"a", b"b"]  # torch hides unprefixed keys


# -- limits: checked on the length prefix, before anything is buffered ------------------------


def length_prefixed(op: Q, n: int) -> bytes:
    return bytes([op]) + struct.pack("<Q", n)


@pytest.mark.parametrize(
    "wire, message",
    [
        (length_prefixed(Q.GET, 8193), "key length of 8193 exceeds the limit of 8192"),
        (length_prefixed(Q.GET, 2**63), "exceeds the limit"),
        (length_prefixed(Q.CHECK, 131073), "key count of 131073 exceeds the limit of 131072"),
        (length_prefixed(Q.WAIT, 3_000_000_000), "key count"),
        (p.encode_key(Q.SET, b"k") + struct.pack("<Q", 8 * 1024 * 1024 + 1), "value length"),
        (bytes([19]), "unknown request type 19"),
        (bytes([0xFF]), "unknown request type 255"),
    ],
)
def test_limits_and_unknown_types_are_protocol_errors(wire, message):
    with pytest.raises(p.ProtocolError, match=message):
        decode_all([wire])


def test_torchs_limits_themselves_are_accepted():
    key = b"k" * 8192
    value = b"v" * (8 * 1024 * 1024)  # exactly 8 MiB is accepted by torch's libuv server too
    assert decode_all([p.encode_key_value(Q.SET, key, value)]) == [(Q.SET, key, value)]


def test_message_size_bound_covers_many_fields():
    limits = p.Limits(max_request=1000)
    wire = p.encode_multi_set([b"k%d" % i for i in range(20)], [b"x" * 100] * 20)
    with pytest.raises(p.ProtocolError, match="message larger than 1000 bytes"):
        decode_all([wire], limits)


def test_decoder_buffers_only_the_unfinished_field():
    decoder = p.StreamDecoder()
    wire = p.encode_key_value(Q.SET, b"key", b"x" * 100_000)
    decoder.feed(wire[:50_000])
    assert decoder.decode(lambda: p.read_request(p.Limits())) is p.NEED_DATA
    assert decoder.in_message
    decoder.feed(wire[50_000:])
    assert decoder.decode(lambda: p.read_request(p.Limits())) == (Q.SET, b"key", b"x" * 100_000)
    assert decoder.buffered == 0
