"""The etcd-v3 rendezvous backend: rendezvous state in one etcd key, fenced by its revision.

torch's own etcd backend (``etcd-v2``) speaks only etcd's v2 API, which etcd 3.4 turns off
by default and 3.6 removed. This one speaks v3 through the JSON gateway
(:class:`rdzv_store.etcd_client.EtcdClient`, standard library only):

* the state of run ``<run_id>`` is stored base64-encoded (as torch's backends do) under
  ``<key_prefix>/<run_id>`` (default prefix ``/torch/elastic/rendezvous``);
* the token is the key's ``mod_revision`` (an ``int``): revision-based, so no ABA;
* ``set_state`` is one transaction: compare ``MOD == token`` (or "absent" for no token),
  put with the backend's lease, else read the current state back (no second round trip);
* exactly once: when an attempt of that transaction failed after it was sent (connection
  reset, timeout: it may have been applied) and its retry then lost, the write counts as ours
  when the key now holds exactly the bytes we wrote at a revision past the token (torch's c10d
  rule: equal state bytes are the same state);
* the key carries a lease as its TTL (default 7200 s, torch's): it disappears TTL after the
  last write at the latest (between 2/3 TTL and TTL: a lease is reused for a third of
  its TTL, then replaced by a fresh one).

The state is opaque bytes here; nothing read from etcd is unpickled or interpreted.
"""

from __future__ import annotations

import binascii
import logging
import threading
import time
from base64 import b64decode, b64encode
from typing import Any

from rdzv_store.etcd_client import CallReport, EtcdClient, b64, unb64
from rdzv_store.etcdstore import EtcdStore
from rdzv_store.errors import StoreError

from .api import RendezvousConnectionError, RendezvousParameters, RendezvousStateError
from .c10d import RendezvousBackend, Token
from .utils import parse_rendezvous_endpoint

