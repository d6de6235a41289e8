"""rdzv_backend against torch 2.13's own rendezvous modules (needs torch; marker ``interop``).

* torch's ``C10dRendezvousBackend`` and ours share one rendezvous on one TCP
  server (ours or torch's) and one file store: same key, same base64 bytes,
  tokens valid across the two;
* the two backends give identical results for the same sequence of
  operations (hypothesis), and identical errors for the same bad parameters;
* the parsers and parameter conversions agree with torch's on arbitrary text.

Run: ``/root/venv-torch/bin/python -m pytest tests/interop/test_backend_interop.py``.
"""

from __future__ import annotations

import socket
from base64 import b64encode
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.distributed import FileStore as TorchFileStore  # noqa: E402
from torch.distributed import HashStore as TorchHashStore  # noqa: E402
from torch.distributed import TCPStore as TorchTCPStore  # noqa: E402
from torch.distributed.elastic.rendezvous import api as torch_api  # noqa: E402
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as torch_c10d  # noqa: E402
from torch.distributed.elastic.rendezvous import utils as torch_utils  # noqa: E402

import rdzv_backend  # noqa: E402
from rdzv_backend import C10dRendezvousBackend, RendezvousParameters, create_backend  # noqa: E402
from rdzv_store import FileStore, HashStore, TCPStore  # noqa: E402

pytestmark = pytest.mark.interop

KEY = "torch.rendezvous.interop"
TIMEOUT = timedelta(seconds=10)


# -- one rendezvous, two implementations --------------------------------------------------------


@pytest.fixture(params=["our-server", "torch-server"])
def tcp_pair(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """(torch store, our store) connected to one TCP server, run by us or by torch."""
    if request.param == "our-server":
        server = TCPStore("127.0.0.1", 0, is_master=True, timeout=TIMEOUT)
        torch_store = TorchTCPStore("127.0.0.1", server.port, is_master=False, timeout=TIMEOUT)
        ours = server
        try:
            yield torch_store, ours
        finally:
            del torch_store
            server.close()
    else:
        torch_server = TorchTCPStore("127.0.0.1", 0, is_master=True, timeout=TIMEOUT)
        ours = TCPStore("127.0.0.1", torch_server.port, timeout=TIMEOUT)
        try:
            yield torch_server, ours
        finally:
            ours.close()
            del torch_server


@pytest.fixture
def file_pair(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    path = str(tmp_path / "store")
    torch_store = TorchFileStore(path)
    ours = FileStore(path)
    try:
        yield torch_store, ours
    finally:
        ours.close()
        del torch_store


def _flush(store: Any) -> None:
    # A round trip on this connection, so that its last fire-and-forget SET has landed.
    store.check([KEY])


def _exchange(torch_store: Any, our_store: Any) -> None:
    theirs = torch_c10d.C10dRendezvousBackend(torch_store, "interop")
    ours = C10dRendezvousBackend(our_store, "interop")

    # The sentinel written by whichever came first is the same bytes.
    assert our_store.get(KEY) == torch_store.get(KEY) == b"Y2FuaW1hZGFt"
    assert ours.get_state() is None and theirs.get_state() is None

    state1, token1, ok = theirs.set_state(b"written by torch")
    assert ok
    _flush(torch_store)
    assert ours.get_state() == (b"written by torch", token1)
    assert our_store.get(KEY) == b64encode(b"written by torch")

    # Our write with torch's token wins; torch then holds a stale token.
    assert ours.set_state(b"written by us", token1) == (
        b"written by us",
        b64encode(b"written by us"),
        True,
    )
    assert theirs.set_state(b"late", token1) == (b"written by us", b64encode(b"written by us"), False)
    assert torch_store.get(KEY) == b64encode(b"written by us")

    # And the other way round: torch's write with our token wins, ours goes stale.
    _, token2 = ours.get_state()  # type: ignore[misc]
    assert theirs.set_state(b"torch again", token2)[2] is True
    assert ours.set_state(b"us again", token2) == (b"torch again", b64encode(b"torch again"), False)


def test_tcp_backends_share_state(tcp_pair: tuple[Any, Any]) -> None:
    _exchange(*tcp_pair)


def test_file_backends_share_state(file_pair: tuple[Any, Any]) -> None:
    _exchange(*file_pair)


def test_our_create_backend_joins_a_torch_hosted_store() -> None:
    torch_server = TorchTCPStore("127.0.0.1", 0, is_master=True, timeout=TIMEOUT)
    try:
        theirs = torch_c10d.C10dRendezvousBackend(torch_server, "interop")
        theirs.set_state(b"x")
        params = RendezvousParameters("c10d", f"127.0.0.1:{torch_server.port}", "interop", 1, 2)
        # Loopback endpoint: we guess "host", find the port taken, and connect as a client.
        backend, store = create_backend(params)
        with store:
            assert backend.get_state() == (b"x", b"eA==")
    finally:
        del torch_server


# -- same operations, same results --------------------------------------------------------------

TOKEN_CHOICES = st.sampled_from(["none", "last", "first", "invalid", "bogus-bytes", "empty"])
OPS = st.lists(
    st.tuples(st.sampled_from(["set", "get", "corrupt"]), st.binary(max_size=12), TOKEN_CHOICES),
    max_size=12,
)


def _run(backend_cls: type, store: Any, ops: list[tuple[str, bytes, str]]) -> list[Any]:
    backend = backend_cls(store, "interop")
    tokens: list[Any] = []
    out: list[Any] = []
    for op, data, choice in ops:
        try:
            if op == "corrupt":
                store.set(KEY, data.hex() + "!")  # often not valid base64
                out.append("corrupted")
                continue
            if op == "get":
                result = backend.get_state()
            else:
                token = {
                    "none": None,
                    "last": tokens[-1] if tokens else None,
                    "first": tokens[0] if tokens else None,
                    "invalid": "invalid",
                    "bogus-bytes": b"Ym9ndXM=",
                    "empty": b"",
                }[choice]
                result = backend.set_state(data, token)
            if result is not None:
                tokens.append(result[1])
            out.append(result)
        except Exception as exc:  # noqa: BLE001 - compared across implementations
            out.append((type(exc).__name__, str(exc)))
    return out


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_same_operations_same_results(ops: list[tuple[str, bytes, str]]) -> None:
    theirs = _run(torch_c10d.C10dRendezvousBackend, TorchHashStore(), ops)
    ours = _run(C10dRendezvousBackend, HashStore(), ops)
    assert ours == theirs


# -- same parameters, same errors ---------------------------------------------------------------

BAD_CONFIGS = [
    {"store_type": "dummy"},
    {"store_type": "tcp", "read_timeout": "0"},
    {"store_type": "tcp", "read_timeout": "-3"},
    {"store_type": "tcp", "read_timeout": "abc"},
    {"store_type": "tcp", "is_host": "maybe"},
    {"store_type": " TCP ", "is_host": "maybe"},
]


@pytest.mark.parametrize("config", BAD_CONFIGS)
@pytest.mark.parametrize("endpoint", ["localhost:1", "host:99999", "~"])
def test_same_errors_for_bad_parameters(config: dict[str, str], endpoint: str) -> None:
    def outcome(module: Any, params_cls: type) -> tuple[str, str]:
        try:
            module.create_backend(params_cls("c10d", endpoint, "r", 1, 1, **config))
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__, str(exc)
        raise AssertionError("expected an error")

    assert outcome(rdzv_backend.c10d, RendezvousParameters) == outcome(
        torch_c10d, torch_api.RendezvousParameters
    )


def test_same_error_for_empty_run_id() -> None:
    with pytest.raises(ValueError) as ours:
        C10dRendezvousBackend(HashStore(), "")
    with pytest.raises(ValueError) as theirs:
        torch_c10d.C10dRendezvousBackend(TorchHashStore(), "")
    assert str(ours.value) == str(theirs.value)


# -- parsers and conversions agree on arbitrary text --------------------------------------------


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001
        return (type(exc).__name__, str(exc))


ENDPOINT_TEXT = st.one_of(st.text(max_size=24), st.text("[]:.-_ a1~9", max_size=14))


@settings(max_examples=1000, deadline=None)
@given(ENDPOINT_TEXT, st.integers(-1, 70000))
def test_parse_rendezvous_endpoint_agrees(text: str, default_port: int) -> None:
    ours = _outcome(rdzv_backend.parse_rendezvous_endpoint, text, default_port)
    theirs = _outcome(torch_utils.parse_rendezvous_endpoint, text, default_port)
    if "\n" in text.strip():
        # Deliberate difference: torch's "$" lets a newline end the host; we reject it.
        assert ours == theirs or ours[0] == "ValueError"
    else:
        assert ours == theirs


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(max_size=24), st.text("a=, \tb", max_size=14)))
def test_parse_rendezvous_config_agrees(text: str) -> None:
    assert _outcome(rdzv_backend._parse_rendezvous_config, text) == _outcome(
        torch_utils._parse_rendezvous_config, text
    )


