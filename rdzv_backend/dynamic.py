"""torch 2.13's elastic ``DynamicRendezvousHandler``, without torch and without pickle.

A launcher calls :meth:`DynamicRendezvousHandler.next_rendezvous` and gets its rank, the world
size and a store for its workers. The shared state lives in a :class:`~rdzv_backend.c10d.
C10dRendezvousBackend` (one compare-and-set key of a c10d store) in torch's exact bytes, read and
written by :mod:`rdzv_backend.state_codec` (an allowlisted pickle-subset codec that never runs
pickle), so torch 2.13 agents (``torchrun --rdzv-backend=c10d``) and ours are members of one
rendezvous: same rounds, same ranks, same keys.

The state machine is torch's (``../shared/reference/dynamic-rendezvous.md`` §2): a state holder
(1 s read cache, sanitize/dead-node removal after every read), an op executor (sync, decide,
mutate, write on the next iteration; 1 s poll) and four ops (Exit, Join, Close, Keep-alive) with
torch's decision tables, names, defaults and messages. Deliberate differences, all invisible to
torch agents (they read the same bytes):

* rank 0 publishes ``MASTER_ADDR``/``MASTER_PORT`` in *every* round, so a node that first joins
  a later round with a non-zero rank never hangs (torch's rank 0 writes them only once); a
  non-zero rank reads the current round's keys and, if a torch rank 0 did not write them, falls
  back to the newest keys that rank 0's address published;
* every failure to decode the state is a :class:`~rdzv_backend.api.RendezvousStateError` naming
  the key and the reason (torch lets everything but ``PickleError`` escape raw);
* the keep-alive thread survives any exception and logs it (torch's dies silently on a
  non-``RendezvousError``), and it warns when this node finds itself removed from the rendezvous;
* the workers' store hosted by rank 0 (``use_agent_store``) is our
  :class:`~rdzv_store.TCPStore` server, bound to the node's address only (torch: every interface);
* naive datetimes (written by torch <= 2.5) are read as UTC instead of failing comparisons, and a
  state without ``redundancy_list`` is read as having an empty one.

Time is injectable (:class:`_Clock`): tests drive the state machine with a fake clock.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

from rdzv_store import PrefixStore, Store, TCPStore

from .api import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
    _get_free_port,
)
from .c10d import RendezvousBackend, Token
from .state import NodeDesc, RendezvousState

__all__ = [
    "RendezvousBackend",
    "RendezvousTimeout",
    "RendezvousSettings",
    "DynamicRendezvousHandler",
    "create_handler",
]

logger = logging.getLogger(__name__)

# torch's private names, so code (and upstream tests) written against torch's module read the same.
_NodeDesc = NodeDesc
_RendezvousState = RendezvousState


# -- time -------------------------------------------------------------------------------------


class _Clock:
    """Every source of time and randomness the handler uses; tests pass a fake one.

    ``monotonic`` bounds operations (local deadlines), ``now`` is the wall-clock UTC written into
    the shared state (heartbeats, last-call deadline), ``sleep`` is the 1 s poll, ``uniform`` the
    first-join jitter and ``wait`` the keep-alive timer's interruptible pause.
    """

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def uniform(self, low: float, high: float) -> float:
        return random.uniform(low, high)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event`` at most ``timeout`` seconds; True if it was set."""
        return event.wait(timeout)


_SYSTEM_CLOCK = _Clock()


def _delay(seconds: float | tuple[float, float], clock: _Clock | None = None) -> None:
    """Sleep ``seconds`` (or a uniform random time in ``(low, high)``); skip below 10 ms (torch)."""
    clock = clock or _SYSTEM_CLOCK
    if isinstance(seconds, tuple):
        seconds = clock.uniform(*seconds)
    if seconds >= 0.01:
        clock.sleep(seconds)


