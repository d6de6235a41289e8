"""rdzv_store: torch-free, wire- and file-compatible c10d key-value stores."""

from ._version import __version__
from .async_client import AsyncTCPStore
from .errors import QueueEmptyError, StoreAuthError, StoreConnectionError, StoreError, StoreTimeoutError
from .etcdstore import (
    EtcdAuthError,
    EtcdCompactedError,
    EtcdError,
    EtcdNoLeaderError,
    EtcdRequestTooLargeError,
    EtcdStore,
    EtcdUnavailableError,
)
from .filestore import FileStore
from .hashstore import HashStore
from .prefixstore import PrefixStore
from .server import StoreServer
from .store import DEFAULT_TIMEOUT, Store
from .tcpstore import TCPStore

__all__ = [
    "AsyncTCPStore",
    "DEFAULT_TIMEOUT",
    "EtcdAuthError",
    "EtcdCompactedError",
    "EtcdError",
    "EtcdNoLeaderError",
    "EtcdRequestTooLargeError",
    "EtcdStore",
    "EtcdUnavailableError",
    "FileStore",
    "HashStore",
    "PrefixStore",
    "QueueEmptyError",
    "Store",
    "StoreAuthError",
    "StoreConnectionError",
    "StoreError",
    "StoreServer",
    "StoreTimeoutError",
    "TCPStore",
    "__version__",
]
