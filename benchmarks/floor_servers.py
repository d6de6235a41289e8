"""The floor for server CPU per request: bare asyncio servers that do nothing but answer.

    python benchmarks/floor_servers.py echo|raw|storm     # prints "port N", serves until SIGTERM

Each connection starts with an 8-byte header, two big-endian uint32: the request size and the
reply size. After it, every complete request of that many bytes is answered with a reply of that
many bytes (fixed content); nothing is parsed or stored. ``bench_tcp.server_cpu`` drives them with
the request/reply sizes of the store's own operations, so their CPU per request (from /proc, as
for the stores) is what a single-threaded asyncio server spends on the wake-up, the receive and
the send alone: the floor a pure-Python asyncio store server cannot go below.

* ``echo``: ``asyncio.Protocol`` on the event loop's transports (what asyncio's streams and most
  asyncio servers build on);
* ``raw``: the loop's raw-socket primitives, ``loop.add_reader`` + ``recv_into`` + ``send`` on
  non-blocking sockets, with one preallocated receive buffer (no transport or protocol objects).

* ``storm``: no header; the floor for a connection storm (``bench_storm_floor``): torch's
  client's own requests (VALIDATE, PING, ADD, SET, WAIT) parsed by hand, on the primitives of
  ``raw`` and our server's batched accept (``_StormFloor``).

All run on the default asyncio event loop, single-threaded, like ``rdzv_store serve``.
"""

from __future__ import annotations

import _socket
import asyncio
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when run as a script

from rdzv_store import commands as cmd
from rdzv_store import protocol as p
from rdzv_store.client import handshake_request  # the bytes our client sends
from rdzv_store.server import _listen_backlog  # listen as our server does

HOST = "127.0.0.1"
HEADER = struct.Struct("!II")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_VALIDATE = p.encode_validate()  # type byte and magic


class _Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.header = b""
        self.req = 0
        self.reply = b""
        self.pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.req:
            self.header += data
            if len(self.header) < HEADER.size:
                return
            self.req, size = HEADER.unpack_from(self.header)
            self.reply = b"r" * size
            data = self.header[HEADER.size:]
            self.req = max(1, self.req)
        self.pending += len(data)
        while self.pending >= self.req:
            self.pending -= self.req
            assert self.transport is not None
            self.transport.write(self.reply)


