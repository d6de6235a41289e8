"""The backend contract (rendezvous.md sections 3 and 8) beyond the upstream tests.

* the 8-test mixin over every kind of store we ship (hash, prefix, TCP, file);
* the exact c10d encoding: key, base64, sentinel, value-based tokens, and the
  corner cases torch's behaviour implies (empty state, ABA, deleted key);
* error translation, including our additions (raw ``OSError``, non-UTF-8
  tokens);
* concurrent compare-and-set from threads over one TCP server: no lost update;
* ``create_backend``: options, the is_host guess and its single retry as a
  client, resource release on failure, the closed ``mkstemp`` descriptor;
* the no-unpickling rule.
"""

from __future__ import annotations

import ast
import binascii
import logging
import os
import tempfile
import threading
from base64 import b64encode
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar
from unittest import TestCase, mock

import pytest
from backend_helpers import RendezvousBackendTestMixin, get_free_port, open_fds_on, removing

import rdzv_backend
from rdzv_backend import (
    DEFAULT_PORT,
    C10dRendezvousBackend,
    RendezvousBackend,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousParameters,
    RendezvousStateError,
    create_backend,
)
from rdzv_backend import c10d
from rdzv_store import (
    FileStore,
    HashStore,
    PrefixStore,
    Store,
    StoreConnectionError,
    StoreTimeoutError,
    TCPStore,
)

KEY = "torch.rendezvous.dummy_run_id"
SENTINEL = b"Y2FuaW1hZGFt"
CONNECTION_MSG = r"^The connection to the C10d store has failed. See inner exception for details.$"
CORRUPT_MSG = r"^The state object is corrupt. See inner exception for details.$"


# -- the mixin over every store kind ------------------------------------------------------------


class HashStoreBackendTest(TestCase, RendezvousBackendTestMixin):
    def setUp(self) -> None:
        self._store = HashStore()
        self._backend = C10dRendezvousBackend(self._store, "dummy_run_id")

    def _corrupt_state(self) -> None:
        self._store.set(KEY, "non_base64")


class PrefixStoreBackendTest(TestCase, RendezvousBackendTestMixin):
    def setUp(self) -> None:
        self._store = PrefixStore("job", HashStore())
        self._backend = C10dRendezvousBackend(self._store, "dummy_run_id")

    def _corrupt_state(self) -> None:
        self._store.set(KEY, "non_base64")


class TCPClientBackendTest(TestCase, RendezvousBackendTestMixin):
    """Through a separate client connection (the seed port uses the master object itself)."""

    _server: ClassVar[TCPStore]
    _client: ClassVar[TCPStore]

    @classmethod
    def setUpClass(cls) -> None:
        cls._server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
        cls._client = TCPStore("127.0.0.1", cls._server.port, timeout=timedelta(seconds=10))

    @classmethod
    def tearDownClass(cls) -> None:
        cls._client.close()
        cls._server.close()

    def setUp(self) -> None:
        self._server.delete_key(KEY)
        self._backend = C10dRendezvousBackend(self._client, "dummy_run_id")

    def _corrupt_state(self) -> None:
        # SET has no reply, so nothing orders it against the client's next request
        # (tcpstore-wire.md, SET): a round trip on the writer's own connection does.
        self._server.set(KEY, "non_base64")
        self._server.get(KEY)


class FileStoreBackendTest(TestCase, RendezvousBackendTestMixin):
    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self._store = FileStore(os.path.join(directory.name, "store"))
        self.addCleanup(self._store.close)
        self._backend = C10dRendezvousBackend(self._store, "dummy_run_id")

    def _corrupt_state(self) -> None:
        self._store.set(KEY, "non_base64")


# -- exact encoding and corner cases (HashStore: same compare_set rules as every store) ---------


@pytest.fixture
def store() -> HashStore:
    return HashStore()


@pytest.fixture
def backend(store: HashStore) -> C10dRendezvousBackend:
    return C10dRendezvousBackend(store, "dummy_run_id")


