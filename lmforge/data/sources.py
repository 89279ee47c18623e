"""Resolve input SPECs into documents: a file, a directory, a glob, or ``builtin:NAME``.

A file is one document. A directory contributes its files recursively, in sorted order; a glob
its matches, sorted. Text must be UTF-8: with ``errors="replace"`` (the default) undecodable bytes
become U+FFFD and a warning names the file, the first bad byte offset and how many bytes were
replaced; with ``errors="strict"`` the same facts raise :class:`InputError`.
"""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from lmforge.data.builtin import BUILTIN_CORPORA, Document, builtin_documents
from lmforge.errors import InputError

log = logging.getLogger(__name__)

Utf8Errors = Literal["replace", "strict"]


_ESCAPED = re.compile("[\udc80-\udcff]")  # how surrogateescape spells an undecodable byte


def decode_utf8(data: bytes, where: str, errors: Utf8Errors = "replace") -> str:
    """Decode ``data``; report (or refuse) invalid UTF-8 naming ``where`` and the byte offset.

    With ``errors="replace"`` each undecodable byte becomes one U+FFFD.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise InputError(f"{where}: not valid UTF-8 at byte {e.start} "
                             f"({data[e.start:e.start + 4]!r}…); fix the file or use "
                             "errors='replace'") from None
        first = e.start
    text, bad = _ESCAPED.subn("\ufffd", data.decode("utf-8", errors="surrogateescape"))
    log.warning("%s: invalid UTF-8 from byte %d; replaced %d byte(s) with U+FFFD",
                where, first, bad)
    return text


def _files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise InputError(f"{spec}: directory holds no files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"{spec}: glob matches no files")
        return files
    raise InputError(f"{spec}: no such file or directory (expected a path, a glob or "
                     f"builtin:NAME with NAME in {', '.join(BUILTIN_CORPORA)})")


def documents(spec: str, errors: Utf8Errors = "replace") -> Iterator[Document]:
    """Documents of one input SPEC, in a deterministic order."""
    if spec.startswith("builtin:"):
        yield from builtin_documents(spec.removeprefix("builtin:"))
        return
    for path in _files(spec):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
        yield Document(str(path), decode_utf8(data, str(path), errors))


def texts(specs: Iterable[str], errors: Utf8Errors = "replace") -> Iterator[str]:
    """The text of every non-empty document of ``specs``; raises if there is none at all."""
    n = 0
    for spec in specs:
        for doc in documents(spec, errors):
            if doc.text:
                n += 1
                yield doc.text
    if n == 0:
        raise InputError(f"input is empty: {' '.join(specs)} gave no non-empty document")
