"""No pickle (or marshal, shelve, eval, exec) anywhere in the project.

Store contents are network data from any process that can reach the port;
nothing may ever turn them into objects by deserialising code. Checked on the
syntax tree, so comments and docstrings that *mention* pickle are fine:

* no Python file of the project (packages, examples, benchmarks, tests)
  imports any object-serialisation module, or calls ``eval`` or ``exec``
  (a test that needs a hostile pickle keeps it as a bytes literal);
* nothing ever *loads* a pickle (``load``/``loads``/``Unpickler``), however
  it was imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["rdzv_store", "rdzv_backend", "examples", "benchmarks"]
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle", "copyreg", "pickletools"}
LOADERS = {"load", "loads", "Unpickler"}

# The only exemption, by exact path and with its reason: the codec benchmark's reference is C pickle
# itself, run in a child process on bytes the benchmark encoded from states it built (never store
# or network data). Anything else that needs pickle must be added here, in review, with a reason.
EXEMPT = {
    "benchmarks/pickle_reference.py": "C pickle as the codec benchmark's reference, on its own bytes",
}


def python_files(dirs: list[str]) -> list[Path]:
    files = []
    for d in dirs:
        base = ROOT / d
        if base.is_dir():
            files += [f for f in base.rglob("*.py") if "_build" not in f.parts]
    return sorted(f for f in files if f.relative_to(ROOT).as_posix() not in EXEMPT)


def imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.append((str(node.args[0].value).split(".")[0], node.lineno))
    return found


def test_no_file_imports_serialisers_or_evaluates_strings():
    problems = []
    files = python_files([*SHIPPED, "tests"])
    assert any(f.name == "server.py" for f in files)
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for module, line in imported_modules(tree):
            if module in BANNED_MODULES:
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: calls {node.func.id}()")
            if isinstance(node, ast.Attribute) and node.attr in ("load", "unsafe_load") and isinstance(node.value, ast.Name) and node.value.id == "yaml":
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: yaml.{node.attr}")
    assert not problems, "\n".join(problems)


def test_nothing_ever_unpickles():
    problems = []
    for path in python_files([*SHIPPED, "tests"]):
        tree = ast.parse(path.read_text(), str(path))
        aliases = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
            if alias.name.split(".")[0] in BANNED_MODULES
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in BANNED_MODULES:
                names = {a.name for a in node.names}
                if names & LOADERS or "*" in names:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports a loader from {node.module}")
            if isinstance(node, ast.Attribute) and node.attr in LOADERS and isinstance(node.value, ast.Name) and node.value.id in aliases:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: calls {node.func.id}()")
    assert not problems, "\n".join(problems)


def test_no_source_text_smuggles_an_import_past_the_checker():
    """Code held in a string (for ``python -c`` or ``exec`` elsewhere) must not hide a serialiser."""
    import re

    pattern = re.compile(r"^\s*(?:import|from)\s+(" + "|".join(sorted(BANNED_MODULES)) + r")\b", re.M)
    problems = []
    for path in python_files([*SHIPPED, "tests"]):
        if path == Path(__file__).resolve():  # this file's own self-test feeds the checker such text
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.search(node.value):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: a string holds an import of a serialiser")
    assert not problems, "\n".join(problems)


def test_the_exemptions_exist_and_say_why():
    for rel, reason in EXEMPT.items():
        assert (ROOT / rel).is_file(), rel
        assert reason and "pickle" in (ROOT / rel).read_text()


def test_the_checker_catches_what_it_should():
    tree = ast.parse("import pickle as pk\nfrom marshal import loads\nx = pk.loads(b'')\neval('1')\n")
    assert ("pickle", 1) in imported_modules(tree) and ("marshal", 2) in imported_modules(tree)


def test_the_state_codec_reads_pickled_state_without_any_unpickler():
    """rdzv_backend.state_codec decodes torch's pickled rendezvous state itself, by an allowlist.

    It may import only what it needs to build plain data: no serialiser, no import machinery, no
    ``sys`` (so no ``sys.modules`` lookups), and it never calls ``__import__``, ``getattr`` on a
    name read from the input, ``globals`` or ``vars``.
    """
    path = ROOT / "rdzv_backend" / "state_codec.py"
    tree = ast.parse(path.read_text(), str(path))
    modules = {module for module, _ in imported_modules(tree)}
    assert modules <= {"__future__", "collections", "datetime", "typing", "api", "state"}, modules
    assert not modules & (BANNED_MODULES | {"importlib", "sys", "builtins", "operator"})
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("__import__", "globals", "vars", "eval", "exec", "compile"), node.lineno
            if node.func.id == "getattr":  # only the encoder's fixed field names
                assert isinstance(node.args[1], ast.Name) and node.args[1].id == "name", node.lineno
