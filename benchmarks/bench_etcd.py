"""etcd v3 figures: EtcdStore latency per operation vs our TCP server and torch's TCPStore,
the cost of fsync, the client choice (stdlib gateway vs a PyPI client), and rendezvous
completion time for N agents over etcd-v3 vs c10d.

``python -m benchmarks.bench_etcd [--quick] [--reps N] [--sizes 8,16,...] [--out DIR]`` writes
``etcd.md`` and ``etcd.json`` into ``--out`` (default ``benchmarks/results``). Generated:
never edit the results by hand.

* etcd runs as fresh members on a data dir on the real disk (not tmpfs), so etcd's
  default fsync is paid as in production; the same measurement is repeated with
  ``--unsafe-no-fsync`` (hidden in 3.4's ``--help``), and on a 3-member cluster (fsync).
* Every latency cell is the median over repetitions of each repetition's median, with the
  spread (min-max across repetitions). Clients are sequential, one connection.
* One run, alternated: every etcd member and server is up for the whole run; repetition k
  of every cell runs before repetition k+1 of any, the order rotated each time, and the load
  average is recorded at the start and end of each repetition.
* torch's TCPStore (libuv server) and torch's own handler are measured in child processes
  run by ``/work/venv-torch/bin/python`` (or ``$RDZV_TORCH_PYTHON``) when present.
* Rendezvous (N = 8, 16, 32, 64, 128): our handler over etcd-v3 (fsync and
  ``--unsafe-no-fsync``) and over our TCP server, torch's handler over torch's c10d. A failed
  rendezvous (join timeout 120 s) is counted in its cell and the run goes on.
  N agents (threads in 4 child processes) each call ``next_rendezvous`` once
  with ``min_nodes = max_nodes = N``; the time is from the moment all agents are released
  to the moment the last one has its rank. It includes the handler's 0-0.3 s random
  first-round delay (torch's too).

Bounded: every process is stopped in a ``finally``, every wait has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import HERE, REPO, machine_info, start_server, stop_process

ETCD = os.environ.get("ETCD_BINARY") or shutil.which("etcd") or "/usr/bin/etcd"
TORCH_PYTHON = os.environ.get("RDZV_TORCH_PYTHON", "/work/venv-torch/bin/python")
GW_PYTHON = os.environ.get("RDZV_ETCD3GW_PYTHON", "/tmp/venv-etcd3gw/bin/python")
OPS = ["set", "get", "add", "compare_set", "check"]


# -- etcd processes --------------------------------------------------------------------------
def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status == 200 and b"true" in resp.read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # held open together: n distinct ports
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_members(root: str, size: int, no_fsync: bool, attempt: int) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    ports = _free_ports(2 * size)
    cports, pports = ports[:size], ports[size:]
    cluster = ",".join(f"n{i}=http://127.0.0.1:{p}" for i, p in enumerate(pports))
    token = "bench-" + uuid.uuid4().hex[:8]
    procs = []
    for i in range(size):
        args = [
            ETCD, "--name", f"n{i}", "--data-dir", os.path.join(root, f"a{attempt}-n{i}"),
            "--listen-client-urls", f"http://127.0.0.1:{cports[i]}", "--advertise-client-urls", f"http://127.0.0.1:{cports[i]}",
            "--listen-peer-urls", f"http://127.0.0.1:{pports[i]}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{pports[i]}",
            "--initial-cluster", cluster, "--initial-cluster-token", token,
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "error",
        ] + (["--unsafe-no-fsync"] if no_fsync else [])
        with open(os.path.join(root, f"a{attempt}-n{i}.log"), "ab") as log:
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True))
    return procs, cports


def _stop_members(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


@contextlib.contextmanager
def etcd_cluster(size: int, no_fsync: bool) -> Iterator[list[str]]:
    """``size`` fresh members on loopback, data on the real disk; yields their client URLs."""
    root = tempfile.mkdtemp(prefix="rdzv-bench-etcd-", dir=os.environ.get("RDZV_BENCH_ETCD_DIR"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for attempt in range(3):
            procs, cports = _start_members(root, size, no_fsync, attempt)
            deadline = time.monotonic() + 60
            while not all(_healthy(c) for c in cports):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    break
                time.sleep(0.02)
            else:
                break
            _stop_members(procs)
            logs = " | ".join(Path(root, f"a{attempt}-n{i}.log").read_text()[-300:] for i in range(size))
            print(f"etcd start attempt {attempt + 1} failed: {logs}", file=sys.stderr)
        else:
            raise RuntimeError("etcd did not start in 3 attempts")
        yield [f"http://127.0.0.1:{c}" for c in cports]
    finally:
        _stop_members(procs)
        shutil.rmtree(root, ignore_errors=True)


# -- latency: one child process per (store, repetition) --------------------------------------
_LATENCY_CHILD = r"""
import json, sys, time
kind, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ops = sys.argv[4].split(",")
if kind == "etcd":
    from rdzv_store import EtcdStore
    store = EtcdStore(target.split(","), prefix="/bench-%d/" % time.monotonic_ns(), timeout=60)
