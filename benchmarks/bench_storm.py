"""Connection storms, torch-style init, and server memory with many idle connections.

Storm: N clients (threads in 16 forked processes) connect at the same
instant, ``add("ready", 1)``; the client that sees N sets ``done``; all
``wait(["done"])``. Wall time = common start to the last client done.
Clients keep their connections open until their whole process is done.

Init: a torch-style master ``TCPStore(world_size=N+1, is_master=True,
wait_for_workers=True)`` runs in its own fresh process; N worker clients
``TCPStore(world_size=N+1, wait_for_workers=True)`` each ``ADD init/``.
Wall time = common start of the clients to the master's constructor return.

Pairings ("client->server"): ``torch->torch``, ``torch->ours`` (the same
torch C++ clients, so only the server differs) and ``ours->ours``.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from typing import Any

from .common import (
    HOST,
    close_client,
    free_port,
    make_client,
    rss_kib,
    server,
    start_master,
    stop_process,
    summarize,
)
from .workers import run_forked

PAIRS = [("torch", "torch"), ("torch", "ours"), ("ours", "ours")]
STORE_TIMEOUT = 120.0


def pair_name(client: str, srv: str) -> str:
    return f"{client}->{srv}"


def _storm_worker(index: int, ready: Any, go: Any, impl: str, port: int, n_total: int, per_proc: int,
                  mode: str, bound: float) -> dict[str, Any]:
    """One process of the storm: ``per_proc`` threads, one client each."""
    threading.stack_size(512 * 1024)
    start = threading.Event()
    release = threading.Event()
    results: list[tuple[float, float, str | None]] = []
    lock = threading.Lock()
    stores: list[Any] = []

    def client() -> None:
        start.wait()
        t0 = time.monotonic()
        conn = done = float("nan")
        error = None
        try:
            if mode == "init":
                store = make_client(impl, port, STORE_TIMEOUT, world_size=n_total + 1, wait_for_workers=True)
                conn = done = time.monotonic() - t0
            else:
                store = make_client(impl, port, STORE_TIMEOUT)
                conn = time.monotonic() - t0
                if store.add("ready", 1) == n_total:
                    store.set("done", "1")
                store.wait(["done"])
                done = time.monotonic()
            with lock:
                stores.append(store)
        except Exception as exc:  # counted, reported
            error = f"{type(exc).__name__}: {exc}"[:200]
        with lock:
            results.append((conn, done, error))
        if mode == "init":
            release.wait(bound)  # keep the connection open until the master has returned

    threads = [threading.Thread(target=client, daemon=True) for _ in range(per_proc)]
    for t in threads:
        t.start()
    ready.release()
    go.wait()
    start.set()
    deadline = time.monotonic() + bound
    while len(results) < per_proc and time.monotonic() < deadline:
        time.sleep(0.005)
    if mode == "init":
        # the parent tells us when the master returned by closing the master; bounded anyway
        go_release_at = deadline
        while time.monotonic() < go_release_at and not _master_done_flag(port):
            time.sleep(0.01)
        release.set()
    for t in threads:
        t.join(timeout=5)
    with lock:
        for store in stores:
            close_client(store)
        rows = list(results)
    errors = [e for _, _, e in rows if e]
    return {
        "connect": [c for c, _, e in rows if not e],
        "done": [d for _, d, e in rows if not e],
        "errors": len(errors) + (per_proc - len(rows)),
        "first_error": errors[0] if errors else None,
    }


def _master_done_flag(port: int) -> bool:
    """Init mode: the parent creates this file once the master's constructor has returned."""
    import os
    import tempfile

    return os.path.exists(os.path.join(tempfile.gettempdir(), f"rdzv-bench-init-{port}.done"))


def _run_clients(client: str, port: int, n: int, mode: str, processes: int, bound: float) -> tuple[float, list[Any], int]:
    """Fork the clients: ``processes`` processes of N/processes threads each (one process if N does not divide)."""
    procs = max(1, min(processes, n))
    if n % procs:
        procs = 1
    per = n // procs
    t0, results = run_forked(_storm_worker, procs, (client, port, n, per, mode, bound), timeout=bound + 30)
    return t0, results, per