def test_is_a_rendezvous_backend_named_c10d(backend: C10dRendezvousBackend) -> None:
    assert isinstance(backend, RendezvousBackend)
    assert backend.name == "c10d"


def test_abstract_backend_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError):
        RendezvousBackend()  # type: ignore[abstract]


@pytest.mark.parametrize("run_id", ["", None])
def test_empty_run_id(run_id: Any) -> None:
    with pytest.raises(ValueError, match=r"^The run id must be a non-empty string.$"):
        C10dRendezvousBackend(HashStore(), run_id)


def test_empty_state_is_the_sentinel_and_none(store: HashStore, backend: C10dRendezvousBackend) -> None:
    assert store.get(KEY) == SENTINEL
    assert backend.get_state() is None
    # Only the one key, not under any prefix.
    assert store.list_keys() == [KEY]


def test_construction_never_wipes_existing_state(store: HashStore, backend: C10dRendezvousBackend) -> None:
    backend.set_state(b"x")
    other = C10dRendezvousBackend(store, "dummy_run_id")
    assert other.get_state() == (b"x", b"eA==")


def test_runs_are_independent(store: HashStore) -> None:
    a = C10dRendezvousBackend(store, "a")
    b = C10dRendezvousBackend(store, "b")
    a.set_state(b"for a")
    assert b.get_state() is None
    assert store.get("torch.rendezvous.a") == b64encode(b"for a")


def test_set_without_token(store: HashStore, backend: C10dRendezvousBackend) -> None:
    assert backend.set_state(b"x") == (b"x", b"eA==", True)
    assert store.get(KEY) == b"eA=="
    # The token is the stored base64 value.
    assert backend.get_state() == (b"x", b"eA==")
    # Without a token a write is "create only": it loses once state exists.
    assert backend.set_state(b"y") == (b"x", b"eA==", False)
    assert store.get(KEY) == b"eA=="


@pytest.mark.parametrize("falsy", [None, b"", 0, ""])
def test_falsy_tokens_mean_create_only(backend: C10dRendezvousBackend, falsy: Any) -> None:
    assert backend.set_state(b"x", falsy) == (b"x", b"eA==", True)
    assert backend.set_state(b"y", falsy) == (b"x", b"eA==", False)


def test_current_token_writes(store: HashStore, backend: C10dRendezvousBackend) -> None:
    _, token, _ = backend.set_state(b"x")  # type: ignore[misc]
    assert backend.set_state(b"y", token) == (b"y", b"eQ==", True)
    assert store.get(KEY) == b"eQ=="


def test_stale_token_does_not_write(store: HashStore, backend: C10dRendezvousBackend) -> None:
    _, token1, _ = backend.set_state(b"x")  # type: ignore[misc]
    backend.set_state(b"y", token1)
    assert backend.set_state(b"z", token1) == (b"y", b"eQ==", False)
    assert store.get(KEY) == b"eQ=="


@pytest.mark.parametrize("token", ["invalid", 42, b"\xff\xfe not utf-8", b"eQ==\n", ("t",)])
def test_foreign_tokens_never_raise_and_never_write(
    store: HashStore, backend: C10dRendezvousBackend, token: Any
) -> None:
    backend.set_state(b"x")
    assert backend.set_state(b"y", token) == (b"x", b"eA==", False)
    assert store.get(KEY) == b"eA=="


def test_foreign_non_bytes_token_on_empty_state_returns_none(backend: C10dRendezvousBackend) -> None:
    assert backend.set_state(b"y", "invalid") is None
    assert backend.get_state() is None


def test_tokens_are_value_based_aba(backend: C10dRendezvousBackend) -> None:
    # torch parity: A -> B -> A makes the token of the first A current again.
    _, token_a, _ = backend.set_state(b"A")  # type: ignore[misc]
    _, token_b, _ = backend.set_state(b"B", token_a)  # type: ignore[misc]
    backend.set_state(b"A", token_b)
    assert backend.set_state(b"C", token_a) == (b"C", b"Qw==", True)


