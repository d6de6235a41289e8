"""A minimal HTTP/1.x endpoint serving ``/metrics`` on the store server's own event loop.

It answers ``GET`` (and ``HEAD``) of ``/metrics`` (a query string is ignored) with the
text ``render()`` returns, ``404`` for any other path, ``405`` for other methods and
``400`` for a request it cannot read, and closes the connection after each answer
(``Connection: close``; Prometheus reconnects per scrape without complaint). Bounds: a
request head of at most ``MAX_HEAD`` bytes, read within ``TIMEOUT`` seconds, the answer
written within ``TIMEOUT`` seconds, at most ``MAX_CLIENTS`` connections at once (further
ones are closed at once). The body is never read: a scrape has none.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

__all__ = ["MetricsEndpoint", "MAX_HEAD", "TIMEOUT", "MAX_CLIENTS"]

log = logging.getLogger("rdzv_store.metrics")

MAX_HEAD = 8192
TIMEOUT = 10.0
MAX_CLIENTS = 32

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class MetricsEndpoint:
    """Serves ``render()`` (``(body, content_type)``) on already-bound listening sockets."""

    def __init__(self, render: Callable[[], tuple[str, str]]) -> None:
        self._render = render
        self._servers: list[asyncio.Server] = []
        self._clients: set[asyncio.StreamWriter] = set()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def start(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            sock.setblocking(False)
            self._servers.append(await asyncio.start_server(self._client, sock=sock, limit=MAX_HEAD))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._clients):
            writer.transport.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        self._clients.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
                await self._answer(writer, 400, b"bad request\n", "text/plain; charset=utf-8")
                return
            method, path = _request_line(head)
            if method is None:
                await self._answer(writer, 400, b"bad request\n", "text/plain; charset=utf-8")
            elif path.split("?", 1)[0] != "/metrics":
                await self._answer(writer, 404, b"not found: only /metrics is served\n", "text/plain; charset=utf-8")
            elif method not in ("GET", "HEAD"):
                await self._answer(writer, 405, b"method not allowed\n", "text/plain; charset=utf-8")
            else:
                body, content_type = self._render()
                await self._answer(writer, 200, body.encode(), content_type, head_only=method == "HEAD")
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass  # the scraper went away or does not read: nothing to report
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _answer(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, head_only: bool = False
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        )
        if status == 405:
            head += "Allow: GET, HEAD\r\n"
        writer.write(head.encode("ascii") + b"\r\n" + (b"" if head_only else body))
        await asyncio.wait_for(writer.drain(), TIMEOUT)


def _request_line(head: bytes) -> tuple[str | None, str]:
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None, ""
    try:
        return parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None, ""
