"""``rdzv-store inspect``: what is in a store, and the state of every elastic rendezvous in it.

For someone whose torchrun job hangs at rendezvous: the keys with their value sizes and, for each
``torch.rendezvous.<run_id>`` key, its round, complete/closed, last-call deadline, participants
with rank and heartbeat age, wait list, redundancy list, the nodes whose heartbeat is overdue and
the current round's MASTER_ADDR/MASTER_PORT. Works against our server and torch's (it uses only
``list_keys``, ``check`` and ``get``, which both serve) and against a FileStore file, which it
reads without opening a FileStore (so it never changes torch's ``refcount/``/``cleanup/`` counts).

It never executes stored bytes: state values are base64-decoded by the c10d backend's rules and
then decoded by :mod:`rdzv_backend.state_codec`. A corrupt value is reported for its key and the
other keys are still shown.
"""

from __future__ import annotations

import argparse
import binascii
import fcntl
import json
import os
from base64 import b64decode
from datetime import datetime, timedelta, timezone
from typing import Any

from .api import RendezvousStateError
from .c10d import C10dRendezvousBackend
from .state import NodeDesc, RendezvousState
from .state_codec import decode_state, state_to_json

__all__ = [
    "DEFAULT_KEEP_ALIVE_INTERVAL",
    "DEFAULT_KEEP_ALIVE_MAX_ATTEMPT",
    "STATE_KEY_PREFIX",
    "FileSnapshot",
    "configure_parser",
    "inspect_store",
    "render_text",
    "run",
]

#: torch's keep-alive defaults (``keep_alive_interval`` 5 s, ``keep_alive_max_attempt`` 3): a
#: node whose last heartbeat is older than their product is removed as dead by torch agents.
DEFAULT_KEEP_ALIVE_INTERVAL = 5.0
DEFAULT_KEEP_ALIVE_MAX_ATTEMPT = 3

#: The c10d backend keeps run ``R``'s state under ``torch.rendezvous.R`` (no ``/``); the keys of
#: round ``N`` live under ``torch.rendezvous.R.N/``.
STATE_KEY_PREFIX = "torch.rendezvous."

_SENTINEL = C10dRendezvousBackend._NULL_SENTINEL_BYTES


class FileSnapshot:
    """A read-only view of a FileStore file: replays its records under a shared ``flock``.

    Unlike opening a :class:`~rdzv_store.FileStore`, this writes nothing (no ``refcount/`` or
    ``cleanup/`` records), so inspecting cannot make torch delete the file early.

    Raises:
        OSError: the file cannot be opened or read (``FileNotFoundError`` if it does not exist).
    """

    def __init__(self, path: str) -> None:
        from rdzv_store import filelog

        self.path = path
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # torch's readers take the same shared lock
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)  # closing releases the lock
        records, _end = filelog.decode(b"".join(chunks))  # a torn tail is ignored, as by readers
        cache: dict[bytes, bytes] = {}
        filelog.apply(cache, records)
        self._values = {k[1:]: v for k, v in cache.items() if filelog.is_user_key(k)}

    def _list_keys(self) -> list[bytes]:
        return list(self._values)

    def check(self, keys: list[str | bytes]) -> bool:
        return all(_raw(k) in self._values for k in keys)

    def get(self, key: str | bytes) -> bytes:
        return self._values[_raw(key)]

    def close(self) -> None:
        pass