class _Raw:
    """One connection on add_reader/recv_into/send."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop, self.sock = loop, sock
        # 1 MiB: big requests (compare_set's floor) arrive in as few reads as the kernel allows,
        # as our server's in-place receive does; a small request costs the same either way.
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.header = b""
        self.req = 0
        self.reply = b""
        self.pending = 0
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        try:
            n = self.sock.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            return
        if not self.req:
            self.header += bytes(self.view[:n])
            if len(self.header) < HEADER.size:
                return
            req, size = HEADER.unpack_from(self.header)
            self.req, self.reply = max(1, req), b"r" * size
            n = len(self.header) - HEADER.size
        self.pending += n
        while self.pending >= self.req:
            self.pending -= self.req
            sent = self.sock.send(self.reply)
            if sent < len(self.reply):  # never for small replies on an idle socket; stay correct anyway
                self.sock.setblocking(True)
                self.sock.sendall(self.reply[sent:])
                self.sock.setblocking(False)


class _StormFloor:
    """The least Python that serves a storm correctly: torch's client's VALIDATE, PING, ADD, SET
    and WAIT (and the CHECK and GET of our client's handshake), parsed by hand at fixed offsets,
    on the same loop primitives as ``_Raw`` and our server (accepts in batches with the C socket
    type, ``add_reader``, ``recv``, ``send``).

    No limits, no metrics, no other request types (any other byte closes the connection): a
    floor for CPU per storm connection and storm wall time, not a store.
    """

    kv: ClassVar[dict[bytes, bytes]] = {}  # one store for all connections, as a server has
    waiters: ClassVar[dict[bytes, list[_StormFloor]]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: _socket.socket) -> None:
        self.loop, self.sock, self.fd = loop, sock, sock.fileno()
        self.pending = b""
        self.missing = 0  # keys of the parked WAIT not yet set
        loop.add_reader(self.fd, self.readable)

    def readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if self.pending:
            data = self.pending + data
        out = []
        kv = self.kv
        i, n = 0, len(data)
        while i < n:
            t = data[i]
            if t == 0 or t == 13:  # VALIDATE (no reply) / PING (echo the nonce)
                if n - i < 5:
                    break
                if t == 13:
                    out.append(data[i + 1 : i + 5])
                elif data[i : i + 5] != _VALIDATE:
                    self.close()
                    return
                i += 5
            elif t == 4 or t == 1:  # ADD key i64 -> i64 / SET key value
                if n - i < 9:
                    break
                k_end = i + 9 + _U64.unpack_from(data, i + 1)[0]
                if t == 4:
                    end = k_end + 8
                    if n < end:
                        break
                    key = data[i + 9 : k_end]
                    value = int(kv.get(key, b"0")) + _I64.unpack_from(data, k_end)[0]
                    kv[key] = b"%d" % value
                    out.append(_I64.pack(value))
                else:
                    if n < k_end + 8:
                        break
                    end = k_end + 8 + _U64.unpack_from(data, k_end)[0]
                    if n < end:
                        break
                    key = data[i + 9 : k_end]
                    kv[key] = data[k_end + 8 : end]
                self._wake(key)
                i = end
            elif t == 3:  # GET key -> value (empty if missing; our client's handshake probe)
                if n - i < 9:
                    break
                k_end = i + 9 + _U64.unpack_from(data, i + 1)[0]
                if n < k_end:
                    break
                value = kv.get(data[i + 9 : k_end], b"")
                out.append(_U64.pack(len(value)) + value)
                i = k_end
            elif t == 6 or t == 5:  # WAIT n keys -> 00 once all exist / CHECK n keys -> 00 or 01
                if n - i < 9:
                    break
                count, j, keys = _U64.unpack_from(data, i + 1)[0], i + 9, []
                while len(keys) < count and j + 8 <= n:
                    k_end = j + 8 + _U64.unpack_from(data, j)[0]
                    if k_end > n:
                        break
                    keys.append(data[j + 8 : k_end])
                    j = k_end
                if len(keys) < count:
                    break
                i = j
                missing = [k for k in keys if k not in kv]
                if t == 5:
                    out.append(b"\1" if missing else b"\0")
                    continue
                if not missing:
                    out.append(b"\0")
                for key in missing:
                    self.waiters.setdefault(key, []).append(self)
                self.missing = len(missing)
            else:
                self.close()
                return
        self.pending = data[i:]
        if out:
            self.send(b"".join(out) if len(out) > 1 else out[0])

    def _wake(self, key: bytes) -> None:
        for conn in self.waiters.pop(key, ()):
            conn.missing -= 1
            if not conn.missing:
                conn.send(b"\0")

    def send(self, data: bytes) -> None:
        if self.fd < 0:  # closed while it waited: its STOP_WAITING has nobody to go to
            return
        sent = self.sock.send(data)
        if sent < len(data):  # never for these few bytes on a live socket; stay correct anyway
            self.sock.setblocking(True)
            self.sock.sendall(data[sent:])
            self.sock.setblocking(False)

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            self.sock.close()
            self.fd = -1


def serve_storm_floor(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
    accept = listener._accept  # type: ignore[attr-defined]  # the C accept, as our server uses
    family, kind, proto = int(listener.family), int(listener.type), listener.proto

    def acceptable() -> None:
        for _ in range(512):  # a batch per wake-up, as our server
            try:
                fd, _ = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            sock = _socket.socket(family, kind, proto, fd)
            sock.setblocking(False)
            _StormFloor(loop, sock)

    loop.add_reader(listener.fileno(), acceptable)


def listener_socket() -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
    listener.bind((HOST, 0))
    listener.listen(_listen_backlog())
    listener.setblocking(False)
    return listener


def serve_raw(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> list[_Raw]:
    """Accept on ``listener`` into ``_Raw`` connections (the list returned keeps them)."""
    conns: list[_Raw] = []

    def accept() -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conns.append(_Raw(loop, sock))

    loop.add_reader(listener.fileno(), accept)
    return conns


async def _serve(kind: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    listener = listener_socket()
    if kind == "echo":
        server = await loop.create_server(_Echo, sock=listener)
    elif kind == "raw":
        server = None
        conns = serve_raw(loop, listener)  # noqa: F841 (kept alive until we return)
    elif kind == "storm":
        server = None
        serve_storm_floor(loop, listener)
    else:
        raise SystemExit(f"unknown floor server {kind!r}; choose echo, raw or storm")
    print(f"port {listener.getsockname()[1]}", flush=True)
    try:
        await asyncio.wait_for(stop, 3600)  # bounded even if nobody ever stops us
    except asyncio.TimeoutError:
        pass
    if server is not None:
        server.close()


def main(argv: list[str]) -> int:
    asyncio.run(_serve(argv[0] if argv else "echo"))
    return 0


# -- the client side, used by bench_tcp.server_cpu ------------------------------------------------


class BlockingClient:
    """A blocking client: sends ``preamble`` once, then ``request()`` sends ``payload`` and
    waits for ``reply`` bytes (the same loop whatever server answers)."""

    def __init__(self, port: int, preamble: bytes, payload: bytes, reply: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.payload = payload
        self.reply = reply
        self.view = memoryview(bytearray(max(1, reply)))
        self.sock.sendall(preamble)

    def request(self) -> None:
        self.sock.sendall(self.payload)
        got = 0
        while got < self.reply:
            n = self.sock.recv_into(self.view[got:])
            if not n:
                raise ConnectionError("the server closed the connection")
            got += n

    def close(self) -> None:
        self.sock.close()


class FloorClient(BlockingClient):
    """A blocking client of a floor server: ``req`` bytes up, ``reply`` bytes back per request.

    ``first`` > 0 sends that many of the ``req`` bytes on their own before the rest, as a
    request without a reply is sent (set+check: the clients send SET, then CHECK), so the
    server may wake up twice, as it does for the stores.
    """

    def __init__(self, port: int, req: int, reply: int, first: int = 0) -> None:
        payload = b"q" * max(1, req)
        super().__init__(port, HEADER.pack(len(payload), reply), payload, reply)
        self.head = payload[:first] if 0 < first < len(payload) else b""
        self.payload = payload[len(self.head):]

    def request(self) -> None:
        if self.head:
            self.sock.sendall(self.head)
        super().request()


class StormClient:
    """The client floor of a storm: our client's bytes from a blocking socket, nothing else.

    What ``rdzv_store.TCPStore`` sends in a storm (``bench_storm``), byte for byte: its
    handshake (VALIDATE, PING, the secret probe's CHECK and the libuv probe's GET, in one send),
    ADD, SET and WAIT; replies of known size read whole, nothing checked or parsed but ADD's
    count. No timeouts beyond the socket's, no retries, no error messages: what a Python client
    in a thread cannot go below. Only ``add``, ``set`` and ``wait`` (storm mode).
    """

    def __init__(self, host: str, port: int, is_master: bool = False, timeout: object = None,
                 wait_for_workers: bool = False) -> None:
        self.sock = socket.create_connection((host, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(_STORM_HANDSHAKE)
        self._read(_STORM_REPLY_SIZE)

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return data

    def add(self, key: str, amount: int) -> int:
        self.sock.sendall(cmd.add(key.encode(), amount)[0])
        return int(_I64.unpack(self._read(8))[0])

    def set(self, key: str, value: str) -> None:
        self.sock.sendall(cmd.set_(key.encode(), value.encode())[0])

    def wait(self, keys: list[str]) -> None:
        self.sock.sendall(cmd.wait([k.encode() for k in keys])[0])
        self._read(1)

    def close(self) -> None:
        self.sock.close()


# Our client's handshake without a secret, with the libuv probe (nonce 0: the floor has no pid
# to prove), and how many reply bytes it reads: PING's echo, CHECK's byte, the probe's length.
_STORM_HANDSHAKE, _STORM_REPLY_SIZE = handshake_request(0, probe=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
