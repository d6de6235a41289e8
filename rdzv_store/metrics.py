"""Prometheus metrics for ``StoreServer``: plain integers on the hot path, text at scrape time.

Why not ``prometheus_client``: measured per request (``benchmarks/bench_metrics.py``,
``benchmarks/results/metrics.md``), its labelled ``Counter.inc`` and ``Histogram.observe``
(each takes a lock, the histogram walks its buckets) cost about ten times what these
integers do: 2.5 us against 0.25 us per request. So the hot path here is list indexing;
the histogram's buckets are powers of two nanoseconds, so that a bucket is one
``int.bit_length`` and a table look-up (``bisect`` on decimal bounds measured 0.1 us slower
per request); and everything the server already knows (open connections, keys, waiters, the
incomplete-request budget) is read only when Prometheus scrapes.

The server touches, and only these (see ``server.py``):

* ``counts``, once per handled request, inline (a method call would cost a tenth of the
  whole budget): one flat list, ``SLOTS`` integers per request type ``op`` from
  ``op * SLOTS``: the latency buckets (non-cumulative; the bucket is
  ``BUCKET_OF_BITS[(ns - 1).bit_length()]``), then at ``+ SUM`` the nanoseconds, ``+ RX`` the
  request bytes and ``+ TX`` the reply bytes. A type's request count is the sum of its
  buckets, so it costs nothing to keep;
* ``accepted`` / ``refused`` / ``closed(reason, received)`` once per connection;
* ``released`` += 1 per waiter released (a STOP_WAITING sent).

``render(sample)`` formats Prometheus's text exposition format 0.0.4 from those counters
and a ``Sample`` of the server's state taken at scrape time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .protocol import QueryType

__all__ = ["ServerMetrics", "Sample", "LATENCY_BUCKETS", "BUCKET_OF_BITS", "SLOTS", "SUM", "RX", "TX", "CLOSE_REASONS",
           "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds in seconds: 2**11 ns (2.048 us) to 2**30 ns (1.07 s), doubling (as Prometheus's
# native histograms do). A small request takes 2-10 us to parse and run; a 64 MiB MULTI_SET tens of ms.
_FIRST_BIT, _LAST_BIT = 11, 30
LATENCY_BUCKETS: tuple[float, ...] = tuple(2**k / 1e9 for k in range(_FIRST_BIT, _LAST_BIT + 1))
_NB = len(LATENCY_BUCKETS) + 1  # + the +Inf bucket
# ns <= 2**k exactly when (ns - 1).bit_length() <= k: bit length -> bucket index (last: +Inf).
BUCKET_OF_BITS = tuple(min(max(0, bits - _FIRST_BIT), _NB - 1) for bits in range(65))
SUM, RX, TX = _NB, _NB + 1, _NB + 2  # offsets in one request type's slots, after its buckets
SLOTS = _NB + 3
_NOPS = max(QueryType) + 1
_OPS = [q.name.lower() for q in sorted(QueryType)]  # label value by request type number

# Why a connection ended (the ``reason`` label). Every accepted connection ends with exactly one.
CLOSE_REASONS = {
    "eof": "the client closed it",
    "reset": "the connection failed (reset by the peer, keepalive gave up, write error)",
    "malformed": "it sent a request that does not parse or breaks the protocol (one warning)",
    "invalid": "a well-formed request the server refused (ADD on a non-integer, MULTI_GET reply over max_reply)",
    "auth": "the shared-secret check failed",
    "budget": "the server-wide budget for incomplete requests was exhausted",
    "stalled": "it stopped in the middle of a request for request_timeout",
    "shutdown": "the server was closed",
}


@dataclass
class Sample:
    """The server's state at scrape time (gauges), read from what the server keeps anyway."""

    connections_open: int
    connections_max: int
    received_open: int  # bytes received so far by the connections still open
    waiters: int
    keys: int
    value_bytes: int
    queues: int
    queue_items: int
    queue_bytes: int
    incomplete_bytes: int
    incomplete_limit: int


