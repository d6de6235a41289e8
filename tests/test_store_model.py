"""Stateful model check: every store behaves like a dict of bytes plus FIFO queues.

The same rule set runs against HashStore, TCPStore (our server), a PrefixStore
over TCPStore, and AsyncTCPStore. The model is deliberately naive (a dict and
lists), written from torch's documented semantics, not from our engine.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rdzv_store import AsyncTCPStore, HashStore, PrefixStore, QueueEmptyError, TCPStore

KEYS = st.sampled_from(["a", "b", "ctr", "é", ""])
VALUES = st.binary(max_size=12) | st.integers(-50, 50).map(lambda n: str(n).encode())
PLAIN_INT = re.compile(rb"-?[0-9]{1,18}")


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
    class StoreModel(RuleBasedStateMachine):
        @initialize()
        def open(self) -> None:
            self.store = open_store()
            self.kv: dict[bytes, bytes] = {}
            self.queues: dict[bytes, list[bytes]] = {}

        def teardown(self) -> None:
            if hasattr(self, "store"):
                for key in self.store.list_keys():
                    self.store.delete_key(key)
                for name in list(self.queues):
                    for _ in range(len(self.queues[name])):
                        self.store.queue_pop(name, block=False)
                self.store.close()
                if isinstance(self.store, PrefixStore):
                    self.store.underlying_store.close()

        @rule(key=KEYS, value=VALUES)
        def set(self, key: str, value: bytes) -> None:
            self.store.set(key, value)
            self.kv[key.encode()] = value

        @rule(keys=st.lists(KEYS, max_size=3), values=st.lists(VALUES, min_size=3, max_size=3))
        def multi_set(self, keys: list[str], values: list[bytes]) -> None:
            self.store.multi_set(keys, values[: len(keys)])
            for k, v in zip(keys, values):
                self.kv[k.encode()] = v

        @rule(key=KEYS)
        def get_existing(self, key: str) -> None:
            if key.encode() in self.kv:
                assert self.store.get(key) == self.kv[key.encode()]

        @rule(keys=st.lists(KEYS, max_size=3))
        def multi_get_existing(self, keys: list[str]) -> None:
            if all(k.encode() in self.kv for k in keys):
                assert self.store.multi_get(keys) == [self.kv[k.encode()] for k in keys]

        @rule(key=KEYS, amount=st.integers(-(2**63), 2**63 - 1))
        def add(self, key: str, amount: int) -> None:
            old = self.kv.get(key.encode())
            if old is not None and not PLAIN_INT.fullmatch(old):
                return  # non-integers: HashStore raises, torch's TCP server drops the connection
            total = (int(old or 0) + amount + 2**63) % 2**64 - 2**63
            assert self.store.add(key, amount) == total
            self.kv[key.encode()] = str(total).encode()

        @rule(key=KEYS, expected=VALUES, desired=VALUES, use_current=st.booleans())
        def compare_set(self, key: str, expected: bytes, desired: bytes, use_current: bool) -> None:
            current = self.kv.get(key.encode())
            if use_current and current is not None:
                expected = current
            result = self.store.compare_set(key, expected, desired)
            if current is None and expected:
                assert result == expected  # torch's rule: nothing stored, "expected" returned
            elif (current is None and not expected) or current == expected:
                assert result == desired
                self.kv[key.encode()] = desired
            else:
                assert result == current

        @rule(key=KEYS, value=VALUES)
        def append(self, key: str, value: bytes) -> None:
            self.store.append(key, value)
            self.kv[key.encode()] = self.kv.get(key.encode(), b"") + value

        @rule(key=KEYS)
        def delete_key(self, key: str) -> None:
            assert self.store.delete_key(key) == (key.encode() in self.kv)
            self.kv.pop(key.encode(), None)

        @rule(key=KEYS, value=VALUES)
        def queue_push(self, key: str, value: bytes) -> None:
            self.store.queue_push(key, value)
            self.queues.setdefault(key.encode(), []).append(value)

        @rule(key=KEYS)
        def queue_pop(self, key: str) -> None:
            queue = self.queues.get(key.encode())
            if queue:
                assert self.store.queue_pop(key, block=False) == queue.pop(0)
            else:
                with pytest.raises(QueueEmptyError):
                    self.store.queue_pop(key, block=False)

        @rule(keys=st.lists(KEYS, max_size=3))
        def check(self, keys: list[str]) -> None:
            # A non-empty queue counts as an existing key (torch's libuv rule).
            expected = all(k.encode() in self.kv or self.queues.get(k.encode()) for k in keys)
            assert self.store.check(keys) == expected

        @precondition(lambda self: counts_all_keys)
        @invariant()
        def num_keys(self) -> None:
            assert self.store.num_keys() == len(self.kv)

        @invariant()
        def list_keys_and_queue_lengths(self) -> None:
            assert sorted(self.store.list_keys()) == sorted(k.decode() for k in self.kv)
            for name, queue in self.queues.items():
                assert self.store.queue_len(name) == len(queue)

    StoreModel.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
    return StoreModel


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
