"""Helpers for the rdzv_backend tests (imported by name; not a conftest)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any, cast

from rdzv_backend import RendezvousStateError

__all__ = ["RendezvousBackendTestMixin", "get_free_port", "open_fds_on", "removing"]


def get_free_port() -> int:
    """A TCP port that was free on every loopback address of "localhost" a moment ago.

    Our stand-in for torch's ``get_free_port``: bind port 0 on the first
    "localhost" address, then make sure that port is also free on the other
    "localhost" addresses (the store resolves the name itself and may pick
    either family), and release it. Racy by nature, as torch's is: use
    port 0 where the code under test allows it.
    """
    infos = socket.getaddrinfo("localhost", None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    families = list(dict.fromkeys((info[0], info[4][0]) for info in infos))
    for _ in range(20):
        with contextlib.ExitStack() as stack:
            port = 0
            try:
                for family, addr in families:
                    sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
                    sock.bind((addr, port))
                    port = sock.getsockname()[1]
            except OSError:
                continue  # taken on another family: try another port
            return port
    raise RuntimeError("Failed to create a socket")


def open_fds_on(path: str) -> list[int]:
    """Descriptors of this process open on ``path`` (Linux ``/proc/self/fd``)."""
    real = os.path.realpath(path)
    fds = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{name}") == real:
                    fds.append(int(name))
    return fds


@contextlib.contextmanager
def removing(path: str) -> Iterator[str]:
    """Yield ``path`` and remove the file afterwards if it still exists."""
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class RendezvousBackendTestMixin:
    """Our version of torch's backend contract mixin (rendezvous.md section 8).

    Mix into a ``unittest.TestCase`` whose ``setUp`` sets ``self._backend``
    to a backend holding **no state**, and which implements
    ``_corrupt_state()`` so that the next ``get_state()`` must raise
    ``RendezvousStateError``.
    """

    _backend: Any

    # Provided by unittest.TestCase.
    assertEqual: Callable[..., None]
    assertNotEqual: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertIsNotNone: Callable[..., None]
    assertTrue: Callable[..., None]
    assertFalse: Callable[..., None]
    assertRaises: Callable[..., Any]

    def _corrupt_state(self) -> None:
        raise NotImplementedError

    def _set_state(self, state: bytes, token: Any | None = None) -> tuple[bytes, Any, bool]:
        result = self._backend.set_state(state, token)
        self.assertIsNotNone(result)
        return cast("tuple[bytes, Any, bool]", result)

    def test_get_state_returns_backend_state(self) -> None:
        self._backend.set_state(b"x")

        result = self._backend.get_state()
        self.assertIsNotNone(result)
        state, token = result
        self.assertEqual(b"x", state)
        self.assertIsNotNone(token)

    def test_get_state_returns_none_if_backend_state_does_not_exist(self) -> None:
        self.assertIsNone(self._backend.get_state())

    def test_get_state_raises_error_if_backend_state_is_corrupt(self) -> None:
        self._corrupt_state()

        with self.assertRaises(RendezvousStateError):
            self._backend.get_state()

    def test_set_state_sets_backend_state_if_it_does_not_exist(self) -> None:
        state, token, has_set = self._set_state(b"x")

        self.assertEqual(b"x", state)
        self.assertIsNotNone(token)
        self.assertTrue(has_set)

    def test_set_state_sets_backend_state_if_token_is_current(self) -> None:
        _, token1, has_set1 = self._set_state(b"x")

        state2, token2, has_set2 = self._set_state(b"y", token1)

        self.assertEqual(b"y", state2)
        self.assertNotEqual(token1, token2)
        self.assertTrue(has_set1)
        self.assertTrue(has_set2)

    def test_set_state_returns_current_backend_state_if_token_is_old(self) -> None:
        _, token1, _ = self._set_state(b"x")

        state2, token2, _ = self._set_state(b"y", token1)

        state3, token3, has_set = self._set_state(b"z", token1)

        self.assertEqual(state2, state3)
        self.assertEqual(token2, token3)
        self.assertFalse(has_set)

    def test_set_state_returns_current_backend_state_if_token_is_none(self) -> None:
        state1, token1, _ = self._set_state(b"x")

        state2, token2, has_set = self._set_state(b"y")

        self.assertEqual(state1, state2)
        self.assertEqual(token1, token2)
        self.assertFalse(has_set)

    def test_set_state_returns_current_backend_state_if_token_is_invalid(self) -> None:
        state1, token1, _ = self._set_state(b"x")

        state2, token2, has_set = self._set_state(b"y", token="invalid")

        self.assertEqual(state1, state2)
        self.assertEqual(token1, token2)
        self.assertFalse(has_set)
