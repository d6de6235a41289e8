"""``rdzv-store inspect`` against torch 2.13's own TCPStore server (libuv and legacy), holding the
state that three torch ``DynamicRendezvousHandler``s wrote in a real rendezvous (marker ``interop``).

Run: ``/work/venv-torch/bin/python -m pytest -m interop tests/interop/test_inspect_interop.py``.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")

from tcp_helpers import run_in_thread  # noqa: E402
from torch.distributed import TCPStore as TorchTCPStore  # noqa: E402
from torch.distributed.elastic.rendezvous import api as torch_api  # noqa: E402
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as tdr  # noqa: E402
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (  # noqa: E402
    C10dRendezvousBackend as TorchC10dBackend,
)

from rdzv_store.cli import main  # noqa: E402

pytestmark = pytest.mark.interop
HOST = "127.0.0.1"


@pytest.mark.parametrize("use_libuv", [True, False], ids=["libuv", "legacy"])
def test_inspect_a_rendezvous_torch_handlers_formed_on_torch_server(
    use_libuv: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    server = TorchTCPStore(HOST, 0, is_master=True, wait_for_workers=False, use_libuv=use_libuv, timeout=timedelta(seconds=30))
    run_id = f"inspect-{'libuv' if use_libuv else 'legacy'}"
    handlers = []
    for _ in range(3):
        store = TorchTCPStore(HOST, server.port, is_master=False, use_libuv=use_libuv, timeout=timedelta(seconds=30))
        params = torch_api.RendezvousParameters(
            backend="c10d", endpoint="", run_id=run_id, min_nodes=3, max_nodes=3, local_addr=HOST, join_timeout=60
        )
        handlers.append(tdr.create_handler(store, TorchC10dBackend(store, run_id), params))
    calls = [run_in_thread(h.next_rendezvous) for h in handlers]
    results = [call.result(60) for call in calls]  # re-raises a handler's error, fails on a hang

    extra = [] if use_libuv else ["--log-level", "ERROR"]
    assert main(["inspect", f"{HOST}:{server.port}", "--json", *extra]) == 0
    doc = json.loads(capsys.readouterr().out)
    (rdzv,) = doc["rendezvous"]
    assert rdzv["run_id"] == run_id and rdzv["status"] == "ok"
    assert rdzv["complete"] and not rdzv["closed"] and rdzv["round"] == 0
    assert rdzv["overdue"] == [] and rdzv["warnings"] == []
    seen = {(p["addr"], p["pid"], p["local_id"]): p["rank"] for p in rdzv["participants"]}
    want = {(h._this_node.addr, h._this_node.pid, h._this_node.local_id): results[i].rank for i, h in enumerate(handlers)}
    assert seen == want
    assert all(0 <= p["heartbeat_age_s"] < 60 for p in rdzv["participants"])
    assert {row["key"] for row in doc["keys"]} >= {f"torch.rendezvous.{run_id}"}

    handlers[0].set_closed()
    assert main(["inspect", f"{HOST}:{server.port}", "--run-id", run_id, *extra]) == 0
    out = capsys.readouterr().out
    assert "round 0, complete, CLOSED" in out and "rank 2" in out
    for h in handlers:
        h.shutdown()
