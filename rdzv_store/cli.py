"""The rdzv-store command line: serve a standalone store, talk to a live one, or run the demo.

Every subcommand is registered in ``build_parser`` with one line, ``_command(commands, name,
help, configure, run)``: ``configure(parser)`` adds its arguments, ``run(args)`` does the work
and returns the exit code. Errors follow one rule, whatever the command:

* usage errors (a bad argument): one line ``rdzv-store: error: ...`` on stderr, exit 2;
* runtime failures (port in use, unresolvable host, unreadable secret file, a store that does
  not answer, a key that does not exist, a wait that timed out): one line, exit 1;
* ``--debug`` shows the traceback of a runtime failure instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import ipaddress
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from . import __version__
from .server import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT

__all__ = ["main", "build_parser", "CommandError"]

log = logging.getLogger("rdzv_store.cli")

PROG = "rdzv-store"
DEFAULT_PORT = 29500
DEFAULT_CLIENT_TIMEOUT = 10.0
MAX_DEMO_WORKERS = 64
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

Run = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A runtime failure a command reports as one line and exit code 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (``rdzv-store: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog[len(PROG) :].strip()
        hint = f"see '{self.prog} --help'"
        self.exit(2, f"{PROG}: error: {where + ': ' if where else ''}{message} ({hint})\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Lists subcommands without argparse's ``{a,b,c}`` choice line repeated in the list."""

    def _format_action(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._SubParsersAction):
            return "".join(self._format_action(sub) for sub in action._get_subactions())
        return super()._format_action(action)


# -- argument types: each raises ArgumentTypeError, which argparse turns into a usage error ---------
def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer in 0..65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be an integer in 0..65535, got {text!r}")
    return port


def _int_in(low: int, high: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}")
        return value

    return parse


def _seconds(allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            rule = ">= 0" if allow_zero else "> 0"
            raise argparse.ArgumentTypeError(f"must be a number of seconds {rule}, got {text!r}")
        return value

    return parse


def _refuse_empty_host(option: str, verb: str) -> Callable[[str], str]:
    """A host to bind for ``option``: refuse the empty string, which getaddrinfo would turn into
    every interface (an unset ``$MASTER_ADDR`` would expose the store)."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(
                f"an empty host would {verb} on every interface; to mean that, say so: "
                f"{option} 0.0.0.0 (every IPv4 interface) or {option} :: (every IPv6 interface)"
            )
        return text

    return parse


bind_host = _refuse_empty_host("--host", "listen")
metrics_host = _refuse_empty_host("--metrics-host", "serve metrics")


def log_level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"log level must be one of {', '.join(_LOG_LEVELS)}, got {text!r}")
    return text.upper()


def store_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``HOST`` (port 29500)."""
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not text[end + 1 :].startswith(":")):
            raise argparse.ArgumentTypeError(f"expected HOST:PORT or [IPV6]:PORT, got {text!r}")
        host, port = text[1:end], text[end + 2 :] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected HOST:PORT or [IPV6]:PORT, got {text!r}") from None
    if not host:
        raise argparse.ArgumentTypeError(f"the address {text!r} has no host (expected HOST:PORT)")
    if port == "0":
        raise argparse.ArgumentTypeError(f"port must be an integer in 1..65535, got {port!r}")
    return host, port_number(port)


# -- the parser -----------------------------------------------------------------------------------
def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the subcommand; after it, only an explicit value overrides.
    default: Any = argparse.SUPPRESS
    parser.add_argument(
        "--log-level",
        type=log_level,
        default=None if top else default,
        metavar="LEVEL",
        help="logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (default: INFO for serve, WARNING otherwise)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top else default,
        help="show the traceback of a failure, and log at DEBUG unless --log-level says otherwise (default: off)",
    )


