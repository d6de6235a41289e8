"""The ``Store`` base class: the public API of every store, in one place.

Two layers, one rule
--------------------

Every operation exists twice: a *public method* (``set``, ``get``, ``add`` ...)
that takes torch's argument types, and a *hook* of the same name with a
leading underscore (``_set``, ``_get`` ...) that takes converted, raw
arguments (``bytes`` keys and values, ``float`` seconds). The base public
method converts its arguments (``args``) and calls the hook; the base hook
raises ``NotImplementedError`` naming the class and the method.

**The rule: a hook is called only by the public method of the same name, on the
same object.** Everything else - wrappers (``PrefixStore``), the base-class
fallbacks below, the rendezvous backend - calls *public* methods. So a
subclass may override either layer, per operation:

* the public methods, as torch documents for ``torch.distributed.Store``
  (``def set(self, key, value)``, ``def get(self, key)`` ...). Keys then arrive
  as ``str`` when they are valid UTF-8 (torch passes ``str``), otherwise as
  ``bytes``; values arrive as ``bytes``; ``get``/``compare_set`` should return
  ``bytes`` (``str`` is accepted and encoded);
* or the hooks, as the stores of this package do (no conversion cost, raw
  ``bytes`` in and out). A hook that takes a ``timeout`` receives this store's
  own timeout (``get``, ``multi_get``, ``queue_pop``) or the caller's
  (``wait``, ``barrier``).

Either way the operation works through ``PrefixStore`` (any depth) and through
the fallbacks. The fallbacks are torch's base-class algorithms, built on public
methods: ``append`` as a ``compare_set`` loop, ``multi_get``/``multi_set`` as a
loop of ``get``/``set``, ``barrier`` as ``add`` + ``set`` + ``wait``. A store
that implements neither layer of an operation (nor what its fallback needs)
raises ``NotImplementedError`` naming the class and the method.

Stores that implement the hooks (``HashStore``, ``FileStore``, ``TCPStore``,
or an ``EtcdStore``) keep the contract they had: implement ``_set``,
``_get(key, timeout)``, ``_add``, ``_compare_set``, ``_delete_key``,
``_check``, ``_wait(keys, timeout)``, ``_num_keys`` and, optionally, the rest.
A hook must not call another store's hooks.

Errors every store may raise: ``TypeError`` for arguments of the wrong type
(keys ``str``/``bytes``, values ``str``/``bytes``/``bytearray``),
``StoreTimeoutError`` when a blocking call runs out of time,
``StoreConnectionError`` when a remote store cannot be reached,
``StoreError`` for other failures of the store itself, and
``NotImplementedError`` for an operation the store does not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import TypeVar, Union

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

__all__ = ["Store", "DEFAULT_TIMEOUT", "key_arg", "as_bytes"]

_S = TypeVar("_S", bound="Store")


def key_arg(raw: bytes) -> Union[str, bytes]:
    """A raw key as a public-API argument: ``str`` as torch passes it, ``bytes`` if not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def as_bytes(value: object) -> bytes:
    """A value returned by a public method, as ``bytes`` (a subclass may return ``str``).

    Raises:
        TypeError: the value is not ``str``, ``bytes`` or ``bytearray``.
    """
    if type(value) is bytes:
        return value
    return value_bytes(value)  # type: ignore[arg-type]


class _Missing(NotImplementedError):
    """Raised by a base hook: the store has neither layer of ``method``."""

    def __init__(self, store: Store, method: str, message: str | None = None) -> None:
        self.store = store
        self.method = method
        name = type(store).__name__
        super().__init__(
            message
            or f"{name} does not implement {method}() (a Store subclass overrides {method} or the _{method} hook)"
        )


