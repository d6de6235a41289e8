"""pytest fixtures for testing code that uses a c10d store (the ``pytest11`` entry point).

Installing rdzv-store registers this module as a pytest plugin named ``rdzv_store``. It
defines fixtures only, no hooks: nothing happens in a test run unless a test names one
of them (disable the plugin with ``-p no:rdzv_store``). Stores time out after
``STORE_TIMEOUT`` (10 s) so a broken test fails instead of hanging.

* ``store_server``: a ``StoreServer`` on ``127.0.0.1`` and an ephemeral port, running on its
  own loop thread, closed after the test (``store_server.port``, ``.engine``);
* ``store_server_thread``: the ``ServerThread`` behind it (``.stats()``, ``.call(fn)``);
* ``tcp_store``: a ``TCPStore`` client of ``store_server``;
* ``tcp_store_factory``: ``make(**kwargs)`` opens more clients of the same server (keyword
  arguments go to ``TCPStore``; ``port=`` points one at a ``FaultProxy``); all are closed
  after the test;
* ``async_tcp_store``: a factory of ``AsyncTCPStore`` clients of ``store_server``. It needs
  no pytest-asyncio: the stores it makes are not connected yet, so they belong to whatever
  loop first uses them, e.g. the one ``asyncio.run`` starts in a plain test::

      def test_it(async_tcp_store):
          async def main():
              async with async_tcp_store() as store:
                  await store.set("k", "v")
          asyncio.run(main())

  (with pytest-asyncio, call it inside an ``async def`` test the same way). Close each
  store on the loop that used it (``async with``): a loop that has ended cannot close it;
* ``fault_proxy``: a ``FaultProxy`` in front of ``store_server`` (connect to ``fault_proxy.port``);
* ``file_store``: a ``FileStore`` on a file in the test's ``tmp_path``;
* ``hash_store``: a ``HashStore``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..async_client import AsyncTCPStore
from ..filestore import FileStore
from ..hashstore import HashStore
from ..server import StoreServer
from ..tcpstore import TCPStore
from .proxy import FaultProxy
from .servers import ServerThread

__all__ = [
    "STORE_TIMEOUT",
    "async_tcp_store",
    "fault_proxy",
    "file_store",
    "hash_store",
    "store_server",
    "store_server_thread",
    "tcp_store",
    "tcp_store_factory",
]

STORE_TIMEOUT = 10.0


@pytest.fixture
def store_server_thread() -> Iterator[ServerThread]:
    """The ``ServerThread`` that runs ``store_server``."""
    with ServerThread("127.0.0.1", 0) as thread:
        yield thread


@pytest.fixture
def store_server(store_server_thread: ServerThread) -> StoreServer:
    """A ``StoreServer`` on 127.0.0.1 and an ephemeral port, closed after the test."""
    return store_server_thread.server


@pytest.fixture
def tcp_store_factory(store_server: StoreServer) -> Iterator[Callable[..., TCPStore]]:
    """``make(**kwargs)``: a new ``TCPStore`` client of ``store_server`` (closed after the test)."""
    made: list[TCPStore] = []

    def make(**kwargs: Any) -> TCPStore:
        kwargs.setdefault("host_name", store_server.host)
        kwargs.setdefault("port", store_server.port)
        kwargs.setdefault("timeout", STORE_TIMEOUT)
        store = TCPStore(**kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def tcp_store(tcp_store_factory: Callable[..., TCPStore]) -> TCPStore:
    """A ``TCPStore`` client of ``store_server``."""
    return tcp_store_factory()


@pytest.fixture
def async_tcp_store(store_server: StoreServer) -> Iterator[Callable[..., AsyncTCPStore]]:
    """``make(**kwargs)``: a new, not yet connected ``AsyncTCPStore`` for ``store_server``."""
    made: list[AsyncTCPStore] = []

    def make(**kwargs: Any) -> AsyncTCPStore:
        kwargs.setdefault("host_name", store_server.host)
        kwargs.setdefault("port", store_server.port)
        kwargs.setdefault("timeout", STORE_TIMEOUT)
        store = AsyncTCPStore(**kwargs)
        made.append(store)
        return store

    yield make
    # Nothing to close here: a store whose loop has ended cannot be closed from another, and
    # the server's close (the next finalizer) ends whatever connections a test left open.
    made.clear()


@pytest.fixture
def fault_proxy(store_server: StoreServer) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of ``store_server``: clients connect to ``fault_proxy.port``."""
    with FaultProxy(store_server.host, store_server.port) as proxy:
        yield proxy


@pytest.fixture
def file_store(tmp_path: Path) -> Iterator[FileStore]:
    """A ``FileStore`` on ``tmp_path / "rdzv.store"``, closed after the test."""
    store = FileStore(str(tmp_path / "rdzv.store"), world_size=-1)
    store.set_timeout(STORE_TIMEOUT)
    with contextlib.closing(store):
        yield store


@pytest.fixture
def hash_store() -> HashStore:
    """A ``HashStore`` (in-process, shared by threads)."""
    store = HashStore()
    store.set_timeout(STORE_TIMEOUT)
    return store
