"""What the server's Prometheus metrics cost per request: off vs on, and stdlib vs prometheus_client.

``python -m benchmarks.bench_metrics [--reps N] [--quick]`` writes
``benchmarks/results/metrics.md`` (generated: do not edit by hand; about 4 min). Four measurements,
each repeated ``--reps`` times (>= 5), the configurations alternated within every
repetition in short chunks (the order rotated each time) so that a change in the shared
machine's load, or work on the sibling hyperthread, hits all of them alike; medians with
their spread (half of max-min, over the median), and the 1-minute load average before and
after every repetition:

1. **The update alone**, per request: what counting one request costs with
   ``rdzv_store.metrics`` (``ServerMetrics.record``) and with ``prometheus_client`` (three
   labelled ``Counter`` children and one ``Histogram`` child, bound in advance: the cheapest
   way to use it), each net of the two clock reads both need. This is the decision.
2. **Server CPU per request, in process**: the real ``_Connection`` of ``StoreServer``,
   fed complete requests one read at a time through ``_on_readable`` (the worst case for
   the hooks: nothing to amortise over) by a socket that hands it one request per
   ``recv_into`` and takes every reply; metrics off
   and on. No network, no scheduler: the hot path itself.
3. **Small-op round trips**: one ``TCPStore`` client against three fresh ``rdzv-store serve``
   processes, one started with ``--metrics-port 0`` and two without (the second is a control:
   how far two identical servers differ here is the noise floor): p50 of add / check / compare_set 1 KiB
   round trips, and the server's CPU time per request (``/proc/<pid>/task/*/schedstat``).
4. **Pipelined load**: ``AsyncTCPStore`` with 64 adds in flight on one connection, so the
   server handles tens of thousands of requests/s: requests/s and server CPU per request.

After every timed part against the metrics server it is scraped (outside the timing) and
its ``requests_total`` must have moved by exactly the requests sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when run from a checkout

from benchmarks import common  # noqa: E402
from rdzv_store import protocol as p  # noqa: E402

Q = p.QueryType
VALUE = b"v" * 1024
OUT = HERE / "results" / "metrics.md"


# -- helpers -----------------------------------------------------------------------------------


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (ns, from schedstat; /proc/<pid>/stat ticks as a fallback)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total
    except (OSError, ValueError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def cell(summary: dict[str, Any], unit: str = "", digits: int = 3) -> str:
    if not summary or summary.get("median") is None:
        return "n/a"
    med = summary["median"]
    number = f"{med:,.0f}" if abs(med) >= 10 ** (digits - 1) else f"{med:.{digits}g}"
    return f"{number}{unit} ±{summary['spread'] * 100:.0f}%"


def rotations(names: list[str], rep: int) -> list[str]:
    k = rep % len(names)
    return names[k:] + names[:k]


# -- 1. in-process server CPU per request -------------------------------------------------------


class _NullSocket:
    """What ``_Connection`` needs of its socket: ``recv_into`` hands over ``incoming`` (one
    request per read), every send is taken whole, as the kernel nearly always does."""

    incoming = b""

    def recv_into(self, buffer: Any) -> int:
        n = len(self.incoming)
        buffer[:n] = self.incoming
        return n

    def send(self, data: bytes) -> int:
        return len(data)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


def _prometheus_children() -> Any:
    """prometheus_client's labelled children for one request type, bound in advance (its cheapest
    use): (requests, request bytes, reply bytes, latency histogram); None without the library."""
    try:
        from prometheus_client import CollectorRegistry, Counter, Histogram
    except ImportError:
        return None
    from rdzv_store.metrics import LATENCY_BUCKETS

    registry = CollectorRegistry()
    requests = Counter("rdzv_store_requests", "requests", ["type"], registry=registry)
    rx = Counter("rdzv_store_request_bytes", "bytes", ["type"], registry=registry)
    tx = Counter("rdzv_store_reply_bytes", "bytes", ["type"], registry=registry)
    hist = Histogram("rdzv_store_request_duration_seconds", "latency", ["type"], buckets=LATENCY_BUCKETS,
                     registry=registry)
    return requests.labels("add"), rx.labels("add"), tx.labels("add"), hist.labels("add")


def update_cost(kind: str, count: int) -> float:
    """ns per request of the metrics update alone (both with the two clock reads a request needs)."""
    from rdzv_store.metrics import ServerMetrics

    clock = time.perf_counter_ns
    cpu = time.process_time_ns
    if kind == "none":
        t0 = cpu()
        for _ in range(count):
            t = clock()
            _ = clock() - t
        return (cpu() - t0) / count
    if kind == "rdzv_store.metrics":
        record = ServerMetrics().record  # a method call; the server inlines it, so this is an upper bound
        t0 = cpu()
        for _ in range(count):
            t = clock()
            record(4, 27, 8, clock() - t)
        return (cpu() - t0) / count
    r, i, o, h = _prometheus_children()
    t0 = cpu()
    for _ in range(count):
        t = clock()
        r.inc()
        i.inc(27)
        o.inc(8)
        h.observe((clock() - t) / 1e9)
    return (cpu() - t0) / count


def bench_update_cost(reps: int, count: int, chunk: int = 10_000) -> dict[str, Any]:
    kinds = ["none", "rdzv_store.metrics"] + (["prometheus_client"] if _prometheus_children() is not None else [])
    values: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(reps):
        spent = dict.fromkeys(kinds, 0.0)
        rounds = max(1, count // chunk)
        for j in range(rounds):
            for kind in rotations(kinds, rep + j):
                spent[kind] += update_cost(kind, chunk)
        for kind in kinds:
            values[kind].append(spent[kind] / rounds - (spent["none"] / rounds if kind != "none" else 0.0))
    return {"count": count, **{k: common.summarize(v) for k, v in values.items()}}


def _requests() -> list[bytes]:
    return [
        p.encode_key_int(Q.ADD, b"/counter", 1),
        p.encode_keys(Q.CHECK, [b"/counter"]),
        p.encode_key(Q.GET, b"/value"),
        p.encode_compare_set(b"/value", VALUE, VALUE),
        p.encode_key_value(Q.SET, b"/value", VALUE),
    ]


class InProcess:
    """One server ``_Connection`` fed requests as its socket would; ``run(n)`` returns CPU ns."""

    def __init__(self, mode: str) -> None:
        from rdzv_store.server import StoreServer, _Connection

        self.server = StoreServer("127.0.0.1", 0, metrics=None if mode == "off" else 0)
        self.mode = mode
        self.sock = _NullSocket()
        self.conn = _Connection(self.server, self.sock, "127.0.0.1:1")  # type: ignore[arg-type]
        self.server._admit(self.conn)
        self.sent = 0
        self._feed(p.encode_validate())
        self._feed(p.encode_key_value(Q.SET, b"/value", VALUE))
        self.reqs = _requests()

    def _feed(self, data: bytes) -> None:
        self.sock.incoming = data
        self.conn._on_readable()
        self.sent += 1

    def run(self, count: int) -> int:
        reqs, sock, readable = self.reqs, self.sock, self.conn._on_readable
        n = len(reqs)
        clock = time.process_time_ns
        t0 = clock()
        for i in range(count):
            sock.incoming = reqs[i % n]
            readable()
        elapsed = clock() - t0
        self.sent += count
        if self.mode == "on":
            assert self.server.metrics is not None and sum(map(self.server.metrics.requests, range(len(Q)))) == self.sent
        return elapsed


def bench_in_process(reps: int, count: int, chunk: int = 5000) -> dict[str, Any]:
    """Per repetition, ``count`` requests per configuration, alternated in chunks of ``chunk``
    (so that the other jobs on a shared machine, and the sibling hyperthread, slow all alike)."""
    modes = ["off", "on"]
    runners = {m: InProcess(m) for m in modes}
    for runner in runners.values():
        runner.run(chunk)  # warm-up
    values: dict[str, list[float]] = {m: [] for m in modes}
    loads = []
    for rep in range(reps):
        loads.append(loadavg())
        spent = dict.fromkeys(modes, 0)
        for k in range(max(1, count // chunk)):
            for mode in rotations(modes, rep + k):
                spent[mode] += runners[mode].run(chunk)
        for mode in modes:
            values[mode].append(spent[mode] / (max(1, count // chunk) * chunk))
        loads.append(loadavg())
    out: dict[str, Any] = {m: common.summarize(v) for m, v in values.items()}
    out["ratios"] = {m: common.summarize([a / b for a, b in zip(values[m], values["off"])]) for m in modes}
    out["loads"] = loads
    out["count"] = count
    return out


# -- 2 and 3. over loopback, against `rdzv-store serve` processes ------------------------------


def start(metrics: bool) -> tuple[Any, int | None]:
    """A fresh `rdzv-store serve` process (with --metrics-port 0 when ``metrics``): (proc, metrics port)."""
    import re
    import subprocess

    cmd = [sys.executable, "-m", "rdzv_store", "--log-level", "WARNING", "serve", "--host", common.HOST,
           "--port", "0"] + (["--metrics-port", "0"] if metrics else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=common._child_env(),
                            start_new_session=True)
    patterns = [r"listening on \S+ port (\d+)"] + ([r"metrics on http://\S+:(\d+)/metrics"] if metrics else [])
    try:
        ports = _read_ports(proc, patterns, 60.0)
    except BaseException:
        common.stop_process(proc)
        raise
    return common.ServerProc("ours", proc, ports[0]), (ports[1] if metrics else None)


def _read_ports(proc: Any, patterns: list[str], timeout: float) -> list[int]:
    """The first group of each pattern in the server's stdout, read until all are found (bounded)."""
    import re

    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}: {buf.decode(errors='replace')}")
        chunk = proc.stdout.read()
        if chunk:
            buf += chunk
        found = [re.search(pat.encode(), buf) for pat in patterns]
        if all(found):
            return [int(f.group(1)) for f in found if f is not None]
        time.sleep(0.01)
    raise TimeoutError(f"server did not print {patterns} within {timeout} s: {buf!r}")


