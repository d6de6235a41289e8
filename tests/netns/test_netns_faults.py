"""Real network faults across network namespaces, with our clients (see netns_helpers.py).

Our server runs on host ``srv`` with a 1+1x2 s keepalive, clients on ``c1`` and ``c2``,
each a process started with ``ip netns exec``. Needs root and iproute2 (CI has both); where
namespaces cannot be made the tests skip, and fail under CI=true. torch's clients in the
same scenarios: tests/interop/test_netns_interop.py.
"""

from __future__ import annotations

import subprocess
import sys

from netns_helpers import PREFIX, sweep_stale
from netns_scenarios import (
    cut_mid_wait,
    hosts,
    slow_client_does_not_slow_others,
    topology,
)

__all__ = ["hosts", "topology"]  # fixtures


def test_link_cut_mid_wait_then_restored(hosts):
    cut_mid_wait(hosts, ["tcp", "async"])


def test_delayed_client_does_not_slow_the_others(hosts):
    slow_client_does_not_slow_others(hosts, "tcp")


def test_stale_namespaces_of_dead_runs_are_swept_and_live_ones_kept(topology):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)  # its pid is now free: a run that died before its finalizers
    stale = f"{PREFIX}{dead.pid}-0000-sw"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=20)
    try:
        assert stale in sweep_stale()
        assert topology.exists()  # ours (this process is alive) stays
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=20)


def test_readme_table_is_the_rendering_of_the_results_file():
    """No namespaces needed: the README's table must be what netns_report.py makes of results.json."""
    import json

    import netns_report

    data = json.loads(netns_report.RESULTS.read_text())
    assert netns_report.readme_block(netns_report.README.read_text()) == netns_report.render(data)
    assert {"rdzv-store TCPStore", "rdzv-store AsyncTCPStore", "torch 2.13 TCPStore"} <= set(data["clients"])
