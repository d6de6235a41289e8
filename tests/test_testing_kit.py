"""The testing kit itself (rdzv_store.testing): plugin registration and opt-in fixtures, the
fixtures in use, the model and strategies (including that they catch a wrong store), the
import rule (``import rdzv_store`` pulls in neither pytest nor hypothesis) and the README's
"Testing your launcher" example, extracted and run so that it cannot rot.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis.stateful import run_state_machine_as_test

from rdzv_store import (
    FileStore,
    HashStore,
    PrefixStore,
    QueueEmptyError,
    StoreServer,
    TCPStore,
)
from rdzv_store.testing import (
    CURRENT,
    UNDEFINED,
    Op,
    Raises,
    StoreModel,
    check_operations,
    plugin,
    running_server,
)
from rdzv_store.testing.model import OPERATION_NAMES
from rdzv_store.testing.strategies import (
    keys,
    operation,
    operations,
    store_state_machine,
    values,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def run_pytest(directory: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """pytest in a subprocess on ``directory`` (its own rootdir and ini: none of our settings)."""
    (directory / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the plugin: registered, fixtures only, opt-in -------------------------------------------


def test_plugin_is_registered_by_the_pytest11_entry_point():
    found = [ep for ep in entry_points(group="pytest11") if ep.name == "rdzv_store"]
    assert [ep.value for ep in found] == ["rdzv_store.testing.plugin"]
    assert found[0].load() is plugin


def test_plugin_defines_fixtures_and_no_hooks():
    assert not [name for name in vars(plugin) if name.startswith("pytest_")]
    fixtures = {"store_server", "store_server_thread", "tcp_store", "tcp_store_factory", "async_tcp_store",
                "fault_proxy", "file_store", "hash_store"}
    assert fixtures <= set(plugin.__all__)


def test_fixtures_are_opt_in_and_work_in_a_fresh_pytest_run(tmp_path):
    (tmp_path / "test_uses_kit.py").write_text(
        """
import asyncio, threading

def test_no_server_unless_asked():
    assert not [t for t in threading.enumerate() if t.name.startswith("rdzv-")]

def test_server_and_clients(store_server, tcp_store, tcp_store_factory):
    tcp_store.set("k", "v")
    other = tcp_store_factory()
    assert other.get("k") == b"v" and store_server.port == other.port

def test_async(async_tcp_store):
    async def main():
        async with async_tcp_store() as store:
            await store.set("a", "1")
            return await store.add("a", 1)
    assert asyncio.run(main()) == 2

def test_file_and_hash(file_store, hash_store):
    file_store.set("k", "v"); hash_store.set("k", "v")
    assert file_store.get("k") == hash_store.get("k") == b"v"
