"""The command line: ``rdzv-store serve`` and the demo (the README's main job)."""

from __future__ import annotations

import shutil
import socket
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


# -- issue 11: errors, validation, --version, help -------------------------------------------------
def run_cli(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rdzv_store", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def assert_one_line_error(out: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rdzv-store: error: "), out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["serve", "--port", "-1"], ["--port", "0..65535", "'-1'"]),  # used to blame the host
        (["serve", "--port", "70000"], ["--port", "0..65535", "'70000'"]),  # used to be a raw OverflowError
        (["serve", "--port", "http"], ["--port", "'http'"]),
        (["serve", "--max-connections", "0"], ["--max-connections", ">= 1"]),
        (["serve", "--request-timeout", "-5"], ["--request-timeout", ">= 0"]),
        (["serve", "--request-timeout", "nan"], ["--request-timeout"]),
        (["serve", "--loop", "trio"], ["--loop"]),
        (["serve", "--allow-torch-clients"], ["--allow-torch-clients", "--secret-file"]),
        (["serve", "--log-level", "loud"], ["--log-level", "'loud'"]),
        (["demo", "--workers", "-1"], ["--workers", "1..64"]),
        (["demo", "--workers", "0"], ["--workers"]),
        (["get", "127.0.0.1:70000", "k"], ["HOST:PORT", "'70000'"]),
        (["get", "127.0.0.1:0", "k"], ["HOST:PORT", "1..65535"]),
        (["get", ":29500", "k"], ["no host"]),
        (["get", "127.0.0.1:29500", ""], ["key", "empty"]),
        (["add", "127.0.0.1:29500", "k", "one"], ["amount"]),
        (["wait", "127.0.0.1:29500", "k", "--timeout", "0"], ["--timeout", "> 0"]),
        (["keys"], ["HOST:PORT"]),
        ([], ["COMMAND"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, fragments):
    assert_one_line_error(run_cli(*args), 2, *fragments)


def test_serve_refuses_an_empty_host_instead_of_binding_every_interface():
    for host in ("", "  "):
        line = assert_one_line_error(run_cli("serve", "--host", host, "--port", "0"), 2, "--host")
        assert "every interface" in line and "0.0.0.0" in line and "::" in line


def test_port_in_use_is_a_one_line_runtime_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("serve", "--host", "127.0.0.1", "--port", str(port))
    assert_one_line_error(out, 1, "address already in use", str(port))


def test_unresolvable_host_is_a_one_line_runtime_error():
    out = run_cli("serve", "--host", "no-such-host.invalid", "--port", "0", timeout=60)
    assert_one_line_error(out, 1, "cannot resolve", "no-such-host.invalid")


def test_secret_file_problems_are_one_line_runtime_errors(tmp_path):
    missing = tmp_path / "missing"
    assert_one_line_error(run_cli("serve", "--port", "0", "--secret-file", str(missing)), 1, str(missing), "No such file")
    short = tmp_path / "short"
    short.write_bytes(b"tooshort\n")
    assert_one_line_error(run_cli("serve", "--port", "0", "--secret-file", str(short)), 1, str(short), "16 bytes")


def test_debug_shows_the_traceback_of_a_runtime_failure(tmp_path):
    for argv in (["--debug", "serve"], ["serve", "--debug"]):  # before or after the command
        out = run_cli(*argv, "--port", "0", "--secret-file", str(tmp_path / "missing"))
        assert out.returncode == 1 and "Traceback" in out.stderr, out.stderr


def test_version_is_the_package_version():
    import importlib.metadata

    import rdzv_store

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"rdzv-store {rdzv_store.__version__}"
    assert rdzv_store.__version__ == importlib.metadata.version("rdzv-store")


def _all_parsers():
    import argparse

    from rdzv_store.cli import build_parser

    parser = build_parser()
    yield [], parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [name], sub


def test_every_option_states_its_default_and_help_is_plain_text():
    import argparse

    seen = 0
    for prefix, parser in _all_parsers():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert "default: " in (action.help or ""), (prefix, action.option_strings)
            seen += 1
        out = run_cli(*prefix, "--help")
        assert out.returncode == 0, out.stderr
        assert "==SUPPRESS==" not in out.stdout and "``" not in out.stdout and "`" not in out.stdout, out.stdout
    assert seen > 20


def test_help_lists_every_command():
    out = run_cli("--help")
    for command in ("serve", "demo", "ping", "keys", "get", "set", "add", "delete", "wait"):
        assert f"\n  {command} " in out.stdout, command
    assert "demo-worker" not in out.stdout


def test_demo_says_what_it_proved_and_explains_the_key_count():
    from rdzv_store.demo import expected_keys

    out = run_cli("demo", "--workers", "2", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "host: proved: all 2 workers passed the barrier and each read all 2 greetings" in out.stdout
    assert f"host: {expected_keys(2)} keys on the server, as expected: init/" in out.stdout
