"""Smoke test of the benchmark runner at tiny sizes, so that it cannot rot.

It checks that every figure runs and the results files are written; it
asserts nothing about speed (benchmarks are not timed tests). torch-free:
``--no-torch`` measures only our stores even where torch is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import netns  # noqa: E402


def test_runner_tiny(tmp_path: Path) -> None:
    (tmp_path / "storm_vs_n.png").write_bytes(b"an earlier run's plot")  # not rewritten: --no-plots
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--no-torch", "--no-plots", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "latest.json").read_text())
    md = (tmp_path / "latest.md").read_text()
    assert results["torch_measured"] is False
    for name in ("small", "server_cpu", "cas", "aggregate", "storm", "init", "memory"):
        assert name in results["figures"], (name, results["failures"])
    # FileStore figures appear once FileStore exists; "skipped" is the only acceptable absence
    for name, reason in results["failures"].items():
        assert reason.startswith("skipped"), (name, reason)
    cpu = results["figures"]["server_cpu"]
    for op in ("add", "check", "compare_set", "set+check"):
        for kind in ("ours", "echo", "raw"):  # ours and the two bare asyncio floor servers
            assert cpu["ops"][op][kind]["cpu_us"]["n"] == 2, (op, kind)
            assert cpu["ops"][op][kind]["wall_us"]["median"] > 0, (op, kind)
        assert cpu["sizes"][op][0] > 0, cpu["sizes"]
    for mode in ("storm", "init"):
        block = results["figures"][mode]
        assert block["16"]["ours->ours"]["errors"] == 0, block
        assert block["16"]["ours->ours"]["wall_s"]["median"] > 0, block
        # the kernel's drops are counted per repetition (in a namespace of its own when root)
        assert block["16"]["ours->ours"]["ListenOverflows"]["n"] == 1, block
        assert block["16"]["ours->ours"]["own_netns"] is netns.available(), block
        # a size no machine can hold is reported as the machine's limit, not run, not an error
        huge = block[str(1 << 24)]["ours->ours"]
        assert huge["machine_limit"].startswith("machine limit") and huge["reps"] == 0, huge
    memory = results["figures"]["memory"]
    assert memory["16"]["ours"]["loaded_mib"]["median"] > 0
    assert memory[str(1 << 24)]["ours"]["machine_limit"].startswith("machine limit")
    assert results["figures"]["small"]["add"]["ours"]["p50_us"]["median"] > 0
    assert "Summary against the targets of issue 12" in md
    assert "Server CPU per request" in md and "machine limit" in md
    assert results["machine"]["python"] and results["machine"]["date"]
    # a plot this run did not write is named as an earlier run's, not left unremarked
    assert "storm_vs_n.png" in proc.stdout and "from an earlier run" in proc.stdout, proc.stdout
    assert "latency_vs_size.png" not in proc.stdout  # absent, so not stale
    from benchmarks import report

    assert report.stale_plots(tmp_path, ["storm_vs_n.png"]) == []
    # the README generator renders these results (new rows included) between its markers
    from benchmarks import readme

    doc = f"intro\n{readme.BEGIN}\nold\n{readme.END}\nrest\n"
    table = readme.rewrite(doc, results)
    assert "server CPU per request, add" in table and "(floor: echo" in table
    assert "storm N=16 wall (s), our clients → our server" in table
    assert "n/a (machine)" in table and table.endswith(f"{readme.END}\nrest\n")
    # a tiny run into a temporary --out never touches the README
    assert "tiny run" not in readme.README.read_text()


def _tiny_report(module: str, out: Path, *extra: str) -> dict:
    """Run a report-writing benchmark module at 5 repetitions of 50 requests; its JSON results."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *extra, "--reps", "5", "--count", "50", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.with_suffix(".json").read_text())


def test_breakdown_runs_and_times_both_servers(tmp_path: Path) -> None:
    """benchmarks/bench_breakdown.py at tiny counts: both instrumented servers answer and report."""
    out = tmp_path / "breakdown.md"
    res = _tiny_report("benchmarks.bench_breakdown", out)
    for op in ("add", "check", "compare_set", "get"):
        assert res["hot"][op]["best"] > 0, op
        for kind in ("ours", "raw"):
            row = res["cold"][op][kind]
            assert row["callback"]["n"] == 5 and row["callback"]["median"] > 0, (op, kind, row)
            assert row["rtt"]["median"] >= row["callback"]["median"], (op, kind, row)
        assert res["cold"][op]["ours"]["send"]["n"] == 5, op  # ours times its send apart
    assert "Ours minus raw" in out.read_text()


