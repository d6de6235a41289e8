"""``EtcdStore``: the whole ``Store`` API on an etcd v3 cluster, through its JSON gateway.

Layout under the store's prefix ``P`` (default ``/rdzv_store/``):

* ``P + "k/" + key``: plain keys (``list_keys``/``num_keys`` count these only);
* ``P + "q/" + hex(name) + "/" + unique``: queue items, FIFO by ``create_revision``;
* ``P + "o/" + client-uuid``: this store object's *operation record* (see below).

Every write is one etcd transaction, so no write is ever half applied. ``add``, ``append``
and ``compare_set`` are compare-guarded (key absent, or its ``mod_revision`` unchanged)
and retried from the transaction's own failure read, so they are linearizable.

Exactly once, across failover. A request whose member dies can have been committed
although its reply was lost (``etcd-v3.md`` §3.4), and retrying it on another member
could add twice. So each write also compares the operation record's ``mod_revision``
with the one this store last wrote, and rewrites the record (``<seq>.<attempt>``) in the
same transaction. Of all the copies of a write, at most one can apply; a retry that
finds the record moved knows its write was applied and which attempt it was, and returns
that attempt's result. The record is deleted by :meth:`EtcdStore.close`.

Blocking calls (``get``, ``wait``, ``multi_get``, blocking ``queue_pop``) read, and if
the keys are missing watch them from the read's revision + 1, so no write in between is
missed. A silent watch is re-established every ``watch_refresh`` seconds through a fresh
linearizable read (which fails over), so a waiter never sits on a dead or partitioned
member, and a compacted start revision is handled the same way (re-read, re-watch).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from .args import DEFAULT_TIMEOUT, Timeout, int64, parse_int64, reply_bound
from .errors import format_keys, queue_empty, wait_timeout
from .etcd_client import (
    DEFAULT_ATTEMPT_TIMEOUT,
    MAX_REQUEST_BYTES,
    EtcdAuthError,
    EtcdClient,
    EtcdCompactedError,
    EtcdError,
    EtcdNoLeaderError,
    EtcdRequestTooLargeError,
    EtcdUnavailableError,
    b64,
    prefix_end,
    unb64,
)
from .store import Store

__all__ = [
    "EtcdStore",
    "EtcdError",
    "EtcdUnavailableError",
    "EtcdNoLeaderError",
    "EtcdAuthError",
    "EtcdRequestTooLargeError",
    "EtcdCompactedError",
    "DEFAULT_PREFIX",
]

DEFAULT_PREFIX = "/rdzv_store/"
#: A watch that said nothing for this long is replaced (fresh read, fresh watch).
DEFAULT_WATCH_REFRESH = 3.0
_TXN_OPS = 128  # etcd's default --max-txn-ops


@dataclass
class _Attempt:
    """One guarded write: applied iff every compare holds; ``result`` is returned if it is."""

    compares: list[dict[str, Any]]
    success: list[dict[str, Any]]
    failure: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None
    size: int = 0
    #: (etcd key, value) this attempt stores, remembered as the key's likely state.
    remember: tuple[bytes, bytes] | None = None


@dataclass
class _Done:
    result: Any


_Plan = Callable[[Union[list[dict[str, Any]], None]], Union[_Attempt, _Done]]


def _put(key: bytes, value: bytes) -> dict[str, Any]:
    return {"request_put": {"key": b64(key), "value": b64(value)}}


def _range(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def _first_kv(response: dict[str, Any]) -> dict[str, Any] | None:
    kvs = response.get("response_range", {}).get("kvs")
    return kvs[0] if kvs else None


def _guard_state(key: bytes, kv: dict[str, Any] | None) -> dict[str, Any]:
    """The compare "this key is still as read": absent, or its mod_revision unchanged."""
    if kv is None:
        return {"target": "CREATE", "key": b64(key), "result": "EQUAL", "create_revision": "0"}
    return {"target": "MOD", "key": b64(key), "result": "EQUAL", "mod_revision": kv["mod_revision"]}


class EtcdStore(Store):
    """A c10d store on etcd v3 (3.4+), standard library only.

    Args:
        endpoints: etcd client URLs or ``host[:port]`` (port 2379), a sequence or one
            comma-separated string. Calls fail over between them.
        prefix: Namespace of this store in etcd (``str`` or ``bytes``); stores with the
            same prefix share keys.
        timeout: The store timeout (``timedelta`` or seconds): waits, and the bound of
            every call including failover (a timeout <= 0 means "do not wait" for waits;
            other calls then get torch's default, 300 s).
        attempt_timeout: Bound of one attempt on one member before moving to the next.
        user, password: etcd password authentication (token renewed on expiry).
        ca_cert, cert, key: TLS: CA bundle, client certificate and its key.
        protocol: ``http`` or ``https`` for endpoints given without a scheme.
        watch_refresh: A silent watch is replaced after this many seconds.
        max_request_bytes: etcd's ``--max-request-bytes``; larger writes are refused
            locally, before anything is sent.

    Errors (all :class:`~rdzv_store.StoreError` subclasses, messages name the key and the
    endpoint): :class:`~rdzv_store.StoreTimeoutError` for waits;
    :class:`EtcdUnavailableError` (a ``StoreConnectionError``) when no member answered
    within the timeout, :class:`EtcdNoLeaderError` when those that answered had no leader;
    :class:`EtcdAuthError` (a ``StoreAuthError``) for bad credentials, permissions or TLS;
    :class:`EtcdRequestTooLargeError` (also a ``ValueError``) for values over the request
    limit; ``ValueError`` for ``add`` on a non-integer; :class:`~rdzv_store.QueueEmptyError`.
    A write that failed with ``EtcdUnavailableError`` may still have been applied (its
    outcome is unknown); it is never applied twice.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        prefix: str | bytes = DEFAULT_PREFIX,
        timeout: Timeout = DEFAULT_TIMEOUT,
        *,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        user: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        protocol: str | None = None,
        watch_refresh: float = DEFAULT_WATCH_REFRESH,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        super().__init__(timeout)
        raw_prefix = prefix.encode("utf-8") if isinstance(prefix, str) else bytes(prefix)
        if not raw_prefix:
            raise ValueError("EtcdStore needs a non-empty prefix")
        self._prefix = raw_prefix
        self._client = EtcdClient(
            endpoints,
            timeout=reply_bound(self._timeout_s),
            attempt_timeout=attempt_timeout,
            user=user,
            password=password,
            ca_cert=ca_cert,
            cert=cert,
            key=key,
            protocol=protocol,
        )
        self._opts: dict[str, Any] = {
            "attempt_timeout": attempt_timeout,
            "user": user,
            "password": password,
            "ca_cert": ca_cert,
            "cert": cert,
            "key": key,
            "protocol": protocol,
            "watch_refresh": watch_refresh,
            "max_request_bytes": max_request_bytes,
        }
        self._watch_refresh = float(watch_refresh)
        self._max_request = int(max_request_bytes)
        self._id = uuid.uuid4().hex
        self._op_key = raw_prefix + b"o/" + self._id.encode()
        self._op_mod = "0"  # mod_revision of our operation record as we last wrote it
        self._op_seq = 0
        self._queue_seq = itertools.count(1)  # next() is atomic: threads never share an item key
        self._write_lock = threading.Lock()
        self._closed = False
        # What this object last stored under a counter/appended key: the first guess of the
        # next add/append there (one round trip when nobody else wrote in between).
        self._recent: dict[bytes, dict[str, Any]] = {}

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def prefix(self) -> bytes:
        return self._prefix

    @property
    def client(self) -> EtcdClient:
        """The underlying gateway client (shared with nobody; closed by :meth:`close`)."""
        return self._client

    def set_timeout(self, timeout: Timeout) -> None:
        super().set_timeout(timeout)
        self._client.timeout = reply_bound(self._timeout_s)

    def has_extended_api(self) -> bool:
        return True

    def clone(self) -> EtcdStore:
        """A new, independent store object on the same cluster and prefix."""
        return EtcdStore(
            [str(e) for e in self._client.endpoints], self._prefix, self._timeout_s, **self._opts
        )

    def close(self) -> None:
        """Delete this object's operation record (best effort) and close connections."""
        if self._closed:
            return
        self._closed = True
        if self._op_mod != "0":
            try:
                self._client.call(
                    "kv/deleterange", {"key": b64(self._op_key)}, timeout=min(2.0, self._client.timeout)
                )
            except EtcdError:
                pass
        self._client.close()

    def _deadline(self) -> float:
        return time.monotonic() + reply_bound(self._timeout_s)

    def _k(self, key: bytes) -> bytes:
        return self._prefix + b"k/" + key

    def _q(self, name: bytes) -> bytes:
        return self._prefix + b"q/" + name.hex().encode() + b"/"

    def _call(self, path: str, body: dict[str, Any], key: bytes | None, deadline: float | None = None) -> dict[str, Any]:
        return self._client.call(path, body, key=key, deadline=deadline or self._deadline())

    def _txn(self, compares: list[dict[str, Any]], success: list[dict[str, Any]], failure: list[dict[str, Any]], key: bytes | None, deadline: float | None = None) -> dict[str, Any]:
        return self._call("kv/txn", {"compare": compares, "success": success, "failure": failure}, key, deadline)

    # -- the exactly-once write loop -----------------------------------------------------------
    def _mutate(self, key: bytes, plan: _Plan) -> Any:
        deadline = self._deadline()
        op_key = b64(self._op_key)
        with self._write_lock:
            self._op_seq += 1
            seq = self._op_seq
            results: dict[str, Any] = {}
            step: _Attempt | _Done = plan(None)
            attempt_no = 0
            while isinstance(step, _Attempt):
                attempt_no += 1
                if step.size > self._max_request:
                    raise EtcdRequestTooLargeError(
                        f"write of {step.size} bytes is over etcd's request limit ({self._max_request} bytes); nothing written",
                        self._client.describe(),
                        key,
                    )
                tag = f"{seq}.{attempt_no}"
                results[tag] = step.result
                compares = [{"target": "MOD", "key": op_key, "result": "EQUAL", "mod_revision": self._op_mod}]
                reply = self._txn(
                    compares + step.compares,
                    step.success + [{"request_put": {"key": op_key, "value": b64(tag.encode())}}],
                    [{"request_range": {"key": op_key}}] + step.failure,
                    key,
                    deadline,
                )
                if reply.get("succeeded"):
                    self._op_mod = reply["header"]["revision"]
                    if step.remember is not None:
                        if len(self._recent) > 1024:
                            self._recent.clear()
                        full, value = step.remember
                        self._recent[full] = {"mod_revision": self._op_mod, "value": b64(value)}
                    return step.result
                responses = reply.get("responses", [])
                record = _first_kv(responses[0]) if responses else None
                record_mod = record["mod_revision"] if record else "0"
                if record_mod != self._op_mod:
                    # Our record moved: one of our writes was applied after all.
                    self._op_mod = record_mod
                    applied = unb64(record.get("value")).decode() if record else ""
                    if applied in results:
                        return results[applied]
                    # An earlier operation (reported as failed) landed late: try this one again.
                    step = plan(None)
                    continue
                step = plan(responses[1:])
            return step.result

    # -- writes --------------------------------------------------------------------------------
    def _set(self, key: bytes, value: bytes) -> None:
        full = self._k(key)
        attempt = _Attempt([], [_put(full, value)], size=len(full) + len(value))
        self._mutate(key, lambda _reads: attempt)

    def _multi_set(self, keys: list[bytes], values: list[bytes]) -> None:
        latest = dict(zip(keys, values))  # etcd refuses two puts of one key in a txn: last wins
        items = list(latest.items())
        per_txn = _TXN_OPS - 1
        chunks = [items[i : i + per_txn] for i in range(0, len(items), per_txn)]
        attempts = []
        for chunk in chunks:
            ops = [_put(self._k(k), v) for k, v in chunk]
            size = sum(len(k) + len(v) + len(self._prefix) + 2 for k, v in chunk)
            attempts.append((chunk[0][0], _Attempt([], ops, size=size)))
        for first_key, attempt in attempts:  # check every chunk's size before writing any
            if attempt.size > self._max_request:
                raise EtcdRequestTooLargeError(
                    f"multi_set of {attempt.size} bytes is over etcd's request limit ({self._max_request} bytes); nothing written",
                    self._client.describe(),
                    first_key,
                )
        for first_key, attempt in attempts:
            self._mutate(first_key, lambda _reads, a=attempt: a)  # type: ignore[misc]

    def _add(self, key: bytes, amount: int) -> int:
        full = self._k(key)

        def plan(reads: list[dict[str, Any]] | None) -> _Attempt:
            kv = _first_kv(reads[0]) if reads else self._recent.get(full)
            base = 0
            if kv is not None:
                old = unb64(kv.get("value"))
                try:
                    base = parse_int64(old)
                except ValueError as exc:
                    if reads:  # etcd's own value: the error is real
                        raise ValueError(f"add on key {format_keys([key])}: stored value is {exc}") from None
                    # Only our remembered value (an append's, or since deleted or overwritten):
                    # guess "absent" instead; the guard fails if it is not, and the read follows.
                    kv = None
            total = int64(base + amount)
            new = str(total).encode()
            return _Attempt([_guard_state(full, kv)], [_put(full, new)], [_range(full)], total, remember=(full, new))

        result: int = self._mutate(key, plan)
        return result

    def _append(self, key: bytes, value: bytes) -> None:
        full = self._k(key)

        def plan(reads: list[dict[str, Any]] | None) -> _Attempt:
            kv = _first_kv(reads[0]) if reads else self._recent.get(full)
            new = (unb64(kv.get("value")) if kv else b"") + value
            return _Attempt([_guard_state(full, kv)], [_put(full, new)], [_range(full)], None, len(full) + len(new), remember=(full, new))

        self._mutate(key, plan)

    def _compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        full = self._k(key)
        size = len(full) + len(expected) + len(desired)

        def plan(reads: list[dict[str, Any]] | None) -> _Attempt | _Done:
            if reads is None:
                # First try in one round trip: "equal to expected" (false on a missing key,
                # etcd-v3.md §2.4), or "absent" for an empty expected.
                if expected:
                    guard = {"target": "VALUE", "key": b64(full), "result": "EQUAL", "value": b64(expected)}
                else:
                    guard = _guard_state(full, None)
                return _Attempt([guard], [_put(full, desired)], [_range(full)], desired, size)
            kv = _first_kv(reads[0])
            if kv is None:
                if expected:
                    return _Done(expected)  # torch's rule: nothing stored, "expected" returned
                return _Attempt([_guard_state(full, None)], [_put(full, desired)], [_range(full)], desired, size)
            current = unb64(kv.get("value"))
            if current != expected:
                return _Done(current)
            return _Attempt([_guard_state(full, kv)], [_put(full, desired)], [_range(full)], desired, size)

        result: bytes = self._mutate(key, plan)
        return result

    def _delete_key(self, key: bytes) -> bool:
        full = b64(self._k(key))
        exists = {"target": "VERSION", "key": full, "result": "GREATER", "version": "0"}
        attempt = _Attempt([exists], [{"request_delete_range": {"key": full}}], [], True)
        result: bool = self._mutate(key, lambda reads: attempt if reads is None else _Done(False))
        return result

    def _queue_push(self, key: bytes, value: bytes) -> None:
        item = self._q(key) + f"{self._id}-{next(self._queue_seq):016d}".encode()
        attempt = _Attempt([], [_put(item, value)], size=len(item) + len(value))
        self._mutate(key, lambda _reads: attempt)

    # -- reads ---------------------------------------------------------------------------------
    def _exists_ops(self, keys: list[bytes], queues: bool) -> list[dict[str, Any]]:
        ops = []
        for k in keys:
            ops.append({"request_range": {"key": b64(self._k(k)), "count_only": True}})
            if queues:
                q = self._q(k)
                ops.append({"request_range": {"key": b64(q), "range_end": b64(prefix_end(q)), "count_only": True}})
        return ops

    def _missing(self, keys: list[bytes], queues: bool, deadline: float | None = None) -> tuple[list[bytes], int]:
        """Which keys do not exist (a non-empty queue counts when ``queues``), and the revision."""
        missing: list[bytes] = []
        revision = 0
        per_txn = _TXN_OPS // 2 if queues else _TXN_OPS
        unique = list(dict.fromkeys(keys))
        for i in range(0, max(len(unique), 1), per_txn):
            chunk = unique[i : i + per_txn]
            reply = self._txn([], self._exists_ops(chunk, queues), [], chunk[0] if chunk else None, deadline)
            revision = max(revision, int(reply["header"]["revision"]))
            counts = [int(r.get("response_range", {}).get("count", "0")) for r in reply.get("responses", [])]
            step = 2 if queues else 1
            for j, k in enumerate(chunk):
                if not any(counts[j * step : (j + 1) * step]):
                    missing.append(k)
        return missing, revision

    def _check(self, keys: list[bytes]) -> bool:
        return not self._missing(keys, queues=True)[0]

    def _num_keys(self) -> int:
        start = self._prefix + b"k/"
        reply = self._call("kv/range", {"key": b64(start), "range_end": b64(prefix_end(start)), "count_only": True}, None)
        return int(reply.get("count", "0"))

    def _list_keys(self) -> list[bytes]:
        start = self._prefix + b"k/"
        end = b64(prefix_end(start))
        keys: list[bytes] = []
        body: dict[str, Any] = {"key": b64(start), "range_end": end, "keys_only": True, "limit": 1000}
        deadline = self._deadline()
        while True:
            reply = self._call("kv/range", body, None, deadline)
            kvs = reply.get("kvs", [])
            keys.extend(unb64(kv["key"])[len(start) :] for kv in kvs)
            if not reply.get("more") or not kvs:
                return keys
            body["key"] = b64(unb64(kvs[-1]["key"]) + b"\0")
            body["revision"] = reply["header"]["revision"]

    def _queue_len(self, key: bytes) -> int:
        q = self._q(key)
        reply = self._call("kv/range", {"key": b64(q), "range_end": b64(prefix_end(q)), "count_only": True}, key)
        return int(reply.get("count", "0"))

    # -- blocking reads ------------------------------------------------------------------------
    def _wait_deadline(self, timeout: float) -> float:
        return time.monotonic() + max(timeout, 0.0)

    def _wait(self, keys: list[bytes], timeout: float) -> None:
        self._block(keys, queues=True, timeout=timeout)

    def _get(self, key: bytes, timeout: float) -> bytes:
        return self._multi_get([key], timeout)[0]

    def _multi_get(self, keys: list[bytes], timeout: float) -> list[bytes]:
        start = time.monotonic()
        first = True
        while True:
            if not first:
                left = timeout - (time.monotonic() - start)
                self._block(keys, queues=False, timeout=left if timeout > 0 else timeout, full_timeout=timeout)
            first = False
            values: list[bytes] = []
            for i in range(0, len(keys), _TXN_OPS):
                chunk = keys[i : i + _TXN_OPS]
                reply = self._txn([], [_range(self._k(k)) for k in chunk], [], chunk[0])
                for r in reply.get("responses", []):
                    kv = _first_kv(r)
                    if kv is None:
                        break
                    values.append(unb64(kv.get("value")))
            if len(values) == len(keys):
                return values
            # Missing (first read), or deleted between the wait and the read: wait for it.

    def _block(self, keys: list[bytes], queues: bool, timeout: float, full_timeout: float | None = None) -> None:
        """Return once every key exists; raise StoreTimeoutError after ``timeout`` seconds."""
        reported = timeout if full_timeout is None else full_timeout
        until = self._wait_deadline(timeout)
        while True:
            now = time.monotonic()
            # Reads get at least the attempt bound, so a short wait still fails over once.
            read_deadline = max(until, now + min(self._client.attempt_timeout, reply_bound(self._timeout_s)))
            missing, revision = self._missing(keys, queues, read_deadline)
            if not missing:
                return
            if time.monotonic() >= until:
                raise wait_timeout(missing, reported, f"EtcdStore {self._client.describe()}")
            try:
                if self._watch_for(missing, queues, revision, until):
                    return
            except EtcdCompactedError:
                pass  # the read below starts over from the current revision
            except EtcdUnavailableError:
                if time.monotonic() >= until:
                    raise
            # silence, a broken stream or compaction: re-read and watch again

    def _watch_for(self, keys: list[bytes], queues: bool, revision: int, until: float) -> bool:
        """Watch ``keys`` from ``revision + 1``; True once all exist, False on silence/deadline."""
        requests: list[dict[str, Any]] = []
        index: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            full = self._k(k)
            index[full] = i
            requests.append({"key": b64(full), "start_revision": str(revision + 1)})
            if queues:
                q = self._q(k)
                requests.append({"key": b64(q), "range_end": b64(prefix_end(q)), "start_revision": str(revision + 1)})
        queue_prefixes = {self._q(k): i for i, k in enumerate(keys)} if queues else {}
        present = [False] * len(keys)
        queued = [0] * len(keys)
        watch = self._client.watch(requests, deadline=min(until, time.monotonic() + self._client.attempt_timeout), key=keys[0])
        try:
            while True:
                silent_until = min(until, time.monotonic() + self._watch_refresh)
                got_any = False
                for msg in watch.messages(silent_until):
                    got_any = True
                    for event in msg.get("events", ()):
                        name = unb64(event["kv"]["key"])
                        deleted = event.get("type") == "DELETE"
                        if name in index:
                            present[index[name]] = not deleted
                        else:
                            for qp, i in queue_prefixes.items():
                                if name.startswith(qp):
                                    queued[i] += -1 if deleted else 1
                                    break
                    if all(p or q > 0 for p, q in zip(present, queued)):
                        return True
                    break  # re-arm the silence timer
                if not got_any:
                    return False
        finally:
            watch.close()

    def _queue_pop(self, key: bytes, block: bool, timeout: float) -> bytes:
        q = self._q(key)
        until = self._wait_deadline(timeout)
        while True:
            reply = self._call(
                "kv/range",
                {"key": b64(q), "range_end": b64(prefix_end(q)), "limit": 1, "sort_order": "ASCEND", "sort_target": "CREATE"},
                key,
            )
            kvs = reply.get("kvs")
            if kvs:
                head = kvs[0]
                item = unb64(head["key"])
                value = unb64(head.get("value"))
                guard = {"target": "MOD", "key": head["key"], "result": "EQUAL", "mod_revision": head["mod_revision"]}
                attempt = _Attempt([guard], [{"request_delete_range": {"key": b64(item)}}], [], value)
                popped = self._mutate(key, lambda reads: attempt if reads is None else _Done(None))
                if popped is not None:
                    result: bytes = popped
                    return result
                continue  # another popper won this item: look again
            if not block:
                raise queue_empty(key, f"EtcdStore {self._client.describe()}")
            if time.monotonic() >= until:
                raise wait_timeout([key], timeout, f"EtcdStore {self._client.describe()}")
            try:
                self._watch_for([key], True, int(reply["header"]["revision"]), until)
            except (EtcdCompactedError, EtcdUnavailableError):
                if time.monotonic() >= until:
                    raise

