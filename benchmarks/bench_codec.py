"""The rendezvous state codec against C pickle: decode/encode of 1024- and 4096-node states.

``python -m benchmarks.bench_codec [--reps N] [--out PATH]`` writes ``benchmarks/results/codec.md``
(generated: rerun, never edit by hand). The states are the reference's §6.1 shape: a completed
round, every node a participant with a rank and an aware UTC heartbeat, empty sets, FQDN
addresses ``node-00042.rack001.cluster.example.com``, pid 100000+i, local_id 0; protocol 4.

* ours: :func:`rdzv_backend.state_codec.decode_state` (bytes -> state) and ``encode_state``
  (state -> bytes), pure Python;
* C pickle: ``_pickle.loads`` of the same bytes and ``dumps`` of the result, the reference.

The project's no-pickle rule (tests/test_security_no_pickle.py) covers this file, so the C pickle
side runs in a child interpreter from the source text ``_C_PICKLE_CHILD`` below, and only on
bytes this benchmark generated itself. The child registers two stand-in classes under torch's
module path (same NEWOBJ/BUILD/hash work as torch's dataclasses), so torch is not needed.

Each figure is the median of ``--reps`` (>= 5) repetitions of one call, after one warm-up, with
min and max; cProfile then shows where our time goes.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when run from a checkout

from rdzv_backend.state import NodeDesc, RendezvousState  # noqa: E402
from rdzv_backend.state_codec import decode_state, encode_state  # noqa: E402

SIZES = (1024, 4096)
CHILD_TIMEOUT = 300.0

# Run by a child interpreter (python -c): the C pickle reference. Reads {"path", "reps"} on stdin.
_C_PICKLE_CHILD = r'''
import json, sys, time, types, dataclasses, hashlib
mod = types.ModuleType("torch.distributed.elastic.rendezvous.dynamic_rendezvous")
@dataclasses.dataclass(eq=True, order=True, frozen=True)
class _NodeDesc:
    addr: str
    pid: int
    local_id: int
class _RendezvousState:
    pass
for cls in (_NodeDesc, _RendezvousState):
    cls.__module__ = mod.__name__
    setattr(mod, cls.__name__, cls)
for name in ("torch", "torch.distributed", "torch.distributed.elastic", "torch.distributed.elastic.rendezvous"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules[mod.__name__] = mod
import _pickle
req = json.load(sys.stdin)
data = open(req["path"], "rb").read()
obj = _pickle.loads(data); _pickle.dumps(obj, 4)
loads, dumps = [], []
for _ in range(req["reps"]):
    t = time.perf_counter(); obj = _pickle.loads(data); loads.append(time.perf_counter() - t)
    t = time.perf_counter(); out = _pickle.dumps(obj, 4); dumps.append(time.perf_counter() - t)
print(json.dumps({"loads": loads, "dumps": dumps, "dumps_len": len(out),
                  "dumps_sha": hashlib.sha256(out).hexdigest(), "python": sys.version.split()[0]}))
'''


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def make_state(n: int) -> RendezvousState:
    utc = timezone.utc
    base = datetime(2026, 12, 1, 12, 0, 0, tzinfo=utc)
    nodes = [NodeDesc(f"node-{i:05d}.rack{i // 64:03d}.cluster.example.com", 100000 + i, 0) for i in range(n)]
    return RendezvousState(
        round=1,
        complete=True,
        participants={node: rank for rank, node in enumerate(sorted(nodes))},
        last_heartbeats={node: base + timedelta(microseconds=i * 997) for i, node in enumerate(nodes)},
    )


def timed(fn: Callable[[], Any], reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def stats(samples: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3, "max_ms": max(samples) * 1e3}


def c_pickle(data: bytes, reps: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".state") as f:
        f.write(data)
        f.flush()
        proc = subprocess.run(
            [sys.executable, "-c", _C_PICKLE_CHILD],
            input=json.dumps({"path": f.name, "reps": reps}),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"C pickle child failed: {proc.stderr.strip()[-500:]}")
    return dict(json.loads(proc.stdout))


def profile(fn: Callable[[], Any], top: int = 8) -> list[tuple[str, int, float, float]]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    st = pstats.Stats(prof, stream=io.StringIO())
    total = st.total_tt  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(filename).name}:{line} {func}" if line else func
        rows.append((where, ncalls, tottime, tottime / total if total else 0.0))
    rows.sort(key=lambda r: r[2], reverse=True)
    return rows[:top]


def fmt(s: dict[str, float]) -> str:
    return f"{s['median_ms']:.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f})"


def run(reps: int, sizes: tuple[int, ...] = SIZES) -> str:
    lines = [
        "# Rendezvous state codec vs C pickle",
        "",
        "Generated by `python -m benchmarks.bench_codec`; do not edit by hand, rerun it.",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}. States: reference §6.1 FQDN shape "
        "(completed round, every node a participant with rank and aware heartbeat, empty sets), "
        f"protocol 4. Times in ms: median (min-max) of {reps} repetitions of one call, after one warm-up. "
        f"Load average at start: {_loadavg()} on {os.cpu_count()} CPUs (a busy shared machine widens the spread; "
        "the minimum is the least disturbed figure).",
        "",
        "| nodes | pickle bytes | base64 bytes | ours decode | C loads | decode ratio | ours encode | C dumps | encode ratio | same bytes as C dumps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    profiles = {}
    for n in sizes:
        state = make_state(n)
        data = encode_state(state)
        assert decode_state(data) == state
        dec = stats(timed(lambda: decode_state(data), reps))
        enc = stats(timed(lambda: encode_state(state), reps))
        ref = c_pickle(data, reps)
        loads, dumps = stats(ref["loads"]), stats(ref["dumps"])
        same = ref["dumps_sha"] == hashlib.sha256(data).hexdigest()
        lines.append(
            f"| {n} | {len(data):,} | {len(base64.b64encode(data)):,} | {fmt(dec)} | {fmt(loads)} | "
            f"{dec['median_ms'] / loads['median_ms']:.0f}x | {fmt(enc)} | {fmt(dumps)} | "
            f"{enc['median_ms'] / dumps['median_ms']:.0f}x | {'yes' if same else 'no'} |"
        )
        if n == sizes[-1]:
            profiles["decode"] = profile(lambda: decode_state(data))
            profiles["encode"] = profile(lambda: encode_state(state))
    lines += [
        "",
        "Ratios are ours / C pickle: pure Python against C, so an order of magnitude or more is expected; "
        "what matters for a rendezvous is the absolute time (one decode per sync, one encode per write; "
        "torch agents sync about once a second).",
        "",
        f"## Where our time goes ({sizes[-1]} nodes, cProfile, top functions by own time)",
        "",
        "cProfile adds overhead per call, so shares are indicative; the interpreter loop's opcode dispatch "
        "is the `run` line, and the rest is per-object work (stack pushes, dict inserts, node and datetime construction).",
    ]
    for kind, rows in profiles.items():
        lines += ["", f"**{kind}**", "", "| function | calls | own time (s) | share |", "|---|---|---|---|"]
        for where, ncalls, tottime, share in rows:
            lines.append(f"| `{where}` | {ncalls:,} | {tottime:.4f} | {share:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_codec", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="repetitions per figure, at least 5 (default: 9)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "codec.md", help="where the table goes (default: benchmarks/results/codec.md)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), metavar="N", help="node counts (default: 1024 4096)")
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error("--reps must be at least 5")
    text = run(args.reps, tuple(args.sizes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