def test_pairs_runs_every_client_against_every_server(tmp_path: Path) -> None:
    """benchmarks/bench_pairs.py at tiny counts, torch-free: our client and the floor client
    against our server, in every placement the machine has."""
    out = tmp_path / "pairs.md"
    res = _tiny_report("benchmarks.bench_pairs", out, "--no-torch")
    placements = ["free", "split", "shared"] if (os.cpu_count() or 1) >= 2 else ["free"]
    assert list(res["pairs"]) == placements
    for placement in placements:
        for op in ("add", "check", "compare_set"):
            cells = res["pairs"][placement][op]
            assert sorted(cells) == ["ours->ours", "raw->ours"], cells
            for cell in cells.values():
                assert cell["p50_us"]["n"] == 5 and cell["p50_us"]["median"] > 0, cell
                assert cell["client_cpu_us"]["median"] > 0, cell
    assert "Placement `free`" in out.read_text()


def test_storm_floor_runs_our_clients_against_our_server_and_the_floor(tmp_path: Path) -> None:
    """benchmarks/bench_storm_floor.py at a tiny N, torch-free: the storm of our clients and of
    the client floor completes without an error against our server and against the floor server,
    and each reports its CPU per client."""
    out = tmp_path / "storm_floor.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_storm_floor", "--no-torch", "--sizes", "32", "--reps", "2",
         "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    cells = res["storms"]["32"]
    assert sorted(cells) == ["ours->ours", "raw->ours", "raw->storm"], cells
    for cell in cells.values():
        assert cell["errors"] == 0 and cell["reps"] == 2, cell
        assert cell["wall_s"]["n"] == 2 and cell["wall_s"]["median"] > 0, cell
        assert cell["server_user_us"]["n"] == 2, cell
    assert "| 32 | raw → storm |" in out.read_text()


def test_the_storm_client_floor_sends_our_clients_handshake() -> None:
    """floor_servers.StormClient stands for our client in the storm: its handshake must be the
    bytes rdzv_store.TCPStore sends (but PING's nonce, our pid), or the floor measures another
    exchange. A listener takes TCPStore's handshake and answers it as our server would."""
    import socket
    import struct
    import threading

    from benchmarks import floor_servers
    from rdzv_store import TCPStore
    from rdzv_store import protocol as p

    expected = floor_servers._STORM_HANDSHAKE
    at = len(p.encode_validate()) + 1  # PING's u32 nonce follows VALIDATE and PING's type byte
    nonce = slice(at, at + 4)
    got: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while len(data) < len(expected) and (chunk := conn.recv(len(expected) - len(data))):
                    data += chunk
                got.append(data)
                conn.sendall(data[nonce] + b"\x01" + struct.pack("<Q", 0))  # echo, CHECK's byte, empty value
                conn.recv(1)  # until the client closes

        thread = threading.Thread(target=serve)
        thread.start()
        store = TCPStore("127.0.0.1", listener.getsockname()[1], timeout=10)
        store.close()
        thread.join(timeout=10)
    (data,) = got
    assert len(data) == len(expected)
    assert data[: nonce.start] + data[nonce.stop:] == expected[: nonce.start] + expected[nonce.stop:]


def test_instruction_counts_tiny(tmp_path: Path) -> None:
    # callgrind counts instructions, so the same server code counts (nearly) the same twice: our
    # server as of HEAD, from a worktree, against the checkout's own. A broken reading of
    # callgrind_control (zero, or the totals of the wrong process) would not agree.
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        pytest.skip("valgrind is not installed (Debian: apt-get install valgrind)")
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: --baseline needs one")
    out = tmp_path / "instructions.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_instructions", "--reps", "5", "--count", "20", "--warmup", "10", "--no-torch",
         "--baseline", "HEAD", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["kinds"] == ["ours", "ours@HEAD", "raw"]
    origins = results["origins"]  # the baseline's server ran the worktree's package, not ours
    assert origins["ours"] == str(REPO / "rdzv_store" / "__init__.py"), origins
    assert origins["ours@HEAD"] != origins["ours"] and origins["ours@HEAD"].endswith("__init__.py"), origins
    for op, per in results["servers"].items():
        ours, head, raw = (per[k]["median"] for k in results["kinds"])
        assert raw > 1000, (op, per)  # an event loop's wake-up is thousands of instructions
        assert ours > raw, (op, per)  # our server does what the floor does, and more
        assert abs(ours - head) <= 0.2 * ours, (op, per)
    assert "Above the floor" in out.read_text()
