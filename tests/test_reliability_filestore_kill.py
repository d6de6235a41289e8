"""FileStore writers SIGKILLed mid-append, in a loop.

Two kinds of victims take turns:

* our ``FileStore`` writing keys (some of 2 MiB, to widen the window in which a
  kill lands inside a ``write``) and a counter, printing each index once both
  calls returned: everything printed is *committed*;
* a torch-style writer that takes the exclusive ``flock`` and appends half a
  record, the way torch's four ``write`` calls leave one when killed between
  them, so every other round starts from a torn tail for certain.

After each kill: every committed key reads back exactly, through a reader that
has been open all along (cached offset) and through a fresh one; the counter
holds at least every committed add; a wait for a missing key times out on time
without spinning (CPU time well under wall time); and the next writer appends
after the torn tail with nothing lost.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import struct
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from reliability_helpers import scale

from rdzv_store import FileStore, StoreTimeoutError

_WRITER = r"""
import sys
from rdzv_store import FileStore
path, it = sys.argv[1], int(sys.argv[2])
store = FileStore(path)
i = 0
while i < 100000:
    size = 2 << 20 if i % 4 == 3 else 100
    store.set(f"it{it}/k{i}", f"{it}:{i}:".encode().ljust(size, b"."))
    store.add("count", 1)
    print(i, flush=True)
    i += 1
"""

_TORN = r"""
import fcntl, os, struct, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.lseek(fd, 0, os.SEEK_END)
key = b"/torn-key"
os.write(fd, struct.pack("<I", len(key)) + key[:4])  # half a record, then die holding the lock
print("torn", flush=True)
sys.stdin.read()
"""


def value(it: int, i: int) -> bytes:
    return f"{it}:{i}:".encode().ljust(2 << 20 if i % 4 == 3 else 100, b".")


def read_lines_then_kill(proc: subprocess.Popen, lines: int) -> list[str]:
    got = []
    deadline = time.monotonic() + 30
    while len(got) < lines:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "writer made no progress"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        assert ready
        line = proc.stdout.readline()
        assert line, f"writer exited early: {proc.poll()}"
        got.append(line.strip())
    proc.kill()
    proc.wait(10)
    # Lines printed before the kill landed are committed too.
    got += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    proc.stdout.close()
    return got


def test_sigkilled_writers_lose_no_committed_key(tmp_path):
    path = str(tmp_path / "store")
    rounds = scale(8, 200)
    rng = random.Random(1234)
    committed: dict[str, bytes] = {}
    adds = 0
    torn_rounds = 0
    with FileStore(path) as reader:
        reader.set_timeout(timedelta(seconds=10))
        for it in range(rounds):
            if it % 2:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _TORN, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
                assert read_lines_then_kill(proc, 1) == ["torn"]
                proc.stdin.close()
                torn_rounds += 1
                with open(path, "rb") as f:  # the tail is torn now
                    tail = f.read()[-8:]
                assert tail == struct.pack("<I", 9) + b"/tor"
            else:
                proc = subprocess.Popen([sys.executable, "-c", _WRITER, path, str(it)], stdout=subprocess.PIPE, text=True)
                for line in read_lines_then_kill(proc, rng.randrange(1, 12)):
                    i = int(line)
                    committed[f"it{it}/k{i}"] = value(it, i)
                    adds += 1
            # Every committed key, through the long-lived reader and a fresh one.
            fresh = FileStore(path)
            fresh.set_timeout(timedelta(seconds=10))
            for store in (reader, fresh):
                keys = list(committed)
                assert store.multi_get(keys) == [committed[k] for k in keys]
                assert int(store.get("count")) >= adds
            # A wait for a key that is not there: on time, and without spinning.
            wall, cpu = time.monotonic(), time.thread_time()
            with pytest.raises(StoreTimeoutError):
                fresh.wait(["torn-key", "never"], timedelta(seconds=0.3))
            wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
            assert 0.3 <= wall < 1.5, wall
            assert cpu < 0.5 * wall, f"reader used {cpu:.2f} s CPU in {wall:.2f} s"
            assert not fresh.check(["torn-key"])  # half a record is never data
            fresh.close()
        # A last writer appends after whatever tail the last round left.
        with FileStore(path) as last:
            last.set("after", "the end")
            assert reader.get("after") == b"the end"
            assert reader.multi_get(list(committed)) == list(committed.values())
    print(f"\n{rounds} SIGKILL rounds ({torn_rounds} torn tails): {len(committed)} committed keys, none lost")
    assert torn_rounds > 0 and committed
