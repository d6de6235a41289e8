"""``PrefixStore``: every key becomes ``prefix + "/" + key`` on an underlying store."""

from __future__ import annotations

from .args import Key, Timeout, key_bytes
from .store import Store, as_bytes, key_arg

__all__ = ["PrefixStore"]


class PrefixStore(Store):
    """torch's PrefixStore: keys are namespaced, everything else is the underlying store's.

    ``timeout``/``set_timeout`` read and write the underlying store's timeout;
    ``num_keys`` is the underlying total (not filtered, as in torch);
    ``list_keys`` keeps only this prefix's keys, with the prefix stripped;
    ``barrier`` uses the base algorithm on prefixed keys, as in torch.

    Every operation calls the underlying store's *public* method with the
    prefixed key (``str`` when it is UTF-8, as torch passes keys), so any
    ``Store`` subclass works underneath, whether it overrides the public
    methods (torch's way) or the hooks (see ``rdzv_store.store``).

    Raises:
        ValueError: ``store`` is None (torch's message).
        TypeError: ``store`` is not a ``Store``, or ``prefix`` is not ``str``/``bytes``.
        Each operation raises what the underlying store's operation raises.
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
        """The store this one prefixes keys for.

        Raises:
            Nothing.
        """
        return self._store

    @property
    def _underlying_non_prefix_store(self) -> Store:
        store = self._store
        while isinstance(store, PrefixStore):
            store = store.underlying_store
        return store

    def _store_timeout(self) -> float:
        return self._store.timeout.total_seconds()

    def set_timeout(self, timeout: Timeout) -> None:
        """Set the underlying store's timeout (the two share one).

        Raises:
            TypeError: ``timeout`` is neither a ``timedelta`` nor a number.
        """
        self._store.set_timeout(timeout)

    def has_extended_api(self) -> bool:
        """The underlying store's answer.

        Raises:
            Whatever the underlying store's ``has_extended_api`` raises.
        """
        return self._store.has_extended_api()

    def clone(self) -> PrefixStore:
        """A PrefixStore with the same prefix over a clone of the underlying store.

        Raises:
            NotImplementedError: the underlying store cannot be cloned.
        """
        return PrefixStore(self._prefix_arg, self._store.clone())

    # -- hooks: prefix the keys, then call the underlying store's *public* method (store.py) ---
    def _k(self, key: bytes) -> str | bytes:
        return key_arg(self._prefix + key)

    def _ks(self, keys: list[bytes]) -> list[str | bytes]:
        prefix = self._prefix
        return [key_arg(prefix + k) for k in keys]

    def _set(self, key: bytes, value: bytes) -> None:
        self._store.set(self._k(key), value)

    def _get(self, key: bytes, timeout: float) -> bytes:
        return as_bytes(self._store.get(self._k(key)))  # timeout: the underlying's, which is ours

    def _add(self, key: bytes, amount: int) -> int:
        return self._store.add(self._k(key), amount)

    def _compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        return as_bytes(self._store.compare_set(self._k(key), expected, desired))

    def _delete_key(self, key: bytes) -> bool:
        return self._store.delete_key(self._k(key))

    def _check(self, keys: list[bytes]) -> bool:
        return self._store.check(self._ks(keys))

    def _wait(self, keys: list[bytes], timeout: float) -> None:
        self._store.wait(self._ks(keys), timeout)

    def _num_keys(self) -> int:
        return self._store.num_keys()

    def _multi_get(self, keys: list[bytes], timeout: float) -> list[bytes]:
        return [as_bytes(v) for v in self._store.multi_get(self._ks(keys))]

    def _multi_set(self, keys: list[bytes], values: list[bytes]) -> None:
        self._store.multi_set(self._ks(keys), values)

    def _append(self, key: bytes, value: bytes) -> None:
        self._store.append(self._k(key), value)

    def _queue_push(self, key: bytes, value: bytes) -> None:
        self._store.queue_push(self._k(key), value)

    def _queue_pop(self, key: bytes, block: bool, timeout: float) -> bytes:
        return as_bytes(self._store.queue_pop(self._k(key), block))

    def _queue_len(self, key: bytes) -> int:
        return self._store.queue_len(self._k(key))

    def _list_keys(self) -> list[bytes]:
        prefix = self._prefix
        n = len(prefix)
        raw = (key_bytes(k) for k in self._store.list_keys())
        return [k[n:] for k in raw if k.startswith(prefix)]
