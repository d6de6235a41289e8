"""Hypothesis strategies for store keys, values and operations, and a stateful test of a store.

Needs hypothesis (``pip install 'rdzv-store[test]'``); ``import rdzv_store`` never imports it.

* ``keys()``, ``values()``: a small pool of keys, so that operations collide, and short
  values, some of them integers (for ``add``);
* ``operation()``/``operations()``: one ``Op`` / a list of them, for ``check_operations``::

      @given(operations())
      def test_my_store(ops):
          check_operations(MyStore(), ops)

* ``store_state_machine(open_store)``: a ``RuleBasedStateMachine`` that runs random
  operations on ``open_store()`` and on ``StoreModel`` and compares them after every step
  (rdzv-store's own ``tests/test_store_model.py`` is this, for each of its stores)::

      TestMyStore = store_state_machine(MyStore).TestCase
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from .model import CURRENT, OPERATION_NAMES, Op, StoreModel, check_step

__all__ = ["DEFAULT_KEYS", "keys", "operation", "operations", "store_state_machine", "values"]

DEFAULT_KEYS: tuple[str, ...] = ("a", "b", "ctr", "é", "")
"""Few keys, so that generated operations hit the same keys; non-ASCII and empty included."""


def keys(pool: Sequence[str | bytes] = DEFAULT_KEYS) -> st.SearchStrategy[Any]:
    """Keys drawn from ``pool``."""
    return st.sampled_from(list(pool))


def values(max_size: int = 12) -> st.SearchStrategy[bytes]:
    """Short byte strings, and small integers as text (so ``add`` has something to add to)."""
    return st.binary(max_size=max_size) | st.integers(-50, 50).map(lambda n: str(n).encode())


def _lists_of(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(strategy, max_size=3)


def _equal_length(k: st.SearchStrategy[Any], v: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[Any, Any]]:
    return _lists_of(k).flatmap(lambda ks: st.tuples(st.just(ks), st.lists(v, min_size=len(ks), max_size=len(ks))))


def _op_strategies(k: st.SearchStrategy[Any], v: st.SearchStrategy[bytes]) -> dict[str, st.SearchStrategy[Op]]:
    amounts = st.integers(-(2**63), 2**63 - 1)
    expected = v | st.just(CURRENT)  # CURRENT: a compare_set that matches
    return {
        "set": st.builds(lambda a, b: Op("set", a, b), k, v),
        "get": st.builds(lambda a: Op("get", a), k),
        "add": st.builds(lambda a, n: Op("add", a, n), k, amounts),
        "compare_set": st.builds(lambda a, e, d: Op("compare_set", a, e, d), k, expected, v),
        "delete_key": st.builds(lambda a: Op("delete_key", a), k),
        "check": st.builds(lambda ks: Op("check", ks), _lists_of(k)),
        "num_keys": st.just(Op("num_keys")),
        "multi_set": _equal_length(k, v).map(lambda kv: Op("multi_set", kv[0], kv[1])),
        "multi_get": st.builds(lambda ks: Op("multi_get", ks), _lists_of(k)),
        "append": st.builds(lambda a, b: Op("append", a, b), k, v),
        "queue_push": st.builds(lambda a, b: Op("queue_push", a, b), k, v),
        "queue_pop": st.builds(lambda a: Op("queue_pop", a), k),
        "queue_len": st.builds(lambda a: Op("queue_len", a), k),
        "list_keys": st.just(Op("list_keys")),
    }


def operation(
    names: Sequence[str] = OPERATION_NAMES,
    key_strategy: st.SearchStrategy[Any] | None = None,
    value_strategy: st.SearchStrategy[bytes] | None = None,
) -> st.SearchStrategy[Op]:
    """One store operation among ``names`` (leave out the queue operations for a FileStore)."""
    unknown = set(names) - set(OPERATION_NAMES)
    if unknown:
        raise ValueError(f"unknown store operations: {sorted(unknown)}")
    table = _op_strategies(
        keys() if key_strategy is None else key_strategy, values() if value_strategy is None else value_strategy
    )
    return st.one_of([table[name] for name in names])


def operations(
    names: Sequence[str] = OPERATION_NAMES,
    key_strategy: st.SearchStrategy[Any] | None = None,
    value_strategy: st.SearchStrategy[bytes] | None = None,
    max_size: int = 30,
) -> st.SearchStrategy[list[Op]]:
    """A sequence of operations, to run with ``model.check_operations(store, ops)``."""
    return st.lists(operation(names, key_strategy, value_strategy), max_size=max_size)


def _default_close(store: Any, model: StoreModel) -> None:
    """Leave the store empty for the next example (stores may share a server), then close it."""
    for key in store.list_keys():
        store.delete_key(key)
    for name, queue in model.queues.items():
        for _ in range(len(queue)):
            store.queue_pop(name, block=False)
    store.close()
    underlying = getattr(store, "underlying_store", None)  # a PrefixStore we made: close its store
    if underlying is not None:
        underlying.close()


def store_state_machine(
    open_store: Callable[[], Any],
    counts_all_keys: bool = True,
    *,
    close_store: Callable[[Any, StoreModel], None] = _default_close,
    names: Sequence[str] = OPERATION_NAMES,
    key_strategy: st.SearchStrategy[Any] | None = None,
    value_strategy: st.SearchStrategy[bytes] | None = None,
    settings: hypothesis_settings | None = None,
) -> type[RuleBasedStateMachine]:
    """A state machine checking ``open_store()`` against ``StoreModel`` (use its ``.TestCase``).

    Each example opens a store, runs a sequence of operations on it and on the model,
    comparing every result, checks keys and queue lengths (and ``num_keys`` when
    ``counts_all_keys``) after every step, and calls ``close_store(store, model)`` (by
    default: delete what it stored, pop its queues, close it and the store under a
    PrefixStore). ``names`` restricts the operations (``num_keys`` and ``list_keys`` are
    checked as invariants anyway).
    """
    ops = operation([n for n in names if n not in ("num_keys", "list_keys")], key_strategy, value_strategy)

    class StoreModelMachine(RuleBasedStateMachine):
        @initialize()
        def open(self) -> None:
            self.store = open_store()
            self.model = StoreModel(counts_all_keys=counts_all_keys)

        def teardown(self) -> None:
            if hasattr(self, "store"):
                close_store(self.store, self.model)

        @rule(op=ops)
        def step(self, op: Op) -> None:
            check_step(self.store, self.model, op)

        @precondition(lambda self: counts_all_keys)
        @invariant()
        def num_keys(self) -> None:
            check_step(self.store, self.model, Op("num_keys"))

        @invariant()
        def list_keys_and_queue_lengths(self) -> None:
            check_step(self.store, self.model, Op("list_keys"))
            if "queue_len" in names:
                for name in list(self.model.queues):
                    check_step(self.store, self.model, Op("queue_len", name))

    StoreModelMachine.TestCase.settings = settings or hypothesis_settings(
        max_examples=40, stateful_step_count=25, deadline=None
    )
    return StoreModelMachine
