"""rdzv_store.testing: what a launcher's test suite needs to test against a store.

* ``running_server()`` / ``ServerThread``: a ``StoreServer`` on its own loop thread;
* ``FaultProxy``: a loopback TCP proxy that injects latency, stalls, resets, refusals,
  black holes and bandwidth caps while traffic flows;
* ``model``: the reference model of a store (``StoreModel``, ``Op``, ``check_operations``);
* ``strategies``: hypothesis strategies for keys, values and operations, and
  ``store_state_machine`` (imports hypothesis: ``pip install 'rdzv-store[test]'``);
* ``plugin``: pytest fixtures (``store_server``, ``tcp_store``, ``tcp_store_factory``,
  ``async_tcp_store``, ``file_store``, ``hash_store``, ``fault_proxy``), registered through
  the ``pytest11`` entry point and used only by tests that name them.

Importing this package imports neither pytest nor hypothesis.
"""

from .model import CURRENT, UNDEFINED, Op, Raises, StoreModel, check_operations
from .proxy import FaultProxy, ProxyStats
from .servers import ServerThread, running_server

__all__ = [
    "CURRENT",
    "UNDEFINED",
    "FaultProxy",
    "Op",
    "ProxyStats",
    "Raises",
    "ServerThread",
    "StoreModel",
    "check_operations",
    "running_server",
]