def scraped_requests(mport: int) -> int:
    with urllib.request.urlopen(f"http://{common.HOST}:{mport}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("rdzv_store_requests_total{"))


def round_trips(store: Any, ops: int, lat: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Latencies (ns) of add, check and compare_set 1 KiB round trips, ``ops`` of each, interleaved
    (appended to ``lat``); 3 * ``ops`` requests."""
    clock = time.perf_counter_ns
    if lat is None:
        lat = {"add": [], "check": [], "compare_set": []}
    for _ in range(ops):
        t = clock()
        store.add("counter", 1)
        t1 = clock()
        store.check(["counter"])
        t2 = clock()
        store.compare_set("cas", VALUE, VALUE)
        t3 = clock()
        lat["add"].append(t1 - t)
        lat["check"].append(t2 - t1)
        lat["compare_set"].append(t3 - t2)
    return lat


async def _pipelined(port: int, pid: int, mport: int | None, rounds: int, width: int) -> tuple[float, int, int]:
    """(seconds, server CPU ns, requests the server counted or -1) for rounds x width pipelined adds."""
    from rdzv_store import AsyncTCPStore

    async with AsyncTCPStore(common.HOST, port, timeout=60) as store:
        await asyncio.gather(*(store.add("warm", 1) for _ in range(width)))  # connect, warm up
        before = scraped_requests(mport) if mport else 0  # blocking, outside the timed part
        c0 = cpu_ns(pid)
        t0 = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(store.add("p", 1) for _ in range(width)))
        seconds = time.perf_counter() - t0
        c1 = cpu_ns(pid)
        counted = scraped_requests(mport) - before if mport else -1
        return seconds, c1 - c0, counted


def bench_loopback(reps: int, ops: int, rounds: int, width: int, chunks: int = 5) -> dict[str, Any]:
    """Per repetition, ``ops`` round trips of each kind and ``rounds`` pipelined rounds per
    configuration, alternated in ``chunks`` slices (order rotated) so that both servers see the
    same background load."""
    from rdzv_store import TCPStore

    # "control": a second server without metrics, so the report shows how far two identical
    # servers differ on this machine (the noise floor the on/off difference must beat).
    modes = ["off", "control", "on"]
    servers: dict[str, tuple[Any, int | None]] = {}
    clients: dict[str, Any] = {}
    rt: dict[str, dict[str, list[float]]] = {m: {"add": [], "check": [], "compare_set": []} for m in modes}
    rt_cpu: dict[str, list[float]] = {m: [] for m in modes}
    pl_rate: dict[str, list[float]] = {m: [] for m in modes}
    pl_cpu: dict[str, list[float]] = {m: [] for m in modes}
    loads = []
    checked = 0
    per_chunk, rounds_per_chunk = max(1, ops // chunks), max(1, rounds // chunks)
    try:
        for mode in modes:
            servers[mode] = start(mode == "on")
            clients[mode] = TCPStore(common.HOST, servers[mode][0].port, timeout=60)
            clients[mode].set("cas", VALUE)
            round_trips(clients[mode], max(50, ops // 10))  # warm-up
        for rep in range(reps):
            loads.append(loadavg())
            lat: dict[str, dict[str, list[int]]] = {m: {"add": [], "check": [], "compare_set": []} for m in modes}
            cpu = dict.fromkeys(modes, 0)
            pcpu = dict.fromkeys(modes, 0)
            psec = dict.fromkeys(modes, 0.0)
            for k in range(chunks):
                for mode in rotations(modes, rep + k):
                    srv, mport = servers[mode]
                    before = scraped_requests(mport) if mport else 0
                    c0 = cpu_ns(srv.pid)
                    round_trips(clients[mode], per_chunk, lat[mode])
                    cpu[mode] += cpu_ns(srv.pid) - c0
                    if mport:
                        moved = scraped_requests(mport) - before
                        assert moved == 3 * per_chunk, f"requests_total moved by {moved}, {3 * per_chunk} sent"
                        checked += 1
                    seconds, spent, counted = asyncio.run(_pipelined(srv.port, srv.pid, mport, rounds_per_chunk, width))
                    psec[mode] += seconds
                    pcpu[mode] += spent
                    if mport:
                        assert counted == rounds_per_chunk * width, f"requests_total moved by {counted}"
                        checked += 1
            for mode in modes:
                for op, values in lat[mode].items():
                    rt[mode][op].append(statistics.median(values) / 1000)
                rt_cpu[mode].append(cpu[mode] / (3 * per_chunk * chunks) / 1000)
                n = rounds_per_chunk * width * chunks
                pl_rate[mode].append(n / psec[mode])
                pl_cpu[mode].append(pcpu[mode] / n / 1000)
            loads.append(loadavg())
    finally:
        for store in clients.values():
            with contextlib.suppress(Exception):
                store.close()
        for srv, _ in servers.values():
            common.stop_process(srv.proc)

    def paired(values: dict[str, list[float]], mode: str = "on") -> dict[str, Any]:
        return common.summarize([on / off for on, off in zip(values[mode], values["off"])])

    return {
        "ops": per_chunk * chunks,
        "rounds": rounds_per_chunk * chunks,
        "width": width,
        "chunks": chunks,
        "round_trip_p50_us": {m: {k: common.summarize(v) for k, v in rt[m].items()} for m in rt},
        "round_trip_ratio": {k: paired({m: rt[m][k] for m in rt}) for k in ("add", "check", "compare_set")},
        "round_trip_cpu_us": {m: common.summarize(v) for m, v in rt_cpu.items()},
        "round_trip_cpu_ratio": paired(rt_cpu),
        "control_round_trip_ratio": {k: paired({m: rt[m][k] for m in rt}, "control")
                                     for k in ("add", "check", "compare_set")},
        "control_round_trip_cpu_ratio": paired(rt_cpu, "control"),
        "control_pipelined_rate_ratio": paired(pl_rate, "control"),
        "control_pipelined_cpu_ratio": paired(pl_cpu, "control"),
        "pipelined_rate": {m: common.summarize(v) for m, v in pl_rate.items()},
        "pipelined_rate_ratio": paired(pl_rate),
        "pipelined_cpu_us": {m: common.summarize(v) for m, v in pl_cpu.items()},
        "pipelined_cpu_ratio": paired(pl_cpu),
        "loads": loads,
        "scrapes_checked": checked,
    }


# -- report ------------------------------------------------------------------------------------


def pct(ratio: dict[str, Any]) -> str:
    if not ratio or ratio.get("median") is None:
        return "n/a"
    return (f"{(ratio['median'] - 1) * 100:+.1f}% (reps {(ratio['min'] - 1) * 100:+.1f}% … "
            f"{(ratio['max'] - 1) * 100:+.1f}%)")


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    up = res["update"]
    ip = res["in_process"]
    lb = res["loopback"]
    loads = ip["loads"] + lb["loads"]
    lines = [
        "# Metrics: what they cost per request",
        "",
        f"Generated by `python -m benchmarks.bench_metrics{''.join(' ' + a for a in res['argv'])}` "
        "(do not edit by hand).",
        f"{m['date']}, git {m['git']}, Python {m['python']}, {m['cpus']} CPUs ({m['host_cpu']}), "
        f"prometheus_client {m.get('prometheus_client') or 'not installed'}. "
        f"{res['reps']} repetitions, configurations alternated within each (order rotated); "
        f"medians ± spread (half of max-min over the median). 1-minute load average during the run: "
        f"{min(loads):.2f}–{max(loads):.2f} (a shared machine: other jobs ran beside this one). "
        f"Took {res['seconds']:.0f} s.",
        "",
        "## 1. The update alone (ns per request, net of the two clock reads)",
        "",
        "| counting with | ns per request |",
        "|---|---|",
        f"| `rdzv_store.metrics` (`ServerMetrics.record`; the server inlines it) | "
        f"{cell(up['rdzv_store.metrics'], '', 3)} |",
    ]
    if "prometheus_client" in up:
        lines.append(f"| `prometheus_client` (3 counters + 1 histogram, children bound in advance) | "
                     f"{cell(up['prometheus_client'], '', 3)} |")
    lines += [
        f"| (the two `perf_counter_ns` reads both need) | {cell(up['none'], '', 3)} |",
        "",
        "## 2. Server CPU per request, in process (the real `_Connection`, one request per read, no network)",
        "",
        f"{ip['count']} requests per configuration and repetition (add, check, get 1 KiB, compare_set 1 KiB, "
        "set 1 KiB in turn).",
        "",
        "| metrics | ns per request | on vs off (paired, min … max) |",
        "|---|---|---|",
        f"| off | {cell(ip['off'], '', 4)} | — |",
        f"| on | {cell(ip['on'], '', 4)} | {pct(ip['ratios']['on'])} |",
    ]
    if "prometheus_client" in up and ip["off"]["median"]:
        ours = ip["on"]["median"] - ip["off"]["median"]
        theirs = ours - up["rdzv_store.metrics"]["median"] + up["prometheus_client"]["median"]
        lines += ["", f"On, the hooks add {ours:.0f} ns to a request; with prometheus_client's update in place of "
                      f"ours they would add about {theirs:.0f} ns "
                      f"({theirs / ip['off']['median'] * 100:.0f}% instead of {ours / ip['off']['median'] * 100:.0f}%)."]
    rt = lb["round_trip_p50_us"]
    lines += [
        "",
        "## 3. Small-op round trips over loopback (`rdzv-store serve`, one TCPStore client)",
        "",
        f"{lb['ops']} of each op per configuration and repetition, interleaved, in {lb['chunks']} slices "
        "alternated between the three servers.",
        "",
        "| figure | metrics off | metrics on | on vs off (paired, min … max) | control: a second server, off, vs off |",
        "|---|---|---|---|---|",
    ]
    for k in ("add", "check", "compare_set"):
        name = f"{k} 1 KiB" if k == "compare_set" else k
        lines.append(f"| {name} p50 (µs) | {cell(rt['off'][k])} | {cell(rt['on'][k])} | "
                     f"{pct(lb['round_trip_ratio'][k])} | {pct(lb['control_round_trip_ratio'][k])} |")
    lines.append(f"| server CPU per request (µs) | {cell(lb['round_trip_cpu_us']['off'])} | "
                 f"{cell(lb['round_trip_cpu_us']['on'])} | {pct(lb['round_trip_cpu_ratio'])} | "
                 f"{pct(lb['control_round_trip_cpu_ratio'])} |")
    lines += [
        "",
        f"## 4. Pipelined load (AsyncTCPStore, {lb['width']} adds in flight, {lb['rounds']} rounds per "
        "configuration and repetition)",
        "",
        "| figure | metrics off | metrics on | on vs off (paired, min … max) | control: a second server, off, vs off |",
        "|---|---|---|---|---|",
        f"| requests/s | {cell(lb['pipelined_rate']['off'])} | {cell(lb['pipelined_rate']['on'])} | "
        f"{pct(lb['pipelined_rate_ratio'])} | {pct(lb['control_pipelined_rate_ratio'])} |",
        f"| server CPU per request (µs) | {cell(lb['pipelined_cpu_us']['off'])} | "
        f"{cell(lb['pipelined_cpu_us']['on'])} | {pct(lb['pipelined_cpu_ratio'])} | "
        f"{pct(lb['control_pipelined_cpu_ratio'])} |",
        "",
        f"Scrapes checked: {lb['scrapes_checked']} (after each timed part, `requests_total` moved by exactly the "
        "requests sent).",
        "",
        "Loopback figures on a shared 2-vCPU VM (client and servers share the CPUs with other jobs) differ "
        "between two identical servers by what the control column shows: an on/off difference inside it is "
        "not resolved. The in-process figures are the per-request cost itself.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_metrics", description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="repetitions (>= 5; default 7)")
    ap.add_argument("--quick", action="store_true", help="fewer requests per repetition (about 1 min)")
    ap.add_argument("--tiny", action="store_true", help="a smoke test of the script itself: figures meaningless")
    ap.add_argument("--out", type=Path, default=OUT, help=f"report (default: {OUT.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)
    if args.reps < 5:
        ap.error("--reps must be at least 5")
    count, ops, rounds = (60_000, 1000, 150) if args.quick else (200_000, 3000, 400)
    if args.tiny:
        count, ops, rounds = 2_000, 25, 5
    machine = common.machine_info()
    machine["prometheus_client"] = common._pkg_version("prometheus_client")
    print(f"load average {loadavg():.2f}; {args.reps} repetitions", flush=True)
    started = time.monotonic()
    res: dict[str, Any] = {"machine": machine, "reps": args.reps, "argv": sys.argv[1:] if argv is None else argv}
    res["update"] = bench_update_cost(args.reps, count)
    print(f"update cost done ({time.monotonic() - started:.0f} s)", flush=True)
    res["in_process"] = bench_in_process(args.reps, count)
    print(f"in process done ({time.monotonic() - started:.0f} s)", flush=True)
    res["loopback"] = bench_loopback(args.reps, ops, rounds, 64)
    print(f"loopback done ({time.monotonic() - started:.0f} s)", flush=True)
    res["seconds"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(res)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
