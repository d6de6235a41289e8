"""The etcd-v3 rendezvous backend on a real etcd member: torch's 8-test contract mixin,
revision tokens, the lease TTL, concurrent compare-and-set, create_backend's parameters."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from base64 import b64encode
from typing import Any
from unittest import TestCase

import pytest
from backend_helpers import RendezvousBackendTestMixin
from etcd_helpers import free_port, shared_member

from rdzv_backend import RendezvousConnectionError, RendezvousParameters, RendezvousStateError
from rdzv_backend.etcd import EtcdRendezvousBackend, create_backend
from rdzv_store import EtcdStore
from rdzv_store.etcd_client import EtcdClient, b64, unb64
from rdzv_store.testing import FaultProxy


def _client() -> EtcdClient:
    return EtcdClient(shared_member().endpoints, timeout=10)


class EtcdV3BackendTest(TestCase, RendezvousBackendTestMixin):
    def setUp(self) -> None:
        self._client = _client()
        self._backend = EtcdRendezvousBackend(self._client, "run-" + uuid.uuid4().hex)

    def tearDown(self) -> None:
        self._client.close()

    def _corrupt_state(self) -> None:
        self._client.call("kv/put", {"key": b64(self._backend.key), "value": b64(b"non_base64")})


@pytest.fixture
def client():
    c = _client()
    yield c
    c.close()


@pytest.fixture
def backend(client):
    return EtcdRendezvousBackend(client, "run-" + uuid.uuid4().hex)


def _kv(client: EtcdClient, key: bytes) -> dict[str, Any] | None:
    kvs = client.call("kv/range", {"key": b64(key)}).get("kvs")
    return kvs[0] if kvs else None


def test_name_key_encoding_and_revision_tokens(client, backend):
    assert backend.name == "etcd-v3"
    assert backend.key.startswith(b"/torch/elastic/rendezvous/run-")
    state, token, ok = backend.set_state(b"\x00state")
    assert ok and state == b"\x00state" and isinstance(token, int)
    kv = _kv(client, backend.key)
    assert kv is not None and int(kv["mod_revision"]) == token
    assert kv["value"] == b64(b64encode(b"\x00state"))  # base64 of the state, as torch stores it
    assert backend.get_state() == (b"\x00state", token)


def test_stale_and_foreign_tokens_do_not_write(backend):
    _, t1, _ = backend.set_state(b"a")
    _, t2, ok = backend.set_state(b"b", t1)
    assert ok and t2 > t1
    assert backend.set_state(b"c", t1) == (b"b", t2, False)
    for foreign in ("7", b"7", 1.5, True, ("t",)):
        assert backend.set_state(b"d", foreign) == (b"b", t2, False)
    # No ABA: going back to "a" gives a new token; the first one stays stale.
    _, t3, _ = backend.set_state(b"a", t2)
    assert backend.set_state(b"e", t1)[2] is False and t3 != t1


def test_no_token_means_create_only_and_empty_state_is_none(backend):
    assert backend.get_state() is None
    assert backend.set_state(b"x", "not-ours") is None
    assert backend.set_state(b"first")[2] is True
    assert backend.set_state(b"second")[2] is False


def test_the_state_key_carries_a_lease(client):
    backend = EtcdRendezvousBackend(client, "run-" + uuid.uuid4().hex, ttl=2)
    backend.set_state(b"x")
    kv = _kv(client, backend.key)
    assert kv is not None and kv.get("lease")
    ttl = client.call("lease/timetolive", {"ID": kv["lease"]})
    assert 0 < int(ttl["TTL"]) <= 2
    deadline = time.monotonic() + 10
    while backend.get_state() is not None:  # the TTL expires: the state is gone
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_revoked_lease_is_replaced(client, backend):
    backend.set_state(b"x")
    kv = _kv(client, backend.key)
    client.call("lease/revoke", {"ID": kv["lease"]})  # deletes the key too
    assert backend.get_state() is None
    assert backend.set_state(b"y")[2] is True
    assert _kv(client, backend.key)["lease"] != kv["lease"]


def test_concurrent_compare_and_set_loses_no_update():
    run_id = "run-" + uuid.uuid4().hex
    clients = [_client() for _ in range(4)]
    backends = [EtcdRendezvousBackend(c, run_id) for c in clients]
    per_thread = 15

    def increment(b: EtcdRendezvousBackend) -> None:
        for _ in range(per_thread):
            current = b.get_state()
            assert current is not None
            while True:
                value, token = current
                result = b.set_state(str(int(value) + 1).encode(), token)
                assert result is not None
                if result[2]:
                    break
                current = result[0], result[1]  # the loser gets the winner's state back

    # Seed so that every thread takes the token path.
    backends[0].set_state(b"0")
    threads = [threading.Thread(target=increment, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    state = backends[0].get_state()
    assert state is not None and int(state[0]) == 4 * per_thread
    for c in clients:
        c.close()


def _await(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _set_state_in_thread(backend: EtcdRendezvousBackend, state: bytes, token: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(backend.set_state(state, token))
        except BaseException as exc:  # reported by the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("lost", ["reply", "request"])
def test_set_state_is_exactly_once_when_a_reply_or_request_is_lost(client, lost):
    """The connection is reset after the compare-and-set was sent: its reply is lost (the write
    was applied) or its request is (it was not). Either way the retry reports the truth."""
    member = shared_member().members[0]
    run_id = "run-" + uuid.uuid4().hex
    with FaultProxy("127.0.0.1", member.client_port) as proxy:
        through = EtcdClient([f"127.0.0.1:{proxy.port}"], timeout=10)
        try:
            backend = EtcdRendezvousBackend(through, run_id)
            _, token, ok = backend.set_state(b"first")  # also takes the lease
            assert ok
            proxy.drop("to_client" if lost == "reply" else "to_server")
            t, out = _set_state_in_thread(backend, b"second", token)
            if lost == "reply":
                _await(lambda: (_kv(client, backend.key) or {}).get("mod_revision") != str(token))
            else:
                proxy.wait_until(lambda st: st.dropped_to_server > 0)  # the request never reached etcd
            proxy.heal()
            assert proxy.cut("rst") >= 1  # the client sees a reset: the outcome is unknown
            t.join(15)
            assert not t.is_alive() and len(out) == 1 and not isinstance(out[0], BaseException), out
            state, new_token, written = out[0]
            kv = _kv(client, backend.key)
            assert kv is not None and unb64(kv["value"]) == b64encode(b"second")
            assert (state, new_token, written) == (b"second", int(kv["mod_revision"]), True)
            # Written once: one revision after the token (nothing else writes this key).
            assert int(kv["version"]) == 2
            assert backend.set_state(b"third", new_token)[2] is True  # the token is the right one
        finally:
            through.close()


def test_a_lost_reply_then_another_writer_is_reported_as_not_written(client):
    """torch's rule: after a lost reply, "written" needs the key to still hold our bytes. When a
    later writer changed it, the backend says "not written" and returns the current state (the
    handler re-reads and finds its change in it, or redoes it)."""
    member = shared_member().members[0]
    run_id = "run-" + uuid.uuid4().hex
    other = EtcdRendezvousBackend(client, run_id)
    with FaultProxy("127.0.0.1", member.client_port) as proxy:
        through = EtcdClient([f"127.0.0.1:{proxy.port}"], timeout=10)
        try:
            backend = EtcdRendezvousBackend(through, run_id)
            _, token, _ = backend.set_state(b"first")
            proxy.drop("to_client")
            t, out = _set_state_in_thread(backend, b"second", token)
            _await(lambda: (_kv(client, backend.key) or {}).get("mod_revision") != str(token))
            current = other.get_state()
            assert current is not None and current[0] == b"second"
            assert other.set_state(b"other", current[1])[2] is True
            proxy.heal()
            proxy.cut("rst")
            t.join(15)
            assert not t.is_alive() and len(out) == 1 and not isinstance(out[0], BaseException), out
            state, new_token, written = out[0]
            assert (state, written) == (b"other", False)
            assert new_token == other.get_state()[1]
        finally:
            through.close()


def test_corrupt_state_message(client, backend):
    client.call("kv/put", {"key": b64(backend.key), "value": b64(b"abc")})
    with pytest.raises(RendezvousStateError, match="^The state object is corrupt"):
        backend.get_state()


def _params(endpoint: str, **config: Any) -> RendezvousParameters:
    return RendezvousParameters("etcd-v3", endpoint, "run-" + uuid.uuid4().hex, 1, 2, **config)


def test_create_backend_with_torchs_parameters():
    ep = shared_member().endpoints[0].replace("http://", "")
    dead = f"127.0.0.1:{free_port()}"
    backend, store = create_backend(_params(f"{dead},{ep}", protocol="HTTP", read_timeout="5"))
    try:
        assert isinstance(store, EtcdStore) and store.timeout.total_seconds() == 5
        assert store.prefix == b"/torch/elastic/store/"
        assert backend.name == "etcd-v3" and backend.set_state(b"s")[2]
        store.set("k", "v")
        assert store.get("k") == b"v"
    finally:
        store.close()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"protocol": "ftp"}, "The protocol must be HTTP or HTTPS."),
        ({"read_timeout": "0"}, "The read timeout must be a positive integer."),
        ({"read_timeout": "-3"}, "The read timeout must be a positive integer."),
        ({"read_timeout": "abc"}, "valid integer"),
        ({"ttl": "0"}, "The TTL must be a positive integer."),
    ],
)
def test_create_backend_rejects_bad_parameters(config, message):
    with pytest.raises(ValueError, match=message):
        create_backend(_params("127.0.0.1:1", **config))


def test_create_backend_rejects_an_empty_run_id():
    with pytest.raises(ValueError, match="run id"):
        create_backend(RendezvousParameters("etcd-v3", "127.0.0.1:1", "", 1, 1))


def test_unreachable_etcd_is_a_connection_error_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="The connection to etcd has failed") as info:
        create_backend(_params(f"127.0.0.1:{free_port()}", read_timeout="1"))
    assert time.monotonic() - start < 3
    assert "127.0.0.1" in str(info.value.__cause__)


_NO_TORCH = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported by " + name)
sys.meta_path.insert(0, Block())
import rdzv_store, rdzv_backend, rdzv_backend.etcd, rdzv_backend.torchrun_plugin
from rdzv_store import EtcdStore
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
print("ok")
"""


