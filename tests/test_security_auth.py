"""The optional shared-secret check (``rdzv_store.auth``) and what the server binds."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from reliability_helpers import CollectLog, background_server, ping, raw_client, recv_exactly, wait_closed

from rdzv_store import AsyncTCPStore, StoreConnectionError, TCPStore
from rdzv_store import auth
from rdzv_store import protocol as p
from rdzv_store.server import StoreServer

Q = p.QueryType
SECRET = b"correct horse battery staple"


def auth_get(secret: bytes, **kw) -> tuple[bytes, bytes]:
    key, proof = auth.client_request_key(secret, **kw)
    return p.encode_key(Q.GET, key), proof


def test_default_server_has_no_check_and_treats_the_auth_key_as_a_missing_key():
    with background_server() as bg:
        assert bg.server.auth is None
        sock = raw_client(bg.port)
        request, _ = auth_get(SECRET)
        sock.sendall(request + p.encode_bare(Q.GETNUMKEYS))
        assert recv_exactly(sock, 16) == p.reply_bytes(b"") + p.reply_i64(0)  # torch's answer
        sock.close()


def test_our_client_with_the_secret_works_and_clones_keep_it():
    with background_server(secret=SECRET) as bg:
        with TCPStore("127.0.0.1", bg.port, timeout=timedelta(seconds=5), secret=SECRET) as store:
            store.set("k", "v")
            with store.clone() as clone:
                assert clone.get("k") == b"v"


def test_wrong_secret_fails_at_once_with_one_log_line():
    with CollectLog() as logs, background_server(secret=SECRET) as bg:
        started = time.monotonic()
        with pytest.raises(auth.StoreAuthError, match=f"127.0.0.1:{bg.port}"):
            TCPStore("127.0.0.1", bg.port, timeout=timedelta(seconds=30), secret=b"x" * 16)
        assert time.monotonic() - started < 2  # not retried until the 30 s timeout
        lines = logs.warnings("shared-secret check failed: wrong secret")
        assert len(lines) == 1


def test_unauthenticated_torch_style_client_is_refused_unless_allowed():
    with CollectLog() as logs, background_server(secret=SECRET) as bg:
        sock = raw_client(bg.port)  # VALIDATE + PING, as torch sends: PING is answered
        sock.sendall(p.encode_key_value(Q.SET, b"/k", b"v"))
        assert wait_closed(sock, 5)
        lines = logs.warnings("before the shared-secret check")
        assert len(lines) == 1 and "allow_torch_clients" in lines[0]
        sock.close()
    with CollectLog() as logs, background_server(secret=SECRET, allow_torch_clients=True) as bg:
        sock = raw_client(bg.port)
        sock.sendall(p.encode_key_value(Q.SET, b"/k", b"v") + p.encode_key(Q.GET, b"/k"))
        assert recv_exactly(sock, 9) == p.reply_bytes(b"v")
        sock.close()
        with pytest.raises(auth.StoreAuthError):  # a wrong secret is still refused
            TCPStore("127.0.0.1", bg.port, timeout=timedelta(seconds=5), secret=b"y" * 16)
        with TCPStore("127.0.0.1", bg.port, timeout=timedelta(seconds=5), secret=SECRET) as store:
            assert store.get("k") == b"v"


def test_replayed_and_stale_checks_are_refused():
    with CollectLog() as logs, background_server(secret=SECRET) as bg:
        request, proof = auth_get(SECRET)
        first = raw_client(bg.port)
        first.sendall(request)
        assert recv_exactly(first, 8 + len(proof)) == p.reply_bytes(proof)
        replay = raw_client(bg.port)
        replay.sendall(request)  # the same bytes, captured and sent again
        assert wait_closed(replay, 5)
        stale_request, _ = auth_get(SECRET, now=time.time() - 3600)
        stale = raw_client(bg.port)
        stale.sendall(stale_request)
        assert wait_closed(stale, 5)
        assert len(logs.warnings("replayed nonce")) == 1
        assert len(logs.warnings("clock is 3600 s off")) == 1
        ping(first)
        for sock in (first, replay, stale):
            sock.close()


def test_a_secret_client_refuses_a_server_that_does_not_check():
    with background_server() as bg:
        with pytest.raises(auth.StoreAuthError, match="does not check shared secrets"):
            TCPStore("127.0.0.1", bg.port, timeout=timedelta(seconds=5), secret=SECRET)


def test_a_secret_client_refuses_a_server_with_another_secret():
    # The server's proof covers the client's fresh nonce: an impostor cannot reuse one.
    verifier = auth.AuthVerifier(b"z" * 16)
    key, expected = auth.client_request_key(SECRET)
    with pytest.raises(ValueError):
        verifier.verify(key)
    with pytest.raises(auth.StoreAuthError, match="does not know our shared secret"):
        auth.check_server_reply(b"rdzv-auth ok" + b"\0" * 32, expected, "h:1")


def test_the_secret_never_crosses_the_wire():
    """Record every byte our client sends to a fake server that plays along."""
    seen = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def fake_server() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while len(data) < 10 + 1 + 8 + len(auth.AUTH_PREFIX) + 56:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                seen.extend(data)
                conn.sendall(data[6:10] + p.reply_bytes(b""))  # PING echo, then "no check"

        thread = threading.Thread(target=fake_server)
        thread.start()
        with pytest.raises(auth.StoreAuthError):
            TCPStore("127.0.0.1", port, timeout=timedelta(seconds=5), secret=SECRET)
        thread.join(10)
    assert auth.AUTH_PREFIX in seen
    assert SECRET not in seen and SECRET[:8] not in seen


def test_secrets_must_be_long_enough():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        StoreServer("127.0.0.1", 0, secret=b"short")


def test_cli_secret_file(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv_store", "serve", "--host", "127.0.0.1", "--port", "0", "--secret-file", str(secret_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        port = int(line.rsplit(" ", 1)[1])
        with TCPStore("127.0.0.1", port, timeout=timedelta(seconds=5), secret=SECRET) as store:
            store.set("k", "v")
        with pytest.raises(StoreConnectionError):
            TCPStore("127.0.0.1", port, timeout=timedelta(seconds=5)).get("k")
        proc.terminate()
        assert proc.wait(10) == 0
        err = proc.stderr.read()
        assert "shared-secret check required" in err
        assert SECRET.decode() not in err
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


# -- binding -----------------------------------------------------------------------------------


def _listening_on(port: int) -> set[str]:
    """Local addresses with a listening socket on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(addr)
    return found


