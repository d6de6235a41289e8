"""Rendezvous completion time: N elastic agents (processes x threads) form one round.

    python -m benchmarks.bench_rendezvous [--quick] [--reps 5] [--sizes 8,32,128,256] [--out DIR]

Pairings (handler / server):

* ``ours/ours``: our DynamicRendezvousHandler + our TCPStore client, on ``rdzv-store serve``;
* ``torch/torch``: torch 2.13's handler + torch's TCPStore client, on torch's libuv server;
* ``torch/ours``: torch's handler + torch's client, on our server.

Each agent has its own store client and backend; min_nodes = max_nodes = N, so the round
completes when the N-th node joins (no last call). Wall time = the common "go" to the last
``next_rendezvous()`` returning (CLOCK_MONOTONIC is one clock for all processes of a host). Every
backend is wrapped in the same counting proxy, so compare_set counts (``set_state`` calls plus
the one sentinel ``compare_set`` per backend) and state bytes moved (state bytes sent and received
by ``set_state``/``get_state``, before base64) are counted identically for both handlers.

Runs alternate between pairings within each repetition; medians of the repetitions are reported
with their spread (half of max-min over the median) and the load average before and after. The
torch side runs in an interpreter that has torch (this one, or ``/work/venv-torch/bin/python``).
Writes ``rendezvous.md`` and ``rendezvous.json`` into ``--out`` (default ``benchmarks/results``).
Every process is stopped in a ``finally``, also when the run is interrupted: SIGINT, SIGTERM and
SIGHUP unwind through those ``finally`` blocks, an exit hook stops whatever is still tracked, and
each child has ``PR_SET_PDEATHSIG`` so that it stops even if this runner is killed with SIGKILL.
Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # `python benchmarks/bench_rendezvous.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from .common import HERE, REPO, install_cleanup, machine_info, reexec_with_shim, spawn, start_server, stop_process, summarize

PAIRS = [("ours", "ours"), ("torch", "torch"), ("torch", "ours")]
RUN_TIMEOUT = 150.0
GIVE_UP_AFTER = 2  # a pairing that failed this many repetitions at an N (and never completed) stops there
HOST = "127.0.0.1"


def _torch_python() -> str | None:
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    candidate = Path("/work/venv-torch/bin/python")
    return str(candidate) if candidate.exists() else None


def _layout(n: int) -> tuple[int, int]:
    """(processes, threads per process) for n agents."""
    procs = 2 if n <= 8 else 4
    return procs, n // procs


# -- worker side (one process, T agents as threads) ------------------------------------------------


class _Counting:
    """Wraps a rendezvous backend; counts calls and state bytes. Same code for both handlers."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.sets = self.gets = self.bytes = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self._inner.name)

    def get_state(self) -> Any:
        result = self._inner.get_state()
        with self._lock:
            self.gets += 1
            self.bytes += len(result[0]) if result else 0
        return result

    def set_state(self, state: bytes, token: Any = None) -> Any:
        result = self._inner.set_state(state, token)
        with self._lock:
            self.sets += 1
            self.bytes += len(state) + (len(result[0]) if result else 0)
        return result


