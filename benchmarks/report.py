"""Render the results dict as markdown (summary against the issue's targets, then details) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import ratio

KIB, MIB = 1024, 1024 * 1024
SMALL = ["set+check", "add", "compare_set", "check"]


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt(s: dict | None, digits: int = 3) -> str:
    """'median ±spread%' (spread = half of (max-min)/median, as in performance-anchors.md)."""
    if not s or s.get("median") is None:
        return "–"
    text = _num(s["median"], digits)
    if s.get("n", 0) > 1 and s.get("spread") is not None:
        text += f" ±{s['spread'] * 100:.0f}%"
    return text


def fmt_x(s: dict | None) -> str:
    """A ratio summary: '1.2x ±15%'."""
    text = fmt(s)
    if text == "–":
        return text
    head, _, tail = text.partition(" ")
    return f"{head}x {tail}".strip()


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}x"


def size_name(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def holds(value: float | None, limit: float, smaller_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    value = round(value, 2)  # judged as printed: "1.00x" holds a target of 1.0x
    ok = value <= limit if smaller_is_better else value >= limit
    return "yes" if ok else "**no**"


def with_floor(verdict: str, floor_ratio: float | None, limit: float) -> str:
    """A missed target whose pure-Python floor (same run) misses it too says so: the target stands."""
    if verdict == "**no**" and floor_ratio is not None and round(floor_ratio, 2) > limit:
        return f"**no**; floor {floor_ratio:.2f}x"
    return verdict


# The targets of issue 12 (the figure's ours/torch ratio unless stated otherwise).
T_SMALL, T_GET, T_CPU, T_CAS = 1.1, 0.7, 1.2, 2.0
T_STORM_TORCH, T_STORM_OURS, T_INIT = 1.0, 1.3, 1.0
T_THREADS, T_PROCESSES = 0.8, 1.0
T_RSS_MIB, T_RSS_CONNECTIONS = 64.0, 16384
T_FILESTORE = 0.5
CPU_OPS = ["add", "check", "compare_set", "set+check"]


def memory_cells(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The memory figure as {connections: {impl: cell}}; older results had one count, in the config."""
    mem = res["figures"].get("memory") or {}
    if "ours" in mem or "torch" in mem:
        return {str(res["config"].get("memory_connections")): mem}
    return mem


def _drops(cell: dict[str, Any]) -> str:
    """``", 21,731 accept-queue overflows"`` when the accept queue overflowed (median per repetition), else ``""``."""
    overflows = (cell.get("ListenOverflows") or {}).get("median")
    return f", {overflows:,.0f} accept-queue overflows" if overflows else ""


def _limit_text(cell: dict | None) -> str | None:
    return (cell or {}).get("machine_limit")