def test_identical_bytes_report_success_whatever_the_token(backend: C10dRendezvousBackend) -> None:
    # compare_set does not say whether it wrote; success is "stored == wanted", as in torch.
    backend.set_state(b"x")
    assert backend.set_state(b"x", b"stale") == (b"x", b"eA==", True)


def test_empty_state_bytes(backend: C10dRendezvousBackend) -> None:
    assert backend.set_state(b"") == (b"", b"", True)
    assert backend.get_state() == (b"", b"")
    # The empty token is falsy, so the next write is "create only" and loses (torch parity).
    assert backend.set_state(b"x", b"") == (b"", b"", False)


def test_state_equal_to_sentinel_reads_as_no_state(backend: C10dRendezvousBackend) -> None:
    # b64encode(b"canimadam") is the sentinel: torch parity, documented.
    assert b64encode(b"canimadam") == SENTINEL
    assert backend.set_state(b"canimadam") is None
    assert backend.get_state() is None


def test_deleted_key_after_construction(store: HashStore, backend: C10dRendezvousBackend) -> None:
    store.delete_key(KEY)
    # compare_set on a missing key with a non-empty "expected" returns "expected", the sentinel.
    assert backend.set_state(b"x") is None
    store.set_timeout(timedelta(milliseconds=50))
    with pytest.raises(RendezvousConnectionError, match=CONNECTION_MSG) as info:
        backend.get_state()
    assert isinstance(info.value.__cause__, StoreTimeoutError)


def test_arbitrary_bytes_roundtrip(backend: C10dRendezvousBackend) -> None:
    state = bytes(range(256)) * 4
    _, token, ok = backend.set_state(state)  # type: ignore[misc]
    assert ok and backend.get_state() == (state, token)


@pytest.mark.parametrize("raw", [b"non_base64", b"abc", b"a", b"\xffab"])
def test_corrupt_state_has_the_exact_message(
    store: HashStore, backend: C10dRendezvousBackend, raw: bytes
) -> None:
    store.set(KEY, raw)
    with pytest.raises(RendezvousStateError, match=CORRUPT_MSG) as info:
        backend.get_state()
    assert isinstance(info.value.__cause__, binascii.Error)
    # A write with any token reads the corrupt value back and reports it the same way.
    with pytest.raises(RendezvousStateError, match=CORRUPT_MSG):
        backend.set_state(b"x", b"token")


def test_lenient_base64_like_torch(store: HashStore, backend: C10dRendezvousBackend) -> None:
    # Non-alphabet characters are skipped, not rejected: torch and we agree on what is corrupt.
    store.set(KEY, "eA!==")
    assert backend.get_state() == (b"x", b"eA!==")


# A pickle whose loading calls pytest's fail("the backend unpickled its state"); kept as bytes
# so that nothing in the project, tests included, imports pickle.
HOSTILE_PICKLE = (
    b"\x80\x04\x95G\x00\x00\x00\x00\x00\x00\x00\x8c\x10_pytest.outcomes\x94\x8c\x05_Fail\x94\x93\x94)"
    b"\x81\x94\x8c\x1fthe backend unpickled its state\x94\x85\x94R\x94."
)


def test_state_is_opaque_and_never_unpickled(backend: C10dRendezvousBackend) -> None:
    payload = HOSTILE_PICKLE
    _, token, ok = backend.set_state(payload)  # type: ignore[misc]
    assert ok
    assert backend.get_state() == (payload, token)


