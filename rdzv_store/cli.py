"""``rdzv-store`` command line: ``serve`` a standalone store, or run the ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from .auth import load_secret
from .server import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT, StoreServer

__all__ = ["main"]

log = logging.getLogger("rdzv_store.cli")


async def _serve(host: str, port: int, max_connections: int, **options: object) -> None:
    server = StoreServer(host, port, max_connections=max_connections, **options)  # type: ignore[arg-type]
    await server.start()
    # One parseable line on stdout, so launchers (and tests) can learn a port chosen with --port 0.
    print(f"rdzv-store listening on {host} port {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: closing %d connection(s)", server.connection_count)
    await server.close()


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop  # optional extra; the default is pure asyncio

        return uvloop.new_event_loop
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rdzv-store", description=__doc__)
    parser.add_argument("--log-level", help="logging level (default: INFO for serve, WARNING otherwise)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a standalone TCPStore server until SIGINT/SIGTERM")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind, and only that (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=29500, help="port (0 picks a free one; default: 29500)")
    serve.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    serve.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop: asyncio (default) or uvloop (pip install 'rdzv-store[uvloop]')",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="close a connection stuck this many seconds in the middle of a request (0: never; "
        f"default: {DEFAULT_REQUEST_TIMEOUT:g}); idle connections are never closed",
    )
    serve.add_argument(
        "--secret-file",
        help="require rdzv-store clients to prove they know the secret in this file (torch's protocol "
        "has no authentication; without this option none is asked for)",
    )
    serve.add_argument(
        "--allow-torch-clients",
        action="store_true",
        help="with --secret-file: also serve clients that skip the check (torch's TCPStore)",
    )

    demo = commands.add_parser("demo", help="host a store and run worker processes through a barrier")
    demo.add_argument("--workers", type=int, default=4)

    worker = commands.add_parser("demo-worker", help=argparse.SUPPRESS)
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--rank", type=int, required=True)
    worker.add_argument("--world-size", type=int, required=True)

    args = parser.parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "serve":
        options: dict[str, object] = {"request_timeout": args.request_timeout or None}
        if args.secret_file:
            options["secret"] = load_secret(args.secret_file)
            options["allow_torch_clients"] = args.allow_torch_clients
        elif args.allow_torch_clients:
            parser.error("--allow-torch-clients only makes sense with --secret-file")
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            runner.run(_serve(args.host, args.port, args.max_connections, **options))
        return 0
    from . import demo as demo_module

    if args.command == "demo":
        return demo_module.run_demo(args.workers)
    return demo_module.run_worker(args.port, args.rank, args.world_size)


if __name__ == "__main__":
    sys.exit(main())
