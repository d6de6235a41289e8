"""rdzv_backend: torch's elastic rendezvous backend layer over c10d stores, without torch.

* :mod:`rdzv_backend.api`: :class:`RendezvousParameters` and the rendezvous errors;
* :mod:`rdzv_backend.utils`: endpoint and ``--rdzv-conf`` parsing, the ``is_host`` guess;
* :mod:`rdzv_backend.c10d`: :class:`C10dRendezvousBackend`, which keeps rendezvous state
  in a c10d store exactly as torch 2.13 does, and :func:`create_backend`;
* :mod:`rdzv_backend.dynamic`: :class:`DynamicRendezvousHandler` (torch's elastic handler:
  rounds, ranks, heartbeats, wait/redundancy lists) and :func:`create_handler`.

Everything is importable from this package too, private helpers included
(``_parse_rendezvous_config``, ``_matches_machine_hostname``), as torch's tests import them.
"""

from .api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from .c10d import DEFAULT_PORT, C10dRendezvousBackend, RendezvousBackend, Token, create_backend
from .etcd import EtcdRendezvousBackend  # its create_backend stays rdzv_backend.etcd.create_backend
from .state import NodeDesc, RendezvousState
from .state_codec import decode_state, encode_state, state_from_json, state_to_json
from .api import RendezvousHandler, RendezvousInfo, RendezvousStoreInfo
from .dynamic import DynamicRendezvousHandler, RendezvousSettings, RendezvousTimeout, create_handler
from .utils import (
    _matches_machine_hostname,
    _parse_rendezvous_config,
    _try_parse_port,
    parse_rendezvous_endpoint,
)

__all__ = [
    "DEFAULT_PORT",
    "NodeDesc",
    "RendezvousState",
    "decode_state",
    "encode_state",
    "state_from_json",
    "state_to_json",
    "DynamicRendezvousHandler",
    "RendezvousHandler",
    "RendezvousInfo",
    "RendezvousSettings",
    "RendezvousStoreInfo",
    "RendezvousTimeout",
    "create_handler",
    "C10dRendezvousBackend",
    "EtcdRendezvousBackend",
    "RendezvousBackend",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousParameters",
    "RendezvousStateError",
    "RendezvousTimeoutError",
    "Token",
    "create_backend",
    "parse_rendezvous_endpoint",
]
