"""rdzv_store: torch-free, wire- and file-compatible c10d key-value stores."""

from .errors import QueueEmptyError, StoreConnectionError, StoreError, StoreTimeoutError
from .hashstore import HashStore
from .prefixstore import PrefixStore
from .store import DEFAULT_TIMEOUT, Store

__all__ = [
    "DEFAULT_TIMEOUT",
    "HashStore",
    "PrefixStore",
    "QueueEmptyError",
    "Store",
    "StoreConnectionError",
    "StoreError",
    "StoreTimeoutError",
]
