"""A small etcd v3 client over the JSON gateway, standard library only.

etcd 3.4 serves its gRPC API as JSON too (``POST /v3/<service>/<method>``): keys and
values are base64, int64s come back as strings, and zero/false/empty fields are omitted
(``../shared/reference/etcd-v3.md`` §2). :class:`EtcdClient` does the transport and
nothing else: endpoint rotation within one deadline, per-attempt timeouts, password auth
(token re-acquired on expiry), TLS, and error mapping. The store semantics live in
:mod:`rdzv_store.etcdstore`; the rendezvous backend in :mod:`rdzv_backend.etcd`.

Failover rules (reference §5.2): every call carries ``Grpc-Metadata-Hasleader: true`` (a
member that knows it has no leader answers at once instead of after 7 s); an attempt is
bounded by ``attempt_timeout`` (default 2 s, twice etcd's election timeout); connection
errors, timeouts and "unavailable" replies move the call to the next endpoint, until the
call's deadline. Only linearizable reads are issued: a partitioned member cannot answer
them, so it never serves a stale value.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import StoreAuthError, StoreConnectionError, StoreError, format_keys

__all__ = [
    "EtcdClient",
    "EtcdEndpoint",
    "EtcdError",
    "EtcdUnavailableError",
    "EtcdNoLeaderError",
    "EtcdAuthError",
    "EtcdRequestTooLargeError",
    "EtcdCompactedError",
    "Watch",
    "CallReport",
    "b64",
    "unb64",
    "prefix_end",
    "DEFAULT_ATTEMPT_TIMEOUT",
    "MAX_REQUEST_BYTES",
]

logger = logging.getLogger(__name__)

#: Per-attempt bound (seconds): about twice etcd's default election timeout (reference §5.2).
DEFAULT_ATTEMPT_TIMEOUT = 2.0
#: etcd's default ``--max-request-bytes``.
MAX_REQUEST_BYTES = 1572864


# -- errors -----------------------------------------------------------------------------------
class EtcdError(StoreError):
    """An etcd call failed. ``endpoint``, ``key`` and ``cause`` say where, on what and why."""

    def __init__(self, cause: str, endpoint: str = "", key: bytes | None = None) -> None:
        self.cause = cause
        self.endpoint = endpoint
        self.key = key
        details = []
        if key is not None:
            details.append(f"key {format_keys([key])}")
        if endpoint:
            details.append(f"etcd {endpoint}")
        super().__init__(cause + (f" ({', '.join(details)})" if details else ""))


class EtcdUnavailableError(EtcdError, StoreConnectionError):
    """No endpoint answered within the call's deadline (down, partitioned, refusing)."""


class EtcdNoLeaderError(EtcdUnavailableError):
    """The members that answered have no leader (the cluster lost quorum)."""


class EtcdAuthError(EtcdError, StoreAuthError):
    """Authentication failed (wrong user/password, auth required) or permission was denied.
    Not retried: the next attempt would fail the same way."""


class EtcdRequestTooLargeError(EtcdError, ValueError):
    """The request is over etcd's request size limit (``--max-request-bytes``). Nothing was written."""


class EtcdCompactedError(EtcdError):
    """A watch or read asked for a revision etcd has already compacted away."""


