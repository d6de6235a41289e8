"""The README's performance table is generated from the committed benchmark results, and the
benchmark runners leave no process behind when they are interrupted.

Benchmarks are not timed tests: nothing here asserts a speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import bench_storm, readme, report


def test_readme_table_is_generated_from_committed_results() -> None:
    text = readme.README.read_text()
    assert text.count(readme.BEGIN) == 1 and text.count(readme.END) == 1
    res = json.loads(readme.RESULTS.read_text())
    assert readme.rewrite(text, res) == text, (
        "README's performance table differs from benchmarks/results/latest.json: run `python -m benchmarks.readme`"
    )


def test_readme_check_command_agrees() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.readme", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_rewrite_replaces_only_the_block(tmp_path: Path) -> None:
    res = json.loads(readme.RESULTS.read_text())
    doc = f"# x\n\nbefore\n{readme.BEGIN}\nstale | table\n{readme.END}\nafter\n"
    out = readme.rewrite(doc, res)
    assert out.startswith("# x\n\nbefore\n" + readme.BEGIN + "\n")
    assert out.endswith(readme.END + "\nafter\n")
    assert "stale" not in out and "target (issue 12)" in out
    assert readme.rewrite(out, res) == out  # idempotent
    with pytest.raises(ValueError):
        readme.rewrite("no markers here", res)


def test_targets_are_issue_12s() -> None:
    assert (report.T_SMALL, report.T_CPU, report.T_GET, report.T_CAS) == (1.1, 1.2, 0.7, 2.0)
    assert (report.T_STORM_TORCH, report.T_STORM_OURS, report.T_INIT, report.T_THREADS) == (1.0, 1.3, 1.0, 0.8)
    assert (report.T_RSS_MIB, report.T_RSS_CONNECTIONS) == (64.0, 16384)
    assert report.holds(1.004, 1.0) == "yes" and report.holds(1.01, 1.0) == "**no**"


def test_machine_limits_are_not_store_errors() -> None:
    why = bench_storm.machine_limit(1 << 24, 16)
    assert why and why.startswith("machine limit")
    assert bench_storm.machine_limit(4, 2) is None
    assert bench_storm.machine_error("OSError: [Errno 24] Too many open files")
    assert bench_storm.machine_error("RuntimeError: can't start new thread")
    assert bench_storm.machine_error("OSError: [Errno 99] Cannot assign requested address")
    assert not bench_storm.machine_error("TimeoutError: timed out")
    assert not bench_storm.machine_error("ConnectionResetError: [Errno 104] Connection reset by peer")


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_rendezvous_benchmark_stops_its_processes_when_interrupted(tmp_path: Path, sig: int) -> None:
    runner = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_rendezvous", "--no-torch", "--sizes", "8", "--reps", "50",
         "--out", str(tmp_path)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_children(runner.pid)) < 2:  # server + a worker
            assert runner.poll() is None
            time.sleep(0.02)
        seen = _children(runner.pid)
        assert len(seen) >= 2, "the benchmark never started its server and workers"
        runner.send_signal(sig)
        runner.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in seen):
            time.sleep(0.05)
        assert not [p for p in seen if _alive(p)], "processes left running after the benchmark was interrupted"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(timeout=10)
        for p in seen:  # never leave one behind, even when the test fails
            if _alive(p):
                os.kill(p, signal.SIGKILL)
