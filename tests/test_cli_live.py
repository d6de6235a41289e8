"""``rdzv-store ping|keys|get|set|add|delete|wait HOST:PORT``: the real CLI (a subprocess) against
our server (``rdzv-store serve``, another subprocess). The same commands against torch's servers
are in ``tests/interop/test_cli_interop.py``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from rdzv_store import TCPStore


def cli(*args: str, input: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rdzv_store", *args], input=input, capture_output=True, timeout=timeout
    )


def ok(*args: str, input: bytes | None = None) -> bytes:
    out = cli(*args, input=input)
    assert out.returncode == 0, (args, out.returncode, out.stderr)
    assert out.stderr == b"", out.stderr
    return out.stdout


def one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rdzv-store: error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv_store", "serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("rdzv-store listening on 127.0.0.1 port "), (line, proc.stderr.read())
        yield f"127.0.0.1:{int(line.split()[-1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def store(server, request):
    """A client of the same server; each test uses keys under its own name."""
    host, port = server.rsplit(":", 1)
    with TCPStore(host, int(port), timeout=10) as client:
        yield client


def test_set_then_get_prints_the_value_raw(server, store):
    assert ok("set", server, "live/greeting", "hello world") == b""
    assert store.get("live/greeting") == b"hello world"
    assert ok("get", server, "live/greeting") == b"hello world"  # no newline added on a pipe


def test_set_from_stdin_keeps_any_bytes(server, store):
    blob = bytes(range(256)) + b"\n\n"
    ok("set", server, "live/blob", input=blob)
    assert store.get("live/blob") == blob
    assert ok("get", server, "live/blob") == blob
    doc = json.loads(ok("get", server, "live/blob", "--json"))
    assert doc["key"] == "live/blob" and doc["value"] is None  # not UTF-8
    import base64

    assert base64.b64decode(doc["base64"]) == blob


def test_get_json_of_text(server, store):
    store.set("live/text", "ünïcode")
    doc = json.loads(ok("get", server, "live/text", "--json"))
    assert doc["value"] == "ünïcode"


def test_get_of_a_missing_key_fails_at_once(server):
    started = time.monotonic()
    one_line_error(cli("get", server, "live/never", "--timeout", "20"), "no key 'live/never'", server)
    assert time.monotonic() - started < 15  # did not wait for the key


def test_add_prints_the_sum(server, store):
    assert ok("add", server, "live/counter", "5") == b"5\n"
    assert ok("add", server, "live/counter", "-2") == b"3\n"
    assert json.loads(ok("add", server, "live/counter", "0", "--json")) == {"key": "live/counter", "value": 3}
    assert store.add("live/counter", 0) == 3


def test_add_to_a_non_integer_is_a_runtime_error(server, store):
    store.set("live/not-a-number", "abc")
    one_line_error(cli("add", server, "live/not-a-number", "1", "--timeout", "5"))


def test_keys_lists_every_key_sorted(server, store):
    store.set("live/keys/b", "1")
    store.set("live/keys/a", "2")
    listed = ok("keys", server).decode().splitlines()
    assert [k for k in listed if k.startswith("live/keys/")] == ["live/keys/a", "live/keys/b"]
    assert listed == sorted(listed)
    assert [k for k in json.loads(ok("keys", server, "--json")) if k.startswith("live/keys/")] == listed[
        listed.index("live/keys/a") : listed.index("live/keys/b") + 1
    ]


def test_delete_says_whether_the_key_existed(server, store):
    store.set("live/doomed", "x")
    assert ok("delete", server, "live/doomed") == b"deleted\n"
    assert not store.check(["live/doomed"])
    assert ok("delete", server, "live/doomed").startswith(b"not found")
    assert json.loads(ok("delete", server, "live/doomed", "--json")) == {"key": "live/doomed", "deleted": False}


def test_wait_returns_once_every_key_exists(server, store):
    store.set("live/w1", "1")
    waiter = subprocess.Popen(
        [sys.executable, "-m", "rdzv_store", "wait", server, "live/w1", "live/w2", "--timeout", "30", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        store.set("live/w2", "2")  # before or after the waiter connected: either way it must return
        stdout, stderr = waiter.communicate(timeout=40)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, stderr
    assert json.loads(stdout)["ready"] is True


def test_wait_times_out_naming_the_missing_key(server, store):
    store.set("live/present", "1")
    started = time.monotonic()
    line = one_line_error(cli("wait", server, "live/present", "live/absent", "--timeout", "0.5"), "live/absent")
    assert "timeout" in line and time.monotonic() - started >= 0.5


def test_ping_reports_the_round_trip(server):
    assert ok("ping", server).decode().startswith(f"{server} answered: connected in ")
    doc = json.loads(ok("ping", server, "--json"))
    assert doc["address"] == server and doc["round_trip_ms"] >= 0 and doc["connect_ms"] >= 0


def test_cli_clients_do_not_count_themselves_in(server, store):
    before = store.num_keys()
    ok("ping", server)
    ok("add", server, "live/count-check", "1")
    assert store.num_keys() == before + 1  # only the key it added; init/ untouched


def test_an_unreachable_store_is_a_one_line_runtime_error():
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    one_line_error(cli("get", f"127.0.0.1:{port}", "k", "--timeout", "0.5"), f"127.0.0.1, {port}")
    assert time.monotonic() - started < 20


def test_secret_file_for_a_server_that_requires_one(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef-live\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv_store", "serve", "--port", "0", "--secret-file", str(secret)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = f"127.0.0.1:{int(proc.stdout.readline().split()[-1])}"
        ok("set", address, "k", "v", "--secret-file", str(secret))
        assert ok("get", address, "k", "--secret-file", str(secret)) == b"v"
        assert cli("get", address, "k", "--timeout", "2").returncode == 1  # without the secret: refused
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_ipv6_address_form(server):
    port = server.rsplit(":", 1)[1]
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    # Our server bound 127.0.0.1 only, so [::1] is refused: the address form parses, the connect fails.
    one_line_error(cli("ping", f"[::1]:{port}", "--timeout", "0.5"), "::1")


def test_a_closed_stdout_is_not_a_traceback(server, store):
    for i in range(200):
        store.set(f"live/many/{i:03d}", "x")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv_store", "keys", server], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader went away before the output was written (as with | head -0)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1 and stderr == b"", stderr
