"""Exceptions raised by every store.

The hierarchy keeps code written for torch working: torch raises
``DistStoreError``/``DistNetworkError``, both ``RuntimeError`` subclasses, so
``except RuntimeError`` catches ours too. On top of that, timeouts are also the
builtin ``TimeoutError`` and lost connections the builtin ``ConnectionError``,
which torch never gives you.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "StoreError",
    "StoreTimeoutError",
    "StoreConnectionError",
    "StoreAuthError",
    "QueueEmptyError",
    "format_keys",
    "format_ms",
    "wait_timeout",
    "barrier_timeout",
    "queue_empty",
]


class StoreError(RuntimeError):
    """Base class of every error a store raises about its own state."""


class StoreTimeoutError(StoreError, TimeoutError):
    """A wait, get, barrier or connect ran out of time. The message names the keys and timeout."""


class StoreConnectionError(StoreError, ConnectionError):
    """The connection to a store server failed or was lost. The message names the address."""


class StoreAuthError(StoreConnectionError):
    """The shared-secret check failed (wrong secret, or a server that does not check one).
    Not retried: the next attempt would fail the same way."""


class QueueEmptyError(StoreError):
    """``queue_pop(key, block=False)`` found the queue empty."""


def format_keys(keys: Iterable[bytes]) -> str:
    """Render raw keys for an error message: text when they decode, repr otherwise."""
    parts = []
    for key in keys:
        try:
            parts.append(key.decode("utf-8"))
        except UnicodeDecodeError:
            parts.append(repr(key))
    return ", ".join(parts)


def format_ms(seconds: float) -> str:
    """Whole milliseconds, as torch prints them in its timeout messages."""
    return f"{round(seconds * 1000)}ms"


def wait_timeout(keys: Iterable[bytes], timeout: float, where: str) -> StoreTimeoutError:
    """The error for a wait/get that ran out of time: keys, timeout and store, in one line.

    The message starts like torch's TCPStore message, so regexes written for
    torch ("wait timeout after ...ms, keys: ...") keep matching.
    """
    return StoreTimeoutError(f"wait timeout after {format_ms(timeout)}, keys: {format_keys(keys)} ({where})")


def barrier_timeout(key: bytes, timeout: float, where: str) -> StoreTimeoutError:
    """torch's TCPStore barrier message (the key without the "/" prefix), plus the store."""
    return StoreTimeoutError(f"barrier timeout after {format_ms(timeout)}, key: {format_keys([key])} ({where})")



def queue_empty(key: bytes, where: str) -> QueueEmptyError:
    """torch's "queue is empty", plus the key and the store."""
    return QueueEmptyError(f"queue is empty (key {format_keys([key])}, {where})")
