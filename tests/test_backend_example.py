"""The README example (examples/backend_cas.py) runs and both processes agree, over tcp and file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "backend_cas.py"


@pytest.mark.parametrize("store_type", ["tcp", "file"])
def test_backend_cas_example(store_type: str) -> None:
    env = dict(os.environ)
    # Import the checkout under test, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), store_type],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f'{store_type}: both processes agree on {{"members": ["A", "B"]}}\n' or (
        result.stdout == f'{store_type}: both processes agree on {{"members": ["B", "A"]}}\n'
    )