# -- encoding helpers -------------------------------------------------------------------------
def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end)."""
    raw = bytearray(prefix)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # every key


@dataclass(frozen=True)
class EtcdEndpoint:
    """One member's client URL, parsed."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_scheme: str = "http", default_port: int = 2379) -> EtcdEndpoint:
        """``host``, ``host:port``, ``[v6]:port`` or ``http(s)://host:port``.

        Raises:
            ValueError: Not an endpoint, or a scheme other than http/https.
        """
        text = text.strip()
        if not text:
            raise ValueError("empty etcd endpoint")
        if "://" not in text:
            text = f"{default_scheme}://{text}"
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"etcd endpoint {text!r}: the protocol must be http or https")
        try:
            port = parts.port or default_port
        except ValueError as exc:
            raise ValueError(f"etcd endpoint {text!r}: bad port") from exc
        if not parts.hostname:
            raise ValueError(f"etcd endpoint {text!r}: no host")
        return cls(scheme, parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


class _Retry(Exception):
    """An attempt failed in a way another endpoint may not: rotate and try again."""

    def __init__(self, cause: str, no_leader: bool = False, tls_reset: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.no_leader = no_leader
        # A new TLS connection reset while its first request was out: a member going down does
        # that, and so does etcd refusing a missing or untrusted client certificate when its
        # close beats its TLS alert to us. Retried like any reset; named if it is the last error.
        self.tls_reset = tls_reset


@dataclass
class CallReport:
    """What happened inside one :meth:`EtcdClient.call` besides its reply (pass one in to learn it).

    ``uncertain`` turns true when an attempt failed after its request was (maybe partly) sent:
    connection reset, timeout or a broken reply. etcd may have applied that request, and the
    call's retry then ran against the changed data (a compare-and-set retried that way fails
    its compare against its own write). A caller that must know whether its write landed
    checks the data when this is set.
    """

    uncertain: bool = False


_RETRY_OS_ERRORS = (OSError, http.client.HTTPException, TimeoutError)


class EtcdClient:
    """A thread-safe etcd v3 gateway client over several endpoints.

    Args:
        endpoints: Client URLs or ``host[:port]`` (comma-separated string or sequence).
        timeout: Default deadline (seconds) of one call, across all endpoints and retries.
        attempt_timeout: Bound of one attempt on one endpoint.
        user, password: Optional etcd password authentication.
        ca_cert, cert, key: TLS files (CA bundle; client certificate and key). Any of
            them, or an ``https://`` endpoint, turns TLS on.
        protocol: Scheme for endpoints given without one (``http`` or ``https``).

    Raises:
        ValueError: No endpoint, a malformed one, or a key without a certificate.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout: float = 60.0,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        user: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        protocol: str | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        scheme = (protocol or ("https" if (ca_cert or cert) else "http")).strip().lower()
        self.endpoints = [EtcdEndpoint.parse(e, scheme) for e in endpoints]
        if not self.endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if key and not cert:
            raise ValueError("a TLS key needs its certificate (cert=)")
        self.timeout = float(timeout)
        self.attempt_timeout = float(attempt_timeout)
        self._user = user
        self._password = password
        self._tls_files = (ca_cert, cert, key)
        self._ssl: ssl.SSLContext | None = None
        if any(e.scheme == "https" for e in self.endpoints):
            ctx = ssl.create_default_context(cafile=ca_cert)
            if cert:
                ctx.load_cert_chain(cert, key)
            self._ssl = ctx
        self._lock = threading.Lock()
        self._idle: dict[int, list[http.client.HTTPConnection]] = {}
        self._current = 0
        self._token: str | None = None
        self._closed = False

    def options(self) -> dict[str, Any]:
        """The constructor arguments, to make an equivalent client (``clone``)."""
        ca_cert, cert, key = self._tls_files
        return {
            "endpoints": [str(e) for e in self.endpoints],
            "timeout": self.timeout,
            "attempt_timeout": self.attempt_timeout,
            "user": self._user,
            "password": self._password,
            "ca_cert": ca_cert,
            "cert": cert,
            "key": key,
        }

    def describe(self) -> str:
        return ",".join(str(e) for e in self.endpoints)

    # -- connections ------------------------------------------------------------------------
    def _connect(self, index: int, timeout: float) -> http.client.HTTPConnection:
        ep = self.endpoints[index]
        if ep.scheme == "https":
            return http.client.HTTPSConnection(ep.host, ep.port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)

    def _take(self, index: int, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """A pooled connection, or a new one (then the flag is True)."""
        with self._lock:
            idle = self._idle.get(index)
            conn = idle.pop() if idle else None
        if conn is None:
            conn = self._connect(index, timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn, True
        conn.sock.settimeout(timeout)
        return conn, False

    def _give_back(self, index: int, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed:
                pool = self._idle.setdefault(index, [])
                if len(pool) < 8:
                    pool.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        """Close pooled connections. Safe to call twice."""
        with self._lock:
            self._closed = True
            pools, self._idle = self._idle, {}
        for pool in pools.values():
            for conn in pool:
                conn.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Grpc-Metadata-Hasleader": "true"}
        if self._token:
            headers["Authorization"] = self._token
        return headers

    # -- one call, with failover ------------------------------------------------------------
    def call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        key: bytes | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
        report: CallReport | None = None,
    ) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` and return the decoded reply.

        Retries on the next endpoint after connection errors, attempt timeouts and
        "unavailable" replies, until ``deadline`` (monotonic) or ``timeout`` seconds.
        ``report``, when given, is told whether a failed attempt may have been applied.

        Raises:
            EtcdUnavailableError / EtcdNoLeaderError: Nothing answered in time.
            EtcdAuthError: Bad credentials or permission denied.
            EtcdRequestTooLargeError: The request is over etcd's limit.
            EtcdCompactedError: A compacted revision was asked for.
            EtcdError: Any other error etcd reported (the message is etcd's).
        """
        data = json.dumps(body, separators=(",", ":")).encode()
        if deadline is None:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self._with_failover(lambda i, t: self._post(i, path, data, key, t, report), key, deadline)

    def _with_failover(self, attempt: Any, key: bytes | None, deadline: float) -> Any:
        n = len(self.endpoints)
        tried = 0
        last: _Retry | None = None
        last_ep = ""
        saw_no_leader = False
        pause = 0.02
        reauthed = False
        # One member: nowhere to fail over to, so an attempt may take the whole deadline. Several:
        # the attempt bound doubles after each round of failures, so an overloaded (slow but
        # working) cluster is not hammered with aborted requests.
        bound = self.attempt_timeout if n > 1 else float("inf")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and tried:
                break
            index = self._current
            try:
                return attempt(index, max(0.05, min(bound, remaining)))
            except _NeedAuth:
                if reauthed or not self._user:
                    raise EtcdAuthError("etcd requires authentication", str(self.endpoints[index]), key) from None
                reauthed = True
                self._authenticate(index, deadline)
                continue
            except _Retry as exc:
                last, last_ep = exc, str(self.endpoints[index])
                saw_no_leader = saw_no_leader or exc.no_leader
                logger.debug("etcd %s: %s; trying the next endpoint", last_ep, exc.cause)
            tried += 1
            with self._lock:
                if self._current == index:
                    self._current = (index + 1) % n
            if tried % n == 0:
                # Every endpoint failed once: back off a little (an election takes ~1-2 s).
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                pause = min(pause * 2, 0.5)
                bound *= 2
        assert last is not None
        cause = f"no etcd endpoint answered in time, last error: {last.cause}"
        if last.tls_reset:
            cause += (
                " (a new TLS connection reset during its first request: a member going down, or etcd "
                "refusing a missing or untrusted client certificate; check cert= and key=)"
            )
        if saw_no_leader:
            # The members that answered had no leader; the others did not answer at all.
            raise EtcdNoLeaderError(
                f"etcd cluster has no leader (members that answered said so; last error: {last.cause}; tried {self.describe()})",
                last_ep,
                key,
            )
        raise EtcdUnavailableError(cause + f"; tried {self.describe()}", last_ep, key)

    def _post(
        self, index: int, path: str, data: bytes, key: bytes | None, timeout: float, report: CallReport | None = None
    ) -> dict[str, Any]:
        ep = str(self.endpoints[index])
        try:
            conn, fresh = self._take(index, timeout)
        except ssl.SSLError as exc:
            raise EtcdAuthError(f"TLS handshake failed: {exc}", ep, key) from None
        except _RETRY_OS_ERRORS as exc:
            raise _Retry(f"connect failed: {type(exc).__name__}: {exc}") from None
        try:
            conn.request("POST", "/v3/" + path, data, self._headers())
            resp = conn.getresponse()
            raw = resp.read()
        except ssl.SSLError as exc:
            conn.close()
            if fresh:  # TLS 1.3 reports a refused client certificate at the first read
                raise EtcdAuthError(
                    f"TLS refused by the server (client certificate missing or untrusted?): {exc}", ep, key
                ) from None
            if report is not None:
                report.uncertain = True
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        except _RETRY_OS_ERRORS as exc:
            conn.close()
            if report is not None:
                report.uncertain = True  # the request may have reached etcd and been applied
            tls_reset = fresh and self._ssl is not None and isinstance(exc, ConnectionResetError)
            raise _Retry(f"{type(exc).__name__}: {exc or 'timed out'}", tls_reset=tls_reset) from None
        if resp.will_close:
            conn.close()
        else:
            self._give_back(index, conn)
        try:
            return self._decode(resp.status, raw, ep, key)
        except _Retry as exc:
            if report is not None and not exc.no_leader:
                # "request timed out" and the like: a proposal etcd accepted may still be
                # applied (a member without a leader refuses before proposing anything).
                report.uncertain = True
            raise

    def _decode(self, status: int, raw: bytes, ep: str, key: bytes | None) -> dict[str, Any]:
        try:
            reply = json.loads(raw) if raw else {}
        except ValueError:
            reply = {"error": raw[:200].decode("utf-8", "replace")}
        if status == 200 and isinstance(reply, dict) and "error" not in reply:
            return reply
        raise_for_reply(status, reply, ep, key)
        raise AssertionError("unreachable")

    def _authenticate(self, index: int, deadline: float) -> None:
        body = json.dumps({"name": self._user, "password": self._password or ""}).encode()
        self._token = None

        def attempt(i: int, t: float) -> dict[str, Any]:
            return self._post(i, "auth/authenticate", body, None, t)

        reply = self._with_failover(attempt, None, deadline)
        token = reply.get("token")
        if not token:
            raise EtcdAuthError("etcd returned no auth token (is auth enabled?)", str(self.endpoints[index]))
        self._token = str(token)

    # -- streaming watch --------------------------------------------------------------------
    def watch(
        self, requests: Iterable[dict[str, Any]], *, deadline: float, key: bytes | None = None
    ) -> Watch:
        """Open one watch stream holding every ``create_request`` in ``requests``.

        Tries the endpoints in turn until one accepts the stream or ``deadline`` passes.

        Raises:
            The errors of :meth:`call`.
        """
        body = b"".join(
            json.dumps({"create_request": r}, separators=(",", ":")).encode() for r in requests
        )

        def attempt(index: int, t: float) -> Watch:
            ep = str(self.endpoints[index])
            try:
                conn = self._connect(index, t)
                conn.request("POST", "/v3/watch", body, self._headers())
                resp = conn.getresponse()
            except _RETRY_OS_ERRORS as exc:
                raise _Retry(f"watch: {type(exc).__name__}: {exc or 'timed out'}") from None
            if resp.status != 200:
                raw = resp.read()
                conn.close()
                self._decode(resp.status, raw, ep, key)
            return Watch(conn, resp, ep, key)

        if self._user and not self._token:
            self._authenticate(self._current, deadline)
        return self._with_failover(attempt, key, deadline)  # type: ignore[no-any-return]


class _NeedAuth(Exception):
    """The token is missing or expired: log in (again) and retry."""


def raise_for_reply(status: int, reply: Any, ep: str, key: bytes | None) -> None:
    """Map an etcd error reply to our exceptions (raises ``_Retry`` for retryable ones)."""
    if not isinstance(reply, dict):
        reply = {"error": str(reply)}
    err = reply.get("error")
    if isinstance(err, dict):  # the watch endpoint's other shape
        message = str(err.get("message", err))
        code = int(err.get("grpc_code", 0) or 0)
    else:
        message = str(reply.get("message") or err or f"HTTP {status}")
        code = int(reply.get("code", 0) or 0)
    lowered = message.lower()
    if "no leader" in lowered:
        raise _Retry(f"HTTP {status}: {message}", no_leader=True)
    if code == 16 or "invalid auth token" in lowered or "user name is empty" in lowered:
        raise _NeedAuth(message)
    if "authentication failed" in lowered or code == 7 or "permission denied" in lowered:
        raise EtcdAuthError(f"etcd refused: {message}", ep, key)
    if "too large" in lowered or "larger than max" in lowered:
        raise EtcdRequestTooLargeError(f"request over etcd's size limit: {message}", ep, key)
    if "compacted" in lowered:
        raise EtcdCompactedError(f"revision compacted: {message}", ep, key)
    if status in (500, 502, 503, 504) or code in (2, 4, 14):
        raise _Retry(f"HTTP {status}: {message}")
    raise EtcdError(f"etcd error (HTTP {status}, code {code}): {message}", ep, key)


class Watch:
    """One open watch stream (NDJSON lines). Close it to cancel."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, endpoint: str, key: bytes | None) -> None:
        self._conn = conn
        self._resp = resp
        self.endpoint = endpoint
        self._key = key

    def messages(self, until: float) -> Iterator[dict[str, Any]]:
        """Yield each ``result`` until ``until`` (monotonic); stops quietly at the deadline.

        Raises:
            EtcdCompactedError: The watch was cancelled because its start revision is compacted.
            EtcdAuthError: The watch was refused for lack of auth.
            _WatchBroken (an ``EtcdUnavailableError``): the stream ended or failed.
        """
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            try:
                sock = self._conn.sock
                if sock is not None:
                    sock.settimeout(remaining)
                line = self._resp.readline()
            except (socket.timeout, TimeoutError):
                return
            except _RETRY_OS_ERRORS as exc:
                raise WatchBroken(f"watch stream failed: {type(exc).__name__}: {exc}", self.endpoint, self._key) from None
            if not line:
                raise WatchBroken("watch stream ended", self.endpoint, self._key)
            try:
                msg = json.loads(line)
            except ValueError:
                raise WatchBroken(f"bad watch message {line[:100]!r}", self.endpoint, self._key) from None
            if "error" in msg:
                try:
                    raise_for_reply(503, msg, self.endpoint, self._key)
                except _Retry as exc:
                    raise WatchBroken(exc.cause, self.endpoint, self._key) from None
                except _NeedAuth as exc:
                    raise EtcdAuthError(f"watch refused: {exc}", self.endpoint, self._key) from None
            result = msg.get("result", {})
            if result.get("canceled"):
                if result.get("compact_revision"):
                    raise EtcdCompactedError(
                        f"watch start revision compacted (oldest kept: {result['compact_revision']})",
                        self.endpoint,
                        self._key,
                    )
                reason = str(result.get("cancel_reason", "watch cancelled"))
                if "user name is empty" in reason or "auth" in reason:
                    raise EtcdAuthError(f"watch refused: {reason}", self.endpoint, self._key)
                raise WatchBroken(f"watch cancelled: {reason}", self.endpoint, self._key)
            yield result

    def close(self) -> None:
        try:
            if self._conn.sock is not None:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()


class WatchBroken(EtcdUnavailableError):
    """A watch stream ended or failed (its member died or lost quorum): re-read and re-watch."""