def _command(
    commands: argparse._SubParsersAction,
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    run: Run,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=help[:1].upper() + help[1:] + ".", formatter_class=_HelpFormatter
    )
    configure(parser)
    _common_options(parser, top=False)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Torch-free c10d key-value stores: serve one, talk to a live one (ours or torch's), "
        "or run the demo. Exit codes: 0 success, 1 runtime failure, 2 usage error.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _common_options(parser, top=True)
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    # Every subcommand, in the order --help lists them: (name, help, configure, run).
    _command(commands, "serve", "run a standalone TCPStore server until SIGINT/SIGTERM", _configure_serve, _run_serve)
    _command(commands, "demo", "host a store and run worker processes through a barrier", _configure_demo, _run_demo)
    _command(commands, "ping", "check that a live store answers, and how fast", _configure_ping, _run_ping)
    _command(commands, "keys", "list the keys of a live store", _configure_keys, _run_keys)
    _command(commands, "get", "print the value of a key (fails if it does not exist)", _configure_get, _run_get)
    _command(commands, "set", "set a key to a value", _configure_set, _run_set)
    _command(commands, "add", "add an integer to a counter key and print the sum", _configure_add, _run_add)
    _command(commands, "delete", "delete a key", _configure_delete, _run_delete)
    _command(commands, "wait", "block until every key exists (or --timeout passes)", _configure_wait, _run_wait)
    _command(commands, "inspect", "show a store's keys and every elastic rendezvous state in it (never runs pickle)", _configure_inspect, _run_inspect)
    return parser


def _configure_inspect(parser: argparse.ArgumentParser) -> None:
    importlib.import_module("rdzv_backend.inspect").configure_parser(parser)  # lazy: rdzv_store never imports rdzv_backend


def _run_inspect(args: argparse.Namespace) -> int:
    code: int = importlib.import_module("rdzv_backend.inspect").run(args)
    return code


# -- serve ------------------------------------------------------------------------------------------
def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        type=bind_host,
        default="127.0.0.1",
        help="address to bind, and only that: a name binds every address it resolves to; "
        "0.0.0.0 or :: for every interface (default: 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT, help=f"port, 0 picks a free one (default: {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--max-connections",
        type=_int_in(1, None),
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"close further connections at once (default: {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--request-timeout",
        type=_seconds(allow_zero=True),
        default=DEFAULT_REQUEST_TIMEOUT,
        metavar="SECONDS",
        help="close a connection stuck this long in the middle of a request; idle connections are "
        f"never closed; 0: never (default: {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop; uvloop needs the optional uvloop extra (default: asyncio)",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="require rdzv-store clients to prove they know the secret in this file, at least 16 bytes "
        "(torch's protocol has no authentication; default: none asked for)",
    )
    parser.add_argument(
        "--allow-torch-clients",
        action="store_true",
        help="with --secret-file: also serve clients that skip the check, torch's TCPStore (default: off)",
    )
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help="serve Prometheus metrics at http://METRICS-HOST:PORT/metrics, 0 picks a free port "
        "(default: no metrics, nothing counted)",
    )
    parser.add_argument(
        "--metrics-host",
        type=metrics_host,
        metavar="HOST",
        help="with --metrics-port: address to serve metrics on, and only that (default: 127.0.0.1)",
    )


def _read_secret(path: str) -> bytes:
    from .auth import load_secret

    try:
        return load_secret(path)
    except OSError as exc:
        raise CommandError(f"cannot read the secret file {path!r}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CommandError(f"the secret file {path!r} is unusable: {exc}") from exc


def _run_until_complete(main: Coroutine[Any, Any, None], loop: str) -> None:
    """``asyncio.run`` on the chosen loop (``asyncio.Runner`` is 3.11+; this works on 3.10)."""
    if loop == "asyncio":
        asyncio.run(main)
        return
    try:
        uvloop = importlib.import_module("uvloop")  # optional extra; the default is pure asyncio
    except ImportError:
        main.close()
        raise CommandError("--loop uvloop needs uvloop: pip install 'rdzv-store[uvloop]'") from None
    event_loop = uvloop.new_event_loop()
    try:
        asyncio.set_event_loop(event_loop)
        event_loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)
        event_loop.close()


async def _serve(host: str, port: int, options: dict[str, Any]) -> None:
    from .server import StoreServer

    server = StoreServer(host, port, **options)
    await server.start()
    # One parseable line on stdout, so launchers (and tests) can learn a port chosen with --port 0.
    print(f"rdzv-store listening on {host} port {server.port}", flush=True)
    if server.metrics_port is not None:  # and one for --metrics-port 0
        mhost = options["metrics"][0]
        mhost = f"[{mhost}]" if ":" in mhost else mhost
        print(f"rdzv-store metrics on http://{mhost}:{server.metrics_port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: closing %d connection(s)", server.connection_count)
    await server.close()


def _run_serve(args: argparse.Namespace) -> int:
    if args.allow_torch_clients and not args.secret_file:
        raise _UsageError("--allow-torch-clients only makes sense with --secret-file")
    if args.metrics_host is not None and args.metrics_port is None:
        raise _UsageError("--metrics-host only makes sense with --metrics-port")
    options: dict[str, Any] = {
        "max_connections": args.max_connections,
        "request_timeout": args.request_timeout or None,
    }
    if args.secret_file:
        options["secret"] = _read_secret(args.secret_file)
        options["allow_torch_clients"] = args.allow_torch_clients
    if args.metrics_port is not None:
        options["metrics"] = (args.metrics_host or "127.0.0.1", args.metrics_port)
    _run_until_complete(_serve(args.host, args.port, options), args.loop)
    return 0


# -- demo -------------------------------------------------------------------------------------------
def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=_int_in(1, MAX_DEMO_WORKERS),
        default=4,
        metavar="N",
        help=f"worker processes to start, 1..{MAX_DEMO_WORKERS} (default: 4)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workers)


# -- commands for a live store, ours or torch's -----------------------------------------------------
def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "address",
        type=store_address,
        metavar="HOST:PORT",
        help=f"the store server ([IPV6]:PORT for IPv6; the port defaults to {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds(allow_zero=False),
        default=DEFAULT_CLIENT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up connecting, or waiting for a reply or a key, after this long (default: {DEFAULT_CLIENT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of plain text (default: off)"
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="prove knowledge of the shared secret in this file, for a server started with --secret-file "
        "(default: none)",
    )


class _LegacyProbeAtInfo(logging.Filter):
    """The client finding torch's legacy server is expected here, not a warning: shown at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "legacy server" in record.getMessage():
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True


def _connect(args: argparse.Namespace) -> Any:
    """A client that does not count itself in the store's ``init/`` key (no world_size)."""
    from .tcpstore import TCPStore

    logging.getLogger("rdzv_store.tcpstore").addFilter(_LegacyProbeAtInfo())

    host, port = args.address
    secret = _read_secret(args.secret_file) if args.secret_file else None
    return TCPStore(host, port, timeout=args.timeout, secret=secret)


def _key(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a key must not be empty")
    return text


def _print_json(document: object) -> None:
    print(json.dumps(document, ensure_ascii=False))


def _value_json(value: bytes) -> dict[str, object]:
    try:
        text: str | None = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"value": text, "base64": base64.b64encode(value).decode("ascii")}


def _write_raw(data: bytes) -> None:
    """The bytes exactly; a newline after them only when a person is reading a terminal."""
    out = sys.stdout.buffer
    out.write(data)
    if sys.stdout.isatty() and not data.endswith(b"\n"):
        out.write(b"\n")
    out.flush()


def _configure_ping(parser: argparse.ArgumentParser) -> None:
    _client_options(parser)


def _run_ping(args: argparse.Namespace) -> int:
    from . import commands as cmd
    from .protocol import encode_ping

    started = time.perf_counter()
    with _connect(args) as store:
        connected = time.perf_counter()
        nonce = int(connected * 1e6) & 0x7FFFFFFF
        reply = store._conn.call(cmd.ping(nonce))  # one PING round trip on the open connection
        answered = time.perf_counter()
        if reply != encode_ping(nonce)[1:]:  # the server echoes the nonce
            raise CommandError(f"{store._conn.address} answered PING with {reply!r}: not a TCPStore server?")
        address = store._conn.address
    connect_ms, rtt_ms = (connected - started) * 1e3, (answered - connected) * 1e3
    if args.json:
        _print_json({"address": address, "connect_ms": round(connect_ms, 3), "round_trip_ms": round(rtt_ms, 3)})
    else:
        print(f"{address} answered: connected in {connect_ms:.2f} ms, round trip {rtt_ms:.2f} ms")
    return 0


def _configure_keys(parser: argparse.ArgumentParser) -> None:
    _client_options(parser)


def _run_keys(args: argparse.Namespace) -> int:
    with _connect(args) as store:
        keys = sorted(store._list_keys())  # raw bytes: a key need not be UTF-8
    if args.json:
        _print_json([k.decode("utf-8", "backslashreplace") for k in keys])
    else:
        for key in keys:
            sys.stdout.buffer.write(key + b"\n")
        sys.stdout.buffer.flush()
    return 0


def _configure_get(parser: argparse.ArgumentParser) -> None:
    _client_options(parser)
    parser.add_argument("key", type=_key, help="the key; a missing key fails at once (use wait to block)")


def _run_get(args: argparse.Namespace) -> int:
    with _connect(args) as store:
        if not store.check([args.key]):
            raise CommandError(f"no key {args.key!r} in the store at {store._conn.address}")
        value = store.get(args.key)
    if args.json:
        _print_json({"key": args.key, **_value_json(value)})
    else:
        _write_raw(value)
    return 0


def _configure_set(parser: argparse.ArgumentParser) -> None:
    _client_options(parser)
    parser.add_argument("key", type=_key, help="the key")
    parser.add_argument(
        "value", nargs="?", help="the value (default: standard input, read to its end, bytes as they are)"
    )


def _run_set(args: argparse.Namespace) -> int:
    value = sys.stdin.buffer.read() if args.value is None else args.value.encode("utf-8", "surrogateescape")
    with _connect(args) as store:
        store.set(args.key, value)
        # SET has no reply: a replying request on the same connection proves the server applied it.
        if not store.check([args.key]):
            raise CommandError(f"the store at {store._conn.address} did not keep {args.key!r}")
    if args.json:
        _print_json({"key": args.key, "set": True, "bytes": len(value)})
    return 0


def _configure_add(parser: argparse.ArgumentParser) -> None:
    _client_options(parser)
    parser.add_argument("key", type=_key, help="the counter key (a missing key counts from 0)")
    parser.add_argument(
        "amount", type=_int_in(-(2**63), 2**63 - 1), help="the integer to add (negative subtracts, 0 reads)"
    )


def _run_add(args: argparse.Namespace) -> int:
    with _connect(args) as store:
        total = store.add(args.key, args.amount)
    if args.json:
        _print_json({"key": args.key, "value": total})
    else:
        print(total)
    return 0


def _configure_delete(parser: argparse.ArgumentParser) -> None:
    _client_options(parser)
    parser.add_argument("key", type=_key, help="the key")


def _run_delete(args: argparse.Namespace) -> int:
    with _connect(args) as store:
        existed = store.delete_key(args.key)
    if args.json:
        _print_json({"key": args.key, "deleted": existed})
    else:
        print("deleted" if existed else "not found (nothing to delete)")
    return 0


def _configure_wait(parser: argparse.ArgumentParser) -> None:
    _client_options(parser)
    parser.add_argument("keys", type=_key, nargs="+", metavar="KEY", help="the keys to wait for")


def _run_wait(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _connect(args) as store:
        store.wait(args.keys, timeout=args.timeout)
    if args.json:
        _print_json({"keys": args.keys, "ready": True, "waited_s": round(time.perf_counter() - started, 3)})
    return 0


# -- main -------------------------------------------------------------------------------------------
class _UsageError(Exception):
    """A usage error found after parsing (a combination of options): exit 2."""


def _setup_logging(args: argparse.Namespace) -> None:
    level = args.log_level or ("DEBUG" if args.debug else "INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        code: int = args.run(args)
        return code
    except _UsageError as exc:
        print(f"{PROG}: error: {args.command}: {exc} (see '{PROG} {args.command} --help')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        return 130
    except BrokenPipeError:  # stdout closed early (rdzv-store keys ... | head): not worth a message
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
        return 1
    except Exception as exc:  # a runtime failure: one line, the traceback only with --debug
        if args.debug:
            raise
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, (CommandError, OSError, RuntimeError, ValueError)):
            message = f"{type(exc).__name__}: {message}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
