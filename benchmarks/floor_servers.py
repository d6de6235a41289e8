"""The floor for server CPU per request: bare asyncio servers that do nothing but answer.

    python benchmarks/floor_servers.py echo|raw     # prints "port N", serves until SIGTERM

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

Both run on the default asyncio event loop, single-threaded, like ``rdzv_store serve``.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import sys

HOST = "127.0.0.1"
HEADER = struct.Struct("!II")


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


def listener_socket() -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(4096)
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
    else:
        raise SystemExit(f"unknown floor server {kind!r}; choose echo or raw")
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
    """A blocking client of a floor server: ``req`` bytes up, ``reply`` bytes back per request."""

    def __init__(self, port: int, req: int, reply: int) -> None:
        payload = b"q" * max(1, req)
        super().__init__(port, HEADER.pack(len(payload), reply), payload, reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