elif kind in ("ours", "torch"):
    from datetime import timedelta
    if kind == "torch":
        from torch.distributed import TCPStore
    else:
        from rdzv_store import TCPStore
    store = TCPStore("127.0.0.1", int(target), is_master=False, timeout=timedelta(seconds=60), wait_for_workers=False)
value = b"v" * 16
store.set("k", value)
fns = {
    "set": lambda i: store.set("k%d" % (i % 100), value),
    "get": lambda i: store.get("k"),
    "add": lambda i: store.add("ctr", 1),
    "compare_set": lambda i: store.compare_set("k", value, value),
    "check": lambda i: store.check(["k"]),
}
out = {}
for op in ops:
    fn = fns[op]
    for i in range(max(20, n // 10)):
        fn(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter(); fn(i); times.append(time.perf_counter() - t0)
    times.sort()
    out[op] = {"median_ms": times[len(times) // 2] * 1000, "p99_ms": times[int(len(times) * 0.99)] * 1000}
print(json.dumps(out))
"""

_RAW_CHILD = r"""
import base64, http.client, json, sys, time
url, n = sys.argv[1], int(sys.argv[2])
host, port = url.replace("http://", "").split(":")
out = {}
if sys.argv[3] == "stdlib":
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    def post(path, body):
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return conn.getresponse().read()
    b = lambda s: base64.b64encode(s).decode()
    fns = {"put": lambda i: post("/v3/kv/put", {"key": b(b"raw%d" % (i % 100)), "value": b(b"v" * 16)}),
           "range": lambda i: post("/v3/kv/range", {"key": b(b"raw1")})}
else:
    import etcd3gw
    client = etcd3gw.client(host=host, port=int(port))
    fns = {"put": lambda i: client.put("raw%d" % (i % 100), "v" * 16), "range": lambda i: client.get("raw1")}
for op, fn in fns.items():
    for i in range(max(20, n // 10)):
        fn(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter(); fn(i); times.append(time.perf_counter() - t0)
    times.sort()
    out[op] = {"median_ms": times[len(times) // 2] * 1000, "p99_ms": times[int(len(times) * 0.99)] * 1000}
print(json.dumps(out))
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_child(python: str, script: str, args: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=_child_env())
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _cell(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _latency_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {op: {"median": _cell([r[op]["median_ms"] for r in runs]), "p99": _cell([r[op]["p99_ms"] for r in runs])} for op in OPS}


def _raw_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {op: {"median": _cell([r[op]["median_ms"] for r in runs])} for op in ("put", "range")}


# -- rendezvous ------------------------------------------------------------------------------
_AGENT_CHILD = r"""
import json, sys, threading, time
kind, endpoint, run_id, total, here = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
conf = {"read_timeout": "120", "join_timeout": "120", "last_call_timeout": "1"}
AGENT_LIMIT_S = 300.0  # past the join timeout (120 s) plus a store call's read timeout
handlers = []
if kind.startswith("torch"):
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
    backend = "c10d" if kind == "torch-c10d" else "etcd-v3"
    for _ in range(here):
        extra = {"is_host": "false"} if backend == "c10d" else {}
        handlers.append(get_rendezvous_handler(RendezvousParameters(backend, endpoint, run_id, total, total, local_addr="127.0.0.1", **conf, **extra)))
else:
    from rdzv_backend import RendezvousParameters
    from rdzv_backend.dynamic import create_handler
    if kind == "ours-etcd":
        from rdzv_backend.etcd import create_backend
        extra = {}
    else:
        from rdzv_backend.c10d import create_backend
        extra = {"is_host": "false"}
    for _ in range(here):
        params = RendezvousParameters("etcd-v3" if kind == "ours-etcd" else "c10d", endpoint, run_id, total, total, local_addr="127.0.0.1", **conf, **extra)
        backend, store = create_backend(params)
        handlers.append(create_handler(store, backend, params))
print("ready", flush=True)
sys.stdin.readline()
done = []
errors = []
def run(h):
    try:
        h.next_rendezvous(); done.append(time.monotonic())
    except BaseException as e:
        errors.append(repr(e))
threads = [threading.Thread(target=run, args=(h,), daemon=True) for h in handlers]
for t in threads: t.start()
end = time.monotonic() + AGENT_LIMIT_S  # one deadline for all, not one per thread
for t in threads: t.join(max(0.0, end - time.monotonic()))
stuck = sum(t.is_alive() for t in threads)
if stuck:
    errors.append(f"{stuck} agent(s) still in next_rendezvous() after {AGENT_LIMIT_S:.0f} s")
print(json.dumps({"done": done, "errors": errors}), flush=True)
sys.stdin.readline()  # shut down only when every process has finished
for h in handlers:
    try: h.shutdown()
    except BaseException: pass
"""


RESULT_LIMIT_S = 330.0  # the agents' own limit (AGENT_LIMIT_S) and then some


def _rendezvous_once(python: str, kind: str, endpoint: str, n: int, processes: int = 4) -> float:
    run_id = "bench-" + uuid.uuid4().hex[:8]
    counts = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    procs = [
        subprocess.Popen([python, "-c", _AGENT_CHILD, kind, endpoint, run_id, str(n), str(c)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(), start_new_session=True)
        for c in counts if c
    ]
    try:
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != "ready":
                raise RuntimeError(f"agent process failed: {p.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        t0 = time.monotonic()
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        finished: list[float] = []
        deadline = t0 + RESULT_LIMIT_S
        for p in procs:
            # Bounded: an agent process that hangs or dies without its result line ends the cell.
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = p.stdout.readline() if ready else ""  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"agent process {p.pid} gave no result within {RESULT_LIMIT_S:.0f} s"
                                   + (f" (exit code {p.poll()})" if p.poll() is not None else ""))
            result = json.loads(line)
            if result["errors"]:
                raise RuntimeError(f"rendezvous failed: {result['errors'][:3]}")
            finished += result["done"]
        for p in procs:
            p.stdin.write("bye\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        if len(finished) != n:
            raise RuntimeError(f"{len(finished)} of {n} agents finished")
        return max(finished) - t0
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]  # a waiting agent reads EOF and exits
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(p)


def _rendezvous_cell(times: list[float], errors: list[str]) -> dict[str, Any]:
    cell: dict[str, Any] = _cell(times) if times else {"median": None, "n": 0}
    cell["failed"] = len(errors)
    if errors:
        cell["errors"] = errors[:3]
    return cell


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


# -- the run ---------------------------------------------------------------------------------
SIZES = [8, 16, 32, 64, 128]


def run(quick: bool = False, reps: int = 5, sizes: list[int] | None = None, log: Any = print) -> dict[str, Any]:
    """One run: every configuration up at once, repetitions alternated (rep 1 of every cell,
    then rep 2, ..., the order of the configurations rotated each repetition)."""
    n_ops = 300 if quick else 1000
    sizes = sizes or ([8, 32] if quick else SIZES)
    torch_ok = os.path.exists(TORCH_PYTHON)
    gw_ok = os.path.exists(GW_PYTHON)
    res: dict[str, Any] = {"machine": machine_info(), "reps": reps, "ops_per_rep": n_ops, "sizes": sizes,
                           "latency": {}, "client": {}, "rendezvous": {}, "loadavg": []}
    res["etcd_version"] = subprocess.run([ETCD, "--version"], capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
    py = sys.executable
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        fsync = stack.enter_context(etcd_cluster(1, False))
        nofsync = stack.enter_context(etcd_cluster(1, True))
        three = stack.enter_context(etcd_cluster(3, False))
        srv = start_server("ours")
        stack.callback(stop_process, srv.proc)
        torch_port = None
        if torch_ok:
            proc = subprocess.Popen([TORCH_PYTHON, str(HERE / "_procs.py"), "torch-serve"], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, start_new_session=True)
            stack.callback(stop_process, proc)
            torch_port = int(proc.stdout.readline().split()[1])  # type: ignore[union-attr]
        # (name, python, child kind, target)
        latency = [
            ("EtcdStore, etcd 1 member, fsync (default)", py, "etcd", fsync[0]),
            ("EtcdStore, etcd 1 member, --unsafe-no-fsync", py, "etcd", nofsync[0]),
            ("EtcdStore, etcd 3 members, fsync", py, "etcd", ",".join(three)),
            ("TCPStore, our server", py, "ours", str(srv.port)),
        ]
        if torch_port:
            latency.append(("torch TCPStore, torch's libuv server", TORCH_PYTHON, "torch", str(torch_port)))
        client = [(f"stdlib http.client, {lbl}", py, "stdlib", url) for lbl, url in
                  [("etcd 1 member, fsync (default)", fsync[0]), ("etcd 1 member, --unsafe-no-fsync", nofsync[0])]]
        if gw_ok:
            client += [(f"etcd3gw, {lbl}", GW_PYTHON, "etcd3gw", url) for lbl, url in
                       [("etcd 1 member, fsync (default)", fsync[0]), ("etcd 1 member, --unsafe-no-fsync", nofsync[0])]]
        rdzv = [
            ("our handler, etcd-v3 backend (1 member, fsync)", py, "ours-etcd", fsync[0].replace("http://", "")),
            ("our handler, etcd-v3 backend (1 member, --unsafe-no-fsync)", py, "ours-etcd", nofsync[0].replace("http://", "")),
            ("our handler, c10d backend (our TCP server)", py, "ours-c10d", f"127.0.0.1:{srv.port}"),
        ]
        if torch_port:
            rdzv.append(("torch's handler, c10d backend (torch's TCP server)", TORCH_PYTHON, "torch-c10d", f"127.0.0.1:{torch_port}"))
        lat_runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in latency}
        raw_runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in client}
        rdzv_runs: dict[str, dict[int, tuple[list[float], list[str]]]] = {c[0]: {n: ([], []) for n in sizes} for c in rdzv}

        def rotated(items: list[Any], rep: int) -> list[Any]:
            k = rep % len(items)
            return items[k:] + items[:k]

        for rep in range(reps):
            res["loadavg"].append({"rep": rep + 1, "at_start": _loadavg()})
            log(f"repetition {rep + 1}/{reps}: load average {_loadavg()}")
            for name, python, kind, target in rotated(latency, rep):
                lat_runs[name].append(_run_child(python, _LATENCY_CHILD, [kind, target, str(n_ops), ",".join(OPS)], 600))
            for name, python, kind, url in rotated(client, rep):
                raw_runs[name].append(_run_child(python, _RAW_CHILD, [url, str(n_ops), kind], 600))
            for n in sizes:
                for name, python, kind, endpoint in rotated(rdzv, rep):
                    log(f"  rendezvous N={n}: {name}")
                    times, errors = rdzv_runs[name][n]
                    try:
                        times.append(_rendezvous_once(python, kind, endpoint, n))
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                        errors.append(str(exc)[:300])
            res["loadavg"][-1]["at_end"] = _loadavg()
    res["latency"] = {name: _latency_cell(runs) for name, runs in lat_runs.items()}
    res["client"] = {name: _raw_cell(runs) for name, runs in raw_runs.items()}
    res["rendezvous"] = {name: {str(n): _rendezvous_cell(*cells[n]) for n in sizes} for name, cells in rdzv_runs.items()}
    res["seconds"] = round(time.monotonic() - t_start, 1)
    return res


def _fmt(cell: dict[str, Any], unit: str = "") -> str:
    return f"{cell['median']:.2f}{unit} ({cell['min']:.2f}-{cell['max']:.2f})"


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# etcd v3 benchmark results",
        "",
        "Generated by `python -m benchmarks.bench_etcd`; do not edit by hand.",
        "",
        f"Machine: {m.get('host_cpu', '?')}, {m.get('cpus', '?')} cores, load average at start {m.get('loadavg_start', '?')} "
        f"(other jobs share the cores); Python {m.get('python', '?')}; {res['etcd_version']}; commit {m.get('git', '?')}. "
        f"{res['reps']} repetitions of {res['ops_per_rep']} sequential operations per cell (after warm-up), one client, loopback; "
        "etcd data on the real disk. Cells: median over repetitions of each repetition's median, "
        "in ms, with the range across repetitions.",
        "",
        "## Latency per operation (ms)",
        "",
        "| store | " + " | ".join(OPS) + " |",
        "|---|" + "---|" * len(OPS),
    ]
    for name, cells in res["latency"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cells[op]["median"]) for op in OPS) + " |")
    lines += ["", "p99 (median over repetitions, ms):", "", "| store | " + " | ".join(OPS) + " |", "|---|" + "---|" * len(OPS)]
    for name, cells in res["latency"].items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[op]['p99']['median']:.2f}" for op in OPS) + " |")
    lat = res["latency"]
    base = lat.get("TCPStore, our server")
    fs, nfs = lat.get("EtcdStore, etcd 1 member, fsync (default)"), lat.get("EtcdStore, etcd 1 member, --unsafe-no-fsync")
    lines += ["", "`set` on a TCPStore has no reply in the c10d protocol (the client only sends), so its "
              "TCP figure is the cost of a send; every EtcdStore call waits for etcd's answer."]
    if base and fs:
        lines += ["", "Ratios (EtcdStore on 1 member with fsync / our TCP server, median; `set` left out, see above): " + ", ".join(
            f"{op} {fs[op]['median']['median'] / base[op]['median']['median']:.0f}x" for op in OPS if op != "set") + "."]
    if fs and nfs:
        lines += ["", "The cost of fsync (1 member, fsync minus --unsafe-no-fsync, median ms): " + ", ".join(
            f"{op} {fs[op]['median']['median'] - nfs[op]['median']['median']:+.2f}" for op in OPS)
            + ". Reads (`get`, `check`) do not fsync; every write (set, add, compare_set: one transaction each) waits for one."]
    lines += [
        "",
        "## Client choice: raw gateway calls (ms)",
        "",
        "The same member, `put` of a 16-byte value and a linearizable `range`, one connection, no store logic.",
        "",
        "| client | put | range |",
        "|---|---|---|",
    ]
    for name, cells in res["client"].items():
        lines.append(f"| {name} | {_fmt(cells['put']['median'])} | {_fmt(cells['range']['median'])} |")
    lines += [
        "",
        "## Rendezvous completion (s)",
        "",
        "N agents (threads in 4 processes), `min_nodes = max_nodes = N`, from release to the last rank;"
        " includes the handler's random 0-0.3 s first-round delay.",
        "",
    ]
    sizes = sorted({int(n) for cells in res["rendezvous"].values() for n in cells})
    lines += ["| backend | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]

    def rcell(cells: dict[str, Any], n: int) -> str:
        c = cells.get(str(n))
        if c is None:
            return "-"
        if not c.get("n"):
            return f"did not complete ({c['failed']} of {c['failed']} runs failed)"
        text = _fmt(c)
        if c.get("failed"):
            text += f", {c['failed']} of {c['n'] + c['failed']} runs failed"
        return text

    for name, cells in res["rendezvous"].items():
        lines.append(f"| {name} | " + " | ".join(rcell(cells, n) for n in sizes) + " |")
    failures = [(name, n, c["errors"][0]) for name, cells in res["rendezvous"].items() for n, c in cells.items() if c.get("errors")]
    if failures:
        lines += ["", "First error of each failed cell:", ""] + [f"- {name}, N={n}: `{err[:200]}`" for name, n, err in failures]
    lines += [
        "",
        "Load average (1, 5, 15 min) at the start and end of each repetition: "
        + "; ".join(f"rep {x['rep']}: {x['at_start']} -> {x.get('at_end', '?')}" for x in res.get("loadavg", []))
        + f". Whole run: {res.get('seconds', '?')} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_etcd", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer operations, N up to 32")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per cell (default 5)")
    ap.add_argument("--sizes", default=None, help="comma-separated rendezvous sizes (default 8,16,32,64,128; 8,32 with --quick)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory")
    args = ap.parse_args(argv)
    if not os.path.exists(ETCD):
        print("no etcd binary: set ETCD_BINARY or install etcd-server", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    res = run(quick=args.quick, reps=args.reps, sizes=sizes, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "etcd.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "etcd.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
