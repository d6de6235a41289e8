"""The command line: ``rdzv-store serve`` and the demo (the README's main job)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

from rdzv_store import TCPStore


def start_serve(*extra: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv_store", "serve", "--host", "127.0.0.1", "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # the server prints its port first; EOF if it died
    assert line.startswith("rdzv-store listening on 127.0.0.1 port "), (line, proc.stderr.read())
    return proc, int(line.split()[-1])


@pytest.fixture
def serve():
    procs = []

    def start(*extra: str):
        proc, port = start_serve(*extra)
        procs.append(proc)
        return proc, port

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_serve_hosts_a_store_and_exits_cleanly_on_sigint(serve):
    proc, port = serve()
    with TCPStore("127.0.0.1", port, timeout=5) as client:
        client.set("k", "v")
        assert client.get("k") == b"v"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    assert "Traceback" not in proc.stderr.read()


def test_serve_logs_bad_clients_with_one_warning(serve):
    import socket

    proc, port = serve()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"\x42")
        assert raw.recv(1) == b""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    warnings = [line for line in proc.stderr.read().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "closing connection from 127.0.0.1:" in warnings[0]


def test_serve_on_uvloop_when_installed(serve):
    pytest.importorskip("uvloop")
    proc, port = serve("--loop", "uvloop")
    with TCPStore("127.0.0.1", port, timeout=5) as client:
        assert client.add("n", 2) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_console_script_is_installed():
    exe = shutil.which("rdzv-store")
    if exe is None:
        pytest.skip("package not installed with its console script (running from a source tree)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "serve" in out.stdout and "demo" in out.stdout


def test_demo_runs_workers_through_a_barrier():
    out = subprocess.run(
        [sys.executable, "-m", "rdzv_store", "demo", "--workers", "3"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum("saw 3 greetings after the barrier" in line for line in lines) == 3
    assert any("arrivals counter = 3" in line for line in lines)
    assert lines[-1].startswith("host: all workers exited cleanly")
