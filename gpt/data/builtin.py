"""The built-in default corpus: the English documentation that ships with every Python install.

Docstrings of the standard library (one document per module) plus `pydoc_data.topics` (one document per help
topic): ~2 MB of English prose about programming, PSF-licensed, present without network or extra packages.

Pure-Python modules are *parsed* with `ast`, never imported, so nothing runs (no `antigravity` browser, no `this`
printout, no tkinter window, no per-machine state in the text). Only C modules (no .py source) are imported to read
their docstrings; a small deny-list skips ones whose import touches the terminal, and any import that fails is
skipped and counted. Order is sorted by module name, so the same Python version always gives the same documents.
Test suites, IDLE, demos and site-packages are excluded (distributions ship them differently).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SOURCE_PREFIX = "builtin:python-docs"
# Directories whose contents differ between distributions/builds, or are test data rather than documentation.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo", "__pycache__", "_bundled"}
)
# C modules whose import has visible side effects (terminal escape codes) or is not stable across machines.
DENIED_C_MODULES = frozenset({"readline", "_curses", "_curses_panel", "curses", "_tkinter", "antigravity", "this"})


@dataclass
class BuiltinStats:
    modules: int = 0
    c_modules: int = 0
    topics: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (parse_failed, import_failed, denied)
    failed_modules: list[str] = field(default_factory=list)


def stdlib_dir() -> Path:
    """The standard library of the running interpreter (os.py lives there, also inside a venv)."""
    return Path(os.__file__).resolve().parent


def _python_modules(root: Path) -> list[tuple[str, Path]]:
    """(dotted name, path) of the stdlib's .py modules, sorted by name; only top-level names CPython lists."""
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or parts[0] not in sys.stdlib_module_names or "-" in "".join(parts):
            continue
        found.append((".".join(parts), path))
    return sorted(found)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # unparse is robust, but a doc must never fail because of a signature
        return "(...)"


def _walk_docs(body: list[ast.stmt], prefix: str, out: list[str]) -> None:
    for node in body:
        if isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(f"class {prefix}{node.name}" + (f"({bases})" if bases else "") + f"\n{doc}")
            _walk_docs(node.body, f"{prefix}{node.name}.", out)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(f"{prefix}{node.name}{_signature(node)}\n{doc}")


def python_module_doc(name: str, source: str) -> str:
    """All docstrings of one module's source, in source order, each headed by its qualified name."""
    tree = ast.parse(source)
    out: list[str] = []
    module_doc = ast.get_docstring(tree, clean=True)
    if module_doc:
        out.append(f"Module {name}\n{module_doc}")
    _walk_docs(tree.body, f"{name}.", out)
    return "\n\n".join(out)


def _own_docs(obj: object, qualname: str, out: list[str], depth: int = 0) -> None:
    doc = inspect.getdoc(obj) if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if isinstance(doc, str) and doc.strip():
        out.append(f"{'class ' if isinstance(obj, type) else ''}{qualname}\n{inspect.cleandoc(doc)}")
    if isinstance(obj, type) and depth == 0:
        for attr, member in sorted(vars(obj).items()):
            generic = getattr(object, attr, None)
            if callable(member) and getattr(member, "__doc__", None) != getattr(generic, "__doc__", 0):
                _own_docs(member, f"{qualname}.{attr}", out, depth + 1)


def c_module_doc(name: str) -> str:
    module = importlib.import_module(name)
    out: list[str] = []
    if module.__doc__:
        out.append(f"Module {name}\n{inspect.cleandoc(module.__doc__)}")
    for attr, obj in sorted(vars(module).items()):
        owner = getattr(obj, "__module__", None)
        if (isinstance(obj, type) or callable(obj)) and owner in (name, None):
            _own_docs(obj, f"{name}.{attr}", out)
    return "\n\n".join(out)


def _c_module_names(python_names: set[str]) -> list[str]:
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name in python_names:
            continue
        spec = importlib.util.find_spec(name) if name not in sys.modules else sys.modules[name].__spec__
        origin = getattr(spec, "origin", None) or ""
        if spec is not None and (origin == "built-in" or origin.endswith((".so", ".pyd"))):
            names.append(name)
    return names


def iter_builtin_documents(stats: BuiltinStats | None = None) -> Iterator[tuple[str, str]]:
    """Yield (source, text) for every stdlib module with docs, then every pydoc help topic, in a fixed order."""
    stats = stats if stats is not None else BuiltinStats()
    root = stdlib_dir()
    modules = _python_modules(root)
    for name, path in modules:
        try:
            text = python_module_doc(name, path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            stats.skipped["parse_failed"] += 1
            stats.failed_modules.append(name)
            continue
        if text:
            stats.modules += 1
            yield f"{SOURCE_PREFIX}/{name}", text
    for name in _c_module_names({n.split(".")[0] for n, _ in modules}):
        if name in DENIED_C_MODULES:
            stats.skipped["denied"] += 1
            continue
        try:
            text = c_module_doc(name)
        except Exception:  # an optional C module whose shared library is missing on this machine
            stats.skipped["import_failed"] += 1
            stats.failed_modules.append(name)
            continue
        if text:
            stats.c_modules += 1
            yield f"{SOURCE_PREFIX}/{name}", text
    from pydoc_data.topics import topics

    for key in sorted(topics):
        stats.topics += 1
        yield f"{SOURCE_PREFIX}/topics/{key}", topics[key]
