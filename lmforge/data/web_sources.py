"""Web-scale inputs: Common Crawl archives (WARC, WET) and Wikipedia XML dumps.

* **WARC** (``*.warc``, ``*.warc.gz``): each ``response`` record whose HTTP ``Content-Type`` is
  HTML becomes one document, the page's main text as extracted by ``trafilatura`` (navigation,
  footers and other boilerplate left out). Records with nothing to extract are skipped and counted
  (``empty_extraction``); requests, metadata and non-HTML responses are passed over.
* **WET** (``*.wet``, ``*.wet.gz``, ``*.warc.wet.gz``): each ``conversion`` record is one
  document, its text as Common Crawl extracted it.
* **Wikipedia** (``*.xml.bz2``, or ``*.xml`` that is a MediaWiki export): each article (namespace
  0, not a redirect) is one document, its wikitext reduced to plain text with ``mwparserfromhell``
  (templates, references, file and category links dropped). Articles that strip to nothing are
  skipped and counted (``empty_article``).

Documents are named by what is stable in the archive: the ``WARC-Record-ID`` for WARC and WET
records (the URL is on :class:`WebPage`, from :func:`web_pages`), ``wikipedia/TITLE`` for
articles. Every file is streamed, one record or page in memory at a time. The parsers are the
``scale`` extra (``pip install 'lmforge[scale]'``), imported only when such a file is read.

A damaged file (a truncated gzip or bz2 stream, data that is not WARC, malformed XML) stops the
run with one :class:`InputError` naming the file and what was expected.
"""

from __future__ import annotations

import bz2
import logging
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal
from xml.etree import ElementTree

from lmforge.data.builtin import Document
from lmforge.data.reading import ReadOptions, decode_utf8
from lmforge.errors import InputError

log = logging.getLogger(__name__)

WebKind = Literal["warc", "wet"]

_INSTALL = "pip install 'lmforge[scale]'"
# Wikilink namespaces that are not running text. Interlanguage links ([[de:…]]) are rare in
# current dumps (moved to Wikidata) and are left to strip_code.
_DROP_LINKS = re.compile(r"\s*(file|image|category)\s*:", re.IGNORECASE)
# Tags whose contents are not article prose; mwparserfromhell keeps <ref> text by default.
_DROP_TAGS = {"ref", "references", "gallery"}
_BLANK_RUNS = re.compile(r"\n{3,}")
_LINE_EDGE_SPACE = re.compile(r"[ \t]*\n[ \t]*")


@dataclass(frozen=True)
class WebPage:
    """One text record of a WARC or WET file."""

    record_id: str  # WARC-Record-ID, e.g. "<urn:uuid:…>": stable, unique within the crawl
    url: str  # WARC-Target-URI ("" when the record has none)
    text: str
    replaced_bytes: int = 0  # invalid UTF-8 bytes turned into U+FFFD (WET only)


def web_kind(path: Path) -> WebKind | Literal["wikipedia"] | None:
    """Which reader of this module takes ``path``, by its name (``None``: none of them). A plain
    ``.xml`` file is Wikipedia only when it starts like a MediaWiki export."""
    name = path.name.lower()
    if name.endswith((".wet", ".wet.gz")):
        return "wet"
    if name.endswith((".warc", ".warc.gz")):
        return "wet" if "wet" in name else "warc"
    if name.endswith(".xml.bz2"):
        return "wikipedia"
    if name.endswith(".xml") and _looks_like_mediawiki(path):
        return "wikipedia"
    return None


def read_web_file(path: Path, opts: ReadOptions) -> Iterator[Document]:
    """Documents of a WARC, WET or Wikipedia file (see :func:`web_kind`)."""
    kind = web_kind(path)
    if kind == "wikipedia":
        yield from wikipedia_documents(path)
    elif kind is not None:
        for page in web_pages(path, kind, opts):
            yield Document(page.record_id, page.text, page.replaced_bytes)
    else:
        raise InputError(f"{path}: not a WARC, WET or MediaWiki XML file")


# --- Common Crawl -------------------------------------------------------------------------------

def web_pages(path: Path, kind: WebKind, opts: ReadOptions | None = None) -> Iterator[WebPage]:
    """The text records of a WARC (``kind="warc"``: extracted HTML responses) or WET
    (``kind="wet"``: conversion records) file, in file order."""
    opts = opts or ReadOptions()
    archive_iterator, load_failed = _warcio(path)
    extract = _extractor(path) if kind == "warc" else None
    where = str(path)
    empty = replaced = 0
    with _damaged(path, f"a {kind.upper()} file (gzip per record, or uncompressed)",
                  load_failed), open(path, "rb") as f:
        record = None
        for record in archive_iterator(f):
            record_id = record.rec_headers.get_header("WARC-Record-ID") or ""
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            if kind == "wet":
                if record.rec_type != "conversion":
                    continue
                text, bad = decode_utf8(record.content_stream().read(), f"{where}: {record_id}",
                                        opts.utf8_errors, warn=False)
                replaced += bad
                yield WebPage(record_id, url, text, bad)
                continue
            if record.rec_type != "response" or not _is_html(record):
                continue
            text = extract(record.content_stream().read())
            if not text:
                empty += 1
                continue
            yield WebPage(record_id, url, text)
        # warcio ends quietly at a cut-off gzip member: the last record is then short of its
        # Content-Length (its LimitReader has bytes left).
        if record is not None and getattr(record.raw_stream, "limit", 0) > 0:
            raise EOFError(f"the last record ends {record.raw_stream.limit} bytes short of its "
                           "Content-Length")
    if empty:
        opts.issues["empty_extraction"] += empty
        log.info("%s: skipped %d HTML response(s) with no main text", where, empty)
    if replaced:
        log.warning("%s: replaced %d invalid UTF-8 byte(s) with U+FFFD", where, replaced)


