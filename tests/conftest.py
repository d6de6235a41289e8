"""Makes the helper modules of tests/ and tests/netns importable from every test directory
(tests/interop/test_netns_interop.py shares the namespace tier's scenarios). Nothing else."""

import sys
from pathlib import Path

for _directory in (Path(__file__).resolve().parent, Path(__file__).resolve().parent / "netns"):
    if str(_directory) not in sys.path:
        sys.path.insert(0, str(_directory))
