"""What each client operation sends and how its reply is read: shared by both clients.

``TCPStore`` (blocking) and ``AsyncTCPStore`` (asyncio) differ only in how they
move bytes. Everything torch-specific about a client call lives here once:
the ``"/"`` prefix on user keys (so torch clients and ours share keys), the
request encoding, and a reply parser that returns the final Python value.
A command is ``(request_bytes, reply_parser)``; ``reply_parser`` is ``None``
for torch's fire-and-forget requests (SET, APPEND, MULTI_SET, QUEUE_PUSH).
"""

from __future__ import annotations

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


def set_(key: bytes, value: bytes) -> Command:
    return p.encode_key_value(_Q.SET, PREFIX + key, value), None


def append(key: bytes, value: bytes) -> Command:
    return p.encode_key_value(_Q.APPEND, PREFIX + key, value), None


def multi_set(keys: Sequence[bytes], values: Sequence[bytes]) -> Command:
    return p.encode_multi_set(_raw(keys), values), None


def queue_push(key: bytes, value: bytes) -> Command:
    return p.encode_key_value(_Q.QUEUE_PUSH, PREFIX + key, value), None


def add_raw(raw_key: bytes, amount: int) -> Command:
    return p.encode_key_int(_Q.ADD, raw_key, amount), p.parse_i64


def add(key: bytes, amount: int) -> Command:
    return add_raw(PREFIX + key, amount)


def get_raw(raw_key: bytes) -> Command:
    return p.encode_key(_Q.GET, raw_key), p.parse_value


def compare_set(key: bytes, expected: bytes, desired: bytes) -> Command:
    return p.encode_compare_set(PREFIX + key, expected, desired), p.parse_value


def delete_key(key: bytes) -> Command:
    return p.encode_key(_Q.DELETE_KEY, PREFIX + key), _then(p.parse_i64, lambda n: n == 1)


def check(keys: Sequence[bytes]) -> Command:
    return p.encode_keys(_Q.CHECK, _raw(keys)), _then(p.parse_u8, lambda r: r == p.READY)


def wait(keys: Sequence[bytes]) -> Command:
    """The reply (STOP_WAITING) may come much later; clients handle it with a timeout."""
    return p.encode_keys(_Q.WAIT, _raw(keys)), p.parse_u8


def barrier(key: bytes, world_size: int) -> Command:
    return p.encode_key_int(_Q.BARRIER, PREFIX + key, world_size), p.parse_u8


def cancel_wait() -> Command:
    return p.encode_bare(_Q.CANCEL_WAIT), p.parse_u8


def ping(nonce: int) -> Command:
    return p.encode_ping(nonce), p.parse_u32_raw


def multi_get(keys: Sequence[bytes]) -> Command:
    count = len(keys)
    return p.encode_keys(_Q.MULTI_GET, _raw(keys)), lambda: p.parse_values(count)


def check_then_multi_get(keys: Sequence[bytes]) -> tuple[bytes, list[p.ReplyParser]]:
    """CHECK and MULTI_GET pipelined: one round trip for keys that exist.

    Only valid against libuv-rule servers (ours, torch's default), which answer
    a GET of a missing key with an empty value; torch's legacy server drops the
    connection instead, so legacy clients use WAIT then MULTI_GET.
    """
    check_req, check_parser = check(keys)
    get_req, get_parser = multi_get(keys)
    assert check_parser is not None and get_parser is not None
    return check_req + get_req, [check_parser, get_parser]


def secret_probe() -> Command:
    """CHECK of ``PROBE_KEY``, in the handshake of a client without a secret.

    Every server answers it (torch's libuv and legacy servers, ours) except
    ours with a shared secret, which closes the connection on any request but
    the secret check: so a client without the secret learns at construction
    that the server requires one, instead of mistaking the closed connection
    for torch's legacy server (which drops only the GET of a missing key).
    """
    return p.encode_keys(_Q.CHECK, [PROBE_KEY]), p.parse_u8


def num_keys() -> Command:
    return p.encode_bare(_Q.GETNUMKEYS), p.parse_i64


def list_keys() -> Command:
    # torch's client shows only keys written through the TCPStore API ("/"-prefixed).
    strip = _then(p.parse_key_list, lambda keys: [k[1:] for k in keys if k.startswith(PREFIX)])
    return p.encode_bare(_Q.LIST_KEYS), strip


def queue_pop(key: bytes) -> Command:
    """Reply: the head value, or ``None`` when the queue was empty."""
    return p.encode_key(_Q.QUEUE_POP, PREFIX + key), p.parse_queue_pop


def queue_len(key: bytes) -> Command:
    return p.encode_key(_Q.QUEUE_LEN, PREFIX + key), p.parse_i64
