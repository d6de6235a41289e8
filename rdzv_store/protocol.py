"""The TCPStore wire protocol of torch 2.13, sans I/O: encoders, parsers and limits.

Nothing here touches a socket. The server and both clients feed received
bytes into a ``StreamDecoder`` and write the bytes the encoders return.

Format (``../shared/reference/tcpstore-wire.md``): every request is one type
byte followed by its fields; integers are little-endian; a string (key or
value) is a ``u64`` length followed by raw bytes. There are no request IDs and
no error replies: replies come back in request order, and a server that
cannot handle a request closes the connection.

Why generators: a message parser is written as a generator that *yields the
number of bytes it needs next* and receives exactly those bytes. The
``StreamDecoder`` keeps the half-finished generator between reads, so a field
already parsed is never parsed again. Parsing is linear in the payload, unlike
torch's libuv server, which re-parses a pending request from its start on
every 4 KiB read (a 1 MiB compare_set costs 26x a set there). Limits are
checked as soon as a length prefix is read, before anything is buffered, so a
peer claiming a gigabyte value costs us nothing.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

__all__ = [
    "MAGIC",
    "QueryType",
    "STOP_WAITING",
    "WAIT_CANCELED",
    "READY",
    "NOT_READY",
    "Limits",
    "ProtocolError",
    "NEED_DATA",
    "StreamDecoder",
    "Request",
    "read_request",
]

MAGIC: Final = 0x3C85F7CE  # VALIDATE's magic number, bytes on the wire: ce f7 85 3c

STOP_WAITING: Final = 0  # WaitResponseType: a WAIT or BARRIER was released
WAIT_CANCELED: Final = 1  # WaitResponseType: reply to CANCEL_WAIT
READY: Final = 0  # CheckResponseType
NOT_READY: Final = 1


class QueryType(enum.IntEnum):
    VALIDATE = 0
    SET = 1
    COMPARE_SET = 2
    GET = 3
    ADD = 4
    CHECK = 5
    WAIT = 6
    GETNUMKEYS = 7
    DELETE_KEY = 8
    APPEND = 9
    MULTI_GET = 10
    MULTI_SET = 11
    CANCEL_WAIT = 12
    PING = 13
    QUEUE_PUSH = 14
    QUEUE_POP = 15
    QUEUE_LEN = 16
    LIST_KEYS = 17
    BARRIER = 18


_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one peer may make us buffer.

    The first three are torch's libuv limits, so anything torch accepts we
    accept. ``max_request`` bounds one whole request (a MULTI_SET of many
    large values) and so the memory one connection can pin.
    """

    max_key: int = 8192
    max_value: int = 8 * 1024 * 1024
    max_keys: int = 131072
    max_request: int = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something we will not parse; the connection must be closed."""


# A parser yields the number of bytes it needs and is sent exactly that many.
Parser = Generator[int, bytes, Any]


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


class StreamDecoder:
    """Feeds a byte stream to parser generators, one message at a time.

    ``feed`` appends received bytes; ``decode(start)`` returns the next
    complete message, starting a new parser with ``start()`` when none is in
    progress, or ``NEED_DATA``. ``max_message`` bounds the bytes one message
    may consume, so a peer cannot make us accumulate an unbounded request.
    """

    __slots__ = (
        "_buf", "_pos", "_gen", "_need", "_size", "max_message", "_lent", "_lent_pos", "_lent_end",
        "in_place", "_field", "_field_have", "field_slot", "last_size", "_keep_bytearray",
    )  # fmt: skip

    def __init__(self, max_message: int = Limits.max_request, in_place: int = 0, keep_bytearray: bool = False) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._gen: Parser | None = None
        self._need = 0
        self._size = 0
        self.max_message = max_message
        self._lent: bytearray | None = None  # see lend()
        self._lent_pos = 0
        self._lent_end = 0
        # Fields of at least ``in_place`` bytes (0: never) are received in place: once an
        # eighth of one has arrived, the rest goes straight into a buffer of its final size
        # (``field_slot``, to ``recv_into``, then ``filled``), which becomes the field itself.
        # Copying a multi-MiB value from read to read into a growing buffer, and then out of
        # it, cost more than the two system calls that move it (profile of an 8 MiB
        # compare_set on the server: 12 ms of copies against 8 ms of recv and send). The
        # eighth bounds what a peer can make us reserve to 8x what it actually sent.
        # ``keep_bytearray``: hand such a field over as the bytearray it was received into
        # (no copy), for a consumer that never mutates values (the server's engine); by
        # default it becomes ``bytes`` (one copy), as every other field is.
        self.in_place = in_place
        self._keep_bytearray = keep_bytearray
        self._field: bytearray | None = None
        self._field_have = 0
        self.field_slot: memoryview | None = None
        self.last_size = 0  # bytes of the message decode() returned last

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.keep()
        self._buf += data

    def lend(self, buffer: bytearray, end: int) -> None:
        """``feed(buffer[:end])`` without copying, for a caller that reuses ``buffer``.

        When nothing else is buffered, complete messages are parsed straight out of
        ``buffer`` (by the ``fast`` parser); whatever is left when ``decode`` returns
        ``NEED_DATA``, or when ``keep()`` is called, is copied into the decoder's own
        buffer first. So the caller may overwrite ``buffer`` after ``decode`` returned
        ``NEED_DATA`` or after ``keep()``, and not before.

        Why: the server receives every connection's bytes into one shared buffer.
        Copying each small request into the connection's buffer and clearing it again
        was the largest cost of a small request after the syscalls (profile in
        ``rdzv_store/server.py``'s ``_Connection._on_readable``).
        """
        if self._lent is not None or self._gen is not None or self._pos != len(self._buf):
            self.feed(memoryview(buffer)[:end])
            return
        self._lent = buffer
        self._lent_pos = 0
        self._lent_end = end

    def sole(self, buffer: bytearray, end: int, fast: FastParser) -> Any:
        """The message that is all of ``buffer[:end]``, when nothing else is buffered and ``fast``
        parses it whole; otherwise ``None``, with nothing consumed (``lend`` it then).

        Why: one small request per read is the server's common case. Taking it here, rather
        than through ``lend``, two ``decode`` calls (the second says ``NEED_DATA``) and ``keep``,
        is four Python calls fewer per request (the server's ``_on_readable``).
        """
        if self._lent is not None or self._gen is not None or self._pos != len(self._buf) or end > self.max_message:
            return None
        found = fast(buffer, 0, end)
        if found is None or found[1] != end:
            return None
        self.last_size = end
        return found[0]

    def keep(self) -> int:
        """Copy what is left of a lent buffer (``lend``) into the decoder's own buffer; return
        ``held`` (what the server's budget counts, in the same call: it runs per read)."""
        lent = self._lent
        if lent is not None:
            self._lent = None
            if self._lent_pos < self._lent_end:
                self._buf += memoryview(lent)[self._lent_pos : self._lent_end]
        return self._size + len(self._buf) - self._pos

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed by a finished field."""
        lent = 0 if self._lent is None else self._lent_end - self._lent_pos
        return len(self._buf) - self._pos + lent

    @property
    def held(self) -> int:
        """Bytes an incomplete message holds: fields consumed (or reserved in place) plus bytes buffered."""
        return self._size + self.buffered

    def filled(self, nbytes: int) -> None:
        """``nbytes`` were received into ``field_slot``."""
        self._field_have += nbytes
        slot = self.field_slot
        assert slot is not None and nbytes <= len(slot)
        self.field_slot = slot[nbytes:] if nbytes < len(slot) else None

    @property
    def in_message(self) -> bool:
        """True when part of a message was received but the message is not complete.

        (A parser may be waiting for the first byte of the next message; that is not "in" one.)
        """
        return self.held > 0

    def decode(self, start: Callable[[], Parser], fast: FastParser | None = None) -> Any:
        lent = self._lent
        if lent is not None:  # nothing else is buffered and no parser is in progress (lend)
            if fast is not None:
                found = fast(lent, self._lent_pos, self._lent_end)
                if found is not None and found[1] - self._lent_pos <= self.max_message:
                    self.last_size = found[1] - self._lent_pos
                    self._lent_pos = found[1]
                    if found[1] == self._lent_end:
                        self._lent = None
                    return found[0]
            self.keep()  # incomplete or unusual: the general path below, from our own buffer
        buf = self._buf
        gen = self._gen
        if gen is None:
            if fast is not None:
                if self._pos == len(buf):
                    return NEED_DATA  # nothing buffered: no parser to start yet
                # A message that is already complete in the buffer (the common case for a
                # server's small requests) is parsed by ``fast`` without a generator. It
                # declines (None) anything incomplete or unusual: the generator path below
                # stays the general and authoritative one, from the same position.
                found = fast(buf, self._pos, len(buf))
                if found is not None and found[1] - self._pos <= self.max_message:
                    self.last_size = found[1] - self._pos
                    self._pos = found[1]
                    self._compact()
                    return found[0]
            gen = start()
            self._size = 0
            try:
                self._need = next(gen)
            except StopIteration as done:
                return done.value
            self._gen = gen
        while True:
            need = self._need
            in_place = self._field
            if in_place is not None:  # a field received in place; _size counts it already
                if self._field_have < need:
                    # Bytes fed (not received into field_slot) belong to the field first.
                    take = min(need - self._field_have, len(buf) - self._pos)
                    if take:
                        slot = self.field_slot
                        assert slot is not None
                        slot[:take] = memoryview(buf)[self._pos : self._pos + take]
                        del slot
                        self._pos += take
                        self.filled(take)
                        self._compact()
                    if self._field_have < need:
                        return NEED_DATA
                self._field = None
                # A kept bytearray is used as bytes and never mutated (see keep_bytearray).
                field = cast(bytes, in_place) if self._keep_bytearray else bytes(in_place)
            else:
                pos = self._pos
                avail = len(buf) - pos
                if avail < need:
                    if self.in_place and need >= self.in_place and avail * 8 >= need:
                        self._reserve(need, avail)
                    else:
                        self._compact()
                    return NEED_DATA
                self._size += need
                if self._size > self.max_message:
                    raise ProtocolError(f"message larger than {self.max_message} bytes")
                self._pos = pos + need
                # bytes(buf[a:b]) copies twice (slice, then bytes); through a memoryview once,
                # which matters for megabyte values. The temporary view is gone before any resize.
                field = bytes(buf[pos : pos + need]) if need < 4096 else bytes(memoryview(buf)[pos : pos + need])
            try:
                self._need = gen.send(field)
            except StopIteration as done:
                self._gen = None
                self.last_size = self._size
                self._size = 0
                self._compact()
                return done.value

    def _reserve(self, need: int, avail: int) -> None:
        """Start receiving a ``need``-byte field in place; ``avail`` of it are buffered already."""
        if self._size + need > self.max_message:
            raise ProtocolError(f"message larger than {self.max_message} bytes")
        self._size += need
        field = bytearray(need)
        pos = self._pos
        field[:avail] = memoryview(self._buf)[pos : pos + avail]
        self._pos = pos + avail
        self._compact()
        self._field = field
        self._field_have = avail
        self.field_slot = memoryview(field)[avail:]

    def _compact(self) -> None:
        # Drop consumed bytes. Deleting a bytearray's prefix is cheap in CPython, but
        # doing it only when worthwhile keeps pipelined small requests fast.
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536:
            del self._buf[: self._pos]
            self._pos = 0


# -- field readers (generators) -----------------------------------------------------------------


def _read_u64(limit: int, what: str) -> Generator[int, bytes, int]:
    (n,) = _U64.unpack((yield 8))
    if n > limit:
        raise ProtocolError(f"{what} of {n} exceeds the limit of {limit}")
    return n


def _read_bytes(limit: int, what: str) -> Generator[int, bytes, bytes]:
    n = yield from _read_u64(limit, f"{what} length")
    return (yield n) if n else b""


def _read_i64() -> Generator[int, bytes, int]:
    return _I64.unpack((yield 8))[0]


def _read_many(count: int, limit: int, what: str) -> Generator[int, bytes, list[bytes]]:
    items = []
    for _ in range(count):
        items.append((yield from _read_bytes(limit, what)))
    return items


# -- requests (server side) ---------------------------------------------------------------------

Request = tuple  # (QueryType, *fields); see read_request for the field list of each type


def read_request(limits: Limits) -> Parser:
    """Parse one request into a tuple ``(QueryType, *fields)``.

    Fields: VALIDATE (magic:int), SET/APPEND/QUEUE_PUSH (key, value),
    COMPARE_SET (key, expected, desired), GET/DELETE_KEY/QUEUE_POP/QUEUE_LEN
    (key,), ADD (key, delta:int), CHECK/WAIT/MULTI_GET (keys:list),
    MULTI_SET (keys, values), BARRIER (key, world_size:int), PING (nonce
    bytes, echoed as is), and none for GETNUMKEYS/CANCEL_WAIT/LIST_KEYS.
    """
    op = (yield 1)[0]
    key = limits.max_key
    value = limits.max_value
    if op == QueryType.SET or op == QueryType.APPEND or op == QueryType.QUEUE_PUSH:
        k = yield from _read_bytes(key, "key")
        return (op, k, (yield from _read_bytes(value, "value")))
    if op == QueryType.GET or op == QueryType.DELETE_KEY or op == QueryType.QUEUE_POP or op == QueryType.QUEUE_LEN:
        return (op, (yield from _read_bytes(key, "key")))
    if op == QueryType.CHECK or op == QueryType.WAIT or op == QueryType.MULTI_GET:
        n = yield from _read_u64(limits.max_keys, "key count")
        return (op, (yield from _read_many(n, key, "key")))
    if op == QueryType.ADD or op == QueryType.BARRIER:
        k = yield from _read_bytes(key, "key")
        return (op, k, (yield from _read_i64()))
    if op == QueryType.COMPARE_SET:
        k = yield from _read_bytes(key, "key")
        expected = yield from _read_bytes(value, "value")
        return (op, k, expected, (yield from _read_bytes(value, "value")))
    if op == QueryType.MULTI_SET:
        n = yield from _read_u64(limits.max_keys, "key count")
        keys, values = [], []
        for _ in range(n):
            keys.append((yield from _read_bytes(key, "key")))
            values.append((yield from _read_bytes(value, "value")))
        return (op, keys, values)
    if op == QueryType.PING:
        return (op, (yield 4))
    if op == QueryType.VALIDATE:
        return (op, _U32.unpack((yield 4))[0])
    if op == QueryType.GETNUMKEYS or op == QueryType.CANCEL_WAIT or op == QueryType.LIST_KEYS:
        return (op,)
    raise ProtocolError(f"unknown request type {op}")


FastParser = Callable[[bytearray, int, int], "tuple[Any, int] | None"]

_U64_FROM = _U64.unpack_from
_I64_FROM = _I64.unpack_from
_U32_FROM = _U32.unpack_from


def fast_request_parser(limits: Limits) -> FastParser:
    """A parser for requests complete in ``buf[pos:end]``: ``(request, end of it)`` or ``None``.

    Same tuples as ``read_request``, parsed with ``unpack_from`` and slices
    instead of a generator per request (about 2 us less per small request on
    the server). It returns ``None`` for anything incomplete, over a limit or
    not handled here (MULTI_SET), so that ``read_request`` decides, and raises,
    exactly as before.
    """
    max_key = limits.max_key
    max_value = limits.max_value
    max_keys = limits.max_keys
    # Sets of plain ints: ``buf[pos]`` is a cached small int, found by hash and identity (a
    # tuple of IntEnum members costs a rich comparison per member tried).
    kv_ops = frozenset(map(int, (QueryType.SET, QueryType.APPEND, QueryType.QUEUE_PUSH)))
    key_ops = frozenset(map(int, (QueryType.GET, QueryType.DELETE_KEY, QueryType.QUEUE_POP, QueryType.QUEUE_LEN)))
    keys_ops = frozenset(map(int, (QueryType.CHECK, QueryType.WAIT, QueryType.MULTI_GET)))
    int_ops = frozenset(map(int, (QueryType.ADD, QueryType.BARRIER)))
    bare_ops = frozenset(map(int, (QueryType.GETNUMKEYS, QueryType.CANCEL_WAIT, QueryType.LIST_KEYS)))
    compare_set, ping, validate = int(QueryType.COMPARE_SET), int(QueryType.PING), int(QueryType.VALIDATE)
    key_first = kv_ops | key_ops | int_ops | {compare_set}  # requests that start with one key

    def field(buf: bytearray, i: int, end: int, limit: int) -> tuple[bytes, int] | None:
        if i + 8 > end:
            return None
        (n,) = _U64_FROM(buf, i)
        i += 8
        if n > limit or i + n > end:
            return None
        if n < 4096:
            return bytes(buf[i : i + n]), i + n
        return bytes(memoryview(buf)[i : i + n]), i + n

    def parse(buf: bytearray, pos: int, end: int) -> tuple[Any, int] | None:
        if pos >= end:
            return None
        op = buf[pos]
        i = pos + 1
        if op in key_first:
            # The request's key, read inline rather than by ``field``: one call fewer for every
            # request that has a key (most of them; a key is never 4 KiB in practice).
            if i + 8 > end:
                return None
            (n,) = _U64_FROM(buf, i)
            i += 8
            j = i + n
            if n > max_key or j > end:
                return None
            key = bytes(buf[i:j]) if n < 4096 else bytes(memoryview(buf)[i:j])
            if op in key_ops:
                return (op, key), j
            if op in int_ops:
                return None if j + 8 > end else ((op, key, _I64_FROM(buf, j)[0]), j + 8)
            v = field(buf, j, end, max_value)
            if v is None:
                return None
            if op != compare_set:  # kv_ops
                return (op, key, v[0]), v[1]
            desired = field(buf, v[1], end, max_value)
            return None if desired is None else ((op, key, v[0], desired[0]), desired[1])
        if op in keys_ops:
            if i + 8 > end:
                return None
            (count,) = _U64_FROM(buf, i)
            if count > max_keys:
                return None
            i += 8
            keys = []
            for _ in range(count):
                k = field(buf, i, end, max_key)
                if k is None:
                    return None
                keys.append(k[0])
                i = k[1]
            return (op, keys), i
        if op == ping:
            return None if i + 4 > end else ((op, bytes(buf[i : i + 4])), i + 4)
        if op == validate:
            return None if i + 4 > end else ((op, _U32_FROM(buf, i)[0]), i + 4)
        if op in bare_ops:
            return (op,), i
        return None

    return parse


# -- request encoders (client side) -------------------------------------------------------------


# Encoders build a list of parts and join it once: the result is allocated at its final size
# and every payload byte is copied exactly once. (Chained "+" on multi-MiB values allocates,
# touches and frees several intermediate buffers: page faults dominate a large compare_set.)


def _framed(items: Sequence[bytes]) -> list[bytes]:
    """Each item as a length-prefixed string, flattened into parts."""
    parts = []
    for item in items:
        parts.append(_U64.pack(len(item)))
        parts.append(item)
    return parts


def _keys(keys: Sequence[bytes]) -> bytes:
    return b"".join([_U64.pack(len(keys)), *_framed(keys)])


def encode_validate() -> bytes:
    return _U8.pack(QueryType.VALIDATE) + _U32.pack(MAGIC)


def encode_ping(nonce: int) -> bytes:
    return _U8.pack(QueryType.PING) + _U32.pack(nonce & 0xFFFFFFFF)


def encode_key_value(op: QueryType, key: bytes, value: bytes) -> bytes:
    """SET, APPEND and QUEUE_PUSH."""
    return b"".join([_U8.pack(op), *_framed((key, value))])


def encode_key(op: QueryType, key: bytes) -> bytes:
    """GET, DELETE_KEY, QUEUE_POP and QUEUE_LEN."""
    return _U8.pack(op) + _U64.pack(len(key)) + key


def encode_keys(op: QueryType, keys: Sequence[bytes]) -> bytes:
    """CHECK, WAIT and MULTI_GET."""
    return _U8.pack(op) + _keys(keys)


def encode_key_int(op: QueryType, key: bytes, number: int) -> bytes:
    """ADD (delta) and BARRIER (world size)."""
    return _U8.pack(op) + _U64.pack(len(key)) + key + _I64.pack(number)


def encode_compare_set(key: bytes, expected: bytes, desired: bytes) -> bytes:
    return b"".join([_U8.pack(QueryType.COMPARE_SET), *_framed((key, expected, desired))])


def encode_multi_set(keys: Sequence[bytes], values: Sequence[bytes]) -> bytes:
    pairs = [item for pair in zip(keys, values) for item in pair]
    return b"".join([_U8.pack(QueryType.MULTI_SET), _U64.pack(len(keys)), *_framed(pairs)])


def encode_bare(op: QueryType) -> bytes:
    """GETNUMKEYS, CANCEL_WAIT and LIST_KEYS."""
    return _U8.pack(op)


# -- reply encoders (server side) ---------------------------------------------------------------


# The fixed-size replies are the structs' own pack methods, not functions around them: the server
# builds one per small request, and a Python wrapper was a call more each time.
reply_u8: Callable[[int], bytes] = _U8.pack
reply_i64: Callable[[int], bytes] = _I64.pack


def reply_bytes(value: bytes) -> bytes:
    return _U64.pack(len(value)) + value


reply_u64: Callable[[int], bytes] = _U64.pack  # a length prefix alone (a big value follows unjoined)


def reply_list(values: Sequence[bytes]) -> bytes:
    """MULTI_GET: the values back to back; LIST_KEYS prepends an i64 count itself."""
    return b"".join(_framed(values))


def reply_queue_pop(available: int, value: bytes | None) -> bytes:
    if value is None:
        return _I64.pack(0)
    return _I64.pack(available) + _U64.pack(len(value)) + value


# -- reply parsers (client side) ----------------------------------------------------------------
# A client reads replies from a server it trusts less than torch does: lengths are
# bounded by the same limits, so a confused server cannot make it allocate gigabytes.

ReplyParser = Callable[[], Parser]


def parse_u8() -> Parser:
    return (yield 1)[0]


def parse_i64() -> Parser:
    return (yield from _read_i64())


def parse_u32_raw() -> Parser:
    return (yield 4)


def parse_value(limits: Limits = Limits()) -> Parser:
    return (yield from _read_bytes(limits.max_value, "value"))


def parse_values(count: int, limits: Limits = Limits()) -> Parser:
    return (yield from _read_many(count, limits.max_value, "value"))


def parse_key_list(limits: Limits = Limits()) -> Parser:
    n = yield from _read_i64()
    if not 0 <= n <= limits.max_request // 8:
        raise ProtocolError(f"implausible key count {n} in LIST_KEYS reply")
    return (yield from _read_many(n, limits.max_key, "key"))


def parse_queue_pop(limits: Limits = Limits()) -> Parser:
    available = yield from _read_i64()
    if available <= 0:
        return None
    return (yield from _read_bytes(limits.max_value, "value"))
