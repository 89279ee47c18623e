"""Resolve input SPECs into documents.

A SPEC is one of

* a text file, a directory (its files, recursively, sorted) or a glob (matches, sorted): one
  document per file, or several when a ``separator`` (e.g. ``<|endoftext|>``, a blank line) is
  set; ``.jsonl`` / ``.jsonl.gz`` files give one document per line (the ``field`` of each JSON
  object) and ``.parquet`` files one per row (the ``field`` column);
* ``builtin:NAME`` — the built-in offline corpora (:mod:`lmforge.data.builtin`);
* ``hf:NAME[:CONFIG]:SPLIT`` — a Hugging Face dataset, streamed (needs ``datasets`` and the
  network).

Any SPEC may end in ``@WEIGHT`` (e.g. ``builtin:python-docs@2``) to mix sources: the pipeline
repeats its training documents ``WEIGHT`` times (a fraction keeps a hash-chosen share).

Text must be UTF-8. ``utf8_errors="replace"`` (default) turns each undecodable byte into U+FFFD and
counts it on the document; ``"strict"`` raises :class:`InputError` naming the file and byte offset.
A JSONL line that is not JSON or lacks the field is skipped and counted (file and line number are
logged), or raises with ``strict=True``.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import logging
import re
import socket
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.data.builtin import BUILTIN_CORPORA, Document, builtin_documents
from lmforge.errors import InputError

log = logging.getLogger(__name__)

Utf8Errors = Literal["replace", "strict"]

_ESCAPED = re.compile("[\udc80-\udcff]")  # how surrogateescape spells an undecodable byte


@dataclass
class ReadOptions:
    """How SPECs are read (shared by every source kind)."""

    field: str = "text"
    separator: str | None = None
    utf8_errors: Utf8Errors = "replace"
    strict: bool = False
    # Problems met while reading, for the run report: kind → count.
    issues: Counter = dataclasses.field(default_factory=Counter)


def decode_utf8(data: bytes, where: str, errors: Utf8Errors = "replace") -> tuple[str, int]:
    """``(text, replaced_bytes)``; with ``errors="replace"`` each bad byte becomes one U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise InputError(f"{where}: not valid UTF-8 at byte {e.start} "
                             f"({data[e.start:e.start + 4]!r}…); fix the file or use "
                             "utf8_errors='replace'") from None
        first = e.start
    text, bad = _ESCAPED.subn("\ufffd", data.decode("utf-8", errors="surrogateescape"))
    log.warning("%s: invalid UTF-8 from byte %d; replaced %d byte(s) with U+FFFD",
                where, first, bad)
    return text, bad


def parse_spec(spec: str) -> tuple[str, float]:
    """Split ``SPEC@WEIGHT`` into the SPEC and its weight (default 1)."""
    base, at, weight = spec.rpartition("@")
    if not at or not re.fullmatch(r"\d+(\.\d+)?", weight):
        return spec, 1.0
    if float(weight) <= 0:
        raise InputError(f"{spec}: weight must be positive")
    return base, float(weight)


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
    raise InputError(f"{spec}: no such file or directory (expected a path, a glob, "
                     f"hf:NAME[:CONFIG]:SPLIT or builtin:NAME with NAME in "
                     f"{', '.join(BUILTIN_CORPORA)})")


def _field_text(row: Any, opts: ReadOptions, where: str) -> str | None:
    """The text field of a JSON object / table row, or None (counted) when it is unusable."""
    if not isinstance(row, dict) or opts.field not in row:
        problem = f"has no field {opts.field!r}"
    elif not isinstance(row[opts.field], str):
        problem = f"field {opts.field!r} is {type(row[opts.field]).__name__}, not a string"
    else:
        return row[opts.field]
    if opts.strict:
        raise InputError(f"{where}: {problem}")
    log.warning("%s: %s; skipped", where, problem)
    opts.issues["missing_field"] += 1
    return None


def _jsonl(path: Path, opts: ReadOptions) -> Iterator[Document]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            line, bad = decode_utf8(raw, where, opts.utf8_errors)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if opts.strict:
                    raise InputError(f"{where}: not JSON ({e.msg})") from None
                log.warning("%s: not JSON (%s); skipped", where, e.msg)
                opts.issues["bad_json"] += 1
                continue
            text = _field_text(row, opts, where)
            if text is not None:
                yield Document(where, text, bad)


def _parquet(path: Path, opts: ReadOptions) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a broken file
        raise InputError(f"{path}: unreadable Parquet file ({e})") from None
    if opts.field not in pf.schema_arrow.names:
        raise InputError(f"{path}: no column {opts.field!r} (columns: "
                         f"{', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[opts.field]):
        for value in batch.column(0).to_pylist():
            text = _field_text({opts.field: value}, opts, f"{path}: row {row}")
            if text is not None:
                yield Document(f"{path}#{row}", text)
            row += 1


def _text_file(path: Path, opts: ReadOptions) -> Iterator[Document]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    text, bad = decode_utf8(data, str(path), opts.utf8_errors)
    if opts.separator is None:
        yield Document(str(path), text, bad)
        return
    for i, part in enumerate(text.split(opts.separator)):
        yield Document(f"{path}#{i}", part, bad if i == 0 else 0)


def _hf_dataset(spec: str, opts: ReadOptions) -> Iterator[Document]:
    parts = spec.removeprefix("hf:").split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(f"{spec}: expected hf:NAME[:CONFIG]:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    _require_hub(spec)
    try:
        import datasets
    except ImportError:
        raise InputError(f"{spec}: Hugging Face datasets need the `datasets` package "
                         "(pip install datasets)") from None
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, row in enumerate(stream):
        text = _field_text(row, opts, f"{spec} row {i}")
        if text is not None:
            yield Document(f"{spec}#{i}", text)


def _require_hub(spec: str, host: str = "huggingface.co", timeout: float = 3.0) -> None:
    """Fail at once, with the reason, where the hub cannot be reached (instead of long retries)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"{spec}: cannot reach {host} ({e}); hf: sources stream over the "
                         "network. Offline, download the dataset's Parquet/JSONL files elsewhere "
                         "and pass them as paths with --field") from None


def documents(spec: str, opts: ReadOptions | None = None) -> Iterator[Document]:
    """Documents of one input SPEC (without ``@WEIGHT``), in a deterministic order."""
    opts = opts or ReadOptions()
    if spec.startswith("builtin:"):
        yield from builtin_documents(spec.removeprefix("builtin:"))
        return
    if spec.startswith("hf:"):
        yield from _hf_dataset(spec, opts)
        return
    for path in _files(spec):
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            yield from _jsonl(path, opts)
        elif name.endswith(".parquet"):
            yield from _parquet(path, opts)
        else:
            yield from _text_file(path, opts)


def texts(specs: Iterable[str], opts: ReadOptions | None = None) -> Iterator[str]:
    """The text of every non-empty document of ``specs``; raises if there is none at all."""
    n = 0
    for spec in specs:
        for doc in documents(parse_spec(spec)[0], opts):
            if doc.text:
                n += 1
                yield doc.text
    if n == 0:
        raise InputError(f"input is empty: {' '.join(specs)} gave no non-empty document")

