"""Which side of a round trip costs what: every client against every server.

``python -m benchmarks.bench_pairs [--reps N] [--count N] [--out PATH]`` writes
``benchmarks/results/pairs.md`` and ``.json`` (generated: rerun, never edit by hand). Needs torch.

The main run compares ours->ours with torch->torch, which cannot say whether a gap is the
client's or the server's. Here three clients meet two servers, with identical bytes on the wire
for the ops measured (add, check, compare_set 1 KiB; not get, which torch's client sends as WAIT
then GET and ours as one GET):

* clients: ``ours`` (``rdzv_store.TCPStore``), ``torch`` (``torch.distributed.TCPStore``) and
  ``raw``, the pure-Python floor client: a blocking socket sending our client's request bytes
  and reading the reply's size, nothing encoded or parsed (``floor_servers.BlockingClient``);
* servers: ``ours`` (``rdzv_store serve``) and ``torch`` (libuv), fresh processes;
* placements: ``free`` (the scheduler's choice, as in the main run), ``split`` (server on CPU 0,
  client on CPU 1) and ``shared`` (both on CPU 0, so every microsecond either side spends is
  on the round trip).

Per pair, op and placement: p50 latency, the client's CPU per op (its thread's CPU time) and the
server's (``/proc/<pid>/schedstat``). Medians of ``--reps`` alternated repetitions (the pairs run
in a rotated order each time), with min and max.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when run from a checkout

from benchmarks import common
from benchmarks.floor_servers import BlockingClient
from rdzv_store import commands
from rdzv_store.client import connect_with_retry

OUT = HERE / "results" / "pairs.md"
VALUE = bytes(range(256)) * 4
OPS = ["add", "check", "compare_set"]
CLIENTS = ["ours", "torch", "raw"]
SERVERS = ["ours", "torch"]
PLACEMENTS = ["free", "split", "shared"]


class _RawClient(BlockingClient):
    """The floor client speaking the store's wire: our handshake, then one op's exact bytes."""

    def __init__(self, port: int, op: str) -> None:
        request, reply = {
            "add": (commands.add(b"n", 1)[0], 8),
            "check": (commands.check([b"c"])[0], 1),
            "compare_set": (commands.compare_set(b"cas", VALUE, VALUE)[0], 8 + len(VALUE)),
        }[op]
        # Validated by our client's own connect; blocking, bounded in the kernel: no poll() per call.
        self.sock = connect_with_retry(common.HOST, port, 60.0)
        self.payload, self.reply = request, reply
        self.view = memoryview(bytearray(reply))


def _store_op(store: Any, op: str) -> Callable[[], Any]:
    if op == "add":
        return lambda: store.add("n", 1)
    if op == "check":
        return lambda: store.check(["c"])
    return lambda: store.compare_set("cas", VALUE, VALUE)


def _place(placement: str, server_pid: int) -> None:
    """Pin the server and this (client) process as ``placement`` says."""
    every = set(range(os.cpu_count() or 1))
    server_cpus, client_cpus = {"free": (every, every), "split": ({0}, {1}), "shared": ({0}, {0})}[placement]
    os.sched_setaffinity(server_pid, server_cpus)
    os.sched_setaffinity(0, client_cpus)


def _measure(fn: Callable[[], Any], server_pid: int, count: int) -> dict[str, float]:
    for _ in range(min(300, count)):  # warm-up
        fn()
    clock = time.perf_counter_ns
    samples = []
    cpu0, srv0 = time.thread_time_ns(), common.cpu_sched_ns(server_pid)
    for _ in range(count):
        t = clock()
        fn()
        samples.append(clock() - t)
    cpu1, srv1 = time.thread_time_ns(), common.cpu_sched_ns(server_pid)
    samples.sort()
    out = {"p50_us": samples[count // 2] / 1e3, "client_cpu_us": (cpu1 - cpu0) / count / 1e3}
    if srv0 is not None and srv1 is not None:
        out["server_cpu_us"] = (srv1 - srv0) / count / 1e3
    return out


def run(reps: int, count: int, placements: list[str], clients: list[str], server_kinds: list[str]) -> dict[str, Any]:
    pairs = [(c, s) for s in server_kinds for c in clients]
    rows: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        servers = {s: stack.enter_context(common.server(s)) for s in server_kinds}
        stores = {}
        for c, s in pairs:
            if c != "raw":
                store = common.make_client(c, servers[s].port)
                stack.callback(common.close_client, store)
                store.set("c", b"1")
                store.set("cas", VALUE)
                stores[(c, s)] = store
        try:
            for rep in range(reps):
                for placement in placements:
                    shift = rep % len(pairs)
                    for c, s in pairs[shift:] + pairs[:shift]:
                        srv = servers[s]
                        _place(placement, srv.pid)
                        for op in OPS:
                            raw = _RawClient(srv.port, op) if c == "raw" else None
                            try:
                                fn = raw.request if raw is not None else _store_op(stores[(c, s)], op)
                                m = _measure(fn, srv.pid, count)
                            finally:
                                if raw is not None:
                                    raw.close()
                            cell = rows.setdefault(placement, {}).setdefault(op, {}).setdefault(f"{c}->{s}", {})
                            for k, v in m.items():
                                cell.setdefault(k, []).append(v)
        finally:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {pl: {op: {pair: {k: common.summarize(v) for k, v in cell.items()} for pair, cell in per.items()}
                 for op, per in ops.items()} for pl, ops in rows.items()}


def _fmt(cell: dict[str, Any], key: str) -> str:
    return common.median_range(cell.get(key))


def _minus(cells: dict[str, Any], key: str, a: str, b: str) -> float | None:
    """Median of ``key`` for pair ``a`` minus pair ``b``'s (None when either is missing)."""
    x, y = (cells.get(pair, {}).get(key, {}).get("median") for pair in (a, b))
    return None if x is None or y is None else float(x - y)


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1f}"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Which side of a round trip costs what: every client against every server",
        "",
        f"Generated by `python -m benchmarks.bench_pairs` on {m.get('date', '?')} (git {m.get('git', '?')}), "
        f"Python {m.get('python', '?')}, {m.get('cpus', '?')} CPUs; load average at start `{res['load_start']}`, "
        f"at end `{res['load_end']}`. {res['reps']} alternated repetitions of {res['count']:,} requests per op, "
        "pair and placement; medians [min–max], µs per request. See the module docstring for the method.",
        "",
    ]
    for placement, ops in res["pairs"].items():
        lines += [f"## Placement `{placement}`", "",
                  "| op | client→server | p50 | client CPU | server CPU |", "|---|---|---|---|---|"]
        for op, cells in ops.items():
            for pair, cell in cells.items():
                lines.append(f"| {op} | {pair} | {_fmt(cell, 'p50_us')} | {_fmt(cell, 'client_cpu_us')} | "
                             f"{_fmt(cell, 'server_cpu_us')} |")
        lines += ["", "Differences of medians (µs): *client* = what our client adds over the floor client, "
                  "against torch's server; *server* = what our server adds over torch's, with the floor "
                  "client; *together* = ours→ours minus raw→torch; *rest* = together minus client minus "
                  "server (what the two cost each other when they meet).", "",
                  "| op | client p50 | client CPU | server p50 | server CPU | together p50 | rest p50 |",
                  "|---|---|---|---|---|---|---|"]
        for op, cells in ops.items():
            client = _minus(cells, "p50_us", "ours->torch", "raw->torch")
            server = _minus(cells, "p50_us", "raw->ours", "raw->torch")
            together = _minus(cells, "p50_us", "ours->ours", "raw->torch")
            rest = None if client is None or server is None or together is None else together - client - server
            lines.append(
                f"| {op} | {_signed(client)} | {_signed(_minus(cells, 'client_cpu_us', 'ours->torch', 'raw->torch'))} "
                f"| {_signed(server)} | {_signed(_minus(cells, 'server_cpu_us', 'raw->ours', 'raw->torch'))} "
                f"| {_signed(together)} | {_signed(rest)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_pairs", description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="repetitions (>= 5; default 7)")
    ap.add_argument("--count", type=int, default=10_000, help="requests per op, pair, placement and repetition")
    ap.add_argument("--out", type=Path, default=OUT, help=f"report (default: {OUT.relative_to(HERE.parent)})")
    ap.add_argument("--no-torch", action="store_true", help="our client and the floor client against our server only")
    args = ap.parse_args(argv)
    if args.reps < 5:
        ap.error("--reps must be at least 5")
    clients, server_kinds = CLIENTS, SERVERS
    if args.no_torch:
        clients, server_kinds = [c for c in CLIENTS if c != "torch"], ["ours"]
    elif not common.torch_available():
        print("bench_pairs needs torch (pip install torch==2.13.0), or --no-torch", file=sys.stderr)
        return 2
    else:
        common.reexec_with_shim("benchmarks.bench_pairs")  # torch's clients stall on reverse DNS without it
    common.install_cleanup()
    placements = PLACEMENTS if (os.cpu_count() or 1) >= 2 else ["free"]
    res: dict[str, Any] = {"machine": common.machine_info(), "reps": args.reps, "count": args.count}
    res["load_start"] = Path("/proc/loadavg").read_text().strip()
    res["pairs"] = run(args.reps, args.count, placements, clients, server_kinds)
    res["load_end"] = Path("/proc/loadavg").read_text().strip()
    common.write_report(args.out, markdown(res), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
