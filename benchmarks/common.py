"""Shared plumbing for the benchmarks: statistics, server processes, the DNS shim, machine info.

Every server runs as a separate, fresh process (ours: ``python -m rdzv_store
serve``; torch's: ``benchmarks/_procs.py torch-serve``). Every process we
start is killed in a ``finally``; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
SHIM_SOURCE = HERE / "getnameinfo_shim.c"
SHIM_ENV = "RDZV_BENCH_SHIM"  # set (to the .so path) once the shim is preloaded


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


# -- statistics ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median across repetitions, min/max, and the anchors' spread: half of (max-min)/median."""
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0, "values": []}
    med = statistics.median(vals)
    spread = (max(vals) - min(vals)) / 2 / med if med else 0.0
    return {"median": med, "min": min(vals), "max": max(vals), "spread": spread, "n": len(vals), "values": vals}


def median_range(s: dict[str, Any] | None, digits: int = 1) -> str:
    """A ``summarize`` result as "median [min–max]" (``digits`` decimals), "–" when there is none."""
    if not s or s.get("median") is None:
        return "–"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def ratio(ours: dict | None, theirs: dict | None) -> float | None:
    if not ours or not theirs or not ours.get("median") or not theirs.get("median"):
        return None
    return ours["median"] / theirs["median"]


@dataclass
class Budget:
    """Bounds for one timed loop: at most ``count`` iterations or ``seconds``, at least ``minimum``."""

    count: int
    seconds: float
    minimum: int = 3

    def loop(self) -> Iterator[int]:
        deadline = time.perf_counter() + self.seconds
        for i in range(self.count):
            if i >= self.minimum and time.perf_counter() > deadline:
                return
            yield i


# -- the reverse-DNS shim --------------------------------------------------------------------


def build_shim() -> str | None:
    """Compile the getnameinfo shim (cached by source hash); None if gcc is unavailable."""
    source = SHIM_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"rdzv-bench-getnameinfo-{digest}.so"
    if out.exists():
        return str(out)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    try:
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SHIM_SOURCE), "-ldl"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    os.replace(tmp, out)
    return str(out)


def reexec_with_shim(module: str = "benchmarks") -> None:
    """Re-exec this process (``python -m module``, same arguments) with the shim in LD_PRELOAD
    (LD_PRELOAD only acts at exec time).

    Servers and workers are children, so they inherit it. Does nothing if the
    shim is already active or cannot be built (the results then say so).
    """
    if os.environ.get(SHIM_ENV):
        return
    shim = build_shim()
    if shim is None:
        os.environ[SHIM_ENV] = ""
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in (shim, env.get("LD_PRELOAD", "")) if x)
    env[SHIM_ENV] = shim
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def shim_status() -> str:
    shim = os.environ.get(SHIM_ENV)
    if shim and shim in os.environ.get("LD_PRELOAD", ""):
        return f"active (LD_PRELOAD={shim})"
    return "not active (gcc missing or --no-shim): torch's servers/clients may reverse-resolve peers"


# -- server processes ------------------------------------------------------------------------


@dataclass
class ServerProc:
    impl: str
    proc: subprocess.Popen
    port: int
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _child_env(repo: Path = REPO) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(repo), env.get("PYTHONPATH", "")) if x)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _read_port(proc: subprocess.Popen, pattern: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}: {buf.decode(errors='replace')}")
        try:
            chunk = proc.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            buf += chunk
            m = re.search(pattern.encode(), buf)
            if m:
                return int(m.group(1))
        time.sleep(0.01)
    raise TimeoutError(f"server did not report its port within {timeout} s: {buf!r}")


SERVER_LOOP = "asyncio"  # our server's event loop; run.py sets it from --server-loop


# -- every process a benchmark starts is tracked, and stopped even when the run is interrupted ---

_LIVE: set[subprocess.Popen] = set()
_CLEANUP_INSTALLED = False


