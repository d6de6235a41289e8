"""The reference model of a c10d store: a dict of bytes plus FIFO queues, and nothing else.

Written from torch's documented semantics, not from our engine, and deliberately naive.
It is what rdzv-store's own stateful tests check every store against (HashStore,
TCPStore, PrefixStore, AsyncTCPStore), and you can check your own store, or a wrapper
around one, against it:

>>> from rdzv_store import HashStore
>>> from rdzv_store.testing.model import Op, check_operations
>>> check_operations(HashStore(), [Op("set", "k", b"1"), Op("add", "k", 2), Op("get", "k")])

An operation is an ``Op(name, *args)`` that reads like the store call it stands for
(``Op("queue_pop", "q")`` is ``store.queue_pop("q", block=False)``). ``StoreModel.apply``
returns what a correct store returns for it, ``Raises(SomeError)`` when the store must
raise, or ``UNDEFINED`` where torch leaves the outcome open (``add`` to a value that is
not an integer; a ``get`` of a missing key, which would block for the store timeout):
such operations are not sent to the store.

Pure standard library: importing this module does not import hypothesis or pytest (the
strategies that generate operations are in ``rdzv_store.testing.strategies``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CURRENT",
    "OPERATION_NAMES",
    "UNDEFINED",
    "Op",
    "Raises",
    "StoreModel",
    "check_invariants",
    "check_operations",
    "check_step",
    "run_op",
]

_PLAIN_INT = re.compile(rb"-?[0-9]{1,18}")


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


UNDEFINED: Any = _Sentinel("UNDEFINED")
"""``StoreModel.apply``'s answer when torch leaves the outcome open: do not send the operation."""

CURRENT: Any = _Sentinel("CURRENT")
"""As ``compare_set``'s ``expected``: whatever the key holds when the operation runs (a
missing key: ``b"x"``, which then does not match)."""

OPERATION_NAMES = (
    "set",
    "get",
    "add",
    "compare_set",
    "delete_key",
    "check",
    "num_keys",
    "multi_set",
    "multi_get",
    "append",
    "queue_push",
    "queue_pop",
    "queue_len",
    "list_keys",
)


@dataclass(frozen=True)
class Raises:
    """The store must raise an instance of ``exc_type``."""

    exc_type: type[BaseException]


