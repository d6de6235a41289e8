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
    ok = value <= limit if smaller_is_better else value >= limit
    return "yes" if ok else "**no**"


def summary_rows(res: dict[str, Any]) -> list[list[str]]:
    fig = res["figures"]
    rows: list[list[str]] = []
    small = fig.get("small")
    if small:
        for op in [*SMALL, "get"]:
            cell = small.get(op, {})
            ours, torch = cell.get("ours", {}), cell.get("torch", {})
            for q in ("p50_us", "p99_us"):
                r = ratio(ours.get(q), torch.get(q))
                name = f"{op} 1 KiB {q[:3]} (µs)" if op != "add" and op != "check" else f"{op} {q[:3]} (µs)"
                rows.append([name, fmt(ours.get(q)), fmt(torch.get(q)), fmt_ratio(r), "≤ 1.0x", holds(r, 1.0)])
    cas = fig.get("cas")
    if cas:
        for size in sorted(cas, key=int):
            ours = cas[size].get("ours", {})
            torch = cas[size].get("torch", {})
            ro = ours.get("cas_over_set")
            rt = torch.get("cas_over_set")
            rows.append([
                f"compare_set / set+check, {size_name(int(size))}",
                fmt_x(ro),
                fmt_x(rt),
                fmt_ratio(ratio(ours.get("compare_set"), torch.get("compare_set"))) + " (cas time)",
                "ours ≤ 2x",
                holds(ro["median"] if ro else None, 2.0),
            ])
    agg = fig.get("aggregate")
    if agg:
        for mode in ("threads", "processes"):
            ours = agg.get(mode, {}).get("ours", {}).get("ops_per_s")
            torch = agg.get(mode, {}).get("torch", {}).get("ops_per_s")
            r = ratio(ours, torch)
            rows.append([f"aggregate ops/s, 8 clients as {mode}", fmt(ours), fmt(torch), fmt_ratio(r), "≥ 1.0x",
                         holds(r, 1.0, smaller_is_better=False)])
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
                r = ratio(mine.get("wall_s"), base.get("wall_s"))
                errs = mine.get("errors", 0)
                ok = holds(r, 1.0) if r is not None else "n/a"
                if errs:
                    ok = "**no** (errors)"
                rows.append([
                    f"{label} N={n} wall (s), clients {pair.split('->')[0]} → our server",
                    fmt(mine.get("wall_s")) + (f", {errs} errors" if errs else ""),
                    fmt(base.get("wall_s")) + (f", {base.get('errors')} errors" if base.get("errors") else ""),
                    fmt_ratio(r),
                    "≤ 1.0x" + (", 0 errors" if int(n) >= 4096 else ""),
                    ok,
                ])
    mem = fig.get("memory")
    if mem:
        ours = mem.get("ours", {})
        torch = mem.get("torch", {})
        loaded = ours.get("loaded_mib")
        rows.append([
            "server RSS with idle connections (MiB)",
            fmt(loaded) + f" (Δ {fmt(ours.get('delta_mib'))})",
            (fmt(torch.get("loaded_mib")) + f" (Δ {fmt(torch.get('delta_mib'))})") if torch else "–",
            fmt_ratio(ratio(ours.get("delta_mib"), torch.get("delta_mib"))) + " (Δ)" if torch else "–",
            "ours ≤ 64 MiB",
            holds(loaded["median"] if loaded and loaded.get("median") else None, 64.0),
        ])
    fs = fig.get("filestore")
    if fs:
        for op in ("set", "get", "add", "check", "contended"):
            cell = fs.get(op, {})
            r = ratio(cell.get("ours"), cell.get("torch"))
            label = "FileStore 4 processes contending, ops/s" if op == "contended" else f"FileStore {op} ops/s"
            rows.append([label, fmt(cell.get("ours")), fmt(cell.get("torch")), fmt_ratio(r), "≥ 0.5x",
                         holds(r, 0.5, smaller_is_better=False)])
    lock = fig.get("lock")
    if isinstance(lock, dict) and lock.get("results"):
        res_ = lock["results"]
        cells = ", ".join(f"{name}: {_num(r.get('ops_per_s'))}" for name, r in res_.items() if isinstance(r, dict))
        best, used = lock.get("best_lock"), lock.get("in_use")
        rows.append([f"FileStore lock under contention ({lock.get('processes', '?')} processes, ops/s)", cells,
                     "", "", "report, keep the faster",
                     f"yes (in use: {used})" if best and best == used else f"best {best}, in use {used}"])
    return rows


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
        parts.append("### Small ops, one client, 1 KiB values\n\n" + _table(["op", "client→server", "ops/s", "p50 µs", "p99 µs"], rows))
    cas = fig.get("cas")
    if cas:
        rows = []
        for size in sorted(cas, key=int):
            for impl, m in cas[size].items():
                rows.append([size_name(int(size)), impl, fmt(m.get("set+check")), fmt(m.get("compare_set")),
                             fmt(m.get("cas_over_set"))])
        parts.append("### compare_set vs set+check by value size (p50 ms per op)\n\n"
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
                rows.append([n, pair, fmt(m["wall_s"]), fmt(m["connect_p50_ms"]), fmt(m["connect_max_ms"]),
                             str(m["errors"]), str(m["reps"]), (m.get("first_error") or "")[:80]])
        parts.append(f"### {title}\n\n" + _table(
            ["N", "clients→server", "wall s", "connect p50 ms", "connect max ms", "errors", "reps", "first error"], rows))
    mem = fig.get("memory")
    if mem:
        rows = [[impl, fmt(m["idle_mib"]), fmt(m["loaded_mib"]), fmt(m["delta_mib"])] for impl, m in mem.items()]
        conns = res["config"].get("memory_connections")
        parts.append(f"### Server memory with {conns} idle validated connections (RSS, MiB)\n\n"
                     + _table(["server", "idle", f"with {conns} connections", "Δ"], rows))
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
        f"somaxconn {m['somaxconn']}, nofile {m['nofile']}; load average at start `{m['loadavg_start']}`, "
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
        "## Summary against the targets of issue 5",
        "",
        _table(["figure", "ours", "torch", "ours/torch", "target", "holds"], summary_rows(res)),
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