# PR_SET_PDEATHSIG is set by a tiny exec wrapper, not a ``preexec_fn``: with a preexec_fn, Popen
# forks through Python's at-fork hooks (logging registers some), and a SIGTERM whose handler runs
# inside one of them raises SystemExit where it is swallowed as "unraisable": the runner carried
# on as if never signalled (seen in CI on 3.12, ~1 run in 3). The death signal survives execve.
_PDEATHSIG_EXEC = (
    "import ctypes, os, sys; ctypes.CDLL(None, use_errno=True).prctl(1, 15); "  # PR_SET_PDEATHSIG, SIGTERM
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session, tracked until :func:`stop_process`.

    The child gets ``PR_SET_PDEATHSIG(SIGTERM)``, so it is stopped even if the runner dies by
    SIGKILL; :func:`install_cleanup` stops tracked children on SIGINT/SIGTERM/SIGHUP and at exit.
    """
    kwargs.setdefault("start_new_session", True)
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _PDEATHSIG_EXEC, *cmd]
    proc = subprocess.Popen(cmd, **kwargs)
    _LIVE.add(proc)
    return proc


def stop_all() -> None:
    """Stop every tracked process that is still running (the runner's last resort)."""
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            stop_process(proc, timeout=3.0)


def _on_signal(signum: int, _frame: Any) -> None:
    # SystemExit unwinds through every ``finally`` (servers, workers); stop_all at exit catches the rest
    signal.signal(signum, signal.SIG_DFL)  # a second signal kills at once
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """SIGTERM and SIGHUP unwind like SIGINT does; at exit every tracked child is stopped."""
    global _CLEANUP_INSTALLED
    if _CLEANUP_INSTALLED:
        return
    import atexit

    _CLEANUP_INSTALLED = True
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread: leave as is
            signal.signal(sig, _on_signal)


def package_origin(repo: Path = REPO) -> str:
    """The ``rdzv_store/__init__.py`` a server started with ``repo`` (``start_server``) imports."""
    return subprocess.run(
        [sys.executable, "-c", "import rdzv_store; print(rdzv_store.__file__)"],
        env=_child_env(repo), cwd=repo, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()


def start_server(impl: str, timeout: float = 60.0, wrap: Sequence[str] = (), repo: Path = REPO) -> ServerProc:
    """Start a fresh server process: ``ours`` (rdzv_store serve) or ``torch`` (libuv TCPStore).

    ``wrap``: a command the server runs under (``valgrind --tool=callgrind``, for example);
    ``repo``: the checkout whose ``rdzv_store`` and ``benchmarks`` it runs (another commit's
    worktree, to measure a change side by side).
    """
    if impl == "ours":
        cmd = [sys.executable, "-m", "rdzv_store", "--log-level", "WARNING", "serve", "--host", HOST, "--port", "0",
               "--max-connections", "65536", "--loop", SERVER_LOOP]
        pattern = r"listening on \S+ port (\d+)"
    elif impl == "torch":
        cmd = [sys.executable, str(HERE / "_procs.py"), "torch-serve"]
        pattern = r"port (\d+)"
    elif impl in ("echo", "raw", "storm"):  # the floors: bare asyncio servers (benchmarks/floor_servers.py)
        cmd = [sys.executable, str(HERE / "floor_servers.py"), impl]
        pattern = r"port (\d+)"
    else:
        raise ValueError(impl)
    # cwd: ``python -m`` puts the working directory first on sys.path, before PYTHONPATH.
    proc = spawn([*wrap, *cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_child_env(repo), cwd=repo)
    try:
        port = _read_port(proc, pattern, timeout)
    except BaseException:
        stop_process(proc)
        raise
    return ServerProc(impl, proc, port)


def start_master(impl: str, port: int, world_size: int, timeout: float = 60.0) -> subprocess.Popen:
    """A torch-style master in its own process: TCPStore(is_master=True, world_size, wait_for_workers=True).

    It prints ``returned <time.monotonic()>`` when its constructor returns. Returns once ``port``
    accepts connections, so the caller can start the clients right away.
    """
    cmd = [sys.executable, str(HERE / "_procs.py"), f"{impl}-master", str(port), str(world_size)]
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_child_env())
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"master exited early with code {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                break
        except OSError:
            if time.monotonic() > deadline:
                stop_process(proc)
                raise TimeoutError("master did not start listening") from None
            time.sleep(0.02)
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    _LIVE.discard(proc)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=timeout)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


# -- a process's own CPU time, from /proc ----------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_times(pid: int) -> tuple[int, int]:
    """(utime, stime) of the whole process (all threads), in clock ticks, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), after pid and comm


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    return sum(cpu_times(pid))


def cpu_sched_ns(pid: int) -> int | None:
    """Sum of the threads' run time in ns (/proc/<pid>/task/*/schedstat): a finer cross-check."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        return None
    return total


@contextlib.contextmanager
def server(impl: str) -> Iterator[ServerProc]:
    srv = start_server(impl)
    try:
        yield srv
    finally:
        stop_process(srv.proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# -- clients ---------------------------------------------------------------------------------


def client_class(impl: str) -> Any:
    """The TCPStore class of ``ours`` (rdzv_store) or ``torch``, or ``raw``, the storm's client
    floor (``floor_servers.StormClient``); imports its package on first use.

    Timed code imports it first: importing torch takes about a second per process.
    """
    if impl == "torch":
        from torch.distributed import TCPStore
    elif impl == "raw":  # the client floor: our client's bytes from a bare blocking socket (storms only)
        from .floor_servers import StormClient

        return StormClient
    else:
        from rdzv_store import TCPStore
    return TCPStore


def make_client(impl: str, port: int, timeout_s: float = 120.0, **kwargs: Any) -> Any:
    """A TCPStore client: ``ours`` (rdzv_store) or ``torch`` (torch's C++ client)."""
    from datetime import timedelta

    kwargs.setdefault("wait_for_workers", False)
    return client_class(impl)(HOST, port, is_master=False, timeout=timedelta(seconds=timeout_s), **kwargs)


def close_client(store: Any) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


# -- machine ---------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def machine_info() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpus": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
        "tcp_max_syn_backlog": _read("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        "ip_local_port_range": " ".join(_read("/proc/sys/net/ipv4/ip_local_port_range").split()),
        "pids_max": _read("/sys/fs/cgroup/pids.max"),
        "clk_tck": CLK_TCK,
        "nofile": _nofile(),
        "loadavg_start": _read("/proc/loadavg"),
        "dns_shim": shim_status(),
    }
    try:
        import rdzv_store

        info["rdzv_store"] = getattr(rdzv_store, "__version__", None) or _pkg_version("rdzv-store")
    except Exception:  # pragma: no cover
        info["rdzv_store"] = "?"
    info["git"] = _git_rev()
    info["torch"] = _pkg_version("torch") if torch_available() else None
    for name in ("uvloop", "filelock", "matplotlib"):
        info[name] = _pkg_version(name)
    return info


def _nofile() -> str:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return f"{soft}/{hard}"
    except Exception:  # pragma: no cover
        return "?"


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "rdzv_store"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty(rdzv_store)" if dirty else "")
    except Exception:
        return "?"


def raise_nofile(target: int | None = None) -> int:
    """Raise the soft RLIMIT_NOFILE to ``target`` (default: as far as the hard limit allows).

    Children (servers, masters, forked client processes) inherit it, so each process gets its
    own budget of that many descriptors. Returns the soft limit in force afterwards.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
        want = min(max(soft, target or limit), limit)
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except Exception:  # pragma: no cover
        return 0


def write_report(out: Path, markdown: str, results: dict[str, Any]) -> None:
    """Write a benchmark's report: ``markdown`` to ``out``, ``results`` as JSON beside it
    (same name, ``.json``), and print the markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(markdown)
