"""The FileStore on-disk format, without I/O: torch 2.13's append-only record log.

A FileStore file is a sequence of records with no header, checksum or padding::

    record := u32 key_len | key | u32 value_len | value        (u32 little-endian)

Replaying the records in order rebuilds the store: a record whose raw key
starts with ``-`` deletes ``raw_key[1:]``, every other record sets its raw key,
and the last record for a key wins. Raw keys are ``/`` + the user key for user
values, ``-/`` + the user key (empty value) for deletions, and the internal
counters ``refcount/`` and ``cleanup/`` (decimal text). This module only turns
records into bytes and back; ``filestore.py`` does the locking and the I/O.

The decoder never guesses: it stops at the first record that is not complete in
the buffer and reports the offset where that record starts, so a torn tail left
by a killed writer is never read as data and the reader does not move past it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, MutableMapping

__all__ = [
    "REFCOUNT",
    "CLEANUP",
    "COMPACTED",
    "COMPACTED_RECORD",
    "HEADER_SIZE",
    "MAX_FIELD",
    "user_key",
    "tombstone",
    "is_user_key",
    "encode",
    "encode_many",
    "decode",
    "next_record_size",
    "apply",
    "snapshot",
]

#: Internal key: how many FileStore instances are open on the file (decimal text).
REFCOUNT = b"refcount/"
#: Internal key: how many instances have been closed so far (decimal text).
CLEANUP = b"cleanup/"
#: rdzv-store's compaction marker. ``COMPACTED_RECORD`` deletes the never-existing raw key
#: ``compacted/``, so torch (and any replay) reads it as a no-op. A compactor appends it to
#: the old file just before renaming the new one over the path, so that a reader that
#: later finds a different file at the path knows it is a compaction to follow, not a
#: file that someone deleted and recreated.
COMPACTED = b"compacted/"

_U32 = struct.Struct("<I")
HEADER_SIZE = _U32.size
MAX_FIELD = 2**32 - 1


def user_key(key: bytes) -> bytes:
    """Raw key of a user key (already PrefixStore-prefixed): ``/`` + key."""
    return b"/" + key


def tombstone(raw_key: bytes) -> bytes:
    """Raw key of the deletion record for ``raw_key``."""
    return b"-" + raw_key


def is_user_key(raw_key: bytes) -> bool:
    return raw_key[:1] == b"/"


def encode(key: bytes, value: bytes) -> bytes:
    """One record, ready for a single ``write``. Raises ``ValueError`` past 4 GiB - 1."""
    if len(key) > MAX_FIELD or len(value) > MAX_FIELD:
        raise ValueError(
            f"FileStore records hold at most {MAX_FIELD} bytes per key and per value "
            f"(key of {len(key)} bytes, value of {len(value)} bytes)"
        )
    return b"".join((_U32.pack(len(key)), key, _U32.pack(len(value)), value))


def encode_many(records: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(encode(k, v) for k, v in records)


COMPACTED_RECORD = encode(tombstone(COMPACTED), b"")


def decode(buf: bytes, start: int = 0) -> tuple[list[tuple[bytes, bytes]], int]:
    """Decode the complete records of ``buf[start:]``.

    Returns the ``(raw_key, value)`` pairs and the offset just past the last
    complete record: the start of an incomplete record, if any, else ``len(buf)``.
    """
    out: list[tuple[bytes, bytes]] = []
    unpack = _U32.unpack_from
    end = len(buf)
    pos = start
    while end - pos >= HEADER_SIZE:
        (klen,) = unpack(buf, pos)
        kend = pos + HEADER_SIZE + klen
        if kend + HEADER_SIZE > end:
            break
        (vlen,) = unpack(buf, kend)
        vend = kend + HEADER_SIZE + vlen
        if vend > end:
            break
        out.append((buf[pos + HEADER_SIZE : kend], buf[kend + HEADER_SIZE : vend]))
        pos = vend
    return out, pos


def next_record_size(buf: bytes, start: int = 0) -> int | None:
    """Total size of the record starting at ``buf[start]``, or ``None`` if its headers are
    not all in ``buf`` yet. Lets a reader fetch one large record in one read."""
    end = len(buf)
    if end - start < HEADER_SIZE:
        return None
    (klen,) = _U32.unpack_from(buf, start)
    kend = start + HEADER_SIZE + klen
    if kend + HEADER_SIZE > end:
        return None
    (vlen,) = _U32.unpack_from(buf, kend)
    return 2 * HEADER_SIZE + klen + vlen


def apply(cache: MutableMapping[bytes, bytes], records: Iterable[tuple[bytes, bytes]]) -> None:
    """Replay records onto ``cache`` (raw key -> value), as torch does."""
    for key, value in records:
        if key[:1] == b"-":
            cache.pop(key[1:], None)
        else:
            cache[key] = value


def snapshot(cache: Mapping[bytes, bytes]) -> bytes:
    """The shortest log that replays to ``cache``: one record per live key, no tombstones."""
    return encode_many(cache.items())
