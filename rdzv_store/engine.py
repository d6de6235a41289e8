"""The in-memory store engine: keys, counters, queues and waiters, defined once.

Both the asyncio ``StoreServer`` and ``HashStore`` run every operation through
this class, so the two cannot drift apart. It does no I/O and takes no locks:
the server calls it from one event-loop thread, HashStore under its own mutex.

Semantics follow torch's libuv server (the default backend) with its bugs
removed:

* A waiter is *ready* when all its keys exist (a non-empty queue counts as an
  existing key) or, for a barrier, when the counter reached the world size.
  Readiness is re-checked on every wake. torch instead counts wake events,
  which releases a waiter whose key was deleted in between and, for queues,
  leaves woken waiters registered (the ``wake_one`` bug in the wire reference).
* Writes wake waiters: set, multi_set, add, append, barrier, and compare_set
  when it stores something. A queue push wakes at most one ready waiter, so
  one item releases one blocked ``queue_pop``.
* ``add`` on an empty value counts from 0, like HashStore and FileStore
  (torch's TCP server drops the connection instead).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .args import INT64_MAX, INT64_MIN, int64, parse_int64

__all__ = ["Engine", "Waiter"]


class Waiter:
    """One pending wait or barrier. ``notify`` is called exactly once, when ``ready()`` holds
    after a write to one of ``keys``."""

    __slots__ = ("keys", "ready", "notify", "done")

    def __init__(
        self, keys: tuple[bytes, ...], ready: Callable[[], bool], notify: Callable[[], None]
    ) -> None:
        self.keys = keys
        self.ready = ready
        self.notify = notify
        self.done = False


class Engine:
    def __init__(self) -> None:
        self.kv: dict[bytes, bytes] = {}
        self.queues: dict[bytes, deque[bytes]] = {}
        # key -> waiters registered on it, in arrival order (a dict is an ordered set).
        self._waiters: dict[bytes, dict[Waiter, None]] = {}

    # -- reads -------------------------------------------------------------------------------
    def exists(self, key: bytes) -> bool:
        return key in self.kv or bool(self.queues.get(key))

    def check(self, keys: list[bytes]) -> bool:
        kv = self.kv  # exists() per key, inline: CHECK is most of a rendezvous' requests
        for k in keys:
            if k not in kv and not self.queues.get(k):
                return False
        return True

    def get(self, key: bytes) -> bytes | None:
        return self.kv.get(key)

    def multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        return [self.kv.get(k) for k in keys]

    def num_keys(self) -> int:
        return len(self.kv)

    def list_keys(self) -> list[bytes]:
        return list(self.kv)

    def queue_len(self, key: bytes) -> int:
        queue = self.queues.get(key)
        return len(queue) if queue else 0

    # -- writes ------------------------------------------------------------------------------
    def set(self, key: bytes, value: bytes) -> None:
        self.kv[key] = value
        if key in self._waiters:  # (the test inline: most writes wake nobody)
            self._wake(key)

    def multi_set(self, keys: list[bytes], values: list[bytes]) -> None:
        for key, value in zip(keys, values):
            self.set(key, value)

    def append(self, key: bytes, value: bytes) -> None:
        self.kv[key] = self.kv.get(key, b"") + value
        self._wake(key)

    def add(self, key: bytes, amount: int) -> int:
        """Raises ``ValueError`` (value unchanged) when the stored value is not an integer."""
        old = self.kv.get(key)
        if old is None:
            base = 0
        elif len(old) < 19 and old.isdigit():
            base = int(old)  # a plain non-negative counter (what add stores): stoll agrees, no scan
        else:
            base = parse_int64(old)
        total = base + amount
        if not INT64_MIN <= total <= INT64_MAX:  # in range (nearly always): no wrapping
            total = int64(total)
        self.kv[key] = str(total).encode()
        if key in self._waiters:
            self._wake(key)
        return total

    def compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        current = self.kv.get(key)
        if current is None:
            if expected:
                return expected  # torch's rule: nothing stored, "expected" returned
        elif current != expected:
            return current
        self.kv[key] = desired
        if key in self._waiters:
            self._wake(key)
        return desired

    def delete(self, key: bytes) -> bool:
        # Deleting wakes nobody (as in torch); waiters re-check readiness on their next wake.
        return self.kv.pop(key, None) is not None

    def queue_push(self, key: bytes, value: bytes) -> None:
        self.queues.setdefault(key, deque()).append(value)
        self._wake(key, one=True)

    def queue_pop(self, key: bytes) -> tuple[int, bytes | None]:
        """Return (length before the pop, head value) or (0, None) when empty."""
        queue = self.queues.get(key)
        if not queue:
            return 0, None
        available = len(queue)
        value = queue.popleft()
        if not queue:
            del self.queues[key]
        return available, value

    # -- waiting -----------------------------------------------------------------------------
    def wait(self, keys: list[bytes], notify: Callable[[], None]) -> Waiter | None:
        """Register a waiter for ``keys``; ``None`` means they all exist already."""
        return self.watch(keys, lambda: self.check(keys), notify)

    def watch(
        self, keys: list[bytes], ready: Callable[[], bool], notify: Callable[[], None]
    ) -> Waiter | None:
        """Register ``notify`` to run once ``ready()`` holds, re-checked after each write to
        one of ``keys``. Returns ``None`` (and registers nothing) if it holds already."""
        if ready():
            return None
        waiter = Waiter(tuple(keys), ready, notify)
        for key in waiter.keys:
            self._waiters.setdefault(key, {})[waiter] = None
        return waiter

    def barrier(self, key: bytes, world_size: int, notify: Callable[[], None]) -> Waiter | None:
        """Count one arrival (stored as decimal text under ``key``, as torch does).

        Returns ``None`` when this arrival completes the barrier (every earlier
        arrival is notified) and a registered waiter otherwise. Raises
        ``ValueError`` when ``key`` holds a non-integer.
        """
        count = self.add(key, 1)  # wakes earlier arrivals once the count reaches world_size
        if count >= world_size:
            return None
        return self.watch([key], lambda: self._counter_at_least(key, world_size), notify)

    def cancel(self, waiter: Waiter) -> None:
        """Drop a waiter (client timeout or disconnect). Safe after it fired."""
        if not waiter.done:
            waiter.done = True
            self._unregister(waiter)

    def pending_waiters(self) -> int:
        return len({w for ws in self._waiters.values() for w in ws})

    # -- internals ---------------------------------------------------------------------------
    def _counter_at_least(self, key: bytes, target: int) -> bool:
        try:
            return parse_int64(self.kv.get(key, b"")) >= target
        except ValueError:
            return False

    def _unregister(self, waiter: Waiter) -> None:
        for key in waiter.keys:
            registered = self._waiters.get(key)
            if registered is not None:
                registered.pop(waiter, None)
                if not registered:
                    del self._waiters[key]

    def _wake(self, key: bytes, one: bool = False) -> None:
        registered = self._waiters.get(key)
        if not registered:
            return
        for waiter in list(registered):
            if waiter.ready():
                waiter.done = True
                self._unregister(waiter)
                waiter.notify()
                if one:
                    return
