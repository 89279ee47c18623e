"""Built-in offline fine-tuning data: questions about the standard library, answered by its
docstrings, so a laptop chain (pretrain → SFT → DPO) needs no download.

* :func:`docs_items` — every public module-level function and class, and every public method of
  such a class, in the non-test, non-private stdlib modules (the files of
  :func:`~lmforge.data.builtin.python_src`, read with ``ast``, nothing imported) whose docstring
  opens with a plain one-paragraph summary of 20–400 characters.
* :func:`docs_conversations` — SFT: [user: "What does `textwrap.dedent` do?", assistant: summary].
* :func:`docs_preferences` — DPO: the same question; chosen = its summary, rejected = the summary
  of another item of the same split (of the same kind where possible), so the model must know
  which summary belongs to which name.

Splits are by the item's name (:func:`~lmforge.data.builtin.is_validation`): a held-out function
never appears in train. Everything is deterministic for a given Python version. Sizes are bounded
by the stdlib itself: on CPython 3.11, 5,230 items (1,219 functions, 889 classes, 3,122 methods;
≈4,700 train / ≈540 val at ``val_fraction=0.1``), built in ≈2 s once per process (cached).
Subsample the returned lists for a quicker run.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from lmforge.data.builtin import hash_fraction, is_validation, parse_python, python_src
from lmforge.data.conversations import Conversation, PreferencePair
from lmforge.errors import ConfigError
from lmforge.tokenizer.chat import Message

Kind = Literal["function", "class", "method"]
Split = Literal["train", "val"]

MIN_SUMMARY, MAX_SUMMARY = 20, 400  # characters: shorter is not a summary, longer not one line

# A first line like "dedent(text) -> str" or "S.split(sep=None)": a C-style signature, not prose.
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
# Markup that marks a paragraph as an example or a directive, not prose.
_NOT_PROSE = re.compile(r">>>|^\.\. ", re.MULTILINE)
# reST inline markup, rewritten as plain backquotes: ":class:`Mock`" and "``True``" → "`Mock`".
_ROLE = re.compile(r":\w+:`")

# Question templates per kind; the hash of the name picks one.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "function": ("What does `{}` do?", "Explain the Python function `{}`.",
                 "Briefly describe `{}`.", "What is the function `{}` used for?"),
    "class": ("What is `{}` for?", "Explain the Python class `{}`.",
              "Briefly describe `{}`.", "What does the class `{}` represent?"),
    "method": ("What does `{}` do?", "Explain the Python method `{}`.",
               "Briefly describe `{}`.", "What is the method `{}` used for?"),
}


@dataclass(frozen=True)
class DocItem:
    """One documented stdlib object and the summary its docstring opens with."""

    name: str  # dotted, e.g. "textwrap.dedent" or "collections.OrderedDict.move_to_end"
    kind: Kind
    summary: str  # the docstring's first paragraph on one line, MIN_SUMMARY–MAX_SUMMARY chars


def summary_of(doc: str | None) -> str | None:
    """The first paragraph of ``doc`` on one line, or ``None`` if it is not a plain summary.

    A leading paragraph of signature lines ("name(args) -> result") is passed over once."""
    if not doc:
        return None
    paragraphs = [p for p in re.split(r"\n\s*\n", inspect.cleandoc(doc).strip()) if p.strip()]
    if paragraphs and all(_SIGNATURE.match(line.strip()) for line in paragraphs[0].splitlines()):
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return None
    lines = paragraphs[0].splitlines()
    text = " ".join(_ROLE.sub("`", paragraphs[0]).replace("``", "`").split())
    if not MIN_SUMMARY <= len(text) <= MAX_SUMMARY or _NOT_PROSE.search(paragraphs[0]):
        return None
    if _SIGNATURE.match(lines[0].strip()):
        return None  # a signature run into prose: "D.get(k[,d]) -> D[k] if k in D, else d."
    if any(line.rstrip().endswith(":") or line[:1].isspace() for line in lines):
        return None  # a lead-in to a list or an example, or an indented block
    return text


def _module_name(rel_path: str) -> str:
    parts = rel_path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _definitions(body: list[ast.stmt]) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef
                                                   | ast.ClassDef]:
    """The defs of a module or class body in source order, those under ``if``/``try`` included
    (platform and fallback variants: the first of a name wins)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node
        elif isinstance(node, ast.If):
            yield from _definitions(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _definitions(node.body + node.orelse + node.finalbody
                                    + [s for h in node.handlers for s in h.body])


def _module_items(module: str, source: str) -> Iterator[DocItem]:
    tree = parse_python(source)
    if tree is None:
        return
    for node in _definitions(tree.body):
        if node.name.startswith("_"):
            continue
        name = f"{module}.{node.name}"
        is_class = isinstance(node, ast.ClassDef)
        summary = summary_of(ast.get_docstring(node, clean=False))
        if summary:
            yield DocItem(name, "class" if is_class else "function", summary)
        if not is_class:
            continue
        for method in _definitions(node.body):
            if isinstance(method, ast.ClassDef) or method.name.startswith("_"):
                continue
            summary = summary_of(ast.get_docstring(method, clean=False))
            if summary:
                yield DocItem(f"{name}.{method.name}", "method", summary)


@functools.cache
def _all_items() -> tuple[DocItem, ...]:
    items: dict[str, DocItem] = {}
    for document in python_src():
        module = _module_name(document.name.removeprefix("python-src/"))
        if any(part.startswith("_") for part in module.split(".")):
            continue  # private modules (_pydecimal, __main__, …) are implementation details
        for item in _module_items(module, document.text):
            items.setdefault(item.name, item)
    return tuple(items.values())


def docs_items() -> list[DocItem]:
    """Every documented public stdlib function, class and method: sorted file walk, then source
    order; names are unique (the first definition of a name wins)."""
    return list(_all_items())


def question(item: DocItem) -> str:
    """The user's question about ``item``: one of its kind's templates, picked by its name."""
    templates = _TEMPLATES[item.kind]
    return templates[int(hash_fraction(f"question:{item.name}") * len(templates))].format(
        item.name)


def _split_items(split: Split, val_fraction: float) -> list[DocItem]:
    if split not in ("train", "val"):
        raise ConfigError(f"split: expected 'train' or 'val', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction: expected [0, 1), got {val_fraction}")
    held_out = split == "val"
    return [it for it in _all_items() if is_validation(it.name, val_fraction) == held_out]


def docs_conversations(split: Split, val_fraction: float = 0.1) -> list[Conversation]:
    """SFT conversations of ``split``: [user: a question about an item, assistant: its summary]."""
    return [[Message("user", question(it)), Message("assistant", it.summary)]
            for it in _split_items(split, val_fraction)]


def _other_summary(item: DocItem, pool: list[DocItem]) -> str | None:
    # Start at a hash-picked position and take the first item with a different summary.
    start = int(hash_fraction(f"rejected:{item.name}") * len(pool))
    for k in range(len(pool)):
        other = pool[(start + k) % len(pool)]
        if other.summary != item.summary:
            return other.summary
    return None


def docs_preferences(split: Split, val_fraction: float = 0.1) -> list[PreferencePair]:
    """DPO pairs of ``split``: the question of :func:`docs_conversations`, chosen = the item's
    summary, rejected = the summary of another item of the split, of the same kind if one has a
    different summary. An item with no other summary in its split (a tiny split) is left out."""
    items = _split_items(split, val_fraction)
    by_kind: dict[str, list[DocItem]] = {}
    for it in items:
        by_kind.setdefault(it.kind, []).append(it)
    pairs = []
    for it in items:
        rejected = _other_summary(it, by_kind[it.kind]) or _other_summary(it, items)
        if rejected is not None:
            pairs.append(PreferencePair((Message("user", question(it)),), it.summary, rejected))
    return pairs
