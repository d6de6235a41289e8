"""What the built wheel carries: the LICENSE in its metadata, the one version, the console script.

Builds one wheel (``pip wheel --no-deps``, build isolation: the same requirement as the README's
``pip install .``), once per run, bounded by a timeout. ``RDZV_SKIP_WHEEL_BUILD=1`` skips it
where no package index is reachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    if os.environ.get("RDZV_SKIP_WHEEL_BUILD") == "1":
        pytest.skip("RDZV_SKIP_WHEEL_BUILD=1")
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the tree, so the build's build/ and egg-info never touch the checkout.
    src = tmp_path_factory.mktemp("src") / "rdzv-store"
    junk = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", ".hypothesis", "__pycache__")
    shutil.copytree(ROOT, src, ignore=junk)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("rdzv_store-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (member,) = [n for n in wheel.namelist() if n.split("/")[0].endswith(".dist-info") and n.endswith("/" + name)]
    return wheel.read(member).decode()


def test_wheel_carries_the_license(wheel):
    assert _dist_info(wheel, "LICENSE") == (ROOT / "LICENSE").read_text()
    meta = Parser().parsestr(_dist_info(wheel, "METADATA"))
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    assert "rdzv-store authors" in (ROOT / "LICENSE").read_text()


def test_wheel_version_is_the_package_version(wheel):
    import rdzv_store

    meta = Parser().parsestr(_dist_info(wheel, "METADATA"))
    assert meta["Version"] == rdzv_store.__version__
    assert "rdzv-store = rdzv_store.cli:main" in _dist_info(wheel, "entry_points.txt")


def test_changelog_has_this_version_and_an_unreleased_section():
    import rdzv_store

    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in text
    assert f"## {rdzv_store.__version__}" in text
