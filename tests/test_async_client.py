"""AsyncTCPStore against a StoreServer embedded in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from rdzv_store import AsyncTCPStore, StoreConnectionError, StoreServer, StoreTimeoutError, TCPStore


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@contextlib.asynccontextmanager
async def serving():
    """A StoreServer on this loop, closed afterwards even if the test fails."""
    server = StoreServer("127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def eventually(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def test_many_concurrent_waits_on_one_loop():
    async def main():
        async with serving() as server, AsyncTCPStore("127.0.0.1", server.port, timeout=10) as store:
            getters = [asyncio.create_task(store.get(f"k{i}")) for i in range(100)]
            await eventually(lambda: server.engine.pending_waiters() == 100)
            await store.multi_set([f"k{i}" for i in range(100)], [str(i) for i in range(100)])
            assert await asyncio.gather(*getters) == [str(i).encode() for i in range(100)]

    run(main())


def test_pipelined_adds_from_many_tasks_total_correctly():
    async def main():
        async with serving() as server, AsyncTCPStore("127.0.0.1", server.port, timeout=10) as store:
            results = await asyncio.gather(*(store.add("n", 1) for _ in range(500)))
            assert sorted(results) == list(range(1, 501))

    run(main())


def test_a_set_is_visible_to_the_next_wait():
    # set has no reply and the wait goes out on another connection: the client must flush first.
    async def main():
        async with serving() as server, AsyncTCPStore("127.0.0.1", server.port, timeout=10) as store:
            for i in range(200):
                await store.set(f"s{i}", "x")
                await store.wait([f"s{i}"], timeout=5)

    run(main())


def test_wait_timeout_cancels_on_the_server_and_names_keys():
    async def main():
        async with serving() as server, AsyncTCPStore("127.0.0.1", server.port, timeout=10) as store:
            with pytest.raises(StoreTimeoutError, match=rf"^wait timeout after 100ms, keys: /nope \(TCPStore at 127.0.0.1:{server.port}\)"):
                await store.wait(["nope"], 0.1)
            assert server.engine.pending_waiters() == 0
            await store.set("after", "1")
            assert await store.get("after") == b"1"

    run(main())


def test_cancelled_wait_task_drops_its_server_registration():
    async def main():
        async with serving() as server, AsyncTCPStore("127.0.0.1", server.port, timeout=10) as store:
            task = asyncio.create_task(store.wait(["never"], 30))
            await eventually(lambda: server.engine.pending_waiters() == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await eventually(lambda: server.engine.pending_waiters() == 0)

    run(main())


def test_server_close_fails_blocked_waits_at_once_naming_the_address():
    async def main():
        server = StoreServer("127.0.0.1", 0)
        await server.start()
        store = await AsyncTCPStore("127.0.0.1", server.port, timeout=30).connect()
        task = asyncio.create_task(store.wait(["forever"]))
        await eventually(lambda: server.engine.pending_waiters() == 1)
        await server.close()
        with pytest.raises(StoreConnectionError, match=f"127.0.0.1:{server.port}"):
            await asyncio.wait_for(task, 5)
        await store.close()

    run(main())


def test_async_and_sync_clients_share_keys_and_barriers():
    async def main():
        server = StoreServer("127.0.0.1", 0)
        await server.start()
        sync = await asyncio.to_thread(TCPStore, "127.0.0.1", server.port, timeout=10)
        async with AsyncTCPStore("127.0.0.1", server.port, timeout=10) as store:
            await store.set("from-async", b"\x01")
            await store.check(["from-async"])
            assert await asyncio.to_thread(sync.get, "from-async") == b"\x01"
            await asyncio.gather(store.barrier("b", 2, 10), asyncio.to_thread(sync.barrier, "b", 2, 10))
            await asyncio.to_thread(sync.queue_push, "q", "job")
            assert await store.queue_pop("q") == b"job"
            assert sorted(await store.list_keys()) == ["b", "from-async"]
        await asyncio.to_thread(sync.close)
        await server.close()

    run(main())


def test_connect_failure_names_the_address():
    async def main():
        server = StoreServer("127.0.0.1", 0)
        await server.start()
        port = server.port
        await server.close()
        with pytest.raises(StoreConnectionError, match=rf"connect to \(127.0.0.1, {port}\)"):
            await AsyncTCPStore("127.0.0.1", port, timeout=0.3).connect()

    run(main())