def _raw(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _list_raw_keys(store: Any) -> list[bytes]:
    if hasattr(store, "_list_keys"):
        return list(store._list_keys())  # raw bytes: a key need not be UTF-8
    return [_raw(k) for k in store.list_keys()]


def _seconds(delta: timedelta) -> float:
    return round(delta.total_seconds(), 3)


def _as_utc(value: datetime) -> datetime:
    """Naive datetimes (older torch: ``utcnow()``) are UTC by convention."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _node_entry(node: NodeDesc, state: RendezvousState, now: datetime, limit: timedelta) -> dict[str, Any]:
    beat = state.last_heartbeats.get(node)
    age = None if beat is None else now - _as_utc(beat)
    return {
        "node": str(node),
        "addr": node.addr,
        "pid": node.pid,
        "local_id": node.local_id,
        "heartbeat": None if beat is None else beat.isoformat(),
        "heartbeat_age_s": None if age is None else _seconds(age),
        "overdue": age is not None and age > limit,
    }


def _state_report(
    state: RendezvousState, raw: bytes, now: datetime, limit: timedelta, values: dict[bytes, bytes], run_id: str
) -> dict[str, Any]:
    participants = []
    for node in sorted(state.participants, key=lambda n: (state.participants[n], n)):
        entry = _node_entry(node, state, now, limit)
        entry["rank"] = state.participants[node]
        participants.append(entry)
    overdue = sorted(n for n, beat in state.last_heartbeats.items() if now - _as_utc(beat) > limit)
    warnings = []
    datetimes = [state.deadline, *state.last_heartbeats.values()]
    if any(t is not None and t.tzinfo is None for t in datetimes):
        warnings.append("naive datetimes (written by older torch): torch 2.13 agents fail on this state with TypeError")
    if state.redundancy_list is None:
        warnings.append("no redundancy_list (older torch): torch 2.13 agents fail to join with AttributeError")
    members = set(state.participants) | state.wait_list | (state.redundancy_list or set())
    silent = sorted(n for n in members if n not in state.last_heartbeats)
    if silent:
        warnings.append(f"{len(silent)} node(s) without any heartbeat: {', '.join(map(str, silent[:10]))}")
    prefix = f"{STATE_KEY_PREFIX}{run_id}.{state.round}/".encode()
    bootstrap = {
        name: _text(values[prefix + name.encode()]) if prefix + name.encode() in values else None
        for name in ("MASTER_ADDR", "MASTER_PORT")
    }
    return {
        "status": "ok",
        "pickle_protocol": raw[1],
        "state_bytes": len(raw),
        "round": state.round,
        "complete": state.complete,
        "closed": state.closed,
        "deadline": None if state.deadline is None else state.deadline.isoformat(),
        "deadline_in_s": None if state.deadline is None else _seconds(_as_utc(state.deadline) - now),
        "participants": participants,
        "wait_list": [_node_entry(n, state, now, limit) for n in sorted(state.wait_list)],
        "redundancy_list": None
        if state.redundancy_list is None
        else [_node_entry(n, state, now, limit) for n in sorted(state.redundancy_list)],
        "overdue": [str(n) for n in overdue],
        "round_keys": sum(1 for k in values if k.startswith(prefix)),
        "bootstrap": bootstrap,
        "warnings": warnings,
        "state": state_to_json(state),
    }


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


def inspect_store(
    store: Any,
    run_id: str | None = None,
    now: datetime | None = None,
    *,
    keep_alive_interval: float = DEFAULT_KEEP_ALIVE_INTERVAL,
    keep_alive_max_attempt: int = DEFAULT_KEEP_ALIVE_MAX_ATTEMPT,
) -> dict[str, Any]:
    """A JSON-ready report of ``store`` and the rendezvous states in it.

    Args:
        store: Any of our stores (or a :class:`FileSnapshot`, or anything with ``list_keys``,
            ``check`` and ``get``). Only those three operations are used, so torch's TCPStore
            server is served too. Nothing is written.
        run_id: Report only this rendezvous (``status: "missing"`` if its key is absent);
            default: every ``torch.rendezvous.<run_id>`` key found.
        now: The time heartbeat ages and the deadline are measured from (aware; default: the
            current UTC time).
        keep_alive_interval, keep_alive_max_attempt: A heartbeat older than their product
            (torch's defaults: 5 s x 3) is reported as overdue.

    Returns:
        ``{"now", "heartbeat_timeout_s", "keys": [{"key", "size"} | {"key", "error"}],
        "rendezvous": [{"run_id", "key", "size", "status", ...}]}``; ``status`` is ``"ok"``
        (with the decoded fields), ``"no_state"`` (the backend's sentinel: the rendezvous was
        created but no node has written a state), ``"missing"`` or ``"corrupt"`` (with
        ``error``, the RendezvousStateError message naming the key and the reason).

    Raises:
        Whatever the store raises for ``list_keys`` (e.g. StoreConnectionError, or
        NotImplementedError for a store without it). Failures reading one value are reported
        for that key instead.
    """
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    limit = timedelta(seconds=keep_alive_interval * keep_alive_max_attempt)
    keys = sorted(_list_raw_keys(store))
    values: dict[bytes, bytes] = {}
    key_rows: list[dict[str, Any]] = []
    for key in keys:
        try:
            # A key deleted since the listing must not make get() wait for it.
            if not store.check([key]):
                key_rows.append({"key": _text(key), "error": "deleted while inspecting"})
                continue
            value = bytes(store.get(key))
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            key_rows.append({"key": _text(key), "error": f"{type(exc).__name__}: {exc}"})
            continue
        values[key] = value
        key_rows.append({"key": _text(key), "size": len(value)})

    if run_id is not None:
        state_keys = [(STATE_KEY_PREFIX + run_id).encode()]
    else:
        state_keys = [
            k for k in keys if k.startswith(STATE_KEY_PREFIX.encode()) and b"/" not in k[len(STATE_KEY_PREFIX) :]
        ]
    reports = []
    for key in state_keys:
        rid = _text(key[len(STATE_KEY_PREFIX) :])
        entry: dict[str, Any] = {"run_id": rid, "key": _text(key)}
        reports.append(entry)
        if key not in values:
            entry["status"] = "missing"
            continue
        value = values[key]
        entry["size"] = len(value)
        if value == _SENTINEL:
            entry["status"] = "no_state"
            continue
        try:
            try:
                raw = b64decode(value)  # lenient, exactly as the c10d backend (and torch) decode
            except binascii.Error as exc:
                raise RendezvousStateError(
                    f"The state object is corrupt. See inner exception for details. Key {_text(key)!r}: not base64 ({exc})"
                ) from exc
            state = decode_state(raw, key=_text(key))
        except RendezvousStateError as exc:
            entry["status"] = "corrupt"
            entry["error"] = str(exc)
            continue
        entry.update(_state_report(state, raw, now, limit, values, rid))
    return {
        "now": now.isoformat(),
        "heartbeat_timeout_s": limit.total_seconds(),
        "keys": key_rows,
        "rendezvous": reports,
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "no heartbeat"
    return f"heartbeat {seconds:.1f} s ago" if seconds >= 0 else f"heartbeat {-seconds:.1f} s in the future (clock skew?)"


def render_text(report: dict[str, Any]) -> str:
    """The report as text for a person (one line per key, then each rendezvous). Raises nothing
    for a report made by :func:`inspect_store`."""
    lines = []
    keys = report["keys"]
    total = sum(row.get("size", 0) for row in keys)
    lines.append(f"{len(keys)} key(s), {total} bytes of values (at {report['now']})")
    width = min(max([len(row["key"]) for row in keys] + [3]), 72)
    for row in keys:
        shown = row["key"] if len(row["key"]) <= width else row["key"][: width - 3] + "..."
        lines.append(f"  {shown:<{width}}  {row['size'] if 'size' in row else 'error: ' + row['error']:>8}")
    if not report["rendezvous"]:
        lines.append("no rendezvous state (no torch.rendezvous.<run_id> key)")
    limit = report["heartbeat_timeout_s"]
    for rdzv in report["rendezvous"]:
        lines.append("")
        head = f"rendezvous {rdzv['run_id']!r} (key {rdzv['key']}"
        status = rdzv["status"]
        if status == "missing":
            lines.append(head + "): no such key")
            continue
        if status == "no_state":
            lines.append(head + "): created, no state written yet (the backend's sentinel)")
            continue
        if status == "corrupt":
            lines.append(head + f", {rdzv['size']} bytes): CORRUPT")
            lines.append(f"  {rdzv['error']}")
            continue
        lines.append(head + f", {rdzv['size']} bytes base64, {rdzv['state_bytes']} bytes pickle protocol {rdzv['pickle_protocol']})")
        flags = ["complete" if rdzv["complete"] else "forming", "CLOSED" if rdzv["closed"] else "open"]
        if rdzv["deadline"] is None:
            deadline = "no last-call deadline"
        else:
            left = rdzv["deadline_in_s"]
            when = f"in {left:.1f} s" if left >= 0 else f"passed {-left:.1f} s ago"
            deadline = f"last-call deadline {rdzv['deadline']} ({when})"
        lines.append(f"  round {rdzv['round']}, {', '.join(flags)}; {deadline}")
        boot = rdzv["bootstrap"]
        if rdzv["complete"]:
            lines.append(f"  round {rdzv['round']} MASTER_ADDR={boot['MASTER_ADDR']} MASTER_PORT={boot['MASTER_PORT']}, {rdzv['round_keys']} key(s) under the round's prefix")
        lines.append(f"  participants ({len(rdzv['participants'])})" + (":" if rdzv["participants"] else ""))
        for p in rdzv["participants"]:
            mark = "  OVERDUE" if p["overdue"] else ""
            lines.append(f"    rank {p['rank']:<5} {p['node']:<40} {_age(p['heartbeat_age_s'])}{mark}")
        for title, name in (("wait list", "wait_list"), ("redundancy list", "redundancy_list")):
            nodes = rdzv[name]
            if nodes is None:
                lines.append(f"  {title}: absent (older torch)")
                continue
            lines.append(f"  {title} ({len(nodes)})" + (":" if nodes else ""))
            for n in nodes:
                mark = "  OVERDUE" if n["overdue"] else ""
                lines.append(f"    {n['node']:<46} {_age(n['heartbeat_age_s'])}{mark}")
        if rdzv["overdue"]:
            lines.append(f"  overdue heartbeats (older than {limit:g} s): {', '.join(rdzv['overdue'])}")
        else:
            lines.append(f"  no overdue heartbeats (limit {limit:g} s)")
        for warning in rdzv["warnings"]:
            lines.append(f"  warning: {warning}")
    return "\n".join(lines) + "\n"


# -- the CLI subcommand --------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add ``inspect``'s arguments to ``parser`` (``rdzv-store inspect --help`` lists them)."""
    parser.add_argument(
        "target",
        metavar="HOST:PORT|PATH",
        help="a TCPStore server (ours or torch's; [IPV6]:PORT for IPv6) or a FileStore file "
        "(an existing path, or file://PATH)",
    )
    parser.add_argument("--run-id", metavar="ID", help="only this rendezvous (default: every one found)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text (default: off)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="give up connecting or waiting for a reply (default: 10)"
    )
    parser.add_argument(
        "--keep-alive-interval",
        type=float,
        default=DEFAULT_KEEP_ALIVE_INTERVAL,
        metavar="SECONDS",
        help=f"the agents' keep-alive interval (default: torch's {DEFAULT_KEEP_ALIVE_INTERVAL:g})",
    )
    parser.add_argument(
        "--keep-alive-max-attempt",
        type=int,
        default=DEFAULT_KEEP_ALIVE_MAX_ATTEMPT,
        metavar="N",
        help="heartbeats older than interval x N are overdue "
        f"(default: torch's {DEFAULT_KEEP_ALIVE_MAX_ATTEMPT})",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="prove knowledge of the shared secret in this file, for a server started with --secret-file (default: none)",
    )


def _is_file_target(target: str) -> bool:
    return target.startswith("file://") or os.path.exists(target) or os.sep in target


def run(args: argparse.Namespace) -> int:
    """Run ``rdzv-store inspect``; returns the exit code (0; 1 when a rendezvous state is corrupt
    or the requested run id is missing, so scripts can tell).

    Raises:
        rdzv_store.cli.CommandError: the target cannot be reached or read (the CLI prints it, exit 1).
        argparse.ArgumentTypeError: a malformed HOST:PORT.
    """
    from rdzv_store.cli import CommandError

    if args.timeout <= 0 or args.keep_alive_interval <= 0 or args.keep_alive_max_attempt < 1:
        raise CommandError("--timeout and --keep-alive-interval must be > 0, --keep-alive-max-attempt >= 1")
    target: str = args.target
    store: Any
    if _is_file_target(target):
        path = target[len("file://") :] if target.startswith("file://") else target
        try:
            store = FileSnapshot(path)
        except OSError as exc:
            raise CommandError(f"cannot read the FileStore file {path!r}: {exc.strerror or exc}") from exc
        where = f"file {path}"
    else:
        from rdzv_store import TCPStore
        from rdzv_store.cli import _read_secret, store_address

        try:
            host, port = store_address(target)
        except argparse.ArgumentTypeError as exc:
            raise CommandError(f"{exc} (or a FileStore path that exists)") from None
        secret = _read_secret(args.secret_file) if args.secret_file else None
        store = TCPStore(host, port, timeout=args.timeout, secret=secret)
        where = f"TCPStore {host}:{port}"
    try:
        report = inspect_store(
            store,
            args.run_id,
            keep_alive_interval=args.keep_alive_interval,
            keep_alive_max_attempt=args.keep_alive_max_attempt,
        )
    finally:
        store.close()
    report = {"store": where, **report}
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(f"{where}: ", end="")
        print(render_text(report), end="")
    bad = any(r["status"] in ("corrupt", "missing") for r in report["rendezvous"])
    return 1 if bad else 0
