"""Where a small request's server time goes: our server against the ``raw`` floor, piece by piece.

``python -m benchmarks.bench_breakdown [--reps N] [--count N] [--out PATH]`` writes
``benchmarks/results/breakdown.md`` and ``.json`` (generated: rerun, never edit by hand).

Issue 12 asks for the profile behind a target that pure Python cannot reach. Per operation
(add, check, compare_set 1 KiB, and get 1 KiB: one GET, as our client sends it):

1. **hot**: our server's Python per request in process, a real ``_Connection`` read through
   ``_on_readable`` by a stand-in socket (no kernel, caches warm). Best of the repetitions:
   the least the code costs.
2. **callback**: each server in a fresh process (ours: ``StoreServer`` on the default asyncio
   loop; ``raw``: ``floor_servers``' add_reader + recv_into + send server) with its readiness
   callback timed (``perf_counter_ns`` around it), driven by the *same* blocking client sending
   identical bytes. The callback holds the recv and the send system calls; for ours, the send
   (the ``_send`` call: one ``send()`` plus a few lines) is timed apart as well.
3. **process CPU**: utime and stime of the server process over the same requests, from
   ``/proc/<pid>/stat`` (the split is tick-sampled; the sum is exact). What is left after the
   callback is the event loop's own share (``epoll_wait`` and asyncio's ``_run_once``), the
   same code for both servers.

Medians over ``--reps`` (>= 5) alternated repetitions, with min and max. The timing wrappers
themselves cost both servers alike (about 0.1 µs each); ours has two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when run from a checkout

from benchmarks import common  # noqa: E402
from benchmarks.floor_servers import BlockingClient  # noqa: E402
from rdzv_store import commands as cmd  # noqa: E402
from rdzv_store import protocol as p  # noqa: E402
from rdzv_store.protocol import QueryType as Q  # noqa: E402

OUT = HERE / "results" / "breakdown.md"
VALUE = bytes(range(256)) * 4
# op -> (request bytes, reply bytes): the requests are our client's own (``commands``).
OPS: dict[str, tuple[bytes, int]] = {
    "add": (cmd.add(b"counter", 1)[0], 8),
    "check": (cmd.check([b"counter"])[0], 1),
    "compare_set": (cmd.compare_set(b"value", VALUE, VALUE)[0], 8 + len(VALUE)),
    "get": (cmd.get(b"value")[0], 8 + len(VALUE)),
}
KINDS = ["ours", "raw"]


# -- the child: one instrumented server, reporting on request --------------------------------


def _timed(fn: Any, acc: list[int]) -> Any:
    clock = time.perf_counter_ns

    def wrapper(self: Any, *args: Any) -> Any:
        t0 = clock()
        try:
            return fn(self, *args)
        finally:
            acc[0] += clock() - t0
            acc[1] += 1

    return wrapper


async def _child(kind: str) -> None:
    """Serve; each line on stdin prints the timings since the last one (JSON) and resets them."""
    loop = asyncio.get_running_loop()
    accs: dict[str, list[int]] = {"callback": [0, 0], "send": [0, 0]}
    if kind == "ours":
        from rdzv_store.server import StoreServer, _Connection

        _Connection._on_readable = _timed(_Connection._on_readable, accs["callback"])  # type: ignore[method-assign]
        _Connection._send = _timed(_Connection._send, accs["send"])  # type: ignore[method-assign]
        server = StoreServer(common.HOST, 0)
        await server.start()
        port = server.addresses[0][1]
    else:
        from benchmarks import floor_servers

        floor_servers._Raw.readable = _timed(floor_servers._Raw.readable, accs["callback"])  # type: ignore[method-assign]
        listener = floor_servers.listener_socket()
        conns = floor_servers.serve_raw(loop, listener)  # noqa: F841 (the connections live as long as we do)
        port = listener.getsockname()[1]
    done = loop.create_future()

    def command() -> None:
        line = sys.stdin.readline()
        if not line:
            done.done() or done.set_result(None)
            return
        print(json.dumps({k: {"ns": a[0], "calls": a[1]} for k, a in accs.items()}), flush=True)
        for a in accs.values():
            a[0] = a[1] = 0

    loop.add_reader(sys.stdin.fileno(), command)
    print(f"port {port}", flush=True)
    await asyncio.wait_for(done, 3600)  # bounded even if the parent never closes our stdin


class _Child:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.proc = common.spawn(
            [sys.executable, "-m", "benchmarks.bench_breakdown", "--serve", kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=common._child_env(), cwd=str(HERE.parent),
        )
        self.port = int(self._line(60.0).split()[1])

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"breakdown server {self.kind} did not answer within {timeout} s")
        line = self.proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"breakdown server {self.kind} exited (code {self.proc.poll()})")
        return line

    def report(self) -> dict[str, dict[str, int]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"r\n")
        self.proc.stdin.flush()
        return json.loads(self._line(30.0))  # type: ignore[no-any-return]

    def close(self) -> None:
        common.stop_process(self.proc)


# -- the parent ---------------------------------------------------------------------------------


def _preamble(kind: str, request: bytes, reply: int) -> bytes:
    if kind == "ours":  # the handshake, and the value get and compare_set find
        return p.encode_validate() + p.encode_key_value(Q.SET, b"/value", VALUE)
    from benchmarks.floor_servers import HEADER

    return HEADER.pack(len(request), reply)


def hot(reps: int, count: int) -> dict[str, Any]:
    """Our server's Python per request, in process (µs): best and median of ``reps``."""
    from benchmarks.bench_metrics import _NullSocket
    from rdzv_store.server import StoreServer, _Connection

    server = StoreServer(common.HOST, 0)
    sock = _NullSocket()
    conn = _Connection(server, sock, "127.0.0.1:1")  # type: ignore[arg-type]
    server._admit(conn)
    for data in (p.encode_validate(), p.encode_key_value(Q.SET, b"/value", VALUE)):
        sock.incoming = data
        conn._on_readable()
    out: dict[str, Any] = {}
    for op, (request, _) in OPS.items():
        sock.incoming = request
        readable = conn._on_readable
        values = []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            for _ in range(count):
                readable()
            values.append((time.perf_counter_ns() - t0) / count / 1e3)
        out[op] = {**common.summarize(values), "best": min(values)}
    return out


