"""Connection storms, torch-style init, and server memory with many idle connections.

Storm: N clients (threads in 16 forked processes) connect at the same
instant, ``add("ready", 1)``; the client that sees N sets ``done``; all
``wait(["done"])``. Wall time = common start to the last client done.
Clients keep their connections open until their whole process is done.

Init: a torch-style master ``TCPStore(world_size=N+1, is_master=True,
wait_for_workers=True)`` runs in its own fresh process; N worker clients
``TCPStore(world_size=N+1, wait_for_workers=True)`` each ``ADD init/``.
Wall time = common start of the clients to the master's constructor return.

Each repetition runs in a network namespace of its own when the runner is root
(``netns``): the previous repetition's 16,384 TIME_WAIT sockets would otherwise
slow the next one's connects, whichever pair it is, and the kernel's counters of
accept-queue overflows and SYN retransmits are then that repetition's alone.

Pairings ("client->server"): ``torch->torch``, ``torch->ours`` (the same
torch C++ clients, so only the server differs) and ``ours->ours``.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .common import (
    CLK_TCK,
    HOST,
    client_class,
    close_client,
    cpu_times,
    free_port,
    make_client,
    rss_kib,
    server,
    start_master,
    stop_process,
    summarize,
)
from . import netns
from .workers import run_forked

PAIRS = [("torch", "torch"), ("torch", "ours"), ("ours", "ours")]
STORE_TIMEOUT = 120.0
FD_MARGIN = 128  # descriptors a process needs besides its connections (pipes, libraries, listener)
THREAD_STACK = 512 * 1024


# -- when the machine, not the store, is the limit ------------------------------------------------


def _int_file(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def machine_limit(n: int, processes: int, threads: bool = True) -> str | None:
    """Why this machine cannot hold ``n`` client connections to one server, or None if it can.

    The server process holds ``n`` connections, each of ``processes`` client processes ``n /
    processes``, all under the RLIMIT_NOFILE the runner raised as far as the hard limit allows;
    every connection to the one server port needs its own ephemeral source port (torch's client
    cannot pick a source address, so 127.0.0.x aliases do not help it); every client is a thread.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per = -(-n // max(1, processes))
    if n + FD_MARGIN > soft:
        return (f"machine limit: RLIMIT_NOFILE {soft} (hard {hard}) < {n} server connections + {FD_MARGIN}; "
                "raise the hard limit (ulimit -Hn)")
    if per + FD_MARGIN > soft:
        return f"machine limit: RLIMIT_NOFILE {soft} < {per} connections per client process + {FD_MARGIN}"
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        if n > hi - lo + 1:
            return (f"machine limit: {n} connections to one port need {n} ephemeral ports, "
                    f"net.ipv4.ip_local_port_range has {hi - lo + 1}")
    except (OSError, ValueError):
        pass
    if threads:
        pids_max = _int_file("/sys/fs/cgroup/pids.max")
        pids_now = _int_file("/sys/fs/cgroup/pids.current") or 0
        threads_max = _int_file("/proc/sys/kernel/threads-max")
        need = n + 4 * processes + 64
        for name, cap, used in (("cgroup pids.max", pids_max, pids_now), ("kernel.threads-max", threads_max, 0)):
            if cap is not None and used + need > cap:
                return f"machine limit: {n} client threads + {used} tasks in use > {name} {cap}"
    avail = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    need_bytes = n * 256 * 1024  # generous: a client thread + two socket ends + server-side state
    if avail is not None and need_bytes > avail:
        return f"machine limit: ~{need_bytes >> 20} MiB needed for {n} clients, {avail >> 20} MiB available"
    return None


_MACHINE_ERRORS = ("Too many open files", "Cannot assign requested address", "Cannot allocate memory",
                   "can't start new thread", "EMFILE", "ENFILE",
                   "EADDRNOTAVAIL", "ENOMEM", "No buffer space available", "too many open files")


def machine_error(message: str | None) -> bool:
    """An error that the machine (descriptors, ports, memory, threads) raised, not the store."""
    return bool(message) and any(m in message for m in _MACHINE_ERRORS)


def pair_name(client: str, srv: str) -> str:
    return f"{client}->{srv}"


def _storm_worker(index: int, ready: Any, go: Any, impl: str, port: int, n_total: int, per_proc: int,
                  mode: str, bound: float) -> dict[str, Any]:
    """One process of the storm: ``per_proc`` threads, one client each."""
    # Import the client's package before saying ready: a runner that has not imported torch
    # yet (``--only storm``) would otherwise time 16 processes importing torch (~13 s), not a storm.
    client_class(impl)
    threading.stack_size(THREAD_STACK)
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
    started = 0
    thread_error = None
    for t in threads:
        try:
            t.start()
        except RuntimeError as exc:  # "can't start new thread": the machine's limit, reported as such
            thread_error = f"{type(exc).__name__}: {exc}"
            break
        started += 1
    threads = threads[:started]
    ready.release()
    go.wait()
    start.set()
    deadline = time.monotonic() + bound
    while len(results) < started and time.monotonic() < deadline:
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
    if thread_error:
        errors.insert(0, thread_error)
    return {
        "connect": [c for c, _, e in rows if not e],
        "done": [d for _, d, e in rows if not e],
        "errors": len(errors) - (1 if thread_error else 0) + (per_proc - len(rows)),
        "first_error": errors[0] if errors else None,
        "machine_errors": sum(1 for e in errors[1 if thread_error else 0:] if machine_error(e))
        + (per_proc - started if thread_error else 0),
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
    errors = machine = 0
    first = None
    for r in results:
        if isinstance(r, dict):
            connect += r["connect"]
            done += r["done"]
            errors += r["errors"]
            machine += r.get("machine_errors", 0)
            first = first or r["first_error"]
        else:  # the whole process failed: all its clients count as errors
            errors += per
            machine += per if machine_error(str(r)) else 0
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
        "machine_errors": machine,
        "first_error": first,
    }


def storm_once(client: str, srv_impl: str, n: int, processes: int, bound: float) -> dict[str, Any]:
    with server(srv_impl) as srv:
        user0, sys0 = cpu_times(srv.pid)
        t0, results, per = _run_clients(client, srv.port, n, "storm", processes, bound)
        user1, sys1 = cpu_times(srv.pid)
    res = _summary_from(t0, results, per)
    # The server's CPU per storm connection (accept, handshake, add, wait, release), from /proc.
    res["server_user_us"] = (user1 - user0) / CLK_TCK / n * 1e6
    res["server_sys_us"] = (sys1 - sys0) / CLK_TCK / n * 1e6
    return res


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
        limit = machine_limit(n, min(processes, n))
        if limit:  # not run: reported as the machine's limit, not as the store's errors
            out[str(n)] = {pair_name(*p): {"machine_limit": limit, "errors": 0, "reps": 0} for p in pairs}
            print(f"[bench] {mode} N={n}: {limit}", flush=True)
            continue
        per_pair: dict[str, list[dict]] = {pair_name(*p): [] for p in pairs}
        for rep in range(reps_for(n)):
            order = pairs if rep % 2 == 0 else list(reversed(pairs))
            for client, srv in order:
                with netns.fresh(f"rdzv-{mode}") as ns:
                    before = netns.tcp_counters()
                    try:
                        res = once(client, srv, n, processes, bound)
                    except Exception as exc:  # a failed repetition is reported, never fatal
                        msg = f"{type(exc).__name__}: {exc}"[:200]
                        res = {"wall_s": None, "errors": n, "machine_errors": n if machine_error(msg) else 0,
                               "first_error": msg}
                    after = netns.tcp_counters()
                res["own_netns"] = ns is not None
                res.update({k: after[k] - before[k] for k in netns.COUNTERS})
                per_pair[pair_name(client, srv)].append(res)
        cell: dict[str, Any] = {}
        for name, rows in per_pair.items():
            errors = sum(r.get("errors", 0) for r in rows)
            machine = sum(r.get("machine_errors", 0) for r in rows)
            cell[name] = {
                "wall_s": summarize([r["wall_s"] for r in rows if r.get("wall_s") is not None]),
                "connect_p50_ms": summarize([r["connect_p50_ms"] for r in rows if r.get("connect_p50_ms")]),
                "connect_max_ms": summarize([r["connect_max_ms"] for r in rows if r.get("connect_max_ms")]),
                "errors": errors,
                "machine_errors": machine,
                "reps": len(rows),
                # what the kernel dropped: accept queue overflows, and the SYN retransmits after them
                **{k: summarize([r[k] for r in rows if k in r]) for k in netns.COUNTERS},
                "own_netns": all(r.get("own_netns") for r in rows),
                **{k: summarize([r[k] for r in rows if k in r]) for k in ("server_user_us", "server_sys_us")},
                "first_error": next((r["first_error"] for r in rows if r.get("first_error")), None),
            }
            if errors and machine == errors:  # every error came from the machine (fds, ports, memory)
                cell[name]["machine_limit"] = "machine limit hit at run time: " + (cell[name]["first_error"] or "?")
        out[str(n)] = cell
    return out


# -- memory ----------------------------------------------------------------------------------


def _handshake(port: int) -> socket.socket:
    """An idle, validated connection (VALIDATE + PING, as torch's client does)."""
    from rdzv_store.client import connect_with_retry

    return connect_with_retry(HOST, port, 60.0)


def memory(impls: list[str], connections: int | list[int], reps: int) -> dict[str, Any]:
    """Server RSS with each count of idle validated connections: {str(count): {impl: {...}}}."""
    counts = [connections] if isinstance(connections, int) else list(connections)
    out: dict[str, Any] = {}
    for count in counts:
        limit = machine_limit(count, 1, threads=False)
        if limit:
            out[str(count)] = {impl: {"machine_limit": limit} for impl in impls}
            print(f"[bench] memory {count} connections: {limit}", flush=True)
            continue
        try:
            out[str(count)] = _memory_at(impls, count, reps)
        except OSError as exc:
            msg = f"{type(exc).__name__}: {exc}"
            if not machine_error(msg):
                raise
            out[str(count)] = {impl: {"machine_limit": "machine limit hit at run time: " + msg} for impl in impls}
    return out


def _memory_at(impls: list[str], connections: int, reps: int) -> dict[str, Any]:
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