def test_server_binds_only_the_address_it_was_given():
    with background_server() as bg:
        assert [a[0] for a in bg.server.addresses] == ["127.0.0.1"]
        assert _listening_on(bg.port) == {"0100007F"}  # 127.0.0.1 only: not 0.0.0.0, not [::]
        if socket.has_ipv6:
            with pytest.raises(OSError), socket.create_connection(("::1", bg.port), timeout=2):
                pass


def test_server_on_localhost_binds_loopback_only():
    with _server_on("localhost") as server:
        hosts = {a[0] for a in server.addresses}
        assert hosts <= {"127.0.0.1", "::1"} and hosts
        assert "00000000" not in _listening_on(server.port)
        assert "00000000000000000000000000000000" not in _listening_on(server.port)


class _server_on:  # noqa: N801 - a context manager
    def __init__(self, host: str) -> None:
        from rdzv_store.server import BackgroundServer

        self.bg = BackgroundServer(StoreServer(host, 0))

    def __enter__(self) -> StoreServer:
        return self.bg.server

    def __exit__(self, *exc: object) -> None:
        self.bg.stop()


def test_async_client_with_the_secret_works_including_pooled_wait_connections():
    async def main(port: int) -> None:
        async with AsyncTCPStore("127.0.0.1", port, timeout=5, secret=SECRET) as store:
            await store.set("k", "v")
            waiter = asyncio.ensure_future(store.wait(["late"], 5))  # a pooled connection: checked too
            await store.set("late", "1")
            await asyncio.wait_for(waiter, 5)
            assert await store.get("k") == b"v"

    with background_server(secret=SECRET) as bg:
        asyncio.run(main(bg.port))


def test_async_client_wrong_or_missing_secret_is_refused():
    async def connect(port: int, secret: bytes | None) -> None:
        store = AsyncTCPStore("127.0.0.1", port, timeout=5, secret=secret)
        try:
            await store.connect()
            await store.add("n", 1)
        finally:
            await store.close()

    with background_server(secret=SECRET) as bg:
        with pytest.raises(auth.StoreAuthError):
            asyncio.run(connect(bg.port, b"z" * 16))
        with pytest.raises(StoreConnectionError):  # no secret: refused by this server
            asyncio.run(connect(bg.port, None))
    with background_server() as bg:  # a server that does not check: our secret-holding client refuses it
        with pytest.raises(auth.StoreAuthError, match="does not check shared secrets"):
            asyncio.run(connect(bg.port, SECRET))
