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

A ``.gz`` file is read decompressed (``.jsonl.gz`` as JSONL, any other as text). Text must be
UTF-8. ``utf8_errors="replace"`` (default) turns each undecodable byte into U+FFFD and counts it on
the document; ``"strict"`` raises :class:`InputError` naming the file and byte offset.

A JSONL line that is not JSON, or a record or row without a string ``field``, is skipped and
counted; each file's skips are logged once, as one line, when the file is done (``strict=True``
raises at the first instead, naming file and line). A file with records but not one usable raises,
naming the file, the field and the fields found; a SPEC that yields no document, or a file that
cannot be read (no permission, a truncated gzip stream), raises naming it.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import re
import socket
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lmforge.data.builtin import BUILTIN_CORPORA, Document, builtin_documents
from lmforge.data.code_source import code_documents
from lmforge.data.reading import ReadOptions, Utf8Errors, decode_utf8
from lmforge.data.web_sources import read_web_file, web_kind
from lmforge.errors import InputError

__all__ = ["ReadOptions", "Utf8Errors", "decode_utf8", "documents", "parse_spec", "partitions",
           "read_documents", "texts"]

log = logging.getLogger(__name__)

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


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Errors met while reading ``path`` (an OSError, a broken gzip stream) as an InputError
    naming it."""
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # BadGzipFile is an OSError: first
        raise InputError(f"{path}: truncated or not gzip data ({e}); re-download or recompress "
                         "it") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


class _Records:
    """The text ``field`` of each record of one file (or dataset). Unusable records are skipped
    and counted, and :meth:`close` reports them in one line (``strict`` raises at the first)."""

    def __init__(self, where: str, opts: ReadOptions, fields: Iterable[str] = ()) -> None:
        self.where, self.opts = where, opts
        self.fields = set(fields)  # field names met, to say what --field could be
        self.used = 0
        self.skipped: dict[str, list] = {}  # what was wrong → [records, where first]
        self.replaced_bytes = 0  # invalid UTF-8 replaced with U+FFFD
        self.replaced_at = ""  # the first record that had some

    def skip(self, issue: str, what: str, at: str, why: str = "") -> None:
        """Skip the record ``at`` (``line N``, ``row N``); ``issue`` is its kind in the run
        report, ``why`` the detail."""
        why = f" ({why})" if why else ""
        if self.opts.strict:
            raise InputError(f"{self.where}: {at}: {what}{why}")
        self.opts.issues[issue] += 1
        self.skipped.setdefault(what, [0, at + why])[0] += 1

    def decode(self, raw: bytes, at: str) -> tuple[str, int]:
        text, bad = decode_utf8(raw, f"{self.where}: {at}", self.opts.utf8_errors, warn=False)
        if bad and not self.replaced_bytes:
            self.replaced_at = at
        self.replaced_bytes += bad
        return text, bad

    def text(self, row: Any, at: str) -> str | None:
        """The text field of a JSON object / table row, or None (skipped) when it is unusable."""
        field = self.opts.field
        if not isinstance(row, dict):
            self.skip("missing_field", "not a JSON object", at, type(row).__name__)
            return None
        self.fields.update(row)
        if field not in row:
            self.skip("missing_field", f"without field {field!r}", at)
        elif not isinstance(row[field], str):
            self.skip("missing_field", f"with a non-string {field!r}", at,
                      type(row[field]).__name__)
        else:
            self.used += 1
            return row[field]
        return None

    def close(self) -> None:
        """Report what was skipped or replaced: one warning, or an error when no record was
        usable."""
        skipped = sum(n for n, _ in self.skipped.values())
        notes = [f"{n} {what}, first at {at};" for what, (n, at) in self.skipped.items()]
        if skipped and not self.used:
            found = ", ".join(sorted(map(str, self.fields))) or "none"
            raise InputError(f"{self.where}: no record has a string field {self.opts.field!r} "
                             f"({' '.join(notes)} fields found: {found}); pass --field NAME")
        if skipped:
            notes.insert(0, f"skipped {skipped} of {skipped + self.used} records:")
        if self.replaced_bytes:
            notes.append(f"replaced {self.replaced_bytes} invalid UTF-8 byte(s) with U+FFFD, "
                         f"first at {self.replaced_at};")
        if notes:
            log.warning("%s: %s", self.where, " ".join(notes).removesuffix(";"))


def _jsonl(path: Path, opts: ReadOptions) -> Iterator[Document]:
    records = _Records(str(path), opts)
    with _reading(path), _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            at = f"line {lineno}"
            line, bad = records.decode(raw, at)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                records.skip("bad_json", "not JSON", at, e.msg)
                continue
            text = records.text(row, at)
            if text is not None:
                yield Document(f"{path}:{lineno}", text, bad)
    records.close()


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
    records = _Records(str(path), opts, pf.schema_arrow.names)
    row = 0
    with _reading(path):
        for batch in pf.iter_batches(columns=[opts.field]):
            for value in batch.column(0).to_pylist():
                text = records.text({opts.field: value}, f"row {row}")
                if text is not None:
                    yield Document(f"{path}#{row}", text)
                row += 1
    records.close()


def _text_file(path: Path, opts: ReadOptions) -> Iterator[Document]:
    with _reading(path), _open(path) as f:
        data = f.read()
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
    require_hub(spec)
    try:
        import datasets
    except ImportError:
        raise InputError(f"{spec}: Hugging Face datasets need the `datasets` package "
                         "(pip install datasets)") from None
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    records = _Records(spec, opts)
    for i, row in enumerate(stream):
        text = records.text(row, f"row {i}")
        if text is not None:
            yield Document(f"{spec}#{i}", text)
    records.close()


def require_hub(spec: str, host: str = "huggingface.co", timeout: float = 3.0) -> None:
    """Fail at once, with the reason, where the hub cannot be reached (instead of long retries)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"{spec}: cannot reach {host} ({e}); hf: sources stream over the "
                         "network. Offline, download the dataset's Parquet/JSONL files elsewhere "
                         "and pass them as paths with --field") from None


