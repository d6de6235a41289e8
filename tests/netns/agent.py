"""A client host's agent for the namespace tier: run inside a namespace with ``ip netns exec``.

Reads JSON commands from stdin, one per line, and answers each with one JSON line carrying
the command's ``id``. Commands with ``"bg": true`` run on their own thread (a blocked wait
must not block the agent); the answer comes when they finish. The agent exits at once
(``os._exit``) when stdin closes, whatever is still blocked.

Commands: ``open`` (kind ``tcp`` | ``async`` | ``torch``), ``call`` (a store method),
``close``, ``bench`` (round-trip latencies of ``add``), ``load`` (start/stop background
traffic), ``proxy`` (start a ``FaultProxy`` here / call one of its methods).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

_out = threading.Lock()
stores: dict[str, Any] = {}
proxies: dict[str, Any] = {}
loads: dict[str, tuple[threading.Event, list[threading.Thread], list[int]]] = {}


def emit(obj: dict[str, Any]) -> None:
    with _out:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


class AsyncFacade:
    """An AsyncTCPStore on its own loop thread, called like a blocking store."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        from rdzv_store import AsyncTCPStore

        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self.store = AsyncTCPStore(host, port, timeout=timeout)
        self._run(self.store.connect())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(120)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        return lambda *args: self._run(method(*args))


def open_store(kind: str, host: str, port: int, timeout: float) -> Any:
    if kind == "tcp":
        from rdzv_store import TCPStore

        return TCPStore(host, port, timeout=timeout)
    if kind == "async":
        return AsyncFacade(host, port, timeout)
    if kind == "torch":
        import torch.distributed as dist

        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout), wait_for_workers=False)
    raise ValueError(f"unknown client kind {kind!r}")


def decode_arg(arg: Any) -> Any:
    if isinstance(arg, dict) and "seconds" in arg:
        return timedelta(seconds=arg["seconds"])
    return arg


def encode_result(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    if isinstance(value, list):
        return [encode_result(v) for v in value]
    return value


def stats_ms(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1000
    return {"n": len(samples), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": samples[-1] * 1000}


def load_loop(store: Any, stop: threading.Event, counter: list[int], i: int) -> None:
    while not stop.is_set():
        try:
            store.add(f"load/{i}", 1)
            counter[i] += 1
        except Exception:  # noqa: BLE001 - load ends at the first error
            return


def handle(cmd: dict[str, Any]) -> Any:
    op = cmd["cmd"]
    if op == "open":
        host, port = cmd["host"], cmd["port"]
        if cmd.get("via"):
            host, port = "127.0.0.1", proxies[cmd["via"]].port
        stores[cmd["name"]] = open_store(cmd["kind"], host, port, cmd["timeout"])
        return {"address": f"{host}:{port}"}
    if op == "call":
        store = stores[cmd["name"]]
        return encode_result(getattr(store, cmd["method"])(*[decode_arg(a) for a in cmd.get("args", [])]))
    if op == "close":
        store = stores.pop(cmd["name"])
        close = getattr(store, "close", None)
        if close is not None:
            close()
        return None
    if op == "bench":
        store = stores[cmd["name"]]
        samples = []
        for _ in range(cmd["n"]):
            started = time.perf_counter()
            store.add("bench", 1)
            samples.append(time.perf_counter() - started)
        return stats_ms(samples)
    if op == "load":
        if cmd["action"] == "start":
            stop = threading.Event()
            counter = [0] * cmd["threads"]
            store_names = cmd["names"]
            threads = [
                threading.Thread(target=load_loop, args=(stores[store_names[i % len(store_names)]], stop, counter, i), daemon=True)
                for i in range(cmd["threads"])
            ]
            for t in threads:
                t.start()
            loads[cmd["load"]] = (stop, threads, counter)
            return None
        stop, threads, counter = loads.pop(cmd["load"])
        stop.set()
        for t in threads:
            t.join(10)
        return {"ops": sum(counter), "stuck": sum(t.is_alive() for t in threads)}
    if op == "proxy":
        if cmd["method"] == "start":
            from rdzv_store.testing import FaultProxy

            proxy = FaultProxy(*cmd["upstream"])
            proxies[cmd["name"]] = proxy
            return {"port": proxy.port}
        result = getattr(proxies[cmd["name"]], cmd["method"])(*cmd.get("args", []))
        return None if result is None else repr(result)
    raise ValueError(f"unknown command {op!r}")


def run(cmd: dict[str, Any]) -> None:
    started = time.monotonic()
    try:
        value = handle(cmd)
        reply = {"id": cmd["id"], "ok": True, "value": value}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        reply = {
            "id": cmd["id"],
            "ok": False,
            "error": type(exc).__name__,
            "error_mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc),
            "traceback": traceback.format_exc(limit=3),
        }
    reply["elapsed"] = time.monotonic() - started
    emit(reply)


def main() -> None:
    emit({"id": 0, "ok": True, "value": "ready"})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("bg"):
            threading.Thread(target=run, args=(cmd,), daemon=True).start()
        else:
            run(cmd)
    sys.stdout.flush()
    os._exit(0)  # blocked calls (a torch wait behind a cut link) must not keep us alive


if __name__ == "__main__":
    main()
