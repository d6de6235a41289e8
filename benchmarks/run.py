"""The benchmark runner: ``python -m benchmarks [--quick | --tiny] [--out DIR] [--only a,b] [--no-torch]``.

Measures our stores and, when torch is importable, torch's stores in the same
run, and writes ``latest.md`` + ``latest.json`` (+ PNG plots when matplotlib
is importable) into ``--out`` (default ``benchmarks/results``). A full or quick
run into the default directory also regenerates the README's performance table
from that ``latest.json`` (``benchmarks/readme.py``; ``--no-readme`` to skip).

These are benchmarks, not timed tests: nothing here asserts a speed. Every
loop is bounded in count and time; every process started is stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.run import main as _main

    sys.exit(_main())

import argparse
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from . import bench_filestore, bench_storm, bench_tcp, common, readme, report
from .common import HERE, Budget, install_cleanup, machine_info, raise_nofile, reexec_with_shim, torch_available

FIGURES = ["small", "server_cpu", "cas", "aggregate", "storm", "init", "memory", "filestore", "lock"]
KIB, MIB = 1024, 1024 * 1024


@dataclass
class Config:
    name: str
    reps: int
    small: Budget
    cpu_requests: int  # server_cpu: requests per op and repetition (≥ 20,000: 10 ms ticks are noise)
    cas_sizes: list[int]
    cas: Budget
    clients: int
    aggregate_s: float
    storm_sizes: list[int]
    storm_reps: dict[int, int]
    storm_processes: int
    storm_bound_s: float
    memory_connections: list[int]
    memory_reps: int
    fs_reps: int
    fs: Budget
    fs_processes: int
    fs_contended_s: float
    lock_s: float
    extra: dict = field(default_factory=dict)


FULL = Config(
    name="full", reps=5,
    small=Budget(5000, 1.0),
    cpu_requests=20000,
    cas_sizes=[16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 2 * MIB, 4 * MIB, 8 * MIB],
    cas=Budget(300, 1.0, minimum=3),
    clients=8, aggregate_s=2.0,
    # Issue 12's rule: medians of >= 5 repetitions, for storms at every N too (3 above 2,048 before).
    storm_sizes=[512, 2048, 4096, 8192, 16384], storm_reps={512: 5, 2048: 5, 4096: 5, 8192: 5, 16384: 5},
    storm_processes=16, storm_bound_s=150.0,
    memory_connections=[4096, 16384], memory_reps=5,
    fs_reps=5, fs=Budget(20000, 1.0), fs_processes=4, fs_contended_s=2.0,
    lock_s=1.0,
)
QUICK = Config(
    name="quick", reps=3,
    small=Budget(2000, 0.3),
    cpu_requests=5000,
    cas_sizes=[16 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 8 * MIB],
    cas=Budget(100, 0.4, minimum=2),
    clients=8, aggregate_s=1.0,
    storm_sizes=[512, 2048, 4096, 8192], storm_reps={512: 3, 2048: 3, 4096: 1, 8192: 1},
    storm_processes=16, storm_bound_s=120.0,
    memory_connections=[4096, 16384], memory_reps=1,
    fs_reps=3, fs=Budget(5000, 0.3), fs_processes=4, fs_contended_s=1.0,
    lock_s=0.5,
)
TINY = Config(  # the smoke test: exercises every code path in seconds, measures nothing
    name="tiny", reps=2,
    small=Budget(20, 0.05, minimum=2),
    cpu_requests=50,
    cas_sizes=[16 * KIB],
    cas=Budget(5, 0.05, minimum=2),
    clients=2, aggregate_s=0.1,
    # 1 << 24 clients cannot fit any machine: exercises the "machine limit" path without running
    storm_sizes=[16, 1 << 24], storm_reps={16: 1, 1 << 24: 1},
    storm_processes=4, storm_bound_s=30.0,
    memory_connections=[16, 1 << 24], memory_reps=1,
    fs_reps=1, fs=Budget(20, 0.05, minimum=2), fs_processes=2, fs_contended_s=0.1,
    lock_s=0.1,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repetitions and shorter loops, storms to 8192 (~6 min; the full run ~25-30 min)")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds); the numbers mean nothing")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output directory (default: benchmarks/results)")
    ap.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    ap.add_argument("--no-torch", action="store_true", help="measure only our stores")
    ap.add_argument("--no-shim", action="store_true", help="do not preload the numeric-getnameinfo shim")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--reps", type=int, help="override the repetition count")
    ap.add_argument("--no-readme", action="store_true",
                    help="do not regenerate the README's performance table (it is regenerated only for a "
                         "full or quick run written to the default --out)")
    ap.add_argument("--server-loop", choices=("asyncio", "uvloop"), default="asyncio",
                    help="event loop of our server (uvloop needs the optional extra)")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(FIGURES)
    if unknown:
        ap.error(f"unknown figure(s) {sorted(unknown)}; choose from {FIGURES}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_cleanup()  # SIGTERM/SIGHUP unwind like Ctrl-C; every server and worker is stopped
    common.SERVER_LOOP = args.server_loop
    use_torch = torch_available() and not args.no_torch
    if use_torch and not args.no_shim:
        reexec_with_shim()  # returns only if already preloaded (or gcc is missing)
    raise_nofile()  # as far as the hard limit allows; every child process inherits its own budget
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
    if args.reps:
        cfg.reps = args.reps
        cfg.storm_reps = {n: min(r, args.reps) for n, r in cfg.storm_reps.items()}
    only = args.only.split(",")
    impls = ["ours", "torch"] if use_torch else ["ours"]
    pairs = bench_storm.PAIRS if use_torch else [("ours", "ours")]

    results: dict[str, Any] = {
        "machine": machine_info(),
        "config": asdict(cfg),
        "torch_measured": use_torch,
        "server_loop": args.server_loop,
        "figures": {},
        "failures": {},
    }
    results["config"]["name"] = cfg.name
    started = time.monotonic()

    def figure(name: str, fn: Any) -> None:
        if name not in only:
            return
        t = time.monotonic()
        print(f"[bench] {name} ...", flush=True)
        try:
            results["figures"][name] = fn()
        except Exception as exc:  # one broken figure must not lose the others
            results["failures"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"[bench] {name} done in {time.monotonic() - t:.1f} s", flush=True)

    figure("small", lambda: bench_tcp.small_ops(impls, cfg.reps, cfg.small))
    figure("server_cpu", lambda: bench_tcp.server_cpu(impls, cfg.reps, cfg.cpu_requests))
    figure("cas", lambda: bench_tcp.cas_sweep(impls, cfg.reps, cfg.cas_sizes, cfg.cas))
    figure("aggregate", lambda: bench_tcp.aggregate(impls, cfg.reps, cfg.clients, cfg.aggregate_s))
    reps_for = lambda n: cfg.storm_reps.get(n, cfg.reps)  # noqa: E731
    figure("storm", lambda: bench_storm.storms(pairs, cfg.storm_sizes, reps_for, cfg.storm_processes,
                                               cfg.storm_bound_s, "storm"))
    figure("init", lambda: bench_storm.storms(pairs, cfg.storm_sizes, reps_for, cfg.storm_processes,
                                              cfg.storm_bound_s, "init"))
    figure("memory", lambda: bench_storm.memory(impls, cfg.memory_connections, cfg.memory_reps))
    if bench_filestore.available():
        figure("filestore", lambda: bench_filestore.filestore(impls, cfg.fs_reps, cfg.fs, cfg.fs_processes,
                                                              cfg.fs_contended_s))
        figure("lock", lambda: bench_filestore.lock_comparison(cfg.lock_s, cfg.fs_processes))
        if results["figures"].get("lock", 0) is None:
            del results["figures"]["lock"]
            results["failures"]["lock"] = "skipped: benchmarks/bench_filestore_lock.py is not available yet"
    else:
        for name in ("filestore", "lock"):
            if name in only:
                results["failures"][name] = "skipped: `from rdzv_store import FileStore` is not available yet"

    results["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    results["machine"]["duration_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plots = [] if args.no_plots else report.plots(results, args.out)
    (args.out / "latest.md").write_text(report.markdown(results, plots))
    print(f"[bench] wrote {args.out / 'latest.md'} and latest.json ({len(plots)} plot(s)) "
          f"in {time.monotonic() - started:.0f} s", flush=True)
    stale = report.stale_plots(args.out, plots)
    if stale:
        why = "--no-plots" if args.no_plots else "matplotlib is not importable (pip install matplotlib)"
        print(f"[bench] WARNING: not plotted ({why}); {', '.join(stale)} in {args.out} are from an "
              "earlier run and do not show this one", flush=True)
    if cfg.name != "tiny" and not args.no_readme and args.out.resolve() == (HERE / "results").resolve():
        changed = readme.update(readme.README, args.out / "latest.json")
        print(f"[bench] README performance table {'regenerated' if changed else 'unchanged'} "
              f"from {args.out / 'latest.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