def partitions(spec: str) -> list[str]:
    """The units of parallel work of one SPEC (without ``@WEIGHT``), in reading order: each file
    of a path, directory or glob, or a ``builtin:``, ``hf:`` or ``code:`` SPEC whole. Reading them
    one after another gives the documents of ``spec``."""
    if spec.startswith(("builtin:", "hf:", "code:")):
        return [spec]
    return [str(path) for path in _files(spec)]


def read_documents(spec: str, opts: ReadOptions) -> Iterator[Document]:
    """Documents of one SPEC or partition, in a deterministic order (none is not an error)."""
    if spec.startswith("builtin:"):
        yield from builtin_documents(spec.removeprefix("builtin:"))
        return
    if spec.startswith("hf:"):
        yield from _hf_dataset(spec, opts)
        return
    if spec.startswith("code:"):
        yield from code_documents(spec, opts)
        return
    for path in _files(spec):
        name = path.name.lower()
        if name.removesuffix(".gz").endswith((".jsonl", ".ndjson")):
            yield from _jsonl(path, opts)
        elif name.endswith(".parquet"):
            yield from _parquet(path, opts)
        elif web_kind(path):  # WARC, WET, Wikipedia XML
            yield from read_web_file(path, opts)
        else:
            yield from _text_file(path, opts)


def documents(spec: str, opts: ReadOptions | None = None) -> Iterator[Document]:
    """Documents of one input SPEC (without ``@WEIGHT``), in a deterministic order; raises when
    the SPEC yields none."""
    n = 0
    for doc in read_documents(spec, opts or ReadOptions()):
        n += 1
        yield doc
    if n == 0:
        raise InputError(f"{spec}: yields no document (empty file?)")


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

