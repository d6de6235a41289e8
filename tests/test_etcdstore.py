"""EtcdStore against a real etcd member: the Store contract, blocking without a gap, bad input
and faults (unreachable endpoints, failover, request limit, auth, TLS, compaction).

The hypothesis model check runs EtcdStore too (tests/test_store_model.py); the 3-member
cluster faults are in tests/test_etcd_cluster.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import uuid

import pytest
from etcd_helpers import EtcdCluster, etcd_binary, free_port, free_ports, post, shared_member

from rdzv_store import (
    EtcdAuthError,
    EtcdCompactedError,
    EtcdRequestTooLargeError,
    EtcdStore,
    EtcdUnavailableError,
    PrefixStore,
    QueueEmptyError,
    StoreConnectionError,
    StoreError,
    StoreTimeoutError,
)
from rdzv_store.etcd_client import EtcdClient, b64


@pytest.fixture
def etcd() -> EtcdCluster:
    return shared_member()


@pytest.fixture
def store(etcd):
    with EtcdStore(etcd.endpoints, prefix=f"/t-{uuid.uuid4().hex}/", timeout=10) as s:
        yield s


# -- the contract --------------------------------------------------------------------------------
def test_set_get_add_append_delete(store):
    store.set("a", "1")
    store.set("é", b"\x00\xff")
    assert store.get("a") == b"1" and store.get("é".encode()) == b"\x00\xff"
    assert store.add("ctr", 5) == 5 and store.add("ctr", -7) == -2
    assert store.add("ctr", 2**63 - 1) == 2**63 - 3  # wraps like int64
    store.append("log", "x")
    store.append("log", b"yz")
    assert store.get("log") == b"xyz"
    store.set("empty", "")
    assert store.get("empty") == b""
    assert store.delete_key("a") is True and store.delete_key("a") is False
    assert store.check(["log", "ctr"]) and not store.check(["log", "a"])
    assert sorted(store.list_keys()) == ["ctr", "empty", "log", "é"]
    assert store.num_keys() == 4


def test_compare_set_follows_torchs_rule(store):
    assert store.compare_set("k", "", "v1") == b"v1"  # missing + empty expected: created
    assert store.compare_set("k", "v1", "v2") == b"v2"
    assert store.compare_set("k", "nope", "v3") == b"v2"  # mismatch: current value returned
    assert store.compare_set("missing", "x", "y") == b"x"  # missing + non-empty expected: nothing stored
    assert not store.check(["missing"])
    store.set("e", "")
    assert store.compare_set("e", "", "filled") == b"filled"  # present and empty matches ""
    assert store.compare_set("k", "", "zz") == b"v2"


def test_add_on_non_integer_raises_and_leaves_the_value(store):
    store.set("s", "abc")
    with pytest.raises(ValueError, match="s"):
        store.add("s", 1)
    assert store.get("s") == b"abc"
    store.set("n", " 12abc")
    assert store.add("n", 1) == 13  # std::stoll rules, as torch


def test_multi_get_multi_set_and_many_keys(store):
    store.multi_set(["x", "y", "x"], ["1", "2", "3"])  # last duplicate wins
    assert store.multi_get(["x", "y"]) == [b"3", b"2"]
    keys = [f"k{i}" for i in range(300)]  # more than one transaction's worth
    store.multi_set(keys, [str(i) for i in range(300)])
    assert store.multi_get(keys) == [str(i).encode() for i in range(300)]
    assert store.check(keys)
    assert store.num_keys() == 302
    assert len(store.list_keys()) == 302  # paged


def test_queues_are_fifo_and_separate_from_keys(store):
    for v in ("1", "2", "3"):
        store.queue_push("q", v)
    assert store.queue_len("q") == 3
    assert store.check(["q"])  # a non-empty queue counts as an existing key
    assert store.list_keys() == [] and store.num_keys() == 0
    assert [store.queue_pop("q") for _ in range(3)] == [b"1", b"2", b"3"]
    with pytest.raises(QueueEmptyError, match="queue is empty"):
        store.queue_pop("q", block=False)
    store.set_timeout(0.3)
    with pytest.raises(StoreTimeoutError, match="q"):
        store.queue_pop("q")


def test_blocking_queue_pop_one_waiter_per_item(store):
    got: list[bytes] = []
    clones = [store.clone() for _ in range(3)]
    threads = [threading.Thread(target=lambda c=c: got.append(c.queue_pop("jobs"))) for c in clones]
    for t in threads:
        t.start()
    for i in range(3):
        store.queue_push("jobs", str(i))
    for t in threads:
        t.join(15)
    assert sorted(got) == [b"0", b"1", b"2"]
    for c in clones:
        c.close()


def test_get_blocks_until_another_client_sets(store):
    other = store.clone()
    t = threading.Thread(target=lambda: (store.wait(["go"]), other.set("late", "L")))
    t.start()
    store.clone().set("go", "1")
    assert store.get("late") == b"L"
    t.join(10)
    other.close()


def test_wait_times_out_naming_the_missing_keys(store):
    store.set("here", "1")
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError, match=r"wait timeout after 400ms, keys: gone"):
        store.wait(["here", "gone"], timeout=0.4)
    assert time.monotonic() - start < 2.0
    store.set_timeout(0)
    with pytest.raises(StoreTimeoutError):
        store.get("gone")  # timeout <= 0: do not wait
    with pytest.raises(TimeoutError):
        store.wait(["gone"], 0.01)


def test_no_write_is_missed_between_the_read_and_the_watch(etcd, monkeypatch):
    # A write lands right after the read that found the key missing, before the watch opens:
    # the watch starts at that read's revision + 1 and must see it at once (not at a refresh).
    store = EtcdStore(etcd.endpoints, prefix=f"/gap-{uuid.uuid4().hex}/", timeout=20, watch_refresh=30)
    writer = store.clone()
    real = store._missing

    def missing_then_write(*args, **kwargs):
        result = real(*args, **kwargs)
        if result[0]:
            writer.set("k", "v")
        return result

    monkeypatch.setattr(store, "_missing", missing_then_write)
    start = time.monotonic()
    store.wait(["k"])
    assert time.monotonic() - start < 5
    store.close()
    writer.close()


def test_barrier_across_threads(store):
    clones = [store.clone() for _ in range(4)]
    threads = [threading.Thread(target=c.barrier, args=("b", 4)) for c in clones]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads)
    for c in clones:
        c.close()


def test_concurrent_adds_from_threads_and_clones_are_exact(store):
    stores = [store] + [store.clone() for _ in range(3)]
    results: list[int] = []
    lock = threading.Lock()

    def run(s):
        for _ in range(25):
            v = s.add("ctr", 1)
            with lock:
                results.append(v)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(1, 201))
    assert store.get("ctr") == b"200"
    for s in stores[1:]:
        s.close()


def test_prefixes_isolate_stores_and_prefixstore_wraps(etcd):
    a = EtcdStore(etcd.endpoints, prefix=f"/iso-{uuid.uuid4().hex}/", timeout=5)
    b = EtcdStore(etcd.endpoints, prefix=f"/iso-{uuid.uuid4().hex}/", timeout=5)
    a.set("k", "a")
    assert not b.check(["k"]) and b.num_keys() == 0
    job = PrefixStore("job", a)
    job.set("r0", "x")
    assert a.get("job/r0") == b"x" and sorted(a.list_keys()) == ["job/r0", "k"]
    assert a.has_extended_api()
    a.close()
    b.close()
    a.close()  # twice is fine


def test_close_removes_the_operation_record(etcd):
    prefix = f"/rec-{uuid.uuid4().hex}/"
    s = EtcdStore(etcd.endpoints, prefix=prefix, timeout=5)
    s.set("k", "v")
    raw = EtcdClient(etcd.endpoints, timeout=5)
    count = lambda: int(raw.call("kv/range", {"key": b64(prefix.encode() + b"o/"), "range_end": b64(prefix.encode() + b"o0"), "count_only": True}).get("count", "0"))  # noqa: E731
    assert count() == 1
    s.close()
    assert count() == 0
    raw.close()


# -- bad input and faults ------------------------------------------------------------------------
def test_unreachable_endpoint_fails_within_the_timeout_naming_endpoint_and_key():
    port = free_port()
    s = EtcdStore([f"127.0.0.1:{port}"], timeout=1, attempt_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(EtcdUnavailableError) as info:
        s.set("the-key", "v")
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 2.5
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "the-key" in message and "refused" in message.lower()
    assert isinstance(info.value, StoreConnectionError) and isinstance(info.value, StoreError)
    with pytest.raises(EtcdUnavailableError):
        s.wait(["x"], timeout=0.5)
    s.close()


def test_a_dead_endpoint_is_skipped(etcd):
    dead = f"http://127.0.0.1:{free_port()}"
    s = EtcdStore([dead] + etcd.endpoints, prefix=f"/fo-{uuid.uuid4().hex}/", timeout=5)
    start = time.monotonic()
    s.set("k", "v")
    assert s.get("k") == b"v" and time.monotonic() - start < 2
    s.close()


def test_bad_endpoints_are_value_errors():
    with pytest.raises(ValueError):
        EtcdStore([])
    with pytest.raises(ValueError, match="http or https"):
        EtcdStore(["ftp://h:1"])
    with pytest.raises(ValueError):
        EtcdStore(["h:notaport"])
    with pytest.raises(ValueError):
        EtcdStore(["h:1"], prefix="")


def test_value_over_the_request_limit_is_refused_and_nothing_is_written(store, etcd):
    big = b"x" * (1572864 + 10)
    with pytest.raises(EtcdRequestTooLargeError, match="big") as info:
        store.set("big", big)
    assert isinstance(info.value, ValueError)
    with pytest.raises(EtcdRequestTooLargeError):
        store.multi_set(["m1", "m2"], [b"a", big])
    assert not store.check(["big"]) and not store.check(["m1"])
    # The server's own refusal maps to the same error (the local check turned off).
    lax = EtcdStore(etcd.endpoints, prefix=store.prefix, timeout=5, max_request_bytes=10**8)
    with pytest.raises(EtcdRequestTooLargeError, match="etcd http") as info:
        lax.set("big", big)
    with pytest.raises(EtcdRequestTooLargeError):
        lax.set("big", b"y" * (2 * 1024 * 1024 + 100))
    assert not lax.check(["big"])
    lax.set("fine", "1")  # the store still works afterwards
    lax.close()


def test_compacted_revision_during_a_watch(store, etcd):
    client = store.client
    store.set("w", "1")
    rev = int(client.call("kv/range", {"key": b64(b"x")})["header"]["revision"])
    store.set("w", "2")
    store.set("w", "3")
    client.call("kv/compaction", {"revision": str(rev + 2), "physical": True})
    watch = client.watch([{"key": b64(b"anything"), "start_revision": str(rev)}], deadline=time.monotonic() + 5, key=b"anything")
    with pytest.raises(EtcdCompactedError, match="compacted") as info:
        for _ in watch.messages(time.monotonic() + 5):
            pass
    watch.close()
    assert "anything" in str(info.value) and "etcd http" in str(info.value)


def test_wait_survives_a_compaction_between_read_and_watch(etcd, monkeypatch):
    store = EtcdStore(etcd.endpoints, prefix=f"/cmp-{uuid.uuid4().hex}/", timeout=20, watch_refresh=30)
    helper = store.clone()
    real = store._missing
    calls = []

    def missing_then_compact(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        if len(calls) == 1:
            helper.set("noise", "1")
            helper.set("noise", "2")
            rev = helper.client.call("kv/range", {"key": b64(b"x")})["header"]["revision"]
            helper.client.call("kv/compaction", {"revision": rev})
        elif len(calls) == 2:
            helper.set("k", "v")  # written after the recovery read: the new watch sees it
        return result

    monkeypatch.setattr(store, "_missing", missing_then_compact)
    store.wait(["k"])
    assert len(calls) == 2
    store.close()
    helper.close()


@pytest.fixture(scope="module")
def auth_member():
    etcd_binary()
    with EtcdCluster(1, extra=["--auth-token-ttl", "2"]) as c:
        port = c.members[0].client_port
        prefix = "/secure/"
        for path, body in [
            ("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/role/add", {"name": "rdzv"}),
            ("/v3/auth/role/grant", {"name": "rdzv", "perm": {"permType": "READWRITE", "key": b64(prefix.encode()), "range_end": b64(b"/secure0")}}),
            ("/v3/auth/user/add", {"name": "trainer", "password": "pw"}),
            ("/v3/auth/user/grant", {"user": "trainer", "role": "rdzv"}),
            ("/v3/auth/enable", {}),
        ]:
            code, reply = post(port, path, body)
            assert code == 200, (path, reply)
        yield c


def test_auth_good_credentials_work_and_tokens_are_renewed(auth_member):
    s = EtcdStore(auth_member.endpoints, prefix="/secure/", timeout=10, user="trainer", password="pw")
    s.set("k", "v")
    assert s.get("k") == b"v" and s.add("c", 2) == 2
    t = threading.Thread(target=lambda: s.clone().set("later", "1"))
    t.start()
    s.wait(["later"])
    t.join(10)
    time.sleep(3.5)  # idle past --auth-token-ttl 2: the token expires, the store logs in again
    assert s.get("k") == b"v"
    s.close()


def test_auth_failures_are_clear_and_fast(auth_member):
    start = time.monotonic()
    bad = EtcdStore(auth_member.endpoints, prefix="/secure/", timeout=10, user="trainer", password="wrong")
    with pytest.raises(EtcdAuthError, match="authentication failed") as info:
        bad.set("k", "v")
    assert "etcd http://127.0.0.1" in str(info.value)
    anon = EtcdStore(auth_member.endpoints, prefix="/secure/", timeout=10)
    with pytest.raises(EtcdAuthError):
        anon.get("k")
    with pytest.raises(EtcdAuthError):
        anon.wait(["k"])
    outside = EtcdStore(auth_member.endpoints, prefix="/elsewhere/", timeout=10, user="trainer", password="pw")
    with pytest.raises(EtcdAuthError, match="permission denied"):
        outside.set("k", "v")
    assert time.monotonic() - start < 3
    for s in (bad, anon, outside):
        s.close()


def test_add_after_an_append_trusts_etcd_not_its_own_memory(store):
    """add's first guess is what this object last wrote there; a guess that is no integer (an
    append's bytes, since deleted or overwritten) is no error: only etcd's value can be one."""
    s1, s2 = store, store.clone()
    s1.append("b", b"\x00")
    s1.delete_key("b")
    assert s1.add("b", 0) == 0  # the hypothesis model check found this one
    s1.append("d", b"z")
    s2.set("d", "5")
    assert s1.add("d", 1) == 6
    s2.set("d", "x")
    with pytest.raises(ValueError, match="add on key d: stored value is not an integer"):
        s1.add("d", 1)
    s2.close()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A test CA, and a server and a client certificate it signed (for 127.0.0.1): name -> path."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl to make test certificates")
    d = str(tmp_path_factory.mktemp("tls"))
    p = lambda name: os.path.join(d, name)  # noqa: E731
    # keyUsage on the CA: Python 3.13's default context verifies strictly (VERIFY_X509_STRICT) and
    # refuses a CA certificate without it, as a real CA's would have it anyway.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", p("ca.key"), "-out", p("ca.crt"))
    with open(p("ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", p(f"{name}.key"), "-out", p(f"{name}.csr"))
        _openssl("x509", "-req", "-in", p(f"{name}.csr"), "-CA", p("ca.crt"), "-CAkey", p("ca.key"), "-CAcreateserial", "-days", "2", "-extfile", p("ext"), "-out", p(f"{name}.crt"))
    return p


@pytest.fixture(scope="module")
def tls_member(tls_files):
    etcd_binary()
    p = tls_files
    cluster = EtcdCluster(1, extra=["--cert-file", p("server.crt"), "--key-file", p("server.key"), "--trusted-ca-file", p("ca.crt"), "--client-cert-auth"])
    # Client URLs over https: rewrite the scheme before starting.
    cluster.members = []
    from etcd_helpers import EtcdMember

    class TlsMember(EtcdMember):
        @property
        def client_url(self) -> str:
            return f"https://127.0.0.1:{self.client_port}"

        def healthy(self, timeout: float = 0.5) -> bool:
            try:
                c = EtcdClient([self.client_url], timeout=1, ca_cert=p("ca.crt"), cert=p("client.crt"), key=p("client.key"))
                c.call("kv/range", {"key": b64(b"h")}, timeout=1)
                c.close()
                return True
            except StoreError:
                return False

    member = TlsMember("n0", *free_ports(2), os.path.join(cluster.root, "n0"))
    cluster.members = [member]
    member.start(cluster.initial_cluster, cluster.token, extra=cluster.extra)
    cluster.token_used = cluster.token
    assert cluster._wait_healthy(), member.log_tail()
    yield cluster, p
    cluster.stop()


def test_tls_with_client_certificate(tls_member):
    cluster, p = tls_member
    s = EtcdStore(cluster.endpoints, prefix="/tls/", timeout=5, ca_cert=p("ca.crt"), cert=p("client.crt"), key=p("client.key"))
    s.set("k", "v")
    assert s.get("k") == b"v"
    s.close()
    start = time.monotonic()
    no_cert = EtcdStore(cluster.endpoints, prefix="/tls/", timeout=20, ca_cert=p("ca.crt"))
    with pytest.raises(EtcdAuthError, match="TLS"):
        no_cert.get("k")
    # Reported as a TLS refusal, long before the store timeout. Usually within 0.1 s; but when the
    # server's close beats the alert to the client, the attempt fails as a reset, which is retried
    # like any reset (with backoff) until an attempt reads the alert: CI once took 4.7 s that way.
    assert time.monotonic() - start < 10
    no_cert.close()


def test_tls_connection_reset_at_its_first_request_is_named_in_the_error(tls_files):
    """A server that completes the TLS handshake and then resets the connection once the request
    is in (what etcd's refusal of a client certificate looks like when its alert is lost) ends in
    an error that names the endpoint and says what such a reset may mean."""
    p = tls_files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(p("server.crt"), p("server.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    stop = threading.Event()
    reset = []

    def serve() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            try:
                tls = ctx.wrap_socket(raw, server_side=True)
                request = b""
                while not request.endswith(b"}"):  # the whole request (its JSON body ends it) is in
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    request += chunk
                if request.endswith(b"}"):  # reset it: SO_LINGER 0 makes close send RST
                    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    reset.append(1)
                tls.close()
            except (ssl.SSLError, OSError):
                raw.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = EtcdClient([f"https://127.0.0.1:{port}"], timeout=1.0, ca_cert=p("ca.crt"))
    try:
        with pytest.raises(EtcdUnavailableError, match="reset during its first request") as info:
            client.call("kv/range", {"key": b64(b"k")})
        assert f"127.0.0.1:{port}" in str(info.value)
        assert "RemoteDisconnected" in str(info.value) or "ConnectionResetError" in str(info.value)
        assert reset, "the server never saw a request"
    finally:
        client.close()
        stop.set()
        server.join(5)
        listener.close()
