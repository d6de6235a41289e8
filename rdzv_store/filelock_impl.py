"""How FileStore takes its whole-file ``flock``: pluggable, so the choice can be measured.

torch's FileStore locks the data file itself with ``flock(2)`` (``LOCK_EX`` for
writes and read-modify-writes, ``LOCK_SH`` for reads), so every strategy here
takes exactly that lock and nothing else; they differ only in how they wait
for it:

* ``FCNTL`` (the default): a blocking ``fcntl.flock``. The kernel queues the
  waiter and wakes it the moment the holder unlocks.
* ``filelock_strategy(poll_interval)``: ``filelock.lock_descriptor`` (filelock
  >= 3.30) for the exclusive lock. It retries a non-blocking attempt every
  ``poll_interval`` seconds. filelock has no shared mode, so reads still use a
  blocking ``fcntl.flock(LOCK_SH)``.

``benchmarks/bench_filestore_lock.py`` compares the two under contention; the
numbers (polling loses badly under contention, see the README) are why FCNTL
is the default.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from typing import Callable

__all__ = ["Locking", "FCNTL", "filelock_strategy"]


@dataclass(frozen=True)
class Locking:
    """Three calls on a caller-owned descriptor: take exclusive, take shared, release."""

    name: str
    exclusive: Callable[[int], object]
    shared: Callable[[int], object]
    unlock: Callable[[int], object]


def _flock_ex(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_EX)


def _flock_sh(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_SH)


def _flock_un(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


FCNTL = Locking("fcntl.flock", _flock_ex, _flock_sh, _flock_un)


def filelock_strategy(poll_interval: float = 0.05) -> Locking:
    """Exclusive lock through ``filelock.lock_descriptor``; imported only when asked for."""
    from filelock import lock_descriptor

    def exclusive(fd: int) -> None:
        lock_descriptor(fd, blocking=True, poll_interval=poll_interval)

    return Locking(f"filelock.lock_descriptor(poll_interval={poll_interval:g})", exclusive, _flock_sh, _flock_un)