def _summary_from(t0: float, results: list[Any], per: int, end: float | None = None) -> dict[str, Any]:
    connect: list[float] = []
    done: list[float] = []
    errors = 0
    first = None
    for r in results:
        if isinstance(r, dict):
            connect += r["connect"]
            done += r["done"]
            errors += r["errors"]
            first = first or r["first_error"]
        else:  # the whole process failed: all its clients count as errors
            errors += per
            first = first or str(r)
    connect.sort()
    ok = len(connect)
    wall = (end if end is not None else (max(done) if done else float("nan"))) - t0
    return {
        "wall_s": wall if errors == 0 else None,
        "wall_s_incl_errors": wall,
        "connect_p50_ms": connect[ok // 2] * 1e3 if ok else None,
        "connect_max_ms": connect[-1] * 1e3 if ok else None,
        "errors": errors,
        "first_error": first,
    }


def storm_once(client: str, srv_impl: str, n: int, processes: int, bound: float) -> dict[str, Any]:
    with server(srv_impl) as srv:
        t0, results, per = _run_clients(client, srv.port, n, "storm", processes, bound)
        return _summary_from(t0, results, per)


def init_once(client: str, srv_impl: str, n: int, processes: int, bound: float) -> dict[str, Any]:
    import os
    import tempfile

    port = free_port()
    flag = os.path.join(tempfile.gettempdir(), f"rdzv-bench-init-{port}.done")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(flag)
    master = start_master(srv_impl, port, n + 1)
    try:
        time.sleep(0.2)  # let the master's own client join (it counts as 1 of N+1)
        returned: list[float] = []

        def watch() -> None:
            # read the master's "returned <t>" line; then release the clients
            assert master.stdout is not None
            deadline = time.monotonic() + bound + 30
            buf = b""
            os.set_blocking(master.stdout.fileno(), False)
            while time.monotonic() < deadline:
                try:
                    chunk = master.stdout.read()
                except BlockingIOError:
                    chunk = None
                if chunk:
                    buf += chunk
                    m = re.search(rb"returned ([0-9.]+)", buf)
                    if m:
                        returned.append(float(m.group(1)))
                        break
                if master.poll() is not None:
                    break
                time.sleep(0.002)
            open(flag, "w").close()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0, results, per = _run_clients(client, port, n, "init", processes, bound)
        watcher.join(timeout=bound + 35)
        summary = _summary_from(t0, results, per, end=returned[0] if returned else float("nan"))
        if not returned:
            summary["wall_s"] = None
            summary["errors"] = summary["errors"] or 1
            summary["first_error"] = summary["first_error"] or "master did not return"
        return summary
    finally:
        stop_process(master)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(flag)


def storms(pairs: list[tuple[str, str]], sizes: list[int], reps_for: Any, processes: int, bound: float,
           mode: str = "storm") -> dict[str, Any]:
    """Storm (or init) figure for each N and client->server pairing."""
    once = storm_once if mode == "storm" else init_once
    out: dict[str, Any] = {}
    for n in sizes:
        per_pair: dict[str, list[dict]] = {pair_name(*p): [] for p in pairs}
        for rep in range(reps_for(n)):
            order = pairs if rep % 2 == 0 else list(reversed(pairs))
            for client, srv in order:
                try:
                    res = once(client, srv, n, processes, bound)
                except Exception as exc:  # a failed repetition is reported, never fatal
                    res = {"wall_s": None, "errors": n, "first_error": f"{type(exc).__name__}: {exc}"[:200]}
                per_pair[pair_name(client, srv)].append(res)
        cell: dict[str, Any] = {}
        for name, rows in per_pair.items():
            cell[name] = {
                "wall_s": summarize([r["wall_s"] for r in rows if r.get("wall_s") is not None]),
                "connect_p50_ms": summarize([r["connect_p50_ms"] for r in rows if r.get("connect_p50_ms")]),
                "connect_max_ms": summarize([r["connect_max_ms"] for r in rows if r.get("connect_max_ms")]),
                "errors": sum(r.get("errors", 0) for r in rows),
                "reps": len(rows),
                "first_error": next((r["first_error"] for r in rows if r.get("first_error")), None),
            }
        out[str(n)] = cell
    return out


# -- memory ----------------------------------------------------------------------------------


def _handshake(port: int) -> socket.socket:
    """An idle, validated connection (VALIDATE + PING, as torch's client does)."""
    from rdzv_store.client import connect_with_retry

    return connect_with_retry(HOST, port, 60.0)


def memory(impls: list[str], connections: int, reps: int) -> dict[str, Any]:
    """Server RSS with ``connections`` idle validated connections (fresh server each time)."""
    out: dict[str, Any] = {}
    raw: dict[str, dict[str, list[float]]] = {impl: {"idle_mib": [], "loaded_mib": [], "delta_mib": []} for impl in impls}
    for rep in range(reps):
        for impl in impls if rep % 2 == 0 else list(reversed(impls)):
            with server(impl) as srv:
                time.sleep(0.2)
                before = srv.rss_kib()
                socks = []
                try:
                    for _ in range(connections):
                        socks.append(_handshake(srv.port))
                    time.sleep(0.5)
                    after = rss_kib(srv.pid)
                finally:
                    for s in socks:
                        s.close()
                raw[impl]["idle_mib"].append(before / 1024)
                raw[impl]["loaded_mib"].append(after / 1024)
                raw[impl]["delta_mib"].append((after - before) / 1024)
    for impl in impls:
        out[impl] = {k: summarize(v) for k, v in raw[impl].items()}
    return out
