"""Argument conversion shared by every store: keys, values, timeouts, integers.

torch's bindings accept ``str`` or ``bytes`` keys (``str`` is stored as UTF-8)
and ``str``/``bytes``/``bytearray`` values; everything else is a ``TypeError``.
We keep those rules so that code moves between the two libraries unchanged,
and we are a little more forgiving with timeouts: ``timedelta``, ``float`` and
``int`` seconds are all accepted (torch refuses ``int``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Union

__all__ = [
    "Key",
    "Value",
    "Timeout",
    "key_bytes",
    "key_list",
    "value_bytes",
    "timeout_seconds",
    "reply_bound",
    "DEFAULT_TIMEOUT",
    "int64",
    "parse_int64",
    "INT64_MIN",
    "INT64_MAX",
]

Key = Union[str, bytes]
Value = Union[str, bytes, bytearray]
Timeout = Union[timedelta, float, int]

#: torch's default store timeout (``kDefaultTimeout``).
DEFAULT_TIMEOUT = timedelta(seconds=300)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def key_bytes(key: Key) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bytes):
        return key
    raise TypeError(f"store keys must be str or bytes, not {type(key).__name__}")


def key_list(keys: Iterable[Key]) -> list[bytes]:
    # A bare str is iterable but almost certainly a mistake: torch refuses it too.
    if isinstance(keys, (str, bytes)):
        raise TypeError("expected a sequence of keys, got a single key")
    return [key_bytes(k) for k in keys]


def value_bytes(value: Value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"store values must be str, bytes or bytearray, not {type(value).__name__}")


def timeout_seconds(timeout: Timeout) -> float:
    """Seconds as a float. Zero and negative values mean "do not wait" in every store."""
    if isinstance(timeout, timedelta):
        return timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a timedelta or seconds, not {type(timeout).__name__}")
    return float(timeout)


def reply_bound(store_timeout: float) -> float:
    """How long a client waits for a reply that must come promptly.

    The store timeout, except that a store timeout <= 0 means "do not wait" for
    waits, not "fail every reply": replies then get torch's default instead.
    """
    return store_timeout if store_timeout > 0 else DEFAULT_TIMEOUT.total_seconds()


def int64(value: int) -> int:
    """Wrap to a signed 64-bit integer, as torch's C++ arithmetic does on overflow."""
    return (value + 2**63) % 2**64 - 2**63


def check_int64(amount: object) -> int:
    if isinstance(amount, bool):
        return int(amount)
    if not isinstance(amount, int):
        raise TypeError(f"add() amount must be an int, not {type(amount).__name__}")
    if not INT64_MIN <= amount <= INT64_MAX:
        raise TypeError(f"add() amount {amount} does not fit in a signed 64-bit integer")
    return amount


_C_SPACE = b" \t\n\v\f\r"


def parse_int64(raw: bytes) -> int:
    """Parse a stored counter like C++ ``std::stoll``: what torch does before every add.

    Leading whitespace and one sign are allowed, parsing stops at the first
    non-digit (``b"12abc"`` is 12). An empty value counts as 0 (HashStore and
    FileStore behaviour; torch's TCP server drops the connection instead).
    Raises ``ValueError`` when there are no digits or the number does not fit
    in 64 bits.
    """
    text = raw.lstrip(_C_SPACE)
    if not text and not raw:
        return 0
    end = 1 if text[:1] in (b"+", b"-") else 0
    start = end
    while end < len(text) and 48 <= text[end] <= 57:
        end += 1
    if end == start:
        raise ValueError(f"not an integer: {raw[:64]!r}")
    number = int(text[:end])
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"integer out of the 64-bit range: {raw[:64]!r}")
    return number


def same_length(keys: Sequence[object], values: Sequence[object]) -> None:
    if len(keys) != len(values):
        raise ValueError(
            f"multi_set needs as many values as keys (got {len(keys)} keys, {len(values)} values)"
        )
