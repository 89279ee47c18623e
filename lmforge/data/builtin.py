"""Built-in offline corpora: text that ships with every Python install, so nothing is downloaded.

* ``python-docs``: the docstrings of the standard library (modules, classes, functions; read with
  ``ast``, nothing is imported) followed by the help topics of ``pydoc_data.topics``. One document
  per docstring / topic.
* ``python-src``: the standard library's ``.py`` files, test suites excluded. One document per file.

Both are deterministic for a given Python version: files are walked in sorted order. The exact
sizes depend on the interpreter (≈2.3 MB and ≈12 MB on CPython 3.11).
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import InputError

BUILTIN_CORPORA = ("python-docs", "python-src")

# Directory names that hold test suites (``test``, ``idle_test``, …) or third-party code.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One unit of text. ``name`` is stable across runs and is what the train/val split hashes.
    ``replaced_bytes`` counts the undecodable bytes that became U+FFFD when it was read."""

    name: str
    text: str
    replaced_bytes: int = 0


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_source(path: Path) -> str | None:
    # A handful of stdlib files are deliberately malformed or not UTF-8 (encoding test data);
    # they are skipped rather than decoded wrongly.
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def parse_python(source: str) -> ast.Module | None:
    """``source`` parsed (its invalid-escape warnings silenced), or None if it does not parse
    (a few stdlib files are deliberately broken test data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        try:
            return ast.parse(source)
        except SyntaxError:
            return None


def _docstrings(source: str) -> Iterator[str]:
    tree = parse_python(source)
    if tree is None:
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                yield doc


def python_src() -> Iterator[Document]:
    root = stdlib_dir()
    for path in _stdlib_files():
        text = _read_source(path)
        if text and text.strip():
            yield Document(f"python-src/{path.relative_to(root).as_posix()}", text)


def python_docs() -> Iterator[Document]:
    root = stdlib_dir()
    for path in _stdlib_files():
        text = _read_source(path)
        if not text:
            continue
        rel = path.relative_to(root).as_posix()
        for i, doc in enumerate(_docstrings(text)):
            yield Document(f"python-docs/{rel}#{i}", doc)
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(f"python-docs/topics/{key}", topics[key])


def builtin_documents(name: str) -> Iterator[Document]:
    """Documents of the built-in corpus ``name`` (one of :data:`BUILTIN_CORPORA`)."""
    if name == "python-docs":
        return python_docs()
    if name == "python-src":
        return python_src()
    known = ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA)
    raise InputError(f"unknown built-in corpus 'builtin:{name}'; expected one of {known}")


def hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (SHA-256), the same in every run and process."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def is_validation(name: str, fraction: float) -> bool:
    """Deterministic train/validation split: by the hash of the document's name."""
    return hash_fraction(name) < fraction
