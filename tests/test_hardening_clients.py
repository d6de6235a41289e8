"""Issue 11, the clients: a refused request or a server restart does not kill a TCPStore or an
AsyncTCPStore (bug 2); a client without the secret fails at construction (bug 3); a cancelled
AsyncTCPStore call stays CancelledError, and the README's async example shuts down cleanly
(bug 5); connect retries say what they are doing."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from rdzv_store import AsyncTCPStore, StoreAuthError, StoreConnectionError, StoreTimeoutError, TCPStore
from rdzv_store import commands as cmd
from rdzv_store import retry
from rdzv_store.server import BackgroundServer, StoreServer

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s" * 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """``rdzv-store serve`` in a subprocess on a fixed port, restartable."""

    def __init__(self, port: int, *extra: str) -> None:
        self.port = port
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Serve:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rdzv_store", "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().strip() if ready else ""
        assert line == f"rdzv-store listening on 127.0.0.1 port {self.port}", line
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            assert self.proc.wait(10) == 0
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            assert self.proc.stdout is not None
            self.proc.stdout.close()


def init_count(store: TCPStore) -> int:
    return int(store._conn.call(cmd.get_raw(cmd.INIT_KEY)) or b"0")


# -- bug 2: a refused request ----------------------------------------------------------------
def test_refused_add_names_operation_key_and_reason_then_the_next_call_reconnects():
    with TCPStore("127.0.0.1", 0, is_master=True, world_size=1, timeout=10) as m:
        assert init_count(m) == 1
        m.set("k", "hello")
        with pytest.raises(StoreConnectionError) as info:
            m.add("k", 1)
        message = str(info.value)
        assert f"127.0.0.1:{m.port}" in message
        assert "add on key /k" in message and "not an integer" in message, message
        assert "reconnects" in message
        assert m.get("k") == b"hello"  # the next call reconnects, on the master too
        assert m.add("n", 2) == 2
        assert m._conn.reconnects == 1
        assert init_count(m) == 1  # the reconnect does not count the client in again


def test_worker_reconnects_without_counting_itself_again():
    with TCPStore("127.0.0.1", 0, is_master=True, world_size=2, timeout=10, wait_for_workers=False) as m:
        with TCPStore("127.0.0.1", m.port, world_size=2, timeout=10) as w:
            before = init_count(m)
            assert before == 1  # the worker only: a master with wait_for_workers=False does not count
            w.set("text", "x")
            with pytest.raises(StoreConnectionError, match="add on key /text"):
                w.add("text", 1)
            w.set("after", "1")  # a write without reply, on the new connection: not lost
            assert m.get("after") == b"1"
            assert init_count(w) == before and init_count(m) == before


def test_refused_request_reconnects_with_the_secret_check():
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=10, secret=SECRET) as m:
        with TCPStore("127.0.0.1", m.port, timeout=10, secret=SECRET) as c:
            c.set("k", "v")
            with pytest.raises(StoreConnectionError, match="add on key /k"):
                c.add("k", 1)
            assert c.get("k") == b"v" and c._conn.reconnects == 1


def test_earlier_write_without_reply_is_named_too():
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=10) as m:
        long_key = "k" * 9000  # over the server's 8 KiB key limit: refused, and SET has no reply
        m.set(long_key, "v")
        with pytest.raises(StoreConnectionError) as info:
            m.get("other")
        assert "earlier set on key /kkk" in str(info.value), str(info.value)
        m.set("small", "1")
        assert m.get("small") == b"1"


def test_close_still_ends_the_store_for_good():
    m = TCPStore("127.0.0.1", 0, is_master=True, timeout=5)
    m.set("k", "v")
    m._conn.close()
    with pytest.raises(StoreConnectionError, match="is closed"):
        m.get("k")
    m.close()


def test_server_restart_on_the_same_port_sync():
    port = free_port()
    with Serve(port) as server:
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.set("before", "1")
        assert store.get("before") == b"1"
        server.stop()
        server.start()
        store.set("after", "2")  # goes to the new server, not into the dead connection
        assert store.get("after") == b"2"
        assert store.check(["before"]) is False  # a new server: a new, empty store
        assert store._conn.reconnects == 1
        store.close()


def test_server_down_for_good_fails_within_the_timeout_naming_address_and_timeout():
    port = free_port()
    with Serve(port) as server:
        store = TCPStore("127.0.0.1", port, timeout=1.0)
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreConnectionError) as info:
            store.set("k", "v")
        assert time.monotonic() - started < 5
        assert f"(127.0.0.1, {port})" in str(info.value) and "1000ms" in str(info.value), str(info.value)
        store.close()


def test_async_refused_add_names_operation_then_reconnects():
    async def main() -> None:
        with BackgroundServerCtx() as port:
            async with AsyncTCPStore("127.0.0.1", port, timeout=10) as s:
                await s.set("k", "hello")
                with pytest.raises(StoreConnectionError) as info:
                    await s.add("k", 1)
                assert "add on key /k" in str(info.value) and "not an integer" in str(info.value)
                assert await s.get("k") == b"hello"
                assert await s.add("n", 5) == 5

    asyncio.run(main())


def test_async_server_restart_on_the_same_port():
    port = free_port()

    async def main(server: Serve) -> None:
        async with AsyncTCPStore("127.0.0.1", port, timeout=10) as s:
            await s.set("before", "1")
            await s.wait(["before"])  # leaves a pooled connection behind
            def restart() -> None:
                server.stop()
                server.start()

            await asyncio.get_running_loop().run_in_executor(None, restart)  # the loop keeps running
            await s.set("after", "2")
            assert await s.get("after") == b"2"
            await s.wait(["after"], 2)  # the dead pooled connection is not reused

    with Serve(port) as server:
        asyncio.run(main(server))


class BackgroundServerCtx:
    def __enter__(self) -> int:
        self.bg = BackgroundServer(StoreServer("127.0.0.1", 0))
        return self.bg.port

    def __exit__(self, *exc: object) -> None:
        self.bg.stop()


# -- bug 3: no secret against a server that requires one ------------------------------------
def test_sync_client_without_secret_fails_at_construction(caplog):
    caplog.set_level(logging.INFO, logger="rdzv_store")
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=10, secret=SECRET) as m:
        started = time.monotonic()
        with pytest.raises(StoreAuthError, match="requires a shared secret") as info:
            TCPStore("127.0.0.1", m.port, timeout=10)
        assert time.monotonic() - started < 5  # not retried to the timeout
        assert f"127.0.0.1:{m.port}" in str(info.value)
        with pytest.raises(StoreAuthError, match="requires a shared secret"):
            TCPStore("127.0.0.1", m.port, timeout=10, use_libuv=False)  # no probe: still detected
    assert not [r for r in caplog.records if "legacy" in r.getMessage()]


def test_async_client_without_secret_fails_at_connect(caplog):
    caplog.set_level(logging.INFO, logger="rdzv_store")

    async def main(port: int) -> None:
        with pytest.raises(StoreAuthError, match="requires a shared secret"):
            async with AsyncTCPStore("127.0.0.1", port, timeout=10):
                pass
        with pytest.raises(StoreAuthError, match="requires a shared secret"):
            await AsyncTCPStore("127.0.0.1", port, timeout=10, use_libuv=False).set("k", "v")

    with TCPStore("127.0.0.1", 0, is_master=True, timeout=10, secret=SECRET) as m:
        asyncio.run(main(m.port))
    assert not [r for r in caplog.records if "legacy" in r.getMessage()]


def test_server_allowing_torch_clients_still_serves_clients_without_secret():
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=10, secret=SECRET, allow_torch_clients=True) as m:
        with TCPStore("127.0.0.1", m.port, timeout=10) as c:
            c.set("k", "v")
            assert c.get("k") == b"v" and c._missing_get_is_empty

        async def main() -> None:
            async with AsyncTCPStore("127.0.0.1", m.port, timeout=10) as s:
                await s.set("a", "b")
                assert await s.get("a") == b"b"

        asyncio.run(main())


# -- bug 5: cancellation ---------------------------------------------------------------------
def test_cancelled_get_stays_cancelled_and_frees_its_pooled_connection():
    loop_errors: list[dict] = []

    async def main(port: int) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
        async with AsyncTCPStore("127.0.0.1", port, timeout=30) as s:
            tasks = [asyncio.ensure_future(s.get(f"never/{i}")) for i in range(4)]
            while len(s._busy) < 4:  # every get borrowed a pooled connection
                await asyncio.sleep(0)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results
            assert not s._busy and not s._idle  # closed, not pooled: a wait was pending on them
            await s.set("k", "v")  # the store carries on
            assert await s.get("k") == b"v"
        gc.collect()
        await asyncio.sleep(0)

    with BackgroundServerCtx() as port:
        asyncio.run(main(port))
    gc.collect()
    assert not loop_errors, loop_errors


def test_cancel_racing_a_close_stays_cancelled():
    """The 3.10/3.11 ``wait_for`` race: the task is cancelled just as its reply future fails
    (the store is closed). The call must end as CancelledError, not StoreConnectionError."""

    async def main(port: int) -> None:
        s = AsyncTCPStore("127.0.0.1", port, timeout=30)
        await s.connect()
        tasks = [asyncio.ensure_future(s.wait([f"never/{i}"], 0.01)) for i in range(4)]
        tasks += [asyncio.ensure_future(s.get(f"never/x{i}")) for i in range(4)]
        await asyncio.sleep(0.05)  # some are in the cancel exchange, some still waiting
        await s.close()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, (asyncio.CancelledError, StoreTimeoutError)) for r in results), results

    with BackgroundServerCtx() as port:
        asyncio.run(main(port))


def _readme_async_example() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("**asyncio**")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block is not None
    return block.group(1)


def _interpreters() -> list[str]:
    """This Python and every other supported CPython found (PATH or pyenv), each once."""
    found = [sys.executable]
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for version in ("3.10", "3.11", "3.12", "3.13"):
        if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
            continue
        candidates = [shutil.which(f"python{version}")]
        candidates += [str(p) for p in sorted(root.glob(f"{version}.*/bin/python"))] if root.is_dir() else []
        for path in candidates:
            if path is None:
                continue
            try:
                subprocess.run([path, "-c", "pass"], check=True, timeout=30, capture_output=True)
            except (OSError, subprocess.SubprocessError):
                continue  # e.g. a pyenv shim for a version that is not selected
            found.append(path)
            break
    return found


@pytest.mark.parametrize("python", _interpreters())
def test_readme_async_example_shuts_down_cleanly_when_a_key_never_appears(python):
    example = _readme_async_example()
    assert "timeout=30" in example
    example = example.replace("timeout=30", "timeout=0.3")  # a key that never appears: fail fast
    script = textwrap.dedent(
        """
        import asyncio
        from rdzv_store import TCPStore, StoreTimeoutError
        master = TCPStore("127.0.0.1", 0, is_master=True, timeout=10)
        port = master.port
        try:
        {example}
        except StoreTimeoutError as exc:
            print("timed out as expected:", exc)
        master.close()
        """
    ).format(example=textwrap.indent(example, "    "))
    for _ in range(3):  # the shutdown race is timing-dependent: give it a few chances
        done = subprocess.run(
            [python, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        assert "timed out as expected: wait timeout after 300ms, keys: /rank/" in done.stdout, done.stdout
        assert done.stderr == "", done.stderr


# -- connect retries say what they do -------------------------------------------------------
@pytest.fixture
def log_at_once(monkeypatch):
    """The first "still connecting" line comes after 1 s (then every 10 s): make it the first failure."""
    monkeypatch.setattr(retry, "_FIRST_LOG", 0.0)


def test_connect_retries_log_progress_and_the_error_names_address_and_timeout(caplog, log_at_once):
    caplog.set_level(logging.INFO, logger="rdzv_store.retry")
    port = free_port()  # nobody listens
    with pytest.raises(StoreConnectionError) as info:
        TCPStore("127.0.0.1", port, timeout=0.5)
    assert f"(127.0.0.1, {port})" in str(info.value) and "500ms" in str(info.value)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(re.match(rf"still connecting to 127\.0\.0\.1:{port}, attempt \d+, last error: .*refused", m) for m in lines), lines


def test_unresolvable_name_is_retried_and_the_log_says_so(caplog):
    caplog.set_level(logging.INFO, logger="rdzv_store.retry")
    host = "rdzv-store-no-such-pod.invalid"
    started = time.monotonic()
    with pytest.raises(StoreConnectionError) as info:
        TCPStore(host, 29500, timeout=1.0)
    assert time.monotonic() - started >= 0.9  # retried to the timeout, not failed at once
    assert "never resolved" in str(info.value) and host in str(info.value)
    assert any("does not resolve" in r.getMessage() and host in r.getMessage() for r in caplog.records)


def test_async_connect_retries_log_progress(caplog, log_at_once):
    caplog.set_level(logging.INFO, logger="rdzv_store.retry")
    port = free_port()

    async def main() -> None:
        with pytest.raises(StoreConnectionError, match=rf"\(127\.0\.0\.1, {port}\)"):
            await AsyncTCPStore("127.0.0.1", port, timeout=0.5).connect()

    asyncio.run(main())
    assert any(f"still connecting to 127.0.0.1:{port}" in r.getMessage() for r in caplog.records)
