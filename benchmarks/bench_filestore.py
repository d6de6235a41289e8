"""FileStore figures: ops/s in one process and under 4-process contention, ours vs torch's.

Both stores get a fresh file in the temp directory per repetition. The lock
comparison (filelock vs fcntl) lives in ``bench_filestore_lock.run`` (owned
by the FileStore author); the runner calls it and records what it returns.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from .common import Budget, summarize
from .workers import run_forked

OPS = ["set", "get", "add", "check"]


def available() -> bool:
    try:
        from rdzv_store import FileStore  # noqa: F401
    except ImportError:
        return False
    return True


def _make(impl: str, path: str) -> Any:
    if impl == "torch":
        from torch.distributed import FileStore
    else:
        from rdzv_store import FileStore
    return FileStore(path, -1)


def _close(store: Any) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


def _one_process(impl: str, path: str, budget: Budget) -> dict[str, float]:
    store = _make(impl, path)
    value = bytes(range(256)) * 4
    try:
        store.set("k", value)
        fns = {
            "set": lambda: store.set("k", value),
            "get": lambda: store.get("k"),
            "add": lambda: store.add("n", 1),
            "check": lambda: store.check(["k"]),
        }
        out = {}
        for op in OPS:
            fn = fns[op]
            for _ in range(20):
                fn()
            start = time.perf_counter()
            n = 0
            for _ in budget.loop():
                fn()
                n += 1
            out[op] = n / (time.perf_counter() - start)
        return out
    finally:
        _close(store)


def _contend_worker(index: int, ready: Any, go: Any, impl: str, path: str, seconds: float) -> int:
    store = _make(impl, path)
    value = bytes(range(256)) * 4
    try:
        store.set(f"own{index}", value)
        ready.release()
        go.wait()
        deadline = time.monotonic() + seconds
        count = 0
        while time.monotonic() < deadline:
            store.add("shared", 1)
            store.set(f"own{index}", value)
            store.get(f"own{index}")
            count += 3
        return count
    finally:
        _close(store)


def filestore(impls: list[str], reps: int, budget: Budget, processes: int, seconds: float) -> dict[str, Any]:
    raw: dict[str, dict[str, list[float]]] = {impl: {op: [] for op in [*OPS, "contended"]} for impl in impls}
    base = tempfile.mkdtemp(prefix="rdzv-bench-fs-")
    try:
        for rep in range(reps):
            for impl in impls if rep % 2 == 0 else list(reversed(impls)):
                path = os.path.join(base, f"{impl}-{rep}-single")
                for op, rate in _one_process(impl, path, budget).items():
                    raw[impl][op].append(rate)
                path = os.path.join(base, f"{impl}-{rep}-contended")
                _close(_make(impl, path))  # create it before the workers race to
                _, counts = run_forked(_contend_worker, processes, (impl, path, seconds), timeout=seconds + 60)
                ok = [c for c in counts if isinstance(c, int)]
                if len(ok) == processes:
                    raw[impl]["contended"].append(sum(ok) / seconds)
                for name in os.listdir(base):
                    if name.startswith(f"{impl}-{rep}-"):
                        try:
                            os.unlink(os.path.join(base, name))
                        except OSError:
                            pass
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {op: {impl: summarize(raw[impl][op]) for impl in impls} for op in [*OPS, "contended"]}


def lock_comparison(seconds: float, processes: int) -> dict[str, Any] | None:
    """Call the FileStore author's filelock-vs-fcntl benchmark, if it exists."""
    try:
        from . import bench_filestore_lock  # type: ignore[attr-defined]
    except ImportError:
        return None
    return bench_filestore_lock.run(seconds=seconds, processes=processes)
