"""Connect-retry policy shared by both clients: when to try again, what to log, and the error at the deadline.

Exponential backoff with full jitter (10 ms doubling to 1 s, each sleep drawn
uniformly below it), so thousands of clients started together do not
reconnect in lockstep; torch's client starts at 500 ms, which makes a client
started just before its server wait needlessly.

Progress is logged at INFO on the ``rdzv_store.retry`` logger ("still connecting to
H:P, attempt n, last error ...") once a connect has failed for a second, then
every ``LOG_EVERY`` seconds, instead of staying silent until the timeout. A host
name that does not resolve is retried too (in Kubernetes a pod's name appears
in DNS some time after the pod starts), and the log says so the first time.
"""

from __future__ import annotations

import logging
import random
import socket
import time

from .errors import StoreConnectionError, format_ms

__all__ = ["ConnectRetry", "LOG_EVERY"]

log = logging.getLogger("rdzv_store.retry")

#: Seconds between two "still connecting" lines (the first comes after 1 s).
LOG_EVERY = 10.0
_FIRST_LOG = 1.0


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


class ConnectRetry:
    """One connect's retry state: ``attempt_timeout()`` before each attempt, ``after_failure()`` after.

    Raises:
        Nothing at construction.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.attempts = 0
        self._delay = 0.01
        self._next_log = self.started + _FIRST_LOG
        self._said_unresolved = False

    def attempt_timeout(self) -> float:
        """Bound for one connect attempt: the time left, but at least 1 s (one attempt always runs).

        Raises:
            Nothing.
        """
        return max(self.deadline - time.monotonic(), 1.0)

    def after_failure(self, error: BaseException) -> float:
        """Seconds to sleep before the next attempt; logs progress at INFO now and then.

        Raises:
            StoreConnectionError: the deadline has passed; the message names the
                address, the timeout, the number of attempts and the last error.
        """
        self.attempts += 1
        now = time.monotonic()
        remaining = self.deadline - now
        unresolved = isinstance(error, socket.gaierror)
        if remaining <= 0:
            hint = f" (the name {self.host!r} never resolved)" if unresolved else ""
            raise StoreConnectionError(
                f"The client socket has timed out after {format_ms(self.timeout)} while trying to connect to "
                f"({self.host}, {self.port}). Last error: {_describe(error)}{hint}; "
                f"{self.attempts} attempt(s)"
            ) from None
        if unresolved and not self._said_unresolved:
            self._said_unresolved = True
            log.info(
                "%s does not resolve (yet?): %s; retrying until the timeout (%s left), as a pod's name "
                "appears in DNS only some time after the pod starts",
                self.host, _describe(error), format_ms(remaining),
            )
        elif now >= self._next_log:
            self._next_log = now + LOG_EVERY
            log.info(
                "still connecting to %s:%s, attempt %d, last error: %s%s; %s of %s left",
                self.host, self.port, self.attempts, _describe(error),
                " (the name does not resolve yet)" if unresolved else "",
                format_ms(remaining), format_ms(self.timeout),
            )
        sleep = min(random.uniform(0, self._delay), remaining)
        self._delay = min(self._delay * 2, 1.0)
        return sleep
