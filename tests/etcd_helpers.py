"""Real etcd processes for tests: one member or a 3-member cluster on loopback.

* Ports: bound to 127.0.0.1:0, read and released, then passed by number (never port 0:
  the v3 gateway dials the configured address, ``etcd-v3.md`` §1.1); a member that
  loses the race for its port exits at once and is restarted on fresh ports.
* Data dirs: unique, under the system temp dir, removed on stop.
* Every member runs with ``PR_SET_PDEATHSIG``: if the test process dies, so does etcd.
* Everything is bounded in time: start-up (20 s), health polls, stop (SIGTERM, then SIGKILL).

``etcd_binary()`` calls ``real_components.unavailable`` when etcd is missing (skip outside
CI, fail under CI).
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from real_components import unavailable

__all__ = [
    "etcd_binary",
    "free_port",
    "free_ports",
    "EtcdMember",
    "EtcdCluster",
    "shared_member",
    "etcd_cluster",
]

START_TIMEOUT = 20.0


def etcd_binary() -> str:
    """Path of the etcd binary, or skip (fail under CI) when there is none."""
    path = os.environ.get("ETCD_BINARY") or shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if not path:
        unavailable("no etcd binary (apt-get install etcd-server, or set ETCD_BINARY)")
    return path


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports. All are held bound until all are chosen: one at a time,
    the kernel may hand out a port just released again (seen: a cluster with a duplicate URL)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def post(port: int, path: str, body: dict[str, Any], timeout: float = 2.0, host: str = "127.0.0.1") -> tuple[int, dict[str, Any]]:
    """One raw gateway call (for setting up and inspecting the cluster in tests)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body))
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else {})
    finally:
        conn.close()


class EtcdMember:
    """One etcd member process. ``client_url`` is its gateway URL."""

    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: str) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir + ".log"
        self.stopped = False  # SIGSTOPped

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, token: str, state: str = "new", extra: list[str] | None = None) -> None:
        args = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-token", token,
            "--initial-cluster-state", state,
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ] + (extra or [])
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.stopped = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 0.5) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=timeout)
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                return resp.status == 200 and json.loads(resp.read()).get("health") == "true"
            finally:
                conn.close()
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def status(self, timeout: float = 0.5) -> dict[str, Any] | None:
        try:
            code, reply = post(self.client_port, "/v3/maintenance/status", {}, timeout)
        except (OSError, ValueError, http.client.HTTPException):
            return None
        return reply if code == 200 else None

    def is_leader(self) -> bool:
        st = self.status()
        return bool(st and st.get("leader") and st["leader"] == st["header"]["member_id"])

    def sigstop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self.stopped:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""


class EtcdCluster:
    """``size`` members on loopback, started together. Use as a context manager."""

    def __init__(self, size: int = 1, extra: list[str] | None = None, no_fsync: bool = True) -> None:
        self.size = size
        self.extra = list(extra or [])
        if no_fsync:
            self.extra.append("--unsafe-no-fsync")  # test speed only; see etcd-v3.md §1.4
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.root = tempfile.mkdtemp(prefix="rdzv-etcd-", dir=base)
        self.token = "rdzv-test-" + uuid.uuid4().hex[:12]
        self.members: list[EtcdMember] = []

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self) -> EtcdCluster:
        for attempt in range(5):
            ports = free_ports(2 * self.size)
            self.members = [
                EtcdMember(f"n{i}", ports[2 * i], ports[2 * i + 1], os.path.join(self.root, f"a{attempt}-n{i}"))
                for i in range(self.size)
            ]
            self.token_used = self.token + f"-{attempt}"
            for m in self.members:
                m.start(self.initial_cluster, self.token_used, extra=self.extra)
            if self._wait_healthy():
                return self
            logs = "\n".join(m.log_tail(5) for m in self.members)
            self._stop_members()
            if "address already in use" not in logs:
                raise RuntimeError(f"etcd did not become healthy within {START_TIMEOUT} s:\n{logs}")
        raise RuntimeError("etcd could not get free ports in 5 attempts")

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if any(not m.alive() for m in self.members):
                return False
            if all(m.healthy() for m in self.members):
                return True
            time.sleep(0.01)
        return False

    def restart(self, member: EtcdMember) -> None:
        """Restart a killed member on its data dir (it rejoins)."""
        member.start(self.initial_cluster, self.token_used, state="existing", extra=self.extra)

    def leader(self, timeout: float = 10.0) -> EtcdMember:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.members:
                if m.alive() and not m.stopped and m.is_leader():
                    return m
            time.sleep(0.02)
        raise RuntimeError("no etcd leader within %s s" % timeout)

    def wait_leader_among(self, members: list[EtcdMember], timeout: float = 15.0) -> EtcdMember:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in members:
                if m.is_leader():
                    return m
            time.sleep(0.02)
        raise RuntimeError("no new etcd leader within %s s" % timeout)

    def _stop_members(self) -> None:
        threads = [threading.Thread(target=m.stop) for m in self.members]
        started = []
        for t, m in zip(threads, self.members):
            try:
                t.start()
                started.append(t)
            except RuntimeError:  # at interpreter shutdown (the atexit net) no thread can start
                m.stop()
        for t in started:
            t.join(20)

    def stop(self) -> None:
        self._stop_members()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SHARED: EtcdCluster | None = None
_SHARED_LOCK = threading.Lock()


def shared_member() -> EtcdCluster:
    """One single-member cluster for the whole test process (started on first use)."""
    global _SHARED
    etcd_binary()
    with _SHARED_LOCK:
        if _SHARED is None or not all(m.alive() for m in _SHARED.members):
            if _SHARED is not None:
                _SHARED.stop()
            _SHARED = EtcdCluster(1).start()
            atexit.register(_SHARED.stop)
        return _SHARED


@contextmanager
def etcd_cluster(size: int = 3, **kwargs: Any) -> Iterator[EtcdCluster]:
    etcd_binary()
    cluster = EtcdCluster(size, **kwargs)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