def _worker(args: dict[str, Any]) -> int:
    impl, port, threads, n, run_id = args["impl"], args["port"], args["threads"], args["n"], args["run_id"]
    if impl == "torch":
        from torch.distributed import TCPStore
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler, RendezvousTimeout
    else:
        from rdzv_backend import C10dRendezvousBackend, DynamicRendezvousHandler, RendezvousTimeout  # type: ignore[assignment]
        from rdzv_store import TCPStore  # type: ignore[assignment]
    from datetime import timedelta

    go = threading.Event()
    results: list[dict[str, Any]] = []
    handlers: list[Any] = []
    stores: list[Any] = []
    backends: list[_Counting] = []
    lock = threading.Lock()
    for _ in range(threads):
        store = TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=RUN_TIMEOUT))
        backend = _Counting(C10dRendezvousBackend(store, run_id))
        handler = DynamicRendezvousHandler.from_backend(
            run_id, store, backend, n, n, HOST, RendezvousTimeout(join=timedelta(seconds=RUN_TIMEOUT))
        )
        stores.append(store), backends.append(backend), handlers.append(handler)

    def agent(handler: Any) -> None:
        go.wait(RUN_TIMEOUT)
        try:
            info = handler.next_rendezvous()
            rec = {"done": time.monotonic(), "rank": info.rank, "world": info.world_size}
        except Exception as exc:  # reported, the runner counts it
            rec = {"done": time.monotonic(), "error": f"{type(exc).__name__}: {exc}"}
        with lock:
            results.append(rec)

    ts = [threading.Thread(target=agent, args=(h,), daemon=True) for h in handlers]
    for t in ts:
        t.start()
    print("ready", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        return 1
    go.set()
    for t in ts:
        t.join(RUN_TIMEOUT)
    for h in handlers:
        h._stop_heartbeats()
    print(json.dumps({
        "agents": results,
        "compare_set": sum(b.sets for b in backends) + len(backends),  # + the sentinel per backend
        "get_state": sum(b.gets for b in backends),
        "bytes": sum(b.bytes for b in backends),
    }), flush=True)
    os._exit(0)  # torch's agent-store servers and heartbeat threads: do not wait for them


# -- runner side ----------------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen, deadline: float) -> str:
    assert proc.stdout is not None
    import selectors

    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("worker did not answer in time")
            if sel.select(remaining):
                chunk = os.read(proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    raise RuntimeError(f"worker exited (rc={proc.poll()})")
                buf += chunk
    return buf.decode()


def run_once(handler: str, server_impl: str, n: int, torch_python: str | None) -> dict[str, Any]:
    procs_n, threads = _layout(n)
    python = torch_python if handler == "torch" else sys.executable
    if python is None:
        raise RuntimeError("torch is not available")
    srv = _start(server_impl, torch_python)
    workers: list[subprocess.Popen] = []
    try:
        run_id = f"bench{n}"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for _ in range(procs_n):
            spec = json.dumps({"impl": handler, "port": srv.port, "threads": threads, "n": n, "run_id": run_id})
            workers.append(spawn(
                [python, "-m", "benchmarks.bench_rendezvous", "--worker", spec], cwd=str(REPO), env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            ))
        deadline = time.monotonic() + 120
        for w in workers:
            assert _read_line(w, deadline).strip() == "ready"
        t0 = time.monotonic()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(b"go\n")
            w.stdin.flush()
        deadline = time.monotonic() + RUN_TIMEOUT + 30
        reports = [json.loads(_read_line(w, deadline)) for w in workers]
    finally:
        for w in workers:
            stop_process(w, timeout=5)
        stop_process(srv.proc)
    agents = [a for r in reports for a in r["agents"]]
    errors = [a["error"] for a in agents if "error" in a]
    ranks = sorted(a["rank"] for a in agents if "rank" in a)
    ok = not errors and ranks == list(range(n)) and len(agents) == n
    return {
        "seconds": max(a["done"] for a in agents) - t0,
        "compare_set": sum(r["compare_set"] for r in reports),
        "get_state": sum(r["get_state"] for r in reports),
        "bytes": sum(r["bytes"] for r in reports),
        "ok": ok,
        "errors": errors[:3],
    }


def _start(server_impl: str, torch_python: str | None) -> Any:
    if server_impl == "ours":
        return start_server("ours")
    # torch's server from the torch interpreter (start_server uses sys.executable)
    from .common import _child_env, _read_port, ServerProc

    proc = spawn([torch_python or sys.executable, str(HERE / "_procs.py"), "torch-serve"],
                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_child_env())
    try:
        port = _read_port(proc, r"port (\d+)", 60)
    except BaseException:
        stop_process(proc)
        raise
    return ServerProc("torch", proc, port)


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rendezvous completion time, ours vs torch's")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="sizes 8,32, 2 repetitions (smoke run)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", default="8,32,128,256")
    ap.add_argument("--no-torch", action="store_true", help="measure ours/ours only")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(json.loads(args.worker))
    torch_python = None if args.no_torch else _torch_python()
    if torch_python:
        reexec_with_shim("benchmarks.bench_rendezvous")  # as every torch benchmark: no reverse-DNS stalls
    install_cleanup()  # SIGTERM/SIGHUP unwind like Ctrl-C: the server and the workers are stopped
    sizes = [8, 32] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = 2 if args.quick else args.reps
    pairs = PAIRS if torch_python else PAIRS[:1]
    info = machine_info()
    info["loadavg_start"] = _loadavg()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {str(n): {f"{h}/{s}": [] for h, s in pairs} for n in sizes}
    for n in sizes:
        for rep in range(reps):
            order = pairs if rep % 2 == 0 else list(reversed(pairs))  # alternate, and alternate the order
            for h, s in order:
                done = raw[str(n)][f"{h}/{s}"]
                if len(done) >= GIVE_UP_AFTER and not any(r.get("ok") for r in done):
                    continue  # failed every time so far: each failure costs the whole join timeout
                try:
                    res = run_once(h, s, n, torch_python)
                except Exception as exc:  # noqa: BLE001 - a failed run is reported, not fatal
                    res = {"seconds": None, "ok": False, "errors": [f"{type(exc).__name__}: {exc}"]}
                raw[str(n)][f"{h}/{s}"].append(res)
                print(f"N={n} rep={rep} {h}/{s}: {res.get('seconds')} s ok={res.get('ok')} "
                      f"cas={res.get('compare_set')} {res.get('errors') or ''}", flush=True)
                _write(args.out, info, args.quick, reps, raw)  # after each run: a partial run still reports
    return 0


def _write(out_dir: str, info: dict[str, Any], quick: bool, reps: int, raw: dict[str, Any]) -> None:
    info["loadavg_end"] = _loadavg()
    results: dict[str, Any] = {"machine": info, "quick": quick, "reps": reps, "runs": raw, "summary": {}}
    for n, cells in raw.items():
        if not any(cells.values()):
            continue
        for pair, runs in cells.items():
            good = [r for r in runs if r.get("ok")]
            results["summary"].setdefault(n, {})[pair] = {
                "seconds": summarize([r["seconds"] for r in good]),
                "compare_set": summarize([r["compare_set"] for r in good]),
                "get_state": summarize([r["get_state"] for r in good]),
                "bytes": summarize([r["bytes"] for r in good]),
                "failed": len(runs) - len(good),
                # how hard the failed runs tried: compare_sets issued before the join timeout
                "failed_compare_set": summarize([r["compare_set"] for r in runs if not r.get("ok") and r.get("compare_set")]),
            }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rendezvous.json").write_text(json.dumps(results, indent=1))
    (out / "rendezvous.md").write_text(_report(results))


def _fmt(cell: dict[str, Any], key: str, fmt: str) -> str:
    s = cell[key]
    if s["median"] is None:
        return "-"
    return fmt.format(s["median"])


def _failed(cell: dict[str, Any]) -> str:
    tried = (cell.get("failed_compare_set") or {}).get("median")
    return f"{cell['failed']}" + (f" ({tried:,.0f} compare_sets each, median)" if tried else "")


def _report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Rendezvous completion time (generated by `python -m benchmarks.bench_rendezvous`; do not edit)",
        "",
        f"{m['date']}, {m['host_cpu']} ({m['cpus']} CPUs), Python {m['python']}, torch {m.get('torch')}, "
        f"git {m.get('git')}{', QUICK mode' if results['quick'] else ''}.",
        f"Load average before: `{m['loadavg_start']}`; after: `{m['loadavg_end']}`.",
        "",
        f"N agents (processes x threads), min_nodes = max_nodes = N; median of up to {results['reps']} repetitions "
        "(column `runs`: how many completed), "
        "alternated; spread = (max-min)/2/median. compare_set = set_state calls + one sentinel per "
        "backend; bytes = state bytes sent and received (before base64), summed over all agents. "
        f"A pairing whose first {GIVE_UP_AFTER} repetitions at an N both failed (each failure takes the "
        f"whole {RUN_TIMEOUT:.0f} s join timeout) is not repeated at that N.",
        "",
        "| N | handler/server | seconds | spread | vs torch/torch | compare_set | get_state | bytes moved | runs | failed runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, cells in results["summary"].items():
        base = cells.get("torch/torch", {}).get("seconds", {}).get("median")
        for pair, cell in cells.items():
            med = cell["seconds"]["median"]
            ratio = f"{med / base:.2f}x" if med and base else "-"
            spread = f"{cell['seconds']['spread'] * 100:.0f}%" if cell["seconds"]["spread"] is not None else "-"
            lines.append(
                f"| {n} | {pair} | {_fmt(cell, 'seconds', '{:.2f}')} | {spread} | {ratio} | "
                f"{_fmt(cell, 'compare_set', '{:.0f}')} | {_fmt(cell, 'get_state', '{:.0f}')} | "
                f"{_fmt(cell, 'bytes', '{:,.0f}')} | {cell['seconds']['n']} | {_failed(cell)} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
