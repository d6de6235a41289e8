"""The live-store commands (``rdzv-store ping|keys|get|set|add|delete|wait HOST:PORT``) against
torch 2.13's own TCPStore servers, libuv and legacy (marker ``interop``; skips without torch).

The CLI runs as a real subprocess: the installed console script next to this interpreter when
there is one (``/work/venv-torch/bin/rdzv-store``), else ``python -m rdzv_store``. torch's
server runs in this process on its own C++ thread. Run:
``/work/venv-torch/bin/python -m pytest -m interop tests/interop/test_cli_interop.py -q``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch.distributed import TCPStore as TorchTCPStore  # noqa: E402

pytestmark = pytest.mark.interop

_SCRIPT = Path(sys.executable).with_name("rdzv-store")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "rdzv_store"]


def cli(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=input, capture_output=True, timeout=60)


def ok(*args: str, input: bytes | None = None) -> bytes:
    out = cli(*args, input=input)
    assert out.returncode == 0, (args, out.returncode, out.stderr)
    assert out.stderr == b"", out.stderr  # not even the legacy-server note: that is INFO here
    return out.stdout


@pytest.fixture(params=[True, False], ids=["libuv", "legacy"], scope="module")
def torch_server(request) -> Iterator[tuple[TorchTCPStore, str]]:
    master = TorchTCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=request.param, timeout=timedelta(seconds=30)
    )
    try:
        yield master, f"127.0.0.1:{master.port}"
    finally:
        del master


def test_ping(torch_server):
    _, address = torch_server
    assert ok("ping", address).decode().startswith(f"{address} answered")
    assert json.loads(ok("ping", address, "--json"))["address"] == address


def test_set_get_raw_both_ways(torch_server):
    master, address = torch_server
    ok("set", address, "cli/from-cli", "written by rdzv-store")
    assert master.get("cli/from-cli") == b"written by rdzv-store"
    blob = bytes(range(256))
    master.set("cli/from-torch", blob)
    assert ok("get", address, "cli/from-torch") == blob
    ok("set", address, "cli/stdin", input=blob)
    assert master.get("cli/stdin") == blob


def test_add_shares_torch_counters(torch_server):
    master, address = torch_server
    master.add("cli/counter", 2)
    assert ok("add", address, "cli/counter", "3") == b"5\n"
    assert master.add("cli/counter", 0) == 5


def test_keys_lists_torch_written_keys(torch_server):
    master, address = torch_server
    master.set("cli/keys/one", "1")
    listed = ok("keys", address).decode().splitlines()
    assert "cli/keys/one" in listed and listed == sorted(listed)
    assert "cli/keys/one" in json.loads(ok("keys", address, "--json"))


def test_delete(torch_server):
    master, address = torch_server
    master.set("cli/doomed", "x")
    assert ok("delete", address, "cli/doomed") == b"deleted\n"
    assert not master.check(["cli/doomed"])


def test_missing_key_and_wait_timeout_are_one_line_failures(torch_server):
    _, address = torch_server
    for args in (["get", address, "cli/never"], ["wait", address, "cli/never", "--timeout", "0.5"]):
        out = cli(*args)
        assert out.returncode == 1, out.stderr
        lines = out.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rdzv-store: error: ") and "cli/never" in lines[0], lines


def test_wait_returns_when_torch_sets_the_key(torch_server):
    master, address = torch_server
    waiter = subprocess.Popen([*CLI, "wait", address, "cli/late", "--timeout", "30"], stderr=subprocess.PIPE)
    try:
        master.set("cli/late", "here")
        _, stderr = waiter.communicate(timeout=40)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, stderr


def test_cli_does_not_count_itself_in(torch_server):
    master, address = torch_server
    before = master.num_keys()
    ok("ping", address)
    ok("keys", address)
    assert master.num_keys() == before