def test_package_imports_no_deserializer() -> None:
    banned = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "copyreg"}
    package = Path(rdzv_backend.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in banned, f"{source.name} imports {name}"


# -- error translation --------------------------------------------------------------------------


class FailingStore(HashStore):
    """A HashStore whose ``get``/``compare_set`` raise a chosen error once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.error: BaseException | None = None

    def get(self, key: Any) -> bytes:
        if self.error is not None:
            raise self.error
        return super().get(key)

    def compare_set(self, key: Any, expected: Any, desired: Any) -> bytes:
        if self.error is not None:
            raise self.error
        return super().compare_set(key, expected, desired)


TRANSLATED = [
    StoreConnectionError("lost"),
    StoreTimeoutError("slow"),
    RuntimeError("torch-style DistError"),
    ValueError("bad value"),
    TimeoutError("timed out"),
    ConnectionResetError("reset"),  # ours: raw OSErrors are connection failures too
    OSError("raw"),
]


@pytest.mark.parametrize("error", TRANSLATED, ids=lambda e: type(e).__name__)
def test_store_failures_become_connection_errors(error: Exception) -> None:
    failing = FailingStore()
    backend = C10dRendezvousBackend(failing, "r")
    failing.error = error
    for call in (backend.get_state, lambda: backend.set_state(b"x"), lambda: backend.set_state(b"x", b"t")):
        with pytest.raises(RendezvousConnectionError, match=CONNECTION_MSG) as info:
            call()
        assert info.value.__cause__ is error


def test_construction_failure_is_a_connection_error() -> None:
    failing = FailingStore()
    failing.error = StoreConnectionError("down")
    with pytest.raises(RendezvousConnectionError, match=CONNECTION_MSG):
        C10dRendezvousBackend(failing, "r")


def test_other_exceptions_pass_through() -> None:
    failing = FailingStore()
    backend = C10dRendezvousBackend(failing, "r")
    failing.error = KeyError("programming error")
    with pytest.raises(KeyError):
        backend.get_state()


# -- concurrency: fencing over one TCP server ---------------------------------------------------


def test_concurrent_increments_lose_nothing() -> None:
    """Threads, each with its own client, increment a counter by compare-and-set.

    Each write carries its writer's id. It has to: ``has_set`` means "the
    stored bytes equal mine", so two writers racing to store the same bytes
    would both be told they won (torch's rule, rendezvous.md 3.2).
    """
    workers, increments = 4, 15
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10)) as server:
        errors: list[BaseException] = []
        attempts = [0] * workers

        def work(index: int) -> None:
            try:
                with TCPStore("127.0.0.1", server.port, timeout=timedelta(seconds=10)) as client:
                    backend = C10dRendezvousBackend(client, "counter")
                    current = backend.get_state()
                    state, token = current if current is not None else (b"0:-", None)
                    for _ in range(increments):
                        for _ in range(1000):  # bounded CAS retries
                            attempts[index] += 1
                            count = int(state.split(b":")[0])
                            reply = backend.set_state(f"{count + 1}:{index}".encode(), token)
                            assert reply is not None
                            new_state, token, ok = reply
                            if ok:
                                state = new_state
                                break
                            state = new_state
                        else:
                            raise AssertionError("CAS never succeeded")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        final = C10dRendezvousBackend(server, "counter").get_state()
        assert final is not None
        # Value-based tokens are safe here: the counter never returns to an old value.
        assert int(final[0].split(b":")[0]) == workers * increments


# -- create_backend -----------------------------------------------------------------------------


def params(endpoint: str = "localhost:29400", **config: Any) -> RendezvousParameters:
    return RendezvousParameters("c10d", endpoint, "dummy_run_id", 1, 1, **config)


class FakeTCPStore:
    """Stands in for ``rdzv_backend.c10d.TCPStore``: records calls, fails the first N."""

    def __init__(self, fail: int = 0, error: Exception | None = None) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.fail = fail
        self.error = error or StoreConnectionError("address in use")
        self.made: list[HashStore] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Store:
        self.calls.append((args, kwargs))
        if len(self.calls) <= self.fail:
            raise self.error
        store = mock.MagicMock(wraps=HashStore())
        self.made.append(store)
        return store


@pytest.fixture
def fake_tcp(monkeypatch: pytest.MonkeyPatch) -> FakeTCPStore:
    fake = FakeTCPStore()
    monkeypatch.setattr(c10d, "TCPStore", fake)
    return fake


def test_tcp_store_arguments(fake_tcp: FakeTCPStore) -> None:
    backend, store = create_backend(params("10.0.0.1:1234", is_host="yes", read_timeout=" 7 "))
    assert fake_tcp.calls == [
        (("10.0.0.1", 1234), {"is_master": True, "multi_tenant": True, "timeout": timedelta(seconds=7)})
    ]
    assert store is fake_tcp.made[0]
    assert backend.name == "c10d"


def test_tcp_defaults(fake_tcp: FakeTCPStore, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_PORT == 29400 == c10d.DEFAULT_PORT
    create_backend(params("", is_host=False))
    monkeypatch.setattr(c10d, "DEFAULT_PORT", 4321)
    create_backend(params("somehost", is_host=False))
    assert [call[0] for call in fake_tcp.calls] == [("localhost", 29400), ("somehost", 4321)]
    assert all(call[1]["timeout"] == timedelta(seconds=60) for call in fake_tcp.calls)


@pytest.mark.parametrize("store_type", [" TCP ", "tcp", "Tcp\n"])
def test_store_type_is_stripped_and_case_insensitive(fake_tcp: FakeTCPStore, store_type: str) -> None:
    create_backend(params(store_type=store_type, is_host=False))
    assert len(fake_tcp.calls) == 1


def test_store_type_must_be_a_string() -> None:
    # torch parity: .strip() on a non-string.
    with pytest.raises(AttributeError):
        create_backend(params(store_type=1))


@pytest.mark.parametrize("store_type", ["", "hash", "etcd", "tcp,file"])
def test_invalid_store_type(store_type: str) -> None:
    with pytest.raises(ValueError, match=r"^Invalid store type given. Currently only supports file and tcp.$"):
        create_backend(params(store_type=store_type))


def test_invalid_is_host(fake_tcp: FakeTCPStore) -> None:
    with pytest.raises(ValueError, match=r"^The rendezvous configuration option 'is_host' does not"):
        create_backend(params(is_host="maybe"))
    assert fake_tcp.calls == []


@pytest.mark.parametrize("value", ["abc", "", "1.5"])
def test_invalid_read_timeout(fake_tcp: FakeTCPStore, value: str) -> None:
    with pytest.raises(ValueError, match=r"^The rendezvous configuration option 'read_timeout' does not"):
        create_backend(params(read_timeout=value, is_host=False))
    assert fake_tcp.calls == []


@pytest.mark.parametrize("value", ["0", "-1", 0, None])
def test_non_positive_read_timeout(fake_tcp: FakeTCPStore, value: Any) -> None:
    with pytest.raises(ValueError, match=r"^The read timeout must be a positive integer.$"):
        create_backend(params(read_timeout=value, is_host=False))
    assert fake_tcp.calls == []


@pytest.mark.parametrize("endpoint", ["host:99999", "~"])
def test_endpoint_errors_propagate_untranslated(fake_tcp: FakeTCPStore, endpoint: str) -> None:
    with pytest.raises(ValueError, match=r"^The (port number|hostname) of the rendezvous endpoint"):
        create_backend(params(endpoint))
    assert fake_tcp.calls == []


def test_guessed_host_retries_once_as_client(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTCPStore(fail=1)
    monkeypatch.setattr(c10d, "TCPStore", fake)
    _, store = create_backend(params("127.0.0.1:5000"))  # loopback: guessed host
    assert [call[1]["is_master"] for call in fake.calls] == [True, False]
    assert all(call[0] == ("127.0.0.1", 5000) and call[1]["multi_tenant"] for call in fake.calls)
    assert store is fake.made[0]


@pytest.mark.parametrize("is_host", ["true", "1", True])
def test_explicit_host_does_not_retry(monkeypatch: pytest.MonkeyPatch, is_host: Any) -> None:
    fake = FakeTCPStore(fail=1)
    monkeypatch.setattr(c10d, "TCPStore", fake)
    with pytest.raises(RendezvousConnectionError, match=CONNECTION_MSG) as info:
        create_backend(params("127.0.0.1:5000", is_host=is_host))
    assert len(fake.calls) == 1
    assert info.value.__cause__ is fake.error


def test_guessed_client_does_not_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTCPStore(fail=1)
    monkeypatch.setattr(c10d, "TCPStore", fake)
    with (
        mock.patch.object(c10d, "_matches_machine_hostname", return_value=False),
        pytest.raises(RendezvousConnectionError, match=CONNECTION_MSG),
    ):
        create_backend(params("elsewhere:5000"))
    assert [call[1]["is_master"] for call in fake.calls] == [False]


def test_both_attempts_failing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTCPStore(fail=2)
    monkeypatch.setattr(c10d, "TCPStore", fake)
    with pytest.raises(RendezvousConnectionError, match=CONNECTION_MSG):
        create_backend(params("localhost:5000"))
    assert [call[1]["is_master"] for call in fake.calls] == [True, False]


def test_non_store_errors_from_the_constructor_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTCPStore(fail=1, error=TypeError("port must be an int"))
    monkeypatch.setattr(c10d, "TCPStore", fake)
    with pytest.raises(TypeError):
        create_backend(params("localhost:5000"))


def test_is_host_guess_survives_an_unresolvable_own_name(fake_tcp: FakeTCPStore) -> None:
    # torch: gaierror escapes from create_backend. Ours: the guess is "not the host".
    with (
        mock.patch("socket.gethostname", return_value="no-such-host.invalid"),
        mock.patch("socket.getaddrinfo", side_effect=OSError(-2, "Name or service not known")),
    ):
        create_backend(params("rdzv.example:5000"))
    assert [call[1]["is_master"] for call in fake_tcp.calls] == [False]


def test_hosting_is_logged(fake_tcp: FakeTCPStore, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rdzv_backend.c10d"):
        create_backend(params(is_host=True))
    assert f"Process {os.getpid()} hosts the TCP store for the C10d rendezvous backend." in caplog.text


def test_store_is_released_when_the_backend_cannot_be_made(fake_tcp: FakeTCPStore) -> None:
    bad = RendezvousParameters("c10d", "localhost:1", "", 1, 1, is_host=True)
    with pytest.raises(ValueError, match=r"^The run id must be a non-empty string.$"):
        create_backend(bad)
    fake_tcp.made[0].close.assert_called_once_with()


# -- create_backend over real stores ------------------------------------------------------------


def test_tcp_guessed_host_falls_back_to_the_running_server() -> None:
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10)) as server:
        first, first_store = create_backend(params(f"127.0.0.1:{server.port}", read_timeout="10"))
        try:
            first.set_state(b"shared")
            assert server.get(KEY) == b64encode(b"shared")
            assert first_store.port == server.port  # type: ignore[attr-defined]
        finally:
            first_store.close()


def test_tcp_two_backends_share_one_state() -> None:
    port = get_free_port()
    host_backend, host_store = create_backend(params(f"127.0.0.1:{port}", is_host=True, read_timeout="10"))
    try:
        client_backend, client_store = create_backend(
            params(f"127.0.0.1:{port}", is_host=False, read_timeout="10")
        )
        try:
            _, token, _ = host_backend.set_state(b"x")  # type: ignore[misc]
            assert client_backend.get_state() == (b"x", token)
            assert client_backend.set_state(b"y", token) == (b"y", b"eQ==", True)
            assert host_backend.set_state(b"z", token) == (b"y", b"eQ==", False)
        finally:
            client_store.close()
    finally:
        host_store.close()


def test_tcp_two_hosts_in_one_process_share_one_server() -> None:
    # multi_tenant=True: a second "host" in the same process joins the first one's server.
    port = get_free_port()
    first, first_store = create_backend(params(f"127.0.0.1:{port}", is_host=True))
    with first_store:
        second, second_store = create_backend(params(f"127.0.0.1:{port}", is_host=True))
        with second_store:
            _, token, _ = first.set_state(b"x")  # type: ignore[misc]
            assert second.get_state() == (b"x", token)


def test_tcp_explicit_host_on_a_served_port_fails() -> None:
    with TCPStore("127.0.0.1", 0, is_master=True) as server:
        with pytest.raises(RendezvousConnectionError, match=CONNECTION_MSG) as info:
            create_backend(params(f"127.0.0.1:{server.port}", is_host=True))
        assert isinstance(info.value.__cause__, StoreConnectionError)


def test_file_store_ignores_tcp_options(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    backend, store = create_backend(
        params(path, store_type="file", read_timeout="-5", is_host="not even a bool")
    )
    with store:
        assert isinstance(store, FileStore)
        assert store.path == path
        assert store.timeout == timedelta(seconds=300)
        backend.set_state(b"x")
        with FileStore(path) as other:
            assert other.get(KEY) == b"eA=="


def test_file_endpoint_is_a_path_verbatim(tmp_path: Path) -> None:
    path = str(tmp_path / "with spaces and : colons")
    backend, store = create_backend(params(path, store_type="file"))
    with store:
        assert store.path == path  # type: ignore[attr-defined]
        assert backend.get_state() is None


def test_file_store_errors_become_connection_errors(tmp_path: Path) -> None:
    # A directory is not a store file.
    with pytest.raises(RendezvousConnectionError, match=CONNECTION_MSG):
        create_backend(params(str(tmp_path), store_type="file"))


def test_mkstemp_descriptor_is_closed_before_the_store_opens_the_file() -> None:
    issued: list[tuple[int, str]] = []
    real_mkstemp = tempfile.mkstemp
    real_file_store = FileStore

    def spy_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, path = real_mkstemp(*args, **kwargs)
        issued.append((fd, path))
        return fd, path

    def checking_file_store(path: str, *args: Any, **kwargs: Any) -> FileStore:
        fd, made = issued[0]
        assert path == made
        with pytest.raises(OSError):
            os.fstat(fd)  # already closed, before the store opens anything
        return real_file_store(path, *args, **kwargs)

    with (
        mock.patch("tempfile.mkstemp", side_effect=spy_mkstemp),
        mock.patch.object(c10d, "FileStore", side_effect=checking_file_store),
    ):
        backend, store = create_backend(params("", store_type="file"))
    with removing(issued[0][1]) as path:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
        backend.set_state(b"x")
        store.close()
        assert open_fds_on(path) == []


def test_mkstemp_failure_is_a_rendezvous_error() -> None:
    error = OSError(28, "No space left on device")
    with mock.patch("tempfile.mkstemp", side_effect=error), pytest.raises(RendezvousError) as info:
        create_backend(params("", store_type="file"))
    assert str(info.value) == "The file creation for C10d store has failed. See inner exception for details."
    assert type(info.value) is RendezvousError
    assert info.value.__cause__ is error


def test_temp_file_is_removed_when_the_file_store_fails() -> None:
    issued: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def spy_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, path = real_mkstemp(*args, **kwargs)
        issued.append(path)
        return fd, path

    with (
        mock.patch("tempfile.mkstemp", side_effect=spy_mkstemp),
        mock.patch.object(c10d, "FileStore", side_effect=RuntimeError("cannot open")),
        pytest.raises(RendezvousConnectionError, match=CONNECTION_MSG),
    ):
        create_backend(params("", store_type="file"))
    assert len(issued) == 1 and not os.path.exists(issued[0])


def test_a_given_file_is_never_removed_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "store"
    path.write_bytes(b"")
    with (
        mock.patch.object(c10d, "FileStore", side_effect=RuntimeError("cannot open")),
        pytest.raises(RendezvousConnectionError),
    ):
        create_backend(params(str(path), store_type="file"))
    assert path.exists()
