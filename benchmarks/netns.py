"""A fresh network namespace per storm repetition, and the TCP counters it ends with.

Why: 16,384 clients closing leave 16,384 sockets in TIME_WAIT for 60 s (the
client closes first), and the next repetition, whichever pair it is, then
connects through a port space that is mostly taken: at N = 16,384 that alone
moved a run of torch's clients against our server from 8 s to 24 s, with no
SYN dropped. A repetition in a namespace of its own starts with an empty port
space, empty TIME_WAIT table and zeroed counters (``/proc/net/netstat`` is per
namespace), so every pair meets the same machine, and what the kernel dropped
(accept queue overflows, SYN retransmits) is that repetition's alone.

Needs root and ``ip`` (iproute2); without them ``fresh()`` yields ``None`` and the
repetition runs in the current namespace, as before. Only the calling thread
enters the namespace (``setns`` is per thread); the processes it starts inherit
it. The namespace keeps the host's defaults, ``net.core.somaxconn`` included.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["COUNTERS", "available", "fresh", "tcp_counters"]

_CLONE_NEWNET = 0x40000000
#: TcpExt counters reported per repetition: accept queue overflows (a SYN or the handshake's
#: last ACK dropped because the listener's queue was full) and the SYN retransmits they cause.
COUNTERS = ("ListenOverflows", "TCPSynRetrans")


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and Path("/proc/self/ns/net").exists()


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=20)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def fresh(name: str) -> Iterator[str | None]:
    """Run the block in a new network namespace with loopback up; yields its name (None: unavailable)."""
    if not available():
        yield None
        return
    name = f"{name}-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield name
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        _ip("netns", "del", name, check=False)


def tcp_counters() -> dict[str, int]:
    """The TcpExt counters in ``COUNTERS`` of the calling thread's network namespace."""
    # /proc/thread-self, not /proc/net (= /proc/self/net): setns moved only this thread.
    lines = Path("/proc/thread-self/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        names, numbers = head.split(), values.split()
        if names[0] == "TcpExt:":
            table = dict(zip(names[1:], numbers[1:]))
            return {k: int(table.get(k, 0)) for k in COUNTERS}
    return dict.fromkeys(COUNTERS, 0)
