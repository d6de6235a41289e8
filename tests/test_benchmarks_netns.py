"""The storm benchmark's fresh network namespace per repetition (``benchmarks/netns.py``).

What it must guarantee for the figures to be comparable: inside, an empty
port space and zeroed TCP counters; outside again, the host's namespace, and
no namespace left behind. Needs root and iproute2 (CI has both).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import netns  # noqa: E402
from real_components import unavailable  # noqa: E402


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_fresh_namespace_isolates_ports_and_counters() -> None:
    if not netns.available():
        unavailable("network namespaces need root and iproute2 (ip)")
    outside = socket.socket()
    outside.bind(("127.0.0.1", 0))
    outside.listen()
    port = outside.getsockname()[1]
    before = _namespaces()
    try:
        with netns.fresh("rdzv-test") as name:
            assert name is not None and name in _namespaces()
            assert netns.tcp_counters() == dict.fromkeys(netns.COUNTERS, 0)
            # the host's listener is not here: the same port is free, and connecting to it is refused
            with socket.socket() as inside:
                inside.bind(("127.0.0.1", port))
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", port)) != 0
            # a child process started in the block inherits the namespace
            links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
            assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        # back home: the host's listener answers again, and the namespace is gone
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert _namespaces() == before
    finally:
        outside.close()
