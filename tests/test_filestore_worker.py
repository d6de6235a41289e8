"""A remote-controlled FileStore process for the FileStore tests. It holds no tests.

Run as ``python test_filestore_worker.py``; it reads one JSON command per line
on stdin and answers one JSON line on stdout. ``["open", lib, path,
world_size]`` opens a store (``lib`` is ``"ours"`` or ``"torch"``) and returns
a handle; every other command is ``[op, handle, *args]``. Values travel as
latin-1 strings. The ``Peer`` class below drives a worker from a test with a
bounded wait on every reply, and kills it if it does not exit.

The process exits when stdin closes (the test ended or died), so a worker can
never outlive its test by more than the time it spends inside one command.
"""

from __future__ import annotations

import gc
import json
import os
import select
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

WORKER = str(Path(__file__).resolve())


def _b(text: str) -> bytes:
    return text.encode("latin-1")


def _s(raw: bytes) -> str:
    return raw.decode("latin-1")


def _open(lib: str, path: str, world_size: int) -> Any:
    if lib == "torch":
        import torch.distributed as dist

        return dist.FileStore(path, world_size)
    from rdzv_store import FileStore

    return FileStore(path, world_size)


def _timeout(lib: str, seconds: float) -> Any:
    return timedelta(seconds=seconds) if lib == "torch" else seconds


def _handle(stores: dict[int, tuple[str, Any]], cmd: list[Any], out: Any) -> Any:
    op = cmd[0]
    if op == "open":
        lib, path, world_size = cmd[1], cmd[2], cmd[3]
        handle = len(stores) + 1
        stores[handle] = (lib, _open(lib, path, world_size))
        return handle
    if op == "pid":
        return os.getpid()
    lib, store = stores[cmd[1]]
    args = cmd[2:]
    if op == "set":
        return store.set(args[0], _b(args[1]))
    if op == "get":
        return _s(store.get(args[0]))
    if op == "get_notify":
        # Say "started" just before blocking, then report the value and when get returned.
        out({"started": time.monotonic()})
        value = store.get(args[0])
        return {"value": _s(value), "t": time.monotonic()}
    if op == "add":
        return store.add(args[0], args[1])
    if op == "adds":
        key, count, barrier = args
        if barrier:
            store.add(barrier, 1)
            store.wait([barrier + "/go"])
        last = 0
        for _ in range(count):
            last = store.add(key, 1)
        return last
    if op == "compare_set":
        return _s(store.compare_set(args[0], _b(args[1]), _b(args[2])))
    if op == "delete_key":
        return store.delete_key(args[0])
    if op == "check":
        return store.check(args[0])
    if op == "wait":
        return store.wait(args[0], _timeout(lib, args[1]))
    if op == "num_keys":
        return store.num_keys()
    if op == "list_keys":
        return sorted(store.list_keys())
    if op == "multi_set":
        return store.multi_set(args[0], [_b(v) for v in args[1]])
    if op == "multi_get":
        return [_s(v) for v in store.multi_get(args[0])]
    if op == "append":
        return store.append(args[0], _b(args[1]))
    if op == "set_timeout":
        return store.set_timeout(_timeout(lib, args[0]))
    if op == "close":
        if lib == "ours":
            store.close()
        del stores[cmd[1]]
        del store
        gc.collect()  # torch's destructor runs when the last reference goes
        return None
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    stores: dict[int, tuple[str, Any]] = {}

    def out(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    out({"ready": os.getpid()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd[0] == "exit":
            break
        try:
            out({"ok": _handle(stores, cmd, out)})
        except Exception as exc:  # reported to the test, which decides
            out({"err": [type(exc).__name__, str(exc)]})
    stores.clear()
    gc.collect()


class PeerError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Peer:
    """Drives one worker process. Every read has a deadline; ``stop()`` always reaps it."""

    def __init__(self, python: str = sys.executable, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [python, WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._buf = b""
        self._timeout = timeout
        self._pid: int | None = None  # read from the "ready" line on first use

    @property
    def pid(self) -> int:
        if self._pid is None:
            self._pid = self._recv(self._timeout)["ready"]
        return self._pid

    def send(self, *cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(list(cmd)) + "\n").encode())
        self.proc.stdin.flush()

    def poll_line(self, timeout: float) -> dict[str, Any] | None:
        """The next line, or None if none arrives within ``timeout``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"worker {self.proc.pid} exited (code {self.proc.poll()})")
                self._buf += chunk
            elif remaining <= 0:
                return None
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        self.pid  # noqa: B018 - consume the "ready" line first
        return self._recv(timeout)

    def _recv(self, timeout: float) -> dict[str, Any]:
        reply = self.poll_line(timeout)
        if reply is None:
            raise TimeoutError(f"worker {self.proc.pid} did not answer within {timeout} s")
        return reply

    def result(self, timeout: float = 30.0) -> Any:
        reply = self.recv(timeout)
        if "err" in reply:
            raise PeerError(*reply["err"])
        return reply["ok"]

    def call(self, *cmd: Any, timeout: float = 30.0) -> Any:
        self.send(*cmd)
        return self.result(timeout)

    def open(self, lib: str, path: str, world_size: int = -1) -> int:
        return self.call("open", lib, str(path), world_size)

    def stop(self, timeout: float = 10.0) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("exit")
                    self.proc.stdin.close()  # type: ignore[union-attr]
                except OSError:
                    pass
                self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass


if __name__ == "__main__":
    main()
