"""What each client operation sends and how its reply is read: shared by both clients.

``TCPStore`` (blocking) and ``AsyncTCPStore`` (asyncio) differ only in how they
move bytes. Everything torch-specific about a client call lives here once:
the ``"/"`` prefix on user keys (so torch clients and ours share keys), the
request encoding, and a reply parser that returns the final Python value.
A command is ``(request_bytes, reply_parser)``; ``reply_parser`` is ``None``
for torch's fire-and-forget requests (SET, APPEND, MULTI_SET, QUEUE_PUSH).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, Union

from . import protocol as p
from .errors import format_keys

__all__ = ["PREFIX", "INIT_KEY", "Command"]

PREFIX = b"/"  # torch's TCPStore client prefixes every user key with "/"
INIT_KEY = b"init/"  # the worker count of world_size/wait_for_workers; unprefixed, as in torch
# A key no client can write (user keys start with "/"): GET of it tells a server that answers a
# missing key with an empty value (libuv rules: ours, torch's default) from torch's legacy one,
# which drops the connection instead.
PROBE_KEY = b"\x00rdzv-store/libuv-probe"

_Q = p.QueryType
Command = tuple[bytes, "p.ReplyParser | None"]

# A fast reply reader: ``(buf, pos, end) -> (value, new_pos)`` for a reply complete in
# ``buf[pos:end]``, or ``None`` when it is incomplete or unusual (over a limit): then the
# generator parser decides, and raises, exactly as it always did.
FastReply = Callable[[Any, int, int], "tuple[Any, int] | None"]


class Reply:
    """A reply parser (call it for torch's generator parser, as ``protocol.ReplyParser``)
    with ``fast``: the same reply read straight from a receive buffer without a generator,
    which the blocking client uses for replies that arrived whole (the common case)."""

    __slots__ = ("parse", "fast")

    def __init__(self, parse: p.ReplyParser, fast: FastReply) -> None:
        self.parse = parse
        self.fast = fast

    def __call__(self) -> p.Parser:
        return self.parse()


# Request headers packed in one call: type byte, then the key's length and torch's "/" prefix.
_KEY_HEAD = struct.Struct("<BQc")
_ONE_KEY_HEAD = struct.Struct("<BQQc")  # CHECK/WAIT/MULTI_GET of one key: type, count 1, key length, "/"
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_U64_FROM = _U64.unpack_from
_I64_FROM = _I64.unpack_from
_SLASH = b"/"
_MAX_VALUE = p.Limits.max_value


# Why a server closes the connection instead of answering an operation (the protocol has no
# error reply): the usual cause for each operation, for the client's error message.
_REFUSALS = {
    "add": "the stored value is not an integer (written by set or append?)",
    "barrier": "the barrier's counter holds a value that is not an integer",
    "get": "the reply would exceed its size limit",
    "multi_get": "the reply would exceed its size limit",
}


Keys = Union[bytes, Sequence[bytes], None]


def describe(op: str, keys: Keys) -> str:
    """``op on key /k``: a request for an error message. ``keys`` are user keys (one, several or
    None), shown as on the wire, with torch's "/" prefix."""
    if not keys:
        return op
    ks = [keys] if isinstance(keys, bytes) else list(keys)
    shown = format_keys([PREFIX + k for k in ks[:3]]) + (", ..." if len(ks) > 3 else "")
    return f"{op} on key {shown}"


def refusal(what: str, keys: Keys, earlier: tuple[str, Keys] | None = None) -> str:
    """Say which request the server refused by closing the connection, and why that usually happens.

    ``keys`` are the request's user keys; ``earlier`` is a request sent since the last reply that
    has no reply of its own (SET, APPEND ...): the server may have refused that one instead.
    """
    name = describe
    text = f"closed the connection instead of answering {name(what, keys)}"
    if earlier is not None:
        text += f" (or the earlier {name(*earlier)}, which has no reply of its own)"
    reason = _REFUSALS.get(what)
    text += (
        ". A server refuses a request it cannot carry out that way (the protocol has no error reply): "
        + (f"for {what}, usually because {reason}; " if reason else "")
        + "for any request, a key over 8 KiB, a value over 8 MiB or a request over its size limit. "
        "See the server log; or the server shut down or restarted. The next call reconnects"
    )
    return text


def require_queues(use_libuv: bool) -> None:
    """torch's client refuses queue operations when its own flag says legacy server, sending nothing."""
    if not use_libuv:
        raise NotImplementedError("queues not implemented on legacy TCPStore backend")


def _then(parser: p.ReplyParser, fn: Callable[[Any], Any]) -> p.ReplyParser:
    def start() -> p.Parser:
        return fn((yield from parser()))

    return start


def _raw(keys: Sequence[bytes]) -> list[bytes]:
    return [PREFIX + k for k in keys]


# -- fast reply readers (see ``Reply``); each declines (None) what its generator must judge ---------


def _fast_u8(buf: Any, pos: int, end: int) -> tuple[Any, int] | None:
    return (buf[pos], pos + 1) if pos < end else None


def _fast_ready(buf: Any, pos: int, end: int) -> tuple[Any, int] | None:
    return (buf[pos] == p.READY, pos + 1) if pos < end else None


def _fast_i64(buf: Any, pos: int, end: int) -> tuple[Any, int] | None:
    return (_I64_FROM(buf, pos)[0], pos + 8) if pos + 8 <= end else None


def _fast_deleted(buf: Any, pos: int, end: int) -> tuple[Any, int] | None:
    return (_I64_FROM(buf, pos)[0] == 1, pos + 8) if pos + 8 <= end else None


def _fast_value(buf: Any, pos: int, end: int) -> tuple[Any, int] | None:
    if pos + 8 > end:
        return None
    (n,) = _U64_FROM(buf, pos)
    pos += 8
    if n > _MAX_VALUE or pos + n > end:
        return None
    return bytes(buf[pos : pos + n]), pos + n


def _fast_values(count: int) -> FastReply:
    def fast(buf: Any, pos: int, end: int) -> tuple[Any, int] | None:
        values = []
        for _ in range(count):
            found = _fast_value(buf, pos, end)
            if found is None:
                return None
            values.append(found[0])
            pos = found[1]
        return values, pos

    return fast


def _fast_queue_pop(buf: Any, pos: int, end: int) -> tuple[Any, int] | None:
    if pos + 8 > end:
        return None
    if _I64_FROM(buf, pos)[0] <= 0:
        return None, pos + 8
    return _fast_value(buf, pos + 8, end)


_U8_REPLY = Reply(p.parse_u8, _fast_u8)
_I64_REPLY = Reply(p.parse_i64, _fast_i64)
_VALUE_REPLY = Reply(p.parse_value, _fast_value)
_READY_REPLY = Reply(_then(p.parse_u8, lambda r: r == p.READY), _fast_ready)
_DELETED_REPLY = Reply(_then(p.parse_i64, lambda n: n == 1), _fast_deleted)
_QUEUE_POP_REPLY = Reply(p.parse_queue_pop, _fast_queue_pop)
def _fast_one_value(buf: Any, pos: int, end: int) -> tuple[Any, int] | None:
    found = _fast_value(buf, pos, end)
    return None if found is None else ([found[0]], found[1])


_ONE_VALUE_REPLY = Reply(lambda: p.parse_values(1), _fast_one_value)


# -- requests: bytes identical to protocol's encoders, with the "/" prefix packed into the header --


def _key_value(op: int, key: bytes, value: bytes) -> bytes:
    return b"".join((_KEY_HEAD.pack(op, len(key) + 1, _SLASH), key, _U64.pack(len(value)), value))


def _key_only(op: int, key: bytes) -> bytes:
    return _KEY_HEAD.pack(op, len(key) + 1, _SLASH) + key


def _key_int(op: int, key: bytes, number: int) -> bytes:
    return b"".join((_KEY_HEAD.pack(op, len(key) + 1, _SLASH), key, _I64.pack(number)))


def _keys_request(op: int, keys: Sequence[bytes]) -> bytes:
    if len(keys) == 1:  # the common case
        key = keys[0]
        return _ONE_KEY_HEAD.pack(op, 1, len(key) + 1, _SLASH) + key
    return p.encode_keys(_Q(op), _raw(keys))


def set_(key: bytes, value: bytes) -> Command:
    return _key_value(_Q.SET, key, value), None


def append(key: bytes, value: bytes) -> Command:
    return _key_value(_Q.APPEND, key, value), None


def multi_set(keys: Sequence[bytes], values: Sequence[bytes]) -> Command:
    return p.encode_multi_set(_raw(keys), values), None


def queue_push(key: bytes, value: bytes) -> Command:
    return _key_value(_Q.QUEUE_PUSH, key, value), None


def add_raw(raw_key: bytes, amount: int) -> Command:
    return p.encode_key_int(_Q.ADD, raw_key, amount), _I64_REPLY


def add(key: bytes, amount: int) -> Command:
    return _key_int(_Q.ADD, key, amount), _I64_REPLY


def get_raw(raw_key: bytes) -> Command:
    return p.encode_key(_Q.GET, raw_key), _VALUE_REPLY


def get(key: bytes) -> Command:
    """A bare GET: under libuv's rules a missing key answers an empty value, so only a
    non-empty reply is an answer; an empty one sends the client to CHECK/WAIT (see
    ``check_then_multi_get``). Torch's legacy server drops the connection instead."""
    return _key_only(_Q.GET, key), _VALUE_REPLY


def compare_set(key: bytes, expected: bytes, desired: bytes) -> Command:
    return p.encode_compare_set(PREFIX + key, expected, desired), _VALUE_REPLY


def delete_key(key: bytes) -> Command:
    return _key_only(_Q.DELETE_KEY, key), _DELETED_REPLY


def check(keys: Sequence[bytes]) -> Command:
    return _keys_request(_Q.CHECK, keys), _READY_REPLY


def wait(keys: Sequence[bytes]) -> Command:
    """The reply (STOP_WAITING) may come much later; clients handle it with a timeout."""
    return _keys_request(_Q.WAIT, keys), _U8_REPLY


def barrier(key: bytes, world_size: int) -> Command:
    return _key_int(_Q.BARRIER, key, world_size), _U8_REPLY


_CANCEL_WAIT = p.encode_bare(_Q.CANCEL_WAIT)


def cancel_wait() -> Command:
    return _CANCEL_WAIT, _U8_REPLY


def ping(nonce: int) -> Command:
    return p.encode_ping(nonce), p.parse_u32_raw


def multi_get(keys: Sequence[bytes]) -> Command:
    count = len(keys)
    if count == 1:
        return _keys_request(_Q.MULTI_GET, keys), _ONE_VALUE_REPLY
    if not count:  # an empty reply: a plain parser, so the client reads nothing (see Connection.call)
        return p.encode_keys(_Q.MULTI_GET, []), lambda: p.parse_values(0)
    return p.encode_keys(_Q.MULTI_GET, _raw(keys)), Reply(lambda: p.parse_values(count), _fast_values(count))


def check_then_multi_get(keys: Sequence[bytes]) -> tuple[bytes, list[p.ReplyParser]]:
    """CHECK and MULTI_GET pipelined: one round trip for keys that exist.

    Only valid against libuv-rule servers (ours, torch's default), which answer
    a GET of a missing key with an empty value; torch's legacy server drops the
    connection instead, so legacy clients use WAIT then MULTI_GET.
    """
    if len(keys) == 1:
        key = keys[0]
        n = len(key) + 1
        request = b"".join((_ONE_KEY_HEAD.pack(_Q.CHECK, 1, n, _SLASH), key, _ONE_KEY_HEAD.pack(_Q.MULTI_GET, 1, n, _SLASH), key))
        return request, [_READY_REPLY, _ONE_VALUE_REPLY]
    get_req, get_parser = multi_get(keys)
    assert get_parser is not None
    return check(keys)[0] + get_req, [_READY_REPLY, get_parser]


def secret_probe() -> Command:
    """CHECK of ``PROBE_KEY``, in the handshake of a client without a secret.

    Every server answers it (torch's libuv and legacy servers, ours) except
    ours with a shared secret, which closes the connection on any request but
    the secret check: so a client without the secret learns at construction
    that the server requires one, instead of mistaking the closed connection
    for torch's legacy server (which drops only the GET of a missing key).
    """
    return p.encode_keys(_Q.CHECK, [PROBE_KEY]), _U8_REPLY


_NUM_KEYS = p.encode_bare(_Q.GETNUMKEYS)


def num_keys() -> Command:
    return _NUM_KEYS, _I64_REPLY


def list_keys() -> Command:
    # torch's client shows only keys written through the TCPStore API ("/"-prefixed).
    strip = _then(p.parse_key_list, lambda keys: [k[1:] for k in keys if k.startswith(PREFIX)])
    return p.encode_bare(_Q.LIST_KEYS), strip


def queue_pop(key: bytes) -> Command:
    """Reply: the head value, or ``None`` when the queue was empty."""
    return _key_only(_Q.QUEUE_POP, key), _QUEUE_POP_REPLY


def queue_len(key: bytes) -> Command:
    return _key_only(_Q.QUEUE_LEN, key), _I64_REPLY