def _is_html(record: Any) -> bool:
    headers = record.http_headers
    content_type = (headers.get_header("Content-Type") or "") if headers else ""
    return "html" in content_type.split(";")[0].lower()  # text/html, application/xhtml+xml


def _warcio(path: Path) -> tuple[Any, type[Exception]]:
    try:
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed
    except ImportError:
        raise InputError(f"{path}: reading WARC/WET files needs warcio ({_INSTALL})") from None
    return ArchiveIterator, ArchiveLoadFailed


def _extractor(path: Path) -> Any:
    """``html bytes → main text or None``. trafilatura: maintained, best main-text F1 in its own
    and ScrapingHub's benchmarks, and the extractor behind FineWeb."""
    try:
        import trafilatura
    except ImportError:
        raise InputError(f"{path}: extracting text from WARC files needs trafilatura "
                         f"({_INSTALL})") from None

    def extract(html: bytes) -> str | None:
        # Comments sections are boilerplate for pretraining; tables are kept (FineWeb's setting).
        return trafilatura.extract(html, include_comments=False, include_tables=True,
                                   deduplicate=False, favor_precision=True)
    return extract


# --- Wikipedia ----------------------------------------------------------------------------------

def wikipedia_documents(path: Path) -> Iterator[Document]:
    """The articles of a MediaWiki XML export (``.xml`` or ``.xml.bz2``) as plain text, named
    ``wikipedia/TITLE``. Redirects and pages outside namespace 0 (talk, user, …) are skipped."""
    mwparserfromhell = _mwparser(path)
    empty = 0
    expected = "a MediaWiki XML export (…-pages-articles.xml[.bz2])"
    with _damaged(path, expected), _open_xml(path) as f:
        events = ElementTree.iterparse(f, events=("start", "end"))
        _, root = next(events)
        if _local(root.tag) != "mediawiki":
            raise InputError(f"{path}: not a MediaWiki export (root element <{_local(root.tag)}>,"
                             " expected <mediawiki>)")
        ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        for event, elem in events:
            if event != "end" or elem.tag != f"{ns}page":
                continue
            title = elem.findtext(f"{ns}title") or ""
            wikitext = elem.findtext(f"{ns}revision/{ns}text") or ""
            is_article = (elem.findtext(f"{ns}ns") or "0").strip() == "0"
            redirect = elem.find(f"{ns}redirect") is not None
            root.clear()  # drop the pages read so far: memory stays one page
            if not is_article or redirect:
                continue
            text = wikitext_to_text(wikitext, mwparserfromhell)
            if not text:
                empty += 1
                continue
            yield Document(f"wikipedia/{title}", text)
    if empty:
        log.info("%s: skipped %d article(s) with no text after stripping markup", path, empty)


def wikitext_to_text(wikitext: str, mwparserfromhell: Any = None) -> str:
    """Plain text of an article's wikitext: links become their text; templates, references,
    file/image and category links, tables' markup and HTML tags go; blank-line runs collapse."""
    mwparserfromhell = mwparserfromhell or _mwparser(Path("wikitext"))
    code = mwparserfromhell.parse(wikitext)
    drop = [link for link in code.filter_wikilinks() if _DROP_LINKS.match(str(link.title))]
    drop += [tag for tag in code.filter_tags() if str(tag.tag).strip().lower() in _DROP_TAGS]
    for node in drop:
        with suppress(ValueError):  # nested in a node removed before it
            code.remove(node)
    text = code.strip_code(normalize=True, collapse=True)
    text = _LINE_EDGE_SPACE.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _mwparser(path: Path) -> Any:
    try:
        import mwparserfromhell
    except ImportError:
        raise InputError(f"{path}: reading Wikipedia dumps needs mwparserfromhell "
                         f"({_INSTALL})") from None
    return mwparserfromhell


def _open_xml(path: Path) -> IO[bytes]:
    return bz2.open(path, "rb") if path.name.lower().endswith(".bz2") else open(path, "rb")


def _looks_like_mediawiki(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False  # the text reader names the file and the reason
    return b"<mediawiki" in head


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


# --- errors -------------------------------------------------------------------------------------

@contextmanager
def _damaged(path: Path, expected: str, *errors: type[Exception]) -> Iterator[None]:
    """A broken stream or format in ``path`` as one InputError saying what was expected."""
    try:
        yield
    except (EOFError, zlib.error, ElementTree.ParseError, *errors) as e:
        raise InputError(f"{path}: damaged or truncated ({_one_line(e)}); expected "
                         f"{expected}") from None
    except OSError as e:  # also gzip.BadGzipFile and bz2's "Invalid data stream"
        raise InputError(f"{path}: cannot read ({_one_line(e)}); expected {expected}") from None


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200] + ("…" if len(text) > 200 else "")
