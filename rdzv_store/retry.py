"""Connect-retry policy shared by both clients: when to try again, and the error at the deadline.

Exponential backoff with full jitter (10 ms doubling to 1 s, each sleep drawn
uniformly below it), so thousands of clients started together do not
reconnect in lockstep; torch's client starts at 500 ms, which makes a client
started just before its server wait needlessly.
"""

from __future__ import annotations

import random
import time

from .errors import StoreConnectionError, format_ms

__all__ = ["ConnectRetry"]


class ConnectRetry:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._delay = 0.01

    def attempt_timeout(self) -> float:
        """Bound for one connect attempt: the time left, but at least 1 s (one attempt always runs)."""
        return max(self.deadline - time.monotonic(), 1.0)

    def after_failure(self, error: BaseException) -> float:
        """Seconds to sleep before the next attempt; raises once the deadline has passed."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise StoreConnectionError(
                f"The client socket has timed out after {format_ms(self.timeout)} while trying to connect to "
                f"({self.host}, {self.port}). Last error: {error}"
            ) from None
        sleep = min(random.uniform(0, self._delay), remaining)
        self._delay = min(self._delay * 2, 1.0)
        return sleep