def summary_rows(res: dict[str, Any], readme: bool = False) -> list[list[str]]:
    """Rows [figure, ours, torch, ours/torch, target (issue 12), holds]; ``readme``: the compact set."""
    fig = res["figures"]
    rows: list[list[str]] = []
    small = fig.get("small")
    if small:
        for op in [*SMALL, "get"]:
            cell = small.get(op, {})
            ours, torch = cell.get("ours", {}), cell.get("torch", {})
            for q in ("p50_us",) if readme else ("p50_us", "p99_us"):
                r = ratio(ours.get(q), torch.get(q))
                name = f"{op} 1 KiB {q[:3]} (µs)" if op not in ("add", "check") else f"{op} {q[:3]} (µs)"
                if q == "p99_us":
                    target, ok = "– (reported)", ""
                else:
                    limit = T_GET if op == "get" else T_SMALL
                    target, ok = f"≤ {limit}x", holds(r, limit)
                floor = cell.get("raw", {}).get(q)
                if q == "p50_us":
                    ok = with_floor(ok, ratio(floor, torch.get(q)), limit)
                rows.append([name, fmt(ours.get(q)) + (f" (floor: raw {fmt(floor)})" if floor else ""),
                             fmt(torch.get(q)), fmt_ratio(r), target, ok])
    cpu = fig.get("server_cpu")
    if cpu:
        n = cpu.get("requests")
        for op in CPU_OPS:
            cell = cpu.get("ops", {}).get(op, {})
            ours, torch = cell.get("ours", {}).get("cpu_us"), cell.get("torch", {}).get("cpu_us")
            floors = ", ".join(f"{k} {fmt(cell[k].get('cpu_us'))}" for k in ("echo", "raw") if k in cell)
            r = ratio(ours, torch)
            rows.append([f"server CPU per request, {op} (µs, {n:,} requests)" if n else f"server CPU, {op} (µs)",
                         fmt(ours) + (f" (floor: {floors})" if floors else ""), fmt(torch), fmt_ratio(r),
                         f"≤ {T_CPU}x", with_floor(holds(r, T_CPU), ratio(cell.get("raw", {}).get("cpu_us"), torch),
                                                   T_CPU)])
    cas = fig.get("cas")
    if cas:
        for size in sorted(cas, key=int):
            ours = cas[size].get("ours", {})
            torch = cas[size].get("torch", {})
            ro = ours.get("cas_over_set")
            rt = torch.get("cas_over_set")
            rf = cas[size].get("raw", {}).get("cas_over_set")
            rows.append([
                f"compare_set ÷ set+check, {size_name(int(size))}",
                fmt_x(ro) + (f" (floor: raw {fmt_x(rf)})" if rf else ""),
                fmt_x(rt),
                fmt_ratio(ratio(ours.get("compare_set"), torch.get("compare_set"))) + " (cas time)",
                f"ours ≤ {T_CAS:g}x",
                with_floor(holds(ro["median"] if ro else None, T_CAS), rf["median"] if rf else None, T_CAS),
            ])
    agg = fig.get("aggregate")
    if agg:
        for mode, limit, src in (("threads", T_THREADS, ""), ("processes", T_PROCESSES, " (issue 5)")):
            ours = agg.get(mode, {}).get("ours", {}).get("ops_per_s")
            torch = agg.get(mode, {}).get("torch", {}).get("ops_per_s")
            r = ratio(ours, torch)
            rows.append([f"aggregate ops/s, 8 clients as {mode}", fmt(ours), fmt(torch), fmt_ratio(r),
                         f"≥ {limit}x{src}", holds(r, limit, smaller_is_better=False)])
    for key, label in (("storm", "storm"), ("init", "torch-style init")):
        block = fig.get(key)
        if not block:
            continue
        for n in sorted(block, key=int):
            cell = block[n]
            base = cell.get("torch->torch", {})
            for pair in ("torch->ours", "ours->ours"):
                mine = cell.get(pair)
                if not mine:
                    continue
                client = pair.split("->")[0]
                limit = {("storm", "torch"): T_STORM_TORCH, ("storm", "ours"): T_STORM_OURS,
                         ("init", "torch"): T_INIT}.get((key, client))
                target = f"≤ {limit}x, 0 errors" if limit else "– (reported)"
                name = f"{label} N={n} wall (s), {'our' if client == 'ours' else client} clients → our server"
                mine_limit, base_limit = _limit_text(mine), _limit_text(base)
                if mine_limit and not mine.get("reps"):
                    base_text = "same" if base_limit == mine_limit else base_limit or fmt(base.get("wall_s"))
                    rows.append([name, mine_limit, base_text, "–", target, "n/a (machine)"])
                    continue
                r = ratio(mine.get("wall_s"), base.get("wall_s"))
                errs = mine.get("errors", 0)
                ok = (holds(r, limit) if r is not None else "n/a") if limit else ""
                if errs:
                    ok = "n/a (machine)" if mine_limit else "**no** (errors)"
                ours_text = fmt(mine.get("wall_s")) + (f", {errs} errors" if errs else ", 0 errors") + _drops(mine)
                if mine_limit:
                    ours_text += f" ({mine_limit})"
                base_text = (fmt(base.get("wall_s")) + (f", {base.get('errors')} errors" if base.get("errors") else "")
                             + _drops(base))
                if base_limit:
                    base_text += f" ({base_limit})"
                rows.append([name, ours_text, base_text, fmt_ratio(r), target, ok])
    cells = memory_cells(res)
    if cells:
        top = max(int(c) for c in cells)
        for count in sorted(cells, key=int):
            mem = cells[count]
            ours, torch = mem.get("ours", {}), mem.get("torch", {})
            name = f"server RSS, {int(count):,} idle connections (MiB)"
            applies = int(count) >= T_RSS_CONNECTIONS or int(count) == top
            target = f"ours ≤ {T_RSS_MIB:g} MiB at {T_RSS_CONNECTIONS:,}" if applies else "– (reported)"
            if _limit_text(ours):
                torch_text = "same" if _limit_text(torch) == _limit_text(ours) else _limit_text(torch) or "–"
                rows.append([name, _limit_text(ours), torch_text, "–", target, "n/a (machine)"])
                continue
            loaded = ours.get("loaded_mib")
            ok = holds(loaded["median"] if loaded and loaded.get("median") else None, T_RSS_MIB) if applies else ""
            if applies and int(count) < T_RSS_CONNECTIONS and ok == "yes":
                ok = f"n/a (measured at {int(count):,} only)"
            rows.append([
                name,
                fmt(loaded) + f" (Δ {fmt(ours.get('delta_mib'))})",
                (fmt(torch.get("loaded_mib")) + f" (Δ {fmt(torch.get('delta_mib'))})") if torch else "–",
                fmt_ratio(ratio(ours.get("delta_mib"), torch.get("delta_mib"))) + " (Δ)" if torch else "–",
                target,
                ok,
            ])
    fs = fig.get("filestore")
    if fs:
        for op in ("set", "get", "add", "check", "contended"):
            cell = fs.get(op, {})
            r = ratio(cell.get("ours"), cell.get("torch"))
            label = "FileStore 4 processes contending, ops/s" if op == "contended" else f"FileStore {op} ops/s"
            rows.append([label, fmt(cell.get("ours")), fmt(cell.get("torch")), fmt_ratio(r),
                         f"≥ {T_FILESTORE}x (issue 5)", holds(r, T_FILESTORE, smaller_is_better=False)])
    lock = fig.get("lock")
    if not readme and isinstance(lock, dict) and lock.get("results"):
        res_ = lock["results"]
        cells_ = ", ".join(f"{name}: {_num(r.get('ops_per_s'))}" for name, r in res_.items() if isinstance(r, dict))
        best, used = lock.get("best_lock"), lock.get("in_use")
        rows.append([f"FileStore lock under contention ({lock.get('processes', '?')} processes, ops/s)", cells_,
                     "", "", "report, keep the faster",
                     f"yes (in use: {used})" if best and best == used else f"best {best}, in use {used}"])
    return rows