__all__ = ["EtcdRendezvousBackend", "create_backend", "DEFAULT_PORT", "DEFAULT_KEY_PREFIX", "DEFAULT_TTL"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 2379
DEFAULT_KEY_PREFIX = "/torch/elastic/rendezvous"
DEFAULT_STORE_PREFIX = "/torch/elastic/store/"
#: torch's etcd-v2 default TTL of the state key (seconds).
DEFAULT_TTL = 7200
DEFAULT_READ_TIMEOUT = 60

_CONNECTION_FAILED = "The connection to etcd has failed. See inner exception for details."
_CORRUPT = "The state object is corrupt. See inner exception for details."


class EtcdRendezvousBackend(RendezvousBackend):
    """A rendezvous backend on etcd v3 (same contract as :class:`~rdzv_backend.C10dRendezvousBackend`).

    Args:
        client: The gateway client (used, not owned: the caller closes it).
        run_id: Id of the rendezvous; must be non-empty.
        key_prefix: Where the states live (default ``/torch/elastic/rendezvous``).
        ttl: Seconds the state outlives its last write (default 7200); must be positive.

    Raises:
        ValueError: Empty ``run_id`` or a non-positive ``ttl``.
    """

    def __init__(self, client: EtcdClient, run_id: str, key_prefix: str | None = None, ttl: int | None = None) -> None:
        if not run_id:
            raise ValueError("The run id must be a non-empty string.")
        if ttl is not None and ttl <= 0:
            raise ValueError("The TTL must be a positive integer.")
        self._client = client
        prefix = DEFAULT_KEY_PREFIX if key_prefix is None else key_prefix
        self._key = (prefix.rstrip("/") + "/" + run_id).encode("utf-8")
        self._ttl = int(ttl or DEFAULT_TTL)
        self._lease: str | None = None
        self._lease_at = 0.0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """See base class."""
        return "etcd-v3"

    @property
    def key(self) -> bytes:
        return self._key

    def get_state(self) -> tuple[bytes, Token] | None:
        """See base class."""
        reply = self._call("kv/range", {"key": b64(self._key)})
        kvs = reply.get("kvs")
        if not kvs:
            return None
        return self._decode(kvs[0])

    def set_state(self, state: bytes, token: Token | None = None) -> tuple[bytes, Token, bool] | None:
        """See base class. A token that is not one of ours (an ``int`` revision) never matches."""
        if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
            result = self.get_state()
            return None if result is None else (result[0], result[1], False)
        key = b64(self._key)
        if token:
            guard = {"target": "MOD", "key": key, "result": "EQUAL", "mod_revision": str(token)}
        else:
            guard = {"target": "CREATE", "key": key, "result": "EQUAL", "create_revision": "0"}
        value = b64(b64encode(state))
        report = CallReport()
        with self._lock:
            for retry in (False, True):
                lease = self._current_lease()
                try:
                    reply = self._call(
                        "kv/txn",
                        {
                            "compare": [guard],
                            "success": [{"request_put": {"key": key, "value": value, "lease": lease}}],
                            "failure": [{"request_range": {"key": key}}],
                        },
                        report,
                    )
                    break
                except RendezvousConnectionError as exc:
                    if retry or "lease not found" not in str(exc.__cause__):
                        raise
                    self._lease = None  # revoked or expired behind our back: take a fresh one
        if reply.get("succeeded"):
            return state, int(reply["header"]["revision"]), True
        responses = reply.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs")
        if not kvs:
            return None
        kv = kvs[0]
        if report.uncertain and kv.get("value") == value and int(kv["mod_revision"]) > (token or 0):
            # An attempt whose reply was lost was applied; its retry then lost to that very write.
            logger.debug("etcd-v3 backend: a write whose reply was lost had been applied (revision %s)", kv["mod_revision"])
            return state, int(kv["mod_revision"]), True
        current, current_token = self._decode(kv)
        return current, current_token, False

    # -- internals ---------------------------------------------------------------------------
    def _current_lease(self) -> str:
        """Our lease, replaced by a fresh one once a third of its TTL has passed."""
        now = time.monotonic()
        if self._lease is None or now - self._lease_at > self._ttl / 3:
            reply = self._call("lease/grant", {"TTL": self._ttl})
            old, self._lease, self._lease_at = self._lease, str(reply["ID"]), now
            if old is not None:
                # The old lease may still hold the key until the put below moves it; it then
                # expires on its own, within its TTL. Nothing to revoke eagerly.
                logger.debug("etcd-v3 backend: lease %s replaced by %s", old, self._lease)
        return self._lease

    def _call(self, path: str, body: dict[str, Any], report: CallReport | None = None) -> dict[str, Any]:
        try:
            return self._client.call(path, body, key=self._key, report=report)
        except StoreError as exc:
            raise RendezvousConnectionError(_CONNECTION_FAILED) from exc
        except OSError as exc:  # pragma: no cover - the client maps these itself
            raise RendezvousConnectionError(_CONNECTION_FAILED) from exc

    def _decode(self, kv: dict[str, Any]) -> tuple[bytes, Token]:
        try:
            state = b64decode(unb64(kv.get("value")))
        except (binascii.Error, ValueError) as exc:
            raise RendezvousStateError(_CORRUPT) from exc
        return state, int(kv["mod_revision"])


def _endpoints(params: RendezvousParameters) -> list[str]:
    raw = params.endpoint or ""
    out = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" in part:
            out.append(part)
        else:
            host, port = parse_rendezvous_endpoint(part, default_port=DEFAULT_PORT)
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not out:
        out.append(f"localhost:{DEFAULT_PORT}")
    return out


def create_backend(params: RendezvousParameters) -> tuple[EtcdRendezvousBackend, EtcdStore]:
    """Create an :class:`EtcdRendezvousBackend` and an :class:`~rdzv_store.EtcdStore` from launcher parameters.

    ``params.endpoint`` is one or more comma-separated ``host[:port]`` (port 2379) or URLs.
    Config options (torch's etcd conventions, plus user/password):

    ``protocol``      ``http`` (default) or ``https``, any case.
    ``read_timeout``  seconds; the bound of every etcd call (default 60); must be positive.
    ``cacert``        CA bundle to verify the members (TLS).
    ``cert``, ``key`` client certificate and its key (TLS client auth).
    ``user``, ``password`` etcd password authentication.
    ``key_prefix``    where the state lives (default ``/torch/elastic/rendezvous``).
    ``ttl``           seconds the state outlives its last write (default 7200).

    The store is an ``EtcdStore`` under ``/torch/elastic/store/``; the caller owns it
    (close it when done); the backend's client is the store's.

    Raises:
        ValueError: Bad protocol, endpoint, ``read_timeout``, ``ttl`` or an empty run id.
        RendezvousConnectionError: etcd could not be reached.
    """
    protocol = str(params.get("protocol", "http")).strip().lower()
    if protocol not in ("http", "https"):
        raise ValueError("The protocol must be HTTP or HTTPS.")
    read_timeout = params.get_as_int("read_timeout", DEFAULT_READ_TIMEOUT)
    if read_timeout is None or read_timeout <= 0:
        raise ValueError("The read timeout must be a positive integer.")
    ttl = params.get_as_int("ttl", DEFAULT_TTL)
    if not params.run_id:
        raise ValueError("The run id must be a non-empty string.")
    store = EtcdStore(
        _endpoints(params),
        prefix=DEFAULT_STORE_PREFIX,
        timeout=read_timeout,
        protocol=protocol,
        ca_cert=params.get("cacert") or params.get("ca_cert"),
        cert=params.get("cert") or params.get("ssl_cert"),
        key=params.get("key") or params.get("ssl_cert_key"),
        user=params.get("user"),
        password=params.get("password"),
    )
    try:
        backend = EtcdRendezvousBackend(store.client, params.run_id, params.get("key_prefix"), ttl)
        # Fail now, not at the first rendezvous, when etcd cannot be reached (as torch's
        # create_backend does): one linearizable read of the state key.
        backend._call("kv/range", {"key": b64(backend.key), "count_only": True})
    except Exception:
        store.close()
        raise
    return backend, store
