"""Common Crawl (WARC, WET) and Wikipedia dump readers, on real-schema files written here."""

from __future__ import annotations

import bz2
import gzip
import random
from io import BytesIO

import pytest

from lmforge.cli import main
from lmforge.data.manifest import load_manifest
from lmforge.data.shards import Shard
from lmforge.data.sources import ReadOptions, documents
from lmforge.data.web_sources import web_kind, web_pages, wikitext_to_text
from lmforge.errors import InputError
from lmforge.tokenizer import Tokenizer

warcio = pytest.importorskip("warcio", reason="needs the scale extra: pip install "
                                              "'lmforge[scale]'")
pytest.importorskip("trafilatura", reason="needs the scale extra: pip install 'lmforge[scale]'")
pytest.importorskip("mwparserfromhell", reason="needs the scale extra: pip install "
                                               "'lmforge[scale]'")
from warcio.statusandheaders import StatusAndHeaders  # noqa: E402
from warcio.warcwriter import WARCWriter  # noqa: E402

WORDS = ["the", "of", "and", "to", "in", "river", "stone", "light", "garden", "winter", "morning",
         "letter", "music", "city", "forest", "harbor", "window", "evening", "question", "story",
         "history", "science", "market", "road", "village", "mountain", "teacher", "bridge"]
NAV = "Home About Contact Subscribe Login"
FOOTER = "Copyright 2024 Example Media. All rights reserved. Privacy policy. Terms of use."


def prose(seed: int, n_words: int = 140) -> str:
    """Sentences of common words (passes the prose/web quality filters)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choices(WORDS, k=rng.randint(8, 16))).capitalize() + ".")
    return " ".join(sentences)


def page(title: str, body: str) -> bytes:
    """An HTML page: navigation, a main article, a sidebar and a footer."""
    nav = "".join(f'<li><a href="/{w.lower()}">{w}</a></li>' for w in NAV.split())
    return (f"<!DOCTYPE html><html><head><title>{title}</title></head><body>"
            f"<header><nav><ul>{nav}</ul></nav></header>"
            f"<main><article><h1>{title}</h1><p>{body}</p></article></main>"
            f'<aside><h3>Related</h3><ul><li><a href="/x">Ten tricks</a></li></ul></aside>'
            f"<footer><p>{FOOTER}</p></footer></body></html>").encode()


def write_warc(path, records: list[tuple]) -> list[str]:
    """``records``: (type, url, content type, payload) as gzipped WARC records; returns their
    WARC-Record-IDs."""
    ids = []
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for rec_type, url, content_type, payload in records:
            if rec_type in ("response", "request"):
                first = "200 OK" if rec_type == "response" else "GET / HTTP/1.1"
                http = StatusAndHeaders(first, [("Content-Type", content_type)],
                                        protocol="HTTP/1.1", is_http_request=rec_type == "request")
                record = writer.create_warc_record(url, rec_type, payload=BytesIO(payload),
                                                   http_headers=http)
            else:
                record = writer.create_warc_record(url, rec_type, payload=BytesIO(payload),
                                                   warc_content_type=content_type)
            writer.write_record(record)
            ids.append(record.rec_headers.get_header("WARC-Record-ID"))
    return ids


BODIES = [prose(i) for i in range(3)]
EMPTY_PAGE = (b'<html><head><title>T</title></head><body><nav><ul><li><a href="/">Home</a></li>'
              b"</ul></nav><script>var x = 1;</script></body></html>")


@pytest.fixture
def warc_file(tmp_path):
    path = tmp_path / "CC-MAIN-0001.warc.gz"
    ids = write_warc(path, [
        ("request", "https://a.example/", "", b""),
        ("response", "https://a.example/", "text/html; charset=utf-8", page("Rivers", BODIES[0])),
        ("response", "https://a.example/logo.png", "image/png", b"\x89PNG\r\n\x1a\n" * 20),
        ("response", "https://b.example/", "text/html", page("Gardens", BODIES[1])),
        ("response", "https://c.example/", "text/html", EMPTY_PAGE),
        ("response", "https://d.example/", "application/xhtml+xml", page("Roads", BODIES[2])),
    ])
    return path, ids


def test_warc_keeps_the_main_text_of_html_responses(warc_file):
    path, ids = warc_file
    opts = ReadOptions()
    docs = list(documents(str(path), opts))
    assert [d.name for d in docs] == [ids[1], ids[3], ids[5]]  # not the request, image, empty page
    for doc, body in zip(docs, BODIES, strict=True):
        assert body in doc.text
        assert "Subscribe" not in doc.text and "All rights reserved" not in doc.text
    assert opts.issues == {"empty_extraction": 1}
    pages = list(web_pages(path, "warc"))
    assert [p.url for p in pages] == ["https://a.example/", "https://b.example/",
                                      "https://d.example/"]


def test_wet_reads_conversion_records_as_they_are(tmp_path):
    path = tmp_path / "CC-MAIN-0001.warc.wet.gz"
    texts = ["First page\nplain text.", "Second page: café, 日本語.", ""]
    ids = write_warc(path, [("warcinfo", "", "application/warc-fields", b"software: test\r\n")]
                     + [("conversion", f"https://{i}.example/", "text/plain", t.encode())
                        for i, t in enumerate(texts)])
    bad = tmp_path / "x.wet"
    write_warc(bad, [("conversion", "https://x.example/", "text/plain", b"ok \xff here")])
    assert web_kind(path) == web_kind(bad) == "wet"
    docs = list(documents(str(path)))
    assert [(d.name, d.text) for d in docs] == list(zip(ids[1:], texts, strict=True))
    (doc,) = documents(str(bad))
    assert (doc.text, doc.replaced_bytes) == ("ok \ufffd here", 1)
    with pytest.raises(InputError, match=r"x\.wet: <urn:uuid:.*>: not valid UTF-8 at byte 3"):
        list(documents(str(bad), ReadOptions(utf8_errors="strict")))


MEDIAWIKI = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="0.11" xml:lang="en">
  <siteinfo><sitename>Wikipedia</sitename><dbname>enwiki</dbname>
    <namespaces><namespace key="0" case="first-letter" /><namespace key="1">Talk</namespace>
    </namespaces></siteinfo>
{pages}
</mediawiki>
"""