class _PeriodicTimer:
    """Run ``function(*args, **kwargs)`` on a daemon thread every ``interval`` (torch's timer).

    The first call happens one interval after :meth:`start`. Unlike torch's, an exception raised by
    ``function`` is logged and the timer carries on (torch's thread ends). :meth:`cancel` stops the
    thread and joins it; it is idempotent, and garbage-collecting the timer does the same.

    Raises:
        RuntimeError: ``start()`` twice, or ``set_name()`` after ``start()``
            (``The timer has already started.``).
    """

    class _Context:
        interval: float
        function: Callable[..., None]
        args: tuple[Any, ...]
        kwargs: dict[str, Any]
        stop_event: threading.Event
        clock: _Clock

    def __init__(self, interval: timedelta, function: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        self._name: str | None = None
        self._ctx = self._Context()
        self._ctx.interval = interval.total_seconds()
        self._ctx.function = function
        self._ctx.args = args or ()
        self._ctx.kwargs = kwargs or {}
        self._ctx.stop_event = threading.Event()
        self._ctx.clock = _SYSTEM_CLOCK
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def name(self) -> str | None:
        return self._name

    def set_name(self, name: str) -> None:
        if self._thread:
            raise RuntimeError("The timer has already started.")
        self._name = name

    def start(self) -> None:
        if self._thread:
            raise RuntimeError("The timer has already started.")
        self._thread = threading.Thread(
            target=self._run, name=self._name or "PeriodicTimer", args=(self._ctx,), daemon=True
        )
        self._finalizer = weakref.finalize(self, self._stop_thread, self._thread, self._ctx.stop_event)
        self._finalizer.atexit = False
        self._thread.start()

    def cancel(self) -> None:
        if self._finalizer:
            self._finalizer()

    @staticmethod
    def _run(ctx: _PeriodicTimer._Context) -> None:
        while not ctx.clock.wait(ctx.stop_event, ctx.interval):
            try:
                ctx.function(*ctx.args, **ctx.kwargs)
            except Exception:  # the timer must outlive one bad tick (torch's thread ends here)
                logger.exception("The periodic function %r raised; the timer carries on.", ctx.function)

    @staticmethod
    def _stop_thread(thread: threading.Thread, stop_event: threading.Event) -> None:
        stop_event.set()
        if thread is not threading.current_thread():
            thread.join()


# -- settings ---------------------------------------------------------------------------------


class RendezvousTimeout:
    """The timeouts of a rendezvous: join 600 s, last call 30 s, close 30 s, heartbeat 5 s.

    Args:
        join: Time within which a rendezvous round must complete.
        last_call: Extra wait once ``min_nodes`` have joined, before the round completes.
        close: Time within which closing must succeed.
        heartbeat: Time within which one keep-alive heartbeat must be written.

    Raises:
        ValueError: A given value is not positive: ``The {name} timeout ({timeout}) must be
            positive.``, checked in the order join, last_call, close, heartbeat.
    """

    _ZERO = timedelta(0)

    _DEFAULT_TIMEOUTS = {
        "join": timedelta(seconds=600),
        "last_call": timedelta(seconds=30),
        "close": timedelta(seconds=30),
        "heartbeat": timedelta(seconds=5),
    }

    _join: timedelta
    _last_call: timedelta
    _close: timedelta
    _heartbeat: timedelta

    def __init__(
        self,
        join: timedelta | None = None,
        last_call: timedelta | None = None,
        close: timedelta | None = None,
        heartbeat: timedelta | None = None,
    ) -> None:
        self._set_timeouts(join=join, last_call=last_call, close=close, heartbeat=heartbeat)

    @property
    def join(self) -> timedelta:
        return self._join

    @property
    def last_call(self) -> timedelta:
        return self._last_call

    @property
    def close(self) -> timedelta:
        return self._close

    @property
    def heartbeat(self) -> timedelta:
        return self._heartbeat

    def _set_timeouts(self, **timeouts: timedelta | None) -> None:
        for name, timeout in timeouts.items():
            if timeout is None:
                timeout = self._DEFAULT_TIMEOUTS[name]
            if timeout <= self._ZERO:
                raise ValueError(f"The {name} timeout ({timeout}) must be positive.")
            setattr(self, "_" + name, timeout)


@dataclass(repr=False, eq=False, frozen=True)
class RendezvousSettings:
    """The settings of one rendezvous (torch's frozen dataclass, same fields)."""

    run_id: str
    min_nodes: int
    max_nodes: int
    timeout: RendezvousTimeout
    keep_alive_interval: timedelta
    keep_alive_max_attempt: int


class _NodeDescGenerator:
    """Node descriptors ``(addr or getfqdn(), pid, local_id)``; ``local_id`` counts per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local_id = 0

    def generate(self, local_addr: str | None = None) -> NodeDesc:
        with self._lock:
            local_id = self._local_id
            self._local_id += 1
        return NodeDesc(local_addr or socket.getfqdn(), os.getpid(), local_id)


def _remove_participant_epilogue(state: RendezvousState, settings: RendezvousSettings) -> None:
    if state.complete:
        if not state.participants:
            logger.debug("No participants left in the rendezvous, marking rendezvous as incomplete")
            state.complete = False
            state.round += 1
    else:
        if len(state.participants) < settings.min_nodes:
            logger.debug(
                "Number of participants %d less than min_nodes %d, clearing deadline in state",
                len(state.participants),
                settings.min_nodes,
            )
            state.deadline = None


# -- state holder ---------------------------------------------------------------------------

_CORRUPT = "The rendezvous state is corrupt. See inner exception for details."
_Encoder = Callable[[RendezvousState], bytes]
_Decoder = Callable[..., RendezvousState]


def _default_codec() -> tuple[_Encoder, _Decoder]:
    from . import state_codec  # imported late: the handler module stays importable on its own

    return state_codec.encode_state, state_codec.decode_state


def _as_utc(value: datetime) -> datetime:
    # torch <= 2.5 wrote naive utcnow() values; comparing them with an aware "now" raises
    # TypeError in torch 2.13. They mean UTC, so read them as UTC.
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _normalise(state: RendezvousState) -> RendezvousState:
    if state.redundancy_list is None:
        state.redundancy_list = set()
    if state.deadline is not None:
        state.deadline = _as_utc(state.deadline)
    if any(hb.tzinfo is None for hb in state.last_heartbeats.values()):
        state.last_heartbeats = {node: _as_utc(hb) for node, hb in state.last_heartbeats.items()}
    return state


def _redundancy(state: RendezvousState) -> set[NodeDesc]:
    if state.redundancy_list is None:
        state.redundancy_list = set()
    return state.redundancy_list


def _copy_state(state: RendezvousState) -> RendezvousState:
    # Nodes and datetimes are immutable: copying the containers is a deep copy.
    return RendezvousState(
        state.round,
        state.complete,
        state.deadline,
        state.closed,
        dict(state.participants),
        set(state.wait_list),
        set(_redundancy(state)),
        dict(state.last_heartbeats),
    )


class _DecodedCache:
    """The last few decoded states of this process, by their bytes (copies go in and out).

    Every agent thread of a process polls the same bytes; the pure-Python codec is the expensive
    part of a sync (about 1 ms per 10 nodes), so it decodes each distinct value once per process.
    """

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._items: dict[bytes, RendezvousState] = {}
        self._lock = threading.Lock()

    def get(self, bits: bytes) -> RendezvousState | None:
        with self._lock:
            return self._items.get(bits)

    def put(self, bits: bytes, state: RendezvousState) -> None:
        with self._lock:
            self._items[bits] = state
            while len(self._items) > self._size:
                del self._items[next(iter(self._items))]


_decoded_cache = _DecodedCache()


class _RendezvousStateHolder:
    """Holds the shared state, synced with the other nodes (torch's ABC)."""

    #: Seconds the last write took, encode to decode (the executor's back-off scales with it).
    last_write_seconds = 0.0

    @property
    def state(self) -> RendezvousState:
        raise NotImplementedError

    def sync(self) -> bool | None:
        raise NotImplementedError

    def mark_dirty(self) -> None:
        raise NotImplementedError


class _BackendRendezvousStateHolder(_RendezvousStateHolder):
    """The state, synced through a :class:`RendezvousBackend` (torch's holder, §2.3-§2.4).

    ``sync()`` writes the local state if it is dirty (a conditional write: a stale token writes
    nothing and adopts the current state), otherwise reads it unless the last I/O was less than
    ``cache_duration`` seconds ago; after every I/O it removes nodes whose heartbeat is older
    than ``keep_alive_interval * keep_alive_max_attempt`` (locally; written with the next write).

    Args:
        backend: Where the state lives.
        settings: The rendezvous settings.
        cache_duration: Seconds a read is served from the last sync (torch: 1).
        clock: Time source (tests).
        codec: ``(encode, decode)``; default :mod:`rdzv_backend.state_codec`.
    """

    def __init__(
        self,
        backend: RendezvousBackend,
        settings: RendezvousSettings,
        cache_duration: int = 1,
        *,
        clock: _Clock | None = None,
        codec: tuple[_Encoder, _Decoder] | None = None,
    ) -> None:
        self._backend = backend
        self._state = RendezvousState()
        self._settings = settings
        self._cache_duration = cache_duration
        self._token: Token = None
        self._dirty = False
        self._last_sync_time: float = -1
        self._dead_nodes: list[NodeDesc] = []
        self._clock = clock or _SYSTEM_CLOCK
        self._codec = codec
        self._key: str = getattr(backend, "_key", None) or f"torch.rendezvous.{settings.run_id}"

    @property
    def state(self) -> RendezvousState:
        return self._state

    @property
    def key(self) -> str:
        """The store key the state lives under (for messages)."""
        return self._key

    def _coders(self) -> tuple[_Encoder, _Decoder]:
        if self._codec is None:
            self._codec = _default_codec()
        return self._codec

    def _named(self, exc: RendezvousStateError) -> RendezvousStateError:
        # The backend's base64 error does not say which key; ours must.
        if self._key in str(exc):
            return exc
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        err = RendezvousStateError(f"{_CORRUPT} Key {self._key!r}: {reason}")
        err.__cause__ = cause or exc
        return err

    def _decode(self, bits: bytes) -> RendezvousState:
        cached = _decoded_cache.get(bits)
        if cached is not None:
            return _copy_state(cached)
        state = self._decode_uncached(bits)
        _decoded_cache.put(bits, _copy_state(state))
        return state

    def _decode_uncached(self, bits: bytes) -> RendezvousState:
        _, decode = self._coders()
        try:
            state = decode(bits, key=self._key)
        except RendezvousStateError as exc:
            raise self._named(exc) from exc.__cause__
        except Exception as exc:  # a codec bug must not escape raw (torch's §5.4 failure)
            raise RendezvousStateError(f"{_CORRUPT} Key {self._key!r}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(state, RendezvousState):
            raise RendezvousStateError(f"{_CORRUPT} Key {self._key!r}: decoded a {type(state).__name__}")
        return _normalise(state)

    def sync(self) -> bool | None:
        """Write (dirty) or read the state; return whether the write won (None: no write).

        Raises:
            RendezvousConnectionError: The store failed.
            RendezvousStateError: The stored state cannot be decoded (names the key and reason).
        """
        state_bits: bytes | None = None
        token: Token = None
        has_set: bool | None
        started = 0.0

        try:
            if self._dirty:
                has_set = False
                started = self._clock.monotonic()
                encode, _ = self._coders()
                state_bits = encode(self._state)
                set_response = self._backend.set_state(state_bits, self._token)
                if set_response is not None:
                    state_bits, token, has_set = set_response
            else:
                has_set = None
                if self._cache_duration > 0:
                    if self._last_sync_time >= max(self._clock.monotonic() - self._cache_duration, 0):
                        return None
                get_response = self._backend.get_state()
                if get_response is not None:
                    state_bits, token = get_response
        except RendezvousStateError as exc:
            raise self._named(exc) from exc.__cause__

        if state_bits is not None:
            self._state = self._decode(state_bits)
        else:
            self._state = RendezvousState()
        if has_set is not None:
            self.last_write_seconds = max(0.0, self._clock.monotonic() - started)

        if has_set and self._dead_nodes and logger.isEnabledFor(logging.DEBUG):
            node_list = ", ".join(f"'{dead_node}'" for dead_node in self._dead_nodes)
            logger.debug(
                "As part of the sync operation the node(s) %s have been removed from the rendezvous "
                "'%s' since they had no heartbeat.",
                node_list,
                self._settings.run_id,
            )

        self._token = token
        self._dirty = False
        self._last_sync_time = self._clock.monotonic()
        self._sanitize()
        return has_set

    def _sanitize(self) -> None:
        state = self._state
        expire_time = self._clock.now() - (
            self._settings.keep_alive_interval * self._settings.keep_alive_max_attempt
        )
        self._dead_nodes = [node for node, hb in state.last_heartbeats.items() if hb < expire_time]
        participant_removed = False
        redundancy = _redundancy(state)
        for dead_node in self._dead_nodes:
            logger.debug("Detected dead node '%s', removing it from the rendezvous", dead_node)
            del state.last_heartbeats[dead_node]
            if state.participants.pop(dead_node, None) is not None:
                participant_removed = True
            state.wait_list.discard(dead_node)
            redundancy.discard(dead_node)
        if participant_removed:
            _remove_participant_epilogue(state, self._settings)

    def mark_dirty(self) -> None:
        self._dirty = True


# -- actions, executor and ops ----------------------------------------------------------------


class _Action(Enum):
    KEEP_ALIVE = 1
    ADD_TO_PARTICIPANTS = 2
    ADD_TO_WAIT_LIST = 3
    ADD_TO_REDUNDANCY_LIST = 4
    REMOVE_FROM_PARTICIPANTS = 5
    REMOVE_FROM_WAIT_LIST = 6
    REMOVE_FROM_REDUNDANCY_LIST = 7
    MARK_RENDEZVOUS_COMPLETE = 8
    MARK_RENDEZVOUS_CLOSED = 9
    SYNC = 10
    ERROR_CLOSED = 11
    ERROR_TIMEOUT = 12
    FINISH = 13


class _RendezvousContext:
    """What an op decides on: this node, the current state, the settings (and the clock)."""

    def __init__(
        self, node: NodeDesc, state: RendezvousState, settings: RendezvousSettings, clock: _Clock | None = None
    ) -> None:
        self.node = node
        self.state = state
        self.settings = settings
        self.clock = clock or _SYSTEM_CLOCK


_StateHandler = Callable[[_RendezvousContext, float], _Action]


class _DistributedRendezvousOpExecutor:
    """Runs an op to completion over the shared state (torch's executor, §2.5).

    Each iteration: ``sync()``, ask the op for an action, then FINISH (return), raise
    (ERROR_CLOSED/ERROR_TIMEOUT), sleep 1 s (SYNC), or mutate the local state and mark it dirty so
    the next iteration's sync writes it.
    """

    def __init__(
        self,
        node: NodeDesc,
        state_holder: _RendezvousStateHolder,
        settings: RendezvousSettings,
        clock: _Clock | None = None,
    ) -> None:
        self._node = node
        self._state_holder = state_holder
        self._settings = settings
        self._clock = clock or _SYSTEM_CLOCK
        self._state = state_holder.state
        self._lost = 0  # consecutive lost conditional writes (for the back-off)

    def step(
        self,
        state_handler: _StateHandler,
        deadline: float,
        update_deadline: Callable[[timedelta], float] | None = None,
    ) -> tuple[_Action, float]:
        """One iteration without the SYNC sleep; return the action taken and the (new) deadline.

        Raises:
            RendezvousClosedError: The op said ERROR_CLOSED.
            RendezvousTimeoutError: The op said ERROR_TIMEOUT.
            RendezvousGracefulExitError: Join found the rendezvous closed while this node waits in
                the redundancy list.
            RendezvousConnectionError, RendezvousStateError: From ``sync()``.
        """
        has_set = self._state_holder.sync()
        if has_set is False:
            # Lost a conditional write. torch retries at once; with hundreds of nodes that can
            # livelock (every read-modify-write loses to another). Back off by a random time
            # (timing only; see backoff_cap). After the pause, decide on a fresh read, not on the
            # state the lost write returned.
            self._lost += 1
            pause = self._clock.uniform(0, self.backoff_cap())
            if pause >= 0.01:
                _delay(pause, self._clock)
                if isinstance(self._state_holder, _BackendRendezvousStateHolder):
                    self._state_holder._last_sync_time = -1  # bypass the read cache once
                    self._state_holder.sync()
        elif has_set:
            self._lost = 0
        if has_set is not None and logger.isEnabledFor(logging.DEBUG):
            if has_set:
                logger.debug(
                    "The node '%s' has successfully synced its local changes with other nodes in the "
                    "rendezvous '%s'.",
                    self._node,
                    self._settings.run_id,
                )
            else:
                logger.debug(
                    "The node '%s' has a stale state and failed to sync its local changes with other "
                    "nodes in the rendezvous '%s'.",
                    self._node,
                    self._settings.run_id,
                )

        self._state = self._state_holder.state
        ctx = _RendezvousContext(self._node, self._state, self._settings, self._clock)
        action = state_handler(ctx, deadline)

        if action in (_Action.FINISH, _Action.SYNC):
            return action, deadline
        if action == _Action.ERROR_CLOSED:
            raise RendezvousClosedError
        if action == _Action.ERROR_TIMEOUT:
            raise RendezvousTimeoutError

        if action == _Action.KEEP_ALIVE:
            self._keep_alive()
        elif action == _Action.ADD_TO_PARTICIPANTS:
            self._add_to_participants()
        elif action == _Action.ADD_TO_WAIT_LIST:
            self._add_to_wait_list()
        elif action == _Action.ADD_TO_REDUNDANCY_LIST:
            self._add_to_redundancy_list()
        elif action == _Action.REMOVE_FROM_PARTICIPANTS:
            self._remove_from_participants()
        elif action == _Action.REMOVE_FROM_WAIT_LIST:
            self._remove_from_wait_list()
        elif action == _Action.REMOVE_FROM_REDUNDANCY_LIST:
            self._remove_from_redundancy_list()
            if update_deadline:
                deadline = update_deadline(self._settings.timeout.join)
        elif action == _Action.MARK_RENDEZVOUS_COMPLETE:
            self._mark_rendezvous_complete()
        elif action == _Action.MARK_RENDEZVOUS_CLOSED:
            self._mark_rendezvous_closed()
        self._state_holder.mark_dirty()
        return action, deadline

    def backoff_cap(self) -> float:
        """The upper bound of the random pause after ``self._lost`` consecutive lost writes.

        It doubles per loss from 20 ms, up to the larger of the 1 s poll period and
        ``2 x contenders x last write time``: every node in the state writes it whole (joins,
        heartbeats), so with N contenders retrying uniformly within the cap, a write meets
        another about ``2 N w / cap`` times per write time ``w``. Slotted ALOHA's best is one,
        hence the cap; below it, lost attempts outnumber won ones and each costs the store as
        much as a win (with a 1 s cap, 128 nodes whose writes take 50 ms meet ~13 times per
        write). Never longer than the keep-alive interval, so a node still tries to write at
        least once per heartbeat period; when N writes take longer than that period (a starved
        host), no back-off helps: heartbeats expire whatever the pauses.
        """
        holder = self._state_holder
        contenders = max(1, len(holder.state.last_heartbeats))  # as the lost write returned it
        ceiling = max(1.0, 2 * contenders * holder.last_write_seconds)
        ceiling = min(ceiling, max(1.0, self._settings.keep_alive_interval.total_seconds()))
        return min(ceiling, 0.01 * 2 ** min(self._lost, 12))

    def run(
        self,
        state_handler: _StateHandler,
        deadline: float,
        update_deadline: Callable[[timedelta], float] | None = None,
    ) -> None:
        """Iterate :meth:`step` until the op says FINISH (raises as :meth:`step` does)."""
        while True:
            action, deadline = self.step(state_handler, deadline, update_deadline)
            if action == _Action.FINISH:
                return
            if action == _Action.SYNC:
                # Do not hammer the backend while polling for changes.
                _delay(1, self._clock)

    def _keep_alive(self) -> None:
        logger.debug(
            "The node '%s' updated its keep-alive heartbeat time for the rendezvous '%s'. Pending sync.",
            self._node,
            self._settings.run_id,
        )
        self._state.last_heartbeats[self._node] = self._clock.now()

    def _add_to_participants(self) -> None:
        logger.debug(
            "The node '%s' added itself to the participants of round %d of the rendezvous '%s'. "
            "Pending sync.",
            self._node,
            self._state.round,
            self._settings.run_id,
        )
        state = self._state
        state.wait_list.discard(self._node)
        state.participants[self._node] = 0
        self._keep_alive()
        if len(state.participants) == self._settings.min_nodes:
            state.deadline = self._clock.now() + self._settings.timeout.last_call
        if len(state.participants) == self._settings.max_nodes:
            self._mark_rendezvous_complete()

    def _add_to_wait_list(self) -> None:
        logger.debug(
            "The node '%s' added itself to the wait list of round %d of the rendezvous '%s'. Pending sync.",
            self._node,
            self._state.round + 1,
            self._settings.run_id,
        )
        _redundancy(self._state).discard(self._node)
        self._state.wait_list.add(self._node)
        self._keep_alive()

    def _add_to_redundancy_list(self) -> None:
        logger.debug(
            "The node '%s' added itself to the redundancy list of round %d of the rendezvous '%s'. "
            "Pending sync.",
            self._node,
            self._state.round + 1,
            self._settings.run_id,
        )
        _redundancy(self._state).add(self._node)
        self._keep_alive()

    def _remove_from_participants(self) -> None:
        logger.debug(
            "The node '%s' removed itself from the participants of round %d of the rendezvous '%s'. "
            "Pending sync.",
            self._node,
            self._state.round,
            self._settings.run_id,
        )
        state = self._state
        del state.participants[self._node]
        state.last_heartbeats.pop(self._node, None)
        _remove_participant_epilogue(state, self._settings)

    def _remove_from_wait_list(self) -> None:
        logger.debug(
            "The node '%s' removed itself from the wait list of round %d of the rendezvous '%s'. "
            "Pending sync.",
            self._node,
            self._state.round + 1,
            self._settings.run_id,
        )
        self._state.wait_list.remove(self._node)
        self._state.last_heartbeats.pop(self._node, None)

    def _remove_from_redundancy_list(self) -> None:
        logger.debug(
            "The node '%s' removed itself from the redundant list of round %d of the rendezvous '%s'. "
            "Pending sync.",
            self._node,
            self._state.round + 1,
            self._settings.run_id,
        )
        _redundancy(self._state).remove(self._node)
        self._state.last_heartbeats.pop(self._node, None)

    def _mark_rendezvous_complete(self) -> None:
        logger.debug(
            "The node '%s' marked round %d of the rendezvous '%s' as complete. Pending sync.",
            self._node,
            self._state.round,
            self._settings.run_id,
        )
        state = self._state
        state.complete = True
        state.deadline = None
        for rank, node in enumerate(sorted(state.participants)):
            state.participants[node] = rank

    def _mark_rendezvous_closed(self) -> None:
        logger.debug(
            "The node '%s' marked the rendezvous '%s' as closed. Pending sync.", self._node, self._settings.run_id
        )
        self._state.closed = True


def _should_keep_alive(ctx: _RendezvousContext) -> bool:
    """A heartbeat is due: this node has an entry at least ``keep_alive_interval`` old."""
    last_heartbeat = ctx.state.last_heartbeats.get(ctx.node)
    if last_heartbeat is None:
        return False
    return last_heartbeat <= ctx.clock.now() - ctx.settings.keep_alive_interval


class _RendezvousExitOp:
    """Leave the participants (start of every ``next_rendezvous``)."""

    def __call__(self, ctx: _RendezvousContext, deadline: float) -> _Action:
        if ctx.node in ctx.state.participants:
            if ctx.clock.monotonic() > deadline:
                return _Action.ERROR_TIMEOUT
            return _Action.REMOVE_FROM_PARTICIPANTS
        return _Action.FINISH


class _RendezvousJoinOp:
    """Join the next round (torch's decision table, §2.6; the first matching row wins)."""

    def __call__(self, ctx: _RendezvousContext, deadline: float) -> _Action:
        state = ctx.state
        redundancy = _redundancy(state)

        if state.closed:
            if ctx.node in redundancy:
                raise RendezvousGracefulExitError(
                    f"The rendezvous '{ctx.settings.run_id}' is closed, terminating pending rendezvous."
                )
            return _Action.ERROR_CLOSED

        if ctx.node in redundancy:
            logger.debug("The node %s is in redundancy list", ctx.node)
            if len(state.participants) == ctx.settings.max_nodes:
                return _Action.KEEP_ALIVE if _should_keep_alive(ctx) else _Action.SYNC
            logger.debug("The node %s is removed from redundancy list", ctx.node)
            return _Action.REMOVE_FROM_REDUNDANCY_LIST

        is_participant = ctx.node in state.participants

        if state.complete and is_participant:
            return _Action.FINISH

        now = ctx.clock.monotonic()
        if now > deadline:
            rollback_period = 5  # seconds
            if now <= deadline + rollback_period:
                if is_participant:
                    return _Action.REMOVE_FROM_PARTICIPANTS
                if ctx.node in state.wait_list:
                    return _Action.REMOVE_FROM_WAIT_LIST
            return _Action.ERROR_TIMEOUT

        if state.complete:
            if len(state.participants) < ctx.settings.max_nodes:
                if ctx.node not in state.wait_list:
                    return _Action.ADD_TO_WAIT_LIST
            elif ctx.node not in redundancy and ctx.node not in state.wait_list:
                return _Action.ADD_TO_REDUNDANCY_LIST
        elif is_participant:
            if (
                ctx.settings.min_nodes <= len(state.participants) <= ctx.settings.max_nodes
                and state.deadline is not None
            ):
                if state.deadline < ctx.clock.now():
                    logger.debug(
                        "The node '%s' marking the rendezvous complete, quorum established within deadline",
                        ctx.node,
                    )
                    return _Action.MARK_RENDEZVOUS_COMPLETE
                logger.debug("The node '%s' can't complete rendezvous: deadline reached", ctx.node)
            else:
                logger.debug("The node '%s' can't complete rendezvous: not enough participants", ctx.node)
        else:
            return _Action.ADD_TO_PARTICIPANTS

        if _should_keep_alive(ctx):
            return _Action.KEEP_ALIVE
        return _Action.SYNC


class _RendezvousCloseOp:
    """Mark the rendezvous closed."""

    def __call__(self, ctx: _RendezvousContext, deadline: float) -> _Action:
        if ctx.state.closed:
            return _Action.FINISH
        if ctx.clock.monotonic() > deadline:
            return _Action.ERROR_TIMEOUT
        return _Action.MARK_RENDEZVOUS_CLOSED


class _RendezvousKeepAliveOp:
    """Write this node's heartbeat if one is due."""

    def __call__(self, ctx: _RendezvousContext, deadline: float) -> _Action:
        if _should_keep_alive(ctx):
            if ctx.clock.monotonic() > deadline:
                return _Action.ERROR_TIMEOUT
            return _Action.KEEP_ALIVE
        return _Action.FINISH


# -- the handler ------------------------------------------------------------------------------

#: How long a non-zero rank waits for this round's MASTER_ADDR/MASTER_PORT before it falls back
#: to earlier rounds' keys (a torch rank 0 with a cached server writes none in later rounds).
_BOOTSTRAP_GRACE = 5.0
_BOOTSTRAP_POLL = 0.05


class DynamicRendezvousHandler(RendezvousHandler):
    """A rendezvous among a changing set of nodes: torch 2.13's handler, same behaviour and bytes.

    Build it with :meth:`from_backend` or :func:`create_handler`, then call
    :meth:`next_rendezvous` for each round. See the module docstring for the differences from torch.
    """

    _node_desc_generator = _NodeDescGenerator()

    @classmethod
    def from_backend(
        cls,
        run_id: str,
        store: Store,
        backend: RendezvousBackend,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        timeout: RendezvousTimeout | None = None,
        keep_alive_interval: float = 5,
        keep_alive_max_attempt: int = 3,
        *,
        _clock: _Clock | None = None,
        _cache_duration: int = 1,
    ) -> DynamicRendezvousHandler:
        """Create a handler whose state lives in ``backend``.

        Args:
            run_id: The rendezvous id.
            store: Wrapped per round in ``PrefixStore("torch.rendezvous.{run_id}.{round}", store)``
                and returned in the :class:`RendezvousInfo`; receives ``MASTER_ADDR``/``MASTER_PORT``.
            backend: Holds the state; ``backend.name`` is :meth:`get_backend`.
            min_nodes, max_nodes: Bounds of the world size.
            local_addr: This node's address (``MASTER_ADDR`` when rank 0); falsy: ``getfqdn()``.
            timeout: The timeouts; ``None``: the defaults.
            keep_alive_interval: Seconds between heartbeats (not validated, as in torch).
            keep_alive_max_attempt: Missed heartbeats before a node is dead (not validated).

        Raises:
            ValueError: Empty run id, ``min_nodes < 1`` or ``max_nodes < min_nodes`` (torch's
                messages). The node id is taken even then, as in torch.
        """
        node = cls._node_desc_generator.generate(local_addr)
        settings = RendezvousSettings(
            run_id,
            min_nodes,
            max_nodes,
            timeout or RendezvousTimeout(),
            keep_alive_interval=timedelta(seconds=keep_alive_interval),
            keep_alive_max_attempt=keep_alive_max_attempt,
        )
        state_holder = _BackendRendezvousStateHolder(backend, settings, _cache_duration, clock=_clock)
        return cls(node, settings, backend.name, store, state_holder, _clock=_clock)

    def __init__(
        self,
        node: NodeDesc,
        settings: RendezvousSettings,
        backend_name: str,
        store: Store,
        state_holder: _RendezvousStateHolder,
        *,
        _clock: _Clock | None = None,
    ) -> None:
        if not settings.run_id:
            raise ValueError("The run id must be a non-empty string.")
        if settings.min_nodes < 1:
            raise ValueError(f"The minimum number of nodes ({settings.min_nodes}) must be greater than zero.")
        if settings.max_nodes < settings.min_nodes:
            raise ValueError(
                f"The maximum number of nodes ({settings.max_nodes}) must be greater than or equal "
                f"to the minimum number of nodes ({settings.min_nodes})."
            )
        self._this_node = node
        self._settings = settings
        self._backend_name = backend_name
        self._store = store
        self._state_holder = state_holder
        self._clock = _clock or _SYSTEM_CLOCK
        self._op_executor = _DistributedRendezvousOpExecutor(self._this_node, state_holder, settings, self._clock)
        self._heartbeat_lock = threading.Lock()
        self._keep_alive_timer: _PeriodicTimer | None = None
        self._shared_tcp_store_server: Store | None = None
        self._bootstrap_store_info: RendezvousStoreInfo | None = None
        self._bootstrap_rank0: NodeDesc | None = None  # rank 0 when the cached info was read
        self._bootstrap_grace = _BOOTSTRAP_GRACE
        # What the keep-alive thread saw (for the "membership not lost silently" rule).
        self._member_of_round: int | None = None
        self._keep_alive_failures = 0
        self._last_keep_alive_error: BaseException | None = None
        self._removal_reported = False

    def _create_tcp_store_server(self, master_addr: str, master_port: int) -> Store:
        """The workers' store hosted by rank 0: our TCPStore server, bound to ``master_addr`` only.

        Raises:
            rdzv_store.StoreConnectionError: ``master_addr`` cannot be bound (pass ``local_addr``).
        """
        try:
            return TCPStore(host_name=master_addr, port=master_port, is_master=True, multi_tenant=True)
        except Exception:
            logger.error(
                "The node '%s' cannot host the workers' store on %s (port %d); pass a local_addr "
                "(torchrun --local-addr) that this machine can bind.",
                self._this_node,
                master_addr,
                master_port,
            )
            raise

    @property
    def settings(self) -> RendezvousSettings:
        """The settings of the rendezvous."""
        return self._settings

    def get_backend(self) -> str:
        """The backend's name (``"c10d"``)."""
        return self._backend_name

    @property
    def use_agent_store(self) -> bool:
        """False only if ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE`` is exactly ``"1"`` (read each time)."""
        return os.getenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0") != "1"

    def next_rendezvous(self) -> RendezvousInfo:
        """Leave the current round (if any), join the next one and return this node's place in it.

        Raises:
            RendezvousClosedError: The rendezvous is closed.
            RendezvousGracefulExitError: It closed while this node waited in the redundancy list.
            RendezvousTimeoutError: No round took this node within the join timeout.
            RendezvousConnectionError: The store failed.
            RendezvousStateError: The stored state cannot be decoded (names the key and reason).
            rdzv_store.StoreError: Reading the bootstrap keys failed (store timeout).
        """
        logger.info(
            "The node '%s' attempts to join the next round of the rendezvous '%s'.",
            self._this_node,
            self._settings.run_id,
        )
        self._stop_heartbeats()

        if self._state_holder.state.round == 0:
            _delay((0, 0.3), self._clock)

        exit_op = _RendezvousExitOp()
        join_op = _RendezvousJoinOp()
        deadline = self._get_deadline(self._settings.timeout.join)
        self._op_executor.run(exit_op, deadline)
        self._op_executor.run(join_op, deadline, self._get_deadline)

        state = self._state_holder.state
        self._member_of_round = state.round
        self._removal_reported = False
        self._start_heartbeats()

        rank, world_size = self._get_world()
        store = self._get_store()
        rank0 = min(state.participants)

        logger.info(
            "The node '%s' has joined round %d of the rendezvous '%s' as rank %d in a world of size %d.",
            self._this_node,
            state.round,
            self._settings.run_id,
            rank,
            world_size,
        )
        info = self._bootstrap(rank, store, rank0)
        return RendezvousInfo(store, rank, world_size, info)

    # -- bootstrap info ---------------------------------------------------------------------
    def _bootstrap(self, rank: int, store: Store, rank0: NodeDesc) -> RendezvousStoreInfo:
        if not self.use_agent_store:
            # Workers' rank 0 hosts: publish an address and a port that is free right now.
            if rank == 0:
                info = RendezvousStoreInfo(self._this_node.addr, _get_free_port())
                self._publish(store, info)
                return info
            return self._read_bootstrap(store, rank0, cached=None)

        if rank == 0:
            if self._shared_tcp_store_server is None:
                self._shared_tcp_store_server = self._create_tcp_store_server(self._this_node.addr, 0)
            port = int(getattr(self._shared_tcp_store_server, "port"))
            info = RendezvousStoreInfo(self._this_node.addr, port)
            # Every round, not only the first (torch): a later joiner with a non-zero rank reads it.
            self._publish(store, info)
            self._bootstrap_store_info = info
            return info
        current = self._try_read(store)
        if current is None:
            cached = self._bootstrap_store_info
            if cached is not None and self._bootstrap_rank0 == rank0:
                # Rank 0 is the node that published the cached info: its server is unchanged (a
                # torch rank 0 writes nothing in later rounds). torch returns it the same way.
                return cached
            current = self._read_bootstrap(store, rank0, cached=cached)
        info = current
        self._bootstrap_store_info = info
        self._bootstrap_rank0 = rank0
        return info

    @staticmethod
    def _publish(store: Store, info: RendezvousStoreInfo) -> None:
        store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, info.master_addr.encode("UTF-8"))
        store.set(RendezvousStoreInfo.MASTER_PORT_KEY, str(info.master_port).encode("UTF-8"))
        # A replying request on the same connection: both SETs have landed when it returns.
        store.check([RendezvousStoreInfo.MASTER_PORT_KEY])

    @staticmethod
    def _try_read(store: Store) -> RendezvousStoreInfo | None:
        keys = [RendezvousStoreInfo.MASTER_ADDR_KEY, RendezvousStoreInfo.MASTER_PORT_KEY]
        if not store.check(keys):
            return None
        addr, port = store.multi_get(keys)
        return RendezvousStoreInfo(addr.decode("UTF-8"), int(port.decode("UTF-8")))

    def _read_bootstrap(
        self, store: Store, rank0: NodeDesc, cached: RendezvousStoreInfo | None
    ) -> RendezvousStoreInfo:
        """Read this round's keys; polling (``check``), so the store connection is never held.

        After ``_bootstrap_grace`` seconds without this round's keys (rank 0 is a torch agent whose
        server was made in an earlier round), use the cached info or the newest earlier round's keys
        published from rank 0's address.

        Raises:
            rdzv_store.StoreTimeoutError: Nothing usable within the store's timeout.
        """
        start = self._clock.monotonic()
        limit = start + self._store.timeout.total_seconds()
        round_ = self._state_holder.state.round
        while True:
            info = self._try_read(store)
            if info is not None:
                return info
            now = self._clock.monotonic()
            if now - start >= self._bootstrap_grace:
                if cached is not None and cached.master_addr == rank0.addr:
                    return cached
                for earlier in range(round_ - 1, -1, -1):
                    old = self._try_read(PrefixStore(f"torch.rendezvous.{self._settings.run_id}.{earlier}", self._store))
                    if old is not None and old.master_addr == rank0.addr:
                        logger.warning(
                            "Round %d of the rendezvous '%s' has no %s; using the one rank 0 (%s) "
                            "published in round %d.",
                            round_,
                            self._settings.run_id,
                            RendezvousStoreInfo.MASTER_ADDR_KEY,
                            rank0,
                            earlier,
                        )
                        return old
            if now >= limit:
                # The store's own timeout error, naming the key (what torch's blocking get raises).
                store.wait([RendezvousStoreInfo.MASTER_ADDR_KEY], timedelta(0))
                info = self._try_read(store)
                if info is not None:
                    return info
                raise RendezvousTimeoutError(
                    f"No {RendezvousStoreInfo.MASTER_ADDR_KEY} for round {round_} of the rendezvous "
                    f"'{self._settings.run_id}'."
                )
            self._clock.sleep(_BOOTSTRAP_POLL)

    # -- other members ----------------------------------------------------------------------
    def is_closed(self) -> bool:
        """Whether the rendezvous is closed (the 1 s read cache applies).

        Raises:
            RendezvousConnectionError, RendezvousStateError: As ``sync()``.
        """
        with self._heartbeat_lock:
            self._state_holder.sync()
            return self._state_holder.state.closed

    def set_closed(self) -> None:
        """Close the rendezvous for every node; repeatable.

        Raises:
            RendezvousTimeoutError: Not closed within the close timeout.
            RendezvousConnectionError, RendezvousStateError: As ``sync()``.
        """
        with self._heartbeat_lock:
            self._close()

    def num_nodes_waiting(self) -> int:
        """The wait list's length (the redundancy list is not counted), as torch.

        Raises:
            RendezvousConnectionError, RendezvousStateError: As ``sync()``.
        """
        with self._heartbeat_lock:
            self._state_holder.sync()
            return len(self._state_holder.state.wait_list)

    def get_run_id(self) -> str:
        """The run id."""
        return self._settings.run_id

    def shutdown(self) -> bool:
        """Stop heartbeats and close the rendezvous **for the whole job**; True on success.

        A ``RendezvousError`` is logged as a warning and gives False.

        Raises:
            Exception: Anything that is not a ``RendezvousError``.
        """
        self._stop_heartbeats()
        try:
            self._close()
            return True
        except RendezvousError as ex:
            logger.warning(
                "The node '%s' has failed to shutdown the rendezvous '%s' due to an error of type %s.",
                self._this_node,
                self._settings.run_id,
                type(ex).__name__,
            )
            return False

    def _close(self) -> None:
        op = _RendezvousCloseOp()
        deadline = self._get_deadline(self._settings.timeout.close)
        self._op_executor.run(op, deadline)
        logger.info("The node '%s' has closed the rendezvous '%s'.", self._this_node, self._settings.run_id)

    @staticmethod
    def _keep_alive_weak(weak_self: weakref.ref[DynamicRendezvousHandler]) -> None:
        self = weak_self()
        if self is not None:
            self._keep_alive()

    def _keep_alive(self) -> None:
        """One heartbeat tick. Never raises: every failure is logged and retried next tick."""
        with self._heartbeat_lock:
            op = _RendezvousKeepAliveOp()
            deadline = self._get_deadline(self._settings.timeout.heartbeat)
            try:
                self._op_executor.run(op, deadline)
                logger.debug(
                    "The node '%s' has sent a keep-alive heartbeat to the rendezvous '%s'.",
                    self._this_node,
                    self._settings.run_id,
                )
            except RendezvousError as ex:
                self._keep_alive_failures += 1
                self._last_keep_alive_error = ex
                logger.warning(
                    "The node '%s' has failed to send a keep-alive heartbeat to the rendezvous '%s' due "
                    "to an error of type %s%s.",
                    self._this_node,
                    self._settings.run_id,
                    type(ex).__name__,
                    f": {ex}" if str(ex) else "",
                )
                return
            except Exception as ex:  # torch's thread dies here and the node silently goes dead
                self._keep_alive_failures += 1
                self._last_keep_alive_error = ex
                logger.error(
                    "The node '%s' has failed to send a keep-alive heartbeat to the rendezvous '%s': "
                    "%s: %s; retrying at the next interval.",
                    self._this_node,
                    self._settings.run_id,
                    type(ex).__name__,
                    ex,
                    exc_info=True,
                )
                return
            self._check_membership()

    def _check_membership(self) -> None:
        # torch's keep-alive silently does nothing once the node was declared dead; say so, once.
        state = self._state_holder.state
        node = self._this_node
        if self._member_of_round is None or self._removal_reported or state.closed:
            return
        present = node in state.participants or node in state.wait_list or node in _redundancy(state)
        if not present and node not in state.last_heartbeats:
            self._removal_reported = True
            logger.warning(
                "The node '%s' is no longer a member of the rendezvous '%s' (round %d; it was removed, "
                "e.g. declared dead after missing heartbeats); call next_rendezvous() to rejoin.",
                node,
                self._settings.run_id,
                state.round,
            )

    def _start_heartbeats(self) -> None:
        self._keep_alive_timer = _PeriodicTimer(
            self._settings.keep_alive_interval, self._keep_alive_weak, weakref.ref(self)
        )
        self._keep_alive_timer.set_name(f"RendezvousKeepAliveTimer_{self._this_node.local_id}")
        self._keep_alive_timer._ctx.clock = self._clock
        self._keep_alive_timer.start()

    def _stop_heartbeats(self) -> None:
        if self._keep_alive_timer is None:
            return
        self._keep_alive_timer.cancel()

    def _get_world(self) -> tuple[int, int]:
        state = self._state_holder.state
        return state.participants[self._this_node], len(state.participants)

    def _wrap_store(self, store: Store) -> Store:
        key_prefix = f"torch.rendezvous.{self._settings.run_id}.{self._state_holder.state.round}"
        return PrefixStore(key_prefix, store)

    def _get_store(self) -> Store:
        return self._wrap_store(self._store)

    def _get_deadline(self, timeout: timedelta) -> float:
        return self._clock.monotonic() + timeout.total_seconds()


def _get_timeout(params: RendezvousParameters, key: str) -> timedelta | None:
    timeout = params.get_as_int(key + "_timeout")
    if timeout is None:
        return None
    return timedelta(seconds=timeout)


def create_handler(store: Store, backend: RendezvousBackend, params: RendezvousParameters) -> DynamicRendezvousHandler:
    """Create a :class:`DynamicRendezvousHandler` from launcher parameters (torch's config keys).

    ``join_timeout`` (600), ``last_call_timeout`` (30), ``close_timeout`` (30),
    ``heartbeat_timeout`` (5), ``keep_alive_interval`` (5) and ``keep_alive_max_attempt`` (3),
    each an int or integer string, in seconds where it is a time; ``params.local_addr`` is the
    node address. ``timeout`` is not read (as in torch).

    Raises:
        ValueError: A non-integer value (the ``get_as_int`` message), a timeout that is not
            positive, or bad run id / node counts.
        TypeError: ``keep_alive_interval`` or ``keep_alive_max_attempt`` given as ``None``.
    """
    try:
        timeout = RendezvousTimeout(
            _get_timeout(params, "join"),
            _get_timeout(params, "last_call"),
            _get_timeout(params, "close"),
            _get_timeout(params, "heartbeat"),
        )
        keep_alive_interval = params.get_as_int("keep_alive_interval", 5)
        if keep_alive_interval is None:
            raise TypeError("You passed 'keep_alive_interval=None' as a rendezvous configuration option")
        keep_alive_max_attempt = params.get_as_int("keep_alive_max_attempt", 3)
        if keep_alive_max_attempt is None:
            raise TypeError("You passed 'keep_alive_max_attempt=None' as a rendezvous configuration option")
        return DynamicRendezvousHandler.from_backend(
            params.run_id,
            store,
            backend,
            params.min_nodes,
            params.max_nodes,
            params.local_addr,
            timeout,
            keep_alive_interval=keep_alive_interval,
            keep_alive_max_attempt=keep_alive_max_attempt,
        )
    except Exception as e:
        logger.debug("Creating the dynamic rendezvous handler failed: %s: %s", type(e).__name__, e)
        raise
