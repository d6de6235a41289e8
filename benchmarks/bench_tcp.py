"""TCPStore figures with one or a few clients: small-op latency, get, compare_set vs set+check, 8 clients.

"ours" = our client to our server, "torch" = torch's client to torch's
(libuv) server, each server a fresh process started for the figure.
Repetitions alternate the order of the two, so slow drift on the shared
2-core machine hits both alike.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from .common import Budget, close_client, make_client, server, summarize
from .workers import run_forked

KIB = 1024
MIB = 1024 * 1024

SMALL_OPS = ["set+check", "add", "compare_set", "check", "get"]
CPU_OPS = ["add", "check", "compare_set", "set+check"]
FLOORS = ["echo", "raw"]  # the bare asyncio servers of floor_servers.py
FLOOR = "raw"  # the one the round-trip figures alternate with the stores
# An op whose clients send a request without a reply first (SET), then one with a reply: the
# floor client sends the bytes before the last request's (measured on our wire) on their own.
LAST_SEND = {"set+check": "check"}


def _order(impls: list[str], rep: int) -> list[str]:
    return impls if rep % 2 == 0 else list(reversed(impls))


def _timed(fn: Any, budget: Budget) -> dict[str, float]:
    """Run ``fn`` under ``budget``; return ops/s and p50/p99 latency in µs."""
    samples = []
    clock = time.perf_counter_ns
    start = clock()
    for _ in budget.loop():
        t = clock()
        fn()
        samples.append(clock() - t)
    total = clock() - start
    samples.sort()
    n = len(samples)
    return {
        "ops_per_s": n / (total / 1e9),
        "p50_us": samples[n // 2] / 1e3,
        "p99_us": samples[min(n - 1, int(n * 0.99))] / 1e3,
        "ops": n,
    }


def _ops(store: Any, value: bytes, tag: str) -> dict[str, Any]:
    """The measured operations on ``store``; compare_set alternates two values so every call succeeds."""
    other = b"\x01" + value[1:] if value[:1] != b"\x01" else b"\x02" + value[1:]
    sc, cas, g, n = f"sc{tag}", f"cas{tag}", f"g{tag}", f"n{tag}"
    store.set(sc, value)
    store.set(cas, value)
    store.set(g, value)
    state = [value, other]

    def set_check() -> None:
        store.set(sc, value)
        store.check([sc])

    def compare_set() -> None:
        store.compare_set(cas, state[0], state[1])
        state.reverse()

    return {
        "set+check": set_check,
        "add": lambda: store.add(n, 1),
        "compare_set": compare_set,
        "check": lambda: store.check([sc]),
        "get": lambda: store.get(g),
    }


def _collect(raw: dict[str, dict[str, list[dict]]]) -> dict[str, Any]:
    """{impl: {op: [per-rep dicts]}} -> {op: {impl: {metric: summary}}}."""
    out: dict[str, Any] = {}
    for impl, per_op in raw.items():
        for op, reps in per_op.items():
            out.setdefault(op, {})[impl] = {
                metric: summarize([r[metric] for r in reps]) for metric in ("ops_per_s", "p50_us", "p99_us")
            }
    return out


def _floor_client(port: int, sizes: dict[str, tuple[int, int]], op: str) -> Any:
    """The floor's blocking client for ``op``, with the request and reply sizes of our wire."""
    from .floor_servers import FloorClient

    last = LAST_SEND.get(op)
    return FloorClient(port, *sizes[op], first=sizes[op][0] - sizes[last][0] if last else 0)


def _floor_timed(port: int, sizes: dict[str, tuple[int, int]], op: str, budget: Budget, warmup: int) -> dict[str, float]:
    """``_timed`` for the pure-Python floor: a blocking socket client and the ``raw`` floor server."""
    client = _floor_client(port, sizes, op)
    try:
        for _ in range(warmup):
            client.request()
        return _timed(client.request, budget)
    finally:
        client.close()