@pytest.mark.parametrize("python", [sys.executable, "/work/venv-torch/bin/python"])
def test_importing_the_packages_and_the_plugin_module_never_imports_torch(python):
    if not os.path.exists(python):
        pytest.skip(f"{python} not present")
    out = subprocess.run([python, "-c", _NO_TORCH], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_our_handler_runs_over_the_etcd_backend_unchanged():
    from rdzv_backend.dynamic import create_handler as create_our_handler

    ep = shared_member().endpoints[0]
    run_id = "run-" + uuid.uuid4().hex
    n = 4
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    made = []
    done = threading.Barrier(n)

    def agent(i: int) -> None:
        try:
            params = RendezvousParameters("etcd-v3", ep, run_id, n, n, local_addr="127.0.0.1", read_timeout="30", last_call_timeout="1", join_timeout="60")
            backend, store = create_backend(params)
            made.append(store)
            handler = create_our_handler(store, backend, params)
            info = handler.next_rendezvous()
            results[i] = (info.rank, info.world_size, handler.get_backend())
            done.wait(60)  # shutdown closes the rendezvous: only once every agent has its rank
            handler.shutdown()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for s in made:
        s.close()
    assert not errors, errors
    assert sorted(r[0] for r in results) == list(range(n))
    assert all(r[1] == n and r[2] == "etcd-v3" for r in results)
