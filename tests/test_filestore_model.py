"""FileStore against a dict: a hypothesis state machine over several instances on one file.

Instances are opened, cloned, closed and compacted while operations run on
any of them; a killed writer's torn record is thrown in now and then. After
every step, each instance must agree with the model, and so must a replay of
the file's complete records (what torch would read), counters included.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rdzv_store import FileStore, StoreTimeoutError, filelog
from rdzv_store.args import int64, parse_int64

KEYS = st.sampled_from(["a", "b", "c", "-a", "/a", "", "n/1"])
VALUES = st.one_of(st.binary(max_size=6), st.integers(-5, 5).map(lambda n: str(n).encode()))
AMOUNTS = st.one_of(st.integers(-3, 3), st.sampled_from([2**63 - 1, -(2**63)]))


class FileStoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="filestore-model-")
        self.path = os.path.join(self.dir, "store")
        self.model: dict[bytes, bytes] = {}
        self.stores: list[FileStore] = []
        self.closed = 0
        for _ in range(2):
            self._open()

    def teardown(self) -> None:
        for s in self.stores:
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _open(self) -> None:
        s = FileStore(self.path)
        s.set_timeout(0)  # get/multi_get check once instead of waiting
        self.stores.append(s)

    def _pick(self, i: int) -> FileStore:
        return self.stores[i % len(self.stores)]

    # -- writes ----------------------------------------------------------------------------------
    @rule(i=st.integers(0, 9), key=KEYS, value=VALUES)
    def set(self, i, key, value):
        self._pick(i).set(key, value)
        self.model[key.encode()] = value

    @rule(i=st.integers(0, 9), key=KEYS, amount=AMOUNTS)
    def add(self, i, key, amount):
        raw = key.encode()
        try:
            expected = int64(parse_int64(self.model.get(raw, b"")) + amount)
        except ValueError:
            with pytest.raises(ValueError):
                self._pick(i).add(key, amount)
            return
        assert self._pick(i).add(key, amount) == expected
        self.model[raw] = str(expected).encode()

    @rule(i=st.integers(0, 9), key=KEYS, expected=VALUES, desired=VALUES)
    def compare_set(self, i, key, expected, desired):
        raw = key.encode()
        current = self.model.get(raw)
        if current is None:
            want = expected if expected else desired
            if not expected:
                self.model[raw] = desired
        elif current == expected:
            want = self.model[raw] = desired
        else:
            want = current
        assert self._pick(i).compare_set(key, expected, desired) == want

    @rule(i=st.integers(0, 9), key=KEYS)
    def delete_key(self, i, key):
        assert self._pick(i).delete_key(key) == (key.encode() in self.model)
        self.model.pop(key.encode(), None)

    @rule(i=st.integers(0, 9), key=KEYS, value=VALUES)
    def append(self, i, key, value):
        self._pick(i).append(key, value)
        self.model[key.encode()] = self.model.get(key.encode(), b"") + value

    @rule(i=st.integers(0, 9), pairs=st.lists(st.tuples(KEYS, VALUES), max_size=4))
    def multi_set(self, i, pairs):
        self._pick(i).multi_set([k for k, _ in pairs], [v for _, v in pairs])
        for k, v in pairs:
            self.model[k.encode()] = v

    # -- reads -----------------------------------------------------------------------------------
    @rule(i=st.integers(0, 9), key=KEYS)
    def get(self, i, key):
        if key.encode() in self.model:
            assert self._pick(i).get(key) == self.model[key.encode()]
        else:
            with pytest.raises(StoreTimeoutError):
                self._pick(i).get(key)

    @rule(i=st.integers(0, 9), keys=st.lists(KEYS, max_size=3))
    def multi_get(self, i, keys):
        if all(k.encode() in self.model for k in keys):
            assert self._pick(i).multi_get(keys) == [self.model[k.encode()] for k in keys]
        else:
            with pytest.raises(StoreTimeoutError):
                self._pick(i).multi_get(keys)

    @rule(i=st.integers(0, 9), keys=st.lists(KEYS, max_size=3))
    def check(self, i, keys):
        assert self._pick(i).check(keys) == all(k.encode() in self.model for k in keys)

    # -- lifecycle, compaction, damage -------------------------------------------------------------
    @precondition(lambda self: len(self.stores) < 4)
    @rule(i=st.integers(0, 9))
    def clone(self, i):
        c = self._pick(i).clone()
        assert c.timeout == self._pick(i).timeout
        self.stores.append(c)

    @precondition(lambda self: len(self.stores) < 4)
    @rule()
    def open(self):
        self._open()

    @precondition(lambda self: len(self.stores) > 1)
    @rule(i=st.integers(0, 9))
    def close(self, i):
        self.stores.pop(i % len(self.stores)).close()
        self.closed += 1

    @rule(i=st.integers(0, 9))
    def compact(self, i):
        self._pick(i).compact()

    def _tail_is_clean(self) -> bool:
        with open(self.path, "rb") as f:
            data = f.read()
        return filelog.decode(data)[1] == len(data)

    # Only on a clean tail: a second writer appending after a torn record (torch's writers do
    # not repair) corrupts the log for every reader, torch's included, and nothing can tell.
    @precondition(_tail_is_clean)
    @rule(key=KEYS, value=VALUES, cut=st.integers(1, 100))
    def tear(self, key, value, cut):
        """A writer dies mid-record: part of one record lands at the end of the file."""
        record = filelog.encode(filelog.user_key(key.encode()), value)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, record[: min(cut, len(record) - 1)])
        finally:
            os.close(fd)

    # -- invariants ------------------------------------------------------------------------------
    def _internal(self) -> dict[bytes, bytes]:
        internal = {filelog.REFCOUNT: str(len(self.stores)).encode()}
        if self.closed:
            internal[filelog.CLEANUP] = str(self.closed).encode()
        return internal

    @invariant()
    def the_file_replays_to_the_model(self):
        with open(self.path, "rb") as f:
            data = f.read()
        records, _ = filelog.decode(data)
        state: dict[bytes, bytes] = {}
        filelog.apply(state, records)
        expected = {filelog.user_key(k): v for k, v in self.model.items()}
        expected.update(self._internal())
        state.pop(filelog.COMPACTED, None)
        assert state == expected

    @invariant()
    def every_instance_agrees(self):
        user = sorted(k.decode() for k in self.model)
        for s in self.stores:
            assert sorted(s.list_keys()) == user
            assert s.num_keys() == len(self.model) + len(self._internal())


FileStoreModel.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
test_filestore_model = FileStoreModel.TestCase