def wiki_page(title: str, ns: int, text: str, redirect: str = "") -> str:
    redirect = f'<redirect title="{redirect}" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>{len(title)}</id>"
            f"{redirect}<revision><id>1</id><timestamp>2024-01-01T00:00:00Z</timestamp>"
            f'<model>wikitext</model><format>text/x-wiki</format><text bytes="1" '
            f'xml:space="preserve">{text}</text><sha1>x</sha1></revision></page>')


ARTICLE = ("{{Infobox river|name=Amber|length=42 km}}\n'''Amber River''' is a river in "
           "[[Northland|the north]]. It flows to the [[sea]].&lt;ref&gt;Atlas, p. 3&lt;/ref&gt;"
           "\n\n\n\n== History ==\nThe ''river'' was named in 1820.{{cn}}\n"
           "[[File:Amber.jpg|thumb|The river at dawn]]\n[[Category:Rivers]]")


def write_dump(path, pages: list[str], compress: bool = True) -> None:
    data = MEDIAWIKI.format(pages="\n".join(pages)).encode()
    path.write_bytes(bz2.compress(data) if compress else data)


def test_wikipedia_articles_are_plain_text_without_redirects_or_talk(tmp_path):
    path = tmp_path / "enwiki-20240101-pages-articles1.xml.bz2"
    write_dump(path, [wiki_page("Amber River", 0, ARTICLE),
                      wiki_page("Amber river", 0, "#REDIRECT [[Amber River]]", "Amber River"),
                      wiki_page("Talk:Amber River", 1, "Is the length right? ~~~~"),
                      wiki_page("Empty", 0, "{{stub}}[[Category:Stubs]]"),
                      wiki_page("Stone Bridge", 0, "A '''stone''' bridge.")])
    docs = list(documents(str(path)))
    assert [d.name for d in docs] == ["wikipedia/Amber River", "wikipedia/Stone Bridge"]
    assert docs[0].text == ("Amber River is a river in the north. It flows to the sea.\n\n"
                            "History\nThe river was named in 1820.")
    assert docs[1].text == "A stone bridge."