@settings(max_examples=500, deadline=None)
@given(st.text("0123456789 +-a", max_size=7))
def test_try_parse_port_agrees(text: str) -> None:
    assert rdzv_backend._try_parse_port(text) == torch_utils._try_parse_port(text)


CONFIG_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.text(max_size=6),
    st.sampled_from(["yes", "No", "TRUE", " 1", "1_0", "+4", "3.0"]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.binary(max_size=3),
)


@settings(max_examples=500, deadline=None)
@given(CONFIG_VALUES, CONFIG_VALUES)
def test_parameter_conversions_agree(value: Any, default: Any) -> None:
    ours = RendezvousParameters("b", "e", "r", 1, 1, k=value)
    theirs = torch_api.RendezvousParameters("b", "e", "r", 1, 1, k=value)
    for method in ("get", "get_as_bool", "get_as_int"):
        for key in ("k", "absent"):
            assert _outcome(getattr(ours, method), key, default) == _outcome(
                getattr(theirs, method), key, default
            ), (method, key)


@pytest.mark.parametrize(
    ("backend", "min_nodes", "max_nodes"),
    [("", 1, 1), (None, 0, 0), ("b", 0, 1), ("b", -1, -2), ("b", 3, 2), ("b", 2, 2)],
)
def test_parameter_validation_agrees(backend: Any, min_nodes: int, max_nodes: int) -> None:
    def outcome(cls: type) -> tuple[str, str]:
        try:
            cls(backend, "e", "r", min_nodes, max_nodes)
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__, str(exc)
        return "ok", ""

    assert outcome(RendezvousParameters) == outcome(torch_api.RendezvousParameters)


def _own_addresses() -> list[str]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({info[4][0] for info in infos})


@pytest.mark.parametrize(
    "host",
    ["localhost", "127.0.0.1", "::1", "0.0.0.0", "::2", "dummy", "LOCALHOST", socket.gethostname()]
    + _own_addresses(),
)
def test_hostname_guess_agrees(host: str) -> None:
    assert rdzv_backend._matches_machine_hostname(host) == torch_utils._matches_machine_hostname(host)