SUMMARY_HEADER = ["figure", "ours", "torch", "ours/torch", "target (issue 12)", "holds"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def detail_sections(res: dict[str, Any]) -> list[str]:
    fig = res["figures"]
    parts: list[str] = []
    small = fig.get("small")
    if small:
        rows = []
        for op, cell in small.items():
            for impl, m in cell.items():
                rows.append([op, impl, fmt(m["ops_per_s"]), fmt(m["p50_us"]), fmt(m["p99_us"])])
        parts.append("### Small ops, one client, 1 KiB values\n\n"
                     "`raw` = the pure-Python round-trip floor: a blocking-socket client and the bare `raw` "
                     "asyncio server (`benchmarks/floor_servers.py`) exchanging each operation's request and "
                     "reply sizes as measured on our wire, nothing parsed; a target below the floor's ratio to "
                     "torch cannot be met by a pure-Python client and server.\n\n" + _table(["op", "client→server", "ops/s", "p50 µs", "p99 µs"], rows))
    cpu = fig.get("server_cpu")
    if cpu:
        rows = []
        for op, cell in cpu.get("ops", {}).items():
            req, rep = (cpu.get("sizes") or {}).get(op, ("?", "?"))
            for kind, m in cell.items():
                rows.append([op, kind, f"{req} / {rep}", fmt(m.get("cpu_us")), fmt(m.get("sched_us")),
                             fmt(m.get("wall_us"))])
        parts.append(
            f"### Server CPU per request ({cpu.get('requests', '?'):,} sequential requests per op and repetition, "
            "one client, 1 KiB values)\n\n"
            "CPU = utime+stime of the server process from `/proc/<pid>/stat` (clock ticks) before and after the "
            "batch, divided by the count; `sched` = the threads' run time from `/proc/<pid>/task/*/schedstat` (ns), "
            "a cross-check; wall = the client's round trip. set+check is one request (set has no reply). "
            "`echo` (asyncio.Protocol) and `raw` (loop.add_reader + recv_into + send) are bare asyncio servers "
            "(`benchmarks/floor_servers.py`) answering requests of the same sizes (bytes per request/reply, "
            "measured on our client's wire): the floor of a pure-Python asyncio server.\n\n"
            + _table(["op", "server", "bytes req / reply", "CPU µs", "sched µs", "wall µs"], rows))
    cas = fig.get("cas")
    if cas:
        rows = []
        for size in sorted(cas, key=int):
            for impl, m in cas[size].items():
                rows.append([size_name(int(size)), impl, fmt(m.get("set+check")), fmt(m.get("compare_set")),
                             fmt(m.get("cas_over_set"))])
        parts.append("### compare_set vs set+check by value size (p50 ms per op)\n\n"
                     "`raw` = the same bytes each way (measured on our wire) through a blocking-socket client "
                     "and the bare `raw` asyncio server: compare_set moves three times set's bytes (expected "
                     "and desired up, the value back), so the floor's ratio is what loopback charges any "
                     "server.\n\n"
                     + _table(["value", "client→server", "set+check ms", "compare_set ms", "cas/set"], rows))
    agg = fig.get("aggregate")
    if agg:
        rows = []
        for mode, cell in agg.items():
            for impl, m in cell.items():
                rows.append([mode, impl, fmt(m["ops_per_s"]), f"{fmt(m['fairness_max_dev'])}"])
        parts.append("### 8 clients, set(own key, 1 KiB) + get(own key), aggregate\n\n"
                     + _table(["clients as", "client→server", "ops/s", "max per-client deviation from mean"], rows))
    for key, title in (("storm", "Connection storm"), ("init", "torch-style init (master world_size=N+1)")):
        block = fig.get(key)
        if not block:
            continue
        rows = []
        for n in sorted(block, key=int):
            for pair, m in block[n].items():
                if m.get("machine_limit") and not m.get("reps"):
                    rows.append([n, pair, "–", "–", "–", "–", "0", m["machine_limit"][:160]])
                    continue
                note = (m.get("first_error") or "")[:80]
                if m.get("machine_limit"):
                    note = f"{m['machine_limit'][:160]}"
                rows.append([n, pair, fmt(m["wall_s"]), fmt(m["connect_p50_ms"]), fmt(m["connect_max_ms"]),
                             fmt(m.get("ListenOverflows")), fmt(m.get("TCPSynRetrans")),
                             str(m["errors"]), str(m["reps"]), note])
        parts.append(f"### {title}\n\n" + _table(
            ["N", "clients→server", "wall s", "connect p50 ms", "connect max ms", "accept queue overflows",
             "SYN retransmits", "errors", "reps", "first error"], rows))
    cells = memory_cells(res)
    if cells:
        rows = []
        for count in sorted(cells, key=int):
            for impl, m in cells[count].items():
                if m.get("machine_limit"):
                    rows.append([count, impl, "–", "–", m["machine_limit"]])
                else:
                    rows.append([count, impl, fmt(m["idle_mib"]), fmt(m["loaded_mib"]), fmt(m["delta_mib"])])
        parts.append("### Server memory with idle validated connections (RSS, MiB)\n\n"
                     + _table(["connections", "server", "idle", "with the connections", "Δ"], rows))
    fs = fig.get("filestore")
    if fs:
        rows = [[op, fmt(c.get("ours")), fmt(c.get("torch")), fmt_ratio(ratio(c.get("ours"), c.get("torch")))]
                for op, c in fs.items()]
        parts.append("### FileStore, 1 KiB values (ops/s; contended = 4 processes, add(shared)+set(own)+get(own))\n\n"
                     + _table(["op", "ours", "torch", "ours/torch"], rows))
    lock = fig.get("lock")
    if lock is not None:
        parts.append("### FileStore lock: filelock vs fcntl (from `benchmarks/bench_filestore_lock.run`)\n\n"
                     "```json\n" + json.dumps(lock, indent=1, default=str) + "\n```")
    return parts


def markdown(res: dict[str, Any], plots: list[str]) -> str:
    m = res["machine"]
    cfg = res["config"]
    lines = [
        "# rdzv-store benchmark results",
        "",
        f"Generated by `python -m benchmarks{' --quick' if cfg['name'] == 'quick' else ' --tiny' if cfg['name'] == 'tiny' else ''}`"
        f" on {m['date']} ({cfg['name']} run, {m.get('duration_s', '?')} s).",
        "",
        f"* Machine: {m['host_cpu']}, {m['cpus']} CPUs, {m['memory']}, Linux {m['kernel']}; "
        f"somaxconn {m['somaxconn']}, tcp_max_syn_backlog {m.get('tcp_max_syn_backlog', '?')}, "
        f"ephemeral ports {m.get('ip_local_port_range', '?')}, nofile {m['nofile']}; load average at start `{m['loadavg_start']}`, "
        f"at end `{m.get('loadavg_end', '?')}`.",
        f"* Versions: Python {m['python']}, rdzv-store {m['rdzv_store']} (git {m['git']}), "
        f"torch {m['torch'] or 'not installed'}, filelock {m.get('filelock')}, uvloop {m.get('uvloop') or 'not installed'}; our server's event loop: {res.get('server_loop', 'asyncio')}.",
        f"* torch measured in this run: **{'yes' if res['torch_measured'] else 'no'}**. "
        "\"ours\" = rdzv_store client → rdzv_store server (`python -m rdzv_store serve`); "
        "\"torch\" = torch client → torch libuv server (`TCPStore(is_master=True, use_libuv=True)`), "
        "each server a separate fresh process, loopback only.",
        f"* Reverse DNS: {m['dns_shim']}. The shim (`benchmarks/getnameinfo_shim.c`, built with gcc at benchmark "
        "time) wraps libc's `getnameinfo` via `dlsym(RTLD_NEXT, ...)` and ORs in `NI_NUMERICHOST`; it is preloaded "
        "into the benchmark process and inherited by every server and worker process, ours and torch's alike.",
        f"* Method: medians of {cfg['reps']} repetitions (storms: {cfg['storm_reps']}); ± = half of (max−min)/median "
        "across repetitions. Client(s) and server share the 2 CPUs; other engineers' jobs ran on the machine too. "
        "Ratios are ours/torch of the medians; for times smaller is better, for ops/s larger is better.",
        "",
        "## Summary against the targets of issue 12",
        "",
        _table(SUMMARY_HEADER, summary_rows(res)),
        "",
    ]
    if res.get("failures"):
        lines += ["Figures not measured or failed:", ""]
        lines += [f"* `{k}`: {v}" for k, v in res["failures"].items()]
        lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += ["## Details", ""]
    for part in detail_sections(res):
        lines += [part, ""]
    return "\n".join(lines)


#: Every PNG ``plots`` may write.
PLOT_NAMES = ("latency_vs_size.png", "storm_vs_n.png", "init_vs_n.png")


def stale_plots(out: Path, made: list[str]) -> list[str]:
    """PNGs in ``out`` that this run did not write (no matplotlib, or a figure not measured): an
    earlier run's, which the run must name rather than leave beside its results unremarked."""
    return [name for name in PLOT_NAMES if name not in made and (out / name).exists()]


def plots(res: dict[str, Any], out: Path) -> list[str]:
    """Latency vs value size, and storm/init wall time vs N, as PNG; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    made: list[str] = []
    cas = res["figures"].get("cas")
    if cas and len(cas) > 1:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        sizes = sorted(cas, key=int)
        for impl, colour in (("ours", "tab:blue"), ("torch", "tab:red")):
            for op, style in (("compare_set", "-o"), ("set+check", "--s")):
                xs, ys = [], []
                for s in sizes:
                    m = cas[s].get(impl, {}).get(op)
                    if m and m.get("median"):
                        xs.append(int(s) / KIB)
                        ys.append(m["median"])
                if xs:
                    ax.plot(xs, ys, style, color=colour, label=f"{impl}: {op}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("value size (KiB)")
        ax.set_ylabel("p50 latency per op (ms)")
        ax.set_title("compare_set vs set+check, one client (median of reps)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency_vs_size.png", dpi=100)
        plt.close(fig)
        made.append("latency_vs_size.png")
    for key, title in (("storm", "connection storm"), ("init", "torch-style init")):
        block = res["figures"].get(key)
        if not block or len(block) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ns = sorted(block, key=int)
        for pair, colour in (("torch->torch", "tab:red"), ("torch->ours", "tab:purple"), ("ours->ours", "tab:blue")):
            xs, ys, lo, hi = [], [], [], []
            for n in ns:
                m = block[n].get(pair, {}).get("wall_s")
                if m and m.get("median"):
                    xs.append(int(n))
                    ys.append(m["median"])
                    lo.append(m["median"] - m["min"])
                    hi.append(m["max"] - m["median"])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="-o", color=colour, capsize=3, label=f"clients→server: {pair}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N clients")
        ax.set_ylabel("wall time (s), median, bars = min..max")
        ax.set_title(f"{title}: wall time vs N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{key}_vs_n.png", dpi=100)
        plt.close(fig)
        made.append(f"{key}_vs_n.png")
    return made
