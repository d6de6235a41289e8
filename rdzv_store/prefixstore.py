"""``PrefixStore``: every key becomes ``prefix + "/" + key`` on an underlying store."""

from __future__ import annotations

from .args import Key, Timeout, key_bytes
from .store import Store

__all__ = ["PrefixStore"]


class PrefixStore(Store):
    """torch's PrefixStore: keys are namespaced, everything else is the underlying store's.

    ``timeout``/``set_timeout`` read and write the underlying store's timeout;
    ``num_keys`` is the underlying total (not filtered, as in torch);
    ``list_keys`` keeps only this prefix's keys, with the prefix stripped;
    ``barrier`` uses the base algorithm on prefixed keys, as in torch.
    """

    def __init__(self, prefix: Key, store: Store) -> None:
        if store is None:
            raise ValueError("store argument cannot be None")
        if not isinstance(store, Store):
            raise TypeError(f"store must be a Store, not {type(store).__name__}")
        self._prefix_arg = prefix
        self._prefix = key_bytes(prefix) + b"/"
        self._store = store

    @property
    def underlying_store(self) -> Store:
        return self._store

    @property
    def _underlying_non_prefix_store(self) -> Store:
        store = self._store
        while isinstance(store, PrefixStore):
            store = store.underlying_store
        return store

    def _store_timeout(self) -> float:
        return self._store._store_timeout()

    def set_timeout(self, timeout: Timeout) -> None:
        self._store.set_timeout(timeout)

    def has_extended_api(self) -> bool:
        return self._store.has_extended_api()

    def clone(self) -> PrefixStore:
        return PrefixStore(self._prefix_arg, self._store.clone())

    def _k(self, key: bytes) -> bytes:
        return self._prefix + key

    def _ks(self, keys: list[bytes]) -> list[bytes]:
        return [self._prefix + k for k in keys]

    def _set(self, key: bytes, value: bytes) -> None:
        self._store._set(self._k(key), value)

    def _get(self, key: bytes, timeout: float) -> bytes:
        return self._store._get(self._k(key), timeout)

    def _add(self, key: bytes, amount: int) -> int:
        return self._store._add(self._k(key), amount)

    def _compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        return self._store._compare_set(self._k(key), expected, desired)

    def _delete_key(self, key: bytes) -> bool:
        return self._store._delete_key(self._k(key))

    def _check(self, keys: list[bytes]) -> bool:
        return self._store._check(self._ks(keys))

    def _wait(self, keys: list[bytes], timeout: float) -> None:
        self._store._wait(self._ks(keys), timeout)

    def _num_keys(self) -> int:
        return self._store._num_keys()

    def _multi_get(self, keys: list[bytes], timeout: float) -> list[bytes]:
        return self._store._multi_get(self._ks(keys), timeout)

    def _multi_set(self, keys: list[bytes], values: list[bytes]) -> None:
        self._store._multi_set(self._ks(keys), values)

    def _append(self, key: bytes, value: bytes) -> None:
        self._store._append(self._k(key), value)

    def _queue_push(self, key: bytes, value: bytes) -> None:
        self._store._queue_push(self._k(key), value)

    def _queue_pop(self, key: bytes, block: bool, timeout: float) -> bytes:
        return self._store._queue_pop(self._k(key), block, timeout)

    def _queue_len(self, key: bytes) -> int:
        return self._store._queue_len(self._k(key))

    def _list_keys(self) -> list[bytes]:
        n = len(self._prefix)
        return [k[n:] for k in self._store._list_keys() if k.startswith(self._prefix)]