def test_plain_xml_is_wikipedia_only_when_it_is_a_mediawiki_export(tmp_path):
    dump, other = tmp_path / "dump.xml", tmp_path / "notes.xml"
    write_dump(dump, [wiki_page("Stone", 0, "A [[rock]].")], compress=False)
    other.write_text("<notes><n>hello</n></notes>")
    assert [(d.name, d.text) for d in documents(str(dump))] == [("wikipedia/Stone", "A rock.")]
    assert web_kind(other) is None
    assert [d.text for d in documents(str(other))] == ["<notes><n>hello</n></notes>"]


def test_wikitext_to_text_drops_refs_templates_files_and_categories():
    text = wikitext_to_text("A<ref name=x>{{cite web|url=u}}</ref> [[b|B]] {{t}}\n\n\n\n"
                            "[[Image:x.png|a [[nested]] caption]] c [[category:Y]]")
    assert text == "A B\n\nc"


def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, warc_file):
    path, _ = warc_file
    data = path.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[:len(data) // 2])
    not_warc = tmp_path / "junk.warc.gz"
    not_warc.write_bytes(gzip.compress(b"this is not a warc file\n" * 10))
    dump = tmp_path / "cut-pages-articles.xml.bz2"
    write_dump(dump, [wiki_page(f"P{i}", 0, prose(i)) for i in range(20)])
    bz_cut = tmp_path / "half.xml.bz2"
    bz_cut.write_bytes(dump.read_bytes()[:len(dump.read_bytes()) // 2])
    not_bz = tmp_path / "plain.xml.bz2"
    not_bz.write_bytes(b"not bzip2 data")
    malformed = tmp_path / "bad.xml.bz2"
    malformed.write_bytes(bz2.compress(b"<mediawiki><page><title>x</page></mediawiki>"))
    other_xml = tmp_path / "rss.xml.bz2"
    other_xml.write_bytes(bz2.compress(b"<rss><channel/></rss>"))
    cases = {cut: "WARC file", not_warc: "WARC file", bz_cut: "MediaWiki XML export",
             not_bz: "MediaWiki XML export", malformed: "MediaWiki XML export",
             other_xml: "expected <mediawiki>"}
    for bad, expected in cases.items():
        with pytest.raises(InputError) as e:
            list(documents(str(bad)))
        message = str(e.value)
        assert message.startswith(f"{bad}: ") and expected in message, message
        assert "\n" not in message


def test_prepare_end_to_end_from_a_warc_file(tmp_path, capsys):
    path = tmp_path / "crawl.warc.gz"
    write_warc(path, [("response", f"https://{i}.example/", "text/html", page(f"P{i}", prose(i)))
                      for i in range(12)])
    tok = tmp_path / "tok.json"
    Tokenizer.train([prose(100 + i) for i in range(30)], 300, workers=1,
                    show_progress=False).save(tok)
    out = tmp_path / "out"
    assert main(["data", "prepare", "--input", str(path), "--tokenizer", str(tok), "--out",
                 str(out), "--preset", "web", "--val-fraction", "0.2", "--workers", "1",
                 "--no-progress"]) == 0, capsys.readouterr().err
    manifest = load_manifest(out)
    assert manifest["stats"]["input"]["documents"] == 12
    assert manifest["num_documents"] == 12  # the article text passes the web filters
    assert manifest["splits"]["train"]["documents"] and manifest["shards"]
    for s in manifest["shards"]:
        assert Shard(out / s["path"]).num_tokens == s["tokens"] > 0