"""
    )
    result = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
    # The fixtures come from the plugin, listed with it; -p no:rdzv_store removes them.
    listing = run_pytest(tmp_path, "--fixtures", "test_uses_kit.py")
    assert "rdzv_store/testing/plugin.py" in listing.stdout.replace(os.sep, "/") and "store_server" in listing.stdout
    disabled = run_pytest(tmp_path, "-p", "no:rdzv_store", "test_uses_kit.py")
    assert disabled.returncode != 0 and "fixture 'store_server' not found" in disabled.stdout


def test_importing_rdzv_store_imports_neither_pytest_nor_hypothesis():
    code = (
        "import sys, rdzv_store, rdzv_store.testing, rdzv_store.testing.model, rdzv_store.testing.proxy\n"
        "bad = [m for m in ('pytest', 'hypothesis', '_pytest') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the fixtures, here, through the installed plugin ----------------------------------------


def test_store_server_fixture(store_server, store_server_thread, tcp_store):
    assert isinstance(store_server, StoreServer) and store_server.host == "127.0.0.1"
    tcp_store.set("k", "v")
    assert store_server_thread.wait_until(lambda s: s["keys"] == 1)["connections"] == 1


def test_several_clients_of_one_server(tcp_store_factory, store_server_thread):
    stores = [tcp_store_factory() for _ in range(4)]
    threads = [threading.Thread(target=s.barrier, args=("b", 4)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert store_server_thread.stats()["connections"] == 4


def test_async_tcp_store_without_pytest_asyncio(async_tcp_store):
    async def main() -> list[bytes]:
        async with async_tcp_store() as a, async_tcp_store() as b:
            waiter = asyncio.ensure_future(b.get("late"))
            await a.set("late", "here")
            return [await waiter, await a.get("late")]

    assert asyncio.run(main()) == [b"here", b"here"]


def test_file_store_and_hash_store_fixtures(file_store, hash_store, tmp_path):
    assert isinstance(file_store, FileStore) and isinstance(hash_store, HashStore)
    file_store.add("n", 2)
    with FileStore(str(tmp_path / "rdzv.store")) as other:
        assert other.get("n") == b"2"
    assert file_store.timeout.total_seconds() == hash_store.timeout.total_seconds() == plugin.STORE_TIMEOUT


def test_server_thread_stops_and_fails_blocked_clients():
    with running_server() as srv:
        store = TCPStore("127.0.0.1", srv.port, timeout=30)
        errors: list[BaseException] = []
        thread = threading.Thread(target=lambda: errors.append(pytest.raises(Exception, store.wait, ["x"]).value))
        thread.start()
        srv.wait_until(lambda s: s["waiters"] == 1)
    thread.join(5)
    assert not thread.is_alive() and "closed the connection" in str(errors[0])
    store.close()
    with pytest.raises(TimeoutError), running_server() as srv:
        srv.wait_until(lambda s: s["keys"] == 1, timeout=0.05)


# -- the model and the strategies -----------------------------------------------------------


def test_model_follows_torchs_rules():
    m = StoreModel()
    assert m.compare_set("k", b"x", b"y") == b"x" and b"k" not in m.kv  # missing, expected set
    assert m.compare_set("k", b"", b"y") == b"y"
    assert m.apply(Op("compare_set", "k", CURRENT, b"z")) == b"z"
    assert m.add("k", 1) is UNDEFINED  # not an integer
    assert m.add("n", -1) == -1 and m.add("n", -(2**63)) == 2**63 - 1  # int64 wraps around
    assert m.get("missing") is UNDEFINED
    assert m.queue_pop("q") == Raises(QueueEmptyError)
    m.queue_push("q", b"1")
    assert m.check(["q"]) and m.num_keys() == 2 and m.list_keys() == ["k", "n"]
    assert StoreModel(counts_all_keys=False).num_keys() is UNDEFINED
    with pytest.raises(ValueError):
        Op("explode")


@settings(max_examples=30, deadline=None)
@given(operations())
def test_hashstore_matches_the_model_on_random_operations(ops):
    check_operations(HashStore(), ops)


@settings(max_examples=15, deadline=None)
@given(operations(names=["set", "get", "add", "compare_set", "delete_key", "append", "multi_get"]))
def test_tcpstore_matches_the_model_on_random_operations(ops):
    with running_server() as srv, TCPStore("127.0.0.1", srv.port, timeout=5) as store:
        check_operations(store, ops)


class _OffByOne(HashStore):
    """A wrong store: add is off by one once the total passes 2."""

    def add(self, key, amount):
        total = super().add(key, amount)
        return total + 1 if total > 2 else total


def test_check_operations_names_the_first_difference():
    ops = [Op("add", "n", 2), Op("add", "n", 1)]
    with pytest.raises(AssertionError, match=r"step 1: add\('n', 1\) returned 4; the model returns 3"):
        check_operations(_OffByOne(), ops)


def test_the_state_machine_catches_a_wrong_store():
    machine = store_state_machine(_OffByOne, names=["add"], key_strategy=keys(["n"]))
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine, settings=settings(max_examples=50, deadline=None, database=None))


def test_the_state_machine_passes_a_prefix_store():
    run_state_machine_as_test(
        store_state_machine(lambda: PrefixStore("p", HashStore()), counts_all_keys=True),
        settings=settings(max_examples=10, stateful_step_count=20, deadline=None, database=None),
    )


@given(operation(), values(), keys())
def test_strategies_draw_well_formed_values(op, value, key):
    assert isinstance(op, Op) and isinstance(value, bytes) and isinstance(key, str)


# -- the README example runs --------------------------------------------------------------


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Testing your launcher") :]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the section has one example"
    return blocks[0]


def test_readme_testing_example_runs(tmp_path):
    (tmp_path / "test_launcher.py").write_text(readme_example())
    result = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = len(re.findall(r"^def test_", readme_example(), re.MULTILINE))
    assert f"{tests} passed" in result.stdout, result.stdout


def test_the_model_holds_for_file_store_without_queues(tmp_path):
    """FileStore has no queues (as torch's) and its num_keys counts its own bookkeeping keys,
    so the kit is told both: the operation names, and counts_all_keys=False."""
    names = [n for n in OPERATION_NAMES if not n.startswith("queue_")]
    counter = iter(range(10**6))

    def open_store() -> FileStore:
        store = FileStore(str(tmp_path / f"model-{next(counter)}.store"))
        store.set_timeout(0)
        return store

    run_state_machine_as_test(
        store_state_machine(open_store, counts_all_keys=False, names=names),
        settings=settings(max_examples=10, stateful_step_count=20, deadline=None, database=None),
    )
