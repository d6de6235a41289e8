"""Real components a test needs (an etcd binary, network namespaces): skip outside CI, fail in it.

The developers' guide: a test that needs a real component "skips with a clear reason only outside
CI; in CI it must run". ``.ci/run`` installs etcd and runs as root, so under ``CI=true`` a missing
component is a broken CI set-up, and hiding it behind a skip would let the tier silently stop
running.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["in_ci", "unavailable"]


def in_ci() -> bool:
    """True when running under CI (``CI=true``, as ``.ci/run`` is started)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the calling test with ``reason`` outside CI; fail it under CI, where it must run."""
    if in_ci():
        pytest.fail(f"required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)
