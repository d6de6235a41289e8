"""Helpers for the DynamicRendezvousHandler tests (imported by name; also run as an agent script).

* :class:`FakeClock`: the handler's clock (monotonic, wall-clock UTC, sleep, jitter, timer wait)
  under test control; ``sleep`` advances time instantly, so polling loops run in microseconds.
* :class:`AgentProcess`: one rendezvous agent in a child process
  (``python tests/handler_helpers.py agent ...``), driven by line commands on stdin
  (``next``, ``close``, ``waiting``, ``closed``, ``exit``) and reporting JSON lines on stdout.
  Every read has a deadline; ``kill()``/``stop()`` are safe to call twice.

No torch import here.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class FakeClock:
    """A controllable clock: ``sleep(s)`` and :meth:`advance` move both time lines together."""

    def __init__(self, start: datetime | None = None, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._mono = 1000.0
        self._wall = start or datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
        self._rng = random.Random(seed)
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def now(self) -> datetime:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._mono += seconds
            self._wall += timedelta(seconds=seconds)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    def uniform(self, low: float, high: float) -> float:
        return self._rng.uniform(low, high)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        # The keep-alive timer never ticks by itself under a fake clock (tests call the tick);
        # it only ends when cancelled. Bounded in real time all the same.
        event.wait(30.0)
        return True


# -- agent processes ----------------------------------------------------------------------------


class AgentProcess:
    """One agent: ``create_backend`` + ``create_handler`` in a child process, driven over stdin."""

    def __init__(
        self,
        *,
        endpoint: str,
        store_type: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        conf: dict[str, Any] | None = None,
        python: str | None = None,
        torch_handler: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        args = {
            "endpoint": endpoint,
            "store_type": store_type,
            "run_id": run_id,
            "min_nodes": min_nodes,
            "max_nodes": max_nodes,
            "conf": conf or {},
            "torch": torch_handler,
        }
        self._stderr = tempfile.TemporaryFile()
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = str(REPO) + os.pathsep + child_env.get("PYTHONPATH", "")
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            [python or sys.executable, str(Path(__file__).resolve()), "agent", json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=child_env,
            cwd=str(REPO),
        )
        self._buf = b""
        self.pid = self.proc.pid
        self.events: list[dict[str, Any]] = []

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next event of type ``kind`` (others are kept in :attr:`events`), within ``timeout``."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    event = json.loads(line)
                    self.events.append(event)
                    if event["event"] == kind:
                        return event
                    if event["event"] == "crash":
                        raise AssertionError(f"agent {self.pid} crashed: {event}; stderr: {self.stderr()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"agent {self.pid}: no {kind!r} within {timeout}s; events {self.events}; "
                        f"stderr: {self.stderr()[-3000:]}"
                    )
                if not sel.select(min(remaining, 0.5)):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(
                        f"agent {self.pid} exited (rc={self.proc.poll()}) without {kind!r}; events "
                        f"{self.events}; stderr: {self.stderr()[-3000:]}"
                    )
                self._buf += chunk

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the agent to exit; kill it if it does not within ``timeout``."""
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._stderr.close()


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _agent_main(args: dict[str, Any]) -> int:
    """The agent: build a handler, then obey commands until ``exit`` (or stdin closes)."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    conf = dict(args["conf"])
    conf.setdefault("store_type", args["store_type"])
    if args["torch"]:
        from torch.distributed.elastic.rendezvous import RendezvousParameters as Params
        from torch.distributed.elastic.rendezvous import api as rapi
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

        errors: Any = rapi
    else:
        import rdzv_backend as rapi_ours
        from rdzv_backend import RendezvousParameters as Params  # type: ignore[assignment]
        from rdzv_backend import create_backend  # type: ignore[assignment]
        from rdzv_backend import create_handler  # type: ignore[assignment]

        errors = rapi_ours
    params = Params(
        backend="c10d",
        endpoint=args["endpoint"],
        run_id=args["run_id"],
        min_nodes=args["min_nodes"],
        max_nodes=args["max_nodes"],
        local_addr=HOST,
        **conf,
    )
    backend, store = create_backend(params)
    handler = create_handler(store, backend, params)
    node = handler._this_node
    _emit(event="ready", pid=os.getpid(), node=[node.addr, node.pid, node.local_id], torch=bool(args["torch"]))
    for raw in sys.stdin:
        command = raw.strip()
        try:
            if command == "next":
                t0 = time.monotonic()
                info = handler.next_rendezvous()
                boot = info.bootstrap_store_info
                state = handler._state_holder.state
                _emit(
                    event="round",
                    round=state.round,
                    rank=info.rank,
                    world=info.world_size,
                    master=[boot.master_addr, boot.master_port] if boot else None,
                    participants=sorted([n.addr, n.pid, n.local_id, r] for n, r in state.participants.items()),
                    elapsed=time.monotonic() - t0,
                    t=time.time(),
                )
            elif command == "close":
                handler.set_closed()
                _emit(event="closed")
            elif command == "closed":
                _emit(event="is_closed", value=handler.is_closed())
            elif command == "waiting":
                _emit(event="waiting", value=handler.num_nodes_waiting())
            elif command.startswith("putget "):
                # Use the round's store the way workers would: set a key, read a peer's.
                _, mine, theirs = command.split(" ", 2)
                info_store = handler._get_store()
                info_store.set(mine, str(os.getpid()))
                _emit(event="putget", value=info_store.get(theirs).decode())
            elif command == "shutdown":
                _emit(event="shutdown", value=handler.shutdown())
            elif command == "exit":
                break
            else:
                _emit(event="error", kind="UnknownCommand", message=command)
        except errors.RendezvousClosedError as exc:
            _emit(event="error", kind="RendezvousClosedError", message=str(exc), t=time.time())
        except errors.RendezvousGracefulExitError as exc:
            _emit(event="error", kind="RendezvousGracefulExitError", message=str(exc), t=time.time())
        except Exception as exc:  # reported, not raised: the test decides
            _emit(event="error", kind=type(exc).__name__, message=str(exc), t=time.time())
    handler._stop_heartbeats()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "agent":
        sys.path.insert(0, str(REPO))
        try:
            sys.exit(_agent_main(json.loads(sys.argv[2])))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            import traceback

            _emit(event="crash", kind=type(exc).__name__, message=str(exc), tb=traceback.format_exc())
            sys.exit(1)
    raise SystemExit("usage: handler_helpers.py agent JSON")
