"""The shared-secret option against real torch 2.13 clients (marker ``interop``; needs torch).

* a server with a secret and ``allow_torch_clients`` serves torch's TCPStore
  and our secret-bearing client on the same keys;
* a server with a secret and no permission refuses torch's client (it gets
  torch's usual "connection closed" error), and logs one line saying why;
* a default server (no secret) serves torch as before: nothing changed.

Run: ``/root/venv-torch/bin/python -m pytest -m interop tests/test_security_torch.py``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")

from reliability_helpers import CollectLog, background_server  # noqa: E402
from torch.distributed import TCPStore as TorchTCPStore  # noqa: E402

from rdzv_store import TCPStore  # noqa: E402

pytestmark = pytest.mark.interop
SECRET = b"a secret of at least sixteen bytes"


def torch_client(port: int) -> TorchTCPStore:
    return TorchTCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False)


def test_default_server_serves_torch_clients_unchanged():
    with background_server() as bg:
        theirs = torch_client(bg.port)
        theirs.set("k", "v")
        assert theirs.get("k") == b"v"
        assert theirs.add("n", 2) == 2


def test_secret_with_allow_torch_clients_serves_both():
    with background_server(secret=SECRET, allow_torch_clients=True) as bg:
        theirs = torch_client(bg.port)
        with TCPStore("127.0.0.1", bg.port, timeout=timedelta(seconds=5), secret=SECRET) as ours:
            theirs.set("k", "from torch")
            assert ours.get("k") == b"from torch"
            ours.set("j", "from us")
            assert theirs.get("j") == b"from us"
            theirs.wait(["k", "j"])


def test_secret_without_permission_refuses_torch_clients():
    with CollectLog() as logs, background_server(secret=SECRET) as bg:
        theirs = torch_client(bg.port)  # VALIDATE + PING are answered, so construction succeeds
        with pytest.raises(RuntimeError):  # DistNetworkError: the server closed the connection
            theirs.get("k")
        lines = logs.warnings("before the shared-secret check")
        assert len(lines) == 1 and "allow_torch_clients" in lines[0]
        with TCPStore("127.0.0.1", bg.port, timeout=timedelta(seconds=5), secret=SECRET) as ours:
            ours.set("k", "v")  # our clients are unaffected
            assert ours.get("k") == b"v"
