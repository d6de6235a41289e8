"""The ``Store`` base class: the public API of every store, in one place.

Public methods convert their arguments once (``args``) and call a raw-bytes
hook (``_set``, ``_get`` ...). Concrete stores implement the hooks; wrappers
such as ``PrefixStore`` rewrite raw keys and delegate to another store's hooks.
The fallbacks here are torch's base-class algorithms, so a store that only
implements the core hooks still behaves like torch (``append`` as a
compare_set loop, ``barrier`` as add + set + wait).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import TypeVar

from .args import (
    DEFAULT_TIMEOUT,
    Key,
    Timeout,
    Value,
    check_int64,
    key_bytes,
    key_list,
    same_length,
    timeout_seconds,
    value_bytes,
)

__all__ = ["Store", "DEFAULT_TIMEOUT"]

_S = TypeVar("_S", bound="Store")



class Store:
    """Base class of all stores. Keys are ``str`` or ``bytes``; reads return ``bytes``."""

    def __init__(self, timeout: Timeout = DEFAULT_TIMEOUT) -> None:
        self._timeout_s = timeout_seconds(timeout)

    # -- timeout ----------------------------------------------------------------------------
    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self._store_timeout())

    def set_timeout(self, timeout: Timeout) -> None:
        self._timeout_s = timeout_seconds(timeout)

    def _store_timeout(self) -> float:
        return self._timeout_s

    def _resolve_timeout(self, timeout: Timeout | None) -> float:
        return self._store_timeout() if timeout is None else timeout_seconds(timeout)

    # -- public API: conversion, then a raw hook -------------------------------------------------
    def set(self, key: Key, value: Value) -> None:
        self._set(key_bytes(key), value_bytes(value))

    def get(self, key: Key) -> bytes:
        """Wait up to the store timeout for ``key`` to exist, then return its value."""
        return self._get(key_bytes(key), self._store_timeout())

    def add(self, key: Key, amount: int) -> int:
        """Add ``amount`` to the integer stored at ``key`` (missing counts as 0); return the sum."""
        return self._add(key_bytes(key), check_int64(amount))

    def compare_set(self, key: Key, expected: Value, desired: Value) -> bytes:
        """Store ``desired`` if the value equals ``expected``; return the value now stored.

        torch's rule, kept exactly: a missing key with ``expected == b""`` is
        created; a missing key with a non-empty ``expected`` stores nothing and
        returns ``expected``.
        """
        return self._compare_set(key_bytes(key), value_bytes(expected), value_bytes(desired))

    def delete_key(self, key: Key) -> bool:
        return self._delete_key(key_bytes(key))

    def check(self, keys: Iterable[Key]) -> bool:
        return self._check(key_list(keys))

    def wait(self, keys: Iterable[Key], timeout: Timeout | None = None) -> None:
        """Block until every key exists, or raise ``StoreTimeoutError`` naming the missing ones."""
        self._wait(key_list(keys), self._resolve_timeout(timeout))

    def num_keys(self) -> int:
        return self._num_keys()

    def multi_get(self, keys: Iterable[Key]) -> list[bytes]:
        return self._multi_get(key_list(keys), self._store_timeout())

    def multi_set(self, keys: Sequence[Key], values: Sequence[Value]) -> None:
        raw_keys = key_list(keys)
        raw_values = [value_bytes(v) for v in values]
        same_length(raw_keys, raw_values)
        self._multi_set(raw_keys, raw_values)

    def append(self, key: Key, value: Value) -> None:
        self._append(key_bytes(key), value_bytes(value))

    def queue_push(self, key: Key, value: Value) -> None:
        self._queue_push(key_bytes(key), value_bytes(value))

    def queue_pop(self, key: Key, block: bool = True) -> bytes:
        return self._queue_pop(key_bytes(key), block, self._store_timeout())

    def queue_len(self, key: Key) -> int:
        return self._queue_len(key_bytes(key))

    def list_keys(self) -> list[str]:
        return [k.decode("utf-8") for k in self._list_keys()]

    def barrier(self, key: Key, world_size: int, timeout: Timeout | None = None) -> None:
        """Block until ``world_size`` callers have reached the barrier named ``key``."""
        self._barrier(key_bytes(key), int(world_size), self._resolve_timeout(timeout))

    def has_extended_api(self) -> bool:
        return False

    def clone(self) -> Store:
        raise NotImplementedError(f"{type(self).__name__} does not support clone()")

    def close(self) -> None:
        """Release what this store object holds. Safe to call twice."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- raw hooks: concrete stores implement these --------------------------------------------
    def _set(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    def _get(self, key: bytes, timeout: float) -> bytes:
        raise NotImplementedError

    def _add(self, key: bytes, amount: int) -> int:
        raise NotImplementedError

    def _compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        raise NotImplementedError

    def _delete_key(self, key: bytes) -> bool:
        raise NotImplementedError

    def _check(self, keys: list[bytes]) -> bool:
        raise NotImplementedError

    def _wait(self, keys: list[bytes], timeout: float) -> None:
        raise NotImplementedError

    def _num_keys(self) -> int:
        raise NotImplementedError

    # -- torch's base-class fallbacks ----------------------------------------------------------
    def _multi_get(self, keys: list[bytes], timeout: float) -> list[bytes]:
        return [self._get(k, timeout) for k in keys]

    def _multi_set(self, keys: list[bytes], values: list[bytes]) -> None:
        for k, v in zip(keys, values):
            self._set(k, v)

    def _append(self, key: bytes, value: bytes) -> None:
        # torch's fallback: optimistic compare_set loop, starting from "missing".
        expected = b""
        while True:
            current = self._compare_set(key, expected, expected + value)
            if current == expected + value:
                return
            expected = current

    def _queue_push(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError("queue support is not implemented.")

    def _queue_pop(self, key: bytes, block: bool, timeout: float) -> bytes:
        raise NotImplementedError("queue support is not implemented.")

    def _queue_len(self, key: bytes) -> int:
        raise NotImplementedError("queue support is not implemented.")

    def _list_keys(self) -> list[bytes]:
        raise NotImplementedError("listKeys support is not implemented.")

    def _barrier(self, key: bytes, world_size: int, timeout: float) -> None:
        # torch's base algorithm: count arrivals, the last one raises a flag everyone waits for.
        last_member = key + b"/last_member"
        if self._add(key + b"/num_members", 1) == world_size:
            self._set(last_member, b"1")
        self._wait([last_member], timeout)
