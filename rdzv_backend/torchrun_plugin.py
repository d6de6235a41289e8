"""``torchrun --rdzv-backend=etcd-v3``: torch's rendezvous handler over our etcd-v3 backend.

torch's registry loads every entry point of the ``torchrun.handlers`` group, calls it, and
registers what it returns as the handler creator of that name (``registry.py``:
``handler_registry.register(ep.name, ep.load()())``). Our entry point is
:func:`handler_factory`. It is the only place in rdzv-store that imports torch, and only
when called: importing this module (or ``rdzv_store``/``rdzv_backend``) never does.

The handler is torch's own ``DynamicRendezvousHandler`` (so a torch agent behaves exactly
as with ``--rdzv-backend=c10d``); what changes is where the state lives:

* the backend: :class:`rdzv_backend.etcd.EtcdRendezvousBackend`, adapted to torch's
  ``RendezvousBackend`` ABC, our rendezvous errors mapped to torch's classes;
* the store: an :class:`rdzv_store.EtcdStore` under ``/torch/elastic/store/``, wrapped as a
  ``torch.distributed.Store`` subclass (torch's handler puts a ``PrefixStore`` over it for
  the bootstrap keys; the workers still use the agent's shared TCP store).

Parameters come from ``--rdzv-endpoint`` (``host[:port]``, comma-separated for several
members) and ``--rdzv-conf`` (``protocol``, ``cacert``, ``cert``, ``key``, ``read_timeout``,
``user``, ``password``, ``ttl``), see :func:`rdzv_backend.etcd.create_backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["handler_factory", "create_handler"]

_BUILT: dict[str, Any] = {}


def handler_factory() -> Callable[[Any], Any]:
    """The ``torchrun.handlers`` entry point: returns the ``etcd-v3`` handler creator.

    Imports torch (lazily, here). Raises ``ImportError`` without torch.
    """
    _torch_classes()
    return create_handler


def create_handler(params: Any) -> Any:
    """Create torch's ``DynamicRendezvousHandler`` over the etcd-v3 backend from torch's
    ``RendezvousParameters``.

    Raises:
        ValueError: Bad parameters (see :func:`rdzv_backend.etcd.create_backend`).
        torch's RendezvousConnectionError: etcd could not be reached.
    """
    torch_api = _torch_classes()
    from .api import RendezvousParameters
    from .etcd import create_backend

    ours = RendezvousParameters(
        params.backend,
        params.endpoint,
        params.run_id,
        params.min_nodes,
        params.max_nodes,
        params.local_addr,
        **params.config,
    )
    with torch_api["mapped"]():
        backend, store = create_backend(ours)
    try:
        return torch_api["create_handler"](torch_api["Store"](store), torch_api["Backend"](backend), params)
    except Exception:
        store.close()
        raise


def _torch_classes() -> dict[str, Any]:
    if _BUILT:
        return _BUILT
    import contextlib
    from collections.abc import Iterator
    from datetime import timedelta

    from importlib import import_module

    # import_module keeps mypy (run without torch) from looking for torch's stubs.
    dist: Any = import_module("torch.distributed")
    torch_api: Any = import_module("torch.distributed.elastic.rendezvous.api")
    dynamic: Any = import_module("torch.distributed.elastic.rendezvous.dynamic_rendezvous")
    TorchBackend = dynamic.RendezvousBackend
    torch_create_handler = dynamic.create_handler

    from . import api as our_api

    @contextlib.contextmanager
    def mapped() -> Iterator[None]:
        """Our rendezvous errors as torch's classes (torch's handler catches those)."""
        try:
            yield
        except our_api.RendezvousConnectionError as exc:
            raise torch_api.RendezvousConnectionError(str(exc)) from exc
        except our_api.RendezvousStateError as exc:
            raise torch_api.RendezvousStateError(str(exc)) from exc
        except our_api.RendezvousError as exc:
            raise torch_api.RendezvousError(str(exc)) from exc

    class Backend(TorchBackend):  # type: ignore[misc,valid-type]
        """torch's RendezvousBackend ABC over :class:`EtcdRendezvousBackend`."""

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        @property
        def name(self) -> str:
            return str(self._inner.name)

        def get_state(self) -> Any:
            with mapped():
                return self._inner.get_state()

        def set_state(self, state: bytes, token: Any = None) -> Any:
            with mapped():
                return self._inner.set_state(state, token)

    class Store(dist.Store):  # type: ignore[misc,name-defined]
        """A ``torch.distributed.Store`` over an :class:`rdzv_store.EtcdStore`."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self._inner = inner
            self.set_timeout(inner.timeout)

        def _synced(self) -> Any:
            if self._inner.timeout != self.timeout:
                self._inner.set_timeout(self.timeout)
            return self._inner

        def set(self, key: str, value: Any) -> None:
            self._inner.set(key, value)

        def get(self, key: str) -> bytes:
            return bytes(self._synced().get(key))

        def add(self, key: str, amount: int) -> int:
            return int(self._inner.add(key, amount))

        def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
            return bytes(self._inner.compare_set(key, expected, desired))

        def check(self, keys: list[str]) -> bool:
            return bool(self._inner.check(keys))

        def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
            self._synced().wait(keys, self.timeout if timeout is None else timeout)

        def multi_get(self, keys: list[str]) -> list[bytes]:
            return list(self._synced().multi_get(keys))

        def multi_set(self, keys: list[str], values: list[Any]) -> None:
            self._inner.multi_set(keys, values)

        def append(self, key: str, value: Any) -> None:
            self._inner.append(key, value)

        def has_extended_api(self) -> bool:
            return True

    _BUILT.update(mapped=mapped, Backend=Backend, Store=Store, create_handler=torch_create_handler)
    return _BUILT