def small_ops(impls: list[str], reps: int, budget: Budget) -> dict[str, Any]:
    """Figures 1 and 2: sequential small ops and get, 1 KiB values, one client.

    With the stores, the round-trip floor of pure Python (``FLOOR``): a blocking-socket client
    and the ``raw`` floor server exchanging each operation's request and reply sizes as
    measured on our wire (set+check's SET sent on its own first, as the clients send it),
    alternated with the stores in every repetition.
    """
    value = bytes(range(256)) * 4
    kinds = [*impls, FLOOR]
    raw: dict[str, dict[str, list[dict]]] = {k: {op: [] for op in SMALL_OPS} for k in kinds}
    with contextlib.ExitStack() as stack:
        servers = {k: stack.enter_context(server(k)) for k in kinds}
        sizes = wire_sizes(servers["ours"].port, value, SMALL_OPS)
        for rep in range(reps):
            for impl in _order(kinds, rep):
                if impl == FLOOR:
                    for op in SMALL_OPS:
                        raw[impl][op].append(_floor_timed(servers[impl].port, sizes, op, budget,
                                                          min(50, budget.count)))
                    continue
                store = make_client(impl, servers[impl].port)
                try:
                    ops = _ops(store, value, str(rep))
                    for op in SMALL_OPS:
                        for _ in range(min(50, budget.count)):  # warm-up
                            ops[op]()
                        raw[impl][op].append(_timed(ops[op], budget))
                finally:
                    close_client(store)
    return _collect(raw)


