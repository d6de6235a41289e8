"""FileStore benchmarks: how to take the flock, and how fast a blocked get wakes.

(Single-process ops/s, ours against torch's, is the runner's figure:
``python -m benchmarks --only filestore``, in ``bench_filestore``.)

``run(seconds, processes)`` is the lock comparison the FileStore design rests
on: ``processes`` processes share one file and each loops over
``add(shared) + set(own, 1 KiB) + get(own)`` (the workload of
performance-anchors.md section 2.5) for ``seconds``, once per locking strategy:

* ``fcntl.flock``: a blocking ``fcntl.flock`` (the kernel queues waiters);
* ``filelock.lock_descriptor(poll_interval=...)``: filelock's exclusive lock on
  our descriptor, a non-blocking attempt retried every ``poll_interval``
  seconds (its default 0.05 and a short 0.001); reads keep a blocking
  ``LOCK_SH`` because filelock has no shared mode;
* ``torch`` (only when torch is importable): torch's own FileStore, as the anchor.

Each configuration is repeated ``reps`` times (median reported, plus the
slowest and fastest process of the median run for fairness). Workers are
fresh ``sys.executable`` processes of this very file, driven over pipes; every
wait is bounded and every process is reaped.

``python benchmarks/bench_filestore_lock.py [seconds] [processes]`` prints both
measurements; run it with an interpreter that has torch to get torch's
numbers alongside.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))  # the repository, when run from a checkout

VALUE = b"v" * 1024
MAX_ITERATIONS = 10_000_000  # a bound on every measuring loop, whatever the clock says
REPLY_TIMEOUT = 120.0


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _filelock_available() -> bool:
    return importlib.util.find_spec("filelock") is not None


def strategies(include_torch: bool) -> list[str]:
    # filelock is an optional extra (pip install '.[bench]'): without it only fcntl is measured.
    names = ["fcntl"] + (["filelock:0.05", "filelock:0.001"] if _filelock_available() else [])
    return names + (["torch"] if include_torch else [])


def _label(name: str) -> str:
    if name == "fcntl":
        return "fcntl.flock"
    if name.startswith("filelock:"):
        return f"filelock.lock_descriptor(poll_interval={name.split(':')[1]})"
    return "torch FileStore"


def open_store(name: str, path: str) -> Any:
    """A store on ``path`` whose flock is taken the way ``name`` says."""
    if name == "torch":
        import torch.distributed as dist

        return dist.FileStore(path, -1)
    from rdzv_store import filelock_impl
    from rdzv_store.filestore import FileStore

    if name == "fcntl":
        return FileStore(path)
    locking = filelock_impl.filelock_strategy(float(name.split(":")[1]))
    cls = type("BenchFileStore", (FileStore,), {"_locking": locking})
    return cls(path)


# -- worker processes ----------------------------------------------------------------------------
def _out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _worker(index: int) -> None:
    """Contention worker: per command, open a store, say ready, wait for go, loop, report."""
    _out({"ready": os.getpid()})
    lines = iter(sys.stdin)
    for line in lines:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            return
        store = open_store(cmd["strategy"], cmd["path"])
        own = f"own{index}"
        store.set(own, VALUE)
        _out({"opened": True})
        if json.loads(next(lines))["op"] != "go":
            return
        seconds = cmd["seconds"]
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while n < MAX_ITERATIONS:
            store.add("shared", 1)
            store.set(own, VALUE)
            store.get(own)
            n += 1
            if n % 16 == 0 and time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - start
        if hasattr(store, "close"):
            store.close()
        del store
        _out({"iterations": n, "elapsed": elapsed})


def _latency_worker(lib: str, path: str, samples: int) -> None:
    """Blocks in get(k<i>) for each i and reports when each get returned."""
    store = open_store("torch" if lib == "torch" else "fcntl", path)
    _out({"ready": os.getpid()})
    for i in range(samples):
        _out({"waiting": i})
        store.get(f"k{i}")
        _out({"returned": time.monotonic()})
    if hasattr(store, "close"):
        store.close()


class _Proc:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.buf = b""

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, timeout: float = REPLY_TIMEOUT) -> Any:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"benchmark worker {self.proc.pid} did not answer in {timeout} s")
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"benchmark worker {self.proc.pid} exited ({self.proc.poll()})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send({"op": "exit"})
                    self.proc.stdin.close()  # type: ignore[union-attr]
                except OSError:
                    pass
                self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


# -- measurements --------------------------------------------------------------------------------
def run(seconds: float = 1.0, processes: int = 4, *, reps: int = 5, include_torch: bool | None = None) -> dict:
    """Contention benchmark of the locking strategies; returns ops/s (median of ``reps``)."""
    if include_torch is None:
        include_torch = _torch_available()
    names = strategies(include_torch)
    workdir = tempfile.mkdtemp(prefix="bench-filestore-")
    workers = [_Proc(["--worker", str(i)]) for i in range(processes)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        for w in workers:
            w.recv()  # ready
        for rep in range(reps):
            for name in names:  # interleaved, so a noisy moment hurts every strategy alike
                path = os.path.join(workdir, f"{name.replace(':', '_')}-{rep}")
                for w in workers:
                    w.send({"op": "run", "strategy": name, "path": path, "seconds": seconds})
                for w in workers:
                    w.recv()  # opened
                for w in workers:
                    w.send({"op": "go"})
                results = [w.recv(seconds + REPLY_TIMEOUT) for w in workers]
                per_process = [3 * r["iterations"] / r["elapsed"] for r in results]
                size = os.path.getsize(path) if os.path.exists(path) else 0
                runs[name].append({"total": sum(per_process), "per_process": per_process, "file_bytes": size})
                if os.path.exists(path):
                    os.unlink(path)
    finally:
        for w in workers:
            w.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        totals = sorted(r["total"] for r in rs)
        median_run = min(rs, key=lambda r: abs(r["total"] - statistics.median(totals)))
        summary[_label(name)] = {
            "ops_per_s": round(statistics.median(totals)),
            "per_process_ops_per_s": round(statistics.median(median_run["per_process"])),
            "ops_per_s_min": round(totals[0]),
            "ops_per_s_max": round(totals[-1]),
            "slowest_process": round(min(median_run["per_process"])),
            "fastest_process": round(max(median_run["per_process"])),
            "file_mb_per_s": round(median_run["file_bytes"] / seconds / 1e6, 1),
        }
    lock_names = [_label(n) for n in names if n != "torch"]
    chosen = max(lock_names, key=lambda n: summary[n]["ops_per_s"])
    return {
        "workload": "per process: add(shared) + set(own, 1 KiB) + get(own); ops/s summed over processes",
        "processes": processes,
        "seconds": seconds,
        "reps": reps,
        "results": summary,
        "best_lock": chosen,
        "in_use": "fcntl.flock",  # rdzv_store.filestore.FileStore._locking
        "filelock": "measured" if _filelock_available() else "not installed (pip install '.[bench]')",
    }


def wakeup_latency(samples: int = 30, waiter: str = "ours", settle: tuple[float, float] = (0.02, 0.04)) -> dict:
    """How long after ``set`` a ``get`` blocked in another process returns.

    The waiter is left blocked for a random time in ``settle`` before each
    write: long enough for its poll interval to reach its steady-state cap (the
    worst case), and random so the write does not fall in phase with a fixed
    poll period (torch polls every 10 ms; a fixed delay would flatter it).
    """
    import random

    jitter = random.Random(12345)
    from rdzv_store.filestore import FileStore

    workdir = tempfile.mkdtemp(prefix="bench-filestore-wake-")
    path = os.path.join(workdir, "store")
    writer = FileStore(path)
    proc = _Proc(["--latency", waiter, path, str(samples)])
    latencies = []
    try:
        proc.recv()  # ready
        for i in range(samples):
            assert proc.recv() == {"waiting": i}
            time.sleep(jitter.uniform(*settle))  # benchmark pacing, not synchronisation
            writer.set(f"k{i}", "x")
            written = time.monotonic()
            latencies.append(proc.recv()["returned"] - written)
    finally:
        proc.stop()
        writer.close()
        shutil.rmtree(workdir, ignore_errors=True)
    latencies.sort()
    ms = [x * 1e3 for x in latencies]
    return {
        "waiter": waiter,
        "samples": samples,
        "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
        "max_ms": round(ms[-1], 3),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        _worker(int(argv[1]))
        return 0
    if argv[:1] == ["--latency"]:
        _latency_worker(argv[1], argv[2], int(argv[3]))
        return 0
    seconds = float(argv[0]) if argv else 1.0
    processes = int(argv[1]) if len(argv) > 1 else 4
    report = {"lock_contention": run(seconds, processes)}
    libs = ["ours"] + (["torch"] if _torch_available() else [])
    report["wakeup_latency"] = [wakeup_latency(waiter=lib) for lib in libs]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