def cold(reps: int, count: int) -> dict[str, Any]:
    children = {kind: _Child(kind) for kind in KINDS}
    rows: dict[str, dict[str, dict[str, list[float]]]] = {
        op: {kind: {m: [] for m in ("callback", "send", "user", "sys", "cpu", "rtt")} for kind in KINDS} for op in OPS
    }
    clients: dict[tuple[str, str], BlockingClient] = {}
    try:
        for kind, child in children.items():
            for op, (request, reply) in OPS.items():
                clients[(kind, op)] = BlockingClient(child.port, _preamble(kind, request, reply), request, reply)
        tick_us = 1e6 / common.CLK_TCK
        for rep in range(reps):
            for kind in KINDS[rep % 2 :] + KINDS[: rep % 2]:
                child = children[kind]
                for op in OPS:
                    client = clients[(kind, op)]
                    for _ in range(min(500, count)):
                        client.request()
                    child.report()  # reset
                    user0, sys0 = common.cpu_times(child.proc.pid)
                    t0 = time.perf_counter_ns()
                    for _ in range(count):
                        client.request()
                    rtt = (time.perf_counter_ns() - t0) / count / 1e3
                    user1, sys1 = common.cpu_times(child.proc.pid)
                    timings = child.report()
                    row = rows[op][kind]
                    row["rtt"].append(rtt)
                    row["user"].append((user1 - user0) * tick_us / count)
                    row["sys"].append((sys1 - sys0) * tick_us / count)
                    row["cpu"].append((user1 - user0 + sys1 - sys0) * tick_us / count)
                    for name in ("callback", "send"):
                        t = timings[name]
                        if t["calls"]:
                            row[name].append(t["ns"] / 1e3 / count)  # per request, whatever the reads
    finally:
        for client in clients.values():
            client.close()
        for child in children.values():
            child.close()
    return {op: {kind: {m: common.summarize(v) for m, v in per.items()} for kind, per in kinds.items()}
            for op, kinds in rows.items()}


_fmt = common.median_range


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Where a small request's server time goes",
        "",
        f"Generated by `python -m benchmarks.bench_breakdown` on {m.get('date', '?')} (git {m.get('git', '?')}), "
        f"Python {m.get('python', '?')}, {m.get('cpus', '?')} CPUs; load average at start `{res['load_start']}`, "
        f"at end `{res['load_end']}`. {res['reps']} alternated repetitions of {res['count']:,} requests per op "
        "and server; medians [min–max], µs per request. See the module docstring for the method.",
        "",
        "| op | hot Python, ours in process (best) | server | round trip | callback (recv + work + send) "
        "| of which `_send` | process CPU | user / sys |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op, kinds in res["cold"].items():
        for kind, r in kinds.items():
            hot_cell = f"{res['hot'][op]['best']:.2f}" if kind == "ours" else ""
            lines.append(
                f"| {op} | {hot_cell} | {kind} | {_fmt(r['rtt'])} | {_fmt(r['callback'])} | "
                f"{_fmt(r['send']) if kind == 'ours' else '–'} | {_fmt(r['cpu'])} | "
                f"{r['user']['median']:.0f} / {r['sys']['median']:.0f} |"
            )
    lines += ["", "Ours minus raw, medians (µs per request):", "",
              "| op | round trip | callback | process CPU |", "|---|---|---|---|"]
    for op, kinds in res["cold"].items():
        d = {k: kinds["ours"][k]["median"] - kinds["raw"][k]["median"] for k in ("rtt", "callback", "cpu")}
        lines.append(f"| {op} | {d['rtt']:+.1f} | {d['callback']:+.1f} | {d['cpu']:+.1f} |")
    lines += [
        "",
        "Reading it: the *hot* column is all the Python our server adds to a request when its code and "
        "data are in the caches; the *callback* difference is the same work measured where it runs, "
        "between two sleeps in `epoll_wait`, plus the difference in the two send calls. What the "
        "kernel charges (the sys column: `epoll_wait`, `recv`, `send` and the client's wake-up inside "
        "it) is about the same for both servers, and the floor server pays it too.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_breakdown", description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="repetitions (>= 5; default 7)")
    ap.add_argument("--count", type=int, default=10_000, help="requests per op, server and repetition")
    ap.add_argument("--out", type=Path, default=OUT, help=f"report (default: {OUT.relative_to(HERE.parent)})")
    ap.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)  # the child
    args = ap.parse_args(argv)
    if args.serve:
        asyncio.run(_child(args.serve))
        return 0
    if args.reps < 5:
        ap.error("--reps must be at least 5")
    common.install_cleanup()
    machine = common.machine_info()
    res: dict[str, Any] = {"machine": machine, "reps": args.reps, "count": args.count}
    res["load_start"] = Path("/proc/loadavg").read_text().strip()
    res["hot"] = hot(args.reps, max(1000, args.count * 2))
    res["cold"] = cold(args.reps, args.count)
    res["load_end"] = Path("/proc/loadavg").read_text().strip()
    common.write_report(args.out, markdown(res), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
