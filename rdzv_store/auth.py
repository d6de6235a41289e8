"""Optional shared-secret check between our clients and our server.

torch's TCPStore protocol has no authentication, and a default ``StoreServer``
(no secret) adds none: its bytes on the wire are torch's, byte for byte. With
a secret, the operator opts in, and the check rides on a request torch
already has, so nothing new is added to the protocol:

    client -> server   GET  key = "\\0rdzv-auth/1\\0" || nonce(16) || time_ms(u64 LE) || tag(32)
                            tag = HMAC-SHA256(secret, "rdzv-store client v1" || nonce || time_ms)
    server -> client   value = "rdzv-auth ok" || HMAC-SHA256(secret, "rdzv-store server v1" || nonce || time_ms)

Our client pipelines it right behind torch's VALIDATE and PING, so it costs
no extra round trip.

Why this shape. The protocol has no server-initiated message, so the server
cannot send a challenge first, and a textbook challenge/response is not
possible. Instead the client proves knowledge of the secret over a fresh nonce
and its clock: the server accepts a tag whose time is within ``MAX_SKEW_S`` of
its own and whose nonce it has not accepted before (it remembers accepted
nonces until they are too old to pass the time check, so a captured tag
cannot be replayed). The client's nonce *is* a challenge for the server, so the
reply proves the server knows the secret too (mutual authentication). The
secret itself never crosses the wire.

Compatibility. A key starting with a NUL byte is never produced by torch's
client (it prefixes every user key with "/", and its one raw key is "init/"),
so intercepting it cannot change what a torch client sees. Only a server
*with* a secret intercepts it; without a secret it is an ordinary GET of a
missing key, answered with an empty value, which our client reports as "this
server does not check secrets". A server with a secret refuses every request
other than VALIDATE, PING and this check on an unauthenticated connection,
unless the operator also passes ``allow_torch_clients=True``, in which case
connections that skip the check (torch clients) are served as usual and
the secret only rejects clients that present a *wrong* one.

What it is not: transport security. Traffic is not encrypted or
integrity-protected after the check, so someone who can read or inject
packets on the job's network can still read values or hijack a connection.
It keeps out processes that merely reach the port (another job, a scanner, a
misconfigured worker). Keep the port inside the job's network.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections import OrderedDict

from .errors import StoreAuthError

__all__ = [
    "AUTH_PREFIX",
    "MAX_SKEW_S",
    "StoreAuthError",
    "AuthVerifier",
    "client_request_key",
    "check_server_reply",
    "secret_required",
    "load_secret",
    "coerce_secret",
]

AUTH_PREFIX = b"\x00rdzv-auth/1\x00"
MAX_SKEW_S = 300.0
_NONCE = 16
_TAG = 32
_TIME = struct.Struct("<Q")
_CLIENT = b"rdzv-store client v1"
_SERVER = b"rdzv-store server v1"
_OK = b"rdzv-auth ok"
_KEY_LEN = len(AUTH_PREFIX) + _NONCE + _TIME.size + _TAG
MIN_SECRET = 16


def coerce_secret(secret: bytes | str | None) -> bytes | None:
    if secret is None:
        return None
    data = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(data) < MIN_SECRET:
        raise ValueError(f"a shared secret must have at least {MIN_SECRET} bytes (got {len(data)})")
    return data


def load_secret(path: str) -> bytes:
    """Read a secret file (one trailing newline is ignored)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.endswith(b"\n"):
        data = data[:-1]
    secret = coerce_secret(data)
    assert secret is not None
    return secret


def _mac(secret: bytes, label: bytes, nonce: bytes, stamp: bytes) -> bytes:
    return hmac.new(secret, label + nonce + stamp, hashlib.sha256).digest()


def client_request_key(secret: bytes, now: float | None = None) -> tuple[bytes, bytes]:
    """The raw key of the client's authentication GET, and the server proof to expect."""
    nonce = os.urandom(_NONCE)
    stamp = _TIME.pack(int((time.time() if now is None else now) * 1000))
    key = AUTH_PREFIX + nonce + stamp + _mac(secret, _CLIENT, nonce, stamp)
    return key, _OK + _mac(secret, _SERVER, nonce, stamp)


def secret_required(address: str) -> str:
    """The message for a client without a secret whose server requires one."""
    return (
        f"the store at {address} requires a shared secret: it answered the handshake, then closed the "
        "connection at the first request, as a server started with a secret (--secret-file) does for "
        "clients without one. Pass the same secret (TCPStore(..., secret=...), "
        "AsyncTCPStore(..., secret=...)), or ask the operator to allow clients without it"
    )


def check_server_reply(reply: bytes, expected: bytes, address: str) -> None:
    """Check the server's answer to our secret check.

    Raises:
        StoreAuthError: the server does not check secrets (empty reply) or its proof is wrong.
    """
    if reply == b"":
        raise StoreAuthError(
            f"the store at {address} does not check shared secrets (a server started without one, "
            "or torch's): refusing to use it while a secret is configured"
        )
    if not hmac.compare_digest(reply, expected):
        raise StoreAuthError(f"the store at {address} does not know our shared secret (its proof is wrong)")


class AuthVerifier:
    """Server side: check a client's key, remember accepted nonces, build the proof."""

    def __init__(self, secret: bytes, allow_torch_clients: bool = False, max_skew: float = MAX_SKEW_S) -> None:
        self._secret = secret
        self.allow_torch_clients = allow_torch_clients
        self.max_skew = max_skew
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> monotonic expiry

    @staticmethod
    def is_auth_key(key: bytes) -> bool:
        return key.startswith(AUTH_PREFIX)

    def verify(self, key: bytes, now: float | None = None) -> bytes:
        """Return the reply value for a valid key; raise ``ValueError`` (with the reason) otherwise."""
        if len(key) != _KEY_LEN:
            raise ValueError("malformed shared-secret check")
        body = key[len(AUTH_PREFIX) :]
        nonce, stamp, tag = body[:_NONCE], body[_NONCE : _NONCE + _TIME.size], body[_NONCE + _TIME.size :]
        if not hmac.compare_digest(tag, _mac(self._secret, _CLIENT, nonce, stamp)):
            raise ValueError("shared-secret check failed: wrong secret")
        wall = time.time() if now is None else now
        skew = abs(wall - _TIME.unpack(stamp)[0] / 1000)
        if skew > self.max_skew:
            raise ValueError(f"shared-secret check failed: client clock is {skew:.0f} s off (limit {self.max_skew:g} s)")
        mono = time.monotonic()
        while self._seen:  # forget nonces too old to pass the time check anyway
            oldest, expiry = next(iter(self._seen.items()))
            if expiry > mono:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            raise ValueError("shared-secret check failed: replayed nonce")
        self._seen[nonce] = mono + 2 * self.max_skew
        return _OK + _mac(self._secret, _SERVER, nonce, stamp)
