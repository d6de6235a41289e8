"""User-space instructions per small request: our server, torch's and the pure-Python floor.

``python -m benchmarks.bench_instructions [--reps N] [--count N] [--out PATH]`` writes
``benchmarks/results/instructions.md`` and ``.json`` (generated: rerun, never edit by hand).

Why a count: server CPU time per request (``python -m benchmarks``) spreads by 5-15 % between
repetitions on these shared 2-vCPU VMs, about the size of the changes it is meant to judge. An
instruction count does not depend on what else the machine is doing.

How: each server runs in a process of its own under ``valgrind --tool=callgrind`` (ours:
``rdzv-store serve``; torch: its libuv ``TCPStore`` server, when torch is importable; ``raw``:
``floor_servers``' add_reader + recv_into + send server, what a pure-Python asyncio server cannot
go below). The same blocking client (``floor_servers.BlockingClient``, run natively) sends each
op's bytes, as our client sends them, one request at a time on loopback.
``callgrind_control -e Ir`` reads the server's instruction total (all its threads) before and
after ``--count`` requests of one op, after a warm-up; the difference over the count is the
figure. Servers alternate from repetition to repetition; medians with min and max.
``--baseline REV`` adds our server as of another commit (a temporary ``git worktree`` of
``REV``), measured in the same run: what a change did to the count.

What it leaves out: the kernel. Per request every server makes the same system calls here (one
``epoll_wait``, ``recv``, ``send``), and their kernel time is not counted by callgrind, so
the table compares only what runs in user space: the interpreter and our code against torch's
C++ and libuv. It says nothing about speed on its own (an instruction of C++ and one of the
interpreter cost about the same; cache misses and the system calls do not show here).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when run from a checkout

from benchmarks import common  # noqa: E402
from benchmarks.bench_breakdown import OPS, _preamble  # noqa: E402
from benchmarks.floor_servers import BlockingClient  # noqa: E402

OUT = HERE / "results" / "instructions.md"
WARMUP = 200
START_TIMEOUT = 900.0  # importing torch under callgrind takes minutes on these VMs
_TOTAL = re.compile(r"^\s*Th\s+\d+\s+([\d,]+)", re.MULTILINE)


def _kinds(baseline: str | None = None, torch: bool = True) -> list[str]:
    kinds = ["ours", "torch", "raw"] if torch and common.torch_available() else ["ours", "raw"]
    return kinds if baseline is None else [kinds[0], f"ours@{baseline}", *kinds[1:]]


@contextlib.contextmanager
def _worktree(rev: str | None) -> Iterator[Path | None]:
    """A temporary ``git worktree`` of ``rev`` (None: nothing), removed afterwards."""
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="rdzv-baseline-") as tmp:
        path = Path(tmp) / "tree"
        git = ["git", "-C", str(common.REPO)]
        subprocess.run([*git, "worktree", "add", "--detach", "-q", str(path), rev], check=True, timeout=120)
        try:
            yield path
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False, timeout=120)


def instructions(pid: int) -> int:
    """The instructions callgrind has counted so far in process ``pid``, all threads together."""
    out = subprocess.run(["callgrind_control", "-e", "Ir", str(pid)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    counts = _TOTAL.findall(out)
    if not counts:
        raise RuntimeError(f"callgrind_control printed no totals for pid {pid}: {out!r}")
    return sum(int(c.replace(",", "")) for c in counts)


def origins(repos: dict[str, Path]) -> dict[str, str]:
    """Which ``rdzv_store`` each of our servers will import, checked to be its checkout's."""
    found = {}
    for kind, repo in repos.items():
        if kind.startswith("ours"):
            origin = common.package_origin(repo)
            if not Path(origin).is_relative_to(repo):
                raise RuntimeError(f"{kind} would import {origin}, not the rdzv_store of {repo}")
            found[kind] = origin
    return found