class ServerMetrics:
    """Counters of one ``StoreServer``. Touched only from the server's event-loop thread."""

    __slots__ = ("counts", "accepted", "refused", "_closed", "_received_closed", "released", "start_time")

    def __init__(self) -> None:
        self.counts = [0] * (_NOPS * SLOTS)  # see the module's docstring
        self.accepted = 0
        self.refused = 0
        self._closed = dict.fromkeys(CLOSE_REASONS, 0)
        self._received_closed = 0
        self.released = 0
        self.start_time = time.time()

    # -- hot path (the server inlines this; here for tests and benchmarks) ------------------
    def record(self, op: int, request_bytes: int, reply_bytes: int, ns: int) -> None:
        """One handled request of type ``op``: its size, its reply's size, the time it took."""
        base = op * SLOTS
        c = self.counts
        c[base + BUCKET_OF_BITS[(ns - 1).bit_length()]] += 1
        c[base + SUM] += ns
        c[base + RX] += request_bytes
        c[base + TX] += reply_bytes

    def requests(self, op: int) -> int:
        """Requests of type ``op`` handled so far."""
        base = op * SLOTS
        return sum(self.counts[base : base + _NB])

    # -- per connection ----------------------------------------------------------------------
    def closed(self, reason: str, received: int) -> None:
        """An accepted connection ended (``reason`` in ``CLOSE_REASONS``) after receiving ``received`` bytes."""
        self._closed[reason] += 1
        self._received_closed += received

    # -- scrape ------------------------------------------------------------------------------
    def render(self, sample: Sample) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        s = sample

        def family(name: str, kind: str, help_: str, samples: Iterable[str]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        def one(name: str, kind: str, help_: str, value: float) -> None:
            family(name, kind, help_, [f"{name} {_num(value)}"])

        p = "rdzv_store_"
        one(p + "connections_open", "gauge", "Store connections open now.", s.connections_open)
        one(p + "connections_max", "gauge", "Cap on open store connections (max_connections).", s.connections_max)
        one(p + "connections_accepted_total", "counter", "Store connections accepted (and admitted).", self.accepted)
        one(p + "connections_refused_total", "counter",
            "Store connections closed at once because max_connections were open.", self.refused)
        family(p + "connections_closed_total", "counter",
               "Accepted store connections that ended, by reason.",
               (f'{p}connections_closed_total{{reason="{r}"}} {n}' for r, n in self._closed.items()))
        one(p + "received_bytes_total", "counter",
            "Bytes received on store connections, incomplete and malformed requests included.",
            self._received_closed + s.received_open)
        c = self.counts
        family(p + "requests_total", "counter", "Requests handled, by request type.",
               (f'{p}requests_total{{type="{_OPS[op]}"}} {self.requests(op)}' for op in range(_NOPS)))
        family(p + "request_bytes_total", "counter", "Bytes of handled requests, by request type.",
               (f'{p}request_bytes_total{{type="{_OPS[op]}"}} {c[op * SLOTS + RX]}' for op in range(_NOPS)))
        family(p + "reply_bytes_total", "counter",
               "Bytes of replies to handled requests, by request type (STOP_WAITING notifications not included).",
               (f'{p}reply_bytes_total{{type="{_OPS[op]}"}} {c[op * SLOTS + TX]}' for op in range(_NOPS)))
        family(p + "request_duration_seconds", "histogram",
               "Time to parse and run one request and queue its reply (not the time a wait blocks), "
               "by request type; types never seen are left out.",
               self._histogram(p + "request_duration_seconds"))
        one(p + "waiters", "gauge", "Blocked waits and barriers registered now.", s.waiters)
        one(p + "waiters_released_total", "counter", "Waits and barriers released (STOP_WAITING sent).", self.released)
        one(p + "keys", "gauge", "Keys stored (num_keys).", s.keys)
        one(p + "value_bytes", "gauge", "Bytes of the values stored under those keys.", s.value_bytes)
        one(p + "queues", "gauge", "Non-empty queues.", s.queues)
        one(p + "queue_items", "gauge", "Items in all queues.", s.queue_items)
        one(p + "queue_bytes", "gauge", "Bytes of the items in all queues.", s.queue_bytes)
        one(p + "incomplete_request_bytes", "gauge",
            "Bytes held by incomplete requests, all connections (the max_buffered budget in use).",
            s.incomplete_bytes)
        one(p + "incomplete_request_bytes_limit", "gauge",
            "The budget for incomplete requests (max_buffered).", s.incomplete_limit)
        one(p + "start_time_seconds", "gauge", "When the server's metrics started, Unix time.", self.start_time)
        out.extend(_process_metrics())
        out.append("")
        return "\n".join(out)

    def _histogram(self, name: str) -> Iterable[str]:
        les = [_num(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        c = self.counts
        for op in range(_NOPS):
            if not self.requests(op):
                continue
            label = _OPS[op]
            base = op * SLOTS
            cumulative = 0
            for i, le in enumerate(les):
                cumulative += c[base + i]
                yield f'{name}_bucket{{type="{label}",le="{le}"}} {cumulative}'
            yield f'{name}_sum{{type="{label}"}} {_num(c[base + SUM] / 1e9)}'
            yield f'{name}_count{{type="{label}"}} {cumulative}'


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _process_metrics() -> list[str]:
    """The standard process_* metrics, on Linux (from /proc/self); nothing elsewhere."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError, IndexError, StopIteration):
        return []
    # Fields after "(comm)": state is [0], utime [11], stime [12], starttime [19], rss [21] (pages).
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    start = btime + int(fields[19]) / ticks
    rss = int(fields[21]) * page
    rows = [
        ("process_cpu_seconds_total", "counter", "User and system CPU time of the server process.", cpu),
        ("process_resident_memory_bytes", "gauge", "Resident memory of the server process.", rss),
        ("process_open_fds", "gauge", "Open file descriptors of the server process.", fds),
        ("process_start_time_seconds", "gauge", "When the server process started, Unix time.", start),
    ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_num(value)}"]
    return out