class Store:
    """Base class of all stores. Keys are ``str`` or ``bytes``; reads return ``bytes``.

    Subclass it by overriding the public methods (torch's way) or the raw
    ``_``-prefixed hooks; see the module docstring for the one rule that makes
    both work through ``PrefixStore`` and the fallbacks.

    Raises:
        TypeError: ``timeout`` is not a ``timedelta`` or a number of seconds.
    """

    # Class-level default: a torch-style subclass that forgets super().__init__() still works.
    _timeout_s: float = DEFAULT_TIMEOUT.total_seconds()

    def __init__(self, timeout: Timeout = DEFAULT_TIMEOUT) -> None:
        self._timeout_s = timeout_seconds(timeout)

    # -- timeout ----------------------------------------------------------------------------
    @property
    def timeout(self) -> timedelta:
        """The store timeout: how long ``get``, ``wait`` and ``barrier`` block by default.

        Raises:
            Nothing of its own.
        """
        return timedelta(seconds=self._store_timeout())

    def set_timeout(self, timeout: Timeout) -> None:
        """Set the store timeout (``timedelta`` or seconds; ``<= 0``: check once, do not wait).

        Raises:
            TypeError: ``timeout`` is neither a ``timedelta`` nor a number.
        """
        self._timeout_s = timeout_seconds(timeout)

    def _store_timeout(self) -> float:
        return self._timeout_s

    def _resolve_timeout(self, timeout: Timeout | None) -> float:
        return self._store_timeout() if timeout is None else timeout_seconds(timeout)

    # -- public API: conversion, then the hook of the same name ----------------------------------
    def set(self, key: Key, value: Value) -> None:
        """Store ``value`` at ``key``, replacing any previous value.

        Raises:
            TypeError: ``key`` or ``value`` has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store does not implement ``set``.
        """
        self._set(key_bytes(key), value_bytes(value))

    def get(self, key: Key) -> bytes:
        """Wait up to the store timeout for ``key`` to exist, then return its value.

        Raises:
            StoreTimeoutError: the key did not appear within the store timeout
                (the message names the key, the timeout and the store).
            TypeError: ``key`` has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store does not implement ``get``.
        """
        return self._get(key_bytes(key), self._store_timeout())

    def add(self, key: Key, amount: int) -> int:
        """Add ``amount`` to the integer stored at ``key`` (missing counts as 0); return the sum.

        Raises:
            ValueError: the stored value is not an integer (HashStore, FileStore).
            StoreConnectionError: a remote store cannot be reached; a TCP server
                refuses an add on a non-integer value by closing the connection,
                which the message says.
            TypeError: ``amount`` is not an int or does not fit in 64 bits.
            NotImplementedError: the store does not implement ``add``.
        """
        return self._add(key_bytes(key), check_int64(amount))

    def compare_set(self, key: Key, expected: Value, desired: Value) -> bytes:
        """Store ``desired`` if the value equals ``expected``; return the value now stored.

        torch's rule, kept exactly: a missing key with ``expected == b""`` is
        created; a missing key with a non-empty ``expected`` stores nothing and
        returns ``expected``.

        Raises:
            TypeError: an argument has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store does not implement ``compare_set``.
        """
        return self._compare_set(key_bytes(key), value_bytes(expected), value_bytes(desired))

    def delete_key(self, key: Key) -> bool:
        """Delete ``key``; return whether it existed.

        Raises:
            TypeError: ``key`` has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store does not implement ``delete_key``.
        """
        return self._delete_key(key_bytes(key))

    def check(self, keys: Iterable[Key]) -> bool:
        """Return whether every key exists, without waiting.

        Raises:
            TypeError: ``keys`` is a single key or holds a key of the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store does not implement ``check``.
        """
        return self._check(key_list(keys))

    def wait(self, keys: Iterable[Key], timeout: Timeout | None = None) -> None:
        """Block until every key exists (up to ``timeout``, default the store timeout).

        Raises:
            StoreTimeoutError: some key was still missing at the deadline (the
                message names the missing keys, the timeout and the store).
            TypeError: ``keys`` is a single key, or an argument has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store does not implement ``wait``.
        """
        self._wait(key_list(keys), self._resolve_timeout(timeout))

    def num_keys(self) -> int:
        """Return the number of keys, including internal ones (``init/`` ...), as torch counts them.

        Raises:
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store does not implement ``num_keys``.
        """
        return self._num_keys()

    def multi_get(self, keys: Iterable[Key]) -> list[bytes]:
        """Wait up to the store timeout for every key, then return their values in order.

        Raises:
            StoreTimeoutError: some key did not appear within the store timeout.
            TypeError: ``keys`` is a single key or holds a key of the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store implements neither ``multi_get`` nor ``get``.
        """
        return self._multi_get(key_list(keys), self._store_timeout())

    def multi_set(self, keys: Sequence[Key], values: Sequence[Value]) -> None:
        """Store ``values[i]`` at ``keys[i]`` for every ``i``.

        Raises:
            ValueError: ``keys`` and ``values`` differ in length.
            TypeError: a key or value has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store implements neither ``multi_set`` nor ``set``.
        """
        raw_keys = key_list(keys)
        raw_values = [value_bytes(v) for v in values]
        same_length(raw_keys, raw_values)
        self._multi_set(raw_keys, raw_values)

    def append(self, key: Key, value: Value) -> None:
        """Append ``value`` to the value at ``key`` (a missing key starts empty).

        Raises:
            TypeError: ``key`` or ``value`` has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store implements neither ``append`` nor
                ``compare_set`` (torch's fallback loop needs it).
        """
        self._append(key_bytes(key), value_bytes(value))

    def queue_push(self, key: Key, value: Value) -> None:
        """Push ``value`` onto the queue at ``key``.

        Raises:
            NotImplementedError: the store has no queues (FileStore, as in torch;
                TCPStore with ``use_libuv=False``).
            TypeError: ``key`` or ``value`` has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
        """
        self._queue_push(key_bytes(key), value_bytes(value))

    def queue_pop(self, key: Key, block: bool = True) -> bytes:
        """Pop the head of the queue at ``key``; with ``block``, wait up to the store timeout for one.

        Raises:
            StoreTimeoutError: ``block`` and the queue stayed empty for the store timeout.
            QueueEmptyError: not ``block`` and the queue is empty.
            NotImplementedError: the store has no queues.
            TypeError: ``key`` has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
        """
        return self._queue_pop(key_bytes(key), block, self._store_timeout())

    def queue_len(self, key: Key) -> int:
        """Return the length of the queue at ``key`` (0 if there is none).

        Raises:
            NotImplementedError: the store has no queues.
            TypeError: ``key`` has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
        """
        return self._queue_len(key_bytes(key))

    def list_keys(self) -> list[str]:
        """Return the user keys (internal ones such as ``init/`` are hidden).

        Raises:
            NotImplementedError: the store does not implement ``list_keys``.
            StoreConnectionError: a remote store cannot be reached.
            UnicodeDecodeError: a key is not valid UTF-8 (torch's rule).
        """
        return [k.decode("utf-8") for k in self._list_keys()]

    def barrier(self, key: Key, world_size: int, timeout: Timeout | None = None) -> None:
        """Block until ``world_size`` callers have reached the barrier named ``key``.

        Raises:
            StoreTimeoutError: fewer than ``world_size`` callers arrived within
                ``timeout`` (default: the store timeout).
            TypeError: an argument has the wrong type.
            StoreConnectionError: a remote store cannot be reached.
            NotImplementedError: the store implements neither ``barrier`` nor the
                ``add``, ``set`` and ``wait`` its fallback needs.
        """
        self._barrier(key_bytes(key), int(world_size), self._resolve_timeout(timeout))

    def has_extended_api(self) -> bool:
        """Whether the store has torch's extended API (``append``, ``multi_get``, queues ...).

        Raises:
            Nothing of its own.
        """
        return False

    def clone(self) -> Store:
        """Return a new store object on the same data (torch: for use in another thread).

        Raises:
            NotImplementedError: the store cannot be cloned (the base class).
        """
        raise NotImplementedError(f"{type(self).__name__} does not support clone()")

    def close(self) -> None:
        """Release what this store object holds. Safe to call twice.

        Raises:
            Nothing in the base class; see each store.
        """

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- raw hooks: concrete stores implement these (called only by their public method) ---------
    def _set(self, key: bytes, value: bytes) -> None:
        raise _Missing(self, "set")

    def _get(self, key: bytes, timeout: float) -> bytes:
        raise _Missing(self, "get")

    def _add(self, key: bytes, amount: int) -> int:
        raise _Missing(self, "add")

    def _compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        raise _Missing(self, "compare_set")

    def _delete_key(self, key: bytes) -> bool:
        raise _Missing(self, "delete_key")

    def _check(self, keys: list[bytes]) -> bool:
        raise _Missing(self, "check")

    def _wait(self, keys: list[bytes], timeout: float) -> None:
        raise _Missing(self, "wait")

    def _num_keys(self) -> int:
        raise _Missing(self, "num_keys")

    def _queue_push(self, key: bytes, value: bytes) -> None:
        raise self._no_queues("queue_push")

    def _queue_pop(self, key: bytes, block: bool, timeout: float) -> bytes:
        raise self._no_queues("queue_pop")

    def _queue_len(self, key: bytes) -> int:
        raise self._no_queues("queue_len")

    def _list_keys(self) -> list[bytes]:
        # torch's words first, so code matching them keeps working.
        raise _Missing(self, "list_keys", f"listKeys support is not implemented: {type(self).__name__} has no list_keys()")

    def _no_queues(self, method: str) -> NotImplementedError:
        return _Missing(self, method, f"queue support is not implemented: {type(self).__name__} has no {method}()")

    # -- torch's base-class fallbacks, built on the public methods -------------------------------
    def _multi_get(self, keys: list[bytes], timeout: float) -> list[bytes]:
        return [as_bytes(self.get(key_arg(k))) for k in keys]

    def _multi_set(self, keys: list[bytes], values: list[bytes]) -> None:
        for k, v in zip(keys, values):
            self.set(key_arg(k), v)

    def _append(self, key: bytes, value: bytes) -> None:
        # torch's fallback: optimistic compare_set loop, starting from "missing".
        arg = key_arg(key)
        expected = b""
        while True:
            try:
                current = as_bytes(self.compare_set(arg, expected, expected + value))
            except _Missing as exc:
                if exc.store is self and exc.method == "compare_set":
                    raise _Missing(
                        self,
                        "append",
                        f"{type(self).__name__} does not implement append() (override append or _append), "
                        "nor compare_set(), which the fallback append needs",
                    ) from None
                raise
            if current == expected + value:
                return
            expected = current

    def _barrier(self, key: bytes, world_size: int, timeout: float) -> None:
        # torch's base algorithm: count arrivals, the last one raises a flag everyone waits for.
        last_member = key_arg(key + b"/last_member")
        if self.add(key_arg(key + b"/num_members"), 1) == world_size:
            self.set(last_member, b"1")
        self.wait([last_member], timeout)
