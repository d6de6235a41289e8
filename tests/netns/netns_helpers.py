"""Three hosts in network namespaces, for real network faults (``tests/netns``).

``Topology`` builds, as root, four namespaces named ``rdzvnt-<pid>-<token>-<role>``: a
switch (``sw``: a bridge, no address) and three hosts, ``srv`` (10.213.0.1), ``c1``
(10.213.0.2) and ``c2`` (10.213.0.3), each joined to the bridge by a veth pair (host side
``eth0``). Only these namespaces are touched, and only 10.213.0.0/24 addresses inside them.

``cut(role)`` takes that host's port off the bridge: its packets, and packets to it, are
silently dropped (no RST, no ICMP, carrier stays up), which is what a dead switch port or
a partition looks like to TCP. ``restore(role)`` puts it back.

Namespaces are removed by ``destroy()`` (fixture finalizers call it, also when a test
fails) and by ``sweep_stale()``, which removes namespaces with our prefix whose creating
process is gone (a run killed before its finalizers).

``NetnsServer`` is our server in the ``srv`` namespace (a child process that answers
``stats`` on stdin; fds and RSS are read from ``/proc``); ``Agent`` is a client host's
agent (``agent.py``) in a namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PREFIX = "rdzvnt-"
SUBNET = "10.213.0"
ADDRESSES = {"srv": f"{SUBNET}.1", "c1": f"{SUBNET}.2", "c2": f"{SUBNET}.3"}
HERE = Path(__file__).resolve().parent
AGENT = HERE / "agent.py"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def why_unavailable() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    result = _ip("netns", "add", name, check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def sweep_stale() -> list[str]:
    """Delete namespaces with our prefix whose creating process no longer runs."""
    removed = []
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{re.escape(PREFIX)}(\d+)-.*", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


class Topology:
    """The switch and three hosts (see the module docstring)."""

    roles = ("srv", "c1", "c2")

    def __init__(self) -> None:
        self.token = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.ns = {role: f"{PREFIX}{self.token}-{role}" for role in ("sw", *self.roles)}
        self.cut_roles: set[str] = set()
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def _build(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        sw = self.ns["sw"]
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for role in self.roles:
            port = f"p-{role}"
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", self.ns[role])
            _ip("-n", sw, "link", "set", port, "master", "br0")
            _ip("-n", sw, "link", "set", port, "up")
            _ip("-n", self.ns[role], "addr", "add", f"{ADDRESSES[role]}/24", "dev", "eth0")
            _ip("-n", self.ns[role], "link", "set", "eth0", "up")

    def address(self, role: str) -> str:
        return ADDRESSES[role]

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role]]

    def cut(self, role: str) -> None:
        """Take ``role`` off the switch: every packet to or from it is silently dropped."""
        _ip("-n", self.ns["sw"], "link", "set", f"p-{role}", "nomaster")
        self.cut_roles.add(role)

    def restore(self, role: str) -> None:
        _ip("-n", self.ns["sw"], "link", "set", f"p-{role}", "master", "br0")
        self.cut_roles.discard(role)

    def restore_all(self) -> None:
        for role in list(self.cut_roles):
            self.restore(role)

    def destroy(self) -> None:
        """Delete our namespaces (their veths and bridge go with them). Idempotent."""
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()

    def exists(self) -> bool:
        listing = _ip("netns", "list", check=False).stdout
        return any(ns in listing for ns in self.ns.values())


# -- processes in namespaces -------------------------------------------------------------------


class _LineProcess:
    """A child process speaking JSON lines; stderr kept for messages."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stderr_lines: list[str] = []
        self._lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read_err, daemon=True).start()
        threading.Thread(target=self._read_out, daemon=True).start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line.strip())
                self._cond.notify_all()
        with self._cond:
            self._lines.append("")  # EOF marker
            self._cond.notify_all()

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def next_line(self, match: Any, timeout: float) -> str:
        """The first unread line for which ``match(line)`` holds (removed), within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, line in enumerate(self._lines):
                    if line == "" or match(line):
                        if line == "":
                            raise AssertionError(f"process exited; stderr: {self.stderr_lines[-20:]}")
                        return self._lines.pop(i)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching line within {timeout} s; stderr: {self.stderr_lines[-20:]}")
                self._cond.wait(remaining)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class Agent(_LineProcess):
    """``agent.py`` in a namespace (see its docstring for the commands)."""

    def __init__(self, topo: Topology, role: str, python: str = sys.executable) -> None:
        super().__init__([*topo.exec_prefix(role), python, "-u", str(AGENT)])
        self._next = 1
        self.role = role
        self.reply(0, timeout=60)

    def start(self, cmd: str, **fields: Any) -> int:
        """Send a command to run in the background; ``reply(id)`` collects its answer."""
        ident = self._next
        self._next += 1
        self.send({"cmd": cmd, "id": ident, "bg": True, **fields})
        return ident

    def reply(self, ident: int, timeout: float) -> dict[str, Any]:
        line = self.next_line(lambda l: json.loads(l).get("id") == ident, timeout)
        return json.loads(line)

    def call(self, cmd: str, within: float = 30.0, **fields: Any) -> Any:
        """Run a command and return its value (answered ``within`` seconds); raise
        AssertionError with the agent's error."""
        answer = self.reply(self.start(cmd, **fields), within)
        if not answer["ok"]:
            raise AssertionError(f"{self.role}: {cmd} {fields} failed: {answer['error']}: {answer['message']}")
        return answer["value"]


_SERVER = r"""
import asyncio, json, socket, sys, threading
from rdzv_store.server import StoreServer

host, idle, interval, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((host, 0))

async def main():
    server = StoreServer(host, 0, sock=sock)
    await server.start()
    # StoreServer has no keepalive option: it sets keepalive on the listening socket, which
    # accepted sockets inherit, so a shorter one set there afterwards applies to every client.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    def reader():
        for line in sys.stdin:
            if line.strip() == "stats":
                async def stats():
                    e = server.engine
                    return {"connections": server.connection_count, "waiters": e.pending_waiters(), "keys": len(e.kv)}
                print(json.dumps(asyncio.run_coroutine_threadsafe(stats(), loop).result(10)), flush=True)
        loop.call_soon_threadsafe(done.set)
    threading.Thread(target=reader, daemon=True).start()
    print(json.dumps({"port": server.port}), flush=True)
    await done.wait()
    await server.close()

asyncio.run(main())
"""


class NetnsServer(_LineProcess):
    """Our StoreServer on the ``srv`` host, keepalive ``idle``/``interval``/``count`` seconds."""

    def __init__(self, topo: Topology, keepalive: tuple[int, int, int] = (1, 1, 2)) -> None:
        self.host = topo.address("srv")
        super().__init__(
            [*topo.exec_prefix("srv"), sys.executable, "-c", _SERVER, self.host, *map(str, keepalive)]
        )
        self.port = json.loads(self.next_line(lambda l: '"port"' in l, 30))["port"]
        self.address = f"{self.host}:{self.port}"
        self.pid = self.proc.pid  # `ip netns exec` execs the command: this is the server

    def stats(self) -> dict[str, int]:
        self.send("stats")
        return json.loads(self.next_line(lambda l: '"connections"' in l, 10))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def wait_until(self, predicate: Any, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() >= deadline:
                raise AssertionError(f"server condition not met within {timeout} s: {stats}")
            time.sleep(0.05)


def wait_readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])