def measure(repos: dict[str, Path], reps: int, count: int, warmup: int = WARMUP) -> dict[str, Any]:
    """Per op and server (``repos``: kind -> the checkout it runs), instructions per request."""
    kinds = list(repos)
    wrap = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    servers = {kind: common.start_server(kind.partition("@")[0], timeout=START_TIMEOUT, wrap=wrap, repo=repo)
               for kind, repo in repos.items()}
    rows: dict[str, dict[str, list[float]]] = {op: {kind: [] for kind in kinds} for op in OPS}
    clients: dict[tuple[str, str], BlockingClient] = {}
    try:
        for kind, server in servers.items():
            # The floor's _preamble is its own header; torch's server takes our handshake.
            preamble_kind = "raw" if kind == "raw" else "ours"
            for op, (request, reply) in OPS.items():
                clients[(kind, op)] = BlockingClient(server.port, _preamble(preamble_kind, request, reply), request,
                                                     reply)
        for rep in range(reps):
            for kind in kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]:
                pid = servers[kind].proc.pid
                for op in OPS:
                    client = clients[(kind, op)]
                    for _ in range(warmup):
                        client.request()
                    before = instructions(pid)
                    for _ in range(count):
                        client.request()
                    rows[op][kind].append((instructions(pid) - before) / count)
    finally:
        for client in clients.values():
            client.close()
        for server in servers.values():
            common.stop_process(server.proc)
    return {op: {kind: common.summarize(v) for kind, v in per.items()} for op, per in rows.items()}


def _cell(s: dict[str, Any]) -> str:
    return f"{s['median']:,.0f} [{s['min']:,.0f}–{s['max']:,.0f}]"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    kinds = res["kinds"]
    lines = [
        "# Instructions per small request, in the server process (callgrind)",
        "",
        f"Generated by `python -m benchmarks.bench_instructions` on {m.get('date', '?')} (git {m.get('git', '?')}), "
        f"Python {m.get('python', '?')}, torch {m.get('torch') or 'not installed'}; {res['reps']} alternated "
        f"repetitions of {res['count']:,} requests per op and server (after {res['warmup']} to warm up), "
        f"{res['seconds']:.0f} s; medians "
        "[min–max] of user-space instructions per request. See the module docstring for the method.",
        "",
        "| op | " + " | ".join(kinds) + " | ours ÷ raw |" + (" ours ÷ torch |" if "torch" in kinds else ""),
        "|---|" + "---|" * len(kinds) + "---|" + ("---|" if "torch" in kinds else ""),
    ]
    for op, per in res["servers"].items():
        ours = per["ours"]["median"]
        cells = [_cell(per[k]) for k in kinds]
        ratios = f" {ours / per['raw']['median']:.2f}x |"
        if "torch" in kinds:
            ratios += f" {ours / per['torch']['median']:.2f}x |"
        lines.append(f"| {op} | " + " | ".join(cells) + " |" + ratios)
    # What our code adds to the event loop's own work, which the floor server does too.
    ours_kinds = [k for k in kinds if k.startswith("ours")]
    lines += ["", "Above the floor (medians, ours − raw): what our server's code adds per request to the "
              "event loop and system-call wrappers that any pure-Python asyncio server runs.", "",
              "| op | " + " | ".join(ours_kinds) + " |" + (" change |" if len(ours_kinds) > 1 else ""),
              "|---|" + "---|" * len(ours_kinds) + ("---|" if len(ours_kinds) > 1 else "")]
    for op, per in res["servers"].items():
        above = [per[k]["median"] - per["raw"]["median"] for k in ours_kinds]
        row = f"| {op} | " + " | ".join(f"{a:,.0f}" for a in above) + " |"
        if len(above) > 1 and above[1]:
            row += f" {(above[0] - above[1]) / above[1]:+.0%} |"
        lines.append(row)
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_instructions", description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions (>= 5; default 5)")
    ap.add_argument("--count", type=int, default=2000, help="requests per op, server and repetition")
    ap.add_argument("--out", type=Path, default=OUT, help=f"report (default: {OUT.relative_to(HERE.parent)})")
    ap.add_argument("--warmup", type=int, default=WARMUP, help=f"requests before each count (default {WARMUP})")
    ap.add_argument("--baseline", metavar="REV", help="also measure our server as of git revision REV")
    ap.add_argument("--no-torch", action="store_true", help="leave torch's server out even where torch is importable")
    args = ap.parse_args(argv)
    if args.reps < 5:
        ap.error("--reps must be at least 5")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (Debian: apt-get install valgrind)")
    common.install_cleanup()
    res: dict[str, Any] = {"machine": common.machine_info(), "reps": args.reps, "count": args.count,
                           "warmup": args.warmup, "kinds": _kinds(args.baseline, not args.no_torch), "baseline": args.baseline}
    started = time.monotonic()
    with _worktree(args.baseline) as tree:
        # "ours@REV" runs the baseline's worktree; every other server this checkout.
        repos = {kind: tree if "@" in kind and tree is not None else common.REPO for kind in res["kinds"]}
        res["origins"] = origins(repos)
        res["servers"] = measure(repos, args.reps, args.count, args.warmup)
    res["seconds"] = round(time.monotonic() - started, 1)
    common.write_report(args.out, markdown(res), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
