"""``HashStore``: the engine behind a mutex, for threads of one process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .engine import Engine
from .errors import format_keys, queue_empty, wait_timeout
from .store import Store

__all__ = ["HashStore"]


class HashStore(Store):
    """An in-process store shared by threads. ``clone()`` returns the same object, as in torch.

    Differences from torch: ``add`` wakes waiters (torch's makes them sleep to
    their deadline), and timeouts of zero or less mean "do not wait".

    Raises:
        Nothing at construction. Operations raise what ``Store`` documents;
        ``add`` raises ``ValueError`` naming the key when the stored value is
        not an integer, and ``queue_pop(block=False)`` ``QueueEmptyError``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._engine = Engine()
        self._lock = threading.Lock()

    def has_extended_api(self) -> bool:
        """True: HashStore has torch's extended API.

        Raises:
            Nothing.
        """
        return True

    def clone(self) -> HashStore:
        """This same object, as torch's HashStore does (the data is shared anyway).

        Raises:
            Nothing.
        """
        return self

    # -- writes ----------------------------------------------------------------------------------
    def _set(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._engine.set(key, value)

    def _multi_set(self, keys: list[bytes], values: list[bytes]) -> None:
        with self._lock:
            self._engine.multi_set(keys, values)

    def _append(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._engine.append(key, value)

    def _add(self, key: bytes, amount: int) -> int:
        with self._lock:
            try:
                return self._engine.add(key, amount)
            except ValueError as exc:
                raise ValueError(f"add on key {format_keys([key])}: stored value is {exc}") from None

    def _compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        with self._lock:
            return self._engine.compare_set(key, expected, desired)

    def _delete_key(self, key: bytes) -> bool:
        with self._lock:
            return self._engine.delete(key)

    def _queue_push(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._engine.queue_push(key, value)

    # -- reads -----------------------------------------------------------------------------------
    def _check(self, keys: list[bytes]) -> bool:
        with self._lock:
            return self._engine.check(keys)

    def _num_keys(self) -> int:
        with self._lock:
            return self._engine.num_keys()

    def _list_keys(self) -> list[bytes]:
        with self._lock:
            return self._engine.list_keys()

    def _queue_len(self, key: bytes) -> int:
        with self._lock:
            return self._engine.queue_len(key)

    # -- blocking reads --------------------------------------------------------------------------
    def _wait(self, keys: list[bytes], timeout: float) -> None:
        self._block_until(keys, lambda: self._engine.check(keys), timeout)

    def _get(self, key: bytes, timeout: float) -> bytes:
        # get() looks at plain keys only: a queue of the same name does not satisfy it.
        return self._multi_get([key], timeout)[0]

    def _multi_get(self, keys: list[bytes], timeout: float) -> list[bytes]:
        kv = self._engine.kv
        deadline = time.monotonic() + timeout
        while True:
            self._block_until(keys, lambda: all(k in kv for k in keys), deadline - time.monotonic())
            with self._lock:
                values = self._engine.multi_get(keys)
            if all(v is not None for v in values):
                return values  # type: ignore[return-value]
            # A key was deleted between the wake-up and the read: wait for it again.

    def _queue_pop(self, key: bytes, block: bool, timeout: float) -> bytes:
        if block:
            self._wait([key], timeout)
        with self._lock:
            _, value = self._engine.queue_pop(key)
        if value is None:
            raise queue_empty(key, "HashStore")
        return value

    def _block_until(self, keys: list[bytes], ready: Callable[[], bool], timeout: float) -> None:
        woken = threading.Event()
        with self._lock:
            waiter = self._engine.watch(keys, ready, woken.set)
        if waiter is None:
            return
        if timeout > 0 and woken.wait(timeout):
            return
        with self._lock:
            self._engine.cancel(waiter)
            # As torch does, look once more at the deadline: a write that raced the timer counts.
            if ready():
                return
        raise wait_timeout(keys, timeout, "HashStore")