@dataclass(frozen=True, init=False)
class Op:
    """One store call: ``Op("set", "k", b"v")`` is ``store.set("k", b"v")``."""

    name: str
    args: tuple[Any, ...]

    def __init__(self, name: str, *args: Any) -> None:
        if name not in OPERATION_NAMES:
            raise ValueError(f"unknown store operation {name!r}; one of {', '.join(OPERATION_NAMES)}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "args", args)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(map(repr, self.args))})"


def _key(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def _value(value: str | bytes | bytearray) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class StoreModel:
    """A dict of bytes and a dict of FIFO queues, with torch's rules for each operation.

    ``counts_all_keys=False`` for stores whose ``num_keys`` also counts keys outside
    your view (a ``PrefixStore`` reports the whole server's count, as torch's does):
    ``num_keys`` is then ``UNDEFINED``.
    """

    def __init__(self, counts_all_keys: bool = True) -> None:
        self.counts_all_keys = counts_all_keys
        self.kv: dict[bytes, bytes] = {}
        self.queues: dict[bytes, list[bytes]] = {}

    # -- one entry point --------------------------------------------------------------------
    def resolve(self, op: Op) -> Op:
        """``op`` with ``CURRENT`` replaced by the value it stands for now."""
        if op.name == "compare_set" and op.args[1] is CURRENT:
            current = self.kv.get(_key(op.args[0]), b"x")
            return Op("compare_set", op.args[0], current, op.args[2])
        return op

    def apply(self, op: Op) -> Any:
        """Run ``op`` on the model: the expected result, ``Raises(...)`` or ``UNDEFINED``."""
        op = self.resolve(op)
        return getattr(self, op.name)(*op.args)

    # -- the operations ---------------------------------------------------------------------
    def set(self, key: str | bytes, value: str | bytes) -> None:
        self.kv[_key(key)] = _value(value)

    def get(self, key: str | bytes) -> Any:
        return self.kv.get(_key(key), UNDEFINED)  # missing: blocks for the store timeout

    def add(self, key: str | bytes, amount: int) -> Any:
        old = self.kv.get(_key(key))
        if old is not None and not _PLAIN_INT.fullmatch(old):
            return UNDEFINED  # HashStore raises, torch's TCP server drops the connection
        total = (int(old or 0) + amount + 2**63) % 2**64 - 2**63  # int64 wraps around
        self.kv[_key(key)] = str(total).encode()
        return total

    def compare_set(self, key: str | bytes, expected: str | bytes, desired: str | bytes) -> bytes:
        k, expected_b, desired_b = _key(key), _value(expected), _value(desired)
        current = self.kv.get(k)
        if current is None and expected_b:
            return expected_b  # torch's rule: nothing stored, "expected" returned
        if (current is None and not expected_b) or current == expected_b:
            self.kv[k] = desired_b
            return desired_b
        assert current is not None
        return current

    def delete_key(self, key: str | bytes) -> bool:
        return self.kv.pop(_key(key), None) is not None

    def check(self, keys: Iterable[str | bytes]) -> bool:
        # A non-empty queue counts as an existing key (torch's libuv rule).
        return all(_key(k) in self.kv or bool(self.queues.get(_key(k))) for k in keys)

    def num_keys(self) -> Any:
        return len(self.kv) if self.counts_all_keys else UNDEFINED

    def multi_set(self, keys: Sequence[str | bytes], values: Sequence[str | bytes]) -> Any:
        if len(keys) != len(values):
            return UNDEFINED  # torch: undefined behaviour; rdzv-store raises ValueError
        for k, v in zip(keys, values):
            self.kv[_key(k)] = _value(v)
        return None

    def multi_get(self, keys: Sequence[str | bytes]) -> Any:
        if not all(_key(k) in self.kv for k in keys):
            return UNDEFINED  # blocks for the store timeout
        return [self.kv[_key(k)] for k in keys]

    def append(self, key: str | bytes, value: str | bytes) -> None:
        self.kv[_key(key)] = self.kv.get(_key(key), b"") + _value(value)

    def queue_push(self, key: str | bytes, value: str | bytes) -> None:
        self.queues.setdefault(_key(key), []).append(_value(value))

    def queue_pop(self, key: str | bytes) -> Any:
        """Non-blocking pop (``store.queue_pop(key, block=False)``)."""
        from ..errors import QueueEmptyError

        queue = self.queues.get(_key(key))
        if not queue:
            return Raises(QueueEmptyError)
        return queue.pop(0)

    def queue_len(self, key: str | bytes) -> int:
        return len(self.queues.get(_key(key), []))

    def list_keys(self) -> list[str]:
        """User keys, sorted (compare a store's ``list_keys()`` sorted)."""
        return sorted(k.decode() for k in self.kv)


# -- running operations on a real store -----------------------------------------------------


@dataclass(frozen=True)
class _Raised:
    exc: BaseException

    def __repr__(self) -> str:
        return f"raised {self.exc!r}"


def run_op(store: Any, op: Op) -> Any:
    """Call ``op`` on ``store``: its result, with ``list_keys`` sorted; an exception is returned
    wrapped (``check_step`` compares it with the model's ``Raises``), not raised."""
    try:
        if op.name == "queue_pop":
            result = store.queue_pop(*op.args, block=False)
        else:
            result = getattr(store, op.name)(*op.args)
    except Exception as exc:  # noqa: BLE001 - compared with the model's verdict
        return _Raised(exc)
    if op.name == "list_keys":
        return sorted(result)
    if op.name == "multi_get":
        return [bytes(v) for v in result]
    return result


def check_step(store: Any, model: StoreModel, op: Op, step: int | None = None) -> Any:
    """Apply ``op`` to the model and to ``store`` and assert they agree; returns the result.

    Operations the model calls ``UNDEFINED`` are not sent (returns ``UNDEFINED``).
    """
    op = model.resolve(op)
    expected = model.apply(op)
    if expected is UNDEFINED:
        return UNDEFINED
    actual = run_op(store, op)
    where = f"step {step}: " if step is not None else ""
    if isinstance(expected, Raises):
        if not (isinstance(actual, _Raised) and isinstance(actual.exc, expected.exc_type)):
            raise AssertionError(f"{where}{op!r} should raise {expected.exc_type.__name__}, got {actual!r}")
        return actual
    if isinstance(actual, _Raised):
        raise AssertionError(f"{where}{op!r} raised {actual.exc!r}; the model returns {expected!r}") from actual.exc
    if actual != expected:
        raise AssertionError(f"{where}{op!r} returned {actual!r}; the model returns {expected!r}")
    return actual


def check_operations(store: Any, ops: Iterable[Op], model: StoreModel | None = None) -> StoreModel:
    """Run ``ops`` on ``store`` and on ``model`` (a fresh ``StoreModel`` by default) step by step,
    then compare every key and queue; raise ``AssertionError`` naming the first difference.

    The store should start empty (as the model does). Returns the model.
    """
    model = StoreModel() if model is None else model
    for step, op in enumerate(ops):
        check_step(store, model, op, step)
    check_invariants(store, model)
    return model


def check_invariants(store: Any, model: StoreModel) -> None:
    """The store's keys, queue lengths and (where the model counts them) key count agree."""
    check_step(store, model, Op("list_keys"))
    for name in list(model.queues):
        check_step(store, model, Op("queue_len", name))
    check_step(store, model, Op("num_keys"))
