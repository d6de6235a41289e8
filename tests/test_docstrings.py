"""Issue 11: every public class and method of the stores says what it raises, and when.

A method's own docstring must carry a ``Raises:`` section whose entries name exception
classes (or say explicitly that nothing is raised, or defer to a named callee). Inherited
methods are checked where they are defined; an override needs its own docstring.
"""

from __future__ import annotations

import builtins
import inspect
import re

import pytest

import rdzv_store
from rdzv_store import AsyncTCPStore, FileStore, HashStore, PrefixStore, Store, StoreServer, TCPStore

CLASSES = [Store, AsyncTCPStore, TCPStore, HashStore, PrefixStore, FileStore, StoreServer]

# What an entry of a Raises section may start with: an exception class (ours, the builtins',
# asyncio's), or an explicit statement that there is nothing / what another call raises.
_KNOWN = {
    name
    for module in (builtins, rdzv_store)
    for name, value in vars(module).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}
_KNOWN |= {"asyncio.CancelledError", "asyncio.TimeoutError", "Nothing", "Whatever", "Each"}


def _public_members(cls: type) -> list[tuple[str, object]]:
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            members.append((name, value))
    return members


def _raises_section(doc: str | None) -> list[str]:
    """The entries (first lines) of the docstring's ``Raises:`` section; [] if there is none."""
    if not doc:
        return []
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Raises:":
            indent = None
            entries = []
            for body in lines[i + 1 :]:
                if not body.strip():
                    break
                width = len(body) - len(body.lstrip())
                if width == 0:
                    break
                if indent is None:
                    indent = width
                if width == indent:
                    entries.append(body.strip())
            return entries
    return []


CASES = [(cls, name, member) for cls in CLASSES for name, member in _public_members(cls)]


def test_the_check_covers_what_it_should():
    names = {(cls.__name__, name) for cls, name, _ in CASES}
    for expected in [("Store", "get"), ("Store", "timeout"), ("AsyncTCPStore", "wait"), ("AsyncTCPStore", "connect"),
                     ("TCPStore", "close"), ("FileStore", "compact"), ("PrefixStore", "clone")]:
        assert expected in names
    assert len(CASES) > 50
    assert _raises_section("x\n\nRaises:\n    KeyError: when.\n        more.\n    ValueError: too.\n") == [
        "KeyError: when.", "ValueError: too."]
    assert _raises_section("x\n\nraises KeyError") == []


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_public_class_says_what_it_raises(cls):
    entries = _raises_section(cls.__doc__)
    assert entries, f"{cls.__name__}: the class docstring has no Raises: section"


@pytest.mark.parametrize("cls, name, member", CASES, ids=[f"{c.__name__}.{n}" for c, n, _ in CASES])
def test_every_public_method_says_what_it_raises(cls, name, member):
    doc = member.__doc__
    assert doc and doc.strip(), f"{cls.__name__}.{name} has no docstring"
    entries = _raises_section(doc)
    assert entries, f"{cls.__name__}.{name}: no Raises: section"
    for entry in entries:
        match = re.match(r"[\w.]+", entry)
        head = match.group().rstrip(".") if match else ""
        assert head in _KNOWN, f"{cls.__name__}.{name}: Raises entry {entry!r} does not name an exception"
