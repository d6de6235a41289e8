"""Stateful model check: every store behaves like a dict of bytes plus FIFO queues.

The same rule set runs against HashStore, TCPStore (our server), a PrefixStore
over TCPStore, AsyncTCPStore and EtcdStore (a real etcd member, tests/etcd_helpers.py). The model is deliberately naive (a dict and
lists), written from torch's documented semantics, not from our engine; it lives in
``rdzv_store.testing.model`` (the state machine in ``rdzv_store.testing.strategies``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from rdzv_store import AsyncTCPStore, EtcdStore, HashStore, PrefixStore, TCPStore
from rdzv_store.testing.strategies import store_state_machine


class _AsyncShim:
    """Drives AsyncTCPStore from the synchronous state machine through a private loop."""

    def __init__(self, port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._store = AsyncTCPStore("127.0.0.1", port, timeout=5)
        self._run(self._store.connect())

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def __getattr__(self, name: str) -> Callable:
        method = getattr(self._store, name)
        return lambda *args, **kwargs: self._run(method(*args, **kwargs))

    def close(self) -> None:
        self._run(self._store.close())
        self._loop.close()


@pytest.fixture(scope="module")
def master():
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=10) as store:
        yield store


def make_machine(open_store: Callable[[], object], counts_all_keys: bool):
    # The rules and the model are the public testing kit's (rdzv_store.testing): what we check
    # our stores with is what users check theirs with.
    return store_state_machine(open_store, counts_all_keys)


def _hash_store() -> HashStore:
    return HashStore()


test_hashstore_model = make_machine(_hash_store, counts_all_keys=True).TestCase


_PORT = 0


@pytest.fixture(autouse=True)
def _bind_master(master):
    # Hypothesis builds the machines itself, so they find the module's server through this global.
    global _PORT
    _PORT = master.port


def _tcp_client() -> TCPStore:
    return TCPStore("127.0.0.1", _PORT, timeout=5)


def _prefix_over_tcp() -> PrefixStore:
    return PrefixStore("job", TCPStore("127.0.0.1", _PORT, timeout=5))


def _async_client() -> _AsyncShim:
    return _AsyncShim(_PORT)


test_tcpstore_model = make_machine(_tcp_client, counts_all_keys=True).TestCase
# num_keys of a PrefixStore is the server's total (torch): other prefixes may be present.
test_prefix_tcpstore_model = make_machine(_prefix_over_tcp, counts_all_keys=False).TestCase
test_async_tcpstore_model = make_machine(_async_client, counts_all_keys=True).TestCase


def _etcd_store() -> EtcdStore:
    from etcd_helpers import shared_member  # skips (fails under CI) without an etcd binary

    return EtcdStore(shared_member().endpoints, prefix=f"/model-{uuid.uuid4().hex}/", timeout=5)


test_etcdstore_model = make_machine(_etcd_store, counts_all_keys=True).TestCase
