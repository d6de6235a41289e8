"""Smoke test of the benchmark runner at tiny sizes, so that it cannot rot.

It checks that every figure runs and the results files are written; it
asserts nothing about speed (benchmarks are not timed tests). torch-free:
``--no-torch`` measures only our stores even where torch is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_runner_tiny(tmp_path: Path) -> None:
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
    for name in ("small", "cas", "aggregate", "storm", "init", "memory"):
        assert name in results["figures"], (name, results["failures"])
    # FileStore figures appear once FileStore exists; "skipped" is the only acceptable absence
    for name, reason in results["failures"].items():
        assert reason.startswith("skipped"), (name, reason)
    storm = results["figures"]["storm"]
    for cell in storm.values():
        assert cell["ours->ours"]["errors"] == 0, cell
    assert results["figures"]["small"]["add"]["ours"]["p50_us"]["median"] > 0
    assert "Summary against the targets" in md
    assert results["machine"]["python"] and results["machine"]["date"]