def cas_sweep(impls: list[str], reps: int, sizes: list[int], budget: Budget) -> dict[str, Any]:
    """Figure 3: compare_set vs set+check by value size (p50 ms per op).

    The ``raw`` floor moves each operation's request and reply bytes (measured on our wire)
    through a blocking-socket client and the ``raw`` floor server: compare_set sends the
    expected and the desired value and gets one back, three times set's bytes, so its ratio
    is what any server over this loopback pays, alternated with the stores per repetition.
    """
    value_of = lambda size: (bytes(range(256)) * (size // 256 + 1))[:size]  # noqa: E731
    kinds = [*impls, FLOOR]
    raw: dict[str, dict[str, list[dict]]] = {k: {} for k in kinds}
    with contextlib.ExitStack() as stack:
        servers = {k: stack.enter_context(server(k)) for k in kinds}
        wire = {size: wire_sizes(servers["ours"].port, value_of(size), ["set+check", "compare_set", "check"], calls=2)
                for size in sizes}
        for rep in range(reps):
            for impl in _order(kinds, rep):
                if impl == FLOOR:
                    for size in sizes:
                        for op in ("set+check", "compare_set"):
                            raw[impl].setdefault(f"{op}@{size}", []).append(
                                _floor_timed(servers[impl].port, wire[size], op, budget, 1))
                    continue
                store = make_client(impl, servers[impl].port)
                try:
                    for size in sizes:
                        ops = _ops(store, value_of(size), f"{rep}_{size}")
                        for op in ("set+check", "compare_set"):
                            ops[op]()  # warm-up
                            raw[impl].setdefault(f"{op}@{size}", []).append(_timed(ops[op], budget))
                finally:
                    close_client(store)
    out: dict[str, Any] = {}
    for impl, per in raw.items():
        for name, reps_ in per.items():
            op, size = name.split("@")
            cell = out.setdefault(size, {}).setdefault(impl, {})
            cell[op] = summarize([r["p50_us"] / 1e3 for r in reps_])  # ms
        for size in out:
            cell = out[size].get(impl)
            if cell and "compare_set" in cell and cell["set+check"]["median"]:
                # the ratio per repetition, then its median
                ratios = [c["p50_us"] / s["p50_us"] for c, s in zip(per[f"compare_set@{size}"], per[f"set+check@{size}"])]
                cell["cas_over_set"] = summarize(ratios)
    return out


# -- 8 clients -------------------------------------------------------------------------------


def _client_loop(store: Any, key: str, value: bytes, go: Any, seconds: float) -> int:
    go.wait()
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        store.set(key, value)
        store.get(key)
        count += 2
    return count


def _proc_worker(index: int, ready: Any, go: Any, impl: str, port: int, value: bytes, seconds: float) -> int:
    store = make_client(impl, port)
    try:
        store.set(f"own{index}", value)
        ready.release()
        return _client_loop(store, f"own{index}", value, go, seconds)
    finally:
        close_client(store)


def _aggregate_threads(impl: str, port: int, clients: int, value: bytes, seconds: float) -> tuple[float, list[int]]:
    stores = [make_client(impl, port) for _ in range(clients)]
    go = threading.Event()
    counts = [0] * clients

    def run(i: int) -> None:
        counts[i] = _client_loop(stores[i], f"own{i}", value, go, seconds)

    try:
        for i, store in enumerate(stores):
            store.set(f"own{i}", value)
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        go.set()
        for t in threads:
            t.join(timeout=seconds + 30)
        elapsed = time.monotonic() - t0
    finally:
        go.set()
        for store in stores:
            close_client(store)
    return sum(counts) / elapsed, counts


def aggregate(impls: list[str], reps: int, clients: int, seconds: float) -> dict[str, Any]:
    """Figure 4: aggregate ops/s of ``clients`` clients looping set(own key, 1 KiB) + get(own key)."""
    value = bytes(range(256)) * 4
    raw: dict[str, dict[str, list[float]]] = {impl: {"threads": [], "processes": []} for impl in impls}
    fairness: dict[str, dict[str, list[float]]] = {impl: {"threads": [], "processes": []} for impl in impls}
    for rep in range(reps):
        for impl in _order(impls, rep):
            with server(impl) as srv:
                rate, counts = _aggregate_threads(impl, srv.port, clients, value, seconds)
                raw[impl]["threads"].append(rate)
                fairness[impl]["threads"].append(_fair(counts))
            with server(impl) as srv:
                t0, counts = run_forked(_proc_worker, clients, (impl, srv.port, value, seconds), timeout=seconds + 60)
                elapsed = time.monotonic() - t0
                ok = [c for c in counts if isinstance(c, int)]
                if len(ok) == clients:
                    # every worker ran exactly `seconds` after the common start
                    raw[impl]["processes"].append(sum(ok) / seconds)
                    fairness[impl]["processes"].append(_fair(ok))
                del elapsed
    out: dict[str, Any] = {}
    for impl in impls:
        for mode in ("threads", "processes"):
            out.setdefault(mode, {})[impl] = {
                "ops_per_s": summarize(raw[impl][mode]),
                "fairness_max_dev": summarize(fairness[impl][mode]),
            }
    return out


def _fair(counts: list[int]) -> float:
    """Largest relative deviation of one client's op count from the mean."""
    mean = sum(counts) / len(counts) if counts else 0
    return max(abs(c - mean) / mean for c in counts) if mean else 0.0


# -- server CPU per request ------------------------------------------------------------------


class _CountingProxy:
    """A one-connection loopback TCP proxy that counts the bytes each way (calibrates the floor)."""

    def __init__(self, upstream_port: int) -> None:
        import socket

        self.upstream_port = upstream_port
        self.up = self.down = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        import socket

        self.listener.settimeout(60)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server_ = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=60)
        for s in (client, server_):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(None)
        for src, dst, up in ((client, server_, True), (server_, client, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, up), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src: Any, dst: Any, up: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if up:  # counted before forwarding: once the reply is back, both counts are final
                    self.up += len(data)
                else:
                    self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(2)

    def close(self) -> None:
        self.listener.close()


def _cpu_ops(store: Any, value: bytes, tag: str) -> dict[str, Any]:
    ops = _ops(store, value, tag)
    return {op: ops[op] for op in CPU_OPS}


def wire_sizes(port: int, value: bytes, names: list[str] = CPU_OPS, calls: int = 50) -> dict[str, tuple[int, int]]:
    """Bytes per operation each way (request, reply) of our client against our server, via a proxy."""
    proxy = _CountingProxy(port)
    store = make_client("ours", proxy.port)
    sizes: dict[str, tuple[int, int]] = {}
    try:
        ops = _ops(store, value, "wire")
        for op in names:
            ops[op]()  # warm-up
            up0, down0 = proxy.up, proxy.down
            for _ in range(calls):
                ops[op]()
            sizes[op] = (round((proxy.up - up0) / calls), round((proxy.down - down0) / calls))
    finally:
        close_client(store)
        proxy.close()
    return sizes


def _measure_cpu(pid: int, fn: Any, count: int) -> dict[str, float]:
    """Run ``fn`` ``count`` times; the server's CPU (from /proc) and the wall time per call, in µs."""
    from .common import CLK_TCK, cpu_sched_ns, cpu_ticks

    for _ in range(min(200, count)):  # warm-up
        fn()
    ticks0, ns0 = cpu_ticks(pid), cpu_sched_ns(pid)
    t0 = time.perf_counter_ns()
    for _ in range(count):
        fn()
    wall = time.perf_counter_ns() - t0
    ticks1, ns1 = cpu_ticks(pid), cpu_sched_ns(pid)
    out = {
        "cpu_us": (ticks1 - ticks0) * 1e6 / CLK_TCK / count,
        "wall_us": wall / 1e3 / count,
        "cpu_ticks": ticks1 - ticks0,
    }
    if ns0 is not None and ns1 is not None:
        out["sched_us"] = (ns1 - ns0) / 1e3 / count
    return out


def server_cpu(impls: list[str], reps: int, count: int) -> dict[str, Any]:
    """Server CPU per request (utime+stime of the server process, /proc/<pid>/stat) for small ops.

    ``count`` sequential calls per op from one client, 1 KiB values; set+check counts as one
    request (one round trip: set has no reply). The floor servers (``echo``, ``raw``:
    benchmarks/floor_servers.py) get the same count of requests with the same request and reply
    sizes, measured on the wire of our client and server by a counting proxy before the reps.
    set+check's floor client sends SET's bytes on their own first, as the stores' clients do.
    All servers are fresh separate processes started once; the order alternates per repetition.
    """
    value = bytes(range(256)) * 4
    kinds = [*impls, *FLOORS]
    raw: dict[str, dict[str, list[dict]]] = {k: {op: [] for op in CPU_OPS} for k in kinds}
    with contextlib.ExitStack() as stack:
        servers = {k: stack.enter_context(server(k)) for k in kinds}
        sizes = wire_sizes(servers["ours"].port, value)
        for rep in range(reps):
            for kind in _order(kinds, rep):
                srv = servers[kind]
                if kind in FLOORS:
                    for op in CPU_OPS:
                        client = _floor_client(srv.port, sizes, op)
                        try:
                            raw[kind][op].append(_measure_cpu(srv.pid, client.request, count))
                        finally:
                            client.close()
                    continue
                store = make_client(kind, srv.port)
                try:
                    ops = _cpu_ops(store, value, f"cpu{rep}")
                    for op in CPU_OPS:
                        raw[kind][op].append(_measure_cpu(srv.pid, ops[op], count))
                finally:
                    close_client(store)
    out: dict[str, Any] = {"requests": count, "sizes": {op: list(sz) for op, sz in sizes.items()}, "ops": {}}
    for kind, per_op in raw.items():
        for op, rows in per_op.items():
            out["ops"].setdefault(op, {})[kind] = {
                metric: summarize([r[metric] for r in rows if metric in r])
                for metric in ("cpu_us", "sched_us", "wall_us")
            }
    return out
