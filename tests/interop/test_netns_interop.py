"""The namespace tier (tests/netns) with torch 2.13's TCPStore clients on our server (marker
``interop``; run with the torch environment's python). The scenarios are the same code as
our clients'; what must hold for any client (our server drops the dead peers' waiters, fds
and memory return, nothing stored is lost, other clients are not slowed) is asserted, and
torch's own behaviour is recorded for the README's table.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from netns_scenarios import (
    cut_mid_wait,
    hosts,
    slow_client_does_not_slow_others,
    topology,
)

pytestmark = pytest.mark.interop
__all__ = ["hosts", "topology"]  # fixtures


def test_link_cut_mid_wait_then_restored_torch_clients(hosts):
    cut_mid_wait(hosts, ["torch"])


def test_delayed_torch_client_does_not_slow_the_others(hosts):
    slow_client_does_not_slow_others(hosts, "torch")
